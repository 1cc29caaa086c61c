"""The fused decode kernels (mamba_jax.kernels.decode): each against a plain float32 formula, and a model
decoding with them against the XLA decode path and the full forward. Pallas interpret mode on the CPU; the
`gpu` test runs them compiled at real widths."""

import dataclasses
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import full_forward_rows, rel_err, small_hybrid

from mamba_jax.inference.engine import Engine, SamplingParams, _with_decode_impl, pad_prompts
from mamba_jax.inference.fold import fold_norm_weights
from mamba_jax.inference.quantize import quantize_weights
from mamba_jax.kernels import decode as kd
from mamba_jax.kernels.norm_gemv import MAX_GEMV_ROWS, norm_gemv
from mamba_jax.models.stack import Block
from mamba_jax.ops.ssd import note_once
from mamba_jax.ops.ssd_reference import ssd_step
from mamba_jax.parallel import init_model


def _norm_gemv_ref(x, nw, w, res, groups, eps):
    rows, k = x.shape
    xg = x.astype(jnp.float32).reshape(rows, groups, -1)
    u = (xg * jax.lax.rsqrt(jnp.mean(xg * xg, -1, keepdims=True) + eps)).reshape(rows, k) * nw
    y = jnp.dot(u.astype(w.dtype).astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    y = y.astype(w.dtype)
    return y if res is None else res + y.astype(res.dtype)


@pytest.mark.parametrize("rows,k,n,groups,dtype,residual", [
    (1, 256, 200, 1, jnp.bfloat16, False),  # N not a multiple of the column block
    (3, 192, 64, 2, jnp.bfloat16, True),  # group of 96: the K step drops to 32
    (4, 128, 80, 4, jnp.float32, True),
])  # fmt: skip
def test_norm_gemv_matches_formula(rows, k, n, groups, dtype, residual):
    ks = jax.random.split(jax.random.key(rows), 4)
    x = jax.random.normal(ks[0], (rows, k), jnp.float32) * 3
    nw = 1 + 0.1 * jax.random.normal(ks[1], (k,), jnp.float32)
    w = (jax.random.normal(ks[2], (k, n), jnp.float32) / 16).astype(dtype)
    res = jax.random.normal(ks[3], (rows, n), jnp.float32) if residual else None
    got = norm_gemv(x, nw, w, res, eps=1e-5, groups=groups, bn=32)
    want = _norm_gemv_ref(x, nw, w, res, groups, 1e-5)
    assert got.dtype == want.dtype and got.shape == (rows, n)
    # Same roundings; only the float32 summation order differs (one bf16 ulp where a sum sits on a tie).
    tol = 1e-6 if dtype == jnp.float32 else 8e-3
    assert rel_err(got, want) <= tol


def test_norm_gemv_rejects_what_it_cannot_take():
    x = jnp.ones((MAX_GEMV_ROWS + 1, 128))
    with pytest.raises(ValueError, match="batch"):
        norm_gemv(x, jnp.ones(128), jnp.ones((128, 32)), eps=1e-5)
    with pytest.raises(ValueError, match="norm groups"):
        norm_gemv(jnp.ones((1, 120)), jnp.ones(120), jnp.ones((120, 32)), eps=1e-5, groups=3)


@pytest.mark.parametrize("groups,dt_limit,state_dtype,p,block_p,prefetch,hp,split", [
    (1, (0.0, float("inf")), jnp.float32, 16, None, 0, 1, False),
    # two programs per head, each half of its state rows; a row of programs prefetching 1000 elements
    (2, (0.01, 0.1), jnp.bfloat16, 32, 16, 1000, 1, False),
    # two heads per program (they share the norm's 1/rms and the group's B / C conv), with the prefetch
    (1, (0.0, float("inf")), jnp.bfloat16, 16, None, 1000, 2, False),
    (2, (0.01, 0.1), jnp.float32, 32, 16, 0, 2, False),
    # two launches: the conv per channel, then the state update
    (1, (0.0, float("inf")), jnp.float32, 16, None, 0, 1, True),
    (2, (0.01, 0.1), jnp.bfloat16, 32, 16, 0, 2, True),
])  # fmt: skip
def test_ssm_step_matches_conv_and_recurrence(groups, dt_limit, state_dtype, p, block_p, prefetch, hp, split):
    b, h, s, taps = 2, 4, 32, 3
    r = h // groups
    f = r * p + 2 * s
    w = 2 * r * p + 2 * s + r
    ks = jax.random.split(jax.random.key(groups), 9)
    zx = jax.random.normal(ks[0], (b, groups, w), jnp.float32)
    conv = jax.random.normal(ks[1], (b, taps, groups, f), jnp.float32)
    cw = jax.random.normal(ks[2], (taps + 1, groups, f), jnp.float32) / 2
    cb = jax.random.normal(ks[3], (groups, f), jnp.float32) / 4
    ssm = jax.random.normal(ks[4], (b, h, p, s), jnp.float32).astype(state_dtype)
    a_log = jnp.log(jax.random.uniform(ks[5], (h,), jnp.float32, 1, 16))
    dvec = jax.random.normal(ks[6], (h,), jnp.float32)
    dtb = jax.random.normal(ks[7], (h,), jnp.float32)
    u = jax.random.normal(ks[8], (b, 48), jnp.float32) * 2  # in_proj's input when the norm was folded into it
    scale = jax.lax.rsqrt(jnp.mean(u * u, axis=-1) + 1e-5)
    pos = 7 + groups  # the ring's slots rotate with the position
    g_BF, ss_BH, ring_new, ssm_new = kd.ssm_step(
        zx, kd.conv_ring(conv, pos), cw, cb, ssm, a_log, dvec, dtb, pos, u,
        heads=h, dt_limit=dt_limit, norm_eps=1e-5, block_p=block_p, heads_per_program=hp,
        split=split, prefetch=jnp.ones((40, 40), jnp.bfloat16) if prefetch else None, prefetch_elems=prefetch,
    )  # fmt: skip

    # Plain formula: the depthwise conv over [window | new], SiLU, the recurrence of ssd_step, the z gate.
    zx = zx * scale[:, None, None]
    z, xbc, dt = zx[..., : r * p], zx[..., r * p : r * p + f], zx[..., r * p + f :]
    window = jnp.concatenate([conv, xbc[:, None]], axis=1)
    act = jax.nn.silu(jnp.einsum("bkgf,kgf->bgf", window, cw, precision="highest") + cb)
    x, B, C = act[..., : r * p], act[..., r * p : r * p + s], act[..., r * p + s :]
    y, state = ssd_step(ssm.astype(jnp.float32), x.reshape(b, h, p), dt.reshape(b, h), -jnp.exp(a_log), B, C,
                        D=dvec, z_BHP=z.reshape(b, h, p), dt_bias=dtb, dt_softplus=True, dt_limit=dt_limit)  # fmt: skip
    assert rel_err(g_BF, y.reshape(b, h * p)) <= 1e-5
    assert rel_err(ss_BH.sum(-1), jnp.sum(jnp.square(y), axis=-1)) <= 1e-5
    assert rel_err(ssm_new.astype(jnp.float32), state.astype(state_dtype).astype(jnp.float32)) <= 1e-5
    assert ssm_new.dtype == state_dtype
    k = taps + 1  # the ring now holds positions pos − taps + 1 … pos (the last `taps` inputs)
    newest = [ring_new[:, (pos - taps + 1 + i) % k] for i in range(taps)]
    np.testing.assert_allclose(np.stack(newest, axis=1), window[:, 1:], rtol=1e-6)  # 1/rms: summation order


@pytest.mark.parametrize("h_dtype", [jnp.float32, jnp.bfloat16])
def test_gated_norm_residual_matches_formula(h_dtype):
    ks = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(ks[0], (3, 1100), jnp.float32).astype(h_dtype)  # not a power of two; 3 blocks
    out = jax.random.normal(ks[1], (3, 1100), jnp.float32).astype(jnp.bfloat16)
    ss = jax.random.uniform(ks[2], (3, 5, 2), jnp.float32, 1.0, 50.0)
    got = kd.gated_norm_residual(h, out, ss, norm_dim=160, eps=1e-5)
    inv = jax.lax.rsqrt(ss.sum((1, 2)) / 160 + 1e-5)[:, None]
    want = h + (out.astype(jnp.float32) * inv).astype(jnp.bfloat16).astype(h_dtype)
    assert got.dtype == h_dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-6, atol=1e-6)
    # With copy_dtype: the same residual, and its bf16 rounding (the next in_proj's input) from one launch.
    got2, copy = kd.gated_norm_residual(h, out, ss, norm_dim=160, eps=1e-5, copy_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got2, np.float32), np.asarray(got, np.float32))
    assert copy.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(copy, np.float32), np.asarray(got.astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("layout", ["SDB", "SBD"])
def test_gated_norm_residual_sums_split_k_partials(layout):
    """out_proj's output as float32 split-K partials, `gemv_t`'s (S, D, Bp ≥ B) or `split_k_partials`'s
    (S, B, D), summed in the kernel and rounded to the compute dtype as a GEMV's output is."""
    ks = jax.random.split(jax.random.key(4), 3)
    h = jax.random.normal(ks[0], (3, 1100), jnp.float32)
    if layout == "SDB":
        parts = jax.random.normal(ks[1], (2, 1100, 8), jnp.float32)  # two splits; rows 3..7 are padding
        out = (parts[0] + parts[1]).T[:3].astype(jnp.bfloat16)
    else:
        parts = jax.random.normal(ks[1], (3, 3, 1100), jnp.float32)  # three splits
        out = (parts[0] + parts[1] + parts[2]).astype(jnp.bfloat16)
    ss = jax.random.uniform(ks[2], (3, 5, 2), jnp.float32, 1.0, 50.0)
    got = kd.gated_norm_residual(h, parts, ss, norm_dim=160, eps=1e-5, out_dtype=jnp.bfloat16, layout=layout)
    want = kd.gated_norm_residual(h, out, ss, norm_dim=160, eps=1e-5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="out_dtype"):
        kd.gated_norm_residual(h, parts, ss, norm_dim=160, eps=1e-5, layout=layout)
    with pytest.raises(ValueError, match="layout"):
        kd.gated_norm_residual(h, parts, ss, norm_dim=160, eps=1e-5, out_dtype=jnp.bfloat16)


@pytest.mark.parametrize("split", [False, True])
def test_ssm_step_sums_split_k_partials_of_in_proj(split):
    """in_proj's output as float32 split-K partials (S, B, G, W): the step equals the step on their sum
    rounded to the compute dtype (what a GEMM writes), in one launch and in two."""
    b, groups, h, p, s, taps = 3, 2, 4, 16, 32, 3
    f = h // groups * p + 2 * s
    w = h // groups * (2 * p + 1) + 2 * s
    ks = jax.random.split(jax.random.key(11), 7)
    parts = jax.random.normal(ks[0], (3, b, groups, w), jnp.float32)
    ring = kd.conv_ring(jax.random.normal(ks[1], (b, taps, groups, f), jnp.bfloat16), 5)
    cw = (jax.random.normal(ks[2], (taps + 1, groups, f), jnp.float32) / 2).astype(jnp.bfloat16)
    cb = jax.random.normal(ks[3], (groups, f), jnp.float32) / 4
    ssm = jax.random.normal(ks[4], (b, h, p, s), jnp.bfloat16)
    vec = jax.random.normal(ks[5], (3, h), jnp.float32)
    u = jax.random.normal(ks[6], (b, 48), jnp.float32)
    kw = dict(heads=h, dt_limit=(0.0, float("inf")), norm_eps=1e-5, split=split, g_dtype=jnp.bfloat16)
    args = (ring, cw, cb, ssm, jnp.abs(vec[0]), vec[1], vec[2], 5, u)
    got = kd.ssm_step(parts, *args, zx_dtype=jnp.bfloat16, **kw)
    want = kd.ssm_step((parts[0] + parts[1] + parts[2]).astype(jnp.bfloat16), *args, **kw)
    for g_, w_ in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g_, np.float32), np.asarray(w_, np.float32))
    with pytest.raises(ValueError, match="zx_dtype"):
        kd.ssm_step(parts, *args, **kw)


