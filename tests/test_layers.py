"""Layers against plain references written from shared/docs/REFERENCE.md, not from the layer code."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_err, small_hybrid

from mamba_jax.layers.attention import Attention, rope
from mamba_jax.layers.mamba2 import Mamba2Mixer, causal_conv1d
from mamba_jax.layers.mlp import MLP
from mamba_jax.layers.norms import gated_rms_norm
from mamba_jax.ops import ssd_reference

TOL = 1e-5


def _np(x):
    return np.asarray(x, np.float64)


def test_causal_conv1d_matches_loop_with_documents_and_state():
    b, l, g, f, k = 2, 13, 2, 3, 4
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (b, l, g, f))
    w = jax.random.normal(ks[1], (k, g, f))
    bias = jax.random.normal(ks[2], (g, f))
    state = jax.random.normal(ks[3], (b, k - 1, g, f))
    seq_idx = jnp.array([[0] * 5 + [1] * 8, [0] * 13], jnp.int32)
    got = causal_conv1d(x, w, bias, seq_idx=seq_idx, state_BKGF=state)

    xs, ws, st, sid = _np(x), _np(w), _np(state), np.asarray(seq_idx)
    want = np.zeros_like(xs)
    for i in range(b):
        full = np.concatenate([st[i], xs[i]], axis=0)  # state belongs to the first document
        full_sid = np.concatenate([np.full(k - 1, sid[i, 0]), sid[i]])
        for t in range(l):
            acc = _np(bias).copy()
            for j in range(k):  # tap j reads x[t - (k-1) + j]
                pos = t + j
                if full_sid[pos] == sid[i, t]:
                    acc += ws[j] * full[pos]
            want[i, t] = acc
    assert rel_err(got, want) <= TOL


def test_gated_norm_groups():
    ks = jax.random.split(jax.random.key(1), 3)
    y, z = jax.random.normal(ks[0], (2, 5, 4, 3)), jax.random.normal(ks[1], (2, 5, 4, 3))
    w = jax.random.normal(ks[2], (4, 3))
    gated = _np(y) * _np(z) / (1 + np.exp(-_np(z)))
    for groups in (1, 2, 4):
        got = gated_rms_norm(y, z, w, groups=groups, eps=1e-5, out_dtype=jnp.float32)
        gg = gated.reshape(2, 5, groups, -1)
        want = (gg / np.sqrt((gg**2).mean(-1, keepdims=True) + 1e-5)).reshape(2, 5, 4, 3) * _np(w)
        assert rel_err(got, want) <= TOL


def _reference_mixer(m: Mamba2Mixer, x, seq_idx=None):
    """Mamba2 mixer written per head from the documented per-group in_proj layout, float64 numpy + the
    naive SSD recurrence."""
    cfg = m.cfg
    h, p, g, n, k = cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_num_groups, cfg.mamba_d_state, cfg.mamba_d_conv
    r = h // g
    W, xs = _np(m.in_proj[...]), _np(x)
    b, l, _ = xs.shape
    proj = np.einsum("bld,dgw->blgw", xs, W)  # per group: [z (r·p) | x (r·p) | B (n) | C (n) | dt (r)]
    z = proj[..., : r * p].reshape(b, l, h, p)
    xbc = proj[..., r * p : 2 * r * p + 2 * n]
    dt = proj[..., 2 * r * p + 2 * n :].reshape(b, l, h)
    cw, cb = _np(m.conv_weight[...]), _np(m.conv_bias[...])
    conv = np.zeros_like(xbc)
    sid = np.zeros((b, l), int) if seq_idx is None else np.asarray(seq_idx)
    for t in range(l):
        acc = np.broadcast_to(cb, xbc.shape[:1] + cb.shape).copy()
        for j in range(k):
            s = t - (k - 1) + j
            if s >= 0:
                acc += cw[j] * xbc[:, s] * (sid[:, s] == sid[:, t])[:, None, None]
        conv[:, t] = acc
    conv = conv / (1 + np.exp(-conv))
    xh = conv[..., : r * p].reshape(b, l, h, p)
    B, C = conv[..., r * p : r * p + n], conv[..., r * p + n :]
    y = ssd_reference(
        jnp.asarray(xh), jnp.asarray(dt), -jnp.exp(m.A_log[...]), jnp.asarray(B), jnp.asarray(C),
        D=m.D[...], dt_bias=m.dt_bias[...], dt_softplus=True, seq_idx=seq_idx,
    )  # fmt: skip
    gy = _np(y) * z / (1 + np.exp(-z))
    groups = g if cfg.mamba_norm_per_group else 1
    gg = gy.reshape(b, l, groups, -1)
    normed = (gg / np.sqrt((gg**2).mean(-1, keepdims=True) + cfg.norm_eps)).reshape(b, l, h, p) * _np(m.norm[...])
    return np.einsum("blhp,hpd->bld", normed, _np(m.out_proj[...]))


@pytest.mark.parametrize("groups,per_group", [(1, True), (4, True), (2, False)])
def test_mamba_mixer_matches_reference(groups, per_group):
    cfg = small_hybrid(mamba_num_groups=groups, mamba_norm_per_group=per_group)
    m = Mamba2Mixer(cfg, 0, rngs=nnx.Rngs(params=groups))
    x = jax.random.normal(jax.random.key(2), (2, 37, cfg.d_model))
    seq_idx = (jnp.arange(37) >= jnp.array([[12], [30]])).astype(jnp.int32)
    for s in (None, seq_idx):
        assert rel_err(m(x, seq_idx=s), _reference_mixer(m, x, s)) <= TOL


def test_mamba_mixer_init_and_markers():
    cfg = small_hybrid(d_model=128, mamba_num_groups=2)
    m = Mamba2Mixer(cfg, 0, rngs=nnx.Rngs(params=0))
    A = np.exp(_np(m.A_log[...]))
    assert A.min() >= 1.0 and A.max() <= 16.0
    dt = np.log1p(np.exp(_np(m.dt_bias[...])))
    assert dt.min() >= cfg.mamba_dt_min * 0.999 and dt.max() <= cfg.mamba_dt_max * 1.001
    assert np.all(_np(m.D[...]) == 1) and np.all(_np(m.norm[...]) == 1)
    assert abs(np.std(_np(m.in_proj[...])) - 0.02) < 0.002
    assert abs(np.std(_np(m.out_proj[...])) - 0.02 / math.sqrt(cfg.n_layers)) < 0.002
    assert np.abs(_np(m.conv_weight[...])).max() <= 0.5
    no_decay = {"A_log", "D", "dt_bias", "norm", "conv_bias"}
    for name in ("in_proj", "conv_weight", "conv_bias", "dt_bias", "A_log", "D", "norm", "out_proj"):
        v = getattr(m, name)
        assert v.get_metadata()["weight_decay"] is (name not in no_decay), name
        assert len(v.get_metadata()["out_sharding"]) == v[...].ndim, name


def _reference_attention(a: Attention, x, seq_idx=None, positions=None):
    cfg = a.cfg
    q = np.einsum("bld,dhe->blhe", _np(x), _np(a.q_proj[...]))
    k = np.einsum("bld,dhe->blhe", _np(x), _np(a.k_proj[...]))
    v = np.einsum("bld,dhe->blhe", _np(x), _np(a.v_proj[...]))
    if cfg.attn_rope:
        q = _np(rope(jnp.asarray(q, jnp.float32), positions, cfg.attn_rope_theta))
        k = _np(rope(jnp.asarray(k, jnp.float32), positions, cfg.attn_rope_theta))
    rep = cfg.attn_num_heads // cfg.attn_num_kv_heads
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)  # query head i reads kv head i // rep
    s = np.einsum("bthe,bshe->bhts", q, k) / math.sqrt(cfg.attn_head_dim)
    l = x.shape[1]
    mask = np.tril(np.ones((l, l), bool))[None, None]
    if seq_idx is not None:
        sid = np.asarray(seq_idx)
        mask = mask & (sid[:, None, :, None] == sid[:, None, None, :])
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshe->bthe", p, v)
    return np.einsum("blhe,hed->bld", o, _np(a.o_proj[...]))


@pytest.mark.parametrize("use_rope", [False, True])
def test_attention_matches_reference(use_rope):
    cfg = small_hybrid(attn_num_heads=4, attn_num_kv_heads=2, attn_rope=use_rope)
    a = Attention(cfg, 1, rngs=nnx.Rngs(params=3))
    x = jax.random.normal(jax.random.key(4), (2, 19, cfg.d_model))
    seq_idx = (jnp.arange(19) >= jnp.array([[7], [19]])).astype(jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(19), (2, 19))
    assert rel_err(a(x, positions=pos), _reference_attention(a, x, positions=pos)) <= TOL
    assert rel_err(a(x, seq_idx=seq_idx, positions=pos), _reference_attention(a, x, seq_idx, pos)) <= TOL


def test_rope_scores_depend_only_on_relative_position():
    ks = jax.random.split(jax.random.key(5), 2)
    q, k = jax.random.normal(ks[0], (1, 1, 1, 16)), jax.random.normal(ks[1], (1, 1, 1, 16))
    score = lambda pq, pk: float(  # noqa: E731
        jnp.sum(rope(q, jnp.array([[pq]]), 10000.0) * rope(k, jnp.array([[pk]]), 10000.0))
    )
    assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


@pytest.mark.parametrize("act", ["relu2", "gelu", "swiglu"])
def test_mlp_activations(act):
    cfg = small_hybrid(mlp_activation=act)
    m = MLP(cfg, 2, rngs=nnx.Rngs(params=6))
    x = jax.random.normal(jax.random.key(7), (2, 5, cfg.d_model))
    h = np.einsum("bld,df->blf", _np(x), _np(m.up_proj[...]))
    if act == "relu2":
        h = np.maximum(h, 0) ** 2
    elif act == "gelu":
        from math import erf

        h = 0.5 * h * (1 + np.vectorize(erf)(h / math.sqrt(2)))
    else:
        gate = np.einsum("bld,df->blf", _np(x), _np(m.gate_proj[...]))
        h = gate / (1 + np.exp(-gate)) * h
    assert rel_err(m(x), np.einsum("blf,fd->bld", h, _np(m.down_proj[...]))) <= TOL
