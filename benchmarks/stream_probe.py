"""Probe: how fast can one persistent Mosaic GPU kernel stream a Mamba2 decode step's weights?

The gate before a decode "megakernel" (benchmarks/README.md: at batch 1 the 2.7B's GEMVs alone take 2.1–2.3 ms
of the 2.22 ms that 450 tokens/s allows, because every GEMV launch pays its own ramp and tail). Here one launch
of P programs (a few per SM) streams the in_proj and out_proj weights of L layers through a TMA ring, as a
megakernel's producer warpgroup would, with no grid barrier between the GEMVs (so no chaining: every GEMV
multiplies the same input); the time per layer is the floor of what a megakernel's weight stream could reach.

Work: the layers' column tiles of 64 output features, in_proj's (K1 deep) and out_proj's in two K halves
(K2 = 2·K1, as in Mamba2: expand 2), so every tile is K1 / bk boxes of (bk, 64): tile g of the global list
(layer g // U, U tiles per layer) is program g mod P's. A memory warpgroup TMA-copies each box (and the
(8, bk) slab of the input) into a ring of `stages` slots; a compute warpgroup runs one transposed wgmma per
box, as `kernels/gemv.py` does, and writes each tile's (64, 8) float32 result.

    python benchmarks/stream_probe.py [--layers 64] [--configs 1:128:6,2:128:4] --out results/stream_probe_h100.json

Prints the machine's read ceiling (torch's sum over 1 GiB, when torch is there), then one JSON line per
variant: XLA's GEMVs (one dot per projection, unrolled over the layers, fixed
input) and the persistent stream per config (programs per SM : bk : stages [: how the wgmmas are awaited]
[: tiled, the weights in contiguous column tiles]), µs per layer and weight bytes / time.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from bench_util import provenance, timed, write_result
from jax import lax

from mamba_jax.kernels.gemv import _swizzle  # the shared-memory tiling gemv_t's ring uses

F32, BF16 = jnp.float32, jnp.bfloat16
BN, ROWS = 64, 8  # a tile's output features (wgmma's M); the input's rows (batch 1 padded to wgmma's N)


@functools.cache
def _build(layers, k1, n1, n2, programs, bk, stages, mma, tiled, interpret):
    t1, t2 = n1 // BN, 2 * (n2 // BN)  # in_proj tiles; out_proj half tiles
    per_layer = t1 + t2
    total = layers * per_layer
    nb = k1 // bk  # boxes per tile

    def where(g):
        """Tile g → (is in_proj, layer, column tile, K offset of the half for out_proj)."""
        layer, t = g // per_layer, lax.rem(g, per_layer)
        u = t - t1
        return t < t1, layer, jnp.where(t < t1, t, u // 2), jnp.where(t < t1, 0, lax.rem(u, 2) * k1)

    def kernel(x1_ref, x2_ref, w1_ref, w2_ref, y1_ref, y2_ref, w_s, x_s, o_s, loaded, consumed):
        p, wg = lax.axis_index("p"), lax.axis_index("wg")
        mine = (total - p + programs - 1) // programs
        boxes = mine * nb

        @pl.when(wg == 1)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, boxes)
            def _load(i):
                slot = lax.rem(i, jnp.asarray(stages, i.dtype))
                is_in, layer, tile, koff = where(p + (i // nb) * programs)
                k0 = koff + lax.rem(i, nb) * bk

                @pl.when(i >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                @pl.when(is_in)
                def _():
                    if tiled:  # column tile (layer, tile) is K1 contiguous rows of 64
                        src = w1_ref.at[pl.ds((layer * t1 + tile) * k1 + k0, bk), :]
                    else:
                        src = w1_ref.at[pl.ds(layer * k1 + k0, bk), pl.ds(tile * BN, BN)]
                    plgpu.copy_gmem_to_smem(src, w_s.at[slot], loaded.at[2 * slot])
                    plgpu.copy_gmem_to_smem(x1_ref.at[:, pl.ds(k0, bk)], x_s.at[slot], loaded.at[2 * slot + 1])

                @pl.when(~is_in)
                def _():
                    if tiled:
                        src = w2_ref.at[pl.ds((layer * (n2 // BN) + tile) * 2 * k1 + k0, bk), :]
                    else:
                        src = w2_ref.at[pl.ds(layer * 2 * k1 + k0, bk), pl.ds(tile * BN, BN)]
                    plgpu.copy_gmem_to_smem(src, w_s.at[slot], loaded.at[2 * slot])
                    plgpu.copy_gmem_to_smem(x2_ref.at[:, pl.ds(k0, bk)], x_s.at[slot], loaded.at[2 * slot + 1])

            @pl.loop(jnp.maximum(boxes - stages, 0), boxes)
            def _drain(i):  # every release must be awaited
                plgpu.barrier_wait(consumed.at[lax.rem(i, jnp.asarray(stages, i.dtype))])

        @pl.when(wg == 0)
        def _compute():
            @pl.loop(0, mine)
            def _tile(j):
                def run(acc):
                    def slot_of(i):
                        return lax.rem(i, jnp.asarray(stages, i.dtype))

                    @pl.loop(0, nb)
                    def _box(b):
                        slot = slot_of(j * nb + b)
                        plgpu.barrier_wait(loaded.at[2 * slot])
                        plgpu.barrier_wait(loaded.at[2 * slot + 1])
                        if mma == "none":  # the stream alone: results are zeros
                            plgpu.barrier_arrive(consumed.at[slot])
                            return
                        plgpu.wgmma(acc, w_s.at[slot].transpose((1, 0)), x_s.at[slot].transpose((1, 0)))
                        if mma == "wait0":
                            plgpu.wgmma_wait(0)
                            plgpu.barrier_arrive(consumed.at[slot])
                        else:  # "wait1": one wgmma in flight; the slot before this one is free once it is done
                            plgpu.wgmma_wait(1)

                            @pl.when(b > 0)
                            def _():
                                plgpu.barrier_arrive(consumed.at[slot_of(j * nb + b - 1)])

                    if mma == "wait1":
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(consumed.at[slot_of(j * nb + nb - 1)])
                    return acc[...]

                out = pl.run_scoped(run, plgpu.ACC((BN, ROWS), F32))
                plgpu.wait_smem_to_gmem(0)  # the previous tile's copy out of o_s
                o_s[...] = out
                plgpu.commit_smem()
                is_in, layer, tile, koff = where(p + j * programs)

                @pl.when(is_in)
                def _():
                    plgpu.copy_smem_to_gmem(o_s, y1_ref.at[pl.ds(layer * n1 + tile * BN, BN)])

                @pl.when(~is_in)
                def _():
                    half = koff // k1
                    plgpu.copy_smem_to_gmem(o_s, y2_ref.at[pl.ds((layer * 2 + half) * n2 + tile * BN, BN)])

            plgpu.wait_smem_to_gmem(0)

    scratch = [
        plgpu.SMEM((stages, bk, BN), BF16, transforms=_swizzle(BN, BF16)),
        plgpu.SMEM((stages, ROWS, bk), BF16, transforms=_swizzle(bk, BF16)),
        plgpu.SMEM((BN, ROWS), F32),
        plgpu.Barrier(num_barriers=2 * stages),
        plgpu.Barrier(num_barriers=stages),
    ]
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((layers * n1, ROWS), F32), jax.ShapeDtypeStruct((layers * 2 * n2, ROWS), F32)),
        grid=(programs,),
        grid_names=("p",),
        num_threads=2,
        thread_name="wg",
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=("programs", "bk", "stages", "mma", "tiled"))
def stream(x1, x2, w1, w2, *, programs, bk, stages, mma="wait0", tiled=False):
    """Every layer's x1 @ w1[l] and x2 @ w2[l] in one launch: w1 (L·K1, N1), w2 (L·K2, N2), K2 = 2·K1, x1 (8, K1),
    x2 (8, K2). Returns (L, N1, 8) and (L, 2, N2, 8) float32 (out_proj as two K-half partials). `mma`:
    "wait0" (each wgmma awaited before its slot is released), "wait1" (one wgmma left in flight), "none" (no
    products: the weight stream alone, zeros out). `tiled`: w1, w2 are `tile_columns`'s (L, T·K, 64) layout,
    so every box the kernel loads is one contiguous block."""
    k1 = x1.shape[1]
    if tiled:
        layers, n1, n2 = w1.shape[0], w1.shape[1] // k1 * BN, w2.shape[1] // (2 * k1) * BN
        w1, w2 = w1.reshape(-1, BN), w2.reshape(-1, BN)
    else:
        n1, layers, n2 = w1.shape[1], w1.shape[0] // k1, w2.shape[1]
    assert x2.shape[1] == 2 * k1 and w2.size == layers * 2 * k1 * n2 and n1 % BN == 0 and n2 % BN == 0
    assert k1 % bk == 0, (k1, bk)
    interpret = None if jax.default_backend() == "gpu" else plgpu.InterpretGPUParams()
    y1, y2 = _build(layers, k1, n1, n2, programs, bk, stages, mma, tiled, interpret)(x1, x2, w1, w2)
    return y1.reshape(layers, n1, ROWS), y2.reshape(layers, 2, n2, ROWS)


def tile_columns(w, layers):
    """(L·K, N) → (L, T·K, 64): each layer's column tile t (64 features) as K contiguous rows."""
    k, n = w.shape[0] // layers, w.shape[1]
    return w.reshape(layers, k, n // BN, BN).transpose(0, 2, 1, 3).reshape(layers, -1, BN)


def xla_gemvs(x1, x2, w1s, w2s):
    """The same products as XLA's GEMVs, one dot per projection (batch 1), per-layer (K, N) weights."""
    return [jnp.dot(x1[:1], w) for w in w1s], [jnp.dot(x2[:1], w) for w in w2s]


def read_ceiling() -> float | None:
    """TB/s of torch's sum over 1 GiB of float32 (one long read, vectorised loads on every SM), CUDA-event
    timed, as the machine's read ceiling; None without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    x = torch.ones(1 << 28, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(23):
        start.record()
        x.sum()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del x
    torch.cuda.empty_cache()
    return (1 << 30) / sorted(times)[len(times) // 2] / 1e12


def probe_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments every weight-stream probe takes (this one and `barrier_probe.py`)."""
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--d-model", type=int, default=2560)
    p.add_argument("--n-in", type=int, default=10624, help="in_proj's columns (2.7B: 10,576 padded to 64)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default="")
    return p


class Probe:
    """What the weight-stream probes share: L layers of random 2.7B-shaped bf16 weights (w1 (L·K1, N1) for
    in_proj, w2 (L·K2, N2) for out_proj, K2 = 2·K1) and inputs x1, x2 of ROWS rows; the machine's read ceiling;
    XLA's GEMVs timed on them; and rows reported as JSON lines, --out rewritten after each (what ran so far
    survives a time limit)."""

    def __init__(self, args):
        self.args = args
        self.sms = getattr(jax.devices()[0], "core_count", None) or 132
        L, k1, n1 = self.layers, self.k1, self.n1 = args.layers, args.d_model, args.n_in
        k2, n2 = 2 * k1, k1
        self.weight_bytes = 2 * L * (k1 * n1 + k2 * n2)
        self.head = {"sms": self.sms, "layers": L, "weight_mb_per_layer": self.weight_bytes / L / 1e6}
        self.rows = []
        print(json.dumps(self.head), flush=True)
        if ceiling := read_ceiling():
            self.head["torch_sum_1gib_tb_per_s"] = ceiling
            print(json.dumps({"torch_sum_1gib_tb_per_s": ceiling}), flush=True)
        key = jax.random.split(jax.random.key(0), 4)
        self.w1 = (jax.random.normal(key[0], (L * k1, n1), F32) * 0.02).astype(BF16)
        self.w2 = (jax.random.normal(key[1], (L * k2, n2), F32) * 0.02).astype(BF16)
        self.x1 = jax.random.normal(key[2], (ROWS, k1), F32).astype(BF16)
        self.x2 = jax.random.normal(key[3], (ROWS, k2), F32).astype(BF16)
        w1s, w2s = list(self.w1.reshape(L, k1, n1)), list(self.w2.reshape(L, k2, n2))
        self.report("xla", timed(jax.jit(xla_gemvs), self.x1, self.x2, w1s, w2s, reps=args.reps))
        # the last layer's products in float32, (ROWS, N) each: what the kernels are checked against
        self.want1 = jnp.dot(self.x1.astype(F32), w1s[-1].astype(F32))
        self.want2 = jnp.dot(self.x2.astype(F32), w2s[-1].astype(F32))

    def report(self, name, seconds, **extra):
        self.rows.append({"variant": name, "us_per_layer": seconds / self.layers * 1e6,
                          "tb_per_s": self.weight_bytes / seconds / 1e12, **extra})  # fmt: skip
        print(json.dumps(self.rows[-1]), flush=True)
        self.finish()

    def failed(self, name, error, **extra):
        """A variant that did not compile or run is a result too."""
        self.rows.append({"variant": name, **extra, "error": repr(error)[:400]})
        print(json.dumps(self.rows[-1]), flush=True)

    def finish(self):
        write_result(self.args.out, {**provenance(), **self.head, "rows": self.rows})


def main() -> None:
    p = probe_args(argparse.ArgumentParser())
    p.add_argument("--configs", default="1:128:6,1:128:8,2:128:4,1:256:3,2:64:8",
                   help="per SM : bk : stages [: wait0 | wait1 | none] [: tiled], comma separated")  # fmt: skip
    args = p.parse_args()
    run = Probe(args)
    L, x1, x2, w1, w2 = run.layers, run.x1, run.x2, run.w1, run.w2
    if any(c.endswith(":tiled") for c in args.configs.split(",")):
        w1t, w2t = jax.jit(tile_columns, static_argnums=1)(w1, L), jax.jit(tile_columns, static_argnums=1)(w2, L)
    for cfg in args.configs.split(","):
        per_sm, bk, stages, *more = cfg.split(":")
        mma = next((m for m in more if m != "tiled"), "wait0")
        conf = dict(programs=int(per_sm) * run.sms, bk=int(bk), stages=int(stages), mma=mma, tiled="tiled" in more)
        ws = (w1t, w2t) if conf["tiled"] else (w1, w2)
        try:
            y1, y2 = stream(x1, x2, *ws, **conf)
            err1 = float(jnp.max(jnp.abs(y1[-1, :, 0] - run.want1[0])))
            err = max(err1, float(jnp.max(jnp.abs(y2[-1, :, :, 0].sum(0) - run.want2[0]))))
            run.report("stream", timed(functools.partial(stream, **conf), x1, x2, *ws, reps=args.reps),
                       config=cfg, max_abs_err_last_layer=err)  # fmt: skip
        except Exception as e:
            run.failed("stream", e, config=cfg)
    run.finish()


if __name__ == "__main__":
    main()
