"""fp8 training matmuls with tensorwise current scaling (NeMo's "fp8 tensorwise current scaling" recipe for
Nemotron-H 47B / 56B; Transformer Engine's Float8CurrentScaling).

Each projection y = x · W of a layer in fp8 runs on x and W rounded to float8 e4m3 with one scale per tensor
taken from that tensor's current absolute maximum (s = amax / 448, so nothing overflows), and its backward on
the incoming gradient rounded to e5m2 (s = amax / 57344: the wider range gradients need); both backward
products reuse the rounded x and W. The rounding is written as quantize → dequantize ("qdq") around plain
products: the pattern XLA's GPU compiler rewrites into fp8 tensor-core GEMMs with the scales folded in (the
one flax's fp8 ops rely on; whether it does so for these products is for a GPU run to show:
benchmarks/gpu_session.sh c). Elsewhere it is the same arithmetic in the compute dtype. Rounding has no
gradient of its own (straight-through), as in every fp8 recipe.

Which layers run in fp8 is a trace-time context (`fp8_scope`), set per layer by the layer stack from
`train.fp8` (NeMo keeps the first and last layers in bf16: `train.fp8_bf16_layers`). Inside a scanned
segment the layer index is a traced value, and `linear` picks the fp8 or the plain product with `lax.cond`.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
_ACTIVE = contextvars.ContextVar("mamba_jax_fp8", default=None)


@contextlib.contextmanager
def fp8_scope(flag):
    """Projections traced inside run in fp8 when `flag` is True (a Python bool or a traced scalar bool)."""
    token = _ACTIVE.set(flag)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active():
    """The flag of the innermost `fp8_scope` (None outside any)."""
    return _ACTIVE.get()


def qdq(x, fp8_dtype):
    """x rounded to `fp8_dtype` with one scale from its current absolute maximum, back in x's dtype."""
    fmax = float(jnp.finfo(fp8_dtype).max)
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    scale = jnp.where(amax > 0, amax / fmax, 1.0)
    q = jnp.clip(x.astype(jnp.float32) / scale, -fmax, fmax).astype(fp8_dtype)
    return q.astype(x.dtype) * scale.astype(x.dtype)


@jax.custom_vjp
def _round_e4m3(x):
    return qdq(x, E4M3)


_round_e4m3.defvjp(lambda x: (qdq(x, E4M3), None), lambda _, g: (g,))  # straight-through


@jax.custom_vjp
def _grad_e5m2(y):
    return y


_grad_e5m2.defvjp(lambda y: (y, None), lambda _, g: (qdq(g, E5M2),))


def tensordot(x, w, n_in: int):
    """x's last `n_in` axes · w's first `n_in`, in fp8 as the module docstring says (inputs already in the
    compute dtype)."""
    return _grad_e5m2(jnp.tensordot(_round_e4m3(x), _round_e4m3(w), axes=n_in))


def product(x, w, n_in: int):
    """`jnp.tensordot(x, w, n_in)`, in fp8 where the current `fp8_scope` asks for it."""
    flag = active()
    if flag is None or flag is False:
        return jnp.tensordot(x, w, axes=n_in)
    if flag is True:
        return tensordot(x, w, n_in)
    return jax.lax.cond(flag, lambda a, b: tensordot(a, b, n_in), lambda a, b: jnp.tensordot(a, b, axes=n_in), x, w)
