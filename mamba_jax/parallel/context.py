"""Context (sequence) parallelism for the Mamba2 mixer: each device of the mesh's `sequence` axis holds one
contiguous slice of every sequence, and the SSM state is passed between the slices.

Everything else in a layer is per token (projections, norms, MLP) or left to XLA's partitioner (attention
gathers the keys and values it needs), so only the mixer's sequential part needs care. Per slice k of n
(`conv_ssd`, under `shard_map`):

1. the causal conv reads the last K−1 inputs of slice k−1 (a `ppermute` halo) with their document ids;
2. the chunked scan runs locally from a zero state, giving y_loc and the slice's end state E_k;
3. the end states and each slice's total decay Π_k = exp(A Σ dt) (0 where a document starts inside the slice)
   are gathered over the axis, and the state entering slice k is built in order:
   S_0 = 0, S_k = [slice k continues slice k−1's last document] · (Π_{k−1} S_{k−1} + E_{k−1});
4. the incoming state's contribution is added to the tokens before the slice's first document boundary:
   y_t += exp(A Σ_{s≤t} dt_s) · C_t · S_k (D, the gate and the norm are per token and need nothing).

This is the state passing of Mamba2's chunked algorithm (Dao & Gu 2024, §7) with devices in place of chunks,
as NeMo / Megatron's context parallelism does for attention with its ring. States are (B, H, P, N) per slice:
the gather moves n of them, small next to the activations. Gradients flow through the collectives.

Dimension key: B batch, L slice length, G groups, F conv channels per group, H heads, P head dim, N state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.core import spmd

from mamba_jax.ops.ssd import ssd
from mamba_jax.ops.ssd_reference import process_dt
from mamba_jax.parallel.sharding import DEFAULT_RULES, SEQUENCE_AXIS, logical_to_spec, sequence_parallel_size

AXIS = SEQUENCE_AXIS
_HIGHEST = jax.lax.Precision.HIGHEST


def _spec(*axes):
    rules = spmd.get_logical_axis_rules() or DEFAULT_RULES
    return logical_to_spec(axes, rules)


def _incoming_state(end_BHPN, decay_BH, first_B, last_B, n: int):
    """The state entering this slice, from every slice's end state (local scan from zero), total decay and
    first / last document ids, gathered over the axis (step 3 of the module docstring)."""
    ends = jax.lax.all_gather(end_BHPN, AXIS)
    decays = jax.lax.all_gather(decay_BH, AXIS)
    firsts = jax.lax.all_gather(first_B, AXIS)
    lasts = jax.lax.all_gather(last_B, AXIS)
    state = jnp.zeros_like(end_BHPN)
    states = [state]
    for k in range(1, n):  # n is the axis size: a handful of (B, H, P, N) updates
        link_B = firsts[k] == lasts[k - 1]
        state = jnp.where(link_B[:, None, None, None], decays[k - 1][..., None, None] * state + ends[k - 1], 0.0)
        states.append(state)
    return jnp.stack(states)[jax.lax.axis_index(AXIS)]


def conv_ssd(
    xBC_BLGF,
    dt_BLH,
    conv_w_KGF,
    conv_b_GF,
    A_H,
    D_H,
    dt_bias_H,
    seq_idx_BL,
    *,
    conv_fn,
    head_dim: int,
    d_state: int,
    chunk_size: int,
    dt_softplus: bool,
    dt_limit,
    impl: str,
):
    """The mixer's conv + SiLU + SSD scan (D included, no gate) with the sequence split over the mesh's
    `sequence` axis; inputs and output (B, L, H, P) are the global arrays, sharded by the logical rules.
    `conv_fn` is the layer's causal conv (`causal_conv1d`), called per slice with the halo as its state."""
    n = sequence_parallel_size()
    k = conv_w_KGF.shape[0]
    has_ids = seq_idx_BL is not None
    if not has_ids:  # one document per row: the same code path with constant ids
        seq_idx_BL = jnp.zeros(xBC_BLGF.shape[:2], jnp.int32)
    length = xBC_BLGF.shape[1]
    if length % n or length // n < k - 1:
        raise ValueError(
            f"sequence parallelism over {n} devices needs a sequence length that is a multiple of {n} with at "
            f"least {k - 1} tokens per slice, got {length}; change data.seq_len or mesh.sequence."
        )

    def local(xBC, dt, w, b, A, D, dt_bias, sid):
        perm = [(i, i + 1) for i in range(n - 1)]  # slice 0 receives zeros: no tokens before it
        halo = jax.lax.ppermute(xBC[:, xBC.shape[1] - (k - 1) :], AXIS, perm)
        halo_ids = jax.lax.ppermute(sid[:, sid.shape[1] - (k - 1) :], AXIS, perm)
        conv = jax.nn.silu(conv_fn(xBC, w, b, seq_idx=sid, state_BKGF=halo, state_seq_idx=halo_ids))
        f = conv.shape[-1]
        x, B, C = jnp.split(conv, (f - 2 * d_state, f - d_state), axis=-1)
        bsz, ls, g = x.shape[:3]
        h = dt.shape[-1]
        y, end = ssd(
            x.reshape(bsz, ls, h, head_dim), dt, A, B, C, chunk_size=chunk_size, D=D, dt_bias=dt_bias,
            dt_softplus=dt_softplus, dt_limit=dt_limit, seq_idx=sid if has_ids else None,
            return_final_states=True, impl=impl,
        )  # fmt: skip
        # Decay from the slice start to each token, and which tokens still belong to its first document.
        logdecay_BLH = jnp.cumsum(process_dt(dt, dt_bias, dt_softplus, tuple(dt_limit)) * A, axis=1)
        same_BL = jnp.concatenate([jnp.ones_like(sid[:, :1], bool), sid[:, 1:] == sid[:, :-1]], axis=1)
        first_doc_BL = jnp.cumprod(same_BL.astype(jnp.int32), axis=1).astype(jnp.float32)
        decay_BH = jnp.exp(logdecay_BLH[:, -1]) * first_doc_BL[:, -1:]
        state = _incoming_state(end, decay_BH, sid[:, 0], sid[:, -1], n)
        # C_t · S per head, head h reading group h // (H / G): (B, L, G, N) · (B, G, H / G, P, N).
        state_BGRPN = state.reshape(bsz, g, h // g, head_dim, d_state)
        carry = jnp.einsum("blgn,bgrpn->blgrp", C.astype(jnp.float32), state_BGRPN, precision=_HIGHEST)
        scale_BLH = jnp.exp(logdecay_BLH) * first_doc_BL[..., None]
        carry_BLHP = scale_BLH[..., None] * carry.reshape(bsz, ls, h, head_dim)
        return (y.astype(jnp.float32) + carry_BLHP).astype(y.dtype)

    in_specs = (
        _spec("batch", "length", "ssm_groups", None),
        _spec("batch", "length", "ssm_heads"),
        _spec(None, "ssm_groups", None),
        _spec("ssm_groups", None),
        _spec("ssm_heads"),
        _spec("ssm_heads"),
        _spec("ssm_heads"),
        _spec("batch", "length"),
    )
    out_spec = _spec("batch", "length", "ssm_heads", None)
    if out_spec[1] != AXIS:
        raise ValueError(
            f"the sharding rules map the 'length' axis to {out_spec[1]!r}, not to the mesh's {AXIS!r} axis; "
            f"sequence parallelism needs the rule ('length', '{AXIS}')."
        )
    fn = jax.shard_map(local, in_specs=in_specs, out_specs=out_spec)
    return fn(xBC_BLGF, dt_BLH, conv_w_KGF, conv_b_GF, A_H, D_H, dt_bias_H, seq_idx_BL)
