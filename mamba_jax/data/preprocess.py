"""Raw text / JSONL files → a tokenized corpus of token shards (`mamba_jax.data.shards`), over processes and hosts.

Megatron's `preprocess_data.py` is the model: documents are tokenized by a pool of worker processes, each
document gets an EOS (and a BOS if asked), and tokens land in `.bin` / `.idx` shards. What differs:

- Work unit = a chunk: a run of consecutive input files (sorted by path) of about `chunk_bytes`. Chunk c goes
  to host c mod num_hosts; inside a host, chunks are handed to `workers` spawned processes as they free up.
  Each chunk becomes one shard named `h<host>-c<chunk>`, unique across hosts, so every host can write into one
  shared directory. Readers order shards by chunk, so the corpus (its documents and their order) is the same
  whatever the host and worker counts.
- Multi-host merge: one host writes `index.json`; with several hosts each writes its own
  `index-host-I-of-H.json` when its shards are done, and `TokenShards` merges the parts (and refuses a corpus
  whose parts are not all there, naming the missing hosts). No finalize step, no coordination between hosts.
- Tokenizer training with several hosts: host 0 trains `OUTPUT/tokenizer.model` on a sample of *all* inputs;
  the other hosts wait for it (`tokenizer_wait_s`). Alternatively train once and pass `--tokenizer` everywhere.
- Idempotent: the index records a fingerprint of the inputs (path, size, mtime), the tokenizer (sha256) and the
  settings; a rerun with the same fingerprint returns at once, a different corpus in the directory is an error.
- Atomic: shards and indexes are written under temporary names and renamed, the index last.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mamba_jax.data import shards as shards_lib
from mamba_jax.data.errors import DataError
from mamba_jax.data.readers import TEXT_MODES, expand_inputs, iter_documents
from mamba_jax.data.tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer_path, train_sentencepiece

TOKENIZER_SAMPLE_CHARS = 256 << 20  # text read to train a tokenizer, spread over the input files
_ENCODE_BATCH_BYTES = 4 << 20


def prepare_corpus(
    inputs: Sequence[str | os.PathLike] | str,
    output_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    train_tokenizer_vocab: int | None = None,
    field: str = "text",
    text_mode: str = "file",
    workers: int = 1,
    num_hosts: int = 1,
    host_index: int = 0,
    append_eos: bool = True,
    add_bos: bool = False,
    progress: bool = True,
    token_dtype: str | None = None,
    skip_empty: bool = False,
    chunk_bytes: int = 256 << 20,
    tokenizer_wait_s: float = 3600.0,
) -> str:
    """Tokenize the files matched by `inputs` (globs) into `output_dir`; returns `output_dir`.

    Give `tokenizer` (a .model, tokenizer.json or folder) or `train_tokenizer_vocab` (train a SentencePiece
    model of that size on the inputs, saved as `output_dir/tokenizer.model`). With `num_hosts` > 1, run the
    same call on every host with its `host_index`; the directory must be shared.
    """
    if (tokenizer is None) == (train_tokenizer_vocab is None):
        raise DataError("give exactly one of a tokenizer (--tokenizer PATH) or --train-tokenizer --vocab-size N.")
    if text_mode not in TEXT_MODES:
        raise DataError(f"text mode must be one of {TEXT_MODES}, got {text_mode!r}.")
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}.")
    if not 0 <= host_index < num_hosts:
        raise DataError(f"host index {host_index} is not in [0, num_hosts={num_hosts}).")
    output_dir = os.path.abspath(os.fspath(output_dir))
    files = expand_inputs(inputs)
    # Source trees are full of empty files (__init__.py); skip_empty drops them instead of failing.
    empty = {f for f in files if os.path.getsize(f) == 0}
    if empty and not skip_empty:
        raise DataError(f"input file {min(empty)} is empty; remove it from the inputs or pass --skip-empty.")
    files = [f for f in files if f not in empty]
    if not files:
        raise DataError("every input file is empty.")
    os.makedirs(output_dir, exist_ok=True)
    say = _Reporter(progress)

    settings = {
        "inputs": [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files],
        "field": field,
        "text_mode": text_mode,
        "append_eos": append_eos,
        "add_bos": add_bos,
        "token_dtype": token_dtype,
        "chunk_bytes": chunk_bytes,
        "num_hosts": num_hosts,
        "skip_empty": skip_empty,
    }
    if tokenizer is not None:
        tokenizer_file = resolve_tokenizer_path(tokenizer)
        settings["tokenizer"] = _sha256(tokenizer_file)
    else:
        settings["tokenizer"] = {"train_vocab": train_tokenizer_vocab}
    fingerprint = _digest(settings)
    own_index = os.path.join(
        output_dir, shards_lib.INDEX if num_hosts == 1 else shards_lib.part_index_name(host_index, num_hosts)
    )
    if _check_existing(output_dir, fingerprint, own_index):
        say(f"{own_index} already holds this corpus (same inputs, tokenizer and settings): nothing to do.")
        return output_dir

    if tokenizer is None:
        tokenizer_file = _trained_tokenizer(
            files, output_dir, settings, train_tokenizer_vocab, host_index, tokenizer_wait_s, say
        )
    tok = load_tokenizer(tokenizer_file)
    if add_bos and tok.bos_id is None:
        raise DataError(f"--add-bos: the tokenizer {tokenizer_file} has no BOS token; drop --add-bos or change it.")
    dtype = shards_lib.token_dtype_for(tok.vocab_size, token_dtype)

    chunks = _chunks(files, chunk_bytes, num_hosts)
    mine = [(c, chunk) for c, chunk in enumerate(chunks) if c % num_hosts == host_index]
    _remove_temporaries(output_dir, host_index)
    options = dict(tokenizer=tokenizer_file, dtype=str(dtype), field=field, text_mode=text_mode)
    options.update(append_eos=append_eos, add_bos=add_bos, skip_empty=skip_empty, out=output_dir)
    jobs = [_Job(chunk=c, files=chunk, name=f"h{host_index:04d}-c{c:06d}", **options) for c, chunk in mine]
    total = sum(os.path.getsize(f) for _, chunk in mine for f in chunk)
    say(f"host {host_index}/{num_hosts}: {len(jobs)} chunk(s), {total / 1e6:.1f} MB of input, {workers} worker(s)")
    entries = _run_jobs(jobs, workers, total, progress)
    if num_hosts == 1 and not entries:
        raise DataError("the inputs hold no text: every document is empty.")

    index = {
        "format": shards_lib.FORMAT,
        "version": shards_lib.VERSION,
        "fingerprint": fingerprint,
        "tokenizer": _relative_if_inside(tokenizer_file, output_dir),
        "tokenizer_sha256": _sha256(tokenizer_file),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "dtype": str(dtype),
        "append_eos": append_eos,
        "add_bos": add_bos,
        "num_hosts": num_hosts,
        "num_inputs": len(files),
        "num_docs": sum(e["num_docs"] for e in entries),
        "num_tokens": sum(e["num_tokens"] for e in entries),
        "shards": sorted(entries, key=lambda e: e["chunk"]),
    }
    if num_hosts > 1:
        index["host_index"] = host_index
    shards_lib.atomic_write_json(own_index, index)
    say(f"wrote {index['num_docs']:,} documents, {index['num_tokens']:,} tokens ({dtype}) → {own_index}")
    return output_dir


# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Job:
    """One chunk of input files → one shard; crosses the process boundary by pickle."""

    chunk: int
    files: list[str]
    out: str
    name: str
    tokenizer: str
    dtype: str
    field: str
    text_mode: str
    append_eos: bool
    add_bos: bool
    skip_empty: bool


_TOKENIZERS: dict[str, Tokenizer] = {}


def _worker_tokenizer(path: str, num_threads: int) -> Tokenizer:
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path, num_threads=num_threads)
    return _TOKENIZERS[path]


def _init_worker() -> None:
    # Each worker is one of N processes: the tokenizers' own thread pools would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


def _encode_chunk(job: _Job, num_threads: int = 1) -> dict[str, Any]:
    tok = _worker_tokenizer(job.tokenizer, num_threads)
    writer = shards_lib.ShardWriter(job.out, job.name, np.dtype(job.dtype))
    prefix = [tok.bos_id] if job.add_bos else []
    suffix = [tok.eos_id] if job.append_eos else []

    def flush(texts):
        for ids in tok.encode_batch(texts):
            ids_T = np.asarray(prefix + ids + suffix, dtype=np.int64)
            if ids_T.size and (ids_T.max() >= tok.vocab_size or ids_T.min() < 0):
                raise DataError(
                    f"{job.tokenizer} produced token id {ids_T.max()} outside its vocabulary of {tok.vocab_size}; "
                    f"the tokenizer file is inconsistent."
                )
            writer.add(ids_T)

    try:
        batch, size = [], 0
        for file in job.files:
            for text in iter_documents(file, field=job.field, text_mode=job.text_mode, skip_empty=job.skip_empty):
                batch.append(text)
                size += len(text)
                if size >= _ENCODE_BATCH_BYTES or len(batch) >= 1024:
                    flush(batch)
                    batch, size = [], 0
        if batch:
            flush(batch)
        entry = writer.close()
    except BaseException:
        writer.abort()
        raise
    entry["chunk"] = job.chunk
    return entry


def _run_jobs(jobs: list[_Job], workers: int, total_bytes: int, progress: bool) -> list[dict[str, Any]]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    entries = []
    with Progress(*columns, TimeRemainingColumn(), disable=not progress, transient=False) as bar:
        task = bar.add_task("tokenizing", total=total_bytes)
        done = lambda job: bar.advance(task, sum(os.path.getsize(f) for f in job.files))  # noqa: E731
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                entries.append(_encode_chunk(job, num_threads=-1))
                done(job)
        else:
            # spawn, not fork: the parent may hold JAX or tokenizer thread pools, which do not survive a fork.
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker) as pool:
                futures = {pool.submit(_encode_chunk, job): job for job in jobs}
                try:
                    for fut in cf.as_completed(futures):
                        entries.append(fut.result())
                        done(futures[fut])
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    # Chunks whose documents were all skipped hold no tokens; a zero-length shard cannot be memory-mapped.
    for e in entries:
        if e["num_docs"] == 0:
            for ext in (".bin", ".idx"):
                os.remove(os.path.join(jobs[0].out, e["name"] + ext))
    return [e for e in entries if e["num_docs"] > 0]


# ----------------------------------------------------------------------------------------------------------------
def _chunks(files: list[str], chunk_bytes: int, num_hosts: int) -> list[list[str]]:
    """Consecutive runs of files of about chunk_bytes, small enough that every host gets some 32 of them."""
    total = sum(os.path.getsize(f) for f in files)
    target = max(1, min(chunk_bytes, total // (32 * num_hosts)))
    chunks, current, size = [], [], 0
    for f in files:
        current.append(f)
        size += os.path.getsize(f)
        if size >= target:
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    return chunks


def _check_existing(output_dir: str, fingerprint: str, own_index: str) -> bool:
    """True when this host's index is already there for this fingerprint; an error for another corpus."""
    names = [n for n in os.listdir(output_dir) if n == shards_lib.INDEX or shards_lib._PART_RE.match(n)]
    for name in names:
        try:
            with open(os.path.join(output_dir, name), encoding="utf-8") as f:
                other = json.load(f).get("fingerprint")
        except (OSError, json.JSONDecodeError):
            other = None
        if other != fingerprint:
            raise DataError(
                f"{output_dir} already holds a corpus ({name}) prepared from other inputs, tokenizer or settings; "
                f"choose another --output directory or delete this one."
            )
    return os.path.isfile(own_index)


