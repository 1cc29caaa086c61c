"""Building the CUDA sources of mamba_jax.kernels (`*.cu`) into XLA FFI targets, on first use.

nvcc compiles a source for the first GPU's architecture against the FFI headers jax ships
(`jax.ffi.include_dir()`) into a shared library, cached under MAMBA_JAX_KERNEL_CACHE (default
~/.cache/mamba_jax/kernels) by a hash of the source (and the headers it includes from this folder), nvcc's
version, the architecture and jax's version, written aside and renamed (never a half-written library), then
loaded and its handler registered. `load` returns why a kernel is unavailable instead of raising: callers
fall back to XLA (kernels/skinny_gemm.py, mamba_jax/inference/megakernel.py).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

log = logging.getLogger(__name__)
HERE = Path(__file__).parent


def nvcc() -> str | None:
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


def arch() -> str | None:
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


def _build(source: Path, nvcc: str, sm: str, flags: tuple[str, ...]) -> Path:
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(source.read_bytes())
    for header in sorted(HERE.glob("*.cuh")):
        key.update(header.read_bytes())
    key.update((version + sm + jax.__version__ + " ".join(flags)).encode())
    cache = Path(os.environ.get("MAMBA_JAX_KERNEL_CACHE", Path.home() / ".cache" / "mamba_jax" / "kernels"))
    lib = cache / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [nvcc, "-O3", "-std=c++17", f"-arch={sm}", "-shared", "-Xcompiler", "-fPIC", *flags]
    cmd += ["-I", jax.ffi.include_dir(), "-o"]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / lib.name
        log.warning("mamba_jax: building %s for %s with %s (once; cached in %s)", source.name, sm, nvcc, cache)
        proc = subprocess.run([*cmd, str(out), str(source)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"nvcc failed building {source.name}:\n{proc.stderr[-4000:]}")
        os.replace(out, lib)
    return lib


@functools.cache
def load(name: str, symbol: str, target: str, flags: tuple[str, ...] = ()) -> str | None:
    """Build kernels/NAME.cu, load it and register its handler SYMBOL as the FFI target TARGET; None when it
    is available, else why not."""
    sm = arch()
    if sm is None:
        return "not a Hopper (sm_90+) GPU"
    compiler = nvcc()
    if compiler is None:
        return "no nvcc found (set CUDA_HOME to a CUDA 12.4+ toolkit)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(HERE / f"{name}.cu", compiler, sm, flags)))
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="CUDA")
    except (OSError, RuntimeError, AttributeError, subprocess.CalledProcessError) as e:
        log.warning("mamba_jax: the %s kernel is unavailable: %s", name, e)
        return f"its build failed ({str(e).splitlines()[0]})"
    return None
