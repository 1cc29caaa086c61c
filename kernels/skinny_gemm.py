"""Skinny GEMM for decoding — y = x · w for at most 32 rows of x — as a CUDA kernel behind an XLA FFI call.

`skinny_gemm.cu` says how it works: a producer thread per SM streams that SM's share of the weight's columns
through a ring of TMA copies, eight warps multiply on tensor cores. It is built with nvcc on first use and
registered as the FFI target `mamba_jax_skinny_gemm` (kernels/cuda_build.py). Where it cannot run — not a
GPU, a GPU before Hopper (it needs cp.async.bulk), no nvcc, shapes it does not take — `skinny_gemm` computes
the same product with XLA (float32 sums, rounded to the output dtype), so callers need no second path;
`unsupported` says why it would not run, for callers that pick a different plan instead
(`Mamba2Mixer._decode_fused`).
"""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.kernels.cuda_build import load

TARGET = "mamba_jax_skinny_gemm"
# Tests set this to run the decode path's plan for the kernel off the GPU: `unsupported` then checks only the
# shapes, and `skinny_gemm` computes with XLA (as it does wherever the kernel cannot run).
OFF_GPU = False
MAX_ROWS = 32


def _load() -> str | None:
    """Build, load and register the kernel (kernels/cuda_build.py); None when it is available, else why not."""
    return load("skinny_gemm", "MambaJaxSkinnyGemm", TARGET)


def unsupported(rows: int, k: int, n: int, splits: int = 1, dtype=jnp.bfloat16) -> str | None:
    """Why `skinny_gemm` would fall back to XLA for this product, or None when the kernel runs it."""
    if not 1 <= rows <= MAX_ROWS:
        return f"{rows} rows (it takes 1 to {MAX_ROWS})"
    if n % 8 or k % splits or (k // splits) % 16:
        return f"K = {k} in {splits} splits, N = {n} (it needs N % 8 == 0 and (K / splits) % 16 == 0)"
    if OFF_GPU:
        return None
    if jnp.dtype(dtype) != jnp.bfloat16:
        return f"{jnp.dtype(dtype).name} operands (it reads bfloat16)"
    return _load()


def sm_count() -> int:
    return getattr(jax.devices()[0], "core_count", 0) or 132


def _blocks(n: int, splits: int, ctas: int) -> list[int]:
    """Column-unit bounds of the kernel's CTAs (as skinny_gemm.cu's SkinnyGemmImpl splits N)."""
    u = n // 8
    pn = min(u, max(max(1, ctas // splits), -(-u // 16)))
    return [p * u // pn for p in range(pn + 1)]


def pack(w_KN, *, splits: int = 1, ctas: int = 0):
    """w (K, N) packed for the kernel at this split and CTA count (default: one per SM), (N / 8, K, 8): each
    CTA's columns as a (K, its columns) row-major block, the blocks in CTA order, so that a CTA reads each
    ring slot as one contiguous copy (a strip of 16 · units bytes per weight row otherwise). Call
    `skinny_gemm` on it with the same `splits` and `ctas`."""
    k, n = w_KN.shape
    if n % 8:
        raise ValueError(f"pack: N = {n} is not a multiple of 8.")
    b = _blocks(n, splits, ctas or sm_count())
    blocks = [w_KN[:, 8 * lo : 8 * hi].reshape(-1) for lo, hi in itertools.pairwise(b)]
    return jnp.concatenate(blocks).reshape(n // 8, k, 8)


def unpack(w_packed, *, splits: int = 1, ctas: int = 0):
    """The (K, N) weight of `pack`'s output."""
    u, k, _ = w_packed.shape
    b, flat = _blocks(8 * u, splits, ctas or sm_count()), w_packed.reshape(-1)
    blocks = [flat[8 * k * lo : 8 * k * hi].reshape(k, 8 * (hi - lo)) for lo, hi in itertools.pairwise(b)]
    return jnp.concatenate(blocks, 1)


def skinny_gemm(x_MK, w_KN, *, splits: int = 1, out_dtype=None, ctas: int = 0, pdl: bool | None = None):
    """x (M, K) · w (K, N) with float32 sums: (M, N) in `out_dtype` (default x's dtype), or with splits > 1
    float32 partial products over `splits` equal K slices, (S, M, N), for a consumer to sum. w may also be
    `pack(w, splits=splits, ctas=ctas)`, (N / 8, K, 8). `ctas` > 0 sets
    the CTA count (default: one per SM). `pdl`: launched with programmatic dependent launch, the kernel starts
    streaming its weight while the kernel before it finishes (x is read only once that one is done); default
    on, MAMBA_JAX_SKINNY_PDL=0 turns it off at trace time. The CUDA kernel where `unsupported` allows, else
    XLA."""
    m, k = x_MK.shape
    packed = w_KN.ndim == 3
    n = w_KN.shape[0] * 8 if packed else w_KN.shape[1]
    if (w_KN.shape[1] if packed else w_KN.shape[0]) != k or (packed and w_KN.shape[2] != 8):
        raise ValueError(f"skinny_gemm: x is {x_MK.shape} but w is {w_KN.shape}; w must be (K, N) with K = {k}.")
    out_dtype = jnp.dtype(out_dtype or x_MK.dtype)
    if splits > 1:
        out_dtype = jnp.dtype(jnp.float32)
    if not OFF_GPU and unsupported(m, k, n, splits, x_MK.dtype) is None and w_KN.dtype == x_MK.dtype:
        shape = (splits, m, n) if splits > 1 else (m, n)
        call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, out_dtype))
        if pdl is None:
            pdl = os.environ.get("MAMBA_JAX_SKINNY_PDL", "1") != "0"
        return call(x_MK, w_KN, splits=np.int64(splits), ctas=np.int64(ctas), pdl=bool(pdl))
    if packed:  # XLA: back to (K, N)
        w_KN = unpack(w_KN, splits=splits, ctas=ctas)
    if splits > 1:
        if k % splits:
            raise ValueError(f"skinny_gemm: {splits} splits do not divide K = {k}.")
        x_SMK = x_MK.reshape(m, splits, k // splits).transpose(1, 0, 2)
        w_SKN = w_KN.reshape(splits, k // splits, n)
        return jnp.einsum("smk,skn->smn", x_SMK, w_SKN, preferred_element_type=jnp.float32)
    return jnp.dot(x_MK, w_KN, preferred_element_type=jnp.float32).astype(out_dtype)
