"""Token sampling from logits: greedy, temperature, top-k and top-p (nucleus), as in Hugging Face's
logits processors and NeMo's generate options.

Dimension key: B batch, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits_BV, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Logits with temperature applied and everything outside top-k / the top-p nucleus set to −inf."""
    logits = logits_BV.astype(jnp.float32) / max(temperature, 1e-6)
    v = logits.shape[-1]
    if 0 < top_k < v:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it is < top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_logits(key, logits_BV, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Token ids (B,) int32: argmax when temperature is 0, else a draw from the filtered distribution."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
