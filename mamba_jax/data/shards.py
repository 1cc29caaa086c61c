"""Tokenized corpora on disk: flat token shards with document offsets, written atomically, read by memory map.

The layout follows Megatron's indexed dataset (`.bin` tokens + `.idx` offsets), with a JSON index instead of a
binary header so that a person can read it:

    DIR/index.json                        the corpus (one host), or
    DIR/index-host-00001-of-00004.json    one part per host of a multi-host preprocess (the reader merges them)
    DIR/<shard>.bin                       tokens of every document, concatenated, uint16 (vocab ≤ 65536) or uint32
    DIR/<shard>.idx                       int64 offsets into the .bin: num_docs + 1 values, first 0, last num_tokens

An index (or part) lists its shards in corpus order with `num_docs` / `num_tokens`, and records the format
version, the tokenizer (path relative to DIR when inside it), vocab_size, eos_id, bos_id, the token dtype and the
fingerprint of the preparation (inputs and settings). Files are written under a temporary name and renamed, the
index last, so a reader sees a whole corpus or none.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from mamba_jax.data.errors import DataError

FORMAT = "mamba_jax.token_shards"
VERSION = 1
INDEX = "index.json"
MAX_OPEN_SHARDS = 256
_PART_RE = re.compile(r"index-host-(\d+)-of-(\d+)\.json$")


def part_index_name(host_index: int, num_hosts: int) -> str:
    return f"index-host-{host_index:05d}-of-{num_hosts:05d}.json"


def token_dtype_for(vocab_size: int, requested: str | None = None) -> np.dtype:
    """The smallest unsigned dtype holding ids < vocab_size, or `requested` after checking that it fits."""
    if requested is None:
        requested = "uint16" if vocab_size <= 1 << 16 else "uint32"
    if requested not in ("uint16", "uint32"):
        raise DataError(f"token dtype must be 'uint16' or 'uint32', got {requested!r}.")
    dtype = np.dtype(requested)
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise DataError(
            f"a vocabulary of {vocab_size} tokens does not fit in {requested} (ids up to {np.iinfo(dtype).max}); "
            f"use token dtype uint32 (or leave it unset to pick it from the vocabulary)."
        )
    return dtype


def atomic_write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Writes one shard document by document; `close()` renames it into place and returns its index entry."""

    def __init__(self, directory: str, name: str, dtype: np.dtype):
        self.directory, self.name, self.dtype = directory, name, np.dtype(dtype)
        self._tmp = os.path.join(directory, f"{name}.tmp-{os.getpid()}")
        self._bin = open(self._tmp + ".bin", "wb")  # noqa: SIM115 (closed by close() or abort())
        self._offsets = [0]

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        self._bin.write(ids.tobytes())
        self._offsets.append(self._offsets[-1] + len(ids))

    @property
    def num_docs(self) -> int:
        return len(self._offsets) - 1

    def close(self) -> dict[str, Any]:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        np.asarray(self._offsets, dtype=np.int64).tofile(self._tmp + ".idx")
        base = os.path.join(self.directory, self.name)
        os.replace(self._tmp + ".idx", base + ".idx")
        os.replace(self._tmp + ".bin", base + ".bin")
        return {"name": self.name, "num_docs": self.num_docs, "num_tokens": self._offsets[-1]}

    def abort(self) -> None:
        self._bin.close()
        for ext in (".bin", ".idx"):
            if os.path.exists(self._tmp + ext):
                os.remove(self._tmp + ext)


def write_corpus(
    directory: str | os.PathLike,
    docs: Iterable[Sequence[int] | np.ndarray],
    *,
    vocab_size: int,
    eos_id: int,
    bos_id: int | None = None,
    tokenizer: str = "",
    token_dtype: str | None = None,
    docs_per_shard: int = 1 << 20,
) -> TokenShards:
    """Write already-tokenized documents as a one-host corpus (for data tokenized in Python, and for tests)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    dtype = token_dtype_for(vocab_size, token_dtype)
    digest, entries, writer = hashlib.sha256(), [], None
    for doc in docs:
        if writer is None:
            writer = ShardWriter(directory, f"h0000-c{len(entries):06d}", dtype)
        ids = np.asarray(doc)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab_size:
            raise DataError(
                f"document {sum(e['num_docs'] for e in entries) + writer.num_docs} is empty or has ids "
                f"outside [0, {vocab_size})."
            )
        ids = ids.astype(dtype)
        digest.update(ids.tobytes() + b"|")
        writer.add(ids)
        if writer.num_docs == docs_per_shard:
            entries.append({**writer.close(), "chunk": len(entries)})
            writer = None
    if writer is not None:
        entries.append({**writer.close(), "chunk": len(entries)})
    index = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": digest.hexdigest()[:32],
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "bos_id": bos_id,
        "dtype": str(dtype),
        "num_hosts": 1,
        "num_docs": sum(e["num_docs"] for e in entries),
        "num_tokens": sum(e["num_tokens"] for e in entries),
        "shards": entries,
    }
    atomic_write_json(os.path.join(directory, INDEX), index)
    return TokenShards(directory)


def read_index(directory: str) -> dict[str, Any]:
    """The corpus index of `directory`: index.json, or the merge of every host's part when all are present."""
    if not os.path.isdir(directory):
        raise DataError(
            f"corpus directory {directory} does not exist; create it with `python -m mamba_jax.preprocess`."
        )
    single = os.path.join(directory, INDEX)
    if os.path.isfile(single):
        return _load_json(single)
    parts = {}
    for file in glob.glob(os.path.join(directory, "index-host-*-of-*.json")):
        m = _PART_RE.search(file)
        if m:
            parts[(int(m.group(1)), int(m.group(2)))] = _load_json(file)
    if not parts:
        raise DataError(
            f"{directory} holds no corpus (no {INDEX} and no index-host-*.json): the preprocess did not run there or "
            f"did not finish; run `python -m mamba_jax.preprocess --output {directory} ...`."
        )
    counts = {h for _, h in parts}
    prints = {p["fingerprint"] for p in parts.values()}
    if len(counts) > 1 or len(prints) > 1:
        raise DataError(
            f"{directory} holds host parts of different preprocess runs (num_hosts {sorted(counts)}); delete the "
            f"directory and preprocess again with the same inputs and settings on every host."
        )
    (num_hosts,) = counts
    missing = [i for i in range(num_hosts) if (i, num_hosts) not in parts]
    if missing:
        raise DataError(
            f"the corpus in {directory} is incomplete: host(s) {missing} of {num_hosts} have not finished "
            f"(no {part_index_name(missing[0], num_hosts)}); wait for them or rerun them with --host-index."
        )
    merged = dict(parts[(0, num_hosts)])
    merged.pop("host_index", None)
    # Shards carry their chunk number: sorting by it gives the corpus order whatever the host / worker counts.
    merged["shards"] = sorted((s for p in parts.values() for s in p["shards"]), key=lambda s: s["chunk"])
    merged["num_docs"] = sum(s["num_docs"] for s in merged["shards"])
    merged["num_tokens"] = sum(s["num_tokens"] for s in merged["shards"])
    return merged