def _trained_tokenizer(files, output_dir, settings, vocab, host_index, wait_s, say) -> str:
    model = os.path.join(output_dir, "tokenizer.model")
    stamp = os.path.join(output_dir, "tokenizer-train.json")
    keys = ("inputs", "field", "text_mode", "add_bos", "skip_empty", "tokenizer")
    train_print = _digest({k: settings[k] for k in keys})

    def ready() -> bool:
        try:
            with open(stamp, encoding="utf-8") as f:
                return json.load(f)["fingerprint"] == train_print and os.path.isfile(model)
        except (OSError, json.JSONDecodeError, KeyError):
            return False

    if ready():
        return model
    if host_index != 0:
        say(f"waiting for host 0 to train {model} ...")
        deadline = time.monotonic() + wait_s
        while not ready():
            if time.monotonic() > deadline:
                raise DataError(
                    f"host 0 has not written {model} after {wait_s:.0f} s; check host 0, or train the tokenizer "
                    f"once and pass --tokenizer to every host."
                )
            time.sleep(2.0)
        return model
    say(f"training a SentencePiece tokenizer ({vocab} tokens) on a sample of {len(files)} file(s) ...")
    docs = _sample_documents(files, settings, TOKENIZER_SAMPLE_CHARS)
    tok = train_sentencepiece(docs, vocab, os.path.join(output_dir, "tokenizer"), bos=settings["add_bos"])
    shards_lib.atomic_write_json(stamp, {"fingerprint": train_print, "vocab_size": tok.vocab_size})
    say(f"trained {model} ({tok.vocab_size} tokens)")
    return model


def _sample_documents(files: list[str], settings: dict[str, Any], max_chars: int) -> Iterator[str]:
    """Documents from every file in a seeded order, at most an equal share of max_chars from each."""
    per_file = max(max_chars // len(files), 1 << 20)
    seen = 0
    for i in np.random.default_rng(0).permutation(len(files)):
        taken = 0
        kw = {k: settings[k] for k in ("field", "text_mode", "skip_empty")}
        for doc in iter_documents(files[i], **kw):
            yield doc
            taken += len(doc)
            if taken >= per_file:
                break
        seen += taken
        if seen >= max_chars:
            return


def _remove_temporaries(output_dir: str, host_index: int) -> None:
    """Leftovers of an interrupted run of this host (other hosts may be writing theirs right now)."""
    prefix = f"h{host_index:04d}-c"
    for name in os.listdir(output_dir):
        if name.startswith(prefix) and ".tmp-" in name:
            os.remove(os.path.join(output_dir, name))


def _relative_if_inside(path: str, directory: str) -> str:
    path = os.path.abspath(path)
    return os.path.relpath(path, directory) if path.startswith(directory + os.sep) else path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


class _Reporter:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[preprocess] {message}", file=sys.stderr, flush=True)
