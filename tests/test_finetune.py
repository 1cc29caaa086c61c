"""Fine-tuning end to end on a small SQuAD-format task: LoRA and full fine-tuning raise validation exact match
above the starting model's; LoRA and prompt tuning train only their own parameters."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import forward, rel_err

from mamba_jax import config as mjc
from mamba_jax.data import train_sentencepiece
from mamba_jax.data.sft import SQUAD_TEMPLATE, load_split
from mamba_jax.interop import export_hf, from_pretrained
from mamba_jax.models.peft import PeftConfig, merge_lora
from mamba_jax.train.loop import train
from mamba_jax.train.sft_eval import evaluate_generation, squad_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["apple", "river", "stone", "cloud"]
FILLER = ["the", "cat", "sat", "on", "a", "mat", "while", "birds", "sang", "over", "green", "hills"]
# Held-out examples answered by generation for exact match (of the 40 held out): two full batches of
# evaluate_generation's 16, so one compiled generation loop serves every evaluation (24 left a batch of 8: a
# second compile each time).
N_EVAL = 32


def _cfg(**sections):
    c = mjc.load_config(os.path.join(ROOT, "tests", "recipes", "tiny.py"))
    with c.unlocked():
        c.model.vocab_size = 384
        c.checkpoint.every_steps = 1000
        for section, values in sections.items():
            getattr(c, section).update(values)
    return c


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A copy task: the answer is the word after "the secret word is" in the context."""
    tmp = tmp_path_factory.mktemp("ft")
    rng = np.random.default_rng(0)
    recs = []
    for _ in range(400):
        w = WORDS[rng.integers(4)]
        ctx = " ".join(rng.choice(FILLER, 6)) + f" the secret word is {w} " + " ".join(rng.choice(FILLER, 4))
        recs.append({"context": ctx, "question": "what is the secret word?", "answers": [w]})
    (tmp / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    texts = [f"Context: {r['context']} Question: {r['question']} Answer: {r['answers'][0]}" for r in recs]
    tok = train_sentencepiece(texts, 320, tmp / "tok")
    train(_cfg(train={"steps": 2}), str(tmp / "base"))  # the "pretrained" model
    data = {"kind": "sft", "paths": (str(tmp / "sft.jsonl"),), "tokenizer": tok.path, "seq_len": 64,
            "eval_fraction": 0.1}  # fmt: skip
    base = from_pretrained(str(tmp / "base"))
    tokenizer, _, held_out = load_split(data["paths"], tok.path, SQUAD_TEMPLATE, 0.1)
    start_em = evaluate_generation(base, tokenizer, held_out[:N_EVAL], max_new_tokens=6)["exact_match"]
    return tmp, data, start_em


def _finetune(task, name, peft, lr, steps):
    tmp, data, _ = task
    c = _cfg(
        data=data,
        peft=peft,
        optim={"lr": lr, "warmup_steps": 5, "min_lr": 0.0},
        train={
            "steps": steps,
            "init_from": str(tmp / "base"),
            "eval_every": steps,
            "eval_generate": N_EVAL,
            "eval_max_new_tokens": 6,
            "log_every": 20,
        },
    )
    work = tmp / name
    return train(c, str(work)), work


def _saved_param_names(work):
    step = max(int(n) for n in os.listdir(work / "checkpoints") if n.isdigit())
    restored = ocp.StandardCheckpointer().restore(work / "checkpoints" / str(step) / "state")
    flat = jax.tree_util.tree_flatten_with_path(restored["params"])[0]
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]


def test_lora_raises_exact_match_and_saves_only_adapters(task):
    last, work = _finetune(task, "lora", {"method": "lora", "lora_rank": 8}, 3e-3, 80)
    assert last["eval_exact_match"] > task[2], (last["eval_exact_match"], task[2])
    names = _saved_param_names(work)
    assert names and all("_lora_a" in n or "_lora_b" in n for n in names), names[:5]

    # The saved adapter reloads onto its base (found through the run's init_from) and reproduces the run.
    tmp, data, _ = task
    tuned = from_pretrained(str(work))
    tokenizer, _, held_out = load_split(data["paths"], data["tokenizer"], SQUAD_TEMPLATE, 0.1)
    again = evaluate_generation(tuned, tokenizer, held_out[:N_EVAL], max_new_tokens=6)
    assert again["exact_match"] == last["eval_exact_match"]
    ids = jnp.asarray([tokenizer.encode(held_out[0].prompt)])
    base_logits = forward(from_pretrained(str(tmp / "base")), ids)
    tuned_logits = forward(tuned, ids)
    assert rel_err(tuned_logits, base_logits) > 1e-3  # the adapter changes the model …
    merged = nnx.clone(tuned)
    merge_lora(merged)
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(merged)))
    assert rel_err(forward(merged, ids), tuned_logits) <= 1e-5  # … and merges into the base weights exactly
    exported = export_hf(tuned, str(tmp / "lora_hf"))  # merged on the way out
    assert rel_err(forward(from_pretrained(exported), ids), tuned_logits) <= 1e-5


def test_full_finetune_raises_exact_match(task):
    last, _ = _finetune(task, "full", {"method": "none"}, 3e-3, 60)
    assert last["eval_exact_match"] > task[2], (last["eval_exact_match"], task[2])


def test_prompt_tuning_trains_only_the_prompt(task):
    last, work = _finetune(task, "prompt", {"method": "prompt", "num_virtual_tokens": 8}, 3e-2, 4)
    assert np.isfinite(last["loss"])
    names = _saved_param_names(work)
    assert names and all(n.startswith("prompt/") for n in names), names


def test_squad_metric():
    s = squad_scores(["The Apple!", "river stone", "x"], [("apple",), ("stone river", "r"), ("y",)])
    assert s["exact_match"] == pytest.approx(100 / 3) and s["f1"] == pytest.approx(200 / 3)


def test_peft_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown LoRA target"):
        PeftConfig(method="lora", lora_targets=("in_proj", "qkv"))
    with pytest.raises(ValueError, match=r"peft\.method"):
        PeftConfig(method="adapters")
    with pytest.raises(ValueError, match=r"train\.init_from"):
        train(_cfg(peft={"method": "lora"}), str(tmp_path / "w"))
