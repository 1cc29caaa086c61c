"""RMSNorm and the gated, grouped RMSNorm of the Mamba2 mixer.

RMSNorm follows Megatron / mamba_ssm: statistics in float32, then scaled by a learned weight (init 1).
The gated form is mamba_ssm's `RMSNormGated(norm_before_gate=False)`: y = rmsnorm(y · silu(z)) · w, with
the mean of squares taken over each group of channels (Megatron, Nemotron-H) or over all channels at once
(Hugging Face Mamba2, i.e. one group).

Dimension key: B batch, L length, D model width, H heads, P head dim, G norm groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.layers.base import param


def rms_norm(x, weight, eps: float, out_dtype):
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * inv * weight.astype(jnp.float32)).astype(out_dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.eps = eps
        self.dtype = dtype
        self.weight = param(jnp.ones((dim,), param_dtype), ("norm",), decay=False)

    def __call__(self, x_BLD):
        return rms_norm(x_BLD, self.weight[...], self.eps, self.dtype)


def gated_rms_norm(y_BLHP, z_BLHP, weight_HP, *, groups: int, eps: float, out_dtype):
    """rmsnorm(y · silu(z)) · w over `groups` equal groups of the H·P channels (groups of whole heads)."""
    g32 = y_BLHP.astype(jnp.float32) * jax.nn.silu(z_BLHP.astype(jnp.float32))
    return grouped_rms_norm(g32, weight_HP, groups=groups, eps=eps, out_dtype=out_dtype)


def grouped_rms_norm(x_BLHP, weight_HP, *, groups: int, eps: float, out_dtype):
    """RMSNorm over `groups` equal groups of the H·P channels (the gated norm after its gate)."""
    b, l, h, p = x_BLHP.shape
    x_BLGF = x_BLHP.astype(jnp.float32).reshape(b, l, groups, (h // groups) * p)
    inv = jax.lax.rsqrt(jnp.mean(x_BLGF * x_BLGF, axis=-1, keepdims=True) + eps)
    out = (x_BLGF * inv).reshape(b, l, h, p) * weight_HP.astype(jnp.float32)
    return out.astype(out_dtype)
