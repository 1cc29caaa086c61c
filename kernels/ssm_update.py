"""The split decode step's state update with a write-back window as a CUDA kernel behind an XLA FFI call.

`ssm_update.cu` says what it computes and why: the second launch of `kernels.decode`'s split step
(`ssm_step(split=True, window=…)`), same inputs, outputs and rounding as the Pallas `_update_kernel`, as two
CUDA launches: the window's coefficients per (row, head), then the state as a coalesced stream.
`kernels.decode._split_step` calls `update_window` where `unsupported` allows — a Hopper GPU with nvcc, bf16
activations and window buffers, head dim 64 and state size 128 or 256 (every Mamba2 and Nemotron-H size) —
and runs the Pallas kernel elsewhere (off the GPU in interpret mode: the tests, CI).
MAMBA_JAX_DECODE_WINDOW_KERNEL=pallas picks the Pallas kernel on the GPU too, for A/B runs (read at trace time).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.kernels.cuda_build import load

TARGET = "mamba_jax_ssm_update_window"
MAX_W = 16
HEAD_DIM, STATE_SIZES = 64, (128, 256)  # the kernels' register tiles (ssm_update.cu's `setup`)


# State rows per CTA of the stream launch (0: block_p, the Pallas kernel's); 32 or 64 (32 at state size 256).
# 64 was slower (2.7B batch 32, H100: 7,528 against 7,670 tok/s with 32,
# benchmarks/results/decode_variants_window_regs_coalesced_2_7b_b32_h100.json). MAMBA_JAX_DECODE_WINDOW_ROWS
# overrides it at trace time, for A/B runs.
ROWS_PER_CTA = 0


def rows_per_cta(block_p: int) -> int:
    return int(os.environ.get("MAMBA_JAX_DECODE_WINDOW_ROWS", ROWS_PER_CTA)) or block_p


def _load() -> str | None:
    """Build, load and register the kernel (kernels/cuda_build.py); None when it is available, else why not."""
    return load("ssm_update", "MambaJaxSsmUpdateWindow", TARGET)


def _not_here(act_dtype) -> str | None:
    """Why the kernel does not run here for these activations whatever the shapes (before any build), or None."""
    if os.environ.get("MAMBA_JAX_DECODE_WINDOW_KERNEL", "cuda") == "pallas":
        return "MAMBA_JAX_DECODE_WINDOW_KERNEL=pallas"
    if jax.default_backend() != "gpu":
        return "not a GPU"
    if jnp.dtype(act_dtype) != jnp.bfloat16:
        return f"{jnp.dtype(act_dtype).name} activations (it reads bfloat16)"
    return None


def available(act_dtype) -> bool:
    """Whether the kernel runs here for these activations (the shapes are checked per call: `unsupported`)."""
    return _not_here(act_dtype) is None and _load() is None


def shape_unsupported(window: int, head_dim: int, state_size: int) -> str | None:
    """Why the kernels' register tiles do not take this window, head dim and state size, or None."""
    if not 1 <= window <= MAX_W or head_dim != HEAD_DIM or state_size not in STATE_SIZES:
        return (f"window {window}, head dim {head_dim}, state size {state_size} (it takes W ≤ {MAX_W}, head dim "
                f"{HEAD_DIM}, state size {' or '.join(map(str, STATE_SIZES))})")  # fmt: skip
    return None


def unsupported(*, state_dtype, act_dtype, g_dtype, param_dtypes, window: int, head_dim: int, state_size: int,
                block_p: int) -> str | None:  # fmt: skip
    """Why `update_window` would not run for these shapes and dtypes here, or None when it runs."""
    if reason := _not_here(act_dtype):
        return reason
    f32_bf16 = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    if any(jnp.dtype(d) not in f32_bf16 for d in (state_dtype, g_dtype, *param_dtypes)):
        return "a state, g or parameter dtype other than float32 / bfloat16"
    if reason := shape_unsupported(window, head_dim, state_size):
        return reason
    cb = rows_per_cta(block_p)
    if cb not in ((32, 64) if state_size == 128 else (32,)) or cb % block_p:
        return f"{cb} state rows per CTA for block_p {block_p} (32 or 64, 32 at state size 256; block_p | rows)"
    return _load()


def update_window(zx_BGW, xbc_BGF, scale_B, ssm_BHPS, A_log_H, D_H, dt_bias_H, pos, window, *, block_p, dt_limit,
                  g_dtype, g_rows, pdl=0):  # fmt: skip
    """For the token at position `pos`: (g (g_rows, H·P), ss (B, H, P / block_p), the state, the window
    buffers) as `_update_kernel` with a window returns them; the state and the buffers are updated in place
    (donate them). `pdl` 1: the state stream under programmatic dependent launch; 2: the coefficient launch
    too (then the prep kernel in front must trigger its dependents)."""
    bsz, heads, p, _ = ssm_BHPS.shape
    f32 = jnp.float32
    head = (jax.ShapeDtypeStruct((g_rows, heads * p), g_dtype), jax.ShapeDtypeStruct((bsz, heads, p // block_p), f32))
    state = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (ssm_BHPS, *window))
    # the coefficient launch's scratch for the state stream: d₀, extra, wᵢ
    scratch = tuple(jax.ShapeDtypeStruct(sh, f32) for sh in ((bsz, heads), (bsz, heads, p),
                                                            (bsz, heads, window[0].shape[1])))  # fmt: skip
    call = jax.ffi.ffi_call(TARGET, (*head, *state, *scratch), input_output_aliases={3: 2, 8: 3, 9: 4, 10: 5})
    lo, hi = dt_limit
    attrs = dict(bp=np.int64(block_p), cb=np.int64(rows_per_cta(block_p)), dt_lo=np.float32(lo),
                 dt_hi=np.float32(hi), pdl=np.int64(pdl))  # fmt: skip
    pos_1 = jnp.reshape(jnp.asarray(pos, jnp.int32), (1,))
    g, ss, ssm, *win, _, _, _ = call(
        zx_BGW, xbc_BGF, scale_B, ssm_BHPS, A_log_H, D_H, dt_bias_H, pos_1, *window, **attrs
    )
    return g, ss, ssm, tuple(win)
