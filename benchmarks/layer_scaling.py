"""One Mamba2 layer against one attention layer, forward + backward, as the sequence grows: the seed's
headline figure (its Mamba2 layer is ≈ 18× faster than attention at 256K tokens).

  python benchmarks/layer_scaling.py [--lengths 2048,8192,32768,131072,262144] [--batch 1]
      [--out benchmarks/results/layer_scaling_h100.json]
  python benchmarks/layer_scaling.py --plot benchmarks/results/layer_scaling_h100.json   # PNG from a JSON
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python benchmarks/layer_scaling.py --lengths 262144 \
      --update benchmarks/results/layer_scaling_h100.json   # re-measure some lengths of a result

Both layers at d_model 4096 with the Mamba2-Hybrid-8B shapes (experiments/hybrid_8b.py): the Mamba2 mixer
(in_proj, conv, SSD scan with our Pallas kernels, gated norm, out_proj; 128 heads of 64, 8 groups, state 128)
and GQA attention (32 query / 8 key-value heads of 128, q/k/v/o projections, cuDNN flash attention, causal),
each with its pre-norm and residual as in the model, bf16. Median of several runs after compile; a length
that runs out of memory is recorded as such (the batch is shrunk by the caller, never silently). At 256K
tokens the Mamba2 layer's forward + backward needs 69 GiB (65 GiB of XLA temporaries: activations and
gradients of the 18,560-wide in_proj output, the kernels' per-block states), more than JAX's default 75 %
preallocation of an 80 GB GPU: run that length with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (recorded in the
result).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bench_util import provenance, timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(lengths, batch, impl):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mamba_jax import config as mjc
    from mamba_jax.models.stack import Block

    cfg = mjc.model_config(mjc.load_config(os.path.join(ROOT, "experiments", "hybrid_8b.py")))
    cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16", ssd_impl=impl, pattern="M*")
    rows = []
    for kind, symbol in (("mamba2", "M"), ("attention", "*")):
        block = Block(cfg, symbol, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(block)

        def loss(st, x, gd=graphdef):
            return nnx.merge(gd, st)(x).astype(jnp.float32).mean()

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        for length in lengths:
            x = jax.random.normal(jax.random.key(length), (batch, length, cfg.d_model), jnp.bfloat16)
            row = {"layer": kind, "batch": batch, "seq_len": length}
            try:
                row["fwd_bwd_ms"] = 1000 * timed(step, state, x, reps=10 if length <= 32768 else 4)
            except Exception as e:  # out of memory is a result here, not a failure
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            del x
    return rows


def plot(result: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("mamba2", "o-"), ("attention", "s-")):
        pts = [(r["seq_len"], r["fwd_bwd_ms"]) for r in result["rows"] if r["layer"] == kind and "fwd_bwd_ms" in r]
        ax.loglog(*zip(*pts, strict=True), style, label=f"{kind} layer", base=2)
    ax.set_xlabel("sequence length (tokens, batch 1)")
    ax.set_ylabel("forward + backward (ms)")
    last = max(r["seq_len"] for r in result["rows"])
    ratio = result.get("speedup_at", {}).get(str(last))
    title = f"d_model 4096, bf16, {result['device']}"
    ax.set_title(title + (f"\nMamba2 {ratio:.1f}× faster at {last // 1024}K" if ratio else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="2048,8192,32768,131072,262144")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--impl", default="pallas", help="SSD implementation of the Mamba2 layer")
    p.add_argument("--out", default="")
    p.add_argument("--plot", default="", help="only draw the PNG of an existing JSON result")
    p.add_argument("--update", default="", help="replace the rows of --lengths in this JSON result (and its PNG)")
    args = p.parse_args()
    if args.plot:
        with open(args.plot) as f:
            plot(json.load(f), args.plot.removesuffix(".json") + ".png")
        return 0
    import jax

    rows = measure([int(n) for n in args.lengths.split(",")], args.batch, args.impl)
    mem_fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    for r in rows:
        r["mem_fraction"] = float(mem_fraction) if mem_fraction else 0.75
    earlier = {}
    if args.update:
        with open(args.update) as f:
            old = json.load(f)
        new = {(r["layer"], r["seq_len"]) for r in rows}
        rows = sorted([r for r in old["rows"] if (r["layer"], r["seq_len"]) not in new] + rows,
                      key=lambda r: (r["layer"], r["seq_len"]))  # fmt: skip
        earlier = {"earlier_runs": old.get("earlier_runs", []) + [{k: old.get(k) for k in ("command", "git_revision")}]}
        args.out = args.update
    ms = {(r["layer"], r["seq_len"]): r.get("fwd_bwd_ms") for r in rows}
    speedup = {
        str(n): ms[("attention", n)] / ms[("mamba2", n)]
        for (kind, n) in ms
        if kind == "mamba2" and ms[("mamba2", n)] and ms.get(("attention", n))
    }
    print(f"\n{jax.devices()[0].device_kind}: fwd+bwd of one layer, d_model 4096, batch {args.batch}")
    print(f"{'tokens':>8} {'mamba2 ms':>10} {'attention ms':>13} {'attn / mamba2':>14}")
    for n in sorted({r["seq_len"] for r in rows}):
        m, a = ms[("mamba2", n)], ms[("attention", n)]
        print(
            f"{n:>8} {m or float('nan'):>10.2f} {a or float('nan'):>13.2f} {speedup.get(str(n), float('nan')):>14.1f}"
        )
    result = {**provenance(), **earlier, "rows": rows, "speedup_at": speedup}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        try:
            plot(result, args.out.removesuffix(".json") + ".png")
        except ImportError:
            print("matplotlib missing: draw the PNG later with --plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
