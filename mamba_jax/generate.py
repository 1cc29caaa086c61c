"""`python -m mamba_jax.generate --checkpoint PATH --prompt TEXT [options]`: text generation from the command line.

PATH is a mamba_jax training work directory (or one of its checkpoints) or a Hugging Face Mamba2 / Nemotron-H
directory. One prompt streams to the terminal as it is generated; `--prompts-file` (one prompt per line) runs
them as one batch. Defaults are greedy decoding; `--temperature`, `--top-k`, `--top-p` and
`--repetition-penalty` sample as Hugging Face's processors do; `--stop` strings and EOS end a continuation;
`--logprobs` prints each token's log-probability; `--json` prints machine-readable results; `--quantize fp8`
serves the projection weights in float8 (weight-only, a scale per output channel).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m mamba_jax.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="mamba_jax work dir / checkpoint, or a Hugging Face dir")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", help="a file with one prompt per line (\\n escapes are expanded)")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the one found with the checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS")
    p.add_argument("--logprobs", action="store_true", help="print each generated token's log-probability")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), help="weights and compute dtype")
    p.add_argument(
        "--state-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="SSM state kept between decode steps (bfloat16: fewer bytes per step, as mamba_ssm)",
    )
    p.add_argument(
        "--quantize",
        choices=("none", "fp8"),
        default="none",
        help="fp8: projection weights in float8 with a scale per output channel (half the bytes per token)",
    )
    p.add_argument(
        "--megakernel",
        nargs="?",
        const="on",
        default="auto",
        choices=("auto", "on", "off"),
        help="a single prompt of a pure Mamba2 model decodes through one CUDA launch per token (Hopper GPUs, "
        "bf16 or --quantize fp8; built once per model size, 130M-2.7B). auto (default): where that kernel runs; "
        "on: always (elsewhere its JAX reference, not faster); off: the loop of separate kernels",
    )
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel size over the local devices")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p.parse_args(argv)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.exists(args.prompts_file):
            raise FileNotFoundError(f"--prompts-file {args.prompts_file} does not exist.")
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT or --prompts-file FILE.")
    if any(not p for p in prompts):
        raise ValueError("an empty prompt cannot be continued; give at least one character.")
    return prompts


def main(argv=None) -> int:
    args = _args(argv)
    try:
        prompts = _prompts(args)
        if not os.path.exists(args.checkpoint):
            raise FileNotFoundError(
                f"--checkpoint {args.checkpoint} does not exist; give a training work directory, one of its "
                f"checkpoints, or a Hugging Face model directory."
            )
        import jax

        from mamba_jax.data import load_tokenizer
        from mamba_jax.inference.api import find_tokenizer, generate, print_stream
        from mamba_jax.interop import from_pretrained
        from mamba_jax.parallel import MeshConfig, make_mesh

        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else find_tokenizer(args.checkpoint)
        if tokenizer is None:
            raise ValueError(f"no tokenizer found with {args.checkpoint}; pass --tokenizer PATH.")
        mesh = make_mesh(MeshConfig(data=-1, tensor=args.tensor)) if args.tensor > 1 else None
        dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
        model = from_pretrained(args.checkpoint, mesh=mesh, dtype=dtype)
        if tokenizer.vocab_size > model.cfg.padded_vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.cfg.padded_vocab_size}; "
                f"pass the model's tokenizer with --tokenizer."
            )
        streaming = len(prompts) == 1 and not args.json
        if streaming:
            sys.stdout.write(prompts[0])
            sys.stdout.flush()
        results = generate(
            model,
            prompts,
            tokenizer=tokenizer,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=args.stop,
            stop_at_eos=not args.ignore_eos,
            dtype=dtype,
            state_dtype=args.state_dtype,
            quantize=args.quantize,
            mesh=mesh,
            stream=print_stream if streaming else None,
            megakernel={"auto": "auto", "on": True, "off": False}[args.megakernel],
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"mamba_jax.generate: error: {e}", file=sys.stderr)
        return 2
    for prompt, r in zip(prompts, results, strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": r.text, "tokens": r.tokens, "logprobs": r.logprobs,
                              "finish_reason": r.finish_reason}))  # fmt: skip
            continue
        if not streaming:
            print(f"{prompt}{r.text}")
        else:
            print()
        if args.logprobs:
            pieces = [f"{tokenizer.decode([t])!r}:{lp:.3f}" for t, lp in zip(r.tokens, r.logprobs, strict=True)]
            print("logprobs: " + " ".join(pieces))
        print(f"[{len(r.tokens)} tokens, {r.finish_reason}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
