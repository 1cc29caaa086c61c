"""Packing documents into fixed-length training rows that keep their document boundaries (`seq_idx`).

Megatron's GPTDataset is the model: the documents, in a seeded order, are concatenated into one token stream,
and row i is the window [i·L, i·L + L + 1) of it (consecutive rows share one token so that every token is a
label once); a document longer than what is left of a row continues in the next one. Row i is computed
directly (a binary search over the cumulative lengths), so any row can be read in any order: a grain MapDataset
over rows resumes exactly and cheaply.

Unlike Megatron, which lets attention and state flow across documents, each row carries `seq_idx` (the document
number of each input position; the model resets the SSM state, the conv window and attention there) and a
`loss_mask` that is 0 where the label is the first token of the next document: after a reset that token cannot
be predicted from the previous document. The per-token losses of packed documents then equal those of each
document run alone (except for a document split across rows, whose second part starts without its context).

Dimension key: L row length (seq_len), T = L + 1 tokens cut per row, D documents.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Documents(Protocol):
    """What packing needs from a corpus; `TokenShards` is one."""

    def doc(self, i: int) -> np.ndarray: ...

    def doc_lengths(self) -> np.ndarray: ...


def row_features(tokens_T: np.ndarray, doc_T: np.ndarray) -> dict[str, np.ndarray]:
    """The training example of one row of T = L + 1 tokens and the document number of each token."""
    return {
        "input_ids": tokens_T[:-1].astype(np.int32),
        "labels": tokens_T[1:].astype(np.int32),
        "seq_idx": doc_T[:-1].astype(np.int32),
        "loss_mask": (doc_T[1:] == doc_T[:-1]).astype(np.float32),
    }


class PackedRows:
    """Random-access rows of `seq_len + 1` tokens cut from the documents `order_D` of `docs`, in that order.

    `rows[i]` is a dict of (L,) arrays: input_ids, labels, seq_idx (int32) and loss_mask (float32).
    """

    def __init__(self, docs: Documents, order_D: np.ndarray, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}.")
        lengths_D = np.asarray(docs.doc_lengths(), dtype=np.int64)[order_D]
        self._docs = docs
        self._order_D = np.asarray(order_D, dtype=np.int64)[lengths_D > 0]  # an empty document has no position
        lengths_D = lengths_D[lengths_D > 0]
        self._start_D = np.zeros(len(lengths_D) + 1, dtype=np.int64)  # start of each document in the stream
        np.cumsum(lengths_D, out=self._start_D[1:])
        self.seq_len = seq_len
        self.num_tokens = int(self._start_D[-1])
        self.num_rows = max(0, (self.num_tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} out of range [0, {self.num_rows}).")
        start = i * self.seq_len
        stop = start + self.seq_len + 1
        first = int(np.searchsorted(self._start_D, start, side="right")) - 1
        last = int(np.searchsorted(self._start_D, stop - 1, side="right")) - 1
        pieces = []
        for k in range(first, last + 1):
            doc = self._docs.doc(int(self._order_D[k]))
            offset = self._start_D[k]
            pieces.append(doc[max(start - offset, 0) : stop - offset])
        tokens_T = np.concatenate(pieces)
        # +1 at every document start inside the row (never at position 0: that document is number 0).
        doc_T = np.zeros(self.seq_len + 1, dtype=np.int32)
        doc_T[self._start_D[first + 1 : last + 1] - start] = 1
        return row_features(tokens_T, np.cumsum(doc_T))