def test_proj_splits_defaults_and_override(monkeypatch):
    monkeypatch.delenv("MAMBA_JAX_DECODE_SPLITS", raising=False)
    assert kd.proj_splits(1) == (1, 1)
    assert kd.proj_splits(kd.SPLIT_K_MIN_BATCH) == (kd.IN_SPLITS, kd.OUT_SPLITS)
    monkeypatch.setenv("MAMBA_JAX_DECODE_SPLITS", "2,0")
    assert kd.proj_splits(1) == (2, 1)
    monkeypatch.setenv("MAMBA_JAX_DECODE_SPLITS", "4")
    with pytest.raises(ValueError, match="two integers"):
        kd.proj_splits(1)


def test_split_k_partials_sum_to_the_product():
    ks = jax.random.split(jax.random.key(12), 2)
    x = jax.random.normal(ks[0], (3, 96), jnp.float32)
    w = jax.random.normal(ks[1], (96, 2, 5), jnp.float32)
    parts = kd.split_k_partials(x, w, 4)
    assert parts.shape == (4, 3, 2, 5) and parts.dtype == jnp.float32
    want = jnp.tensordot(x, w, axes=1, precision="highest")
    np.testing.assert_allclose(np.asarray(parts.sum(0)), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not divide"):
        kd.split_k_partials(x, w, 5)


@pytest.mark.parametrize("groups,state_dtype,hp,window,pos0", [
    (1, jnp.float32, 1, 4, 6),  # starts mid-window: slots before it are zero and add nothing
    (2, jnp.float32, 2, 4, 8),  # two heads per program, two groups, starts on a window boundary
    (2, jnp.bfloat16, 1, 8, 5),  # bf16 state: rounded every W tokens instead of every token
])  # fmt: skip
def test_windowed_state_write_back_equals_the_per_token_step(groups, state_dtype, hp, window, pos0):
    """The split step with the state written back once per window: its outputs over 2½ windows equal those of
    the step that writes the state every token, the state it writes at each window's end is that state, and
    `window_state` recovers the current state in between."""
    b, h, p, s, taps, steps = 3, 4, 32, 32, 3, 2 * window + window // 2 + 1
    r = h // groups
    f, w = r * p + 2 * s, 2 * r * p + 2 * s + r
    ks = iter(jax.random.split(jax.random.key(pos0), 8 + steps))
    ring = kd.conv_ring(jax.random.normal(next(ks), (b, taps, groups, f), jnp.float32), pos0)
    cw = jax.random.normal(next(ks), (taps + 1, groups, f), jnp.float32) / 2
    cb = jax.random.normal(next(ks), (groups, f), jnp.float32) / 4
    ssm = jax.random.normal(next(ks), (b, h, p, s), jnp.float32).astype(state_dtype)
    a_log = jnp.log(jax.random.uniform(next(ks), (h,), jnp.float32, 1, 16))
    dvec, dtb = jax.random.normal(next(ks), (2, h), jnp.float32)
    u = jax.random.normal(next(ks), (b, 48), jnp.float32) * 2
    kw = dict(heads=h, dt_limit=(0.0, float("inf")), norm_eps=1e-5, split=True, heads_per_program=hp)
    plain = (ring, ssm.astype(jnp.float32))
    win = (ring, ssm, kd.state_window(b, h, p, groups, s, window, jnp.float32))
    tol = 1e-5 if state_dtype == jnp.float32 else 2e-2
    for t in range(steps):
        pos = pos0 + t
        zx = jax.random.normal(next(ks), (b, groups, w), jnp.float32)
        g_ref, ss_ref, *plain = kd.ssm_step(zx, plain[0], cw, cb, plain[1], a_log, dvec, dtb, pos, u, **kw)
        g, ss, conv, state, buffers = kd.ssm_step(zx, win[0], cw, cb, win[1], a_log, dvec, dtb, pos, u, window=win[2],
                                                 **kw)  # fmt: skip
        win = (conv, state, buffers)
        assert rel_err(g, g_ref) <= tol, t
        assert rel_err(ss.sum(-1), ss_ref.sum(-1)) <= 2 * tol, t
        np.testing.assert_array_equal(conv, plain[0])
        assert rel_err(kd.window_state(state, buffers, pos + 1, a_log), plain[1]) <= tol, t
        if (pos + 1) % window == 0:  # written back: the state itself
            assert state.dtype == state_dtype
            assert rel_err(state.astype(jnp.float32), plain[1]) <= tol, t
        else:
            assert not np.allclose(np.asarray(state, np.float32), np.asarray(plain[1])), t  # not written back


@pytest.mark.gpu
@pytest.mark.parametrize("groups,window,pos0,state_dtype,rows,s,pdl", [
    (1, 8, 13, jnp.bfloat16, 32, 128, "1"),  # starts mid-window (slot 5); the stream under PDL (the default)
    (2, 5, 10, jnp.float32, 64, 128, "1"),  # two groups, W 5 from a boundary; 64 rows per CTA
    (1, 16, 3, jnp.bfloat16, 64, 128, "1"),
    (2, 8, 7, jnp.bfloat16, 32, 128, "1"),
    (1, 16, 3, jnp.bfloat16, 32, 128, "0"),  # no programmatic dependent launch
    (1, 8, 13, jnp.bfloat16, 32, 256, "1"),  # Nemotron-H 56B's state size
    (2, 8, 7, jnp.bfloat16, 32, 128, "0"),
    (1, 8, 13, jnp.bfloat16, 32, 128, "2"),  # both launches under it, the prep kernel triggering
])  # fmt: skip
def test_cuda_window_update_equals_pallas_on_gpu(monkeypatch, groups, window, pos0, state_dtype, rows, s, pdl):
    """The CUDA window step (kernels/ssm_update.cu, the default on a GPU behind the Pallas prep kernel: the
    coefficients, then the state stream with 32 or 64 rows per CTA, under programmatic dependent launch or
    not) against the Pallas kernels it replaces, compiled, bf16 at Mamba2 widths (head dim 64, state 128 or
    256) over 2½ windows: g, Σ g², the conv ring, the state written back, the window buffers; and
    `window_state` of both against the per-token step."""
    from mamba_jax.kernels.ssm_update import unsupported

    monkeypatch.setenv("MAMBA_JAX_DECODE_WINDOW_ROWS", str(rows))
    monkeypatch.setenv("MAMBA_JAX_DECODE_WINDOW_PDL", pdl)
    assert unsupported(state_dtype=state_dtype, act_dtype=jnp.bfloat16, g_dtype=jnp.bfloat16,
                       param_dtypes=(jnp.float32,) * 3, window=window, head_dim=64, state_size=s,
                       block_p=32) is None  # fmt: skip
    b, h, p, taps, steps = 5, 16, 64, 3, 2 * window + window // 2 + 1
    r = h // groups
    f, w = r * p + 2 * s, 2 * r * p + 2 * s + r
    ks = iter(jax.random.split(jax.random.key(pos0), 8 + steps))
    bf = jnp.bfloat16
    ring = kd.conv_ring(jax.random.normal(next(ks), (b, taps, groups, f), jnp.float32).astype(bf), pos0)
    cw = (jax.random.normal(next(ks), (taps + 1, groups, f), jnp.float32) / 2).astype(bf)
    cb = (jax.random.normal(next(ks), (groups, f), jnp.float32) / 4).astype(bf)
    ssm = jax.random.normal(next(ks), (b, h, p, s), jnp.float32).astype(state_dtype)
    a_log = jnp.log(jax.random.uniform(next(ks), (h,), jnp.float32, 1, 16))
    dvec, dtb = jax.random.normal(next(ks), (2, h), jnp.float32)
    u = jax.random.normal(next(ks), (b, 1024), jnp.float32) * 2
    kw = dict(heads=h, dt_limit=(0.0, float("inf")), norm_eps=1e-5, split=True, block_p=32, g_dtype=bf)
    zxs = [jax.random.normal(next(ks), (b, groups, w), jnp.float32).astype(bf) for _ in range(steps)]
    runs = {}
    for impl in ("pallas", "cuda"):
        monkeypatch.setenv("MAMBA_JAX_DECODE_WINDOW_KERNEL", impl)
        jax.clear_caches()  # the kernel is chosen at trace time
        st = (ring, ssm, kd.state_window(b, h, p, groups, s, window, bf))
        outs = []
        for t in range(steps):
            g, ss, conv, state, buffers = kd.ssm_step(zxs[t], st[0], cw, cb, st[1], a_log, dvec, dtb, pos0 + t, u,
                                                     window=st[2], **kw)  # fmt: skip
            st = (conv, state, buffers)
            current = kd.window_state(state, buffers, pos0 + t + 1, a_log)
            outs.append([np.asarray(v, np.float32) for v in (g, ss, conv, state, *buffers, current)])
        runs[impl] = outs
    plain = (ring, ssm.astype(jnp.float32))
    for t in range(steps):
        *_, conv, state = kd.ssm_step(zxs[t], plain[0], cw, cb, plain[1], a_log, dvec, dtb, pos0 + t, u, **kw)
        plain = (conv, state)
        got, want = runs["cuda"][t], runs["pallas"][t]
        names = ("g", "ss", "conv", "state", "win_x", "win_B", "win_dt", "current")
        for name, a, b_ in zip(names, got, want, strict=True):
            # The same roundings; float32 summation order differs (a bf16 ulp where a value sits on a tie).
            assert rel_err(a, b_) <= (2e-3 if name in ("conv", "win_x", "win_B", "win_dt") else 4e-3), (t, name)
        assert rel_err(got[-1], plain[1]) <= 2e-2, t  # bf16 rounding every token on the plain path


def test_window_defaults_and_knobs(monkeypatch):
    """Where the window is on by default (batch ≥ WINDOW_MIN_BATCH, split step, the CUDA update available:
    never off the GPU, so the CPU decodes without it unless asked), and the knobs' parsing."""
    from mamba_jax.kernels import ssm_update

    monkeypatch.delenv("MAMBA_JAX_DECODE_WINDOW", raising=False)
    assert not ssm_update.available(jnp.bfloat16)  # the CPU
    assert "not a GPU" in ssm_update.unsupported(state_dtype=jnp.bfloat16, act_dtype=jnp.bfloat16,
                                                 g_dtype=jnp.bfloat16, param_dtypes=(jnp.float32,) * 3, window=8,
                                                 head_dim=64, state_size=128, block_p=32)  # fmt: skip
    assert kd.window_size(True, kd.WINDOW_MIN_BATCH) == 0
    monkeypatch.setattr(ssm_update, "available", lambda dtype: jnp.dtype(dtype) == jnp.bfloat16)
    assert kd.window_size(True, kd.WINDOW_MIN_BATCH) == kd.STATE_WINDOW > 1
    assert kd.window_size(True, kd.WINDOW_MIN_BATCH, jnp.float32) == 0  # the Pallas update: slower, off
    assert kd.window_size(True, kd.WINDOW_MIN_BATCH - 1) == 0 and kd.window_size(False, 64) == 0
    assert kd.window_size(True, 64, jnp.bfloat16, 32, 128) == 0  # shapes the CUDA update does not take
    assert kd.window_size(True, 64, jnp.bfloat16, 64, 256) == kd.STATE_WINDOW
    monkeypatch.delenv("MAMBA_JAX_DECODE_WINDOW_PDL", raising=False)
    assert kd._window_pdl() == kd.WINDOW_PDL == 1
    monkeypatch.setenv("MAMBA_JAX_DECODE_WINDOW_PDL", "yes")
    with pytest.raises(ValueError, match="give 0"):
        kd._window_pdl()
    monkeypatch.setenv("MAMBA_JAX_DECODE_WINDOW_PDL", "2")
    assert kd._window_pdl() == 2
    monkeypatch.setenv("MAMBA_JAX_DECODE_WINDOW", "4")  # asked for: at any batch of the split step
    assert kd.window_size(True, 8, jnp.float32) == 4 and kd.window_size(False, 64) == 0
    # the CUDA update's shape rules (as if on a GPU with the kernel built)
    monkeypatch.setattr(ssm_update, "_not_here", lambda dtype: None)
    monkeypatch.setattr(ssm_update, "_load", lambda: None)
    kw = dict(state_dtype=jnp.bfloat16, act_dtype=jnp.bfloat16, g_dtype=jnp.bfloat16, param_dtypes=(jnp.float32,) * 3)
    assert ssm_update.unsupported(**kw, window=8, head_dim=64, state_size=128, block_p=32) is None
    assert "head dim 32" in ssm_update.unsupported(**kw, window=8, head_dim=32, state_size=128, block_p=32)
    assert "W ≤ 16" in ssm_update.unsupported(**kw, window=17, head_dim=64, state_size=128, block_p=32)
    monkeypatch.setenv("MAMBA_JAX_DECODE_WINDOW_ROWS", "64")
    assert ssm_update.unsupported(**kw, window=8, head_dim=64, state_size=128, block_p=32) is None
    assert "rows per CTA" in ssm_update.unsupported(**kw, window=8, head_dim=64, state_size=256, block_p=32)


def test_windowed_step_rejects_mismatched_buffers():
    ring = jnp.zeros((1, 4, 1, 48))
    args = (jnp.zeros((1, 1, 81)), ring, jnp.zeros((4, 1, 48)), jnp.zeros((1, 48)), jnp.zeros((1, 1, 16, 16)),
            jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), 0)  # fmt: skip
    buffers = kd.state_window(1, 1, 16, 1, 16, 4, jnp.float32)
    with pytest.raises(ValueError, match="split=True"):
        kd.ssm_step(*args, heads=1, dt_limit=(0.0, float("inf")), window=buffers)
    with pytest.raises(ValueError, match="state_window"):
        kd.ssm_step(*args, heads=1, dt_limit=(0.0, float("inf")), split=True, window=buffers[:2] + (buffers[0],))


