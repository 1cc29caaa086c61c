"""Generation by re-running the full forward pass at every step: simple and obviously correct, the reference
the compiled decoding engine is tested against.

Cost grows with the square of the length; use the engine for real serving.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.inference.sampling import sample_logits


def naive_generate(model, prompt_ids, max_new_tokens: int, *, temperature=0.0, top_k=0, top_p=1.0, seed=0, eos_id=None):
    """Prompt token ids (a list) → the generated continuation (a list, stopping at eos_id)."""
    if not prompt_ids:
        raise ValueError("naive_generate: the prompt is empty; give at least one token.")
    graphdef, state = nnx.split(model)
    total = len(prompt_ids) + max_new_tokens

    @jax.jit
    def next_token(state, ids_1L, t, key):
        logits = nnx.merge(graphdef, state)(ids_1L)[:, t - 1]
        return sample_logits(key, logits, temperature=temperature, top_k=top_k, top_p=top_p)[0]

    ids = jnp.zeros((1, total), jnp.int32).at[0, : len(prompt_ids)].set(jnp.asarray(prompt_ids, jnp.int32))
    key = jax.random.key(seed)
    out = []
    for t in range(len(prompt_ids), total):
        key, sub = jax.random.split(key)
        tok = int(next_token(state, ids, t, sub))
        if eos_id is not None and tok == eos_id:
            break
        out.append(tok)
        ids = ids.at[0, t].set(tok)
    return out
