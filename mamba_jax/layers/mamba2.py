"""The Mamba2 mixer (Dao & Gu 2024), as Megatron-LM's `MambaMixer` and mamba_ssm's `Mamba2` define it.

  in_proj → [z | x | B | C | dt] → depthwise causal conv1d (+bias, SiLU) over [x | B | C] → SSD scan with
  A = −exp(A_log), dt = softplus(dt + dt_bias) clamped to dt_limit, skip D → gated RMSNorm with z → out_proj.

Weight layout, chosen for tensor parallelism: in_proj is stored as (D, G, W) with each SSM group's own
slices [z_g | x_g | B_g | C_g | dt_g] side by side in W, and the conv as (K, G, C_g). Sharding the group
axis then gives every tensor-parallel shard whole groups with their own z/x/B/C/dt columns (Megatron's
column-parallel in_proj), where splitting a fused [z|x|B|C|dt] matrix evenly would mix them — the
resharding bug users report in the reference frameworks. Heads of a group are contiguous (head h reads
group h // (H / G)), so the head-indexed parameters (A_log, D, dt_bias, norm, out_proj) shard on heads
consistently. Hugging Face import and export permute to and from the fused layout.

Dimension key: B batch, L length, D model width, G groups, R heads per group, H heads, P head dim,
N state, K conv kernel, W per-group in_proj width, F per-group conv channels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mamba_jax.layers.base import cast, normal, param, uniform
from mamba_jax.layers.norms import gated_rms_norm
from mamba_jax.models.config import ModelConfig
from mamba_jax.ops.ssd import ssd


def causal_conv1d(x_BLGF, w_KGF, b_GF, *, seq_idx=None, state_BKGF=None):
    """Depthwise causal convolution along L: out[t] = Σ_k w[k] · x[t − (K−1) + k] + b.

    With `seq_idx`, taps that reach into another document read zero (the conv state resets at document
    boundaries, as in causal_conv1d with seq_idx). `state_BKGF` holds the K−1 inputs preceding the
    sequence (decoding / chunked prefill); they belong to the document at position 0. Computed in
    float32, returned in x's dtype.
    """
    b, l = x_BLGF.shape[:2]
    k = w_KGF.shape[0]
    if state_BKGF is None:
        state_BKGF = jnp.zeros((b, k - 1, *x_BLGF.shape[2:]), x_BLGF.dtype)
    xp = jnp.concatenate([state_BKGF.astype(x_BLGF.dtype), x_BLGF], axis=1).astype(jnp.float32)
    if seq_idx is not None:
        sid = jnp.concatenate([jnp.repeat(seq_idx[:, :1], k - 1, axis=1), seq_idx], axis=1)
    w = w_KGF.astype(jnp.float32)
    out = b_GF.astype(jnp.float32)
    for tap in range(k):
        contrib = xp[:, tap : tap + l] * w[tap]
        if seq_idx is not None and tap < k - 1:
            same_doc = sid[:, tap : tap + l] == seq_idx
            contrib = jnp.where(same_doc[..., None, None], contrib, 0.0)
        out = out + contrib
    return out.astype(x_BLGF.dtype)


def _dt_bias_init(rngs, cfg: ModelConfig, shape, dtype):
    """dt ~ exp(U[log dt_min, log dt_max]) clamped ≥ floor; dt_bias = softplus⁻¹(dt) (mamba_ssm)."""
    lo, hi = math.log(cfg.mamba_dt_min), math.log(cfg.mamba_dt_max)
    dt = jnp.exp(jax.random.uniform(rngs.params(), shape, jnp.float32, lo, hi))
    dt = jnp.maximum(dt, cfg.mamba_dt_init_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class Mamba2Mixer(nnx.Module):
    """One Mamba2 mixer: (B, L, D) → (B, L, D)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        del layer_idx
        self.cfg = cfg
        d, h, p = cfg.d_model, cfg.mamba_heads, cfg.mamba_head_dim
        g, n, k = cfg.mamba_num_groups, cfg.mamba_d_state, cfg.mamba_d_conv
        r = h // g
        self.split_W = (r * p, 2 * r * p + 2 * n)  # z | xBC | dt boundaries inside a group's W columns
        w = 2 * r * p + 2 * n + r
        f = r * p + 2 * n
        pdt = jnp.dtype(cfg.param_dtype)

        self.in_proj = param(normal(rngs, (d, g, w), cfg.init_std, pdt), ("embed", "ssm_groups", None))
        # PyTorch Conv1d default (kaiming_uniform, a = √5) on a (channels, 1, K) weight: bound 1/√K.
        bound = 1.0 / math.sqrt(k)
        self.conv_weight = param(uniform(rngs, (k, g, f), -bound, bound, pdt), (None, "ssm_groups", None))
        self.conv_bias = param(uniform(rngs, (g, f), -bound, bound, pdt), ("ssm_groups", None), decay=False)
        self.dt_bias = param(_dt_bias_init(rngs, cfg, (h,), pdt), ("ssm_heads",), decay=False)
        lo, hi = cfg.mamba_A_init_range
        # A_log stays float32 whatever param_dtype is: exp(A_log) feeds long products of decays.
        self.A_log = param(jnp.log(uniform(rngs, (h,), lo, hi, jnp.float32)), ("ssm_heads",), decay=False)
        self.D = param(jnp.ones((h,), pdt), ("ssm_heads",), decay=False)
        self.norm = param(jnp.ones((h, p), pdt), ("ssm_heads", None), decay=False)
        out_std = cfg.init_std / math.sqrt(cfg.n_layers)
        self.out_proj = param(normal(rngs, (h, p, d), out_std, pdt), ("ssm_heads", None, "embed"))

    def __call__(self, x_BLD, *, seq_idx=None, positions=None):
        del positions
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        b, l, _ = x_BLD.shape
        h, p = cfg.mamba_heads, cfg.mamba_head_dim
        g, n = cfg.mamba_num_groups, cfg.mamba_d_state

        zxbcdt_BLGW = jnp.einsum("bld,dgw->blgw", x_BLD.astype(dtype), cast(self.in_proj[...], dtype))
        zxbcdt_BLGW = checkpoint_name(zxbcdt_BLGW, "proj_in")
        z_BLGF, xBC_BLGF, dt_BLGR = jnp.split(zxbcdt_BLGW, self.split_W, axis=-1)
        xBC_BLGF = causal_conv1d(xBC_BLGF, self.conv_weight[...], self.conv_bias[...], seq_idx=seq_idx)
        xBC_BLGF = jax.nn.silu(xBC_BLGF)
        x_BLGF, B_BLGN, C_BLGN = jnp.split(xBC_BLGF, (xBC_BLGF.shape[-1] - 2 * n, xBC_BLGF.shape[-1] - n), axis=-1)

        y_BLHP = ssd(
            x_BLGF.reshape(b, l, h, p),
            dt_BLGR.reshape(b, l, h),
            -jnp.exp(self.A_log[...].astype(jnp.float32)),
            B_BLGN,
            C_BLGN,
            chunk_size=cfg.mamba_chunk_size,
            D=self.D[...],
            dt_bias=self.dt_bias[...],
            dt_softplus=True,
            dt_limit=cfg.mamba_dt_limit,
            seq_idx=seq_idx,
            impl=cfg.ssd_impl,
        )
        y_BLHP = gated_rms_norm(
            y_BLHP,
            z_BLGF.reshape(b, l, h, p),
            self.norm[...],
            groups=g if cfg.mamba_norm_per_group else 1,
            eps=cfg.norm_eps,
            out_dtype=dtype,
        )
        return jnp.einsum("blhp,hpd->bld", y_BLHP, cast(self.out_proj[...], dtype))
