"""SFT data: SQuAD-format records → prompt + answer rows whose loss mask covers exactly the answer tokens."""

import json

import numpy as np
import pytest

from mamba_jax.data import DataConfig, DataError, make_dataset, train_sentencepiece
from mamba_jax.data.sft import SQUAD_TEMPLATE, SFTExample, encode_example, read_sft

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "blue", "red", "green", "birds", "sang"]


def _records(n, rng):
    out = []
    for i in range(n):
        color = WORDS[8 + i % 3]
        context = " ".join(rng.choice(WORDS, 12)) + f" the answer is {color} today"
        out.append({"context": context, "question": "what is the answer?", "answers": {"text": [color, "x"]}})
    return out


@pytest.fixture(scope="module")
def tok_and_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    rng = np.random.default_rng(0)
    recs = _records(60, rng)
    jsonl = tmp / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    squad = tmp / "squad.json"
    squad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c1 blue", "qas": [
        {"question": "q?", "answers": [{"text": "blue"}]}, {"question": "none?", "answers": [], "is_impossible": True}
    ]}]}]}))  # fmt: skip
    texts = [SQUAD_TEMPLATE.format(**r) + " " + r["answers"]["text"][0] for r in recs]
    tok = train_sentencepiece(texts * 5, 320, tmp / "tok")
    return tok, jsonl, squad


def test_read_formats(tok_and_files):
    _, jsonl, squad = tok_and_files
    ex = read_sft([str(jsonl)])
    assert len(ex) == 60 and ex[0].prompt.startswith("Context: ") and ex[0].prompt.endswith("Answer:")
    assert ex[0].answers[1] == "x"
    sq = read_sft([str(squad)])
    assert sq == [SFTExample("Context: c1 blue Question: q? Answer:", ("blue",))]
    io = read_sft([str(jsonl)], template="{question}")  # the template is configurable
    assert io[0].prompt == "what is the answer?"


def test_loss_mask_covers_exactly_the_answer(tok_and_files):
    tok, jsonl, _ = tok_and_files
    cfg = DataConfig(kind="sft", paths=(str(jsonl),), tokenizer=tok.path, seq_len=64, eval_fraction=0.1)
    batch = next(make_dataset(cfg, split="train", global_batch_size=4, vocab_size=512))
    ex = read_sft([str(jsonl)])
    answers = {tuple(tok.encode(" " + e.answers[0]) + [tok.eos_id]) for e in ex}
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["loss_mask"], strict=True):
        masked = tuple(labels[mask == 1].tolist())
        assert masked in answers  # exactly " answer" + EOS, nothing of the prompt, no padding
        first = int(np.argmax(mask))
        assert tok.decode(ids[: first + 1].tolist()).endswith("Answer:")


def test_truncation_keeps_the_question_and_the_answer(tok_and_files):
    tok, _, _ = tok_and_files
    long = SFTExample("Context: " + "the cat sat on a mat " * 40 + "Question: what? Answer:", ("blue",))
    ids, n_prompt = encode_example(tok, long, seq_len=32)
    assert len(ids) == 33 and tok.decode(ids[:n_prompt]).endswith("Question: what? Answer:")
    assert ids[n_prompt:] == tok.encode(" blue") + [tok.eos_id]


def test_eval_split_is_held_out_and_complete(tok_and_files):
    tok, jsonl, _ = tok_and_files
    cfg = DataConfig(kind="sft", paths=(str(jsonl),), tokenizer=tok.path, seq_len=64, eval_fraction=0.1)
    ev = list(make_dataset(cfg, split="eval", global_batch_size=4, vocab_size=512))
    # 6 held-out examples fill two batches of 4, the last padded with fully masked rows.
    assert len(ev) == 2 and int(sum((b["loss_mask"].sum(-1) > 0).sum() for b in ev)) == 6


def test_errors(tok_and_files, tmp_path):
    tok, jsonl, _ = tok_and_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "question": "q", "answers": []}\n{"oops"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: no answer"):
        read_sft([str(bad)])
    bad.write_text('{"context": "c", "question": "q", "answer": "a"}\n{"oops"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_sft([str(bad)])
    with pytest.raises(DataError, match=r"needs data\.tokenizer"):
        make_dataset(DataConfig(kind="sft", paths=(str(jsonl),)), global_batch_size=2, vocab_size=512)
    with pytest.raises(DataError, match="vocab_size is 256"):
        cfg = DataConfig(kind="sft", paths=(str(jsonl),), tokenizer=tok.path, seq_len=64)
        make_dataset(cfg, global_batch_size=2, vocab_size=256)
