"""`python -m mamba_jax.preprocess`: raw text / JSONL files → a tokenized corpus for training (thin CLI).

    python -m mamba_jax.preprocess --input 'raw/*.jsonl' --output data/corpus --tokenizer tok.model --workers 8
    python -m mamba_jax.preprocess --input 'src/**/*.py' --output data/code --train-tokenizer --vocab-size 32000

Several hosts (one shared OUTPUT): run the same command on each with `--num-hosts H --host-index I`; host I
tokenizes its share of the files and writes `index-host-I-of-H.json`; the corpus is readable once all H parts
exist. With `--train-tokenizer`, host 0 trains OUTPUT/tokenizer.model and the others wait for it.
The work is in `mamba_jax.data.preprocess.prepare_corpus`.
"""

from __future__ import annotations

import argparse
import sys

from mamba_jax.data.errors import DataError
from mamba_jax.data.preprocess import prepare_corpus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mamba_jax.preprocess",
        description="Tokenize raw text / JSONL files into token shards for mamba_jax training.",
    )
    p.add_argument(
        "--input", action="append", required=True, metavar="GLOB", help="input files (repeatable; ** recurses)"
    )
    p.add_argument("--output", required=True, metavar="DIR", help="corpus directory (shared by all hosts)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="PATH", help="SentencePiece .model, tokenizer.json, or a folder with one")
    tok.add_argument(
        "--train-tokenizer", action="store_true", help="train a SentencePiece model: OUTPUT/tokenizer.model"
    )
    p.add_argument("--vocab-size", type=int, help="vocabulary of the trained tokenizer (with --train-tokenizer)")
    p.add_argument("--field", default="text", help="JSON field holding the text (default: text)")
    p.add_argument(
        "--text-mode", choices=("file", "line"), default="file", help="non-JSON files: one document per file or line"
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes on this host (default 1)")
    p.add_argument("--num-hosts", type=int, default=1, help="machines sharing the work (default 1)")
    p.add_argument("--host-index", type=int, default=0, help="this machine's index in [0, num-hosts)")
    p.add_argument("--no-eos", action="store_true", help="do not end each document with EOS")
    p.add_argument("--add-bos", action="store_true", help="start each document with BOS")
    p.add_argument("--skip-empty", action="store_true", help="skip input files without text instead of failing")
    p.add_argument("--token-dtype", choices=("uint16", "uint32"), help="default: uint16 when the vocabulary fits")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    if args.train_tokenizer and args.vocab_size is None:
        p.error("--train-tokenizer needs --vocab-size N")
    if args.vocab_size is not None and not args.train_tokenizer:
        p.error("--vocab-size is for --train-tokenizer; a given --tokenizer brings its own vocabulary")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prepare_corpus(
            args.input,
            args.output,
            tokenizer=args.tokenizer,
            train_tokenizer_vocab=args.vocab_size if args.train_tokenizer else None,
            field=args.field,
            text_mode=args.text_mode,
            workers=args.workers,
            num_hosts=args.num_hosts,
            host_index=args.host_index,
            append_eos=not args.no_eos,
            add_bos=args.add_bos,
            progress=not args.quiet,
            token_dtype=args.token_dtype,
            skip_empty=args.skip_empty,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
