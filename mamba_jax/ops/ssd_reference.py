"""Plain references for the SSD scan: the single-token step and the naive per-token recurrence.

The recurrence is the definition every faster path is tested against (Mamba2, Dao & Gu 2024, eq. 1):

    S_t = exp(dt_t · A) · S_{t-1} + dt_t · x_t ⊗ B_t        y_t = S_t · C_t + D · x_t

with one state S of shape (H, P, N) per sequence, head h reading group h // (H / G) of B and C.
`ssd_step` is the decoding primitive (state in, state out); `ssd_reference` is a `lax.scan` of the
same update over the sequence, in float32, with the options of `mamba_jax.ssd`.

Dimension key: B batch, L length, H heads, P head dim, G groups, N state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def process_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """dt as the scan consumes it, in float32: (dt + dt_bias), softplus if asked, clamped to dt_limit.

    Same order as mamba_ssm's `_chunk_cumsum_fwd`: bias, then softplus, then the clamp.
    """
    dt = dt.astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(jnp.float32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = jnp.clip(dt, lo, hi)
    return dt


def _heads_per_group(x_H, B_G):
    H, G = x_H.shape[-2], B_G.shape[-2]
    if H % G:
        raise ValueError(f"ssd: heads ({H}) must be a multiple of groups ({G}).")
    return H // G


def ssd_step(
    state_BHPN,
    x_BHP,
    dt_BH,
    A_H,
    B_BGN,
    C_BGN,
    *,
    D=None,
    z_BHP=None,
    dt_bias=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
):
    """Advance the SSM state by one token. Returns (y_BHP in x's dtype, new state in float32)."""
    R = _heads_per_group(x_BHP, B_BGN)
    f32 = jnp.float32
    dt_BH = process_dt(dt_BH, dt_bias, dt_softplus, dt_limit)
    x = x_BHP.astype(f32)
    B_BHN = jnp.repeat(B_BGN.astype(f32), R, axis=1)
    C_BHN = jnp.repeat(C_BGN.astype(f32), R, axis=1)
    decay_BH = jnp.exp(dt_BH * A_H.astype(f32))
    state = (
        decay_BH[..., None, None] * state_BHPN.astype(f32) + (dt_BH[..., None] * x)[..., None] * B_BHN[:, :, None, :]
    )
    y = jnp.einsum("bhpn,bhn->bhp", state, C_BHN, precision=_HIGHEST)
    if D is not None:
        y = y + x * (D.astype(f32)[:, None] if D.ndim == 1 else D.astype(f32))
    if z_BHP is not None:
        y = y * jax.nn.silu(z_BHP.astype(f32))
    return y.astype(x_BHP.dtype), state


def ssd_reference(
    x,
    dt,
    A,
    B,
    C,
    *,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
    initial_states=None,
    seq_idx=None,
    return_final_states=False,
):
    """Naive token-by-token recurrence with the semantics of `mamba_jax.ssd` (float32 throughout).

    `seq_idx` (B, L): the state resets to zero at every position whose document index differs from
    the previous position's; `initial_states` belong to the document at position 0.
    """
    f32 = jnp.float32
    b, l, h, p = x.shape
    n = B.shape[-1]
    up = lambda t: None if t is None else t.astype(f32)  # noqa: E731
    state0 = jnp.zeros((b, h, p, n), f32) if initial_states is None else up(initial_states)
    if seq_idx is None:
        reset_BL = jnp.zeros((b, l), bool)
    else:
        reset_BL = jnp.concatenate([jnp.zeros((b, 1), bool), seq_idx[:, 1:] != seq_idx[:, :-1]], axis=1)

    def body(state, inputs):
        x_t, dt_t, B_t, C_t, z_t, reset_t = inputs
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)
        y_t, state = ssd_step(
            state,
            x_t,
            dt_t,
            up(A),
            B_t,
            C_t,
            D=up(D),
            z_BHP=z_t,
            dt_bias=up(dt_bias),
            dt_softplus=dt_softplus,
            dt_limit=dt_limit,
        )
        return state, y_t

    time_major = lambda t: None if t is None else jnp.moveaxis(up(t), 1, 0)  # noqa: E731
    xs = (time_major(x), time_major(dt), time_major(B), time_major(C), time_major(z), reset_BL.T)
    final, y_LBHP = jax.lax.scan(body, state0, xs)
    y = jnp.moveaxis(y_LBHP, 0, 1)
    return (y, final) if return_final_states else y