def _load_json(file: str) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{file} is not valid JSON ({e}); delete the corpus directory and preprocess again.") from e
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataError(
            f"{file} is not a mamba_jax token-shard index of version {VERSION} "
            f"(format {index.get('format')!r}, version {index.get('version')!r}); preprocess the data again."
        )
    return index


class TokenShards:
    """A tokenized corpus: `doc(i)` is a memory-mapped view of document i (nothing is read until used)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self.index = read_index(self.directory)
        self.vocab_size: int = self.index["vocab_size"]
        self.eos_id: int = self.index["eos_id"]
        self.bos_id: int | None = self.index.get("bos_id")
        self.dtype = np.dtype(self.index["dtype"])
        self.fingerprint: str = self.index["fingerprint"]
        self.shards: list[dict[str, Any]] = self.index["shards"]
        docs_S = np.array([s["num_docs"] for s in self.shards], dtype=np.int64)
        self.num_docs = int(docs_S.sum())
        self.num_tokens = int(sum(s["num_tokens"] for s in self.shards))
        if self.num_docs == 0 or self.num_tokens == 0:
            raise DataError(f"the corpus in {self.directory} is empty (0 documents); preprocess non-empty inputs.")
        self._first_doc_S = np.concatenate([[0], np.cumsum(docs_S)])
        for s in self.shards:
            self._check_sizes(s)
        self._maps: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._lock = threading.Lock()  # grain reads rows from several threads

    @property
    def tokenizer_path(self) -> str | None:
        """The tokenizer the corpus was made with (None when written by `write_corpus` without one)."""
        if not self.index.get("tokenizer"):
            return None
        return os.path.join(self.directory, self.index["tokenizer"])  # join keeps an absolute path as it is

    def _check_sizes(self, shard: dict[str, Any]) -> None:
        base = os.path.join(self.directory, shard["name"])
        expected = {".bin": shard["num_tokens"] * self.dtype.itemsize, ".idx": (shard["num_docs"] + 1) * 8}
        for ext, size in expected.items():
            if not os.path.isfile(base + ext):
                raise DataError(f"shard file {base + ext} is missing; the corpus is damaged, preprocess it again.")
            actual = os.path.getsize(base + ext)
            if actual != size:
                raise DataError(
                    f"shard file {base + ext} has {actual} bytes but its index says {size} "
                    f"({shard['num_docs']} documents, {shard['num_tokens']} tokens); the file is truncated or from "
                    f"another run: preprocess the corpus again."
                )

    def _shard(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        # Each map holds a file descriptor (Python's mmap keeps one), so at most MAX_OPEN_SHARDS are open:
        # a corpus of thousands of shards would otherwise exceed the usual limit of 1024 descriptors.
        with self._lock:
            if s in self._maps:
                self._maps.move_to_end(s)
                return self._maps[s]
        base = os.path.join(self.directory, self.shards[s]["name"])
        offsets = np.memmap(base + ".idx", dtype=np.int64, mode="r")
        tokens = np.memmap(base + ".bin", dtype=self.dtype, mode="r")
        if offsets[0] != 0 or offsets[-1] != len(tokens):
            raise DataError(f"{base}.idx does not describe {base}.bin (bad offsets); preprocess the corpus again.")
        with self._lock:
            self._maps[s] = (offsets, tokens)
            while len(self._maps) > MAX_OPEN_SHARDS:
                self._maps.popitem(last=False)  # views handed out keep their map alive until dropped
        return offsets, tokens

    def __len__(self) -> int:
        return self.num_docs

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document i (a read-only memmap view, dtype uint16 / uint32)."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range [0, {self.num_docs}).")
        s = int(np.searchsorted(self._first_doc_S, i, side="right")) - 1
        offsets, tokens = self._shard(s)
        j = i - int(self._first_doc_S[s])
        return tokens[offsets[j] : offsets[j + 1]]

    __getitem__ = doc

    def doc_lengths(self) -> np.ndarray:
        """(num_docs,) int64 token count of every document, in corpus order."""
        return np.concatenate([np.diff(self._shard(s)[0]) for s in range(len(self.shards))])

    def __repr__(self) -> str:
        return (
            f"TokenShards({self.directory!r}, num_docs={self.num_docs}, num_tokens={self.num_tokens}, "
            f"vocab_size={self.vocab_size}, shards={len(self.shards)})"
        )
