"""`python -m mamba_jax.generate` and the notebook `generate` API on a freshly trained tiny checkpoint."""

import json
import os
import subprocess
import sys

import pytest
from helpers import one_device_xla_flags

from mamba_jax import config as mjc
from mamba_jax.inference import generate
from mamba_jax.interop import from_pretrained
from mamba_jax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    corpus = tmp / "corpus.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", ":", "\n"]
    lines = [json.dumps({"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(60))}) for i in range(300)]
    corpus.write_text("\n".join(lines) + "\n")
    c = mjc.load_config(os.path.join(ROOT, "tests", "recipes", "tiny.py"))
    with c.unlocked():
        c.corpus.update(inputs=(str(corpus),), train_tokenizer_vocab=320, workers=1)
        c.model.vocab_size = 384
        c.train.update(steps=4, log_every=2)
    work = tmp / "w"
    train(c, str(work))
    return str(work)


def _cli(*args):
    env = dict(os.environ, XLA_FLAGS=one_device_xla_flags(), PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "mamba_jax.generate", *args], env=env, cwd=ROOT, capture_output=True, text=True
    )


def test_cli_streams_one_prompt_and_batches_a_file(workdir, tmp_path):
    out = _cli("--checkpoint", workdir, "--prompt", "alpha beta", "--max-new-tokens", "6", "--logprobs")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("alpha beta") and "logprobs:" in out.stdout
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("gamma\ndelta def\nreturn (\n")
    out = _cli("--checkpoint", workdir, "--prompts-file", str(prompts), "--max-new-tokens", "4", "--json",
               "--temperature", "0.8", "--top-k", "5", "--seed", "3", "--quantize", "fp8")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["gamma", "delta def", "return ("]
    assert all(len(r["tokens"]) <= 4 and len(r["logprobs"]) == len(r["tokens"]) for r in rows)


def test_cli_errors_are_named(workdir, tmp_path):
    out = _cli("--checkpoint", str(tmp_path / "missing"), "--prompt", "x")
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = _cli("--checkpoint", workdir, "--prompt", "")
    assert out.returncode == 2 and "empty prompt" in out.stderr
    out = _cli("--checkpoint", workdir)
    assert out.returncode == 2 and "no prompt" in out.stderr
    out = _cli("--checkpoint", workdir, "--prompt", "alpha", "--megakernel")  # a hybrid: not covered
    assert out.returncode == 2 and "megakernel does not cover layers other than Mamba2" in out.stderr


def test_api_text_tokens_stop_strings(workdir):
    model = from_pretrained(workdir)
    res = generate(model, ["alpha", "beta gamma"], tokenizer=os.path.join(workdir, "corpus"), max_new_tokens=8,
                   temperature=0.0)  # fmt: skip
    assert len(res) == 2 and all(r.text is not None and len(r.tokens) <= 8 for r in res)
    stop = res[0].text[2:4]
    if stop:
        cut = generate(model, "alpha", tokenizer=os.path.join(workdir, "corpus"), max_new_tokens=8,
                       temperature=0.0, stop=[stop])[0]  # fmt: skip
        assert cut.finish_reason == "stop" and stop not in cut.text and res[0].text.startswith(cut.text)
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, "alpha")


def test_tokenizer_of_a_workdir_with_a_relative_corpus(workdir, tmp_path, monkeypatch):
    """A run started with a relative corpus path (as the quickstart's) is found from any directory, and an
    export carries the tokenizer along."""
    from mamba_jax.convert import main as convert
    from mamba_jax.inference.api import find_tokenizer_path

    cfg_path = os.path.join(workdir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    parent = os.path.dirname(workdir)
    rel = os.path.relpath(os.path.join(workdir, "corpus"), parent)  # relative to where training ran
    cfg["corpus"]["output"] = rel
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    monkeypatch.chdir(tmp_path)  # somewhere else
    assert find_tokenizer_path(workdir) == os.path.join(parent, rel, "tokenizer.model")
    assert convert(["--from", workdir, "--to-hf", str(tmp_path / "hf")]) == 0
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.model")
    assert find_tokenizer_path(str(tmp_path / "hf")) == str(tmp_path / "hf" / "tokenizer.model")
