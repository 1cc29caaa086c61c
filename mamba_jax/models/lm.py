"""The language model: embedding → a stack of pre-norm residual layers given by a pattern string →
final RMSNorm → LM head (tied to the embedding or not).

Every layer is `x = x + mixer(RMSNorm(x))` (Megatron's hybrid stack, mamba_ssm's `Block`), where the
mixer is the class registered for its symbol in `mamba_jax.layers.registry`; the layers are applied as
scanned segments (`mamba_jax.models.stack`). The residual stream is kept
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
from mamba_jax.models.config import ModelConfig
from mamba_jax.models.stack import ACT_BLD, LayerStack
from mamba_jax.parallel.sharding import constrain


def document_positions(seq_idx_BL):
    """Position of each token inside its document (restarts wherever seq_idx changes)."""
    l = seq_idx_BL.shape[1]
    t = jnp.arange(l, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(seq_idx_BL[:, :1], bool), seq_idx_BL[:, 1:] != seq_idx_BL[:, :-1]], axis=1)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


def _prepend_virtual(h_BLD, virtual_ND, seq_idx):
    """Insert the N virtual-token embeddings right before each row's last document (position 0 for training
    rows, after the left padding for inference batches). Returns (h (B, L + N, D), its seq_idx, and for each
    input position its index in the new sequence)."""
    b, l, _ = h_BLD.shape
    n = virtual_ND.shape[0]
    if seq_idx is None:
        seq_idx = jnp.zeros((b, l), jnp.int32)
    start_B = jnp.argmax(seq_idx == seq_idx[:, -1:], axis=1)  # first position of the last document
    t = jnp.arange(l + n)[None]
    is_virtual = (t >= start_B[:, None]) & (t < start_B[:, None] + n)
    src_BT = jnp.clip(jnp.where(t < start_B[:, None], t, t - n), 0, l - 1)
    tokens = jnp.take_along_axis(h_BLD, src_BT[..., None], axis=1)
    virtual = virtual_ND[jnp.clip(t - start_B[:, None], 0, n - 1)]
    h = jnp.where(is_virtual[..., None], virtual, tokens)
    sid = jnp.where(is_virtual, seq_idx[:, -1:], jnp.take_along_axis(seq_idx, src_BT, axis=1))
    j = jnp.arange(l)[None]
    back_BL = jnp.where(j < start_B[:, None], j, j + n)
    return h, sid.astype(jnp.int32), back_BL


class LanguageModel(nnx.Module):
    """`model(input_ids (B, L) int32) → logits (B, L, V) float32` (V is the padded vocabulary)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        v, d = cfg.padded_vocab_size, cfg.d_model
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed = param(normal(rngs, (v, d), cfg.init_std, pdt), ("vocab", "embed"))
        self.layers = LayerStack(cfg, rngs=rngs)
        self.norm_f = RMSNorm(d, eps=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=pdt)
        self.lm_head = (
            None if cfg.tie_embeddings else param(normal(rngs, (d, v), cfg.init_std, pdt), ("embed", "vocab"))
        )

    def hidden_states(
        self, input_ids_BL, *, seq_idx=None, positions=None, remat="none", remat_layers="M*-", key=None,
        fp8_layers=None,
    ):  # fmt: skip
        """Final-normed hidden states (B, L, D) in the compute dtype.

        `remat` ("none", "full", "selective") checkpoints the blocks whose symbol is in `remat_layers`;
        `fp8_layers` (first, end) runs those layers' projections in fp8 (training, `train.fp8`).
        """
        cfg = self.cfg
        if positions is None and seq_idx is not None and cfg.attn_rope:
            positions = document_positions(seq_idx)
        # Under sequence parallelism each device embeds only its slice of the tokens.
        h_BLD = self._embed(constrain(input_ids_BL, ("batch", "length")))
        virtual = getattr(self, "prompt", None)
        if virtual is not None:
            h_BLD, seq_idx, back_BL = _prepend_virtual(h_BLD, virtual().astype(h_BLD.dtype), seq_idx)
            positions = document_positions(seq_idx) if cfg.attn_rope else None
        h_BLD = constrain(h_BLD, ACT_BLD)
        h_BLD = self.layers(
            h_BLD, seq_idx=seq_idx, positions=positions, remat=remat, remat_layers=remat_layers, key=key,
            fp8_layers=fp8_layers,
        )  # fmt: skip
        if virtual is not None:  # back to the input's positions
            h_BLD = jnp.take_along_axis(h_BLD, back_BL[..., None], axis=1)
        return self.norm_f(h_BLD)

    def _embed(self, ids):
        stream_dtype = jnp.float32 if self.cfg.residual_in_fp32 else jnp.dtype(self.cfg.dtype)
        return jnp.take(self.embed[...], ids, axis=0).astype(stream_dtype)

    def head_weight(self):
        """The (D, V) output projection (the embedding transposed when tied)."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def __call__(self, input_ids_BL, *, seq_idx=None, positions=None):
        h_BLD = self.hidden_states(input_ids_BL, seq_idx=seq_idx, positions=positions)
        w_DV = cast(self.head_weight(), h_BLD.dtype)
        logits = jnp.einsum("bld,dv->blv", h_BLD, w_DV, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))

    # --- inference ----------------------------------------------------------------------------------------
    def prefill(self, input_ids_BL, *, seq_idx=None, positions=None, cache_len: int):
        """Run the prompt; returns (float32 logits of the last position (B, V), the decoding cache).

        Every Mamba layer keeps its final SSM state and last conv inputs, every attention layer its K / V in a
        cache of `cache_len` positions. Prompts of different lengths are left-padded and given `seq_idx` = 0
        on the padding and 1 on the prompt, so that no state, conv window or attention crosses into them.
        """
        cfg = self.cfg
        h_BLD = self._embed(input_ids_BL)
        virtual = getattr(self, "prompt", None)
        if virtual is not None:  # the virtual tokens go right before each prompt (after its left padding)
            h_BLD, seq_idx, _ = _prepend_virtual(h_BLD, virtual().astype(h_BLD.dtype), seq_idx)
            positions, cache_len = None, cache_len + virtual.embed.shape[0]
        if positions is None and seq_idx is not None and cfg.attn_rope:
            positions = document_positions(seq_idx)
        h_BLD, cache = self.layers.prefill(h_BLD, seq_idx=seq_idx, positions=positions, cache_len=cache_len)
        return self._logits(self.norm_f(h_BLD[:, -1])), cache

    def decode(self, ids_B, cache, *, pos, start):
        """One token per row at position `pos` (row b's prompt starts at start[b]); returns (logits, cache)."""
        h_BD = self._embed(ids_B)
        if getattr(self, "prompt", None) is not None:  # positions count the virtual tokens
            pos = pos + self.prompt.embed.shape[0]
        stream = (h_BD, h_BD.astype(self.cfg.dtype))  # (residual, its compute-dtype copy): `Block.decode`
        (h_BD, _), cache = self.layers.decode(stream, cache, pos=pos, start=start)
        return self._logits(self.norm_f(h_BD)), cache

    def _logits(self, h_xD):
        w_DV = cast(self.head_weight(), h_xD.dtype)
        return jnp.einsum("...d,dv->...v", h_xD, w_DV, preferred_element_type=jnp.float32)
