"""Training and evaluation batches: `DataConfig` and `make_dataset`, built on grain's MapDataset.

The pipeline (grain's recommended shape, NeMo's data roles): rows (`PackedRows` over a tokenized corpus, or
random tokens for `kind="mock"`, NeMo's MockDataModule) → a seeded shuffle that differs per epoch → repeat
(train) → weighted mix of several corpora → this host's slice of every global batch → batch → read threads and
prefetch. Every stage is index-based, so the iterator state is one batch counter: resuming is exact, and since
host p takes rows [p·B/P, (p+1)·B/P) of each global batch, the global batch and the state do not depend on the
number of processes (a run may resume on another host count).

Held-out documents (`eval_fraction`) are picked by a fixed seed that ignores `seed`, so changing the training
seed never moves evaluation documents into training; the eval split is finite, unshuffled and identical each
time it is made.

Dimension key: B batch rows on this host (global_batch_size / process_count), L seq_len.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from mamba_jax.data.errors import DataError
from mamba_jax.data.packing import PackedRows
from mamba_jax.data.readers import expand_inputs
from mamba_jax.data.sft import SQUAD_TEMPLATE, SFTRows, encode_example, load_split
from mamba_jax.data.shards import TokenShards
from mamba_jax.schema import from_mapping

KINDS = ("mock", "shards", "sft")
SPLITS = ("train", "eval")
_SPLIT_SEED = 20240601  # picks the held-out documents; independent of DataConfig.seed on purpose


@dataclasses.dataclass(frozen=True)
class DataConfig:
    kind: str = "mock"  # "mock" (random tokens), "shards" (corpora made by python -m mamba_jax.preprocess),
    # or "sft" (SQuAD-style JSONL files: prompt / answer with answer-only loss, mamba_jax/data/sft.py)
    paths: tuple[str, ...] = ()  # corpus directories (blended), or SFT files / globs
    weights: tuple[float, ...] = ()  # blending weight per path; empty = equal
    seq_len: int = 4096
    seed: int = 0  # document order, row shuffle, mock tokens
    eval_fraction: float = 0.01  # documents held out of every corpus for the eval split
    num_threads: int = 4  # grain read threads
    prefetch_buffer_size: int = 8  # batches read ahead
    mock_eval_rows: int = 512  # rows of the mock eval split
    tokenizer: str = ""  # sft: the model's tokenizer
    prompt_template: str = SQUAD_TEMPLATE  # sft: how context / question records become prompts

    def __post_init__(self):
        # Lists arrive from ConfigDicts and JSON; keep the dataclass hashable.
        paths = (self.paths,) if isinstance(self.paths, str) else self.paths
        object.__setattr__(self, "paths", tuple(str(p) for p in paths))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        self.validate()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Build from a mapping (ConfigDict, JSON); unknown keys fail with the nearest valid name."""
        return from_mapping(cls, d, error=DataError)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> DataConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"data kind must be one of {KINDS}, got {self.kind!r}.")
        if self.kind == "sft" and not self.paths:
            raise DataError("data kind 'sft' needs data.paths: JSONL files of context / question / answers records.")
        if self.kind == "shards" and not self.paths:
            raise DataError("data kind 'shards' needs data.paths: the corpus directories made by mamba_jax.preprocess.")
        if self.weights and len(self.weights) != len(self.paths):
            raise DataError(f"data.weights has {len(self.weights)} values for {len(self.paths)} data.paths.")
        if any(w <= 0 for w in self.weights):
            raise DataError(f"data.weights must be positive, got {self.weights}.")
        if self.seq_len < 1:
            raise DataError(f"data.seq_len must be positive, got {self.seq_len}.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DataError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.num_threads < 0 or self.prefetch_buffer_size < 0 or self.mock_eval_rows < 0:
            raise DataError("data.num_threads, data.prefetch_buffer_size and data.mock_eval_rows must be ≥ 0.")


# ----------------------------------------------------------------------------------------------------------------
class MockRows:
    """Uniform random tokens in [0, vocab_size), row i a pure function of (seed, stream, i); one document per row."""

    def __init__(self, seq_len: int, vocab_size: int, seed: int, length: int, stream: int):
        self.seq_len, self.vocab_size, self.seed, self.length, self.stream = seq_len, vocab_size, seed, length, stream

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.stream, i])
        tokens_T = rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int32)
        L = self.seq_len
        return {
            "input_ids": tokens_T[:-1],
            "labels": tokens_T[1:],
            "seq_idx": np.zeros(L, np.int32),
            "loss_mask": np.ones(L, np.float32),
        }


