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

from mamba_jax.layers.base import float8_gemv, linear, lora_names, normal, param, uniform
from mamba_jax.layers.norms import gated_rms_norm, grouped_rms_norm
from mamba_jax.models.config import ModelConfig
from mamba_jax.ops.ssd import note_once, ssd
from mamba_jax.ops.ssd_reference import ssd_step
from mamba_jax.parallel.sharding import sequence_parallel_size

NO_DECODE_KERNELS = "the decode kernels do not import"  # `_decode_kernel_unsupported`'s reason when so
WINDOW_KEYS = ("win_x", "win_B", "win_dt")  # cache entries of the state write-back window (`_window_buffers`)


def causal_conv1d(x_BLGF, w_KGF, b_GF, *, seq_idx=None, state_BKGF=None, state_seq_idx=None):
    """Depthwise causal convolution along L: out[t] = Σ_k w[k] · x[t − (K−1) + k] + b.

    With `seq_idx`, taps that reach into another document read zero (the conv state resets at document
    boundaries, as in causal_conv1d with seq_idx). `state_BKGF` holds the K−1 inputs preceding the
    sequence (decoding / chunked prefill; the previous slice under sequence parallelism); they belong to
    the document at position 0 unless `state_seq_idx` (B, K−1) gives theirs. Computed in float32,
    returned in x's dtype.
    """
    b, l = x_BLGF.shape[:2]
    k = w_KGF.shape[0]
    if state_BKGF is None:
        state_BKGF = jnp.zeros((b, k - 1, *x_BLGF.shape[2:]), x_BLGF.dtype)
    xp = jnp.concatenate([state_BKGF.astype(x_BLGF.dtype), x_BLGF], axis=1).astype(jnp.float32)
    if seq_idx is not None:
        before = jnp.repeat(seq_idx[:, :1], k - 1, axis=1) if state_seq_idx is None else state_seq_idx
        sid = jnp.concatenate([before.astype(seq_idx.dtype), seq_idx], axis=1)
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
        # True once `fold_norm_weights` moved `norm` into out_proj (norm is then ones): with one norm group,
        # the fused decode applies the norm's 1/rms after out_proj instead of before it.
        self.norm_folded = False

    # --- pieces shared by the training forward, prefill and decode ---------------------------------------
    def _in_proj(self, x_BLD, key=None):
        """(z, xBC before the conv, dt) with each group's columns: (B, L, G, R·P), (B, L, G, F), (B, L, G, R)."""
        dtype = jnp.dtype(self.cfg.dtype)
        zxbcdt_BLGW = linear(self, "in_proj", x_BLD, 1, dtype, key=key)
        zxbcdt_BLGW = checkpoint_name(zxbcdt_BLGW, "proj_in")
        return jnp.split(zxbcdt_BLGW, self.split_W, axis=-1)

    def _split_xBC(self, xBC_BLGF):
        n = self.cfg.mamba_d_state
        f = xBC_BLGF.shape[-1]
        return jnp.split(xBC_BLGF, (f - 2 * n, f - n), axis=-1)

    def _ssd_kwargs(self):
        cfg = self.cfg
        return dict(D=self.D[...], dt_bias=self.dt_bias[...], dt_softplus=True, dt_limit=cfg.mamba_dt_limit)

    def _A(self):
        return -jnp.exp(self.A_log[...].astype(jnp.float32))

    def _out(self, y_BLHP, z_BLHP=None, key=None):
        """Gated RMSNorm of y · SiLU(z) (of y itself when z is None: already gated), then out_proj."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        groups = cfg.mamba_num_groups if cfg.mamba_norm_per_group else 1
        if z_BLHP is None:
            y_BLHP = grouped_rms_norm(y_BLHP, self.norm[...], groups=groups, eps=cfg.norm_eps, out_dtype=dtype)
        else:
            y_BLHP = gated_rms_norm(y_BLHP, z_BLHP, self.norm[...], groups=groups, eps=cfg.norm_eps, out_dtype=dtype)
        return linear(self, "out_proj", y_BLHP, 2, dtype, key=key)

    def _forward(self, x_BLD, seq_idx, return_state: bool, key=None):
        cfg = self.cfg
        b, l, _ = x_BLD.shape
        h, p = cfg.mamba_heads, cfg.mamba_head_dim
        z_BLGF, xBC_BLGF, dt_BLGR = self._in_proj(x_BLD, key)
        # Training forward with the sequence split over devices (mamba_jax.parallel.context); a prefill on
        # such a mesh (evaluation, samples) takes the plain path below and leaves the partitioning to XLA.
        if sequence_parallel_size() > 1 and not return_state:
            from mamba_jax.parallel.context import conv_ssd

            y_BLHP = conv_ssd(
                xBC_BLGF, dt_BLGR.reshape(b, l, h), self.conv_weight[...], self.conv_bias[...], self._A(),
                self.D[...], self.dt_bias[...], seq_idx, conv_fn=causal_conv1d, head_dim=p,
                d_state=cfg.mamba_d_state, chunk_size=cfg.mamba_chunk_size, dt_softplus=True,
                dt_limit=cfg.mamba_dt_limit, impl=cfg.ssd_impl,
            )  # fmt: skip
            return self._out(y_BLHP, z_BLGF.reshape(b, l, h, p), key), xBC_BLGF, None
        conv_BLGF = jax.nn.silu(causal_conv1d(xBC_BLGF, self.conv_weight[...], self.conv_bias[...], seq_idx=seq_idx))
        x_BLGF, B_BLGN, C_BLGN = self._split_xBC(conv_BLGF)
        out = ssd(
            x_BLGF.reshape(b, l, h, p),
            dt_BLGR.reshape(b, l, h),
            self._A(),
            B_BLGN,
            C_BLGN,
            chunk_size=cfg.mamba_chunk_size,
            seq_idx=seq_idx,
            return_final_states=return_state,
            impl=cfg.ssd_impl,
            **self._ssd_kwargs(),
        )
        y_BLHP, ssm_BHPN = out if return_state else (out, None)
        return self._out(y_BLHP, z_BLGF.reshape(b, l, h, p), key), xBC_BLGF, ssm_BHPN

    # --- training / full forward --------------------------------------------------------------------------
    def __call__(self, x_BLD, *, seq_idx=None, positions=None, key=None):
        del positions
        return self._forward(x_BLD, seq_idx, return_state=False, key=key)[0]

    # --- inference: prefill and one-token decode ---------------------------------------------------------
    def prefill(self, x_BLD, *, seq_idx, positions, cache_len):
        """Full forward that also returns the decoding cache: the last K−1 conv inputs (B, K−1, G, F) and
        the SSM state (B, H, P, N) float32, both of the document at the last position. When decoding takes
        the fused kernel, the conv inputs are its ring of K slots instead (`kernels.decode.conv_ring`)."""
        del positions, cache_len
        k = self.cfg.mamba_d_conv
        y_BLD, xBC_BLGF, ssm_BHPN = self._forward(x_BLD, seq_idx, return_state=True)
        pad = max(k - 1 - xBC_BLGF.shape[1], 0)
        tail_BKGF = jnp.pad(xBC_BLGF, ((0, 0), (pad, 0), (0, 0), (0, 0)))[:, xBC_BLGF.shape[1] + pad - (k - 1) :]
        if seq_idx is not None:  # inputs of an earlier document must not reach the conv of the last one
            sid = jnp.pad(seq_idx, ((0, 0), (pad, 0)), constant_values=-1)[:, seq_idx.shape[1] + pad - (k - 1) :]
            tail_BKGF = jnp.where((sid == seq_idx[:, -1:])[..., None, None], tail_BKGF, 0)
        cache = {"ssm": ssm_BHPN}
        if self._decode_kernel():
            from mamba_jax.kernels import decode as kd

            tail_BKGF = kd.conv_ring(tail_BKGF, x_BLD.shape[1])  # the next token decoded is at position L
            cache.update(self._window_buffers(x_BLD.shape[0]))
        return y_BLD, {"conv": tail_BKGF, **cache}

    def decode(self, x_BD, cache, *, pos, start):
        """One token per row: (B, D) → (B, D), with the cache advanced by that token."""
        del start
        if self._decode_kernel():
            return self._decode_fused(x_BD, cache, pos)
        cfg = self.cfg
        b = x_BD.shape[0]
        h, p = cfg.mamba_heads, cfg.mamba_head_dim
        z_BGF, xBC_BGF, dt_BGR = (t[:, 0] for t in self._in_proj(x_BD[:, None]))
        window_BKGF = jnp.concatenate([cache["conv"].astype(xBC_BGF.dtype), xBC_BGF[:, None]], axis=1)
        conv_BGF = jnp.einsum(
            "bkgf,kgf->bgf", window_BKGF.astype(jnp.float32), self.conv_weight[...].astype(jnp.float32)
        )
        conv_BGF = jax.nn.silu((conv_BGF + self.conv_bias[...].astype(jnp.float32)).astype(xBC_BGF.dtype))
        x_BGF, B_BGN, C_BGN = self._split_xBC(conv_BGF)
        y_BHP, ssm_BHPN = ssd_step(
            cache["ssm"], x_BGF.reshape(b, h, p), dt_BGR.reshape(b, h), self._A(), B_BGN, C_BGN, **self._ssd_kwargs()
        )
        out_B1D = self._out(y_BHP[:, None], z_BGF.reshape(b, 1, h, p))
        # The state keeps the cache's dtype (the engine may hold it in bf16; the update above is float32).
        return out_B1D[:, 0], {"conv": window_BKGF[:, 1:], "ssm": ssm_BHPN.astype(cache["ssm"].dtype)}

    # --- inference: the fused decode kernel ------------------------------------------------------------------
    def _window_buffers(self, batch: int) -> dict:
        """The fused decode's state write-back window (`kernels.decode.window_size`: at the batches that run
        the split step), as cache entries; none where the state is written every token."""
        from mamba_jax.kernels import decode as kd

        cfg = self.cfg
        h, p, g = cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_num_groups
        dtype = jnp.dtype(cfg.dtype)
        size = kd.window_size(kd.step_config(batch, h // g, p)["split"], batch, dtype, p, cfg.mamba_d_state)
        if not size:
            return {}
        return dict(zip(WINDOW_KEYS, kd.state_window(batch, h, p, g, cfg.mamba_d_state, size, dtype), strict=True))

    def _decode_kernel_unsupported(self) -> str | None:
        cfg = self.cfg
        try:  # lazy: Pallas imports cost start-up time
            from mamba_jax.kernels.decode import ssm_step_unsupported
        except ImportError as e:  # jax has announced the removal of Pallas's Triton backend, which they use
            return f"this jax {jax.__version__} ({NO_DECODE_KERNELS}: {e})"
        if jax.sharding.get_abstract_mesh().size > 1:
            return "a sharded model (the kernel runs on one device)"
        return ssm_step_unsupported(cfg.mamba_head_dim, cfg.mamba_d_state)

    def _decode_kernel(self) -> bool:
        """Whether `decode` runs the fused step kernel (cfg.decode_impl, resolved for this trace)."""
        impl = self.cfg.decode_impl
        if impl == "xla":
            return False
        reason = self._decode_kernel_unsupported()
        gpu = jax.default_backend() == "gpu"
        if reason and impl == "pallas":
            note_once(f"decode_impl='pallas': the fused decode kernel does not support {reason}; using XLA.")
        elif reason and gpu and NO_DECODE_KERNELS in reason:
            # "auto" on a GPU means the fused kernels; losing them to a jax without Pallas's Triton backend
            # costs ≈ 1.2× at batch 1 (benchmarks/README.md), which a user should hear about.
            note_once(
                f"decode_impl='auto': the fused decode kernels are unavailable with {reason}; decoding with "
                "XLA (≈ 1.2× slower at batch 1). jax 0.11.2 is the tested version; decode_impl='xla' silences this."
            )
        return not reason and (impl == "pallas" or gpu)

    def _decode_fused(self, x_BD, cache, pos, residual_BD=None, compute_BD=None):
        """`decode` with the fused SSM step of `mamba_jax.kernels.decode` (conv + dt + state update + y + gate
        in one launch) between XLA's in_proj and out_proj.

        With `residual_BD` (from `Block.decode`, which folded its input norm's weight into in_proj), `x_BD`
        is that raw residual, the step kernel applies the norm's 1/rms to in_proj's output, and the result
        is the residual stream after this block as (residual, residual in the compute dtype): in_proj reads
        `compute_BD`, the residual already rounded by the block before, so no XLA kernel casts it. With the
        gated norm's weight folded into out_proj and one norm group, its 1/rms (from the kernel's sums of
        squares) scales out_proj's output, applied with the residual add in one more launch: no norm kernel
        runs between the weight streams."""
        from mamba_jax.kernels import decode as kd
        from mamba_jax.kernels.gemv import ROW_PAD, decode_gemv_tiles, gemv_t
        from mamba_jax.kernels.skinny_gemm import skinny_gemm
        from mamba_jax.kernels.skinny_gemm import unsupported as skinny_unsupported

        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        b = x_BD.shape[0]
        h, p = cfg.mamba_heads, cfg.mamba_head_dim
        post_norm = self.norm_folded and not (cfg.mamba_norm_per_group and cfg.mamba_num_groups > 1)
        w_out = self.out_proj[...]
        # Opt-in (MAMBA_JAX_DECODE_GEMV=mosaic, Hopper): out_proj as the Mosaic PDL GEMV behind the step
        # kernel, its split-K partials summed by the residual kernel. Measured slower than XLA's GEMV with
        # the L2 prefetch (kernels/gemv.py says why), so XLA's is the default.
        tiles = None
        plain = w_out.dtype == dtype and not hasattr(self, lora_names("out_proj")[0])  # no cast, no LoRA
        if post_norm and residual_BD is not None and plain:
            tiles = decode_gemv_tiles(b, h * p, w_out.shape[-1], dtype)
        step = kd.step_config(b, h // cfg.mamba_num_groups, p)
        # From SPLIT_K_MIN_BATCH rows the projections may run as float32 split-K partials that the kernels
        # behind them sum (`proj_splits`): more SMs stream the weight than a GEMM of few output tiles keeps.
        in_splits, out_splits = kd.proj_splits(b)
        # Or as the CUDA skinny GEMM (kernels/skinny_gemm.py), where it runs: S K splits, 0 for the above.
        cuda_in, cuda_out = kd.cuda_gemm_splits(b)
        x_in = x_BD if compute_BD is None else compute_BD
        w_in = self.in_proj[...]
        k_in, n_in = w_in.shape[0], w_in.size // w_in.shape[0]
        plain_in = w_in.dtype == dtype and not hasattr(self, lora_names("in_proj")[0])
        if (zx := float8_gemv(self, "in_proj", x_in, 1, dtype, partials=True)) is not None:  # float8 weights
            zx = zx.reshape(*zx.shape[:-1], *w_in.shape[1:])  # (B, G, W), or float32 partials (S, B, G, W)
        elif cuda_in and plain_in and skinny_unsupported(b, k_in, n_in, cuda_in, dtype) is None:
            zx = skinny_gemm(x_in.astype(dtype), w_in.reshape(k_in, n_in), splits=cuda_in)
            zx = zx.reshape(*zx.shape[:-1], *w_in.shape[1:])
        elif in_splits > 1 and plain_in and x_in.shape[-1] % in_splits == 0:
            zx = kd.split_k_partials(x_in.astype(dtype), w_in, in_splits)
        else:
            zx = linear(self, "in_proj", x_in, 1, dtype)
        # While the step kernel runs (latency-bound at small batch) it pulls out_proj's weight into L2.
        pf = kd.prefetch_elems(b, w_out.size) if post_norm and not step["split"] else 0
        window = tuple(cache[k] for k in WINDOW_KEYS) if WINDOW_KEYS[0] in cache else None
        if window is not None and not step["split"]:
            raise ValueError(
                "this decoding cache holds a state write-back window, which needs the split step kernel "
                "(MAMBA_JAX_DECODE_STEP / MAMBA_JAX_DECODE_WINDOW changed between prefill and decode?)"
            )
        g_BF, ss_BHJ, conv, ssm, *win = kd.ssm_step(
            zx,
            cache["conv"].astype(dtype),
            self.conv_weight[...],
            self.conv_bias[...],
            cache["ssm"],
            self.A_log[...],
            self.D[...],
            self.dt_bias[...],
            pos,
            residual_BD,
            heads=h,
            dt_limit=tuple(cfg.mamba_dt_limit),
            norm_eps=cfg.norm_eps,
            g_dtype=dtype if post_norm else jnp.float32,
            prefetch=(w_out if w_out.dtype.itemsize > 1 else jax.lax.bitcast_convert_type(w_out, jnp.uint8))
            if pf
            else None,  # float8 weights (inference.quantize) are read as bytes
            prefetch_elems=pf,
            g_rows=-(-b // ROW_PAD) * ROW_PAD if tiles else None,
            # a GEMV behind it with programmatic dependent launch may start streaming once all programs run
            trigger=tiles is not None or bool(cuda_out),
            zx_dtype=dtype,
            window=window,
            **step,
        )
        cache = {"conv": conv, "ssm": ssm}
        if window is not None:
            cache.update(zip(WINDOW_KEYS, win[0], strict=True))
        if not post_norm:
            out_BD = self._out(g_BF.reshape(b, 1, h, p))[:, 0]
            if residual_BD is None:
                return out_BD, cache
            new_BD = residual_BD + out_BD.astype(residual_BD.dtype)
            return (new_BD, new_BD.astype(dtype)), cache
        # rmsnorm(g) @ W = (g @ W) / rms(g): with its weight folded into W, the norm is one scalar per row.
        # out_proj's output, or float32 split-K partials of it that the residual kernel sums (`layout`).
        layout = None
        q_out = None  # float8 weights (never the padded rows of the Mosaic path, which needs a plain weight)
        if residual_BD is not None and w_out.dtype == jnp.float8_e4m3fn:
            q_out = float8_gemv(self, "out_proj", g_BF.reshape(b, h, p), 2, dtype, partials=True)
        if q_out is not None:  # float8 out_proj: its output, or float32 partials the residual kernel sums
            out_BD, layout = q_out, ("SBD" if q_out.ndim == 3 else None)
        elif tiles:
            out_BD, layout = gemv_t(g_BF, w_out.reshape(h * p, -1), pdl=True, **tiles), "SDB"
        elif (
            cuda_out
            and plain
            and (cuda_out == 1 or residual_BD is not None)  # partials need the residual kernel to sum them
            and skinny_unsupported(b, h * p, w_out.shape[-1], cuda_out, dtype) is None
        ):
            out_BD = skinny_gemm(g_BF.astype(dtype), w_out.reshape(h * p, -1), splits=cuda_out)
            layout = "SBD" if cuda_out > 1 else None
        elif out_splits > 1 and plain and residual_BD is not None and (h * p) % out_splits == 0:
            out_BD, layout = kd.split_k_partials(g_BF, w_out.reshape(h * p, -1), out_splits), "SBD"
        else:
            out_BD = linear(self, "out_proj", g_BF.reshape(b, h, p), 2, dtype)
        if residual_BD is not None:
            norm_res = kd.gated_norm_residual(
                residual_BD, out_BD, ss_BHJ, norm_dim=h * p, eps=cfg.norm_eps, out_dtype=dtype, layout=layout,
                copy_dtype=dtype,
            )  # fmt: skip
            return norm_res, cache
        inv_B1 = jax.lax.rsqrt(jnp.sum(ss_BHJ, axis=(1, 2))[:, None] / (h * p) + cfg.norm_eps)
        return (out_BD.astype(jnp.float32) * inv_B1).astype(dtype), cache
