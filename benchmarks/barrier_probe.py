"""Probe: does a persistent kernel's weight stream survive grid barriers between dependent phases?

The second gate before a decode megakernel (the first, `stream_probe.py`: one launch streams 64 2.7B layers'
projection weights at ≈ 2.4–2.6 TB/s, ≈ 31 µs per layer at batch 1). A megakernel's phases depend on each
other (in_proj → SSM step → out_proj → next in_proj), so every program must wait at a grid barrier before it
reads a phase's input; what it need not wait for is the next phase's *weights*. Here one launch of one
program per SM runs 2·L phases (per layer in_proj, then out_proj, 2.7B shapes, batch 1 padded to 8 rows),
each phase's (column tile, K step) boxes cut into equal ranges per program (stream-K: a program writes the
partial of every tile it touches into its own slot; the slots sum to the product). Three warpgroups: one
streams weight boxes through the TMA ring without ever waiting at a barrier, one loads each box's input slab
and waits at the grid barrier before a phase's first, one runs the transposed wgmma per box and, after a
phase's results are stored, arrives at the barrier. The barrier: one global semaphore counting arrivals
(program 0 waits for all of them, decrementing) and one release counter the others poll.

    python benchmarks/barrier_probe.py [--layers 64] [--configs 128:6,128:8] --out results/barrier_probe_h100.json
    python benchmarks/barrier_probe.py --barriers none,flat --step none,flat   # + a state phase between them

Prints the read ceiling (torch), then one JSON line per variant: XLA's GEMVs, `stream_probe.stream` (no
phases), and per config (bk : stages) this kernel per barrier kind — "none", "arrive" (the arrivals alone,
nobody waits), "sys" / "gpu" (the full barrier with the semaphores' atomics at system or GPU scope),
"flat" (no release counter: every program polls the arrivals counter itself, one round trip), "res_none" /
"res_sys" / "res_flat" (both inputs resident in shared memory, loaded once, the barrier waited in the compute
warpgroup: the barrier without the input loads behind it) — µs per layer and weight bytes / time. The
inputs stay fixed (the barrier orders nothing the products read), so this measures what the barriers cost
the stream, not a dependent chain's numerics; results are checked against XLA. The barrier kinds with
semaphores need the GPU (Mosaic's interpreter cannot run them; "none" and "res_none" run there). `--step`
repeats the given kinds (none, flat) with a third phase per layer between the projections, a stand-in for the
SSM step: program h < 80 loads head h's (64, 128) bf16 state and in_proj's tile of its columns, scales the
state and stores it (no weights; the weight warpgroup streams out_proj's meanwhile).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from bench_util import timed
from jax import lax
from stream_probe import BN, ROWS, Probe, probe_args, stream

from mamba_jax.kernels.gemv import _swizzle

F32, BF16 = jnp.float32, jnp.bfloat16
STEP_P, STEP_N = 64, 128  # the state phase's block per head: Mamba2-2.7B's head dim and state size


def stream_slots(tiles: int, nb: int, programs: int) -> int:
    """Partial slots of a phase: the most programs whose equal box ranges meet in one column tile."""
    total = tiles * nb
    owner = lambda g: ((g + 1) * programs + total - 1) // total - 1  # noqa: E731 (the kernel's formula)
    return max(owner((j + 1) * nb - 1) - owner(j * nb) + 1 for j in range(tiles))


@functools.cache
def _build(layers, k1, n1, n2, programs, bk, stages, barrier, step, interpret):
    nbs = (k1 // bk, 2 * k1 // bk)  # boxes per column tile: in_proj (K1 deep), out_proj (K2 = 2·K1)
    tiles = (n1 // BN, n2 // BN)
    totals = (tiles[0] * nbs[0], tiles[1] * nbs[1])
    slots = tuple(stream_slots(tiles[ph], nbs[ph], programs) for ph in (0, 1))
    per = 3 if step else 2  # phases per layer: in_proj, [the state phase,] out_proj
    phases = per * layers
    heads = 2 * k1 // STEP_P  # the state phase: one (P, N) state block per head (Mamba2: d_inner / head dim)
    kinds = ("none", "arrive", "sys", "gpu", "flat", "res_none", "res_sys", "res_flat")
    if barrier not in kinds:
        raise ValueError(f"barrier={barrier!r}: one of {kinds}")
    # "res_*": both inputs resident in shared memory (loaded once), the barrier waited in the compute warpgroup:
    # what the barrier costs without the loads behind it
    resident = barrier.startswith("res_")
    barrier = barrier.removeprefix("res_")
    waits = barrier in ("sys", "gpu", "flat")  # "arrive": the arrivals alone, nobody waits
    scope = "gpu" if barrier == "gpu" else "sys"  # the semaphores' memory scope (Pallas's default is sys)
    flat = barrier == "flat"  # every program polls the arrivals itself: one round trip, no release counter
    if step and (resident or barrier not in ("none", "flat")):
        # the centralised barrier would have two warpgroups of program 0 taking arrivals (they could steal them)
        raise ValueError(f"the state phase runs with barrier none or flat, not {barrier!r}")

    def owner(g, ph):  # the program whose box range of phase ph holds box g
        return ((g + 1) * programs + totals[ph] - 1) // totals[ph] - 1

    def epoch_of(l, ph):  # the phase number of in_proj (ph 0) / out_proj (ph 1) of layer l
        return per * l + (per - 1) * ph

    def kernel(*refs):
        x1_ref, x2_ref, w1_ref, w2_ref = refs[:4]
        st_ref, refs = (refs[4], refs[5:]) if step else (None, refs[4:])
        y1_ref, y2_ref = refs[:2]
        st_out, refs = (refs[2], refs[3:]) if step else (None, refs[2:])
        w_s, x_s, o_s, z_s, loaded, consumed, *extra = refs
        xready = extra[:1] if resident else ()
        st_s, yt_s, st_ready = extra[-3:] if step else (None, None, None)
        p, wg = lax.axis_index("p"), lax.axis_index("wg")
        ranges = [(p * totals[ph] // programs, (p + 1) * totals[ph] // programs) for ph in (0, 1)]
        counts = [e - s for s, e in ranges]
        per_layer = counts[0] + counts[1]
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR((2,)))  # [arrivals, releases]

        def boxes(l, ph, body):
            """body(i, g, kb, tile): the program's boxes of phase ph of layer l; i counts the ring's boxes."""
            (s, e), nb = ranges[ph], nbs[ph]
            base = l * per_layer + (counts[0] if ph else 0)

            @pl.loop(s, e)
            def _(g):
                body(base + g - s, g, lax.rem(g, nb), g // nb)

        def slot_of(i):
            return lax.rem(i, jnp.asarray(stages, i.dtype))

        def grid_barrier(epoch):  # program 0 takes the phase's arrivals and releases; all wait for the release
            if flat:  # the arrivals only grow during the launch: phase `epoch` begins at programs × epoch
                plgpu.semaphore_wait(sem.at[0], programs * epoch, decrement=False, memory_scope=scope)
                return

            @pl.when(p == 0)
            def _():
                plgpu.semaphore_wait(sem.at[0], programs, memory_scope=scope)
                plgpu.semaphore_signal(sem.at[1], 1, memory_scope=scope)

            plgpu.semaphore_wait(sem.at[1], epoch, decrement=False, memory_scope=scope)

        def release_reset():  # after the last phase's arrivals: the release counter back to 0 for the next launch
            if flat:  # all arrivals in (so every wait passed): take them all back at once

                @pl.when(p == 0)
                def _():
                    plgpu.semaphore_wait(sem.at[0], programs * phases, memory_scope=scope)

                return

            @pl.when(p == 0)
            def _():
                plgpu.semaphore_wait(sem.at[0], programs, memory_scope=scope)
                plgpu.semaphore_signal(sem.at[1], -(phases - 1), memory_scope=scope)

        @pl.when(wg == 1)
        def _weights():  # never waits at a grid barrier: the next phase's weights stream while others finish
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, layers)
            def _(l):
                for ph, w_ref in ((0, w1_ref), (1, w2_ref)):
                    k = k1 * (ph + 1)

                    def load(i, g, kb, tile, w_ref=w_ref, k=k):
                        slot = slot_of(i)

                        @pl.when(i >= stages)
                        def _():
                            plgpu.barrier_wait(consumed.at[slot])

                        src = w_ref.at[pl.ds(l * k + kb * bk, bk), pl.ds(tile * BN, BN)]
                        plgpu.copy_gmem_to_smem(src, w_s.at[slot], loaded.at[2 * slot])

                    boxes(l, ph, load)

            @pl.loop(jnp.maximum(layers * per_layer - stages, 0), layers * per_layer)
            def _drain(i):  # every release must be awaited
                plgpu.barrier_wait(consumed.at[slot_of(i)])

        if resident:

            @pl.when(wg == 2)
            def _resident_inputs():
                plgpu.set_max_registers(40, action="decrease")
                for kb in range(nbs[0] + nbs[1]):
                    src = x1_ref if kb < nbs[0] else x2_ref
                    cols = pl.ds((kb if kb < nbs[0] else kb - nbs[0]) * bk, bk)
                    plgpu.copy_gmem_to_smem(src.at[:, cols], x_s.at[kb], xready[0].at[0])

        else:

            @pl.when(wg == 2)
            def _inputs():  # a phase's input slabs only after every program stored the phase before
                plgpu.set_max_registers(40, action="decrease")

                @pl.loop(0, layers)
                def _(l):
                    for ph, x_ref in ((0, x1_ref), (1, x2_ref)):
                        epoch = epoch_of(l, ph)
                        if waits:

                            @pl.when(epoch > 0)
                            def _(epoch=epoch):
                                grid_barrier(epoch)

                        def load(i, g, kb, tile, x_ref=x_ref):
                            slot = slot_of(i)

                            @pl.when(i >= stages)
                            def _():
                                plgpu.barrier_wait(consumed.at[slot])

                            plgpu.copy_gmem_to_smem(
                                x_ref.at[:, pl.ds(kb * bk, bk)], x_s.at[slot], loaded.at[2 * slot + 1]
                            )

                        boxes(l, ph, load)

                @pl.loop(jnp.maximum(layers * per_layer - stages, 0), layers * per_layer)
                def _drain(i):  # this warpgroup waits on the releases too: it must see every one
                    plgpu.barrier_wait(consumed.at[slot_of(i)])

                if waits:
                    release_reset()
                elif barrier == "arrive":  # nobody waited: take all arrivals back at the end

                    @pl.when(p == 0)
                    def _():
                        plgpu.semaphore_wait(sem.at[0], programs * phases, memory_scope=scope)

        def state_phase(l):
            """A stand-in for the SSM step between the projections: after in_proj's barrier, program h < heads
            loads head h's (P, N) bf16 state and in_proj's tile of its columns, scales the state, stores it
            (no weights: the weight warpgroup streams out_proj's meanwhile), and arrives."""
            if waits:
                grid_barrier(epoch_of(l, 0) + 1)

            @pl.when(p < heads)
            def _():
                plgpu.copy_gmem_to_smem(st_ref.at[l, p], st_s, st_ready.at[0])
                plgpu.copy_gmem_to_smem(y1_ref.at[l, 0, pl.ds(p * BN, BN)], yt_s, st_ready.at[0])
                plgpu.barrier_wait(st_ready.at[0])
                st_s[...] = (st_s[...].astype(F32) * 0.99).astype(BF16)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(st_s, st_out.at[l, p])

            if barrier != "none":
                plgpu.wait_smem_to_gmem(0)
                plgpu.semaphore_signal(sem.at[0], 1, memory_scope=scope)

        @pl.when(wg == 0)
        def _compute():
            z_s[...] = jnp.zeros((BN, ROWS), F32)
            if resident:
                plgpu.barrier_wait(xready[0].at[0])  # one arrival per slab

            @pl.loop(0, layers)
            def _(l):
                for ph, y_ref in ((0, y1_ref), (1, y2_ref)):
                    (s, e), nb = ranges[ph], nbs[ph]
                    base = l * per_layer + (counts[0] if ph else 0)
                    if resident and waits:

                        @pl.when(epoch_of(l, ph) > 0)
                        def _(ph=ph):
                            grid_barrier(epoch_of(l, ph))

                    @pl.loop(s // nb, (e - 1) // nb + 1)
                    def _tile(j, ph=ph, y_ref=y_ref, s=s, e=e, nb=nb, base=base):
                        lo, hi = jnp.maximum(s, j * nb), jnp.minimum(e, (j + 1) * nb)

                        def run(acc):
                            @pl.loop(lo, hi)
                            def _box(g):
                                slot = slot_of(base + g - s)
                                plgpu.barrier_wait(loaded.at[2 * slot])
                                if resident:  # the slab of this box's K step, resident since the start
                                    x_tile = x_s.at[lax.rem(g, nb) + (nbs[0] if ph else 0)]
                                else:
                                    plgpu.barrier_wait(loaded.at[2 * slot + 1])
                                    x_tile = x_s.at[slot]
                                plgpu.wgmma(acc, w_s.at[slot].transpose((1, 0)), x_tile.transpose((1, 0)))
                                plgpu.wgmma_wait(0)
                                plgpu.barrier_arrive(consumed.at[slot])

                            return acc[...]

                        out = pl.run_scoped(run, plgpu.ACC((BN, ROWS), F32))
                        plgpu.wait_smem_to_gmem(0)  # the previous tile's store out of o_s
                        o_s[...] = out
                        plgpu.commit_smem()
                        cols, first, last = pl.ds(j * BN, BN), owner(j * nb, ph), owner((j + 1) * nb - 1, ph)
                        plgpu.copy_smem_to_gmem(o_s, y_ref.at[l, p - first, cols])
                        for sl in range(1, slots[ph]):  # the tile's last program zeroes the slots left unfilled

                            @pl.when((p == last) & (sl > last - first))
                            def _(sl=sl):
                                plgpu.copy_smem_to_gmem(z_s, y_ref.at[l, sl, cols])

                    if barrier != "none":  # this phase's results stored (not just read out of SMEM): arrive
                        plgpu.wait_smem_to_gmem(0)
                        plgpu.semaphore_signal(sem.at[0], 1, memory_scope=scope)
                    if step and ph == 0:
                        state_phase(l)

            plgpu.wait_smem_to_gmem(0)
            if resident and waits:
                release_reset()

    x_slabs = nbs[0] + nbs[1] if resident else stages  # resident: every K step's slab of both inputs
    scratch = [
        plgpu.SMEM((stages, bk, BN), BF16, transforms=_swizzle(BN, BF16)),
        plgpu.SMEM((x_slabs, ROWS, bk), BF16, transforms=_swizzle(bk, BF16)),
        plgpu.SMEM((BN, ROWS), F32),
        plgpu.SMEM((BN, ROWS), F32),
        plgpu.Barrier(num_barriers=2 * stages),
        plgpu.Barrier(num_barriers=stages),
    ]
    if resident:
        scratch.append(plgpu.Barrier(num_arrivals=x_slabs, num_barriers=1))  # (at most 32 barriers per group)
    if step:
        scratch += [
            plgpu.SMEM((STEP_P, STEP_N), BF16, transforms=_swizzle(STEP_N, BF16)),
            plgpu.SMEM((BN, ROWS), F32),
            plgpu.Barrier(num_arrivals=2, num_barriers=1),
        ]
    out_type = (
        jax.ShapeDtypeStruct((layers, slots[0], n1, ROWS), F32),
        jax.ShapeDtypeStruct((layers, slots[1], n2, ROWS), F32),
    )
    if step:
        out_type += (jax.ShapeDtypeStruct((layers, heads, STEP_P, STEP_N), BF16),)
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(programs,),
        grid_names=("p",),
        num_threads=3,
        thread_name="wg",
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=("programs", "bk", "stages", "barrier"))
def phased(x1, x2, w1, w2, state=None, *, programs, bk, stages, barrier):
    """Per layer x1 @ w1[l] then x2 @ w2[l], each a phase of stream-K partials; (L, S1, N1, 8), (L, S2, N2, 8).
    `barrier`: one of `_build`'s kinds (see the module docstring); with `state` (L, H, P, N) the state phase
    runs between the projections and its output comes third."""
    k1, n1, n2 = x1.shape[1], w1.shape[1], w2.shape[1]
    layers = w1.shape[0] // k1
    interpret = None if jax.default_backend() == "gpu" else plgpu.InterpretGPUParams()
    step = state is not None
    args = (x1, x2, w1, w2) + ((state,) if step else ())
    return _build(layers, k1, n1, n2, programs, bk, stages, barrier, step, interpret)(*args)


def main() -> None:
    p = probe_args(argparse.ArgumentParser())
    p.add_argument("--configs", default="128:6,128:8,64:8", help="bk : stages, comma separated")
    p.add_argument("--barriers", default="none,arrive,sys,gpu,res_none,res_sys", help="barrier kinds, comma separated")
    p.add_argument("--step", default="", help="barrier kinds (none, flat) to run again with a state phase between")
    args = p.parse_args()
    run = Probe(args)
    x1, x2, w1, w2, k1 = run.x1, run.x2, run.w1, run.w2, run.k1
    shape = (run.layers, 2 * k1 // STEP_P, STEP_P, STEP_N)
    state = jax.random.normal(jax.random.key(1), shape, F32).astype(BF16) if args.step else None
    conf = dict(programs=run.sms, bk=128, stages=8)
    run.report("stream", timed(functools.partial(stream, **conf), x1, x2, w1, w2, reps=args.reps), config="1:128:8")
    for cfg in args.configs.split(","):
        bk, stages = (int(v) for v in cfg.split(":"))
        # each barrier kind, then those of --step again with the state phase between the projections
        runs = [(b, ()) for b in args.barriers.split(",")] + [(b, (state,)) for b in filter(None, args.step.split(","))]
        for barrier, extra in runs:
            name = "phased+state" if extra else "phased"
            conf = dict(programs=run.sms, bk=bk, stages=stages, barrier=barrier)
            try:
                phased(x1, x2, w1, w2, *extra, **conf)
                y1, y2, *st = phased(x1, x2, w1, w2, *extra, **conf)  # twice: the semaphores must be back at 0
                pairs = ((y1, run.want1), (y2, run.want2))
                err = max(float(jnp.max(jnp.abs(y[-1].sum(0) - want.T))) for y, want in pairs)
                checks = {"max_abs_err_last_layer": err}
                if st:  # the state phase scales each state by 0.99
                    checks["state_err"] = float(jnp.max(jnp.abs(st[0][-1].astype(F32) - state[-1].astype(F32) * 0.99)))
                t = timed(functools.partial(phased, **conf), x1, x2, w1, w2, *extra, reps=args.reps)
                run.report(name, t, config=cfg, barrier=barrier, **checks)
            except Exception as e:
                run.failed(name, e, config=cfg, barrier=barrier)
    run.finish()


if __name__ == "__main__":
    main()
