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

With `pdl=True` the kernel is launched with programmatic dependent launch: the memory warpgroup issues
the ring's first `stages` weight tiles, then `griddepcontrol.wait`s for the kernel before it (which may
signal `griddepcontrol.launch_dependents` early: `ssm_step(trigger=True)`) before it loads the input.
`Mamba2Mixer._decode_fused` runs out_proj this way when MAMBA_JAX_DECODE_GEMV=mosaic (opt-in).

Status (H100, benchmarks/README.md): in the 2.7B decode loop the GEMV itself takes 11.6 µs for out_proj
against XLA's 11.2 + 1.3 (its split-K reduce), but it starts ≈ 0.1 µs after the step kernel ends: inside
XLA's command buffer (CUDA graph) the custom call's PDL launch does not overlap its predecessor, while
XLA's own kernels do overlap theirs slightly. With the residual kernel reading the partials (+0.5 µs) the
path runs 361–368 tokens/s against 383–387 for XLA's GEMV with the L2 prefetch, so it is not the default.
Without command buffers the loop is launch-bound (297–326 tokens/s). For the in_proj it is on par with XLA
(23.6 against 23.3 µs, timed in a compiled loop).

Dimension key: B batch (Bp padded to 8), K reduction, N out features, S K-splits.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

ROW_PAD = 8  # wgmma's N granularity: the batch is padded to it
COL_ALIGN = 64  # the weight's columns: one 128-byte swizzle row of bf16 (TMA reads the weight as such tiles)
# out_proj at decode (`Mamba2Mixer._decode_fused`, opt-in): (bn, bk, splits, stages), the best of those
# benchmarks/decode_variants.py compared at the 2.7B (H100: 2,8 > 4,6 > 8,4 splits, stages);
# MAMBA_JAX_DECODE_GEMV_TILES="bn,bk,splits,stages" overrides it at trace time.
DECODE_TILES = (64, 128, 2, 8)


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
def _build(b, k, n, dtype, bn, bk, splits, stages, pdl, interpret):
    steps = k // (bk * splits)
    stages = min(stages, steps)
    f32 = jnp.float32

    def kernel(x_ref, w_ref, o_ref, w_s, x_s, o_s, loaded, consumed):
        ni, si, wg = lax.axis_index("n"), lax.axis_index("s"), lax.axis_index("wg")
        cols = pl.ds(ni * bn, bn)

        @pl.when(wg == 1)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def k_slice(i):
                return pl.ds((si * steps + i) * bk, bk)

            # The ring's first `stages` weight tiles depend on nothing the previous kernel writes: with PDL
            # they stream while that kernel still runs, and only the input waits for it.
            for i in range(stages):
                plgpu.copy_gmem_to_smem(w_ref.at[k_slice(i), cols], w_s.at[i], loaded.at[2 * i])
            if pdl:
                plgpu.griddepcontrol_wait()

            @pl.loop(0, steps)
            def _load(i):
                slot = lax.rem(i, jnp.asarray(stages, i.dtype))

                @pl.when(i >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])
                    plgpu.copy_gmem_to_smem(w_ref.at[k_slice(i), cols], w_s.at[slot], loaded.at[2 * slot])

                plgpu.copy_gmem_to_smem(x_ref.at[:, k_slice(i)], x_s.at[slot], loaded.at[2 * slot + 1])

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


@functools.partial(jax.jit, static_argnames=("bn", "bk", "splits", "stages", "pdl"))
def gemv_t(x_BK, w_KN, *, bn: int = 64, bk: int = 128, splits: int = 1, stages: int = 4, pdl: bool = False):
    """(splits, N, Bp) float32 partial sums of (x @ w)ᵀ over K slices; Σ over axis 0 gives x @ w transposed.

    x_BK (Bp, K) with Bp a multiple of 8 (rows past the real batch may hold anything: each output column
    depends on its own row only), w_KN (K, N) in x's dtype (bf16 / f16 on the GPU).

    `pdl`: launch with programmatic dependent launch (Hopper): the kernel may start while the kernel before
    it in the stream still runs (once that one's programs have all signalled `griddepcontrol.launch_dependents`
    or exited), fills its weight ring, and waits (`griddepcontrol.wait`: the previous kernel complete, its
    writes visible) before it reads x or writes anything. Ignored off the GPU.
    """
    b, k = x_BK.shape
    n = w_KN.shape[1]
    if why := gemv_unsupported(b, k, n, bn=bn, bk=bk, splits=splits):
        raise ValueError(f"gemv_t: {why}")
    if w_KN.shape[0] != k or w_KN.dtype != x_BK.dtype:
        raise ValueError(f"gemv_t: weight {w_KN.shape} {w_KN.dtype} does not match input {x_BK.shape} {x_BK.dtype}")
    if jax.default_backend() == "gpu":
        # A last tile past N is fine on the GPU: TMA fills its loads with zeros and skips its stores.
        return _build(b, k, n, jnp.dtype(x_BK.dtype), bn, bk, splits, stages, pdl, None)(x_BK, w_KN)
    # The interpreter clamps a slice past the edge instead: pad the columns there.
    npad = -(-n // bn) * bn
    w_KN = jnp.pad(w_KN, ((0, 0), (0, npad - n)))
    interpret = plgpu.InterpretGPUParams()
    out = _build(b, k, npad, jnp.dtype(x_BK.dtype), bn, bk, splits, stages, False, interpret)(x_BK, w_KN)
    return out[:, :n]


def _hopper() -> bool:
    """sm_90: the kernel's wgmma and PDL are Hopper's (Blackwell's tensor cores take other instructions)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


def decode_gemv_tiles(b: int, k: int, n: int, dtype) -> dict | None:
    """Tiles for a decode projection (b rows, (k, n) weight) as `gemv_t(pdl=True)`, or None for XLA's GEMV.

    MAMBA_JAX_DECODE_GEMV (read at trace time): "xla" (default: XLA's GEMV), "mosaic" (this kernel: on a
    Hopper GPU in bf16 / f16; off the GPU in interpret mode, float32 included, for tests). Measured slower
    than XLA's GEMV with the L2 prefetch in the decode loop (2.7B batch 1: 361–368 against 387 tokens/s;
    inside XLA's command buffers the PDL launch does not overlap the step kernel: benchmarks/README.md),
    so it is opt-in."""
    mode = os.environ.get("MAMBA_JAX_DECODE_GEMV", "xla")
    if mode not in ("mosaic", "xla"):
        raise ValueError(f"MAMBA_JAX_DECODE_GEMV={mode!r}: use xla or mosaic")
    if mode == "xla" or (jax.default_backend() == "gpu" and not _hopper()):
        return None
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "gpu":
        return None  # float32 would run as tf32 on the tensor cores
    env = os.environ.get("MAMBA_JAX_DECODE_GEMV_TILES")
    bn, bk, splits, stages = (int(v) for v in env.split(",")) if env else DECODE_TILES
    while splits > 1 and k % (bk * splits):  # smaller models: fewer K splits
        splits //= 2
    if gemv_unsupported(-(-b // ROW_PAD) * ROW_PAD, k, n, bn=bn, bk=bk, splits=splits):
        return None
    return dict(bn=bn, bk=bk, splits=splits, stages=stages)
