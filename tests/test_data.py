"""Packing, the grain pipeline (resume, per-host sharding, blending, eval split), mock data and corpus validation."""

import json
import os

import numpy as np
import pytest

from mamba_jax.data import DataConfig, DataError, PackedRows, TokenShards, make_dataset
from mamba_jax.data.pipeline import split_documents
from mamba_jax.data.shards import write_corpus


class ListDocs:
    """Documents held in memory, for packing tests."""

    def __init__(self, docs):
        self.docs = [np.asarray(d) for d in docs]

    def doc(self, i):
        return self.docs[i]

    def doc_lengths(self):
        return np.array([len(d) for d in self.docs])


def naive_rows(docs, order, seq_len):
    """Sequential packer: concatenate, remember each token's document, cut overlapping windows."""
    tokens, owner = [], []
    for k, d in enumerate(order):
        tokens += list(docs[d])
        owner += [k] * len(docs[d])
    rows = []
    for start in range(0, len(tokens) - seq_len, seq_len):
        t = np.array(tokens[start : start + seq_len + 1])
        o = np.array(owner[start : start + seq_len + 1])
        seq_idx = np.cumsum(np.concatenate([[0], o[1:] != o[:-1]]))
        rows.append((t[:-1], t[1:], seq_idx[:-1], (o[1:] == o[:-1]).astype(np.float32)))
    return rows


def random_docs(rng, n, vocab=1000, max_len=40):
    return [rng.integers(2, vocab, rng.integers(1, max_len)) for _ in range(n)]


def tagged_corpus(path, n_docs, tag, rng, max_len=30, vocab_size=None):
    """A corpus whose document d is made only of token tag + d: any token tells its corpus and document."""
    docs = [np.full(rng.integers(5, max_len), tag + d) for d in range(n_docs)]
    return write_corpus(path, docs, vocab_size=vocab_size or tag + n_docs + 1, eos_id=0)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------------------------------------------
def test_packing_hand_made_documents():
    rows = PackedRows(ListDocs([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]), np.arange(3), seq_len=4)
    assert len(rows) == 2  # (10 tokens - 1) // 4
    r0, r1 = rows[0], rows[1]
    np.testing.assert_array_equal(r0["input_ids"], [1, 2, 3, 4])
    np.testing.assert_array_equal(r0["labels"], [2, 3, 4, 5])
    np.testing.assert_array_equal(r0["seq_idx"], [0, 0, 0, 1])
    np.testing.assert_array_equal(r0["loss_mask"], [1, 1, 0, 1])  # 3 → 4 crosses into the next document
    np.testing.assert_array_equal(r1["input_ids"], [5, 6, 7, 8])
    np.testing.assert_array_equal(r1["labels"], [6, 7, 8, 9])
    np.testing.assert_array_equal(r1["seq_idx"], [0, 1, 1, 1])
    np.testing.assert_array_equal(r1["loss_mask"], [0, 1, 1, 1])
    assert r0["input_ids"].dtype == np.int32 and r0["loss_mask"].dtype == np.float32
    with pytest.raises(IndexError):
        rows[2]


def test_packing_long_document_continues_in_next_row():
    rows = PackedRows(ListDocs([[7] * 3, list(range(10, 22))]), np.array([0, 1]), seq_len=4)
    np.testing.assert_array_equal(rows[1]["input_ids"], [11, 12, 13, 14])  # stream 7 7 7 10 | 11 ..
    np.testing.assert_array_equal(rows[1]["seq_idx"], [0, 0, 0, 0])
    np.testing.assert_array_equal(rows[1]["loss_mask"], [1, 1, 1, 1])


