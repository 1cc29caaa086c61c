"""Supervised fine-tuning data in the SQuAD format of NeMo's SquadDataModule: prompt, answer, answer-only loss.

Records are JSON lines (or a SQuAD v1.1 / v2 JSON file, `data → paragraphs → qas`) holding either
`context` / `question` / `answers` (a list of strings, or SQuAD's `{"text": [...]}`, or one `answer`) or a
generic `input` / `output` pair. Each becomes, as in the NeMo recipe (shared/docs/REFERENCE.md):

    prompt = "Context: {context} Question: {question} Answer:"      (or the record's `input`)
    target = " " + first answer (or `output`) + EOS                  no BOS

tokenized piecewise so that the loss mask covers exactly the answer tokens and EOS; a prompt longer than the
row is cut from its left (the question and "Answer:" sit at its end). A row is one example, right-padded:
`input_ids`, `labels`, `seq_idx` (all 0) and `loss_mask` (1 on answer labels only). A deterministic
`eval_fraction` of the examples is held out for validation, where exact match and F1 of generated answers
are measured (mamba_jax/train/sft_eval.py).

Dimension key: L row length (seq_len).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from mamba_jax.data.errors import DataError
from mamba_jax.data.readers import expand_inputs

SQUAD_TEMPLATE = "Context: {context} Question: {question} Answer:"


@dataclasses.dataclass(frozen=True)
class SFTExample:
    prompt: str
    answers: tuple[str, ...]  # the first is the training target; all count for exact match / F1


def _answers(rec: dict, where: str) -> tuple[str, ...]:
    if "output" in rec:
        return (str(rec["output"]),)
    if "answer" in rec:
        return (str(rec["answer"]),)
    ans = rec.get("answers")
    if isinstance(ans, dict):
        ans = ans.get("text")
    if isinstance(ans, list) and ans and all(isinstance(a, str | dict) for a in ans):
        texts = tuple(a["text"] if isinstance(a, dict) else a for a in ans)
        return texts
    raise DataError(f"{where}: no answer: give 'output', 'answer' or a non-empty 'answers' list.")


def _example(rec: dict, template: str, where: str) -> SFTExample:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}.")
    if "input" in rec:
        prompt = str(rec["input"])
    else:
        missing = [k for k in ("context", "question") if k not in rec]
        if missing:
            raise DataError(f"{where}: missing {missing}; give context / question / answers or input / output.")
        prompt = template.format(context=rec["context"], question=rec["question"])
    return SFTExample(prompt, _answers(rec, where))


def read_sft(paths: Sequence[str], template: str = SQUAD_TEMPLATE) -> list[SFTExample]:
    """Every example of the files (globs allowed), in file order."""
    files = expand_inputs(paths)
    out: list[SFTExample] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise DataError(f"{path} is empty; an SFT file needs one JSON record per line (or a SQuAD JSON file).")
        stripped = text.lstrip()
        if stripped.startswith("{") and '"data"' in stripped[:200] and "\n{" not in stripped:
            squad = json.loads(text)
            for article in squad["data"]:
                for para in article["paragraphs"]:
                    for qa in para["qas"]:
                        if qa.get("is_impossible") or not qa.get("answers"):
                            continue  # SQuAD v2's unanswerable questions have no target
                        out.append(_example({"context": para["context"], **qa}, template, path))
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line.") from None
            out.append(_example(rec, template, f"{path}:{n}"))
    if not out:
        raise DataError(f"no examples in {list(paths)}.")
    return out


def split_examples(n: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) indices: a fixed-seed permutation, the eval share held out (at least one when asked)."""
    n_eval = 0 if eval_fraction == 0 else min(n - 1, max(1, round(eval_fraction * n)))
    perm = np.random.default_rng([20241124, n]).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def encode_example(tokenizer, ex: SFTExample, seq_len: int) -> tuple[list[int], int]:
    """(token ids of prompt + " answer" + EOS, number of prompt tokens), cut to seq_len + 1 tokens."""
    prompt = tokenizer.encode(ex.prompt)
    target = tokenizer.encode(" " + ex.answers[0]) + [tokenizer.eos_id]
    target = target[:seq_len]  # an answer longer than the row keeps its start
    keep = seq_len + 1 - len(target)
    if keep < 1:
        raise DataError(f"data.seq_len {seq_len} is too short for any prompt; raise it.")
    prompt = prompt[-keep:]  # cut the context from the left: the question and "Answer:" stay
    return prompt + target, len(prompt)


class SFTRows:
    """Random-access rows of encoded examples (one per row, right-padded with 0 and masked)."""

    def __init__(self, encoded: list[tuple[list[int], int]], seq_len: int):
        self.encoded, self.seq_len = encoded, seq_len

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        ids, n_prompt = self.encoded[i]
        tokens_T = np.zeros(self.seq_len + 1, np.int32)
        tokens_T[: len(ids)] = ids
        mask_L = np.zeros(self.seq_len, np.float32)
        # Label t is token t + 1: the answer tokens (and EOS) sit at positions n_prompt .. len(ids) - 1.
        mask_L[n_prompt - 1 : len(ids) - 1] = 1.0
        return {
            "input_ids": tokens_T[:-1],
            "labels": tokens_T[1:],
            "seq_idx": np.zeros(self.seq_len, np.int32),
            "loss_mask": mask_L,
        }


def load_split(paths, tokenizer_path: str, template: str, eval_fraction: float):
    """(tokenizer, train examples, eval examples) for an SFT data config."""
    from mamba_jax.data.tokenizer import load_tokenizer

    if not tokenizer_path:
        raise DataError("SFT data needs data.tokenizer: the model's tokenizer (a .model, tokenizer.json or folder).")
    if not os.path.exists(tokenizer_path):
        raise DataError(f"data.tokenizer {tokenizer_path} does not exist.")
    tokenizer = load_tokenizer(tokenizer_path)
    examples = read_sft(paths, template)
    train_i, eval_i = split_examples(len(examples), eval_fraction)  # independent of the shuffle seed
    return tokenizer, [examples[i] for i in train_i], [examples[i] for i in eval_i]