def _kernel_model(pattern, **changes):
    # head_dim 16: the step kernel needs powers of two ≥ 16 (the shared helpers' 8 falls back to XLA).
    return small_hybrid(pattern=pattern, mamba_head_dim=16, **changes)


def _random_norm_weights(model, seed):
    """Norm weights away from their init of ones, so that folding them into the projections is tested."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Block):
            for var in (module.norm.weight, getattr(module.mixer, "norm", None)):
                if isinstance(var, nnx.Variable):
                    var[...] = 1 + 0.3 * jax.random.normal(next(keys), var[...].shape, var[...].dtype)
    return model


@pytest.mark.parametrize("pattern,batch,fold,groups,step,splits", [
    ("MMM", 3, False, 4, None, None), ("M*-M", 3, False, 4, None, None), ("MM", 6, False, 4, None, None),
    # folded norms: one gated-norm group, per-group norms
    ("MMM", 3, True, 1, None, None), ("M*-M", 2, True, 2, None, None),
    # the step in two launches (large batch), also chosen by batch (8: SPLIT_MIN_BATCH) for a head dim of 16
    ("MMM", 3, True, 1, "1,0,4,1", None), ("M*-M", 3, False, 4, "1,0,4,1", None), ("MM", 8, True, 1, None, None),
    # in_proj / out_proj as split-K partials that the kernels sum
    ("MMM", 3, True, 1, "1,0,4,1", "2,4"), ("M*-M", 2, True, 2, None, "4,2"),
])  # fmt: skip
def test_kernel_decoding_equals_full_forward(monkeypatch, pattern, batch, fold, groups, step, splits):
    if step:
        monkeypatch.setenv("MAMBA_JAX_DECODE_STEP", step)
    if splits:
        monkeypatch.setenv("MAMBA_JAX_DECODE_SPLITS", splits)
    cfg = _kernel_model(pattern, decode_impl="pallas", residual_in_fp32=True, mamba_num_groups=groups,
                        mamba_norm_per_group=groups > 1)  # fmt: skip
    reference = _random_norm_weights(init_model(cfg, seed=5), seed=batch)
    model = fold_norm_weights(nnx.clone(reference)) if fold else reference
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(1, 250, n).tolist() for n in rng.integers(2, 20, batch)]
    cont = [rng.integers(1, 250, 4).tolist() for _ in range(batch)]
    ids, start = pad_prompts(prompts, multiple=8)
    l = ids.shape[1]
    seq_idx = (np.arange(l)[None] >= start[:, None]).astype(np.int32)
    logits, cache = jax.jit(lambda i, s: model.prefill(i, seq_idx=s, cache_len=l + 4))(ids, seq_idx)
    decode = jax.jit(lambda t, c, pos: model.decode(t, c, pos=pos, start=jnp.asarray(start)))
    assert "pallas_call" in str(jax.make_jaxpr(decode)(jnp.zeros(batch, jnp.int32), cache, l))
    steps = [logits]
    for t in range(3):
        logits, cache = decode(jnp.array([c[t] for c in cont]), cache, l + t)
        steps.append(logits)
    inc = np.stack(steps, axis=1)
    fulls = full_forward_rows(reference, [p + c[:3] for p, c in zip(prompts, cont, strict=True)])
    for b, (p, full) in enumerate(zip(prompts, fulls, strict=True)):
        assert rel_err(inc[b], full[len(p) - 1 :]) <= 1e-4, b


@pytest.mark.parametrize("gemm,step", [("1,1", None), ("2,2", "1,0,4,1"), ("0,2", None)])
def test_kernel_decoding_with_the_cuda_gemm_equals_full_forward(monkeypatch, gemm, step):
    """in_proj / out_proj through `kernels.skinny_gemm` (K slices: float32 partials that the step and residual
    kernels sum); off the GPU its XLA fallback computes them, which checks how the decode path wires them."""
    from mamba_jax.kernels import skinny_gemm

    monkeypatch.setattr(skinny_gemm, "OFF_GPU", True)
    monkeypatch.setenv("MAMBA_JAX_DECODE_GEMM", gemm)
    calls = []
    real = skinny_gemm.skinny_gemm
    monkeypatch.setattr(skinny_gemm, "skinny_gemm", lambda *a, **k: calls.append(k["splits"]) or real(*a, **k))
    test_kernel_decoding_equals_full_forward(monkeypatch, "MMM", 3, True, 1, step, None)
    assert calls and set(calls) == {int(s) for s in gemm.split(",") if s != "0"}


@pytest.mark.parametrize("tiles", ["64,64,2,2", "64,128,1,4"])
def test_kernel_decoding_with_the_mosaic_out_proj_equals_full_forward(monkeypatch, tiles):
    """out_proj as the Mosaic GPU GEMV (interpret mode here; PDL on the GPU), its split-K partials summed by
    the residual kernel; the step kernel writes g padded to 8 rows for it."""
    monkeypatch.setenv("MAMBA_JAX_DECODE_GEMV", "mosaic")
    monkeypatch.setenv("MAMBA_JAX_DECODE_GEMV_TILES", tiles)
    cfg = _kernel_model("MM", decode_impl="pallas", residual_in_fp32=True, mamba_num_groups=1)
    reference = _random_norm_weights(init_model(cfg, seed=6), seed=2)
    model = fold_norm_weights(nnx.clone(reference))
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, 250, n).tolist() for n in (5, 11)]
    cont = [rng.integers(1, 250, 3).tolist() for _ in prompts]
    _, cache, l, start = _prefill(model, prompts, 3)
    decode = jax.jit(lambda t, c, pos: model.decode(t, c, pos=pos, start=jnp.asarray(start)))
    assert "InterpretGPUParams" in str(jax.make_jaxpr(decode)(jnp.zeros(2, jnp.int32), cache, l))  # the GEMV ran
    inc = _teacher_forced_logits(model, prompts, cont, 3)
    fulls = full_forward_rows(reference, [p + c for p, c in zip(prompts, cont, strict=True)])
    for b, (p, full) in enumerate(zip(prompts, fulls, strict=True)):
        assert rel_err(inc[b], full[len(p) :]) <= 1e-4, b


def test_windowed_decoding_equals_full_forward(monkeypatch):
    """Batch 8 takes the split step and with it the state write-back window (here 5 tokens: the prompts pad
    to 24, so decoding starts in a window's last slot, then crosses a full window): teacher-forced logits
    equal the full forward's, and the Engine's greedy tokens equal those of XLA's decode path."""
    monkeypatch.setenv("MAMBA_JAX_DECODE_WINDOW", "5")
    reference = _random_norm_weights(init_model(_kernel_model("M*-M", mamba_num_groups=1), seed=3), seed=4)
    model = _with_decode_impl(fold_norm_weights(nnx.clone(reference)), "pallas")
    rng = np.random.default_rng(8)
    prompts = [rng.integers(1, 250, n).tolist() for n in rng.integers(2, 20, 8)]
    cont = [rng.integers(1, 250, 9).tolist() for _ in prompts]
    _, cache, l, _ = _prefill(model, prompts, 9)
    assert l % 5 == 4 and cache[0][0]["win_x"].shape[1] == 5  # decoding starts in a window's last slot
    inc = _teacher_forced_logits(model, prompts, cont, 9)
    fulls = full_forward_rows(reference, [p + c for p, c in zip(prompts, cont, strict=True)])
    for b, (p, full) in enumerate(zip(prompts, fulls, strict=True)):
        assert rel_err(inc[b], full[len(p) :]) <= 1e-4, b
    params = SamplingParams(max_new_tokens=9, temperature=0.0)
    fused = Engine(reference, decode_impl="pallas").generate(prompts, params)
    xla = Engine(reference, decode_impl="xla").generate(prompts, params)
    assert fused.tokens == xla.tokens
    np.testing.assert_allclose(fused.logprobs, xla.logprobs, rtol=1e-4, atol=1e-5)


def test_engine_with_kernels_generates_as_without():
    model = _random_norm_weights(init_model(_kernel_model("M*-M", mamba_num_groups=1), seed=2), seed=1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 250, n).tolist() for n in (4, 13)]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    xla = Engine(model, decode_impl="xla").generate(prompts, params)
    engine = Engine(model, decode_impl="pallas")  # folds the norm weights into the projections
    folded = nnx.merge(engine.graphdef, engine.state)
    assert all(
        b.norm_folded and b.mixer.norm_folded
        for _, b in nnx.iter_graph(folded)
        if isinstance(b, Block) and b.symbol == "M"
    )
    fused = engine.generate(prompts, params)
    assert fused.tokens == xla.tokens
    np.testing.assert_allclose(fused.logprobs, xla.logprobs, rtol=1e-4, atol=1e-5)


