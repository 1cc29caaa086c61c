"""Tokenizers (SentencePiece and Hugging Face) and the preprocessor: workers, hosts, the CLI and bad inputs."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mamba_jax.data import DataError, TokenShards, load_tokenizer, prepare_corpus, train_sentencepiece
from mamba_jax.data.shards import token_dtype_for
from mamba_jax.preprocess import main as cli_main

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORDS = ["the", "of", "model", "state", "token", "mamba", "scan", "def", "return", "self", "x", "42", "é", "中文"]


def random_text(rng, n_words):
    words = rng.choice(WORDS, n_words)
    return "".join(w + rng.choice([" ", " ", " ", "\n", "\n    ", ", "]) for w in words).strip()


def write_inputs(directory, rng):
    """Two JSONL files (one object per line, an extra field) and two text files; returns the expected documents."""
    directory.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name in ("a0.jsonl", "a1.jsonl"):
        docs = [random_text(rng, rng.integers(3, 40)) for _ in range(int(rng.integers(5, 15)))]
        lines = [json.dumps({"id": i, "text": d}) for i, d in enumerate(docs)]
        (directory / name).write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n", encoding="utf-8")
        expected[str(directory / name)] = docs
    for name in ("b0.txt", "b1.txt"):
        text = random_text(rng, 80)
        (directory / name).write_text(text, encoding="utf-8")
        expected[str(directory / name)] = [text]
    return [d for f in sorted(expected) for d in expected[f]]


@pytest.fixture(scope="module")
def hf_tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        show_progress=False,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rng = np.random.default_rng(0)
    tok.train_from_iterator([random_text(rng, 50) for _ in range(200)], trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


# ----------------------------------------------------------------------------------------------------------------
def test_sentencepiece_train_and_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    corpus_file = tmp_path / "code.py"
    corpus_file.write_text("\n".join(random_text(rng, 30) for _ in range(50)), encoding="utf-8")
    texts = [random_text(rng, 30) for _ in range(100)] + ["x" * 50_000]  # a line longer than SentencePiece takes
    tok = train_sentencepiece([corpus_file, *texts], 400, tmp_path / "tok" / "sp")
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (1, None, None) and 300 <= tok.vocab_size <= 400
    samples = ["def f(x):\n\treturn x  # ü 🙂", "  leading spaces\n\n", random_text(rng, 60), "42 1234567"]
    for text in samples:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(samples) == [tok.encode(t) for t in samples]
    assert len(tok.encode("1234567")) == 7  # split_digits
    same = load_tokenizer(tmp_path / "tok")  # the folder finds the one .model
    assert same.encode(samples[2]) == tok.encode(samples[2]) and same.path == tok.path
    with_bos = train_sentencepiece(texts, 350, tmp_path / "bos", bos=True)
    assert with_bos.bos_id == 2 and with_bos.eos_id == 1
    with pytest.raises(DataError, match="at least 300"):
        train_sentencepiece(texts, 100, tmp_path / "small")


def test_huggingface_tokenizer_round_trip(hf_tokenizer_json, tmp_path):
    tok = load_tokenizer(hf_tokenizer_json)
    assert tok.eos_id == 0 and tok.bos_id is None and 256 < tok.vocab_size <= 400
    text = "def f(x):\n    return x  # é 中文 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([*tok.encode(text), tok.eos_id]) == text  # special tokens are dropped
    assert tok.encode_batch([text, "y"]) == [tok.encode(text), tok.encode("y")]
    # A folder with both formats: tokenizer.json wins; tokenizer_config.json names the special tokens.
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(hf_tokenizer_json.read_bytes())
    train_sentencepiece([random_text(np.random.default_rng(2), 500)], 320, folder / "tokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    assert type(load_tokenizer(folder)).__name__ == "HuggingFaceTokenizer"


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="is not a SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "bad.json").write_text('{"vocab": [1, 2]}')
    with pytest.raises(DataError, match=r"is not a Hugging Face tokenizer\.json"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="is not a tokenizer file"):
        load_tokenizer(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------------------
def read_docs(directory):
    shards = TokenShards(directory)
    return [shards.doc(i).tolist() for i in range(shards.num_docs)]


def test_two_hosts_two_workers_equal_direct_tokenization(hf_tokenizer_json, tmp_path):
    texts = write_inputs(tmp_path / "raw", np.random.default_rng(3))
    tok = load_tokenizer(hf_tokenizer_json)
    expected = [[*tok.encode(t), tok.eos_id] for t in texts]
    inputs = [str(tmp_path / "raw" / "*.jsonl"), str(tmp_path / "raw" / "*.txt")]
    out = tmp_path / "corpus"
    kw = dict(tokenizer=hf_tokenizer_json, workers=2, num_hosts=2, progress=False)
    prepare_corpus(inputs, out, host_index=1, **kw)
    with pytest.raises(DataError, match=r"incomplete: host\(s\) \[0\] of 2"):
        TokenShards(out)
    prepare_corpus(inputs, out, host_index=0, **kw)
    assert sorted(p.name for p in out.glob("index*.json")) == ["index-host-00000-of-00002.json",
                                                               "index-host-00001-of-00002.json"]  # fmt: skip
    assert {p.name[:5] for p in out.glob("*.bin")} == {"h0000", "h0001"}
    shards = TokenShards(out)
    assert shards.dtype == np.uint16 and shards.vocab_size == tok.vocab_size and shards.eos_id == tok.eos_id
    assert read_docs(out) == expected
    assert load_tokenizer(shards.tokenizer_path).path == tok.path
    # One host, one worker: the same corpus, document for document.
    prepare_corpus(inputs, tmp_path / "single", tokenizer=hf_tokenizer_json, progress=False)
    assert read_docs(tmp_path / "single") == expected
    # Idempotent: the same call again leaves the finished corpus alone.
    part = out / "index-host-00000-of-00002.json"
    before = part.stat().st_mtime_ns
    prepare_corpus(inputs, out, host_index=0, **kw)
    assert part.stat().st_mtime_ns == before
    # Another corpus into the same directory is refused.
    with pytest.raises(DataError, match="already holds a corpus"):
        prepare_corpus(inputs, out, host_index=0, **{**kw, "append_eos": False})


def test_line_mode_with_bos(tmp_path):
    raw = tmp_path / "lines.txt"
    raw.write_text("first line\n\n   \nsecond line é\nthird\n", encoding="utf-8")
    tok = train_sentencepiece([random_text(np.random.default_rng(4), 400)], 330, tmp_path / "sp", bos=True)
    prepare_corpus(str(raw), tmp_path / "c", tokenizer=tok.path, text_mode="line", add_bos=True, progress=False)
    expected = [[tok.bos_id, *tok.encode(t), tok.eos_id] for t in ("first line", "second line é", "third")]
    assert read_docs(tmp_path / "c") == expected
    no_bos = train_sentencepiece(["a b c"] * 50, 300, tmp_path / "nb")
    with pytest.raises(DataError, match="has no BOS token"):
        prepare_corpus(str(raw), tmp_path / "d", tokenizer=no_bos.path, add_bos=True, progress=False)


def test_cli_trains_a_tokenizer_and_writes_a_corpus(tmp_path):
    texts = write_inputs(tmp_path / "raw", np.random.default_rng(5))
    out = tmp_path / "corpus"
    cmd = [sys.executable, "-m", "mamba_jax.preprocess", "--input", str(tmp_path / "raw" / "*.jsonl"),
           "--input", str(tmp_path / "raw" / "*.txt"), "--output", str(out), "--train-tokenizer",
           "--vocab-size", "350", "--workers", "2", "--quiet"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    shards = TokenShards(out)
    assert shards.tokenizer_path == str(out / "tokenizer.model") and shards.num_docs == len(texts)
    tok = load_tokenizer(shards.tokenizer_path)
    assert [tok.decode(shards.doc(i)) for i in range(shards.num_docs)] == texts


def test_cli_reports_errors(tmp_path, capsys):
    code = cli_main(["--input", str(tmp_path / "*.jsonl"), "--output", str(tmp_path / "o"), "--train-tokenizer",
                     "--vocab-size", "300"])  # fmt: skip
    assert code == 2
    assert "no input files matched" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', r"bad.jsonl:3: malformed JSON"),
        ("empty.txt", "", r"empty.txt is empty"),
        ("blank.jsonl", "\n\n  \n", r"blank.jsonl has no text"),
        ("field.jsonl", '{"text": "a"}\n{"body": "b", "id": 2}\n', r"field.jsonl:2: no field 'text' .*'body'.*--field"),
        ("list.jsonl", "[1, 2]\n", r"expected a JSON object"),
    ],
)
def test_input_errors_name_file_and_line(hf_tokenizer_json, tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        prepare_corpus(str(tmp_path / name), tmp_path / "out", tokenizer=hf_tokenizer_json, progress=False)
    assert not (tmp_path / "out" / "index.json").exists()
    assert not list((tmp_path / "out").glob("*.tmp-*"))  # nothing half-written is left


def test_no_inputs_and_bad_settings(hf_tokenizer_json, tmp_path):
    with pytest.raises(DataError, match="no input files matched"):
        prepare_corpus([str(tmp_path / "nothing*.jsonl")], tmp_path / "out", tokenizer=hf_tokenizer_json)
    (tmp_path / "x.txt").write_text("text")
    with pytest.raises(DataError, match="exactly one of a tokenizer"):
        prepare_corpus(str(tmp_path / "x.txt"), tmp_path / "out")
    with pytest.raises(DataError, match="host index 2"):
        prepare_corpus(
            str(tmp_path / "x.txt"), tmp_path / "out", tokenizer=hf_tokenizer_json, num_hosts=2, host_index=2
        )


def test_vocabulary_too_large_for_token_dtype(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "in.txt").write_text("w5 w69999 w100")
    assert token_dtype_for(65_536) == np.uint16 and token_dtype_for(65_537) == np.uint32
    with pytest.raises(DataError, match="does not fit in uint16"):
        prepare_corpus(
            str(tmp_path / "in.txt"), tmp_path / "a", tokenizer=tmp_path, token_dtype="uint16", progress=False
        )
    prepare_corpus(str(tmp_path / "in.txt"), tmp_path / "b", tokenizer=tmp_path, progress=False)
    shards = TokenShards(tmp_path / "b")
    assert shards.dtype == np.uint32 and shards.doc(0).tolist() == [5, 69_999, 100, 0]
    assert os.path.getsize(tmp_path / "b" / f"{shards.shards[0]['name']}.bin") == 4 * 4


def test_skip_empty_drops_files_without_text(hf_tokenizer_json, tmp_path):
    raw = tmp_path / "src"
    raw.mkdir()
    (raw / "__init__.py").write_text("")
    (raw / "blank.py").write_text("\n  \n")
    (raw / "mod.py").write_text("def f():\n    return 1\n")
    with pytest.raises(DataError, match=r"__init__\.py is empty; .*--skip-empty"):
        prepare_corpus(str(raw / "*.py"), tmp_path / "a", tokenizer=hf_tokenizer_json, progress=False)
    prepare_corpus(str(raw / "*.py"), tmp_path / "b", tokenizer=hf_tokenizer_json, skip_empty=True, progress=False)
    tok = load_tokenizer(hf_tokenizer_json)
    assert read_docs(tmp_path / "b") == [[*tok.encode("def f():\n    return 1\n"), tok.eos_id]]
