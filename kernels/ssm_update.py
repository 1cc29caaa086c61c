"""The split decode step's state update with a write-back window as a CUDA kernel behind an XLA FFI call.

`ssm_update.cu` says what it computes and why: the second launch of `kernels.decode`'s split step
(`ssm_step(split=True, window=…)`), same inputs, outputs and rounding as the Pallas `_update_kernel`, as two
CUDA launches: the window's coefficients per (row, head), then the state as a plain stream.
`kernels.decode._split_step` calls `update_window` where `unsupported` allows — a Hopper GPU with nvcc, bf16
activations and window buffers — and runs the Pallas kernel elsewhere (off the GPU in interpret mode: the
tests, CI). MAMBA_JAX_DECODE_WINDOW_KERNEL=pallas picks the Pallas kernel on the GPU too, for A/B runs (read
at trace time).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.kernels.cuda_build import load

TARGET = "mamba_jax_ssm_update_window"
FUSED_TARGET = "mamba_jax_ssm_step_window"
NT = 128  # threads per CTA (ssm_update.cu)
MAX_W, MAX_S = 16, 256


# State rows per CTA of the stream launch (0: block_p, the Pallas kernel's); MAMBA_JAX_DECODE_WINDOW_ROWS overrides
# it at trace time, for A/B runs.
ROWS_PER_CTA = 0


def rows_per_cta(block_p: int) -> int:
    return int(os.environ.get("MAMBA_JAX_DECODE_WINDOW_ROWS", ROWS_PER_CTA)) or block_p


# Which kernels of ssm_update.cu run (where the shapes fit them, else the first ones): bit 0 the coefficients in
# registers (`window_coef_regs`, one round of loads) instead of `window_coef`, bit 1 the coalesced state stream
# (`window_stream`) instead of the row-wise `window_update`. MAMBA_JAX_DECODE_WINDOW_VARIANT overrides it at
# trace time, for A/B runs.
VARIANT = 0


def variant() -> int:
    env = os.environ.get("MAMBA_JAX_DECODE_WINDOW_VARIANT")
    if env is not None and env not in ("0", "1", "2", "3"):
        raise ValueError(f"MAMBA_JAX_DECODE_WINDOW_VARIANT={env!r}: give 0, 1, 2 or 3 (bit 0 coef, bit 1 stream)")
    return VARIANT if env is None else int(env)


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


# The prep kernel's work in the CUDA step's first launch (`step_window`): one launch less, but measured slower
# (2.7B batch 32, H100: 6,605 against 6,965 tok/s with the Pallas prep kernel in front of `update_window`,
# benchmarks/results/decode_variants_window_fused_2_7b_b32_h100.json): off; MAMBA_JAX_DECODE_WINDOW_PREP=cuda
# turns it on at trace time.
FUSED_PREP = False


def fused_unsupported(heads: int) -> str | None:
    """Why `step_window` (the prep fused in) would not run where `update_window` does, or None: FUSED_PREP or
    MAMBA_JAX_DECODE_WINDOW_PREP=cuda|pallas (read at trace time) picks it."""
    env = os.environ.get("MAMBA_JAX_DECODE_WINDOW_PREP")
    if env != "cuda" and (env == "pallas" or not FUSED_PREP):
        return "the Pallas prep kernel (FUSED_PREP, MAMBA_JAX_DECODE_WINDOW_PREP)"
    if heads % (NT // 32):
        return f"{heads} heads (the fused prep takes a multiple of {NT // 32})"
    return load("ssm_update", "MambaJaxSsmStepWindow", FUSED_TARGET)


def unsupported(*, state_dtype, act_dtype, g_dtype, param_dtypes, window: int, head_dim: int, state_size: int,
                block_p: int) -> str | None:  # fmt: skip
    """Why `update_window` would not run for these shapes and dtypes here, or None when it runs."""
    if reason := _not_here(act_dtype):
        return reason
    f32_bf16 = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    if any(jnp.dtype(d) not in f32_bf16 for d in (state_dtype, g_dtype, *param_dtypes)):
        return "a state, g or parameter dtype other than float32 / bfloat16"
    if not 1 <= window <= MAX_W or state_size > MAX_S:
        return f"window {window} / state size {state_size} (it takes W ≤ {MAX_W}, S ≤ {MAX_S})"
    cb = rows_per_cta(block_p)
    if (
        NT % cb
        or head_dim % cb
        or cb % block_p
        or block_p % max(cb // 4, 1)
        or state_size // (NT // cb) not in (16, 32, 64)
    ):
        return (
            f"block_p {block_p}, {cb} rows per CTA, state size {state_size} (it needs cb | 128, cb | head dim, "
            "block_p | cb, cb / 4 | block_p and S / (128 / cb) in 16, 32, 64)"
        )
    return _load()


def _shared_outputs(ssm_BHPS, window, block_p, g_dtype, g_rows):
    """What both targets return around their own outputs: (g, ss) first, then the state and the window
    buffers (aliased), then the scratch from the coefficient launch to the state stream: d₀, extra, wᵢ."""
    bsz, heads, p, _ = ssm_BHPS.shape
    f32 = jnp.float32
    head = (jax.ShapeDtypeStruct((g_rows, heads * p), g_dtype), jax.ShapeDtypeStruct((bsz, heads, p // block_p), f32))
    state = (ssm_BHPS, *window)
    scratch = ((bsz, heads), (bsz, heads, p), (bsz, heads, window[0].shape[1]))
    return (
        head,
        tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in state),
        tuple(jax.ShapeDtypeStruct(sh, f32) for sh in scratch),
    )


def _shared_attrs(pos, block_p, dt_limit):
    """The position as the kernels read it and the attributes both targets take."""
    lo, hi = dt_limit
    attrs = dict(bp=np.int64(block_p), cb=np.int64(rows_per_cta(block_p)), dt_lo=np.float32(lo),
                 dt_hi=np.float32(hi), variant=np.int64(variant()))  # fmt: skip
    return jnp.reshape(jnp.asarray(pos, jnp.int32), (1,)), attrs


def update_window(zx_BGW, xbc_BGF, scale_B, ssm_BHPS, A_log_H, D_H, dt_bias_H, pos, window, *, block_p, dt_limit,
                  g_dtype, g_rows, pdl=False):  # fmt: skip
    """For the token at position `pos`: (g (g_rows, H·P), ss (B, H, P / block_p), the state, the window
    buffers) as `_update_kernel` with a window returns them; the state and the buffers are updated in place
    (donate them)."""
    head, state, scratch = _shared_outputs(ssm_BHPS, window, block_p, g_dtype, g_rows)
    call = jax.ffi.ffi_call(TARGET, (*head, *state, *scratch), input_output_aliases={3: 2, 8: 3, 9: 4, 10: 5})
    pos_1, attrs = _shared_attrs(pos, block_p, dt_limit)
    g, ss, ssm, *win, _, _, _ = call(
        zx_BGW, xbc_BGF, scale_B, ssm_BHPS, A_log_H, D_H, dt_bias_H, pos_1, *window, pdl=bool(pdl), **attrs
    )
    return g, ss, ssm, tuple(win)


def step_window(zx_BGW, conv_BKGF, conv_w_KGF, conv_b_GF, norm_in_BD, ssm_BHPS, A_log_H, D_H, dt_bias_H, pos, window,
                *, block_p, dt_limit, norm_eps, g_dtype, g_rows):  # fmt: skip
    """The whole split step with the window in two CUDA launches, the prep kernel's work (the input norm's
    1/rms, the conv, the conv ring's update) in the first: (g, ss, the conv ring, the state, the window
    buffers) as `kernels.decode._split_step` returns them; the ring, the state and the buffers in place."""
    bsz, _, _, s = ssm_BHPS.shape
    head, state, scratch = _shared_outputs(ssm_BHPS, window, block_p, g_dtype, g_rows)
    ring = jax.ShapeDtypeStruct(conv_BKGF.shape, conv_BKGF.dtype)
    own = (jax.ShapeDtypeStruct((bsz,), jnp.float32), jax.ShapeDtypeStruct((bsz, zx_BGW.shape[1], s), jnp.bfloat16))
    out = (*head, ring, *state, *scratch, *own)  # scratch of its own: the 1/rms, C
    call = jax.ffi.ffi_call(FUSED_TARGET, out, input_output_aliases={1: 2, 5: 3, 10: 4, 11: 5, 12: 6})
    pos_1, attrs = _shared_attrs(pos, block_p, dt_limit)
    gv, ss, conv, ssm, *rest = call(
        zx_BGW, conv_BKGF, conv_w_KGF, conv_b_GF, norm_in_BD, ssm_BHPS, A_log_H, D_H, dt_bias_H, pos_1, *window,
        eps=np.float32(norm_eps), **attrs,
    )  # fmt: skip
    return gv, ss, conv, ssm, tuple(rest[:3])
