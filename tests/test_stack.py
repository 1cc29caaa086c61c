"""Scanned layer segments: the pattern cut, and scanned = unrolled on the same weights, sharded too."""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import forward, rel_err, small_hybrid

from mamba_jax.models.stack import segment_pattern
from mamba_jax.parallel import MeshConfig, init_model, make_mesh, use_mesh


@pytest.mark.parametrize(
    "pattern,expected",
    [
        ("MMMM", [("M", 4)]),
        ("M-M-M-", [("M-", 3)]),
        ("M*-", [("M*-", 1)]),
        ("M-M-M-M*-M-M-M-M-M*-M-", [("M-M-M-M*-M-", 2)]),
        ("M-M--M*", [("M-", 2), ("-M*", 1)]),
        ("M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-", [("M-M-M-M*-M-", 4), ("M-", 4)]),
    ],
)
def test_segment_pattern(pattern, expected):
    segments = segment_pattern(pattern)
    assert "".join(u * r for u, r in segments) == pattern
    assert segments == expected
    assert segment_pattern(pattern, scan=False) == [(s, 1) for s in pattern]


def _copy_into_unrolled(scanned, unrolled):
    """Copy every layer's weights from a scanned model into an unrolled one (layer by layer)."""
    for i in range(scanned.cfg.n_layers):
        _, rep, _ = scanned.layers.locate(i)
        src, dst = scanned.layers.block(i), unrolled.layers.block(i)
        src_state, dst_state = nnx.state(src), nnx.state(dst)
        picked = src_state if rep is None else jax.tree.map(lambda a, r=rep: a[r], src_state)
        nnx.update(dst, picked)
        assert jax.tree.structure(nnx.state(dst)) == jax.tree.structure(dst_state)
    unrolled.embed.set_value(scanned.embed.get_value())
    unrolled.lm_head.set_value(scanned.lm_head.get_value())
    nnx.update(unrolled.norm_f, nnx.state(scanned.norm_f))


def test_scanned_equals_unrolled_on_the_same_weights():
    cfg = small_hybrid(pattern="M-M-M*-M*-", attn_rope=True)
    scanned = init_model(cfg, seed=0)
    assert scanned.layers.plan == (("M-", 2), ("M*-", 2))
    assert scanned.layers.block(0).mixer.in_proj[...].shape[0] == 2  # stacked
    assert scanned.layers.block(0).mixer.in_proj.get_metadata()["out_sharding"][0] == "layers"
    unrolled = init_model(cfg.replace(scan_layers=False), seed=1)
    _copy_into_unrolled(scanned, unrolled)
    ids = jax.random.randint(jax.random.key(0), (2, 40), 0, cfg.vocab_size)
    seq_idx = (np.arange(40)[None] >= np.array([[17], [40]])).astype(np.int32)
    for s in (None, seq_idx):
        assert rel_err(forward(scanned, ids, s), forward(unrolled, ids, s)) <= 1e-5
    assert sum(x.size for x in jax.tree.leaves(nnx.state(scanned))) == sum(
        x.size for x in jax.tree.leaves(nnx.state(unrolled))
    )


def test_scanned_model_on_a_mesh_equals_single_device():
    cfg = small_hybrid(pattern="M-M-M*-M*-")
    ids = jax.random.randint(jax.random.key(1), (4, 24), 0, cfg.vocab_size)
    single = init_model(cfg, seed=2)(ids)
    mesh = make_mesh(MeshConfig(data=2, tensor=4))
    model = init_model(cfg, mesh=mesh, seed=2)
    with use_mesh(mesh):
        sharded = jax.jit(lambda ids: model(ids))(ids)
    assert rel_err(sharded, single) <= 1e-5
