"""Layer symbols of a hybrid pattern string → the mixer class that builds them.

`M` Mamba2 mixer, `*` self-attention, `-` MLP (Megatron's hybrid_override_pattern symbols). A new layer
kind is one entry here: a class built as `cls(cfg, layer_idx, rngs=rngs)` and called as
`layer(x_BLD, seq_idx=..., positions=...)`.
"""

from __future__ import annotations

from mamba_jax.layers.attention import Attention
from mamba_jax.layers.mamba2 import Mamba2Mixer
from mamba_jax.layers.mlp import MLP

LAYERS = {
    "M": Mamba2Mixer,
    "*": Attention,
    "-": MLP,
}
