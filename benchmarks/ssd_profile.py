"""Where the fused SSD kernels spend their time: Mosaic GPU's on-device profiler, summarised per stage.

    python benchmarks/ssd_profile.py [--shapes 0,2,4] [--seq-len 1024] [--space 96] [--out FILE.json]

Builds the three kernels (forward with saved states, per-head backward, per-group backward) with
`profile_space` / `profile_dir` set (`kernels.ssd_common.PROFILE`), runs one forward + backward of
`mamba_jax.ssd(impl="pallas")` on the shapes of `benchmarks/ssd.py` (the sequence shortened to --seq-len:
each program's work per block does not depend on the length, and the profile buffer lives in shared memory,
so it holds only the first blocks anyway), and reads the traces the kernels write: one per warpgroup, with
a begin / end time stamp for each `jax.named_scope` stage of the kernels' loops. Prints and writes, per
kernel and stage, the mean time per block and its share of the block; the per-block time is the stages
summed (stages cover the compute warpgroups' loops entirely).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import tempfile

import jax
from bench_util import write_result
from ssd import SHAPES, make_inputs

import mamba_jax
from mamba_jax.kernels import ssd_bwd, ssd_common, ssd_fwd

KERNELS = {"fwd": "forward (+ saved states)", "bh": "backward per head", "bg": "backward per group"}


def stage_times(trace_file):
    """{kernel: {stage: [durations in µs]}} from one trace file (time stamps in µs)."""
    with open(trace_file) as f:
        events = json.load(f)["traceEvents"]
    by_trace = collections.defaultdict(list)
    for e in events:
        by_trace[e["tid"]].append(e)
    stages = collections.defaultdict(lambda: collections.defaultdict(list))
    for evs in by_trace.values():
        open_at = {}
        for e in evs:
            if e["ph"] == "B":
                open_at[e["name"]] = e["ts"]
            elif e["name"] in open_at:
                if "." not in e["name"]:  # a scope jax adds around the body, not one of the stages
                    open_at.pop(e["name"])
                    continue
                kernel, stage = e["name"].split(".", 1)
                stages[kernel][stage].append(e["ts"] - open_at.pop(e["name"]))
    return stages


def _forget_kernels():
    """Drop the built kernels, so that the next call builds them with the current `PROFILE` setting."""
    for build in (ssd_fwd.build_fwd, ssd_bwd.build_bwd_heads, ssd_bwd.build_bwd_groups):
        build.cache_clear()


def profile_shape(shape, chunk, space, trace_dir):
    os.makedirs(trace_dir, exist_ok=True)
    ssd_common.PROFILE.clear()
    ssd_common.PROFILE.update(profile_space=space, profile_dir=trace_dir, profile_bounds_check=True)
    _forget_kernels()
    try:
        inp = make_inputs(shape)
        args = tuple(inp[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias"))

        def fwd(*a):
            return mamba_jax.ssd(*a[:5], chunk_size=chunk, D=a[5], dt_bias=a[6], dt_softplus=True, impl="pallas")

        _, vjp = jax.vjp(fwd, *args)
        jax.block_until_ready(vjp(inp["dy"]))
        jax.effects_barrier()  # the traces are written by a host callback
    finally:
        ssd_common.PROFILE.clear()
        _forget_kernels()
    merged = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in sorted(glob.glob(os.path.join(trace_dir, "*-trace.json"))):
        for kernel, st in stage_times(path).items():
            for name, ds in st.items():
                merged[kernel][name] += ds
    return merged


def summarise(merged):
    out = {}
    for kernel, st in merged.items():
        rows = {name: {"mean_us": statistics.fmean(ds), "count": len(ds)} for name, ds in st.items()}
        # Stages that run once per block: the most frequent count; per-block time = Σ mean × (count / blocks).
        blocks = max(r["count"] for r in rows.values())
        per_block = sum(r["mean_us"] * r["count"] / blocks for r in rows.values())
        for r in rows.values():
            r["us_per_block"] = r["mean_us"] * r["count"] / blocks
            r["share"] = r["us_per_block"] / per_block
        out[kernel] = {"us_per_block": per_block, "stages": rows}
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="0,2,4", help="indices into benchmarks/ssd.py's SHAPES")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--space", type=int, default=96, help="profiled stages per warpgroup (shared memory)")
    p.add_argument("--trace-dir", default="")
    p.add_argument("--out", default="")
    args = p.parse_args()
    trace_root = args.trace_dir or tempfile.mkdtemp(prefix="ssd_profile_")
    results = []
    for i in (int(s) for s in args.shapes.split(",")):
        (b, _, h, pp, g, n), chunk = SHAPES[i]
        shape = (b, args.seq_len, h, pp, g, n)
        print(f"\n== shape {shape} (sequence shortened from {SHAPES[i][0][1]}) chunk {chunk}", flush=True)
        try:
            merged = profile_shape(shape, chunk, args.space, os.path.join(trace_root, f"shape{i}"))
        except Exception as e:  # e.g. the profile buffer does not fit beside the tiles
            print(f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            results.append({"shape": shape, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        summary = summarise(merged)
        for kernel, s in summary.items():
            print(f"{KERNELS.get(kernel, kernel)}: {s['us_per_block']:.2f} µs per block (compute warpgroup)")
            for name, r in sorted(s["stages"].items(), key=lambda kv: -kv[1]["us_per_block"]):
                print(f"  {name:<14} {r['us_per_block']:7.3f} µs  {100 * r['share']:5.1f} %  (n={r['count']})")
        results.append({"shape": shape, "chunk": chunk, "kernels": summary})
    print(f"\ntraces under {trace_root}")
    if args.out:
        write_result(args.out, {"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
