"""Which GPU kernels one decode step of the generation engine runs, and how long each takes.

    python benchmarks/decode_profile.py [--model mamba2_2_7b] [--batch 1] [--new-tokens 64]
        [--decode-impl auto | xla | pallas] [--xla-option NAME=VALUE] [--out FILE.json]

Random bf16 weights, bf16 SSM states, greedy, prompt 128 (as `generate.py`). Generates `--new-tokens` tokens
under `jax.profiler`, reads the trace back (`jax.profiler.ProfileData`) and lists the kernels on the GPU's
streams by total time, with how many times each ran and its mean duration: a kernel that runs once per
layer and decoded token shows `count` = layers × new tokens (the first token comes from prefill). Times are
the profiler's (a little above an unprofiled run). This is how the decode loop's time splits into weight
GEMVs (at memory bandwidth) and the small per-layer kernels that a fused decode kernel would remove
(benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import collections
import glob
import statistics
import sys
import tempfile

import jax
from bench_util import write_result
from generate import MODELS, _option, model_for

from mamba_jax.inference.engine import Engine, SamplingParams


def kernel_table(trace_dir: str) -> tuple[list[dict], float]:
    """(kernels by total time, total ms) over the GPU planes of the trace under `trace_dir`.

    Each kernel's `gap_us` is the median time from the end of the kernel before it on its stream to its
    start (`after`: the most frequent such predecessor): ≈ 1 µs for back-to-back launches, negative where
    programmatic dependent launch overlaps the two."""
    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    data = jax.profiler.ProfileData.from_file(files[0])
    totals = collections.defaultdict(lambda: [0, 0.0])
    gaps = collections.defaultdict(list)
    after = collections.defaultdict(collections.Counter)
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "Stream" not in line.name and line.name != "Kernels":
                continue
            prev = None
            for ev in sorted(line.events, key=lambda e: e.start_ns):
                t = totals[ev.name]
                t[0] += 1
                t[1] += ev.duration_ns
                if prev is not None:
                    gaps[ev.name].append(ev.start_ns - (prev.start_ns + prev.duration_ns))
                    after[ev.name][prev.name[:60]] += 1
                prev = ev
    rows = []
    for name, (c, ns) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        gap = statistics.median(gaps[name]) / 1e3 if gaps[name] else None
        prev = after[name].most_common(1)[0][0] if after[name] else None
        rows.append({"name": name[:160], "count": c, "total_ms": ns / 1e6, "mean_us": ns / c / 1e3,
                     "gap_us": gap, "after": prev})  # fmt: skip
    return rows, sum(r["total_ms"] for r in rows)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mamba2_2_7b", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--decode-impl", default="auto", choices=("auto", "xla", "pallas"))
    p.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE", help="as generate.py's")
    p.add_argument("--out", default="")
    args = p.parse_args()
    model = model_for(args.model)
    options = dict(_option(o) for o in args.xla_option)
    engine = Engine(model, state_dtype="bfloat16", decode_impl=args.decode_impl, compiler_options=options or None)
    prompts = [[1 + (7 * i + j) % 1000 for j in range(128)] for i in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    engine.generate(prompts, params)  # compile
    trace_dir = tempfile.mkdtemp(prefix="decode_profile_")
    jax.profiler.start_trace(trace_dir)
    engine.generate(prompts, params)
    jax.profiler.stop_trace()
    rows, total_ms = kernel_table(trace_dir)
    print(f"{args.model} batch {args.batch}: {total_ms:.2f} ms of GPU kernels for prefill + {args.new_tokens} tokens")
    print(f"{'count':>7} {'mean µs':>9} {'total ms':>9} {'gap µs':>7}  kernel  (after)")
    for r in rows[: args.top]:
        gap = f"{r['gap_us']:7.2f}" if r["gap_us"] is not None else " " * 7
        print(f"{r['count']:>7} {r['mean_us']:>9.2f} {r['total_ms']:>9.3f} {gap}  {r['name'][:70]}  ({r['after']})")
    write_result(args.out, {"model": args.model, "batch": args.batch, "new_tokens": args.new_tokens,
                            "decode_impl": args.decode_impl,
                            "total_kernel_ms": total_ms, "kernels": rows[:100]})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
