"""Skinny GEMM for decoding — y = x · w for at most 32 rows of x — as a CUDA kernel behind an XLA FFI call.

`skinny_gemm.cu` says how it works: a producer warp per SM streams that SM's share of the weight's columns
through a ring of bulk copies, eight warps multiply on tensor cores. It is built here with nvcc on first use
(for the GPU's architecture, against the FFI headers jax ships: `jax.ffi.include_dir()`), cached under
MAMBA_JAX_KERNEL_CACHE (default ~/.cache/mamba_jax/kernels, keyed by the source, nvcc and architecture) and
registered as the FFI target `mamba_jax_skinny_gemm`. Where it cannot run — not a GPU, a GPU before Hopper
(it needs cp.async.bulk), no nvcc, shapes it does not take — `skinny_gemm` computes the same product with XLA
(float32 sums, rounded to the output dtype), so callers need no second path; `unsupported` says why it
would not run, for callers that pick a different plan instead (`Mamba2Mixer._decode_fused`).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import itertools
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

TARGET = "mamba_jax_skinny_gemm"
# Tests set this to run the decode path's plan for the kernel off the GPU: `unsupported` then checks only the
# shapes, and `skinny_gemm` computes with XLA (as it does wherever the kernel cannot run).
OFF_GPU = False
MAX_ROWS = 32
SOURCE = Path(__file__).with_name("skinny_gemm.cu")


def _nvcc() -> str | None:
    """CUDA_HOME / CUDA_PATH, /usr/local/cuda, PATH, then the CUDA compiler of pip's nvidia packages."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(cand := os.path.join(root, "bin", "nvcc")):
            return cand
    if found := shutil.which("nvcc"):
        return found
    try:
        import nvidia  # jax[cuda13]'s wheels: nvidia/cu13/bin/nvcc (cuda12: nvidia/cuda_nvcc/bin/nvcc)
    except ImportError:
        return None
    for root in nvidia.__path__:
        for cand in sorted(glob.glob(os.path.join(root, "cu*", "bin", "nvcc"))):
            return cand
    return None


def _arch() -> str | None:
    """sm_XY(a) of the first GPU, or None below Hopper / off the GPU."""
    if jax.default_backend() != "gpu":
        return None
    cc = getattr(jax.devices()[0], "compute_capability", "")
    try:
        major, minor = (int(v) for v in cc.split("."))
    except ValueError:
        return None
    if major < 9:
        return None
    return f"sm_{major}{minor}" + ("a" if major == 9 else "")


def _build(nvcc: str, arch: str) -> Path:
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + arch.encode() + jax.__version__.encode())
    cache = Path(os.environ.get("MAMBA_JAX_KERNEL_CACHE", Path.home() / ".cache" / "mamba_jax" / "kernels"))
    lib = cache / f"skinny_gemm-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [nvcc, "-O3", "-std=c++17", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC"]
    cmd += ["-I", jax.ffi.include_dir(), "-o"]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: never a half-written .so
        out = Path(tmp) / lib.name
        log.warning("mamba_jax: building the skinny GEMM kernel for %s with %s (once; cached in %s)", arch, nvcc, cache)
        proc = subprocess.run([*cmd, str(out), str(SOURCE)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"nvcc failed building {SOURCE.name}:\n{proc.stderr[-4000:]}")
        os.replace(out, lib)
    return lib


@functools.cache
def _load() -> str | None:
    """Build, load and register the kernel; None when it is available, else why not."""
    arch = _arch()
    if arch is None:
        return "not a Hopper (sm_90+) GPU"
    nvcc = _nvcc()
    if nvcc is None:
        return "no nvcc found (set CUDA_HOME to a CUDA 12.4+ toolkit)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(nvcc, arch)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MambaJaxSkinnyGemm), platform="CUDA")
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        log.warning("mamba_jax: the skinny GEMM kernel is unavailable: %s", e)
        return f"its build failed ({str(e).splitlines()[0]})"
    return None


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
