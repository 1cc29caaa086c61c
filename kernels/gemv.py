"""Weight-streaming GEMV for decode (Mosaic GPU: TMA ring + transposed wgmma), as split-K partials.

At decode the projections multiply a handful of rows by a large weight: the step is a read of the weight,
and what matters is keeping enough bytes in flight. Each program owns a tile of `bn` output features and a
slice of K; a memory warpgroup streams the weight's (bk, bn) tiles (and the matching (Bp, bk) slab of the
input, a few KB) through a ring of `stages` shared-memory slots with TMA, and a compute warpgroup runs one
wgmma per slot in the transposed form

    acc (bn, Bp) += W_tileᵀ (bn × bk) · x_tileᵀ (bk × Bp)

so the weight tile is the M = 64 operand and the batch (padded to a multiple of 8) is wgmma's N: no rows
of zeros are multiplied and the input is read once per program, not 64 rows of it. Programs write float32
partials `(splits, N, Bp)`; the consumer sums the splits as it reads them (`ssm_step`, `gated_norm_residual`
in `kernels/decode.py`), so no separate reduction runs. The transposed output layout (features, batch) is
what the accumulator holds; the consumers index it directly.

This follows the structure of jax's `hopper_matmul_mgpu.py` (warp-specialised TMA pipeline feeding wgmma)
reduced to a GEMV. Off the GPU it runs in Mosaic GPU's interpret mode (tests).

Status: measured (benchmarks/gemv_probe.py --mosaic, inside a compiled loop) on par with XLA's GEMV for the
2.7B in_proj (23.6 µs against 23.3 at batch 1) and behind it for out_proj (15.1 against 13.0), so no decode
path uses it yet; it is the Mosaic GPU baseline (the Pallas Triton backend is deprecated in jax 0.11) for a
decode whose consumers read the partials directly (no split-K reduce, no output cast).

Dimension key: B batch (Bp padded to 8), K reduction, N out features, S K-splits.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

ROW_PAD = 8  # wgmma's N granularity: the batch is padded to it
COL_ALIGN = 64  # the weight's columns: one 128-byte swizzle row of bf16 (TMA reads the weight as such tiles)


def _swizzle(cols: int, dtype):
    """Tiling + swizzle for a shared-memory tile whose rows hold `cols` elements."""
    row_bytes = cols * jnp.dtype(dtype).itemsize
    sw = 128 if row_bytes % 128 == 0 else (64 if row_bytes % 64 == 0 else 32)
    return (plgpu.TilingTransform((8, sw // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(sw))


def gemv_unsupported(b: int, k: int, n: int, *, bn: int, bk: int, splits: int) -> str | None:
    """Why this GEMV cannot run on these shapes, or None."""
    if n % COL_ALIGN:
        return f"out features {n} are not a multiple of {COL_ALIGN} (TMA's tiled view of the weight; pad its columns)"
    if k % (bk * splits):
        return f"in features {k} are not a multiple of {bk} × {splits} splits"
    if b % ROW_PAD or b > 256:
        return f"rows {b} must be a multiple of {ROW_PAD} and at most 256 (pad the batch)"
    return None


@functools.cache
def _build(b, k, n, dtype, bn, bk, splits, stages, interpret):
    steps = k // (bk * splits)
    stages = min(stages, steps)
    f32 = jnp.float32

    def kernel(x_ref, w_ref, o_ref, w_s, x_s, o_s, loaded, consumed):
        ni, si, wg = lax.axis_index("n"), lax.axis_index("s"), lax.axis_index("wg")
        cols = pl.ds(ni * bn, bn)

        @pl.when(wg == 1)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, steps)
            def _load(i):
                slot = lax.rem(i, jnp.asarray(stages, i.dtype))

                @pl.when(i >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                ks = pl.ds((si * steps + i) * bk, bk)
                plgpu.copy_gmem_to_smem(w_ref.at[ks, cols], w_s.at[slot], loaded.at[2 * slot])
                plgpu.copy_gmem_to_smem(x_ref.at[:, ks], x_s.at[slot], loaded.at[2 * slot + 1])

            for i in range(max(steps - stages, 0), steps):  # every release must be awaited
                plgpu.barrier_wait(consumed.at[i % stages])

        @pl.when(wg == 0)
        def _compute():
            def run(acc):
                @pl.loop(0, steps)
                def _step(i):
                    slot = lax.rem(i, jnp.asarray(stages, i.dtype))
                    plgpu.barrier_wait(loaded.at[2 * slot])
                    plgpu.barrier_wait(loaded.at[2 * slot + 1])
                    plgpu.wgmma(acc, w_s.at[slot].transpose((1, 0)), x_s.at[slot].transpose((1, 0)))
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(consumed.at[slot])

                return acc[...]

            o_s[...] = pl.run_scoped(run, plgpu.ACC((bn, b), f32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_ref.at[si, cols])
            plgpu.wait_smem_to_gmem(0)

    scratch = [
        plgpu.SMEM((stages, bk, bn), dtype, transforms=_swizzle(bn, dtype)),
        plgpu.SMEM((stages, b, bk), dtype, transforms=_swizzle(bk, dtype)),
        plgpu.SMEM((bn, b), f32),
        plgpu.Barrier(num_barriers=2 * stages),
        plgpu.Barrier(num_barriers=stages),
    ]
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((splits, n, b), f32),
        grid=(pl.cdiv(n, bn), splits),
        grid_names=("n", "s"),
        num_threads=2,
        thread_name="wg",
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=("bn", "bk", "splits", "stages"))
def gemv_t(x_BK, w_KN, *, bn: int = 64, bk: int = 128, splits: int = 1, stages: int = 4):
    """(splits, N, Bp) float32 partial sums of (x @ w)ᵀ over K slices; Σ over axis 0 gives x @ w transposed.

    x_BK (Bp, K) with Bp a multiple of 8 (rows past the real batch may hold anything: each output column
    depends on its own row only), w_KN (K, N) in x's dtype (bf16 / f16 on the GPU).
    """
    b, k = x_BK.shape
    n = w_KN.shape[1]
    if why := gemv_unsupported(b, k, n, bn=bn, bk=bk, splits=splits):
        raise ValueError(f"gemv_t: {why}")
    if w_KN.shape[0] != k or w_KN.dtype != x_BK.dtype:
        raise ValueError(f"gemv_t: weight {w_KN.shape} {w_KN.dtype} does not match input {x_BK.shape} {x_BK.dtype}")
    if jax.default_backend() == "gpu":
        # A last tile past N is fine on the GPU: TMA fills its loads with zeros and skips its stores.
        return _build(b, k, n, jnp.dtype(x_BK.dtype), bn, bk, splits, stages, None)(x_BK, w_KN)
    # The interpreter clamps a slice past the edge instead: pad the columns there.
    npad = -(-n // bn) * bn
    w_KN = jnp.pad(w_KN, ((0, 0), (0, npad - n)))
    out = _build(b, k, npad, jnp.dtype(x_BK.dtype), bn, bk, splits, stages, plgpu.InterpretGPUParams())(x_BK, w_KN)
    return out[:, :n]
