"""Decode throughput of the generation engine against its memory-bandwidth roofline, and mamba_ssm's
`generate(cg=True)` side by side when it can be imported.

  python benchmarks/generate.py --model mamba2_130m,mamba2_2_7b,nemotronh_8b_13l --batch 1,32 \
      [--prompt-len 128 --new-tokens 256] [--state-dtype float32,bfloat16] [--peer]
      [--decode-impl auto,xla,megakernel] [--quantize none,fp8] [--out benchmarks/results/generate_h100.json]

Random weights (throughput does not depend on their values), bf16, greedy. Per (model, batch): time to first
token (prefill of the prompt + first sampled token), decode tokens/s (from runs of 1 and N new tokens, so that
prefill and overheads cancel), and the roofline: every decode step reads all weights once, so tokens/s ≤
batch × bandwidth / weight bytes (the bandwidth measured here: the faster of a device copy and a read-only
sum); at large batches the
states count too (each step reads and writes every SSM state, reads the conv windows and the K / V cache), so
a second roofline adds those bytes. XLA's copy / sum reach only 1.6–2.5 TB/s on the same H100 (varying by
run) where a torch copy reaches 2.93 (benchmarks/gemv_probe.py --torch), so each row also carries the
roofline at a fixed bandwidth for the chip (`nominal`, NOMINAL_BANDWIDTH: PERFORMANCE.md's 2.8 TB/s floor on
an H100, the 4.3 TB/s copy measured on this workplace's H200s), the figure to compare across runs.
`--quantize fp8` serves float8 projection weights (`mamba_jax.inference.quantize`); its rooflines count the
bytes the quantized engine holds.
`--state-dtype` picks the dtype the SSM states are kept in between steps
(mamba_ssm keeps bf16). `nemotronh_8b_13l` is Nemotron-H 8B cut to its first 13 layers.
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
import jax.numpy as jnp
import numpy as np
from bench_util import bandwidth_bytes_per_s, write_result
from flax import nnx

from mamba_jax import config as mjc
from mamba_jax.inference.engine import Engine, SamplingParams, default_options
from mamba_jax.parallel import init_model

# Bytes/s a decode step's weight reads may reach, by chip (device_kind contains the key): PERFORMANCE.md's
# floor for an H100; for an H200 the device-to-device copy measured on this workplace's machines (KINDS.md).
NOMINAL_BANDWIDTH = {"H100": 2.8e12, "H200": 4.3e12}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "mamba2_130m": ("mamba2_130m.py", None),
    "mamba2_1_3b": ("mamba2_1_3b.py", None),
    "mamba2_2_7b": ("mamba2_2_7b.py", None),
    "nemotronh_8b_13l": ("nemotronh_8b.py", 13),
}


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: all but an untied input embedding (only B rows of it)."""
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    if model.lm_head is not None:
        total -= model.embed[...].nbytes
    return total


def nominal_bandwidth(measured: float) -> tuple[float, str]:
    """(bytes/s, where it comes from) for the `nominal` roofline of this device."""
    kind = jax.devices()[0].device_kind
    for chip, bw in NOMINAL_BANDWIDTH.items():
        if chip in kind:
            return bw, chip
    return measured, "measured here (no nominal figure for this chip)"


