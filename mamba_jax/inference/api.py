"""`generate`: the notebook-facing generation API over the compiled engine (mamba_jax/inference/engine.py).

    from mamba_jax import from_pretrained
    from mamba_jax.inference import generate
    model = from_pretrained("runs/quickstart")
    out = generate(model, ["def main():"], tokenizer="runs/quickstart", max_new_tokens=32, temperature=0.7)
    print(out[0].text)

Prompts are strings (a tokenizer is needed) or token-id lists; each result carries the text (when a tokenizer
is given), the token ids, their log-probabilities and why the row stopped ("eos", "stop" or "length").
Stop strings cut the text at their first occurrence (the compiled loop runs on to EOS or the token budget).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence

from mamba_jax.inference.engine import Engine, SamplingParams


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "eos", "stop" or "length"
    text: str | None = None


def find_tokenizer_path(path: str) -> str | None:
    """The tokenizer file that belongs to a model path: one in it (Hugging Face directory), else the one of the
    corpus a mamba_jax training work directory (or one of its checkpoints) was trained on. None when there is
    none."""
    from mamba_jax.data import DataError
    from mamba_jax.data.tokenizer import resolve_tokenizer_path

    try:
        return resolve_tokenizer_path(path)
    except DataError:
        pass
    from mamba_jax.interop.errors import ConversionError
    from mamba_jax.interop.native import find_checkpoint

    try:
        found = find_checkpoint(path)  # a work directory, its checkpoints folder or one step
    except ConversionError:
        found = None
    workdir = os.path.dirname(found[0]) if found else None
    config = os.path.join(workdir, "config.json") if workdir else ""
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        c = json.load(f)
    # Files beside the work directory's config (a converted checkpoint keeps them there), then its corpus.
    candidates = [workdir, c.get("corpus", {}).get("output") or os.path.join(workdir, "corpus")]
    candidates += list(c.get("data", {}).get("paths", []))
    if c.get("data", {}).get("tokenizer"):
        candidates.insert(0, c["data"]["tokenizer"])
    # Relative paths are the training command's: try them from here, then from the work directory's parents.
    roots, parent = [""], os.path.abspath(workdir)
    for _ in range(3):
        parent = os.path.dirname(parent)
        roots.append(parent)
    candidates = [os.path.join(r, c) for c in candidates if c for r in ([""] if os.path.isabs(c) else roots)]
    for corpus in candidates:
        try:
            file = resolve_tokenizer_path(corpus)
            if os.path.basename(file) == "tokenizer.json" or file.endswith(".model"):
                return file
        except DataError:
            pass
        try:
            from mamba_jax.data import TokenShards

            tok = TokenShards(corpus).tokenizer_path
            if tok:
                return tok
        except (DataError, OSError, ValueError):
            continue
    return None


def find_tokenizer(path: str):
    """The loaded tokenizer of `find_tokenizer_path(path)`, or None."""
    from mamba_jax.data import load_tokenizer

    file = find_tokenizer_path(path)
    return load_tokenizer(file) if file else None


def generate(
    model,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    tokenizer=None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    stop_at_eos: bool = True,
    dtype=None,
    state_dtype="float32",
    quantize: str | None = None,
    mesh=None,
    stream: Callable[[str], None] | None = None,
    megakernel: bool | str = "auto",
) -> list[Completion]:
    """Continue each prompt; see the module docstring. `stream(text_piece)` receives new text of a single
    prompt as it is produced. `dtype`, `state_dtype`, `quantize` ("fp8": float8 projection weights) and
    `megakernel` (a single prompt of a pure Mamba2 model through one CUDA launch per token; "auto" where the
    kernel runs) are the Engine's."""
    if isinstance(tokenizer, str | os.PathLike):
        from mamba_jax.data import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer (tokenizer=path or Tokenizer); or pass token ids.")
            p = tokenizer.encode(p)
        ids.append([int(t) for t in p])
    if stream is not None and len(ids) != 1:
        raise ValueError("streaming shows one prompt at a time; pass a single prompt with stream=…")
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    eos_id = tokenizer.eos_id if (tokenizer is not None and stop_at_eos) else None
    on_token = None
    if stream is not None:
        on_token = _Streamer(tokenizer, stream, eos_id, stop)
    vocab = tokenizer.vocab_size if tokenizer is not None else None
    engine = Engine(model, dtype=dtype, state_dtype=state_dtype, mesh=mesh, quantize=quantize, megakernel=megakernel)
    result = engine.generate(ids, params, eos_id=eos_id, stream=on_token, vocab_size=vocab)
    out = []
    for toks, lps, finished in zip(result.tokens, result.logprobs, result.finished, strict=True):
        reason = "eos" if finished else "length"
        text = tokenizer.decode(toks) if tokenizer is not None else None
        if text is not None and stop:
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
                kept = len(tokenizer.encode(text))  # the tokens that make up the kept text
                toks, lps = toks[:kept], lps[:kept]
        out.append(Completion(toks, lps, reason, text))
    return out


class _Streamer:
    """Turns tokens into text pieces (decoding the whole continuation each time: multi-byte characters and
    merged pieces come out right), stopping at EOS or a stop string."""

    def __init__(self, tokenizer, emit, eos_id, stop):
        self.tokenizer, self.emit, self.eos_id, self.stop = tokenizer, emit, eos_id, tuple(stop)
        self.tokens: list[int] = []
        self.shown = 0
        self.done = False

    def __call__(self, tokens_B) -> None:
        tok = int(tokens_B[0])
        if self.done or tok == self.eos_id:
            self.done = True
            return
        self.tokens.append(tok)
        if self.tokenizer is None:
            self.emit(f"{tok} ")
            return
        text = self.tokenizer.decode(self.tokens)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            text, self.done = text[:cut], True
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        self.emit(text[self.shown :])
        self.shown = len(text)


def print_stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
