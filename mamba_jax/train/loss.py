"""Next-token cross-entropy computed in chunks of the sequence, so the (B, L, V) float32 logits never exist.

For a 50k–256k vocabulary the full logits of a 4096-token batch are gigabytes; each chunk's logits are
formed, reduced to per-token losses and discarded, and recomputed in the backward pass (jax.checkpoint).
Returns sums, not means, so that gradient accumulation over micro batches divides once by the global
token count and equals one large batch exactly.

Dimension key: B batch, L length, K chunk length, D model width, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(h_BLD, w_DV, labels_BL, *, chunk: int):
    """Per-token cross-entropy (float32) of logits h @ w against labels."""
    b, l, d = h_BLD.shape
    k = min(chunk, l)
    pad = (-l) % k
    if pad:
        h_BLD = jnp.pad(h_BLD, ((0, 0), (0, pad), (0, 0)))
        labels_BL = jnp.pad(labels_BL, ((0, 0), (0, pad)))
    n = (l + pad) // k

    @jax.checkpoint
    def one(args):
        h_BKD, y_BK = args
        logits = jnp.einsum("bkd,dv->bkv", h_BKD, w_DV, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y_BK[..., None], axis=-1)[..., 0]
        return lse - picked

    h_NBKD = jnp.moveaxis(h_BLD.reshape(b, n, k, d), 1, 0)
    y_NBK = jnp.moveaxis(labels_BL.reshape(b, n, k), 1, 0)
    losses = jax.lax.map(one, (h_NBKD, y_NBK))
    return jnp.moveaxis(losses, 0, 1).reshape(b, n * k)[:, :l]


def lm_loss_sums(
    model, batch, *, chunk: int, remat: str = "none", remat_layers: str = "M*-", key=None, fp8_layers=None
):
    """(Σ masked token losses, Σ mask) of a batch with input_ids, labels, loss_mask and optional seq_idx;
    `fp8_layers` as `LanguageModel.hidden_states` takes it."""
    h_BLD = model.hidden_states(
        batch["input_ids"], seq_idx=batch.get("seq_idx"), remat=remat, remat_layers=remat_layers, key=key,
        fp8_layers=fp8_layers,
    )  # fmt: skip
    w_DV = model.head_weight().astype(h_BLD.dtype)
    losses_BL = token_losses(h_BLD, w_DV, batch["labels"], chunk=chunk)
    mask_BL = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(losses_BL * mask_BL), jnp.sum(mask_BL)
