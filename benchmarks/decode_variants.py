"""Decode tokens/s of one model under several trace-time settings, side by side in one process (A/B/A/B).

Each variant is a label and environment settings read when the decode loop is traced (the decode kernels'
MAMBA_JAX_DECODE_* knobs: the out_proj GEMV, its tiles, the L2 prefetch fraction) or XLA options of the
loop (names starting with xla_, as Engine compiler_options) or `quantize` (the Engine's, e.g. quantize=fp8);
the Engine's loop is
compiled afresh for each (its lru cache and jax's caches are cleared). Rounds alternate the order, so a
drift of the machine shows as a difference between rounds rather than between variants.

    python benchmarks/decode_variants.py --model mamba2_2_7b --batch 1 \\
        --variant "xla:MAMBA_JAX_DECODE_GEMV=xla" --variant "pdl:MAMBA_JAX_DECODE_GEMV=mosaic" --out r.json
    python benchmarks/decode_variants.py --model mamba2_2_7b --batch 1 --variant "bf16:" --variant "fp8:quantize=fp8"
    python benchmarks/decode_variants.py --model mamba2_2_7b --batch 1 --variant "loop:" --variant "mk:megakernel=1"

Prints one JSON line per (round, variant) as it goes (a variant that fails to compile or run is kept under
"errors" and the others go on), then writes the means (tokens/s as generate.py counts
them: 255 decode steps, the one-token run subtracted, so prefill and launch overheads cancel).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
import numpy as np
from bench_util import provenance, write_result
from generate import _option, model_for, time_generate

import mamba_jax.inference.engine as engine_mod


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """LABEL:NAME=VALUE;… — environment variables, and XLA options for the loop where NAME starts with xla_."""
    label, _, settings = text.partition(":")
    env = dict(s.split("=", 1) for s in settings.split(";") if s)
    return label, env


def run_variant(model, prompts, settings: dict[str, str], new_tokens: int, reps: int) -> float:
    options = dict(_option(f"{k}={v}") for k, v in settings.items() if k.startswith("xla_"))
    env = {k: v for k, v in settings.items() if not k.startswith("xla_") and k not in ("quantize", "megakernel")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        engine_mod._generate_fn.cache_clear()  # a fresh trace reads the variables again
        jax.clear_caches()
        eng = engine_mod.Engine(model, state_dtype="bfloat16", decode_impl="auto", compiler_options=options or None,
                                quantize=settings.get("quantize"),
                                megakernel=settings.get("megakernel") == "1")  # fmt: skip
        t_one, _, _ = time_generate(eng, prompts, 1, reps=reps)
        t_full, _, _ = time_generate(eng, prompts, new_tokens, reps=reps)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return len(prompts) * (new_tokens - 1) / (t_full - t_one)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mamba2_2_7b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--variant", action="append", required=True, metavar="LABEL:NAME=VALUE;NAME=VALUE")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="")
    a = p.parse_args()
    variants = [parse_variant(v) for v in a.variant]
    model = model_for(a.model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, model.cfg.vocab_size, a.prompt_len).tolist() for _ in range(a.batch)]
    runs: dict[str, list[float]] = {}
    result = {"model": a.model, "batch": a.batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
              "variants": {label: env for label, env in variants}, "tok_s": runs}  # fmt: skip
    for rnd in range(a.rounds):
        for label, env in variants if rnd % 2 == 0 else variants[::-1]:
            try:
                tps = run_variant(model, prompts, env, a.new_tokens, a.reps)
            except Exception as e:  # a variant that does not compile or run: note it, go on with the others
                result.setdefault("errors", {})[label] = f"{type(e).__name__}: {str(e)[:2000]}"
                print(json.dumps({"round": rnd, "variant": label, "error": result["errors"][label][:300]}), flush=True)
                continue
            runs.setdefault(label, []).append(tps)
            print(json.dumps({"round": rnd, "variant": label, "tok_s": round(tps, 1)}), flush=True)
            write_result(a.out, {**provenance(), **result})  # what ran so far survives a time limit
    result["mean_tok_s"] = {k: statistics.mean(v) for k, v in runs.items()}
    print(json.dumps(result["mean_tok_s"]))
    write_result(a.out, {**provenance(), **result})


if __name__ == "__main__":
    main()
