"""Causal grouped-query self-attention, as in Megatron-LM's `SelfAttention` for the hybrid models.

No biases, softmax scale 1/√head_dim, no positional encoding by default (NoPE: the Mamba layers carry
position, as in Mamba2-Hybrid and Nemotron-H); rotary embeddings (non-interleaved halves, Megatron's
default) are an option for other hybrids. The kernel is cuDNN flash attention on GPU
(`jax.nn.dot_product_attention(implementation="cudnn")`; the XLA one is far slower there and runs out of
memory at 8K) and the XLA implementation elsewhere. With `seq_idx`, tokens attend only within their own
document (packed sequences); positions for RoPE then restart per document (computed by the model).

Dimension key: B batch, L length (T queries, S keys), D model width, H query heads, K key/value heads,
E head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mamba_jax.layers.base import linear, normal, param
from mamba_jax.models.config import ModelConfig


def rope(x_BLHE, positions_BL, theta: float):
    """Rotary position embedding on the two halves of the head dim (GPT-NeoX / Megatron layout)."""
    e = x_BLHE.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    ang_BLF = positions_BL.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(ang_BLF)[:, :, None, :], jnp.sin(ang_BLF)[:, :, None, :]
    x1, x2 = jnp.split(x_BLHE.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHE.dtype)


def attention_impl(requested: str, dtype) -> str:
    if requested != "auto":
        return requested
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


class Attention(nnx.Module):
    """Causal GQA self-attention: (B, L, D) → (B, L, D)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        del layer_idx
        self.cfg = cfg
        d, hq, hkv, e = cfg.d_model, cfg.attn_num_heads, cfg.attn_num_kv_heads, cfg.attn_head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(cfg.n_layers)
        self.q_proj = param(normal(rngs, (d, hq, e), std, pdt), ("embed", "q_heads", None))
        self.k_proj = param(normal(rngs, (d, hkv, e), std, pdt), ("embed", "kv_heads", None))
        self.v_proj = param(normal(rngs, (d, hkv, e), std, pdt), ("embed", "kv_heads", None))
        self.o_proj = param(normal(rngs, (hq, e, d), out_std, pdt), ("q_heads", None, "embed"))

    def _qkv(self, x_BLD, positions, key=None):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        q_BTHE, k_BSKE, v_BSKE = (linear(self, n, x_BLD, 1, dtype, key=key) for n in ("q_proj", "k_proj", "v_proj"))
        q_BTHE, k_BSKE, v_BSKE = (checkpoint_name(t, "proj_in") for t in (q_BTHE, k_BSKE, v_BSKE))
        if cfg.attn_rope:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2])
            q_BTHE = rope(q_BTHE, positions, cfg.attn_rope_theta)
            k_BSKE = rope(k_BSKE, positions, cfg.attn_rope_theta)
        return q_BTHE, k_BSKE, v_BSKE

    def _o(self, o_BTHE, key=None):
        return linear(self, "o_proj", o_BTHE, 2, jnp.dtype(self.cfg.dtype), key=key)

    def _attend(self, q_BTHE, k_BSKE, v_BSKE, seq_idx, key=None):
        dtype = jnp.dtype(self.cfg.dtype)
        mask = None
        if seq_idx is not None:
            # Packed documents: block attention across boundaries (combined with the causal mask).
            mask = (seq_idx[:, :, None] == seq_idx[:, None, :])[:, None]
        impl = attention_impl(self.cfg.attn_impl, dtype)
        if impl == "xla" and dtype == jnp.float16 and jax.default_backend() == "cpu":
            # jax's XLA attention asks for an F16_F16_F32 dot that the CPU backend cannot differentiate.
            q_BTHE, k_BSKE, v_BSKE = (t.astype(jnp.float32) for t in (q_BTHE, k_BSKE, v_BSKE))
        o_BTHE = jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, mask=mask, is_causal=True, implementation=impl)
        return self._o(o_BTHE, key)

    def __call__(self, x_BLD, *, seq_idx=None, positions=None, key=None):
        return self._attend(*self._qkv(x_BLD, positions, key), seq_idx, key)

    # --- inference: prefill and one-token decode with a K / V cache ----------------------------------------
    def prefill(self, x_BLD, *, seq_idx, positions, cache_len):
        """Full forward that also returns K / V for the prompt, in a cache of `cache_len` positions."""
        q_BTHE, k_BSKE, v_BSKE = self._qkv(x_BLD, positions)
        y_BLD = self._attend(q_BTHE, k_BSKE, v_BSKE, seq_idx)
        l = k_BSKE.shape[1]
        pad = ((0, 0), (0, cache_len - l), (0, 0), (0, 0))
        return y_BLD, {"k": jnp.pad(k_BSKE, pad), "v": jnp.pad(v_BSKE, pad)}

    def decode(self, x_BD, cache, *, pos, start):
        """One token per row at position `pos` (the same for every row; row b's tokens start at start[b])."""
        cfg = self.cfg
        q_B1HE, k_B1KE, v_B1KE = self._qkv(x_BD[:, None], (pos - start)[:, None])
        k_BSKE = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_B1KE.astype(cache["k"].dtype), pos, axis=1)
        v_BSKE = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_B1KE.astype(cache["v"].dtype), pos, axis=1)
        b, s, hkv, e = k_BSKE.shape
        r = cfg.attn_num_heads // hkv  # query head i reads kv head i // r
        q_BKRE = q_B1HE[:, 0].reshape(b, hkv, r, e)
        scores_BKRS = jnp.einsum("bkre,bske->bkrs", q_BKRE, k_BSKE, preferred_element_type=jnp.float32)
        scores_BKRS = scores_BKRS / jnp.sqrt(jnp.float32(e))
        t = jnp.arange(s)
        valid_BS = (t[None] >= start[:, None]) & (t[None] <= pos)
        scores_BKRS = jnp.where(valid_BS[:, None, None], scores_BKRS, -jnp.inf)
        p_BKRS = jax.nn.softmax(scores_BKRS, axis=-1).astype(v_BSKE.dtype)
        o_BKRE = jnp.einsum("bkrs,bske->bkre", p_BKRS, v_BSKE, preferred_element_type=jnp.float32)
        return self._o(o_BKRE.reshape(b, 1, hkv * r, e))[:, 0], {"k": k_BSKE, "v": v_BSKE}
