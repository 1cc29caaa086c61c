"""Hugging Face parity fixtures for mamba_jax's interop, and the check that our exports load in transformers.

This script needs torch and transformers, which are NOT dependencies of mamba_jax (nor of its CI): run it from
a separate Python 3.11 environment,

    python3.11 -m venv /tmp/hfenv
    /tmp/hfenv/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors numpy

(transformers ≥ 5 has both `Mamba2ForCausalLM` and `NemotronHForCausalLM` natively, with the gated norm of
Mamba2 taken per group of d_inner / n_groups; 5.23.0 made the committed fixtures). Three commands:

    /tmp/hfenv/bin/python scripts/make_hf_fixtures.py make
        Builds small random models with transformers and writes each (config.json + model.safetensors, as
        `save_pretrained` writes them) with `expected.npz` (input ids and their float32 logits) under
        tests/fixtures/hf/<name>/:
          mamba2_g1   Mamba2, n_groups 1, tied embeddings, residual in fp32, with a tiny tokenizer.json (< 256
                      tokens, padded to the 256 embedding rows)
          mamba2_g2   Mamba2, n_groups 2, untied, no conv bias, dt limited to (0.05, 0.5), eps 1e-6, 250 rows
          nemotron_h  Nemotron-H, pattern "M-M-M*-" (all three kinds), GQA 8/4 heads, 4 groups, relu²,
                      dt clamped at time_step_min = 0.2 (what transformers' Nemotron-H mixer does)
        Every parameter is re-drawn at random (transformers initialises A_log, D, dt_bias and the norms to
        constants, which would hide layout mistakes), and the input spans several SSD chunks.

    /tmp/hfenv/bin/python scripts/make_hf_fixtures.py check HF_DIR --reference NPZ
        Loads HF_DIR (e.g. a directory `mamba_jax.interop.export_hf` or `python -m mamba_jax.convert --to-hf`
        wrote) with transformers' AutoModelForCausalLM and checks its float32 logits on NPZ's `input_ids`
        against NPZ's `logits` (relative error ≤ 1e-4). Exit status 1 on a mismatch.

    /tmp/hfenv/bin/python scripts/make_hf_fixtures.py roundtrip --mamba-python .venv/bin/python
        The whole loop, for every fixture: `python -m mamba_jax.convert --from-hf` into a mamba_jax checkpoint,
        `--to-hf` back into a Hugging Face directory (in several safetensors files with an index), then `check`
        against the fixture's logits; and a model initialised by mamba_jax itself, exported in both flavours,
        checked against the logits mamba_jax computed for it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
TOLERANCE = 1e-4

TOKENIZER_TEXT = (
    "Mamba is a state space model. The hybrid models mix Mamba layers with attention and MLP layers. "
    "Each layer normalises its input, mixes the sequence, and adds the result to the residual stream. "
    "def scan(x, dt, A, B, C): return y  # the chunked scan of the selective state space"
)


# ------------------------------------------------------------------------------------------------------------
# Fixture models
# ------------------------------------------------------------------------------------------------------------
def _configs():
    from transformers import Mamba2Config, NemotronHConfig

    return {
        "mamba2_g1": Mamba2Config(
            vocab_size=256,
            hidden_size=32,
            num_heads=4,
            head_dim=16,
            expand=2,
            state_size=16,
            n_groups=1,
            num_hidden_layers=2,
            chunk_size=8,
            tie_word_embeddings=True,
            residual_in_fp32=True,
            dtype="float32",
        ),
        "mamba2_g2": Mamba2Config(
            vocab_size=250,
            hidden_size=32,
            num_heads=8,
            head_dim=8,
            expand=2,
            state_size=8,
            n_groups=2,
            num_hidden_layers=3,
            chunk_size=16,
            tie_word_embeddings=False,
            residual_in_fp32=False,
            use_conv_bias=False,
            time_step_limit=(0.05, 0.5),
            layer_norm_epsilon=1e-6,
            dtype="float32",
        ),
        "nemotron_h": NemotronHConfig(
            vocab_size=256,
            hidden_size=32,
            layers_block_type=["mamba", "mlp", "mamba", "mlp", "mamba", "attention", "mlp"],
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=8,
            intermediate_size=64,
            mlp_hidden_act="relu2",
            ssm_state_size=8,
            mamba_num_heads=8,
            mamba_head_dim=8,
            n_groups=4,
            chunk_size=16,
            time_step_min=0.2,
            dtype="float32",
        ),
    }


def _randomize(model, seed: int) -> None:
    """Redraw every parameter so that each one matters for the logits (O(1) activations throughout)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 2)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 15 + 1))
            elif name.endswith(".D"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 - 1.0)
            elif "norm" in leaf[-2] or name.endswith("norm_f.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "conv1d" in name:
                p.copy_(0.4 * torch.randn(p.shape, generator=gen))
            else:  # linear and embedding weights, (out, in) in torch
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def _logits(model, input_ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(input_ids).long(), use_cache=False)
    return out.logits.float().numpy()


def _tokenizer(out_dir: str) -> None:
    """A tiny byte-level BPE tokenizer.json (+ tokenizer_config.json naming its special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The alphabet of the text only (not all 256 bytes), so that the vocabulary stays under the model's 256 rows.
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>", "<|padding|>"], show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT] * 4, trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "pad_token": "<|padding|>", "bos_token": None}, f, indent=2)


def make(out_root: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    for i, (name, cfg) in enumerate(_configs().items()):
        model = AutoModelForCausalLM.from_config(cfg).float().eval()
        _randomize(model, seed=100 + i)
        if cfg.tie_word_embeddings:
            model.tie_weights()
        out = os.path.join(out_root, name)
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out)
        rng = np.random.default_rng(i)
        input_ids = rng.integers(0, cfg.vocab_size, size=(2, 40), dtype=np.int64).astype(np.int32)
        logits = _logits(model, input_ids)
        np.savez(os.path.join(out, "expected.npz"), input_ids=input_ids, logits=logits)
        if name == "mamba2_g1":
            _tokenizer(out)
        # Reload what was written: the fixture must reproduce its own logits through transformers' loader.
        _check_dir(out, input_ids, logits)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{name}: {size / 1024:.0f} KiB in {out}")


# ------------------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------------------
def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def _check_dir(hf_dir: str, input_ids: np.ndarray, logits: np.ndarray) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="float32").eval()
    got = _logits(model, input_ids)
    if got.shape[-1] != logits.shape[-1]:  # a padded vocabulary on one side only: compare the shared part
        v = min(got.shape[-1], logits.shape[-1])
        got, logits = got[..., :v], logits[..., :v]
    err = _rel_err(got, logits)
    status = "ok" if err <= TOLERANCE else "MISMATCH"
    print(f"{status}: {hf_dir} ({type(model).__name__}) logits relative error {err:.2e}")
    if err > TOLERANCE:
        raise SystemExit(1)
    return err


def check(hf_dir: str, reference: str) -> None:
    ref = np.load(reference)
    _check_dir(hf_dir, ref["input_ids"], ref["logits"])


# A mamba_jax model initialised by mamba_jax itself (its own dt / A / conv initialisation), exported in the
# given flavour, with the logits mamba_jax computes for it: run with the mamba_jax interpreter.
_NATIVE_EXPORT = r"""
import sys, numpy as np, jax, jax.numpy as jnp
from mamba_jax.models import ModelConfig
from mamba_jax.parallel import init_model
from mamba_jax.interop import export_hf
out, flavor = sys.argv[1], sys.argv[2]
jax.config.update("jax_default_matmul_precision", "highest")
common = dict(d_model=32, vocab_size=250, vocab_multiple=16, mamba_d_state=8, mamba_head_dim=8,
              mamba_chunk_size=16, dtype="float32", init_std=0.1)
if flavor == "mamba2":
    cfg = ModelConfig(pattern="MMM", mamba_num_groups=2, tie_embeddings=True, residual_in_fp32=True, **common)
else:
    cfg = ModelConfig(pattern="M-M*-M", mamba_num_groups=4, attn_num_heads=4, attn_num_kv_heads=2,
                      attn_head_dim=8, ffn_hidden_size=48, **common)
model = init_model(cfg, seed=7)
ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)).astype(np.int32)
logits = np.asarray(model(jnp.asarray(ids)))
export_hf(model, out, flavor=flavor)
np.savez(out + ".npz", input_ids=ids, logits=logits)
"""


def roundtrip(mamba_python: str) -> None:
    def run(*cmd):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")

    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(os.listdir(FIXTURES)):
            src = os.path.join(FIXTURES, name)
            ckpt, hf = os.path.join(tmp, name + "_ckpt"), os.path.join(tmp, name + "_hf")
            run(mamba_python, "-m", "mamba_jax.convert", "--from-hf", src, "--to", ckpt)
            run(mamba_python, "-m", "mamba_jax.convert", "--from", ckpt, "--to-hf", hf, "--max-shard-size", "64KB")
            shards = [f for f in os.listdir(hf) if f.endswith(".safetensors")]
            print(f"{name}: exported in {len(shards)} safetensors files")
            check(hf, os.path.join(src, "expected.npz"))
        for flavor in ("mamba2", "nemotron_h"):
            out = os.path.join(tmp, "native_" + flavor)
            run(mamba_python, "-c", _NATIVE_EXPORT, out, flavor)
            check(out, out + ".npz")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="build the fixtures")
    m.add_argument("--out", default=FIXTURES)
    c = sub.add_parser("check", help="load HF_DIR in transformers and compare its logits")
    c.add_argument("hf_dir", nargs="+")
    c.add_argument("--reference", required=True, help="an .npz with input_ids and logits")
    r = sub.add_parser("roundtrip", help="convert each fixture both ways with mamba_jax and check")
    r.add_argument("--mamba-python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    args = p.parse_args(argv)
    if args.cmd == "make":
        make(args.out)
    elif args.cmd == "check":
        for d in args.hf_dir:
            check(d, args.reference)
    else:
        roundtrip(args.mamba_python)


if __name__ == "__main__":
    sys.exit(main())