def model_for(name: str):
    recipe, layers = MODELS[name]
    cfg = mjc.model_config(mjc.load_config(os.path.join(ROOT, "experiments", recipe)))
    if layers:
        cfg = cfg.replace(pattern=cfg.pattern[:layers])
    return init_model(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"), seed=0)


def megakernel_skip(model, batch: int, quantize: str = "none") -> str | None:
    """Why Engine(megakernel=True, quantize=…) would not run the CUDA megakernel for this model and batch, or
    None."""
    from mamba_jax.inference import megakernel as mk

    return "it decodes batch 1" if batch != 1 else mk.not_here(model, quantize)


def cache_bytes_per_step(model, batch: int, prompt_len: int, new_tokens: int, state_dtype: str) -> int:
    """Bytes of decoding cache one decode step touches: SSM states read + written (written once per window
    where the layer decodes with a state write-back window: `kernels.decode.window_size`), the rest read."""
    ids = jnp.zeros((batch, prompt_len), jnp.int32)
    _, cache = jax.eval_shape(lambda i: model.prefill(i, cache_len=prompt_len + new_tokens), ids)
    state_bytes = jnp.dtype(state_dtype).itemsize
    total = 0
    for node in jax.tree.leaves(cache, is_leaf=lambda x: isinstance(x, dict) and "ssm" in x):
        if isinstance(node, dict):  # a Mamba layer's cache
            writes = 1 / node["win_x"].shape[1] if "win_x" in node else 1
            total += (1 + writes) * node["ssm"].size * state_bytes
            total += sum(v.size * v.dtype.itemsize for k, v in node.items() if k != "ssm")
        else:
            total += node.size * node.dtype.itemsize
    return int(total)


def time_generate(engine, prompts, new_tokens, reps=3):
    """(median seconds of a greedy generation, seconds of the first call, which compiles, its Generation)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    t = time.perf_counter()
    out = engine.generate(prompts, params)
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        engine.generate(prompts, params)
        times.append(time.perf_counter() - t)
    return statistics.median(times), first, out


def agreement(out, base) -> dict:
    """How far a row's greedy tokens (first prompt) follow the first row's of the same model, batch, states and
    weights: the tokens before the first difference, and the largest log-probability difference over them. A
    sanity check beside the timing, not a test: random weights make near ties, so bf16 paths that sum in
    another order part after a while; a broken kernel parts at once, or far apart in log-probability."""
    a, b = out.tokens[0], base.tokens[0]
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    diff = max((abs(x - y) for x, y in zip(out.logprobs[0][:n], base.logprobs[0][:n])), default=0.0)
    return {"equal_prefix_tokens": n, "of": len(b), "max_logprob_diff_on_prefix": diff}


def peer_generate(name: str, batch: int, prompt_len: int, new_tokens: int) -> dict | None:
    """mamba_ssm's MambaLMHeadModel.generate with CUDA graphs, when importable (pure Mamba2 sizes only)."""
    sizes = {"mamba2_130m": (768, 24), "mamba2_1_3b": (2048, 48), "mamba2_2_7b": (2560, 64)}
    if name not in sizes:
        return None
    try:
        sys.path.insert(0, os.path.join(ROOT, ".peer"))
        import torch
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError as e:
        return {"skipped": str(e)}
    d, n = sizes[name]
    cfg = MambaConfig(d_model=d, n_layer=n, vocab_size=50277, ssm_cfg={"layer": "Mamba2"}, rms_norm=True,
                      residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=16)  # fmt: skip
    model = MambaLMHeadModel(cfg, device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 50277, (batch, prompt_len), device="cuda")

    def run(tokens):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_length=prompt_len + tokens, cg=True, temperature=0.0, top_k=1)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(new_tokens)
    t_full = statistics.median(run(new_tokens) for _ in range(3))
    t_one = statistics.median(run(1) for _ in range(3))
    return {"decode_tokens_per_s": batch * (new_tokens - 1) / (t_full - t_one), "ttft_s": t_one}


