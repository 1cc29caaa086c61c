"""Weight-only fp8 quantization of the projections for serving (`Engine(quantize="fp8")`, `--quantize fp8`).

A decode step reads every weight once, so at small batch its time is the weights' bytes over the memory
bandwidth: stored in float8 (e4m3fn, one byte) instead of bf16, the projections — ≈ 95 % of a Mamba2
model's bytes — cost half. Each projection W (in axes → out axes) is stored as W_q = round(W / s) with one
float32 scale s per output channel, s = max |W| over the input axes / 448 (e4m3fn's largest finite value),
so no weight overflows and each keeps 3 mantissa bits (relative error ≤ 2⁻⁴; below 2⁻⁶ · s the subnormals
keep an absolute error ≤ 2⁻¹⁰ · s). The product runs in the compute dtype on W_q cast up (exact: every e4m3
value is a bf16 value) and s scales its output (`mamba_jax.layers.base.linear`), as TensorRT-LLM's and
vLLM's weight-only fp8 do. Embeddings, the LM head, conv weights, norms and the SSM parameters
(A_log, D, dt_bias) keep their dtype: they are few bytes, and A_log compounds over every step.

Quantize a copy (the Engine's view of the model): the modules of `model` are changed in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mamba_jax.layers.base import PROJ_IN_AXES, QuantScale, scale_name
from mamba_jax.models.stack import layer_mixers

FORMATS = {"fp8": jnp.float8_e4m3fn}
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448


def quantize_array(w, n_in: int, lead: int = 0):
    """(W_q float8_e4m3fn, scale float32 of W's out axes): W ≈ W_q · scale. `lead` leading axes (a stacked
    layers axis) are kept; the next `n_in` are the contracted ones."""
    w32 = jnp.asarray(w).astype(jnp.float32)
    axes = tuple(range(lead, lead + n_in))
    amax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)  # an all-zero channel stays zero
    w_q = jnp.clip(w32 / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return w_q, jnp.squeeze(scale, axes)


def dequantize_array(w_q, scale, n_in: int, lead: int = 0):
    """W_q · scale in float32 (what the quantized projection computes with)."""
    expand = tuple(range(lead, lead + n_in))
    return w_q.astype(jnp.float32) * jnp.expand_dims(scale, expand)


def _placed(x, like, keep_axes):
    """`x` sharded as `like` on the axes of `like` listed in `keep_axes` (the out axes of a weight)."""
    sharding = getattr(like, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return x
    spec = tuple(sharding.spec) + (None,) * (like.ndim - len(sharding.spec))
    return jax.device_put(x, NamedSharding(sharding.mesh, PartitionSpec(*(spec[a] for a in keep_axes))))


def quantize_weights(model, fmt: str = "fp8") -> int:
    """Quantize every projection weight of `model` in place (see the module docstring); returns how many.
    Weights with LoRA adapters are quantized too (the adapters stay in their dtype and add their branch)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization {fmt!r}; choose one of {sorted(FORMATS)} or none.")
    count = 0
    for mixer, lead in layer_mixers(model):
        for name, n_in in PROJ_IN_AXES.items():
            var = getattr(mixer, name, None)
            if not isinstance(var, nnx.Variable) or hasattr(mixer, scale_name(name)):
                continue
            w = var.get_value()
            w_q, scale = quantize_array(w, n_in, lead)
            keep = tuple(range(lead)) + tuple(range(lead + n_in, w.ndim))
            var.set_value(_placed(w_q, w, tuple(range(w.ndim))))
            # The scale's logical axes: the weight's (stacked axis and) out axes.
            axes = tuple(var.get_metadata().get("out_sharding") or (None,) * w.ndim)
            names = axes[:lead] + axes[len(axes) - (w.ndim - lead - n_in) :]
            scale = QuantScale(_placed(scale, w, keep), out_sharding=names, eager_sharding=False)
            setattr(mixer, scale_name(name), scale)
            count += 1
    if count == 0:
        raise ValueError("this model has no projection weights to quantize.")
    return count