def split_documents(num_docs: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) document ids, each sorted; the eval share is round(fraction · docs), at least 1 if asked."""
    n_eval = 0 if eval_fraction == 0 else min(num_docs - 1, max(1, round(eval_fraction * num_docs)))
    perm_D = np.random.default_rng([_SPLIT_SEED, num_docs]).permutation(num_docs)
    return np.sort(perm_D[n_eval:]), np.sort(perm_D[:n_eval])


class _HostRows(grain.transforms.DatasetSelectionMap):
    """Row j of host p = row (j // B) · B_global + p · B + j % B of the global stream."""

    def __init__(self, num_batches: int, global_batch: int, per_host: int, host: int):
        self.num_batches, self.global_batch, self.per_host, self.host = num_batches, global_batch, per_host, host

    def __len__(self) -> int:
        return self.num_batches * self.per_host

    def __getitem__(self, j: int) -> tuple[int, int]:
        batch, k = divmod(j, self.per_host)
        return 0, batch * self.global_batch + self.host * self.per_host + k


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _open_corpora(cfg: DataConfig, vocab_size: int) -> list[TokenShards]:
    corpora = [TokenShards(p) for p in cfg.paths]
    for c in corpora:
        if c.vocab_size > vocab_size:
            raise DataError(
                f"the tokenizer of {c.directory} has {c.vocab_size} tokens but the model's vocab_size is "
                f"{vocab_size}; set model.vocab_size ≥ {c.vocab_size} or use the model's tokenizer."
            )
    tokenizers = {(c.index.get("tokenizer_sha256"), c.vocab_size, c.eos_id) for c in corpora}
    if len(tokenizers) > 1:
        raise DataError(
            f"data.paths mixes corpora made with different tokenizers ({', '.join(cfg.paths)}); "
            f"preprocess them all with the same --tokenizer."
        )
    return corpora


def _corpus_rows(cfg: DataConfig, split: str, vocab_size: int) -> tuple[grain.MapDataset, list[str]]:
    corpora = _open_corpora(cfg, vocab_size)
    parts = []
    for i, corpus in enumerate(corpora):
        train_D, eval_D = split_documents(corpus.num_docs, cfg.eval_fraction)
        if split == "eval":
            rows = PackedRows(corpus, eval_D, cfg.seq_len)
            parts.append(grain.MapDataset.source(rows))
            continue
        order_D = np.random.default_rng(_seed(cfg.seed, i, 0)).permutation(train_D)
        rows = PackedRows(corpus, order_D, cfg.seq_len)
        if len(rows) == 0:
            raise DataError(
                f"the training documents of {corpus.directory} hold {rows.num_tokens} tokens, fewer than one row "
                f"of data.seq_len + 1 = {cfg.seq_len + 1}; lower data.seq_len or add data."
            )
        # repeat() reseeds the shuffle each epoch: same rows, another order.
        parts.append(grain.MapDataset.source(rows).shuffle(seed=_seed(cfg.seed, i, 1)).repeat())
    if split == "eval":
        parts = [p for p in parts if len(p)]
        return (grain.MapDataset.concatenate(parts) if parts else None), [c.fingerprint for c in corpora]
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights=list(cfg.weights) or None)
    return mixed, [c.fingerprint for c in corpora]


