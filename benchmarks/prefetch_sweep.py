"""Batch-1 decode tokens/s of Mamba2-2.7B over the fraction of out_proj's weight the step kernel prefetches
into L2 (`mamba_jax.kernels.decode.PREFETCH_FRACTION`, overridden through MAMBA_JAX_DECODE_PREFETCH at trace
time). Two rounds, the second in reverse order, each fraction compiled afresh (decode_variants.run_variant;
`decode_variants.py` runs such sweeps over any of the decode knobs).

    python benchmarks/prefetch_sweep.py > sweep.txt     # one JSON line per (round, fraction), then the means
"""

from __future__ import annotations

import json
import statistics

import numpy as np
from decode_variants import run_variant
from generate import model_for

FRACTIONS = [0, 0.15, 0.3, 0.45]


def main() -> None:
    model = model_for("mamba2_2_7b")
    prompts = [np.random.default_rng(0).integers(1, model.cfg.vocab_size, 128).tolist()]
    res: dict = {}
    for rnd, order in enumerate([FRACTIONS, FRACTIONS[::-1]]):
        for f in order:  # each fraction compiled afresh; tokens/s as generate.py counts them
            tps = run_variant(model, prompts, {"MAMBA_JAX_DECODE_PREFETCH": str(f)}, new_tokens=256, reps=5)
            res.setdefault(str(f), []).append(tps)
            print(json.dumps({"round": rnd, "prefetch": f, "tok_s": tps}), flush=True)
    print(json.dumps({k: statistics.mean(v) for k, v in res.items()}))


if __name__ == "__main__":
    main()
