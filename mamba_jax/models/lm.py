"""The language model: embedding → a stack of pre-norm residual layers given by a pattern string →
final RMSNorm → LM head (tied to the embedding or not).

Every layer is `x = x + mixer(RMSNorm(x))` (Megatron's hybrid stack, mamba_ssm's `Block`), where the
mixer is the class registered for its symbol in `mamba_jax.layers.registry`. The residual stream is kept
in float32 when `residual_in_fp32` (state-spaces checkpoints) and in the compute dtype otherwise (NeMo).
Activations are constrained to their logical sharding at block boundaries only.

Dimension key: B batch, L length, D model width, V padded vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.layers.base import cast, normal, param
from mamba_jax.layers.norms import RMSNorm
from mamba_jax.layers.registry import LAYERS
from mamba_jax.models.config import ModelConfig
from mamba_jax.parallel.sharding import constrain

ACT_BLD = ("batch", "length", "act_embed")


def document_positions(seq_idx_BL):
    """Position of each token inside its document (restarts wherever seq_idx changes)."""
    l = seq_idx_BL.shape[1]
    t = jnp.arange(l, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(seq_idx_BL[:, :1], bool), seq_idx_BL[:, 1:] != seq_idx_BL[:, :-1]], axis=1)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


class Block(nnx.Module):
    """Pre-norm residual layer around one mixer."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        self.symbol = cfg.pattern[layer_idx]
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=cfg.param_dtype)
        self.mixer = LAYERS[self.symbol](cfg, layer_idx, rngs=rngs)

    def __call__(self, h_BLD, *, seq_idx=None, positions=None):
        out = self.mixer(self.norm(h_BLD), seq_idx=seq_idx, positions=positions)
        return h_BLD + out.astype(h_BLD.dtype)


class LanguageModel(nnx.Module):
    """`model(input_ids (B, L) int32) → logits (B, L, V) float32` (V is the padded vocabulary)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        v, d = cfg.padded_vocab_size, cfg.d_model
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed = param(normal(rngs, (v, d), cfg.init_std, pdt), ("vocab", "embed"))
        self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.norm_f = RMSNorm(d, eps=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=pdt)
        self.lm_head = (
            None if cfg.tie_embeddings else param(normal(rngs, (d, v), cfg.init_std, pdt), ("embed", "vocab"))
        )

    def hidden_states(self, input_ids_BL, *, seq_idx=None, positions=None):
        """Final-normed hidden states (B, L, D) in the compute dtype."""
        cfg = self.cfg
        if positions is None and seq_idx is not None and cfg.attn_rope:
            positions = document_positions(seq_idx)
        stream_dtype = jnp.float32 if cfg.residual_in_fp32 else jnp.dtype(cfg.dtype)
        h_BLD = jnp.take(self.embed[...], input_ids_BL, axis=0).astype(stream_dtype)
        h_BLD = constrain(h_BLD, ACT_BLD)
        for block in self.layers:
            h_BLD = constrain(block(h_BLD, seq_idx=seq_idx, positions=positions), ACT_BLD)
        return self.norm_f(h_BLD)

    def head_weight(self):
        """The (D, V) output projection (the embedding transposed when tied)."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def __call__(self, input_ids_BL, *, seq_idx=None, positions=None):
        h_BLD = self.hidden_states(input_ids_BL, seq_idx=seq_idx, positions=positions)
        w_DV = cast(self.head_weight(), h_BLD.dtype)
        logits = jnp.einsum("bld,dv->blv", h_BLD, w_DV, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))
