"""Context (sequence) parallelism on 8 fake CPU devices (`mamba_jax.parallel.context`): the sequence split over
the mesh's `sequence` axis gives the single-device logits and gradients — with document boundaries inside
slices, on a slice boundary and documents spanning several slices, with tensor parallelism — and bad set-ups
are named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_mesh_generation_equals_single_device, rel_err, small_hybrid

from mamba_jax.parallel import MeshConfig, context, init_model, make_mesh, use_mesh
from mamba_jax.parallel.sharding import DEFAULT_RULES

L = 64


def _batch(seed: int, b: int = 2):
    """Token ids (b, L) and packed-document ids: cuts inside slices, at 16 (a slice boundary when L is
    split 4 ways), a one-token document (33) and documents that span several slices."""
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, 250, (b, L)), jnp.int32)
    cuts = np.array([[16, 21, 40], [5, 33, 34]])[:b]
    seq_idx = jnp.asarray((np.arange(L)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)
    return ids, seq_idx


def _logits(model, ids, seq_idx, mesh=None):
    fn = jax.jit(lambda m, i, s: m(i, seq_idx=s))
    if mesh is None:
        return fn(model, ids, seq_idx)
    with use_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(lambda m, i, s: m(i, seq_idx=s))(model, ids, seq_idx))
        return fn(model, ids, seq_idx)


@pytest.mark.parametrize("mesh,pattern,chunk,docs", [
    (dict(data=2, sequence=4), "M*-M-M", 8, True),  # 16-token slices of 2 chunks
    (dict(sequence=8), "MM", 16, False),  # 8-token slices shorter than a chunk; one document per row
    (dict(data=1, sequence=2, tensor=4), "M*-M", 16, True),  # heads and groups split too
])  # fmt: skip
def test_sequence_parallel_logits_equal_single_device(mesh, pattern, chunk, docs):
    cfg = small_hybrid(pattern=pattern, mamba_chunk_size=chunk)
    mesh = make_mesh(MeshConfig(**mesh))
    ids, seq_idx = _batch(0)
    sid = seq_idx if docs else None
    want = _logits(init_model(cfg, seed=1), ids, sid)
    assert rel_err(_logits(init_model(cfg, mesh=mesh, seed=1), ids, sid, mesh), want) <= 1e-5


def test_sequence_parallel_gradients_equal_single_device():
    """Gradients flow through the halo exchange, the gathered states and the carried-state correction."""
    cfg = small_hybrid(pattern="M*-M", mamba_chunk_size=8)
    ids, seq_idx = _batch(1)

    def loss(model, i, s):
        logp = jax.nn.log_softmax(model(i, seq_idx=s))
        return -jnp.mean(jnp.take_along_axis(logp[:, :-1], i[:, 1:, None], axis=-1))

    g1 = jax.jit(nnx.grad(loss))(init_model(cfg, seed=2), ids, seq_idx)
    mesh = make_mesh(MeshConfig(data=2, sequence=4))
    with use_mesh(mesh):
        g8 = jax.jit(nnx.grad(loss))(init_model(cfg, mesh=mesh, seed=2), ids, seq_idx)
    flat1, flat8 = jax.tree.leaves(nnx.state(g1)), jax.tree.leaves(nnx.state(g8))
    assert len(flat1) == len(flat8)
    for a, b in zip(flat8, flat1, strict=True):
        assert rel_err(a, b) <= 1e-5


def test_without_the_carried_state_the_logits_differ(monkeypatch):
    """The equality above rests on the state passed between slices: with it dropped (each slice starting
    from zero, the conv halo still exchanged) the logits miss the single-device ones by 100× the tolerance
    of the equality tests (the state's share of a randomly initialised model's output is small)."""
    cfg = small_hybrid(pattern="MM", mamba_chunk_size=8)
    ids, _ = _batch(2)
    want = _logits(init_model(cfg, seed=3), ids, None)
    mesh = make_mesh(MeshConfig(data=2, sequence=4))
    monkeypatch.setattr(context, "_incoming_state", lambda end, *args: jnp.zeros_like(end))
    assert rel_err(_logits(init_model(cfg, mesh=mesh, seed=3), ids, None, mesh), want) > 1e-3


def test_generation_on_a_sequence_parallel_mesh_equals_single_device():
    """Evaluation and samples during a sequence-parallel run generate on its mesh: prefill and decode take
    the plain path there (partitioned by XLA) and give the single-device tokens."""
    cfg = small_hybrid(pattern="M*-M", mamba_chunk_size=8)
    prompts = [[5, 17, 3, 9], [8, 1, 4, 4, 7, 2, 250 - 1, 12, 13, 60, 61, 62, 63]]
    assert_mesh_generation_equals_single_device(cfg, MeshConfig(data=2, sequence=4), prompts, new_tokens=5, seed=4)


def test_bad_sequence_parallel_setups_are_named():
    cfg = small_hybrid(pattern="M", mamba_chunk_size=8)
    mesh = make_mesh(MeshConfig(data=2, sequence=4))
    model = init_model(cfg, mesh=mesh, seed=0)
    with use_mesh(mesh), pytest.raises(ValueError, match="multiple of 4"):
        jax.eval_shape(lambda m: m(jnp.zeros((2, 30), jnp.int32)), model)
    rules = tuple(r for r in DEFAULT_RULES if r[0] != "length")
    with use_mesh(mesh, rules), pytest.raises(ValueError, match="'length'"):
        jax.eval_shape(lambda m: m(jnp.zeros((2, 32), jnp.int32)), model)
