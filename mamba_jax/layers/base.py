"""Parameter creation shared by every layer: logical axis names and weight-decay markers on each weight.

Every parameter is an `nnx.Param` whose metadata carries
  - `out_sharding`: its logical axis names (e.g. ("embed", "mlp")), mapped to mesh axes by the rule table
    in `mamba_jax.parallel.sharding` (never by the layers themselves), and
  - `weight_decay`: False for A_log, D, dt_bias, norm scales and biases (Megatron / mamba_ssm practice).
Eager sharding is off: the model is sharded once, as a whole, when `init_model` builds it under `jit`.

`linear` is every projection of the layers: x's last `n_in` axes contracted with the weight's first `n_in`,
plus, where LoRA adapters were attached to that weight (mamba_jax/models/peft.py), the low-rank branch
scale · (dropout(x) · A) · B (Hu et al. 2021). A weight quantized for serving (mamba_jax/inference/quantize.py)
is stored in float8 with a `QuantScale` per output channel beside it: the product runs on the weight cast to
the compute dtype and the scale multiplies its output — at decode on one GPU (≤ 32 rows) as the float8 GEMV of
`mamba_jax.kernels.gemv_q`, which reads the float8 bytes rather than a bf16 copy. In training, the layers the
stack puts in an fp8 scope (`train.fp8`) run their projections in fp8 (mamba_jax/ops/fp8.py); the LoRA branch
stays as it is.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.ops import fp8


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


LORA_SCALE, LORA_DROPOUT = "lora_scale", "lora_dropout"
# The projections of the layers and their contracted (input) axes: a weight's first N axes.
PROJ_IN_AXES = {
    "in_proj": 1, "out_proj": 2, "q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2,
    "up_proj": 1, "gate_proj": 1, "down_proj": 1,
}  # fmt: skip


class QuantScale(nnx.Variable):
    """Per-output-channel scales of a quantized projection weight (its out axes; not trained)."""


def scale_name(name: str) -> str:
    return f"{name}_scale"


def lora_names(name: str) -> tuple[str, str]:
    return f"{name}_lora_a", f"{name}_lora_b"


# Tests set it to run `kernels.gemv_q` off the GPU too (Pallas interpret mode); on a GPU it always may.
FLOAT8_GEMV_OFF_GPU = False


def float8_gemv(module, name: str, x, n_in: int, dtype, *, partials: bool = False):
    """x (…, in axes) · module.<name> through `kernels.gemv_q` where it applies — a float8 weight
    (`inference.quantize`) without LoRA, few rows (decode), tiles `decode_config` gives — else None (XLA's
    product then). (…, out axes) in `dtype`; with `partials` and a split K, float32 split-K partials
    (S, rows, N) for a consumer kernel to sum (`Mamba2Mixer._decode_fused`)."""
    w, scale = getattr(module, name)[...], getattr(module, scale_name(name), None)
    if scale is None or w.dtype != jnp.float8_e4m3fn or hasattr(module, lora_names(name)[0]):
        return None
    try:
        from mamba_jax.kernels.gemv_q import decode_config, gemv_q
    except ImportError:  # a jax without Pallas's Triton backend
        return None
    k = math.prod(w.shape[:n_in])
    lead = x.shape[: x.ndim - n_in]
    rows = math.prod(lead)
    conf = decode_config(rows, k, w.size // k, w.dtype)
    if conf is None:
        return None
    partials = partials and conf["splits"] > 1
    y = gemv_q(x.reshape(rows, k).astype(dtype), w.reshape(k, -1), scale[...].reshape(-1), out_dtype=dtype,
               partials=partials, **conf)  # fmt: skip
    return y if partials else y.reshape(*lead, *w.shape[n_in:])


def linear(module, name: str, x, n_in: int, dtype, *, key=None):
    """x (…, in axes) · module.<name> (in axes, out axes) → (…, out axes) in `dtype`, with LoRA if attached."""
    a_name, b_name = lora_names(name)
    scale = getattr(module, scale_name(name), None)
    # on one device only (a Pallas call is not partitioned: sharded models keep XLA's product)
    kernel_here = (jax.default_backend() == "gpu" or FLOAT8_GEMV_OFF_GPU) and jax.sharding.get_abstract_mesh().size <= 1
    if scale is not None and kernel_here and (y := float8_gemv(module, name, x, n_in, dtype)) is not None:
        return y
    y = fp8.product(x.astype(dtype), cast(getattr(module, name)[...], dtype), n_in)  # fp8 in training's scope
    if scale is not None:  # a quantized weight: W = W_q · scale per output channel
        y = (y.astype(jnp.float32) * scale[...]).astype(dtype)
    if not hasattr(module, a_name):
        return y
    a = getattr(module, a_name)[...]  # (in axes…, r)
    b = getattr(module, b_name)[...]  # (r, out axes…)
    xl = x.astype(dtype)
    dropout = getattr(module, LORA_DROPOUT, 0.0)
    if dropout > 0.0 and key is not None:
        key = jax.random.fold_in(key, hash(name) % (1 << 30))
        keep = jax.random.bernoulli(key, 1.0 - dropout, xl.shape)
        xl = jnp.where(keep, xl / (1.0 - dropout), 0).astype(dtype)
    h = jnp.tensordot(xl, cast(a, dtype), axes=n_in)
    return y + getattr(module, LORA_SCALE) * jnp.tensordot(h, cast(b, dtype), axes=1)
