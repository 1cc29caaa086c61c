"""`ssd_pallas`: the fused Mosaic GPU SSD kernels behind `mamba_jax.ssd(impl="pallas")`, with their VJP.

Three kernels in all (`ssd_fwd.py`, `ssd_bwd.py`), where mamba_ssm's Triton path launches 5 forward and
about 15 backward. The small per-token work on dt (bias, softplus, limit, the within-block cumulative sum,
document masks, D) stays in XLA (`ssd_common.block_vectors`) and is differentiated by JAX; `_scan` is the
`jax.custom_vjp` around the kernels, whose inputs are x, z, B, C, the per-block vectors and the initial
state.

On a machine without a GPU the same kernels run in Pallas interpret mode (`plgpu.InterpretGPUParams`),
which is how CI tests them; the GPU path needs Hopper (compute capability ≥ 9.0) and bf16 / f16 inputs.
The result does not depend on `chunk_size` beyond rounding: the kernels always walk blocks of 64 tokens
(`ssd_common.T`), so `chunk_size` only has to be a multiple of 64.

Dimension key: B batch, L length, H heads, G groups, P head dim, N state, T tokens per block.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from mamba_jax.kernels.ssd_bwd import build_bwd_groups, build_bwd_heads, groups_plan, heads_plan
from mamba_jax.kernels.ssd_common import PT, T, block_vectors, vector_grads
from mamba_jax.kernels.ssd_fwd import build_fwd, fwd_plan
from mamba_jax.ops.ssd_reference import process_dt

_GPU_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _interpret_params():
    return None if _on_gpu() else plgpu.InterpretGPUParams()


def ssd_pallas_unsupported(*, x, B, chunk_size, D=None, initial_states=None, seq_idx=None) -> str | None:
    """Why the kernels cannot take these inputs (None when they can). Shapes as in `mamba_jax.ssd`."""
    del initial_states, seq_idx  # any initial state and any document layout are supported
    _, _, h, p = x.shape
    g, n = B.shape[-2:]
    dtype = jnp.dtype(x.dtype)
    if D is not None and D.ndim != 1:
        return "D of shape (heads, head_dim) (only a per-head D)"
    if chunk_size % T:
        return f"chunk_size {chunk_size} (the kernels need a multiple of {T})"
    if p % PT:
        return f"head dim {p} (the kernels need a multiple of {PT})"
    if n % 64 or n > 256:
        return f"state size {n} (the kernels take 64, 128, 192 or 256)"
    if jnp.dtype(B.dtype) != dtype:
        return f"B / C in {jnp.dtype(B.dtype).name} with x in {dtype.name} (one dtype for all)"
    if _on_gpu():
        if dtype not in _GPU_DTYPES:
            return f"{dtype.name} inputs on GPU (the tensor-core kernels take bfloat16 or float16)"
        if not all(float(getattr(d, "compute_capability", "0")) >= 9.0 for d in jax.local_devices()):
            return "GPUs without Hopper features (compute capability < 9.0)"
    elif dtype not in (*_GPU_DTYPES, jnp.dtype(jnp.float32)):
        return f"{dtype.name} inputs"
    for has_z in (False, True):
        if fwd_plan(h, g, n, dtype, has_z) is None or heads_plan(n, dtype, has_z) is None:
            return f"state size {n} in {dtype.name}: the kernel tiles do not fit shared memory"
        if groups_plan(n, dtype, has_z) is None:
            return f"state size {n} in {dtype.name}: the kernel tiles do not fit shared memory"
    return None


@dataclasses.dataclass(frozen=True)
class _Config:
    b: int
    l: int  # padded to a multiple of T
    h: int
    p: int
    g: int
    n: int
    dtype: Any
    has_z: bool
    has_init: bool
    has_seq: bool
    interpret: Any

    def kw(self, **extra):
        names = ("b", "l", "h", "p", "g", "n", "dtype", "has_z", "has_seq", "interpret")
        return {k: getattr(self, k) for k in names} | extra


# Heads per forward program: None lets `fwd_plan` choose; benchmarks set 1 or 2 to compare.
FWD_HEADS = None


def _forward(cfg, x, z, B, C, vec, S0, save_states):
    kernel = build_fwd(**cfg.kw(has_init=cfg.has_init, save_states=save_states, heads=FWD_HEADS))
    args = [x, *([z] if cfg.has_z else []), B, C, vec, *([S0] if cfg.has_init else [])]
    return kernel(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg, x, z, B, C, vec, S0):
    y, final = _forward(cfg, x, z, B, C, vec, S0, save_states=False)
    return y, final


def _scan_fwd(cfg, x, z, B, C, vec, S0):
    y, final, states = _forward(cfg, x, z, B, C, vec, S0, save_states=True)
    return (y, final), (x, z, B, C, vec, states)


def _scan_bwd(cfg, res, cts):
    x, z, B, C, vec, states = res
    dy, dfinal = cts
    zs = [z] if cfg.has_z else []
    dy = dy.astype(x.dtype)
    outs = build_bwd_heads(**cfg.kw())(x, *zs, dy, B, C, vec, states, dfinal.astype(jnp.float32))
    dx, dz = outs[0], (outs[1] if cfg.has_z else None)
    dvp, dS_blocks, dS0 = outs[-3:]
    dB, dC = build_bwd_groups(**cfg.kw())(x, *zs, dy, B, C, vec, states, dS_blocks)
    return dx, dz, dB, dC, vector_grads(dvp), (dS0 if cfg.has_init else None)


_scan.defvjp(_scan_fwd, _scan_bwd)


def _pad_length(t, pad, mode="constant"):
    if t is None or pad == 0:
        return t
    widths = [(0, 0)] * t.ndim
    widths[1] = (0, pad)
    return jnp.pad(t, widths, mode=mode)


def ssd_pallas(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    dt_limit=(0.0, math.inf),
    initial_states=None,
    seq_idx=None,
):
    """Fused SSD scan. x (B, L, H, P), dt (B, L, H), A (H,), B and C (B, L, G, N), D (H,), z like x,
    initial_states (B, H, P, N), seq_idx (B, L). Returns (y like x, final states (B, H, P, N) float32);
    differentiable w.r.t. x, dt, A, B, C, D, z, dt_bias and initial_states.
    """
    reason = ssd_pallas_unsupported(
        x=x, B=B, chunk_size=chunk_size, D=D, initial_states=initial_states, seq_idx=seq_idx
    )
    if reason:
        raise ValueError(f"ssd_pallas: the kernels do not support {reason}.")
    for name, t in (("C", C), ("z", z)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"ssd_pallas: {name} is {t.dtype} but x is {x.dtype}; pass one dtype.")
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    pad = (-l) % T
    # Padding tokens have dt = 0: they neither decay nor feed the state, so the final state is the one
    # after the last real token; they continue the last document.
    dt_BLH = _pad_length(process_dt(dt, dt_bias, dt_softplus, tuple(dt_limit)), pad)
    seq_idx = _pad_length(seq_idx, pad, mode="edge")
    x, z, B, C = (_pad_length(t, pad) for t in (x, z, B, C))
    vec = block_vectors(dt_BLH, A, seq_idx, D)
    cfg = _Config(
        b=b,
        l=l + pad,
        h=h,
        p=p,
        g=g,
        n=n,
        dtype=jnp.dtype(x.dtype),
        has_z=z is not None,
        has_init=initial_states is not None,
        has_seq=seq_idx is not None,
        interpret=_interpret_params(),
    )
    S0 = None if initial_states is None else initial_states.astype(jnp.float32)
    y, final = _scan(cfg, x, z, B, C, vec, S0)
    return y[:, :l], final
