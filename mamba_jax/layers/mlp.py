"""The MLP layer of the hybrids: down(act(up(x))), non-gated, as Megatron's MLP for Nemotron-H (relu²)
and Mamba2-Hybrid (GELU); the gated SwiGLU form, down(silu(gate(x)) · up(x)), for custom models.

Dimension key: B batch, L length, D model width, F hidden size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mamba_jax.layers.base import linear, normal, param
from mamba_jax.models.config import ModelConfig

ACTIVATIONS = {
    "relu2": lambda h: jnp.square(jax.nn.relu(h)),
    "gelu": lambda h: jax.nn.gelu(h, approximate=False),  # torch's F.gelu default (erf)
    "silu": jax.nn.silu,
}


class MLP(nnx.Module):
    """(B, L, D) → (B, L, D)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        del layer_idx
        self.cfg = cfg
        d, f = cfg.d_model, cfg.ffn_hidden_size
        pdt = jnp.dtype(cfg.param_dtype)
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(cfg.n_layers)
        self.up_proj = param(normal(rngs, (d, f), std, pdt), ("embed", "mlp"))
        self.gate_proj = param(normal(rngs, (d, f), std, pdt), ("embed", "mlp")) if self.gated else None
        self.down_proj = param(normal(rngs, (f, d), out_std, pdt), ("mlp", "embed"))

    @property
    def gated(self) -> bool:
        return self.cfg.mlp_activation == "swiglu"

    def __call__(self, x_BLD, *, seq_idx=None, positions=None, key=None):
        del seq_idx, positions
        dtype = jnp.dtype(self.cfg.dtype)
        h_BLF = checkpoint_name(linear(self, "up_proj", x_BLD, 1, dtype, key=key), "proj_in")
        if self.gated:
            gate_BLF = checkpoint_name(linear(self, "gate_proj", x_BLD, 1, dtype, key=key), "proj_in")
            h_BLF = jax.nn.silu(gate_BLF.astype(jnp.float32)) * h_BLF.astype(jnp.float32)
        else:
            h_BLF = ACTIVATIONS[self.cfg.mlp_activation](h_BLF.astype(jnp.float32))
        return linear(self, "down_proj", h_BLF, 1, dtype, key=key)

    def prefill(self, x_BLD, *, seq_idx, positions, cache_len):
        del cache_len
        return self(x_BLD, seq_idx=seq_idx, positions=positions), {}

    def decode(self, x_BD, cache, *, pos, start):
        del pos, start
        return self(x_BD[:, None])[:, 0], cache
