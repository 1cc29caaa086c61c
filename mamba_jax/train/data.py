"""The training loop's side of the data pipeline: prepare a raw corpus if the recipe names one, check the
tokenizer against the model, and build this process's train / eval iterators (mamba_jax.data)."""

from __future__ import annotations

import glob
import os

import jax
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from mamba_jax.data import DataConfig, DataError, TokenShards, make_dataset, prepare_corpus
from mamba_jax.models.config import ModelConfig
from mamba_jax.train.config import CorpusConfig


def resolve_data(c: ConfigDict, workdir: str, model_cfg: ModelConfig) -> DataConfig:
    """The recipe's DataConfig, with a prepared corpus (c.corpus) substituted as its shards."""
    data_cfg = DataConfig.from_dict(c.data)
    corpus = CorpusConfig(**c.corpus.to_dict())
    if corpus.inputs:
        out = corpus.output or os.path.join(workdir, "corpus")
        files = sorted(f for pattern in corpus.inputs for f in glob.glob(pattern, recursive=True))
        if not files:
            raise DataError(f"corpus.inputs {list(corpus.inputs)} match no files; fix the paths or globs.")
        # A glob over a source tree catches empty files (__init__.py): skip them rather than stop.
        nonempty = [f for f in files if os.path.getsize(f) > 0]
        if not nonempty:
            raise DataError(f"the corpus input file(s) {files[:3]} are empty; point corpus.inputs at text.")
        if len(nonempty) < len(files) and jax.process_index() == 0:
            print(f"corpus: skipping {len(files) - len(nonempty)} empty file(s) of {len(files)}", flush=True)
        files = nonempty[: corpus.max_files] if corpus.max_files else nonempty
        # Every host tokenizes its share of the files into the shared output directory.
        prepare_corpus(
            files,
            out,
            tokenizer=corpus.tokenizer or None,
            train_tokenizer_vocab=corpus.train_tokenizer_vocab or None,
            field=corpus.field,
            text_mode=corpus.text_mode,
            workers=corpus.workers,
            num_hosts=jax.process_count(),
            host_index=jax.process_index(),
            progress=jax.process_index() == 0,
        )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("mamba_jax corpus prepared")
        data_cfg = data_cfg.replace(kind="shards", paths=(out,))
    if data_cfg.kind == "shards":
        for path in data_cfg.paths:
            vocab = TokenShards(path).vocab_size
            if vocab > model_cfg.vocab_size:
                raise DataError(
                    f"the tokenizer of {path} has {vocab} tokens but the model's vocab_size is "
                    f"{model_cfg.vocab_size}; set model.vocab_size ≥ {vocab} or use the model's tokenizer."
                )
    return data_cfg


def tokenizer_path(data_cfg: DataConfig) -> str | None:
    """The tokenizer the (first) corpus was made with, if any."""
    if data_cfg.kind != "shards" or not data_cfg.paths:
        return None
    return TokenShards(data_cfg.paths[0]).tokenizer_path


def make(data_cfg: DataConfig, split: str, global_batch_size: int, vocab_size: int):
    return make_dataset(
        data_cfg,
        split=split,
        global_batch_size=global_batch_size,
        vocab_size=vocab_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
