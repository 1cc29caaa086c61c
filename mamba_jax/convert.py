"""`python -m mamba_jax.convert`: Hugging Face Mamba2 / Nemotron-H directories ↔ mamba_jax checkpoints (thin CLI).

    python -m mamba_jax.convert --from-hf HF_DIR --to CKPT_DIR
        HF_DIR (config.json + safetensors of Mamba2ForCausalLM / NemotronHForCausalLM) → a training work
        directory: CKPT_DIR/config.json and an Orbax checkpoint at step 0 with a fresh optimizer state, which
        `mamba_jax.from_pretrained(CKPT_DIR)` loads; tokenizer files are copied along.
    python -m mamba_jax.convert --from CKPT_DIR --to-hf HF_DIR [--flavor mamba2|nemotron_h]
        a mamba_jax checkpoint (work directory, checkpoints/ folder or one step folder) → a Hugging Face
        directory that transformers loads with the same logits.

The work is in `mamba_jax.interop`.
"""

from __future__ import annotations

import argparse
import os
import sys

from mamba_jax.interop.hf_checkpoint import TOKENIZER_FILES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mamba_jax.convert",
        description="Convert Hugging Face Mamba2 / Nemotron-H models to mamba_jax checkpoints and back.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="a Hugging Face model directory to import")
    src.add_argument("--from", dest="from_ckpt", metavar="CKPT_DIR", help="a mamba_jax checkpoint to export")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--to", metavar="CKPT_DIR", help="the mamba_jax work directory to write (must hold none)")
    dst.add_argument("--to-hf", metavar="HF_DIR", help="the Hugging Face directory to write")
    p.add_argument(
        "--flavor",
        choices=("auto", "mamba2", "nemotron_h"),
        default="auto",
        help="--to-hf: the transformers class (auto: Mamba2 for pure Mamba2 models, else Nemotron-H)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="tokenizer file or folder to copy along (default: the one beside the source, if any)",
    )
    p.add_argument("--dtype", help="compute dtype recorded in the checkpoint (--to) or weight dtype (--to-hf)")
    p.add_argument("--param-dtype", help="--to: the parameters' dtype (default float32)")
    p.add_argument(
        "--params-only",
        action="store_true",
        help="--to: write the parameters alone (no optimizer state; the training loop cannot resume it)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="--to-hf: largest safetensors file (default 5GB)")
    p.add_argument("--mesh", metavar="AXES", help="load onto a mesh of all devices, e.g. 'fsdp=8' or 'data=2,tensor=4'")
    p.add_argument("--overwrite", action="store_true", help="--to-hf: replace a non-empty HF_DIR")
    args = p.parse_args(argv)
    if args.from_hf and args.to_hf:
        p.error("--from-hf goes with --to (a mamba_jax checkpoint); to re-export a Hugging Face model use --from.")
    if args.from_ckpt and args.to:
        p.error("--from (a mamba_jax checkpoint) goes with --to-hf; --to takes a Hugging Face source (--from-hf).")
    return args


def _mesh(spec: str | None):
    if not spec:
        return None
    from mamba_jax.parallel import MeshConfig, make_mesh

    sizes = {}
    for part in spec.split(","):
        axis, _, size = part.partition("=")
        sizes[axis.strip()] = int(size)
    sizes.setdefault("data", 1 if any(v == -1 for v in sizes.values()) else -1)
    return make_mesh(MeshConfig.from_dict(sizes))


def _tokenizer_beside(directory: str) -> str | None:
    return directory if any(os.path.isfile(os.path.join(directory, n)) for n in TOKENIZER_FILES) else None


def run(args: argparse.Namespace) -> str:
    from mamba_jax.inference.api import find_tokenizer_path
    from mamba_jax.interop import export_hf, from_pretrained, load_hf, save_native
    from mamba_jax.interop.hf_checkpoint import ensure_writable
    from mamba_jax.interop.native import ensure_no_checkpoints, find_checkpoint, workdir_of

    # Refuse an occupied destination before spending minutes loading a large model.
    if args.to:
        ensure_no_checkpoints(os.path.abspath(args.to))
    else:
        ensure_writable(os.path.abspath(args.to_hf), args.overwrite)
    mesh = _mesh(args.mesh)
    if args.from_hf:
        model, flavor = load_hf(args.from_hf, mesh=mesh, dtype=args.dtype, param_dtype=args.param_dtype)
        tokenizer = args.tokenizer or _tokenizer_beside(args.from_hf)
        step_dir = save_native(
            model,
            args.to,
            name=f"converted from {os.path.abspath(args.from_hf)} ({flavor})",
            tokenizer=tokenizer,
            optimizer_state=not args.params_only,
        )
        return f"wrote {step_dir} ({_describe(model)})"
    model = from_pretrained(args.from_ckpt, mesh=mesh)
    src = workdir_of(args.from_ckpt) if find_checkpoint(args.from_ckpt) else args.from_ckpt
    out = export_hf(
        model,
        args.to_hf,
        # a work directory's tokenizer: copied beside it by --from-hf, else its training corpus's
        tokenizer=args.tokenizer or _tokenizer_beside(src) or find_tokenizer_path(args.from_ckpt),
        flavor=None if args.flavor == "auto" else args.flavor,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    return f"wrote {out} ({_describe(model)})"


def _describe(model) -> str:
    from flax import nnx

    from mamba_jax.parallel import param_count

    cfg = model.cfg
    return f"{cfg.n_layers} layers '{cfg.pattern}', {param_count(nnx.state(model)):,} parameters"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mamba_jax.data.errors import DataError
    from mamba_jax.interop.errors import ConversionError
    from mamba_jax.models.config import ConfigError

    try:
        print(f"mamba_jax.convert: {run(args)}", flush=True)
    except (ConversionError, ConfigError, DataError, FileNotFoundError) as e:
        print(f"mamba_jax.convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
