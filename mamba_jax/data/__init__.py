"""Data: tokenizers, tokenized corpora on disk, the preprocessor, packing and the grain input pipeline.

load_tokenizer / train_sentencepiece      tokenizer.py  (SentencePiece .model, Hugging Face tokenizer.json)
TokenShards                               shards.py     (the on-disk corpus format, read by memory map)
prepare_corpus                            preprocess.py (raw text / JSONL → shards; `python -m mamba_jax.preprocess`)
PackedRows                                packing.py    (rows with seq_idx / loss_mask at document boundaries)
DataConfig / make_dataset                 pipeline.py   (train / eval batches with exact resume)
"""

from mamba_jax.data.errors import DataError
from mamba_jax.data.packing import PackedRows
from mamba_jax.data.pipeline import DataConfig, DataIterator, make_dataset
from mamba_jax.data.preprocess import prepare_corpus
from mamba_jax.data.shards import TokenShards
from mamba_jax.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

__all__ = [
    "DataConfig",
    "DataError",
    "DataIterator",
    "PackedRows",
    "TokenShards",
    "Tokenizer",
    "load_tokenizer",
    "make_dataset",
    "prepare_corpus",
    "train_sentencepiece",
]
