"""Does the megakernel compute the model's decode step? One token of `megakernel_probe.cu` (mode 5, checked bit for
bit against the probe's own separate-kernel reference) on a real model's layers, against
`mamba_jax.inference.megakernel.reference_step` — the kernel's arithmetic in JAX, which tests/test_megakernel.py
checks against the model's decode.

    python benchmarks/megakernel_check.py [--layers 8] [--prompt-len 37] [--out results/megakernel_check_h100.json]
    python benchmarks/megakernel_check.py --dry-run --dir /tmp/mk   # only write the probe's input files

A Mamba2-2.7B-shaped model (experiments/mamba2_2_7b.py, its first LAYERS layers, random weights with the norms'
weights away from one), a random prompt prefilled by the model, then its layers and caches packed
(`megakernel.pack`, `kernel_cache`) and written with the next token's embedding as raw arrays; the probe loads
them (--load), decodes the token at position PROMPT_LEN and writes the residual, states and conv ring after it
(--dump). The kernel sums in another order than XLA, so it cannot equal `reference_step` (bf16) bit for bit;
each of the three must be as close to the truth (`reference_step` on the same bf16 weights and caches, float32
after) as the bf16 reference is. Needs nvcc and a Hopper GPU (not for --dry-run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from bench_util import provenance, write_result
from flax import nnx
from megakernel_probe import nvcc

import mamba_jax.config as mjc
from mamba_jax.inference import megakernel as mk
from mamba_jax.models.stack import Block, unstack_layers
from mamba_jax.parallel import init_model

HERE = os.path.dirname(os.path.abspath(__file__))


def build_inputs(layers: int, prompt_len: int, seed: int = 0):
    """(model, packed params, kernel cache, the next token's residual, its position)."""
    cfg = mjc.model_config(mjc.load_config(os.path.join(HERE, "..", "experiments", "mamba2_2_7b.py")))
    cfg = cfg.replace(pattern=cfg.pattern[:layers], dtype="bfloat16", param_dtype="float32", decode_impl="xla")
    model = init_model(cfg, seed=seed)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 4 * layers))
    for _, block in nnx.iter_graph(model):  # the model's own (stacked) arrays; folded into the projections by pack
        if isinstance(block, Block):
            for var in (block.norm.weight, block.mixer.norm):
                var[...] = 1 + 0.2 * jax.random.normal(next(keys), var[...].shape, var[...].dtype)
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, cfg.vocab_size, (1, prompt_len + 1)), jnp.int32)
    view = unstack_layers(model)
    _, caches = jax.jit(lambda i: view.prefill(i, seq_idx=jnp.ones_like(i), cache_len=prompt_len + 1))(ids[:, :-1])
    rings = mk.ring_caches(caches, prompt_len, cfg.mamba_d_conv)
    h = model._embed(ids[:, -1])[0].astype(jnp.float32)
    return model, mk.pack(model), mk.kernel_cache(rings), h, prompt_len


def write_inputs(d: str, params, cache, h) -> None:
    arrays = {**params._asdict(), "ring": cache.ring, "state": cache.state, "h": h}
    for name, a in arrays.items():
        np.asarray(jax.device_get(a)).tofile(os.path.join(d, f"{name}.bin"))  # bf16 as its 2 bytes


def compare(d: str, model, params, cache, h, pos) -> dict:
    """The probe's outputs in `d` (h, state, ring .out.bin) against the bf16 reference and the truth."""
    f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)  # noqa: E731
    eps = model.cfg.norm_eps
    # on the CPU: XLA's GPU fusions kept float32 where the reference rounded to bf16 with astype round trips
    # (excess precision; it uses reduce_precision since 249cb52)
    params, cache, h = jax.device_put((params, cache, h), jax.devices("cpu")[0])
    ref = jax.jit(mk.reference_step, static_argnames="eps")
    want_h, want = ref(params, cache, h, pos, eps=eps)
    true_h, true = ref(f32(params), f32(cache), h, pos, eps=eps)
    got = {"h": np.fromfile(os.path.join(d, "h.out.bin"), np.float32)}
    for name in ("state", "ring"):
        raw = np.fromfile(os.path.join(d, f"{name}.out.bin"), jnp.bfloat16)
        got[name] = raw.reshape(getattr(want, name).shape).astype(np.float32)
    want = {"h": want_h, "state": want.state, "ring": want.ring}
    true = {"h": true_h, "state": true.state, "ring": true.ring}
    row = {"ok": True}
    for name, g in got.items():
        w, x = (np.asarray(a[name], np.float32) for a in (want, true))
        err = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
        row[f"{name}_err_kernel"], row[f"{name}_err_reference"] = err(g, x), err(w, x)
        row[f"{name}_kernel_vs_reference"] = err(g, w)
        row["ok"] &= err(g, x) <= 2 * err(w, x) + 1e-3
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=37)
    ap.add_argument("--dir", default="", help="where the probe's input and output files go (default: a temp dir)")
    ap.add_argument("--dry-run", action="store_true", help="write the input files only")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    d = args.dir or tempfile.mkdtemp()
    os.makedirs(d, exist_ok=True)
    model, params, cache, h, pos = build_inputs(args.layers, args.prompt_len)
    write_inputs(d, params, cache, h)
    print(f"inputs for {args.layers} layers at position {pos} in {d}", flush=True)
    if args.dry_run:
        return
    binary = os.path.join(tempfile.mkdtemp(), "megakernel_probe")
    subprocess.run([nvcc(), "-O3", "-std=c++17", "-arch=sm_90a", "--fmad=false", "-o", binary,
                    os.path.join(HERE, "megakernel_probe.cu")], check=True)  # fmt: skip
    run = [binary, "--layers", str(args.layers), "--tokens", "0", "--check-tokens", "1", "--pos", str(pos),
           "--configs", "5:40960:5:2", "--load", d, "--dump", d]  # fmt: skip
    proc = subprocess.run(run, capture_output=True, text=True)
    print(proc.stdout, proc.stderr, sep="\n", flush=True)
    if proc.returncode:
        sys.exit(f"megakernel_probe failed ({proc.returncode})")
    row = {"layers": args.layers, "position": pos, "probe": proc.stdout.strip().splitlines()}
    row.update(compare(d, model, params, cache, h, pos))
    print(row, flush=True)
    write_result(args.out, {**provenance(), **row})
    sys.exit(0 if row["ok"] else 1)


if __name__ == "__main__":
    main()
