"""Batch-1 decode tokens/s of Mamba2-2.7B over the fraction of out_proj's weight the step kernel prefetches
into L2 (`mamba_jax.kernels.decode.PREFETCH_FRACTION`, overridden through MAMBA_JAX_DECODE_PREFETCH at trace
time). Two rounds, the second in reverse order, each fraction compiled afresh (the Engine caches its loop).

    python benchmarks/prefetch_sweep.py > sweep.txt     # one JSON line per (round, fraction), then the means
"""

from __future__ import annotations

import json
import os
import statistics

import jax
import numpy as np
from generate import model_for, time_generate

import mamba_jax.inference.engine as engine_mod

FRACTIONS = [0, 0.15, 0.3, 0.45]


def main() -> None:
    model = model_for("mamba2_2_7b")
    prompts = [np.random.default_rng(0).integers(1, model.cfg.vocab_size, 128).tolist()]
    res: dict = {}
    for rnd, order in enumerate([FRACTIONS, FRACTIONS[::-1]]):
        for f in order:
            os.environ["MAMBA_JAX_DECODE_PREFETCH"] = str(f)
            engine_mod._generate_fn.cache_clear()  # a fresh trace reads the variable again
            jax.clear_caches()
            eng = engine_mod.Engine(model, state_dtype="bfloat16", decode_impl="auto")
            t_one, _ = time_generate(eng, prompts, 1, reps=5)
            t_full, _ = time_generate(eng, prompts, 256, reps=5)
            tps = 255 / (t_full - t_one)  # as generate.py: prefill and launch overheads cancel
            res.setdefault(str(f), []).append(tps)
            print(json.dumps({"round": rnd, "prefetch": f, "tok_s": tps}), flush=True)
    print(json.dumps({k: statistics.mean(v) for k, v in res.items()}))


if __name__ == "__main__":
    main()
