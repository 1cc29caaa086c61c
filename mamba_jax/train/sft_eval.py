"""Exact match and F1 of generated answers on held-out SFT examples (the SQuAD v1.1 metric).

Answers are generated greedily from each prompt, up to EOS, a newline or the token budget, and compared with
every reference answer after SQuAD's normalisation (lower case, no punctuation, no articles a / an / the,
single spaces); a prediction scores the best over its references.
"""

from __future__ import annotations

import collections
import re
import string


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], references: list[tuple[str, ...]]) -> dict[str, float]:
    em = f1 = 0.0
    for pred, refs in zip(predictions, references, strict=True):
        em += max(float(normalize_answer(pred) == normalize_answer(r)) for r in refs)
        f1 += max(f1_score(pred, r) for r in refs)
    n = max(len(predictions), 1)
    return {"exact_match": 100 * em / n, "f1": 100 * f1 / n, "examples": len(predictions)}


def evaluate_generation(model, tokenizer, examples, *, max_new_tokens: int = 32, batch_size: int = 16, mesh=None):
    """Greedy answers to `examples` (SFTExample: prompt, answers) and their exact match / F1."""
    from mamba_jax.inference.api import generate

    predictions = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        outs = generate(
            model,
            [ex.prompt for ex in chunk],
            tokenizer=tokenizer,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            stop=["\n"],
            mesh=mesh,
        )
        predictions += [o.text.strip() for o in outs]
    scores = squad_scores(predictions, [ex.answers for ex in examples])
    scores["predictions"] = predictions
    return scores