def test_unsupported_shapes_fall_back_to_xla():
    model = init_model(small_hybrid(pattern="MM", decode_impl="pallas"), seed=0)  # head_dim 8
    assert kd.ssm_step_unsupported(model.cfg.mamba_head_dim, model.cfg.mamba_d_state)
    out = Engine(model).generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, temperature=0.0))
    ref = Engine(model, decode_impl="xla").generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, temperature=0.0))
    assert out.tokens == ref.tokens


def test_decode_falls_back_to_xla_when_the_kernels_do_not_import(monkeypatch, caplog):
    """jax has announced the removal of Pallas's Triton backend (the decode kernels' imports would then fail):
    decoding must then take the XLA path, not crash."""
    model = init_model(_kernel_model("MM", decode_impl="pallas"), seed=0)
    monkeypatch.setitem(sys.modules, "mamba_jax.kernels.decode", None)  # the next import raises ImportError
    mixer = next(b.mixer for _, b in nnx.iter_graph(model) if isinstance(b, Block))
    assert "do not import" in mixer._decode_kernel_unsupported()
    params = SamplingParams(max_new_tokens=3, temperature=0.0)
    out = Engine(model).generate([[1, 2, 3]], params)
    # decode_impl "auto" on a GPU (the backend faked for this decision only) falls back with a note too
    mixer.cfg = dataclasses.replace(mixer.cfg, decode_impl="auto")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    note_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        assert not mixer._decode_kernel()
    assert "decode_impl='auto'" in caplog.text and "do not import" in caplog.text
    monkeypatch.undo()
    assert out.tokens == Engine(model, decode_impl="xla").generate([[1, 2, 3]], params).tokens


