"""A normed GEMV for decode (Pallas, Triton backend): (rmsnorm(x) · w_norm) @ W [+ residual] in one kernel.

The first attempt at fusing a Mamba2 block's small decode kernels: the input norm in front of a GEMV, the
residual add behind it, one program per column block streaming its weight once. Measured slower than XLA's
own GEMV (the 2.7B in_proj 31.6 µs against 21.3, out_proj 50 µs against 11: benchmarks/decode_kernels.py;
split-K and transposed-weight variants, timed in a compiled loop, came within 0–10 % of XLA's GEMV but not
ahead of it: benchmarks/gemv_probe.py), so no decode path uses it: the decode kernels (`kernels/decode.py`)
fold the norms' weights into the projections instead and leave the GEMVs to XLA. It stays, tested, as a
baseline for the benchmarks. Off the GPU it runs in Pallas interpret mode.

Dimension key: B batch, K reduction (in features), N out features, M the BM rows of a tensor-core tile.
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
