"""Training end to end: real runs of `python -m mamba_jax.train` (subprocesses where a kill is involved),
exact resume, atomic checkpoints, signals, clear errors, restore onto another mesh."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import one_device_xla_flags

from mamba_jax import config as mjc
from mamba_jax.train.checkpoint import CheckpointMismatch
from mamba_jax.train.loop import TrainingAborted, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "recipes", "tiny.py")


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = one_device_xla_flags()  # one CPU device per subprocess: quicker, and the mesh resolves to it
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cmd(workdir, *overrides):
    return [sys.executable, "-m", "mamba_jax.train", "--config", TINY, "--workdir", str(workdir), *overrides]


def _run(workdir, *overrides, check=True):
    out = subprocess.run(_cmd(workdir, *overrides), env=_env(), capture_output=True, text=True, cwd=ROOT)
    if check and out.returncode != 0:
        raise AssertionError(f"training failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _committed_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(
        int(n) for n in os.listdir(d) if n.isdigit() and os.path.exists(os.path.join(d, n, "_CHECKPOINT_METADATA"))
    )


def _tree_digest(path):
    h = hashlib.sha256()
    for base, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(base, f)
            h.update(p.encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.mark.slow
def test_sigkill_after_second_checkpoint_resumes_bitwise(tmp_path):
    steps = ["--config.train.steps=40"]
    _run(tmp_path / "straight", *steps)
    reference = _losses(tmp_path / "straight")
    assert len(reference) == 40

    work = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(work, *steps), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while len(_committed_steps(work)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _committed_steps(work)
    assert len(killed_at) >= 2 and killed_at[-1] < 40, killed_at

    _run(work, *steps)
    resumed = _losses(work)
    assert sorted(resumed) == list(range(1, 41))
    for step in range(killed_at[-1] + 1, 41):
        assert resumed[step] == reference[step], step  # bitwise: same floats


@pytest.mark.slow
def test_kill_during_checkpoint_save_keeps_previous(tmp_path):
    # A wider model so that writing a checkpoint takes long enough to be interrupted. The schedule's length
    # fixed (it follows train.steps otherwise): the resumed run of fewer steps then is the same program, and
    # loads the compiled step from the persistent cache instead of compiling the wide model again.
    big = ["--config.model.d_model=512", "--config.model.ffn_hidden_size=4096", "--config.train.steps=30",
           "--config.optim.decay_steps=30"]  # fmt: skip
    work = tmp_path / "w"
    proc = subprocess.Popen(
        _cmd(work, *big), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt_dir = work / "checkpoints"
    deadline = time.time() + 180
    killed_during_save = False
    while proc.poll() is None and time.time() < deadline:
        names = os.listdir(ckpt_dir) if ckpt_dir.exists() else []
        # A step being written exists only as a temporary directory until Orbax commits it.
        if _committed_steps(work) and any("tmp" in n for n in names):
            proc.send_signal(signal.SIGKILL)
            killed_during_save = True
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_during_save, "the run never was inside a save when polled"
    before = _committed_steps(work)
    assert before

    from mamba_jax.train.checkpoint import Checkpointer
    from mamba_jax.train.config import CheckpointConfig

    assert Checkpointer(str(ckpt_dir), CheckpointConfig()).latest_step() == before[-1]
    out = _run(work, *big, "--config.train.steps=" + str(before[-1] + 2))
    assert f"resumed from step {before[-1]}" in out.stdout


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    work = tmp_path / "w"
    proc = subprocess.Popen(
        _cmd(work, "--config.train.steps=100000", "--config.checkpoint.every_steps=100000"),
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("step 5:"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, rest
    assert "checkpoint saved" in rest
    steps = _committed_steps(work)
    assert len(steps) == 1 and steps[0] >= 5


def test_unknown_config_key_is_named_with_suggestion(tmp_path):
    out = _run(tmp_path / "w", "--config.train.stpes=3", check=False)
    assert out.returncode != 0
    assert "stpes" in out.stderr and "steps" in out.stderr
    assert not (tmp_path / "w").exists()


def _tiny(**sections):
    c = mjc.load_config(TINY)
    with c.unlocked():
        for section, values in sections.items():
            getattr(c, section).update(values)
    return c


def test_data_errors_stop_before_damage(tmp_path):
    work = tmp_path / "w"
    train(_tiny(train={"steps": 3}), str(work))
    digest = _tree_digest(work)

    with pytest.raises(Exception, match="match no files"):
        train(
            _tiny(train={"steps": 6}, corpus={"inputs": (str(tmp_path / "nope*.txt"),), "train_tokenizer_vocab": 64}),
            str(work),
        )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(Exception, match="empty"):
        train(_tiny(train={"steps": 6}, corpus={"inputs": (str(empty),), "train_tokenizer_vocab": 64}), str(work))
    assert _tree_digest(work) == digest


def test_tokenizer_larger_than_model_vocab(tmp_path):
    docs = tmp_path / "docs.jsonl"
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(3000)]
    docs.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 200))}) + "\n" for _ in range(200)))
    c = _tiny(corpus={"inputs": (str(docs),), "train_tokenizer_vocab": 512, "workers": 1})
    with pytest.raises(Exception, match="vocab_size is 256"):
        train(c, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "config.json")


def test_checkpoint_of_another_model_is_refused(tmp_path):
    work = tmp_path / "w"
    train(_tiny(train={"steps": 3}), str(work))
    digest = _tree_digest(work)
    with pytest.raises(CheckpointMismatch, match=r"d_model: 64 → 96"):
        train(_tiny(model={"d_model": 96}), str(work))
    assert _tree_digest(work) == digest


def test_eval_metrics_and_restore_onto_another_mesh(tmp_path):
    assert jax.device_count() == 8
    work = tmp_path / "w"
    # Data parallel over 8 devices, then resumed on 2 (data) × 2 (sequence) × 2 (tensor).
    # The schedule depends on the planned length: fix it, so that runs of 6 and of 9 steps share it.
    sched = {"decay_steps": 9}
    last = train(
        _tiny(train={"steps": 6, "eval_every": 3, "eval_batches": 2}, optim=sched, mesh={"data": 8}), str(work)
    )
    assert np.isfinite(last["eval_loss"]) and last["step"] == 6
    with open(work / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all({"loss", "grad_norm", "lr", "tokens_per_s"} <= set(r) for r in records)
    assert os.listdir(work / "tensorboard")

    train(_tiny(train={"steps": 9}, optim=sched, mesh={"data": 8}), str(tmp_path / "straight"))
    resumed = train(_tiny(train={"steps": 9}, optim=sched, mesh={"data": 2, "sequence": 2, "tensor": 2}), str(work))
    assert resumed["step"] == 9
    a, b = _losses(work), _losses(tmp_path / "straight")
    # Step 7 is computed from the restored weights alone: equal up to reduction order on the new mesh.
    # Later steps drift slightly (Adam divides by tiny second moments early on), never far.
    assert abs(a[7] - b[7]) <= 1e-5 * abs(b[7])
    assert abs(a[9] - b[9]) <= 1e-3 * abs(b[9])


def test_nonfinite_steps_abort_without_checkpointing_them(tmp_path):
    work = tmp_path / "w"
    c = _tiny(train={"steps": 40, "max_nonfinite_steps": 3}, optim={"lr": 1e12, "warmup_steps": 0, "grad_clip": 0.0})
    with pytest.raises(TrainingAborted, match="non-finite steps in a row"):
        train(c, str(work))
    with open(work / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    bad = [r["step"] for r in records if not np.isfinite(r["loss"])]
    assert bad, "the run never produced a non-finite loss"
    assert records[-1]["step"] < 40 and records[-1]["nonfinite_run"] >= 3
    import orbax.checkpoint as ocp

    for step in _committed_steps(work):  # whatever was saved holds finite weights only
        restored = ocp.StandardCheckpointer().restore(work / "checkpoints" / str(step) / "state")
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored["params"])), step
