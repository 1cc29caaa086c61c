"""Tokenizers behind one small interface: SentencePiece `.model` files and Hugging Face `tokenizer.json` files.

`load_tokenizer(path)` accepts either file or a directory holding one (tokenizer.json wins when both are there).
`train_sentencepiece` trains a byte-fallback BPE model the way NeMo / Megatron corpora are usually tokenized
(SentencePiece BPE, digits split, an end-of-document id, no BOS unless asked), tuned to finish in about a minute
on two cores for ~10 MB of text: it samples lines (`input_sentence_size`, `shuffle_input_sentence`) and cuts
very long lines instead of letting SentencePiece drop them.

The Hugging Face path needs the `tokenizers` package; it is imported only when such a file is loaded.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

from mamba_jax.data.errors import DataError

# Special tokens looked up, in order, when a tokenizer.json comes without a tokenizer_config.json naming them.
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer:
    """What the data pipeline and generation need from a tokenizer; `load_tokenizer` returns a subclass."""

    path: str
    vocab_size: int  # ids are in [0, vocab_size)
    eos_id: int
    bos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS / EOS (the caller adds document markers)."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens (EOS, BOS, pad) are dropped."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"bos_id={self.bos_id}, pad_id={self.pad_id})"
        )


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str, *, num_threads: int = -1):
        self.path = os.path.abspath(path)
        self._num_threads = num_threads  # for encode_batch; workers of the preprocessor pass 1
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            raise DataError(
                f"{path} is not a SentencePiece model ({e}); give a .model file or a tokenizer.json."
            ) from e
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = _known(self._sp.eos_id())
        self.bos_id = _known(self._sp.bos_id())
        self.pad_id = _known(self._sp.pad_id())
        if self.eos_id is None:
            raise DataError(
                f"the SentencePiece model {path} has no end-of-document id (trained with eos_id=-1); documents "
                f"could not be separated. Train it with an EOS id (train_sentencepiece does)."
            )

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=self._num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, path: str, *, eos_token: str | None = None):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as e:
            raise DataError(
                f"{path} is a Hugging Face tokenizer.json; reading it needs `pip install tokenizers`."
            ) from e
        self.path = os.path.abspath(path)
        try:
            self._tok = _HFTokenizer.from_file(self.path)
        except Exception as e:  # the Rust side raises a bare Exception for a JSON that is not a tokenizer
            raise DataError(f"{path} is not a Hugging Face tokenizer.json ({e}).") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        named = _special_tokens_from_config(os.path.dirname(self.path))
        eos = self._find(eos_token, named.get("eos_token"), _EOS_CANDIDATES)
        if eos is None:
            raise DataError(
                f"cannot tell the end-of-document token of {path}: no tokenizer_config.json names `eos_token` and "
                f"none of {', '.join(_EOS_CANDIDATES)} is in its vocabulary; pass eos_token=... to load_tokenizer."
            )
        self.eos_id = eos
        self.bos_id = self._find(None, named.get("bos_token"), _BOS_CANDIDATES)
        self.pad_id = self._find(None, named.get("pad_token"), _PAD_CANDIDATES)

    def _find(self, explicit: str | None, named: str | None, candidates: Iterable[str]) -> int | None:
        if explicit is not None:
            tid = self._tok.token_to_id(explicit)
            if tid is None:
                raise DataError(f"token {explicit!r} is not in the vocabulary of {self.path}.")
            return tid
        for token in (named, *candidates):
            tid = None if token is None else self._tok.token_to_id(token)
            if tid is not None:
                return tid
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _known(token_id: int) -> int | None:
    return None if token_id < 0 else int(token_id)


def _special_tokens_from_config(directory: str) -> dict[str, str]:
    """eos/bos/pad token strings from a Hugging Face tokenizer_config.json or special_tokens_map.json, if any."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            continue
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
        for key in ("eos_token", "bos_token", "pad_token"):
            value = cfg.get(key)
            if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