@pytest.mark.parametrize("seq_len", [1, 3, 16, 57])
def test_random_access_rows_equal_sequential_packer(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = random_docs(rng, 60)
    order = rng.permutation(60)
    rows = PackedRows(ListDocs(docs), order, seq_len)
    expected = naive_rows(docs, order, seq_len)
    assert len(rows) == len(expected) > 0
    for i in rng.permutation(len(rows)):  # any order: rows are independent
        for key, want in zip(("input_ids", "labels", "seq_idx", "loss_mask"), expected[i]):
            np.testing.assert_array_equal(rows[i][key], want, err_msg=f"row {i} {key}")


def test_masked_labels_are_exactly_the_within_document_pairs():
    # The loss of a packed row counts the same (input, label) pairs as the documents run alone.
    docs = [[d * 100 + j for j in range(n)] for d, n in enumerate([5, 1, 9, 3, 12, 2])]
    rows = PackedRows(ListDocs(docs), np.arange(len(docs)), seq_len=sum(map(len, docs)) - 1)  # one row: all
    row = rows[0]
    pairs = {(int(a), int(b)) for a, b, m in zip(row["input_ids"], row["labels"], row["loss_mask"]) if m}
    alone = {(d[j], d[j + 1]) for d in docs for j in range(len(d) - 1)}
    assert len(rows) == 1 and pairs == alone


# ----------------------------------------------------------------------------------------------------------------
def test_token_shards_round_trip_and_validation(tmp_path, monkeypatch):
    monkeypatch.setattr("mamba_jax.data.shards.MAX_OPEN_SHARDS", 2)  # reopening evicted shards must work
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 25, vocab=70000)
    shards = write_corpus(tmp_path / "c", docs, vocab_size=70000, eos_id=1, docs_per_shard=7)
    assert shards.dtype == np.uint32 and len(shards.shards) == 4
    assert shards.num_docs == 25 and shards.num_tokens == sum(map(len, docs))
    np.testing.assert_array_equal(shards.doc_lengths(), [len(d) for d in docs])
    for i in (0, 6, 7, 24, 0, 13):
        assert isinstance(shards.doc(i), np.memmap)
        np.testing.assert_array_equal(shards.doc(i), docs[i])

    with pytest.raises(DataError, match="does not exist"):
        TokenShards(tmp_path / "missing")
    os.makedirs(tmp_path / "bare")
    with pytest.raises(DataError, match="holds no corpus"):
        TokenShards(tmp_path / "bare")
    with pytest.raises(DataError, match="empty"):
        write_corpus(tmp_path / "empty", [], vocab_size=10, eos_id=0)
    # A truncated .bin disagrees with its index.
    name = shards.shards[1]["name"]
    with open(tmp_path / "c" / f"{name}.bin", "r+b") as f:
        f.truncate(8)
    with pytest.raises(DataError, match=f"{name}.bin has 8 bytes"):
        TokenShards(tmp_path / "c")


# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tagged_corpus(tmp_path_factory.mktemp("corpus"), 120, 10, np.random.default_rng(1)).directory


def shards_cfg(paths, **kw):
    return DataConfig(kind="shards", paths=tuple(paths), seq_len=kw.pop("seq_len", 16), num_threads=2, **kw)


def test_batches_shapes_and_packing(corpus):
    it = make_dataset(shards_cfg([corpus]), global_batch_size=4, vocab_size=200)
    batch = next(it)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "input_ids": ((4, 16), np.int32),
        "labels": ((4, 16), np.int32),
        "seq_idx": ((4, 16), np.int32),
        "loss_mask": ((4, 16), np.float32),
    }
    # Tagged documents: a label is in the same document as its input exactly where the mask is 1.
    same_doc = batch["labels"] == batch["input_ids"]
    np.testing.assert_array_equal(batch["loss_mask"] == 1, same_doc)


def test_exact_resume_across_epochs(corpus):
    cfg = shards_cfg([corpus])
    make = lambda: make_dataset(cfg, global_batch_size=8, vocab_size=200)  # noqa: E731
    uninterrupted = take(make(), 40)  # ~2 epochs of ~150 rows
    first = make()
    take(first, 13)
    state = json.loads(json.dumps(first.get_state()))
    resumed = make()
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 27), uninterrupted[13:])
    # Epochs see the same rows in another order.
    rows_per_epoch = len(PackedRows(TokenShards(corpus), split_documents(120, cfg.eval_fraction)[0], 16))
    flat = np.concatenate([b["input_ids"] for b in uninterrupted])
    e0, e1 = flat[:rows_per_epoch], flat[rows_per_epoch : 2 * rows_per_epoch]
    assert not np.array_equal(e0, e1)
    assert sorted(map(tuple, e0)) == sorted(map(tuple, e1))


def test_resume_refuses_another_pipeline(corpus):
    it = make_dataset(shards_cfg([corpus]), global_batch_size=8, vocab_size=200)
    state = it.get_state()
    other = make_dataset(shards_cfg([corpus], seed=1), global_batch_size=8, vocab_size=200)
    with pytest.raises(DataError, match="seed: 0 → 1"):
        other.set_state(state)


def test_per_host_slices_make_the_global_batch(corpus):
    cfg = shards_cfg([corpus], seed=3)
    one = take(make_dataset(cfg, global_batch_size=8, vocab_size=200), 5)
    hosts = [take(make_dataset(cfg, global_batch_size=8, vocab_size=200, process_index=p, process_count=2), 5)
             for p in range(2)]  # fmt: skip
    assert hosts[0][0]["input_ids"].shape == (4, 16)
    joined = [{k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*hosts)]
    assert_batches_equal(joined, one)
    with pytest.raises(DataError, match="not divisible by the 3 processes"):
        make_dataset(cfg, global_batch_size=8, vocab_size=200, process_count=3)


