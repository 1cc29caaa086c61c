"""Chunked SSD scan in plain XLA: the portable path of `mamba_jax.ssd`, and its differentiable default.

Follows the four-stage chunked algorithm of Mamba2 (Dao & Gu 2024, §6; mamba_ssm `ssd_combined.py`):
  1. within each chunk of Q tokens, a masked, decayed "attention"  y_diag = (C Bᵀ ∘ decay ∘ dt) x;
  2. the state each chunk leaves behind, from its own tokens only;
  3. the states passed from chunk to chunk (an associative scan over chunks, log depth);
  4. each token reads the state that entered its chunk:  y_off = exp(cumsum dA) · C · S_prev.
Inputs are taken in their own dtype (bf16 on GPU) with float32 accumulation; decays, cumulative sums and
states are float32, as in mamba_ssm. B and C stay per group ((C Bᵀ) is formed once per group, not per
head), and the largest intermediate is the (B, C, H, Q, Q) score tensor of stage 1, in the input dtype.

Document boundaries (`seq_idx`): a token only sees tokens of its own document inside its chunk, the
state leaving a chunk only carries its last document, and the state entering a chunk is dropped for
tokens of a later document.

Dimension key: B batch, L length, C chunks, Q chunk length, H heads, G groups, R heads per group,
P head dim, N state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pad_to_chunks(t, pad, value=0):
    if pad == 0 or t is None:
        return t
    widths = [(0, 0)] * t.ndim
    widths[1] = (0, pad)
    return jnp.pad(t, widths, constant_values=value)


def _chunk(t, c, q):
    """(B, L, ...) → (B, C, Q, ...)."""
    return t.reshape(t.shape[0], c, q, *t.shape[2:])


def _combine(left, right):
    """Associative combine of two state-passing segments (decay a, state s): s = a_r · s_l + s_r."""
    a_l, s_l = left
    a_r, s_r = right
    return a_l * a_r, a_r[..., None, None] * s_l + s_r


def ssd_chunked(x, dt, A, B, C, *, chunk_size, initial_states=None, seq_idx=None):
    """Chunked scan on prepared inputs. Returns (y like x, final states (B, H, P, N) float32).

    `dt` must already be processed (bias, softplus, limit: `process_dt`) and float32; D and z are
    applied by the caller. Lengths that are not a multiple of `chunk_size` are padded with dt = 0,
    which leaves the state unchanged, so the final state is the one after the last real token.
    """
    f32 = jnp.float32
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    q = chunk_size
    pad = (-l) % q
    c = (l + pad) // q

    x_BCQGRP = _chunk(_pad_to_chunks(x, pad), c, q).reshape(b, c, q, g, r, p)
    dt_BCQH = _chunk(_pad_to_chunks(dt.astype(f32), pad), c, q)
    B_BCQGN = _chunk(_pad_to_chunks(B, pad), c, q)
    C_BCQGN = _chunk(_pad_to_chunks(C, pad), c, q)

    # Cumulative log-decay inside each chunk (never across chunks, so differences stay bounded).
    dA_BCQH = dt_BCQH * A.astype(f32)
    cs_BCQH = jnp.cumsum(dA_BCQH, axis=2)
    cs_last_BCH = cs_BCQH[:, :, -1]

    if seq_idx is not None:
        # Padding continues the last document, so it never creates a boundary.
        sid_BCQ = _chunk(_pad_to_chunks(seq_idx, pad, 0), c, q)
        if pad:
            sid_BCQ = sid_BCQ.reshape(b, -1).at[:, l:].set(seq_idx[:, -1:]).reshape(b, c, q)
        sid_last_BC = sid_BCQ[:, :, -1]
        # Document of the token that precedes each chunk; position 0 for the first chunk, so that
        # initial states belong to the first document.
        sid_prev_BC = jnp.concatenate([sid_BCQ[:, :1, 0], sid_last_BC[:, :-1]], axis=1)

    # 1. Intra-chunk output: scores[q, s] = (C_q · B_s) · exp(cs_q − cs_s) · dt_s for s ≤ q.
    CB_BCGQS = jnp.einsum("bcqgn,bcsgn->bcgqs", C_BCQGN, B_BCQGN, preferred_element_type=f32)
    cs_BCHQ = jnp.moveaxis(cs_BCQH, 2, 3)
    seg_BCHQS = cs_BCHQ[..., :, None] - cs_BCHQ[..., None, :]
    keep_QS = jnp.tril(jnp.ones((q, q), bool))
    keep = keep_QS
    if seq_idx is not None:
        keep = keep & (sid_BCQ[:, :, None, :, None] == sid_BCQ[:, :, None, None, :])
    # exp of −inf where masked: exp(seg) itself would overflow above the diagonal and poison gradients.
    decay_BCHQS = jnp.exp(jnp.where(keep, seg_BCHQS, -jnp.inf))
    dt_BCHS = jnp.moveaxis(dt_BCQH, 2, 3)
    scores_BCGRQS = (CB_BCGQS[:, :, :, None] * (decay_BCHQS * dt_BCHS[..., None, :]).reshape(b, c, g, r, q, q)).astype(
        x.dtype
    )
    y_BCQGRP = jnp.einsum("bcgrqs,bcsgrp->bcqgrp", scores_BCGRQS, x_BCQGRP, preferred_element_type=f32)

    # 2. State each chunk leaves, from its own tokens: Σ_s exp(cs_last − cs_s) · dt_s · x_s ⊗ B_s.
    w_BCQH = jnp.exp(cs_last_BCH[:, :, None, :] - cs_BCQH) * dt_BCQH
    if seq_idx is not None:
        w_BCQH = jnp.where((sid_BCQ == sid_last_BC[:, :, None])[..., None], w_BCQH, 0.0)
    xw_BCQGRP = (x_BCQGRP * w_BCQH.reshape(b, c, q, g, r, 1)).astype(x.dtype)
    states_BCGRPN = jnp.einsum("bcqgn,bcqgrp->bcgrpn", B_BCQGN, xw_BCQGRP, preferred_element_type=f32)
    states_BCHPN = states_BCGRPN.reshape(b, c, h, p, n)

    # 3. Pass states between chunks: S_c = exp(cs_last_c) · S_{c−1} + states_c (zero carry into a
    #    chunk whose last document starts inside it).
    carry_BCH = jnp.exp(cs_last_BCH)
    if seq_idx is not None:
        carry_BCH = jnp.where((sid_last_BC == sid_prev_BC)[..., None], carry_BCH, 0.0)
    if initial_states is not None:
        states_BCHPN = states_BCHPN.at[:, 0].add(carry_BCH[:, 0, :, None, None] * initial_states.astype(f32))
    _, after_BCHPN = jax.lax.associative_scan(_combine, (carry_BCH, states_BCHPN), axis=1)
    final_BHPN = after_BCHPN[:, -1]
    init_BHPN = jnp.zeros((b, h, p, n), f32) if initial_states is None else initial_states.astype(f32)
    prev_BCHPN = jnp.concatenate([init_BHPN[:, None], after_BCHPN[:, :-1]], axis=1)

    # 4. Contribution of the entering state: exp(cs_q) · C_q · S_prev, for tokens of the same document.
    prev_BCGRPN = prev_BCHPN.reshape(b, c, g, r, p, n).astype(C.dtype)
    y_off_BCQGRP = jnp.einsum("bcqgn,bcgrpn->bcqgrp", C_BCQGN, prev_BCGRPN, preferred_element_type=f32)
    in_decay_BCQH = jnp.exp(cs_BCQH)
    if seq_idx is not None:
        in_decay_BCQH = jnp.where((sid_BCQ == sid_prev_BC[:, :, None])[..., None], in_decay_BCQH, 0.0)
    y_BCQGRP = y_BCQGRP + y_off_BCQGRP * in_decay_BCQH.reshape(b, c, q, g, r, 1)

    y_BLHP = y_BCQGRP.reshape(b, c * q, h, p)[:, :l]
    return y_BLHP, final_BHPN