def resolve_tokenizer_path(path: str | os.PathLike) -> str:
    """The tokenizer file that `path` names: itself, or tokenizer.json / a single .model file in a directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        models = sorted(p for p in os.listdir(path) if p.endswith(".model"))
        if len(models) == 1:
            return os.path.join(path, models[0])
        raise DataError(
            f"the directory {path} holds no tokenizer: expected tokenizer.json (Hugging Face) or one "
            f"SentencePiece .model file" + (f" (found several: {', '.join(models)})" if models else "") + "."
        )
    if not os.path.exists(path):
        raise DataError(
            f"tokenizer {path} does not exist; give a SentencePiece .model, a tokenizer.json or its folder."
        )
    return path


def load_tokenizer(path: str | os.PathLike, *, eos_token: str | None = None, num_threads: int = -1) -> Tokenizer:
    """Load a SentencePiece `.model`, a Hugging Face `tokenizer.json`, or the one found in a directory."""
    file = resolve_tokenizer_path(path)
    if file.endswith(".json"):
        return HuggingFaceTokenizer(file, eos_token=eos_token)
    if file.endswith(".model"):
        return SentencePieceTokenizer(file, num_threads=num_threads)
    raise DataError(
        f"{file} is not a tokenizer file: expected a SentencePiece .model or a Hugging Face tokenizer.json."
    )


# ----------------------------------------------------------------------------------------------------------------
def _training_lines(items: Iterable[str | os.PathLike], max_line_bytes: int, max_chars: int) -> Iterator[str]:
    """Non-empty lines of the texts / files, lines longer than SentencePiece accepts cut into pieces."""
    seen = 0
    for item in items:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and "\n" not in item and os.path.isfile(item)):
            text = pathlib.Path(item).read_text(encoding="utf-8", errors="replace")
        else:
            text = item
        for line in text.splitlines():
            if not line.strip():
                continue
            # max_sentence_length counts bytes; cutting by characters at a quarter keeps any UTF-8 under it.
            step = max(1, max_line_bytes // 4)
            for start in range(0, len(line), step):
                piece = line[start : start + step]
                seen += len(piece)
                yield piece
            if seen >= max_chars:
                return


def train_sentencepiece(
    files_or_texts: Iterable[str | os.PathLike],
    vocab_size: int,
    model_prefix: str | os.PathLike,
    *,
    bos: bool = False,
    input_sentence_size: int = 1_000_000,
    max_sentence_length: int = 16384,
    max_chars: int = 1 << 30,
    character_coverage: float = 0.9999,
    num_threads: int | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> Tokenizer:
    """Train a byte-fallback BPE SentencePiece model; writes `<model_prefix>.model` (and `.vocab`) atomically.

    `files_or_texts`: paths (a `pathlib.Path`, or a string naming an existing file) or texts. Training reads
    lines, so newlines are not pieces (they encode through byte fallback). Ids: unk 0, eos 1, bos 2 when
    `bos` else none, no pad. Whitespace and case are kept verbatim (identity normalisation, no dummy prefix)
    so decode(encode(text)) == text, code included. `max_chars` caps how much text is read.
    """
    if vocab_size < 300:
        raise DataError(f"vocab_size {vocab_size} is too small: byte fallback alone takes 256 ids; use at least 300.")
    model_prefix = os.fspath(model_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    tmp_prefix = f"{model_prefix}.tmp-{os.getpid()}"
    lines = _training_lines(files_or_texts, max_sentence_length, max_chars)
    first = next(lines, None)
    if first is None:
        raise DataError("no text to train the tokenizer on: every input is empty.")

    def all_lines():
        yield first
        yield from lines

    spm.set_random_generator_seed(seed)  # the sentence sampling is random
    spm.SentencePieceTrainer.train(
        sentence_iterator=all_lines(),
        model_prefix=tmp_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        # Small corpora cannot always fill the vocabulary; take what they give instead of failing.
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        eos_id=1,
        bos_id=2 if bos else -1,
        pad_id=-1,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=0 if verbose else 2,
    )
    for ext in (".vocab", ".model"):  # the .model last: its presence means a finished model
        os.replace(tmp_prefix + ext, model_prefix + ext)
    return SentencePieceTokenizer(model_prefix + ".model")
