"""Parameter creation shared by every layer: logical axis names and weight-decay markers on each weight.

Every parameter is an `nnx.Param` whose metadata carries
  - `out_sharding`: its logical axis names (e.g. ("embed", "mlp")), mapped to mesh axes by the rule table
    in `mamba_jax.parallel.sharding` (never by the layers themselves), and
  - `weight_decay`: False for A_log, D, dt_bias, norm scales and biases (Megatron / mamba_ssm practice).
Eager sharding is off: the model is sharded once, as a whole, when `init_model` builds it under `jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(value, axes: tuple[str | None, ...], *, decay: bool = True) -> nnx.Param:
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match parameter shape {value.shape}")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False, weight_decay=decay)


def normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, dtype)


def uniform(rngs: nnx.Rngs, shape, lo: float, hi: float, dtype) -> jax.Array:
    return jax.random.uniform(rngs.params(), shape, dtype, lo, hi)


def cast(w, dtype):
    """A weight as the computation uses it (master weights stay in param_dtype)."""
    return jnp.asarray(w).astype(dtype)