def _sft_rows(cfg: DataConfig, split: str, vocab_size: int, global_batch_size: int):
    tok, train_ex, eval_ex = load_split(cfg.paths, cfg.tokenizer, cfg.prompt_template, cfg.eval_fraction)
    if tok.vocab_size > vocab_size:
        raise DataError(
            f"the tokenizer {cfg.tokenizer} has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}; "
            f"use the model's tokenizer."
        )
    examples = train_ex if split == "train" else eval_ex
    encoded = [encode_example(tok, ex, cfg.seq_len) for ex in examples]
    if split == "eval" and encoded:
        # Every held-out example counts: fill the last batch with fully masked copies.
        fill = (-len(encoded)) % global_batch_size
        encoded += [(ids, len(ids) + 1) for ids, _ in encoded[:1]] * fill
    source = grain.MapDataset.source(SFTRows(encoded, cfg.seq_len))
    fingerprint = [f"{p}:{os.path.getsize(p)}" for p in expand_inputs(cfg.paths)] + [f"examples:{len(examples)}"]
    if split == "eval":
        return source, fingerprint
    return source.shuffle(seed=_seed(cfg.seed, 0, 1)).repeat(), fingerprint


class DataIterator:
    """Batches (dicts of numpy arrays) with grain's exact resume: `get_state()` is small and JSON-serializable."""

    def __init__(self, iterator: grain.DatasetIterator, description: dict[str, Any], num_batches: int | None):
        self._it = iterator
        self.description = description
        self.num_batches = num_batches  # batches of the eval split; None for the endless train split

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return {"data": self.description, "grain": self._it.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get("data", {})
        changed = sorted(k for k in set(saved) | set(self.description) if saved.get(k) != self.description.get(k))
        if changed:
            diffs = "; ".join(f"{k}: {saved.get(k)!r} → {self.description.get(k)!r}" for k in changed)
            raise DataError(
                f"the data position was saved for another data pipeline ({diffs}); resuming would not continue the "
                f"same stream. Restore the data settings of the checkpoint or start a new run."
            )
        self._it.set_state(dict(state["grain"]))

    def close(self) -> None:
        self._it.close()


def make_dataset(
    cfg: DataConfig,
    *,
    split: str = "train",
    global_batch_size: int,
    vocab_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> DataIterator:
    """Iterator over this process's part of each global batch: dicts of (B, L) arrays, B = global / processes.

    Keys: input_ids, labels, seq_idx (int32) and loss_mask (float32). The train split is endless, the eval
    split stops after its `num_batches` (incomplete last batch dropped).
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}.")
    if global_batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(
            f"bad batch layout: global_batch_size={global_batch_size}, process {process_index} of {process_count}."
        )
    if global_batch_size % process_count:
        raise DataError(
            f"global batch size {global_batch_size} is not divisible by the {process_count} processes; "
            f"choose a multiple of {process_count}."
        )
    if cfg.kind == "mock":
        length = sys.maxsize if split == "train" else cfg.mock_eval_rows
        rows = grain.MapDataset.source(MockRows(cfg.seq_len, vocab_size, cfg.seed, length, SPLITS.index(split)))
        corpora = []
    elif cfg.kind == "sft":
        rows, corpora = _sft_rows(cfg, split, vocab_size, global_batch_size)
    else:
        rows, corpora = _corpus_rows(cfg, split, vocab_size)
    num_rows = 0 if rows is None else len(rows)
    num_batches = num_rows // global_batch_size
    if num_batches == 0:
        where = "the mock eval split (data.mock_eval_rows)" if cfg.kind == "mock" else "the held-out documents"
        raise DataError(
            f"{where} make {num_rows} rows of {cfg.seq_len} tokens, fewer than one global batch of "
            f"{global_batch_size}; raise data.eval_fraction (or mock_eval_rows) or lower the eval batch size."
            if split == "eval"
            else f"the dataset is empty: {num_rows} rows for a global batch of {global_batch_size}."
        )
    per_host = global_batch_size // process_count
    selection = _HostRows(num_batches, global_batch_size, per_host, process_index)
    ds = grain.MapDataset.select_from_datasets([rows], selection).batch(per_host, drop_remainder=True)
    options = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size)
    description = {
        "kind": cfg.kind,
        "split": split,
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "global_batch_size": global_batch_size,
        "eval_fraction": cfg.eval_fraction,
        "weights": list(cfg.weights),
        "corpora": corpora,
    }
    if cfg.kind == "mock":
        description["vocab_size"] = vocab_size
    return DataIterator(iter(ds.to_iter_dataset(options)), description, None if split == "train" else num_batches)