def test_blending_follows_the_weights(tmp_path):
    rng = np.random.default_rng(2)
    a = tagged_corpus(tmp_path / "a", 60, 10, rng, vocab_size=200).directory  # tokens 10..69
    b = tagged_corpus(tmp_path / "b", 60, 100, rng, vocab_size=200).directory  # tokens 100..159
    cfg = shards_cfg([a, b], weights=(3.0, 1.0), seq_len=8)
    batches = take(make_dataset(cfg, global_batch_size=16, vocab_size=200), 25)
    first_token = np.concatenate([x["input_ids"][:, 0] for x in batches])
    share_a = np.mean(first_token < 100)
    assert abs(share_a - 0.75) < 0.05, share_a


def test_eval_split_is_held_out_finite_and_deterministic(corpus):
    cfg = shards_cfg([corpus], eval_fraction=0.2)
    ev = list(make_dataset(cfg, split="eval", global_batch_size=2, vocab_size=200))
    again = make_dataset(cfg, split="eval", global_batch_size=2, vocab_size=200)
    assert len(ev) == again.num_batches > 0
    assert_batches_equal(list(again), ev)
    train = take(make_dataset(cfg, global_batch_size=8, vocab_size=200), 40)
    eval_tokens = set(np.concatenate([b["input_ids"].ravel() for b in ev]).tolist())
    train_tokens = set(np.concatenate([b["input_ids"].ravel() for b in train]).tolist())
    assert eval_tokens and not eval_tokens & train_tokens  # tagged documents: no document in both
    # The held-out documents do not depend on the training seed.
    assert_batches_equal(list(make_dataset(cfg.replace(seed=9), split="eval", global_batch_size=2, vocab_size=200)), ev)


def test_dataset_errors(corpus, tmp_path):
    with pytest.raises(
        DataError, match=r"has 131 tokens but the model's vocab_size is 100; set model.vocab_size ≥ 131"
    ):
        make_dataset(shards_cfg([corpus]), global_batch_size=8, vocab_size=100)
    with pytest.raises(DataError, match=r"lower data\.seq_len"):
        make_dataset(shards_cfg([corpus], seq_len=100_000), global_batch_size=8, vocab_size=200)
    with pytest.raises(DataError, match="held-out"):
        make_dataset(shards_cfg([corpus], eval_fraction=0.0), split="eval", global_batch_size=8, vocab_size=200)
    with pytest.raises(DataError, match="does not exist"):
        make_dataset(shards_cfg([tmp_path / "nope"]), global_batch_size=8, vocab_size=200)
    with pytest.raises(DataError, match="did you mean 'seq_len'"):
        DataConfig.from_dict({"kind": "mock", "seqlen": 128})
    with pytest.raises(DataError, match=r"needs data\.paths"):
        DataConfig(kind="shards")
    other = tagged_corpus(tmp_path / "other", 10, 10, np.random.default_rng(0)).directory
    with pytest.raises(DataError, match="different tokenizers"):
        make_dataset(shards_cfg([corpus, other]), global_batch_size=8, vocab_size=200)


def test_mock_data_is_deterministic():
    cfg = DataConfig.from_dict({"kind": "mock", "seq_len": 32, "seed": 5, "num_threads": 0})
    a = take(make_dataset(cfg, global_batch_size=4, vocab_size=50), 3)
    b = take(make_dataset(cfg, global_batch_size=4, vocab_size=50), 3)
    assert_batches_equal(a, b)
    c = next(make_dataset(cfg.replace(seed=6), global_batch_size=4, vocab_size=50))
    assert not np.array_equal(a[0]["input_ids"], c["input_ids"])
    x = a[0]
    assert x["input_ids"].min() >= 0 and x["input_ids"].max() < 50 and len(np.unique(x["input_ids"])) > 25
    np.testing.assert_array_equal(x["input_ids"][:, 1:], x["labels"][:, :-1])
    assert not x["seq_idx"].any() and x["loss_mask"].all()
    half = take(make_dataset(cfg, global_batch_size=4, vocab_size=50, process_index=1, process_count=2), 3)
    np.testing.assert_array_equal(half[2]["input_ids"], a[2]["input_ids"][2:])
    ev = list(make_dataset(cfg.replace(mock_eval_rows=10), split="eval", global_batch_size=4, vocab_size=50))
    assert len(ev) == 2 and not np.array_equal(ev[0]["input_ids"], a[0]["input_ids"])