def _prefill(model, prompts, steps):
    ids, start = pad_prompts(prompts, multiple=8)
    l = ids.shape[1]
    seq_idx = (np.arange(l)[None] >= start[:, None]).astype(np.int32)
    logits, cache = jax.jit(lambda i, s: model.prefill(i, seq_idx=s, cache_len=l + steps))(ids, seq_idx)
    return logits, cache, l, start


def _teacher_forced_logits(model, prompts, cont, steps):
    _, cache, l, start = _prefill(model, prompts, steps)
    decode = jax.jit(lambda t, c, pos: model.decode(t, c, pos=pos, start=jnp.asarray(start)))
    out = []
    for t in range(steps):
        logits, cache = decode(jnp.array([c[t] for c in cont]), cache, l + t)
        out.append(logits)
    return np.stack(out, axis=1)


@pytest.mark.gpu
@pytest.mark.parametrize("groups,batch,gemv,window,fp8", [
    (1, 1, "xla", 0, False), (8, 3, "xla", 0, False), (1, 1, "mosaic", 0, False), (1, 3, "mosaic", 0, False),
    (1, 8, "xla", 0, False), (1, 8, "mosaic", 0, False),  # batch ≥ SPLIT_MIN_BATCH: the step in two launches
    (1, 16, "xla", 0, False),  # batch ≥ SPLIT_K_MIN_BATCH: out_proj as split-K partials summed by the residual kernel
    (1, 8, "xla", 8, False), (8, 16, "xla", 8, False),  # the state written back once per 8 tokens
    (1, 1, "xla", 0, True), (1, 16, "xla", 0, True),  # float8 projection weights (inference.quantize)
])  # fmt: skip
def test_kernels_at_real_widths_on_gpu(monkeypatch, groups, batch, gemv, window, fp8):
    """bf16 at Mamba2 widths (head dim 64, state 128), compiled: the fused path (norms folded, as the Engine
    runs it) is as close to the float32 model as XLA's bf16 decode path is (with out_proj as XLA's GEMV,
    the opt-in Mosaic PDL GEMV, or split-K partials; with the state write-back window; with float8
    projection weights on both paths)."""
    monkeypatch.setenv("MAMBA_JAX_DECODE_GEMV", gemv)
    monkeypatch.setenv("MAMBA_JAX_DECODE_WINDOW", str(window))
    from flax import nnx

    from mamba_jax.inference.engine import _cast_state, _with_decode_impl

    cfg = small_hybrid(pattern="MMMM", d_model=1024, mamba_head_dim=64, mamba_d_state=128, mamba_num_groups=groups,
                       residual_in_fp32=True, vocab_size=1000, decode_impl="xla")  # fmt: skip
    f32 = init_model(cfg, seed=1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 1000, n).tolist() for n in rng.integers(10, 60, batch)]
    # 12 steps: with the window decoding crosses a state write-back (the prompts pad to multiples of 8)
    cont = [rng.integers(1, 1000, 12).tolist() for _ in range(batch)]
    want = _teacher_forced_logits(f32, prompts, cont, 12)
    bf16 = nnx.merge(*_cast_state(nnx.split(f32), "bfloat16"))
    err = {}
    for impl in ("pallas", "xla"):
        model = _with_decode_impl(nnx.clone(bf16), impl)
        if impl == "pallas":  # as the Engine does: the out_proj variants (Mosaic GEMV, split-K) need folded norms
            model = fold_norm_weights(model)
        if fp8:
            quantize_weights(model)
        if impl == "pallas":
            cache = _prefill(model, prompts, 12)[1]
            names = {getattr(path[-1], "key", None) for path, _ in jax.tree_util.tree_flatten_with_path(cache)[0]}
            assert ("win_x" in names) == bool(window)
        err[impl] = rel_err(_teacher_forced_logits(model, prompts, cont, 12), want)
    assert err["pallas"] <= 1.5 * err["xla"] + 1e-3, err


@pytest.mark.gpu
@pytest.mark.parametrize("batch,gemm", [(1, "1,1"), (3, "1,2"), (32, "2,2")])
def test_cuda_gemm_at_real_widths_on_gpu(monkeypatch, batch, gemm):
    """The same comparison with in_proj / out_proj through the CUDA skinny GEMM (kernels/skinny_gemm.py)."""
    from mamba_jax.kernels.skinny_gemm import unsupported

    assert unsupported(batch, 1024, 4384, int(gemm[0])) is None  # the kernel builds and runs here
    monkeypatch.setenv("MAMBA_JAX_DECODE_GEMM", gemm)
    test_kernels_at_real_widths_on_gpu(monkeypatch, 1, batch, "xla", 0, False)
