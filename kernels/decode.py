"""Fused one-token decode kernels of the Mamba2 layer (Pallas, Triton backend).

A decode step of Mamba2-2.7B at batch 1 is two weight streams per layer (in_proj 54 MB, out_proj 26 MB) and
a few kilobytes of everything else; XLA runs that everything else as ≈ 11 small kernels per layer (input
norm, conv, dt, state update, y, gated norm, residual), ≈ 16 µs per layer, a third of the step
(benchmarks/results/decode_profile_mamba2_2_7b_b1_h100.json).

  `ssm_step`   conv window + SiLU + dt (bias, softplus, limit) + state update + y + D skip + SiLU(z) gate,
               one program per (row, head): the state is read and written once, in place. This is what
               `Mamba2Mixer.decode` runs between XLA's in_proj and out_proj (4 µs per 2.7B layer
               at batch 1 on an H100).
  `norm_gemv`  (rmsnorm(x) · w_norm) @ W [+ residual]: a norm fused in front of a GEMV, the residual add
               behind it. Measured slower than XLA's own GEMV (the 2.7B in_proj 31.6 µs against 21.3,
               out_proj 50 µs against 11: benchmarks/decode_kernels.py), so no decode path uses it; it
               stays, tested, as the baseline for a faster one (split-K for the narrow out_proj).

Rounding follows the XLA decode path (`Mamba2Mixer.decode`): the normed input, conv output, x / B / C, y and
the gated-norm output are rounded to the compute dtype where that path rounds them, so both paths agree to
float32 summation order. Off the GPU the kernels run in Pallas interpret mode (tests, CI).

Dimension key: B batch, K reduction (in features), N out features, G groups, H heads, R heads per group,
P head dim, S state size, F conv channels per group, W in_proj columns per group, C conv taps − 1.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.triton as plt
import jax.numpy as jnp

BM = 16  # rows of the GEMV's tensor-core tile (tl.dot needs 16); the batch is masked into it
MAX_GEMV_ROWS = BM  # larger batches use XLA's GEMM (there the weights no longer dominate a step)


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --- the normed GEMV --------------------------------------------------------------------------------------
def _gemv_kernel(*refs, rows, k, groups, bk, bn, eps, has_res, round_dtype):
    x_ref, nw_ref, w_ref = refs[:3]
    res_ref = refs[3] if has_res else None
    o_ref = refs[-1]
    n_total = w_ref.shape[1]
    n0 = pl.program_id(0) * bn
    cmask = n0 + jnp.arange(bn) < n_total
    rmask = jnp.arange(BM) < rows  # the rows are padded to one tensor-core tile; masked lanes read nothing
    gsize = k // groups
    gp = max(pl.next_power_of_2(groups), 1)
    gid = jnp.arange(gp)
    nk = k // bk
    f32 = jnp.float32

    def x_tile(k0):
        return plt.load(x_ref.at[pl.ds(0, BM), pl.ds(k0, bk)], mask=rmask[:, None], other=0.0).astype(f32)

    # Pass 1: the mean square of each norm group of each row (the rows are a few KB, read from L2).
    def sumsq(i, ss):
        xk = x_tile(pl.multiple_of(i * bk, bk))
        return ss + jnp.where(gid[None, :] == (i * bk) // gsize, jnp.sum(xk * xk, axis=1)[:, None], 0.0)

    inv_MG = jax.lax.rsqrt(jax.lax.fori_loop(0, nk, sumsq, jnp.zeros((BM, gp), f32)) / gsize + eps)

    # Pass 2: stream the weight column block once (Triton pipelines the loads that feed the dot).
    def step(i, acc):
        k0 = pl.multiple_of(i * bk, bk)
        inv = jnp.sum(jnp.where(gid[None, :] == k0 // gsize, inv_MG, 0.0), axis=1)
        u = (x_tile(k0) * inv[:, None] * nw_ref[pl.ds(k0, bk)].astype(f32)[None, :]).astype(round_dtype)
        w = plt.load(w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)], mask=cmask[None, :], other=0.0)
        precision = jax.lax.Precision.HIGHEST if round_dtype == jnp.float32 else None
        return acc + jnp.dot(u, w.astype(round_dtype), preferred_element_type=f32, precision=precision)

    y = jax.lax.fori_loop(0, nk, step, jnp.zeros((BM, bn), f32)).astype(round_dtype).astype(f32)
    mask = rmask[:, None] & cmask[None, :]
    if has_res:
        y = y + plt.load(res_ref.at[pl.ds(0, BM), pl.ds(n0, bn)], mask=mask, other=0.0).astype(f32)
    plt.store(o_ref.at[pl.ds(0, BM), pl.ds(n0, bn)], y.astype(o_ref.dtype), mask=mask)


def _pick_bk(k: int, groups: int, bk: int = 128) -> int:
    """The largest power of two ≤ bk (≥ 16) dividing a norm group: a K step never straddles two groups."""
    gsize = k // groups
    while bk > 16 and gsize % bk:
        bk //= 2
    return bk


def norm_gemv_unsupported(x_shape, w_shape, groups: int) -> str | None:
    rows, k = x_shape
    if rows > MAX_GEMV_ROWS:
        return f"batch {rows} (the fused GEMV takes at most {MAX_GEMV_ROWS} rows)"
    if k % groups or (k // groups) % _pick_bk(k, groups):
        return f"{k} features in {groups} norm groups (each group must be a multiple of 16)"
    if w_shape[0] != k:
        return f"weight of {w_shape[0]} rows for {k} features"
    return None


@functools.partial(jax.jit, static_argnames=("eps", "groups", "out_dtype", "bk", "bn", "warps", "stages"))
def norm_gemv(x_BK, norm_K, w_KN, residual_BN=None, *, eps, groups=1, out_dtype=None, bk=128, bn=64, warps=4, stages=3):
    """(rmsnorm over `groups` equal groups of x · norm).astype(W's dtype) @ W, in float32, then rounded to W's
    dtype; plus `residual` (in its dtype) when given. x (B ≤ MAX_GEMV_ROWS, K), W (K, N)."""
    rows, k = x_BK.shape
    n = w_KN.shape[1]
    reason = norm_gemv_unsupported(x_BK.shape, w_KN.shape, groups)
    if reason:
        raise ValueError(f"norm_gemv does not support {reason}.")
    bk = _pick_bk(k, groups, bk)
    round_dtype = jnp.dtype(w_KN.dtype)
    if residual_BN is not None:
        out_dtype = residual_BN.dtype
    out_dtype = jnp.dtype(out_dtype or round_dtype)
    kernel = functools.partial(
        _gemv_kernel, rows=rows, k=k, groups=groups, bk=bk, bn=bn, eps=eps,
        has_res=residual_BN is not None, round_dtype=round_dtype,
    )  # fmt: skip
    args = (x_BK, norm_K, w_KN) + (() if residual_BN is None else (residual_BN,))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, n), out_dtype),
        grid=(pl.cdiv(n, bn),),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=_interpret(),
        name=f"norm_gemv_{k}x{n}",
    )(*args)


# --- the SSM step -----------------------------------------------------------------------------------------
def _softplus(x):
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _silu(x):
    return x / (1.0 + jnp.exp(-x))


def _step_kernel(
    zx_ref, conv_ref, cw_ref, cb_ref, ssm_ref, alog_ref, d_ref, dtb_ref,
    g_ref, conv_out_ref, ssm_out_ref, *, r_heads, p, s, taps, dt_limit, cdtype,
):  # fmt: skip
    b = pl.program_id(0)
    h = pl.program_id(1)
    grp = h // r_heads
    r = h % r_heads
    rp = r_heads * p
    f32 = jnp.float32
    # in_proj columns of a group: [z (R·P) | x (R·P) | B (S) | C (S) | dt (R)]; conv channels: [x | B | C].
    col_x, col_b, col_c, col_dt = rp + r * p, 2 * rp, 2 * rp + s, 2 * rp + 2 * s + r
    ch_x, ch_b, ch_c = r * p, rp, rp + s

    def conv(col, ch, width):
        """Causal conv of `width` channels over the cached window and the new input, + bias, SiLU."""
        new = zx_ref[b, grp, pl.ds(col, width)]
        tap = lambda t: cw_ref[t, grp, pl.ds(ch, width)].astype(f32)  # noqa: E731
        acc = cb_ref[grp, pl.ds(ch, width)].astype(f32) + new.astype(f32) * tap(taps)
        window = [conv_ref[b, t, grp, pl.ds(ch, width)] for t in range(taps)]
        for t in range(taps):
            acc = acc + window[t].astype(f32) * tap(t)
        out = _silu(acc.astype(cdtype).astype(f32)).astype(cdtype).astype(f32)
        return out, window[1:] + [new]

    x, x_win = conv(col_x, ch_x, p)
    bv, b_win = conv(col_b, ch_b, s)
    cv, c_win = conv(col_c, ch_c, s)

    dt = jnp.sum(zx_ref[b, grp, pl.ds(col_dt, 1)].astype(f32)) + jnp.sum(dtb_ref[pl.ds(h, 1)].astype(f32))
    dt = _softplus(dt)
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = jnp.clip(dt, lo, hi)
    a = -jnp.exp(jnp.sum(alog_ref[pl.ds(h, 1)].astype(f32)))
    state = ssm_ref[b, h].astype(f32) * jnp.exp(dt * a) + (dt * x)[:, None] * bv[None, :]
    ssm_out_ref[b, h] = state.astype(ssm_out_ref.dtype)  # aliased with ssm_ref: updated in place
    y = jnp.sum(state * cv[None, :], axis=1) + x * jnp.sum(d_ref[pl.ds(h, 1)].astype(f32))
    z = zx_ref[b, grp, pl.ds(r * p, p)].astype(f32)
    g_ref[b, pl.ds(h * p, p)] = (y.astype(cdtype).astype(f32) * _silu(z)).astype(g_ref.dtype)

    for t in range(taps):
        conv_out_ref[b, t, grp, pl.ds(ch_x, p)] = x_win[t].astype(conv_out_ref.dtype)

    @pl.when(r == 0)  # B and C are shared by a group's heads: its first head writes their window
    def _():
        for t in range(taps):
            conv_out_ref[b, t, grp, pl.ds(ch_b, s)] = b_win[t].astype(conv_out_ref.dtype)
            conv_out_ref[b, t, grp, pl.ds(ch_c, s)] = c_win[t].astype(conv_out_ref.dtype)


def ssm_step_unsupported(p: int, s: int) -> str | None:
    if not (_pow2(p) and _pow2(s) and p >= 16 and s >= 16):
        return f"head dim {p} / state size {s} (the step kernel needs powers of two ≥ 16)"
    return None


@functools.partial(jax.jit, static_argnames=("heads", "dt_limit", "warps"))
def ssm_step(zx_BGW, conv_BCGF, conv_w_KGF, conv_b_GF, ssm_BHPS, A_log_H, D_H, dt_bias_H, *, heads, dt_limit, warps=4):
    """One decode step of a Mamba2 mixer after in_proj. zx: in_proj output (B, G, W) as [z | x | B | C | dt]
    per group; conv: the last C = K − 1 conv inputs (B, C, G, F); ssm: the state (B, H, P, S), updated in
    place (aliased: donate it under jit). Returns (y · SiLU(z) (B, H·P) float32, the gated norm's input; the
    new conv window; the new state)."""
    bsz, taps, g, _ = conv_BCGF.shape
    _, _, p, s = ssm_BHPS.shape
    reason = ssm_step_unsupported(p, s)
    if reason:
        raise ValueError(f"ssm_step does not support {reason}.")
    kernel = functools.partial(
        _step_kernel, r_heads=heads // g, p=p, s=s, taps=taps, dt_limit=tuple(dt_limit), cdtype=jnp.dtype(zx_BGW.dtype)
    )
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((bsz, heads * p), jnp.float32),
            jax.ShapeDtypeStruct(conv_BCGF.shape, conv_BCGF.dtype),
            jax.ShapeDtypeStruct(ssm_BHPS.shape, ssm_BHPS.dtype),
        ),
        grid=(bsz, heads),
        input_output_aliases={4: 2},
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1),
        interpret=_interpret(),
        name="ssm_step",
    )(zx_BGW, conv_BCGF, conv_w_KGF, conv_b_GF, ssm_BHPS, A_log_H, D_H, dt_bias_H)
