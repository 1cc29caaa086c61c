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
FUSED_TARGET = "mamba_jax_ssm_step_window"
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


# The prep kernel's work (the input norm's 1/rms, the conv, the conv ring's update) in the coefficient launch
# (`step_window`: a CTA per block of 8 heads shares the norm and the group's B and C conv; one launch less). An
# earlier version (a warp per head, the norm and B, C conv per warp) was slower (6,605 against 6,965 tok/s, 2.7B
# batch 32, H100, results/decode_variants_window_fused_2_7b_b32_h100.json); this one is not yet timed: off;
# MAMBA_JAX_DECODE_WINDOW_PREP=cuda turns it on at trace time.
FUSED_PREP = False
# Heads per CTA of `step_window` (at most; the largest of 8, 4, 2, 1 dividing the heads per group): 8 puts the
# 320 CTAs of 2.7B at batch 32 in one wave at 3 CTAs of 256 threads per SM; 4 halves the CTA and doubles their
# number (two CTAs per block of 8 heads each conv B and C again). MAMBA_JAX_DECODE_WINDOW_HB overrides it at
# trace time, for A/B runs.
HEADS_PER_CTA = 8


def heads_per_cta(heads_per_group: int) -> int:
    """`step_window`'s heads per CTA for this many heads per group (HEADS_PER_CTA or the variable, at most)."""
    raw = os.environ.get("MAMBA_JAX_DECODE_WINDOW_HB", str(HEADS_PER_CTA))
    if raw not in ("1", "2", "4", "8"):
        raise ValueError(f"MAMBA_JAX_DECODE_WINDOW_HB={raw!r}: give 1, 2, 4 or 8 (heads per CTA, at most)")
    return next(n for n in (8, 4, 2, 1) if n <= int(raw) and heads_per_group % n == 0)


def fused_unsupported(heads: int, groups: int, head_dim: int, state_size: int, ring_slots: int,
                      norm_width: int) -> str | None:  # fmt: skip
    """Why `step_window` (the prep fused in) would not run where `update_window` does, or None: FUSED_PREP or
    MAMBA_JAX_DECODE_WINDOW_PREP=cuda|pallas (read at trace time) picks it."""
    env = os.environ.get("MAMBA_JAX_DECODE_WINDOW_PREP")
    if env not in (None, "cuda", "pallas"):
        raise ValueError(f"MAMBA_JAX_DECODE_WINDOW_PREP={env!r}: give cuda or pallas")
    if env == "pallas" or (env is None and not FUSED_PREP):
        return "the Pallas prep kernel (FUSED_PREP, MAMBA_JAX_DECODE_WINDOW_PREP)"
    r = heads // groups
    hb = heads_per_cta(r)
    if (hb * head_dim + 2 * state_size) // 4 > hb * 32 or ring_slots > 4 or norm_width % 4:
        return (
            f"{r} heads per group ({hb} per CTA), state size {state_size}, a conv of {ring_slots} taps, a norm "
            f"over {norm_width} (it needs enough threads per CTA for the conv channels, ≤ 4 taps, a multiple of 4)"
        )
    return load("ssm_update", "MambaJaxSsmStepWindow", FUSED_TARGET)


def unsupported(*, state_dtype, act_dtype, g_dtype, param_dtypes, window: int, head_dim: int, state_size: int,
                block_p: int) -> str | None:  # fmt: skip
    """Why `update_window` would not run for these shapes and dtypes here, or None when it runs."""
    if reason := _not_here(act_dtype):
        return reason
    f32_bf16 = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    if any(jnp.dtype(d) not in f32_bf16 for d in (state_dtype, g_dtype, *param_dtypes)):
        return "a state, g or parameter dtype other than float32 / bfloat16"
    if not 1 <= window <= MAX_W or head_dim != HEAD_DIM or state_size not in STATE_SIZES:
        return (f"window {window}, head dim {head_dim}, state size {state_size} (it takes W ≤ {MAX_W}, head dim "
                f"{HEAD_DIM}, state size {' or '.join(map(str, STATE_SIZES))})")  # fmt: skip
    cb = rows_per_cta(block_p)
    if cb not in ((32, 64) if state_size == 128 else (32,)) or cb % block_p:
        return f"{cb} state rows per CTA for block_p {block_p} (32 or 64, 32 at state size 256; block_p | rows)"
    return _load()


