"""`mamba_jax.ssd`: the Mamba2 SSD scan with mamba_ssm's `mamba_chunk_scan_combined` contract.

Shapes: x (B, L, H, P), dt (B, L, H), A (H,), B and C (B, L, G, N), D (H,) or (H, P), z like x,
initial_states and final states (B, H, P, N), seq_idx (B, L) int. Options mean what they mean in
mamba_ssm: dt_bias is added before the softplus, dt_limit clamps after it, D is a per-head skip, z gates
the output as y · silu(z), initial_states enter the first chunk, the state resets wherever seq_idx
changes, return_final_states also returns the state after the last token.

`impl` chooses the implementation: "xla" (chunked, portable, differentiable), "pallas" (the fused GPU
kernels of `mamba_jax.kernels`, interpret mode on CPU) or "auto" (Pallas on Hopper-class GPUs where the
options are supported, XLA elsewhere).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp

from mamba_jax.ops.ssd_reference import process_dt
from mamba_jax.ops.ssd_xla import ssd_chunked

log = logging.getLogger(__name__)

IMPLS = ("auto", "xla", "pallas")


def _check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, impl):
    def fail(msg):
        raise ValueError(f"mamba_jax.ssd: {msg}")

    if x.ndim != 4:
        fail(f"x must be (batch, length, heads, head_dim), got shape {x.shape}.")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        fail(f"dt must be (batch, length, heads) = {(b, l, h)}, got {dt.shape}.")
    if A.shape != (h,):
        fail(f"A must be (heads,) = {(h,)}, got {A.shape}.")
    if B.ndim != 4 or B.shape[:2] != (b, l):
        fail(f"B must be (batch, length, groups, state) with batch, length = {(b, l)}, got {B.shape}.")
    if C.shape != B.shape:
        fail(f"C must have B's shape {B.shape}, got {C.shape}.")
    g, n = B.shape[2:]
    if h % g:
        fail(f"heads ({h}) must be a multiple of groups ({g}); head i reads group i // (heads / groups).")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        fail(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if D is not None and D.shape not in ((h,), (h, p)):
        fail(f"D must be (heads,) or (heads, head_dim), got {D.shape}.")
    if z is not None and z.shape != x.shape:
        fail(f"z must have x's shape {x.shape}, got {z.shape}.")
    if dt_bias is not None and dt_bias.shape != (h,):
        fail(f"dt_bias must be (heads,) = {(h,)}, got {dt_bias.shape}.")
    if initial_states is not None and initial_states.shape != (b, h, p, n):
        fail(f"initial_states must be (batch, heads, head_dim, state) = {(b, h, p, n)}, got {initial_states.shape}.")
    if seq_idx is not None:
        if seq_idx.shape != (b, l):
            fail(f"seq_idx must be (batch, length) = {(b, l)}, got {seq_idx.shape}.")
        if not jnp.issubdtype(seq_idx.dtype, jnp.integer):
            fail(f"seq_idx must hold integers (document index per token), got {seq_idx.dtype}.")
    if impl not in IMPLS:
        fail(f"impl must be one of {IMPLS}, got {impl!r}.")


@functools.cache
def note_once(message: str) -> None:
    log.warning(message)


def _resolve_impl(impl: str, **options) -> str:
    if impl == "xla":
        return "xla"
    from mamba_jax.kernels import ssd_pallas_unsupported  # lazy: Pallas imports cost start-up time

    reason = ssd_pallas_unsupported(**options)
    if impl == "pallas":
        if reason:
            note_once(f"mamba_jax.ssd: Pallas kernels do not support {reason}; using the XLA path.")
            return "xla"
        return "pallas"
    # auto: the kernels only pay off on a GPU with Hopper-class features.
    on_hopper = jax.default_backend() == "gpu" and all(
        float(getattr(d, "compute_capability", "0")) >= 9.0 for d in jax.local_devices()
    )
    return "pallas" if on_hopper and not reason else "xla"


@functools.partial(jax.checkpoint, static_argnums=(7,))
def _ssd_chunked_recomputed(x, dt, A, B, C, initial_states, seq_idx, chunk_size):
    # The chunked scan's intermediates (the (B, C, H, Q, Q) scores above all) are large and cheap to redo:
    # the backward pass recomputes them from the inputs instead of holding them from the forward, as
    # mamba_ssm's kernels do. Without this a 1.3B model at 2 × 4096 tokens asks for ~190 GB.
    return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, initial_states=initial_states, seq_idx=seq_idx)


def ssd(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    dt_limit=(0.0, math.inf),
    initial_states=None,
    seq_idx=None,
    return_final_states=False,
    impl="auto",
):
    """Chunked SSD scan. Returns y like x, and the final states (B, H, P, N) float32 when asked."""
    _check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, impl)
    impl = _resolve_impl(
        impl,
        x=x,
        B=B,
        chunk_size=chunk_size,
        D=D,
        initial_states=initial_states,
        seq_idx=seq_idx,
    )
    if impl == "pallas":
        from mamba_jax.kernels import ssd_pallas

        y, final = ssd_pallas(
            x,
            dt,
            A,
            B,
            C,
            chunk_size=chunk_size,
            D=D,
            z=z,
            dt_bias=dt_bias,
            dt_softplus=dt_softplus,
            dt_limit=tuple(dt_limit),
            initial_states=initial_states,
            seq_idx=seq_idx,
        )
    else:
        dt_p = process_dt(dt, dt_bias, dt_softplus, tuple(dt_limit))
        y, final = _ssd_chunked_recomputed(x, dt_p, A, B, C, initial_states, seq_idx, chunk_size)
        if D is not None:
            D32 = D.astype(jnp.float32)
            y = y + x.astype(jnp.float32) * (D32[:, None] if D.ndim == 1 else D32)
        if z is not None:
            y = y * jax.nn.silu(z.astype(jnp.float32))
        y = y.astype(x.dtype)
    return (y, final) if return_final_states else y
