"""Folding the Mamba blocks' RMSNorm weights into the projections that follow them, for decoding.

A Mamba block computes in_proj(rmsnorm(h) · w) and out_proj(gated_rmsnorm(g) · w_g). Both norms are a
per-row scalar 1/rms times a per-channel weight, and the weights commute into the matrices:
(h / rms · w) @ W = (h @ diag(w) W) / rms. With diag(w) W stored in place of W and the norm's weight set to
ones, the model computes the same function (up to one bf16 rounding of the product), and the fused decode
path (`Block.decode` → `Mamba2Mixer._decode_fused`) runs the GEMVs on the unnormalised vectors and applies
1/rms to their outputs: the input norm's inside the SSM step kernel, the gated norm's (one norm group)
after out_proj. That removes the norm kernels between the weight streams of a decode step — at batch 1
each is a few microseconds against a layer's ≈ 35 µs of GEMV (benchmarks/README.md).

A weight with LoRA adapters attached keeps its norm (the adapters read the normed input too).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mamba_jax.layers.base import lora_names, scale_name
from mamba_jax.models.stack import Block


def _scaled(w, scale_shape_broadcast):
    return (w.astype(jnp.float32) * scale_shape_broadcast).astype(w.dtype)


def fold_norm_weights(model):
    """`model` (modified in place, its Mamba blocks' arrays replaced) with every Mamba block's input-norm
    weight folded into in_proj and its gated-norm weight into out_proj. Call it on a copy
    (`nnx.clone`, or the Engine's unstacked view): the original model's arrays are not changed, but the
    module objects are. Layers still stacked for `scan` (a leading layers axis) fold the same way."""
    for _, block in nnx.iter_graph(model):
        if not isinstance(block, Block) or block.symbol != "M":  # "M": a Mamba2 mixer (layers.registry)
            continue
        mixer = block.mixer
        if hasattr(mixer, scale_name("in_proj")) or hasattr(mixer, scale_name("out_proj")):
            raise ValueError("fold the norm weights before quantizing (inference.quantize), not after.")
        if not hasattr(mixer, lora_names("in_proj")[0]) and not block.norm_folded:
            w_D = block.norm.weight[...].astype(jnp.float32)  # (…, D); in_proj (…, D, G, W)
            mixer.in_proj[...] = _scaled(mixer.in_proj[...], w_D[..., :, None, None])
            block.norm.weight[...] = jnp.ones_like(block.norm.weight[...])
            block.norm_folded = True
        if not hasattr(mixer, lora_names("out_proj")[0]) and not mixer.norm_folded:
            w_HP = mixer.norm[...].astype(jnp.float32)  # (…, H, P); out_proj (…, H, P, D)
            mixer.out_proj[...] = _scaled(mixer.out_proj[...], w_HP[..., None])
            mixer.norm[...] = jnp.ones_like(mixer.norm[...])
            mixer.norm_folded = True
    return model