def _outputs(ssm_BHPS, window, block_p, g_dtype, g_rows):
    """What both targets return around their own outputs: (g, ss), the state and the window buffers (aliased),
    the scratch from the coefficient launch to the state stream (d₀, extra, wᵢ)."""
    bsz, heads, p, _ = ssm_BHPS.shape
    f32 = jnp.float32
    head = (jax.ShapeDtypeStruct((g_rows, heads * p), g_dtype), jax.ShapeDtypeStruct((bsz, heads, p // block_p), f32))
    state = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (ssm_BHPS, *window))
    scratch = tuple(jax.ShapeDtypeStruct(sh, f32) for sh in ((bsz, heads), (bsz, heads, p),
                                                            (bsz, heads, window[0].shape[1])))  # fmt: skip
    return head, state, scratch


def _attrs(pos, block_p, dt_limit, pdl):
    """The position as the kernels read it and the attributes both targets take."""
    lo, hi = dt_limit
    attrs = dict(bp=np.int64(block_p), cb=np.int64(rows_per_cta(block_p)), dt_lo=np.float32(lo),
                 dt_hi=np.float32(hi), pdl=np.int64(pdl))  # fmt: skip
    return jnp.reshape(jnp.asarray(pos, jnp.int32), (1,)), attrs


def update_window(zx_BGW, xbc_BGF, scale_B, ssm_BHPS, A_log_H, D_H, dt_bias_H, pos, window, *, block_p, dt_limit,
                  g_dtype, g_rows, pdl=0):  # fmt: skip
    """For the token at position `pos`: (g (g_rows, H·P), ss (B, H, P / block_p), the state, the window
    buffers) as `_update_kernel` with a window returns them; the state and the buffers are updated in place
    (donate them). `pdl` 1: the state stream under programmatic dependent launch; 2: the coefficient launch
    too (then the prep kernel in front must trigger its dependents)."""
    head, state, scratch = _outputs(ssm_BHPS, window, block_p, g_dtype, g_rows)
    call = jax.ffi.ffi_call(TARGET, (*head, *state, *scratch), input_output_aliases={3: 2, 8: 3, 9: 4, 10: 5})
    pos_1, attrs = _attrs(pos, block_p, dt_limit, pdl)
    g, ss, ssm, *win, _, _, _ = call(
        zx_BGW, xbc_BGF, scale_B, ssm_BHPS, A_log_H, D_H, dt_bias_H, pos_1, *window, **attrs
    )
    return g, ss, ssm, tuple(win)


def step_window(zx_BGW, conv_BKGF, conv_w_KGF, conv_b_GF, norm_in_BD, ssm_BHPS, A_log_H, D_H, dt_bias_H, pos, window,
                *, block_p, dt_limit, norm_eps, g_dtype, g_rows, pdl=0):  # fmt: skip
    """The whole split step with the window in two CUDA launches, the prep kernel's work (the input norm's
    1/rms, the conv, the conv ring's update) in the first: (g, ss, the conv ring, the state, the window
    buffers) as `kernels.decode._split_step` returns them; the ring, the state and the buffers in place.
    `pdl` 1: the state stream under programmatic dependent launch."""
    bsz, heads, _, s = ssm_BHPS.shape
    head, state, scratch = _outputs(ssm_BHPS, window, block_p, g_dtype, g_rows)
    ring = jax.ShapeDtypeStruct(conv_BKGF.shape, conv_BKGF.dtype)
    own = (jax.ShapeDtypeStruct((bsz,), jnp.float32), jax.ShapeDtypeStruct((bsz, zx_BGW.shape[1], s), jnp.bfloat16))
    call = jax.ffi.ffi_call(FUSED_TARGET, (*head, ring, *state, *scratch, *own),  # own scratch: the 1/rms, C
                            input_output_aliases={1: 2, 5: 3, 10: 4, 11: 5, 12: 6})  # fmt: skip
    pos_1, attrs = _attrs(pos, block_p, dt_limit, min(pdl, 1))
    gv, ss, conv, ssm, *rest = call(
        zx_BGW, conv_BKGF, conv_w_KGF, conv_b_GF, norm_in_BD, ssm_BHPS, A_log_H, D_H, dt_bias_H, pos_1, *window,
        eps=np.float32(norm_eps), hb=np.int64(heads_per_cta(heads // zx_BGW.shape[1])), **attrs,
    )  # fmt: skip
    return gv, ss, conv, ssm, tuple(rest[:3])