def _option(text: str):
    """NAME=VALUE with VALUE a bool, int or float where it reads as one."""
    name, _, value = text.partition("=")
    low = value.lower()
    if low in ("true", "false"):
        return name, low == "true"
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mamba2_130m,mamba2_2_7b,nemotronh_8b_13l")
    p.add_argument("--batch", default="1,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--state-dtype", default="float32,bfloat16")
    p.add_argument(
        "--decode-impl",
        default="auto",
        help="comma-separated: auto, xla, pallas (Engine decode_impl), megakernel (Engine megakernel=True)",
    )
    p.add_argument("--quantize", default="none", help="comma-separated: none, fp8 (Engine quantize)")
    p.add_argument("--peer", action="store_true")
    p.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an XLA option for the generation loop (Engine compiler_options), e.g. "
                   "xla_gpu_exhaustive_tiling_search=true; repeatable")  # fmt: skip
    p.add_argument("--out", default="")
    args = p.parse_args()
    options = dict(_option(o) for o in args.xla_option)
    bw_copy, bw_read = bandwidth_bytes_per_s()
    bw = max(bw_copy, bw_read)  # the rate a decode step can reach
    bw_nominal, nominal_source = nominal_bandwidth(bw)
    rows = []
    for name in args.model.split(","):
        model = model_for(name)
        for batch in [int(b) for b in args.batch.split(",")]:
            peer = peer_generate(name, batch, args.prompt_len, args.new_tokens) if args.peer else None
            axes = (args.state_dtype.split(","), args.decode_impl.split(","), args.quantize.split(","))
            firsts = {}  # (state dtype, quantize) → (impl, Generation) of the first row: the others' agreement
            for state_dtype, impl, quantize in itertools.product(*axes):
                mk = impl == "megakernel"  # Engine(megakernel=True): batch 1 through the CUDA megakernel
                if mk and (reason := megakernel_skip(model, batch, quantize)):
                    print(f"{name} batch {batch}: no megakernel row ({reason})", flush=True)
                    continue
                engine = Engine(model, state_dtype=state_dtype, decode_impl="auto" if mk else impl,
                                compiler_options=options or None, quantize=quantize, megakernel=mk)  # fmt: skip
                weight_bytes = weight_bytes_per_step(nnx.merge(engine.graphdef, engine.state))
                rng = np.random.default_rng(0)
                prompts = [rng.integers(1, model.cfg.vocab_size, args.prompt_len).tolist() for _ in range(batch)]
                t_one, _, _ = time_generate(engine, prompts, 1)
                t_full, first_full, out = time_generate(engine, prompts, args.new_tokens)
                base_impl, base = firsts.setdefault((state_dtype, quantize), (impl, out))
                compile_s = first_full - t_full
                # The difference of the two runs: prefill, launch and host overheads cancel.
                decode = batch * (args.new_tokens - 1) / (t_full - t_one)
                roofline = batch * bw / weight_bytes
                cache = cache_bytes_per_step(model, batch, args.prompt_len, args.new_tokens, state_dtype)
                roofline_all = batch * bw / (weight_bytes + cache)
                nominal = batch * bw_nominal / weight_bytes
                row = {
                    "model": name,
                    "batch": batch,
                    "state_dtype": state_dtype,
                    "decode_impl": impl,
                    "quantize": quantize,
                    "xla_options": options or dict(default_options(batch, engine.quantize)),  # what it compiled with
                    "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens,
                    "weight_gib_read_per_step": weight_bytes / 2**30,
                    "cache_gib_per_step": cache / 2**30,
                    "ttft_s": t_one,
                    "compile_s": compile_s,
                    "decode_tokens_per_s": decode,
                    "roofline_tokens_per_s": roofline,
                    "fraction_of_roofline": decode / roofline,
                    "roofline_with_state_tokens_per_s": roofline_all,
                    "fraction_of_roofline_with_state": decode / roofline_all,
                    "nominal_roofline_tokens_per_s": nominal,
                    "fraction_of_nominal_roofline": decode / nominal,
                    "mamba_ssm": peer,
                }
                if mk:  # the kernel's A/B variables (benchmarks/README.md), where set
                    row["megakernel_env"] = {
                        k: v for k, v in os.environ.items() if k.startswith("MAMBA_JAX_MEGAKERNEL")
                    }
                if base is not out:
                    row["agreement_with_" + base_impl] = agreement(out, base)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        f"\n{jax.devices()[0].device_kind}, bandwidth: copy {bw_copy / 1e12:.2f} TB/s, read {bw_read / 1e12:.2f} TB/s"
        f", nominal {bw_nominal / 1e12:.2f} TB/s ({nominal_source})"
    )
    print(
        f"{'model':>18} {'batch':>5} {'state':>8} {'impl':>6} {'quant':>5} {'TTFT ms':>8} {'tok/s':>9} "
        f"{'roofline':>9} {'frac':>5} {'+state':>9} {'frac':>5} {'nominal':>8} {'frac':>5} {'mamba_ssm':>10}"
    )
    for r in rows:
        peer = (r.get("mamba_ssm") or {}).get("decode_tokens_per_s")
        print(
            f"{r['model']:>18} {r['batch']:>5} {r['state_dtype']:>8} {r['decode_impl']:>6} {r['quantize']:>5} "
            f"{1000 * r['ttft_s']:>8.1f} "
            f"{r['decode_tokens_per_s']:>9,.0f} {r['roofline_tokens_per_s']:>9,.0f} {r['fraction_of_roofline']:>5.2f} "
            f"{r['roofline_with_state_tokens_per_s']:>9,.0f} {r['fraction_of_roofline_with_state']:>5.2f} "
            f"{r['nominal_roofline_tokens_per_s']:>8,.0f} {r['fraction_of_nominal_roofline']:>5.2f} "
            f"{f'{peer:,.0f}' if peer else '-':>10}"
        )
    write_result(
        args.out,
        {
            "bandwidth_bytes_per_s": bw,
            "copy_bandwidth_bytes_per_s": bw_copy,
            "read_bandwidth_bytes_per_s": bw_read,
            "nominal_bandwidth_bytes_per_s": bw_nominal,
            "nominal_bandwidth_source": nominal_source,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
