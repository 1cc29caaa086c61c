"""Training throughput of a recipe on mock data: tokens/s, MFU (6·N·tokens/s over the chip's bf16 peak) and
peak memory, for one or more (batch, remat) variants, using the same jitted step as `python -m mamba_jax.train`.

  python benchmarks/train.py --recipe experiments/mamba2_130m.py --batch 8 --steps 20 [--remat none,full]
      [--fp8 off,0]
      [--seq-len 4096] [--out benchmarks/results/train_mamba2_130m.json] [--profile DIR]

Prints a table and writes JSON (device, versions, git revision, the command, each variant's numbers).
Step time is the median over the timed steps after two warm-up (compile) steps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from bench_util import git_revision
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mamba_jax import config as mjc
from mamba_jax.data import DataConfig, make_dataset
from mamba_jax.parallel import init_model, make_mesh, use_mesh
from mamba_jax.train.config import OptimConfig, TrainConfig
from mamba_jax.train.metrics import peak_flops, peak_memory_bytes
from mamba_jax.train.optim import make_optimizer, schedule
from mamba_jax.train.state import init_state, make_train_step


def run_variant(
    c, *, batch: int, micro: int | None, remat: str, steps: int, seq_len: int, profile: str | None, fp8: str = "off"
):
    """One (batch, micro batch, remat, fp8) variant: `fp8` is "off" or N (fp8 with the first and last N
    layers in bf16, train.fp8 / train.fp8_bf16_layers)."""
    model_cfg = mjc.model_config(c)
    mesh = make_mesh(mjc.mesh_config(c))
    rules = mjc.sharding_rules(c)
    tcfg = TrainConfig(
        **{**c.train.to_dict(), "steps": 1000, "global_batch_size": batch, "micro_batch_size": micro, "remat": remat,
           "fp8": fp8 != "off", "fp8_bf16_layers": 0 if fp8 == "off" else int(fp8)}
    )  # fmt: skip
    ocfg = OptimConfig(**c.optim.to_dict())
    accum = tcfg.accumulation_steps(mesh.shape["data"] * mesh.shape["fsdp"])
    data_cfg = DataConfig.from_dict({**c.data.to_dict(), "kind": "mock", "seq_len": seq_len})
    data = make_dataset(data_cfg, split="train", global_batch_size=batch, vocab_size=model_cfg.vocab_size)
    batch_sharding = NamedSharding(mesh, mjc_batch_spec(rules))
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, *mjc_batch_spec(rules)))
    with use_mesh(mesh, rules):
        model = init_model(model_cfg, mesh=mesh, rules=rules, seed=0)
        graphdef, params = nnx.split(model)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        tx = make_optimizer(ocfg, params, tcfg.steps)
        state = jax.jit(lambda p: init_state(p, tx, 0, False))(params)
        del model, params
        step_fn = jax.jit(
            make_train_step(
                graphdef, tx, tcfg, accum=accum, dynamic_scale=False, schedule=schedule(ocfg, tcfg.steps),
                micro_sharding=micro_sharding,
            ),
            donate_argnums=0,
        )  # fmt: skip
        batches = [{k: jax.device_put(np.asarray(v), batch_sharding) for k, v in next(data).items()} for _ in range(4)]
        t0 = time.perf_counter()
        for i in range(2):  # compile + one warm step
            state, metrics = step_fn(state, batches[i % 4])
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(steps):
            if profile and i == 2:
                jax.profiler.start_trace(profile)
            t = time.perf_counter()
            state, metrics = step_fn(state, batches[i % 4])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
            if profile and i == 4:
                jax.profiler.stop_trace()
        loss = float(metrics["loss"])
    step_s = statistics.median(times)
    tokens_per_s = batch * seq_len / step_s
    peak = peak_flops()
    mem = peak_memory_bytes()
    return {
        "batch": batch,
        "micro_batch": micro or batch,
        "remat": remat,
        "fp8": fp8,
        "seq_len": seq_len,
        "params": n_params,
        "compile_and_warmup_s": compile_s,
        "step_time_median_s": step_s,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "tokens_per_s": tokens_per_s,
        "mfu_6N": 6 * n_params * tokens_per_s / (peak * jax.device_count()) if peak else None,
        "peak_memory_gib": mem / 2**30 if mem is not None else None,
        "final_loss": loss,
    }


def mjc_batch_spec(rules):
    from mamba_jax.parallel.sharding import logical_to_spec

    return logical_to_spec(("batch", None), rules)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--batch", default="8", help="comma-separated global batch sizes")
    p.add_argument("--micro", default="", help="comma-separated micro batch sizes (empty: no accumulation)")
    p.add_argument("--remat", default="none", help="comma-separated: none, full, selective")
    p.add_argument("--fp8", default="off", help="comma-separated: off, or N = fp8 with the first / last N layers bf16")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--set", action="append", default=[], help="model overrides key=value (e.g. ssd_impl=xla)")
    p.add_argument("--out", default="")
    p.add_argument("--profile", default="")
    args = p.parse_args()

    c = mjc.load_config(args.recipe)
    with c.unlocked():
        for kv in args.set:
            k, v = kv.split("=", 1)
            old = c.model[k]
            c.model[k] = (
                (v.lower() in ("1", "true")) if isinstance(old, bool) else type(old)(v) if old is not None else v
            )
        c.mesh.tensor = 1
        c.mesh.data = -1
    results = []
    micros = [int(m) for m in args.micro.split(",")] if args.micro else [None]
    for batch in [int(b) for b in args.batch.split(",")]:
        for remat in args.remat.split(","):
            for micro, fp8 in itertools.product(micros, args.fp8.split(",")):
                try:
                    r = run_variant(
                        c, batch=batch, micro=micro, remat=remat, steps=args.steps, seq_len=args.seq_len,
                        profile=args.profile or None, fp8=fp8,
                    )  # fmt: skip
                except Exception as e:  # out of memory at large batches: record it and go on
                    r = {"batch": batch, "micro_batch": micro or batch, "remat": remat, "fp8": fp8,
                         "error": str(e)[:500]}  # fmt: skip
                results.append(r)
                print(json.dumps(r), flush=True)
    print(f"\n{args.recipe} on {jax.devices()[0].device_kind}, seq {args.seq_len}")
    print(f"{'batch':>6} {'micro':>6} {'remat':>10} {'fp8':>4} {'tok/s':>10} {'MFU':>7} {'step ms':>9} {'mem GiB':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['batch']:>6} {r['micro_batch']:>6} {r['remat']:>10} {r['fp8']:>4}  failed: {r['error'][:60]}")
            continue
        mfu = f"{100 * r['mfu_6N']:.1f}%" if r["mfu_6N"] else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(
            f"{r['batch']:>6} {r['micro_batch']:>6} {r['remat']:>10} {r['fp8']:>4} {r['tokens_per_s']:>10,.0f} "
            f"{mfu:>7} {1000 * r['step_time_median_s']:>9.1f} {mem:>8}"
        )
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        record = {
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "device": jax.devices()[0].device_kind,
            "device_count": jax.device_count(),
            "jax": jax.__version__,
            "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
            "git_revision": git_revision(),
            "recipe": args.recipe,
            "results": results,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
