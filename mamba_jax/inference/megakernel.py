"""The decode step of a pure Mamba2 model at batch 1 as one launch per token (a "megakernel"): the layouts it
reads and a JAX reference of its arithmetic.

`benchmarks/megakernel_probe.cu` measured the design on an H100 (≈ 33.8 µs per Mamba2-2.7B layer against the
38.75 of the Engine's loop of separate kernels, benchmarks/README.md). Its path into the Engine is an XLA FFI
call (`kernels/megakernel.cu`, run by `step`; `Engine(megakernel=True)` decodes batch 1 through it); this
module also holds the parts of that path the GPU is not needed for:

  `pack`           the model's Mamba layers as the kernel streams them, stacked over layers: in_proj and
                   out_proj transposed (a row per output feature, K contiguous) with the norms' weights
                   folded in (`inference.fold`), the conv and the heads' scalars in float32; with
                   quantize="fp8" the projections as float8 e4m3 rows with a float32 scale per row (the
                   kernel's -DMK_FP8=1 build: half the bytes per token, widened in registers);
  `kernel_cache`   the Engine's decoding caches (per layer: the conv inputs as a ring of K slots, the input
                   at position t in slot t mod K — `kernels.decode.conv_ring` — and the SSM state) stacked
                   into the kernel's [layer, …] arrays, and `engine_cache` back;
  `pack_head`      the LM head with the final norm's weight folded in, for the kernel's optional last phase
                   (`reference_head` its arithmetic);
  `reference_step` one token through every layer with the kernel's arithmetic in plain JAX: the residual in
                   float32, in_proj of its bf16 rounding with float32 sums times the input norm's 1/rms
                   (not rounded), the conv and SiLU in float32, the state updated in float32 and stored in
                   bf16 (y reads it as stored), g = (D·x + y)·SiLU(z) rounded to bf16, out_proj's float32 sum
                   rounded to bf16, times the gated norm's 1/rms, rounded again, added to the residual.

On the CPU the tests check `pack`, the caches and `reference_step` against `Mamba2Mixer.decode` (the same
function up to those roundings); on the GPU `step` runs the kernel itself (`kernels/megakernel.cu`, an XLA
FFI call built with nvcc on first use, once per model size: d_model and the heads compiled in,
`kernel_dims_unsupported` says which sizes build) and is checked against `reference_step`
(tests/test_megakernel.py, `gpu`). Elsewhere `step` is `reference_step`. Timed on an H100 at Mamba2-2.7B's
dimensions only (MEASURED_DIMS); smaller models (130M … 1.3B) take the same code with their rows spread
over the warps differently (kernels/megakernel.cuh, `kGeneralRows`).
`unsupported` says which models the design covers: every layer a Mamba2 mixer with one group and one
gated-norm group, the residual in float32, no dt limit, no LoRA or quantized weights.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.inference.fold import fold_norm_weights
from mamba_jax.layers.base import lora_names, scale_name
from mamba_jax.models.stack import layer_mixers, unstack_layers

BF16 = jnp.bfloat16
TARGET = "mamba_jax_megakernel"
TARGET_HEAD = "mamba_jax_megakernel_head"  # the same with the LM head as its last phase
# What kernels/megakernel.cuh compiles in besides d_model and the heads (one build per (D, H)): head dim,
# state, conv taps, eps — every Mamba2 checkpoint's (130M … 2.7B).
KERNEL_FIXED = {"P": 64, "N": 128, "K": 4, "eps": 1e-5}
# Measured on an H100 (benchmarks/README.md): Mamba2-2.7B's dimensions. The others build and are checked on
# the CPU for their constraints only until a GPU run says otherwise.
MEASURED_DIMS = (2560, 80)
DEFAULT_MODE = 5  # kernel_mode()


class Params(NamedTuple):
    """A model's Mamba layers in the kernel's layouts (L layers; NIN = 2·DI + 2·N + H in_proj features,
    CX = DI + 2·N conv channels)."""

    win: jax.Array  # (L, NIN, D) bf16: in_proj transposed, the input norm's weight folded in
    wout: jax.Array  # (L, D, DI) bf16: out_proj transposed, the gated norm's weight folded in
    conv_w: jax.Array  # (L, CX, K) float32: taps oldest first
    conv_b: jax.Array  # (L, CX) float32
    a_log: jax.Array  # (L, H) float32
    d_skip: jax.Array  # (L, H) float32
    dt_bias: jax.Array  # (L, H) float32
    # pack(quantize="fp8"): win / wout float8 e4m3 rows, each times its float32 scale (None otherwise)
    win_scale: jax.Array | None = None  # (L, NIN)
    wout_scale: jax.Array | None = None  # (L, D)


class Cache(NamedTuple):
    ring: jax.Array  # (L, CX, K) bf16: conv input of position t in slot t mod K
    state: jax.Array  # (L, H, P, N) bf16


def unsupported(model) -> str | None:
    """Why the megakernel design does not cover `model`, or None."""
    cfg = model.cfg
    if set(cfg.pattern) != {"M"}:
        return f"layers other than Mamba2 (pattern {cfg.pattern!r})"
    if cfg.mamba_num_groups != 1:
        return f"{cfg.mamba_num_groups} SSM groups (it takes 1)"
    if not cfg.residual_in_fp32:
        return "a residual stream in the compute dtype (it keeps float32, residual_in_fp32)"
    if tuple(cfg.mamba_dt_limit) != (0.0, math.inf):
        return f"a dt limit {tuple(cfg.mamba_dt_limit)} (it applies none)"
    if getattr(model, "prompt", None) is not None:
        return "prompt tuning"
    for mixer, _ in layer_mixers(model):  # stacked or not: the attributes are the same
        for name in ("in_proj", "out_proj"):
            if hasattr(mixer, lora_names(name)[0]) or hasattr(mixer, scale_name(name)):
                return f"LoRA or quantized {name} weights"
    return None


def quantize_rows(w):
    """(W_q float8 e4m3, scale float32 per row): each row (an output feature, K contiguous) over its largest
    magnitude / 448, as `inference.quantize` does per output channel."""
    from mamba_jax.inference.quantize import quantize_array

    return quantize_array(w, 1, w.ndim - 1)  # the last axis contracted, the ones before it kept


def pack(model, dtype=BF16, quantize: str | None = None) -> Params:
    """`model`'s Mamba layers in the kernel's layouts (the norms' weights folded in on a copy: `model` keeps
    its own). `dtype`: the projections' (bf16 as the kernel reads them; float32 for exact tests).
    `quantize="fp8"`: the projections as float8 rows with a float32 scale each (`quantize_rows`), rounded
    after the norms' weights are folded in (so from the unquantized model: the Engine's XLA path quantizes
    its weights per output channel before any folding, a different rounding of the same model)."""
    if reason := unsupported(model):
        raise ValueError(f"megakernel: the design does not cover {reason}.")
    if quantize not in (None, "none", "fp8"):
        raise ValueError(f"megakernel: quantize={quantize!r}; it reads bf16 or fp8 projections.")
    view = fold_norm_weights(unstack_layers(model))  # a copy: fold replaces the copy's arrays
    cols = {k: [] for k in Params._fields}
    for m, _ in layer_mixers(view):  # unstacked: one set of arrays per layer, in order
        d = m.in_proj.shape[0]
        win, wout = m.in_proj[...].reshape(d, -1).T, m.out_proj[...].reshape(-1, d).T
        if quantize == "fp8":
            (win, s_in), (wout, s_out) = quantize_rows(win), quantize_rows(wout)
            cols["win_scale"].append(s_in)
            cols["wout_scale"].append(s_out)
        else:
            win, wout = win.astype(dtype), wout.astype(dtype)
        cols["win"].append(win)
        cols["wout"].append(wout)
        cols["conv_w"].append(m.conv_weight[...][:, 0].T.astype(jnp.float32))  # (K, G=1, F) → (F, K)
        cols["conv_b"].append(m.conv_bias[...][0].astype(jnp.float32))
        for field, var in (("a_log", m.A_log), ("d_skip", m.D), ("dt_bias", m.dt_bias)):
            cols[field].append(var[...].astype(jnp.float32))
    return Params(**{k: jnp.stack(v) if v else None for k, v in cols.items()})


def _round(x, dtype):
    """x (float32) rounded to `dtype`'s precision, still float32: reduce_precision, since XLA's GPU fusions
    may elide an astype round trip (excess precision), and the kernel does round there."""
    if jnp.dtype(dtype) == jnp.float32:
        return x
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _matvec(w, scale, x, dtype):
    """w · x with the kernel's arithmetic: x rounded to the weights' dtype (bf16 for float8 rows, whose values
    are exact in float32), float32 sums, then the rows' scales."""
    if scale is None:
        return jnp.dot(w, x.astype(w.dtype), preferred_element_type=jnp.float32)
    x = _round(x, dtype)
    return jnp.dot(w.astype(jnp.float32), x, preferred_element_type=jnp.float32) * scale


def ring_caches(caches, length: int, taps: int):
    """The Engine's per-layer prefill caches with each Mamba layer's conv inputs as a ring of `taps` slots,
    the input at position t in slot t mod `taps` (`kernels.decode.conv_ring`), as the fused decode path and
    the kernel keep them: the XLA path's prefill keeps a window of the last `taps` − 1 inputs, the fused
    path's a ring already. `length`: the prompt's length (the next token's position)."""
    from mamba_jax.kernels.decode import conv_ring

    def ring(c):  # a Mamba layer's cache
        return c if c["conv"].shape[1] == taps else {**c, "conv": conv_ring(c["conv"], length)}

    return jax.tree.map(ring, caches, is_leaf=lambda c: isinstance(c, dict) and "ssm" in c)


def pack_head(model, dtype=BF16) -> jax.Array:
    """The LM head as the kernel's last phase reads it: (V, D) rows (a row per vocabulary entry, K contiguous)
    with the final norm's weight folded in, so that logits = head · h / rms(h)."""
    w_DV = model.head_weight().astype(jnp.float32) * model.norm_f.weight[...].astype(jnp.float32)[:, None]
    return w_DV.T.astype(dtype)


def reference_head(head_VD, h_D, *, eps: float):
    """The logits (V,) float32 of the residual after the last layer with the kernel's arithmetic: the final
    norm's 1/rms times head · h rounded to the head's dtype, float32 sums."""
    inv = jax.lax.rsqrt(jnp.mean(h_D * h_D) + eps)
    return jnp.dot(head_VD, h_D.astype(head_VD.dtype), preferred_element_type=jnp.float32) * inv


def cache_dtype(params: Params):
    """The caches' dtype that goes with `params`: the projections' (bf16 as the kernel keeps them, float32 for
    exact tests), bf16 beside float8 rows."""
    return BF16 if params.win_scale is not None else params.win.dtype


def kernel_cache(caches, dtype=BF16) -> Cache:
    """The Engine's per-layer decoding caches of the fused decode path (`Mamba2Mixer._decode_fused`: the conv
    inputs as a ring, `kernels.decode.conv_ring`), in layer order, at batch 1, stacked as the kernel's (in
    `dtype`: bf16 as the kernel keeps them)."""
    layers = [c for c in jax.tree.leaves(caches, is_leaf=lambda c: isinstance(c, dict) and "ssm" in c)]
    if any(c["conv"].shape[0] != 1 for c in layers):
        raise ValueError("megakernel: the kernel decodes one sequence (batch 1).")
    ring = jnp.stack([c["conv"][0, :, 0].T.astype(dtype) for c in layers])  # (1, K, 1, F) → (F, K)
    return Cache(ring, jnp.stack([c["ssm"][0].astype(dtype) for c in layers]))


def engine_cache(cache: Cache, like):
    """`cache` back in the Engine's per-layer structure `like` (as `kernel_cache` took it)."""
    leaves, treedef = jax.tree.flatten(like, is_leaf=lambda c: isinstance(c, dict) and "ssm" in c)
    out = []
    for i, c in enumerate(leaves):
        conv = cache.ring[i].T[None, :, None].astype(c["conv"].dtype)
        out.append({**c, "conv": conv, "ssm": cache.state[i][None].astype(c["ssm"].dtype)})
    return jax.tree.unflatten(treedef, out)


def _silu(x):
    return x / (1.0 + jnp.exp(-x))


def reference_step(params: Params, cache: Cache, h_D, pos, *, eps: float):
    """One token through every layer with the kernel's arithmetic (the module docstring): the residual
    stream h (D,) float32 entering the first layer → (h after the last layer, the new cache). `pos`: the
    token's position (its conv input goes to ring slot pos mod K). The roundings are to the cache's dtype
    (bf16 as the kernel's; with float32 caches and weights, none: the model's function exactly)."""
    k = params.conv_w.shape[-1]
    f32, low = jnp.float32, cache.state.dtype

    def _rnd(x):
        return _round(x, low)

    h_heads, p, n = cache.state.shape[1:]
    di = h_heads * p

    def layer(h, xs):
        prm, ring, state = xs
        inv = jax.lax.rsqrt(jnp.mean(h * h) + eps)
        zx = _matvec(prm.win, prm.win_scale, h, low) * inv
        z, xbc, dt = zx[:di], zx[di : di + di + 2 * n], zx[di + di + 2 * n :]
        taps = jnp.stack([ring[:, (pos + 1 + j) % k] for j in range(k - 1)], 1).astype(f32)  # oldest first
        acc = prm.conv_b + prm.conv_w[:, k - 1] * xbc
        for j in range(k - 1):
            acc = acc + prm.conv_w[:, j] * taps[:, j]
        sx = _silu(acc)
        ring = ring.at[:, pos % k].set(xbc.astype(ring.dtype))
        dt = dt + prm.dt_bias
        dt = jnp.where(dt > 20.0, dt, jnp.log1p(jnp.exp(jnp.minimum(dt, 20.0))))
        da = jnp.exp(-dt * jnp.exp(prm.a_log))
        x_HP, b_N, c_N = sx[:di].reshape(h_heads, p), sx[di : di + n], sx[di + n :]
        new = state.astype(f32) * da[:, None, None] + (x_HP * dt[:, None])[..., None] * b_N
        state = new.astype(low)
        y = jnp.einsum("hpn,n->hp", state.astype(f32), c_N)
        g = _rnd((prm.d_skip[:, None] * x_HP + y) * _silu(z.reshape(h_heads, p))).reshape(di)
        o = _matvec(prm.wout, prm.wout_scale, g, low)
        inv_g = jax.lax.rsqrt(jnp.sum(g * g) / di + eps)
        return h + _rnd(_rnd(o) * inv_g), (ring, state)

    h_D, (ring, state) = jax.lax.scan(layer, h_D.astype(f32), (params, cache.ring, cache.state))
    return h_D, Cache(ring, state)


def workspace(params: Params) -> jax.Array:
    """The kernel's workspace (its tagged buffers and epoch counter, uint32 words): zeros before a sequence's
    first token, then carried from `step` to `step`."""
    d, di, h = params.win.shape[2], params.wout.shape[2], params.a_log.shape[1]
    return jnp.zeros(2 * (params.win.shape[1] + di // 2 + h + d) + 2, jnp.uint32)


def kernel_dims_unsupported(d: int, h: int, p: int, n: int, k: int, eps: float) -> str | None:
    """Why kernels/megakernel.cuh cannot be built for these dimensions (d_model, heads, head dim, state, conv
    taps, eps), or None. Its constraints: Mamba2's fixed head dim / state / conv (KERNEL_FIXED); d_model a
    multiple of the 256 consumer threads (the residual's load); heads a multiple of 8 (g as words per thread,
    in_proj rows in blocks of 8) and at most 96 (the gated norm's Σ g² by one warp); every head's step on a CTA
    of its own and at most 32 residual rows per CTA (checked against the GPU's SM count at launch)."""
    fixed = {"P": p, "N": n, "K": k, "eps": eps}
    if any(fixed[key] != v for key, v in KERNEL_FIXED.items()):
        built = tuple(KERNEL_FIXED.values())
        return f"(head dim P, state N, conv taps K, eps) = {(p, n, k, eps)}; it is built for {built}"
    if d % 256:
        return f"d_model {d} is not a multiple of 256 (its consumer threads)"
    if h % 8 or h > 96:
        return f"{h} heads: it needs a multiple of 8, at most 96"
    return None


def kernel_unsupported(params: Params, eps: float, head=None, graph: bool = False) -> str | None:
    """Why `step` computes with `reference_step` rather than the CUDA kernel here, or None. `graph`: the
    command-buffer compatible targets (`kernel_graph`). The kernel is built once per (d_model, heads) and
    weight type."""
    _, nin, d = params.win.shape
    h, hp, k = params.a_log.shape[1], params.wout.shape[2], params.conv_w.shape[2]
    n = (nin - 2 * hp - h) // 2
    if why := kernel_dims_unsupported(d, h, hp // h, n, k, eps):
        return why
    fp8 = params.win_scale is not None
    if params.win.dtype != (jnp.float8_e4m3fn if fp8 else BF16):
        return f"{params.win.dtype} weights (it streams bf16, or float8 e4m3 rows with their scales)"
    if head is not None and (head.dtype != BF16 or head.shape[1] != d):
        return f"a head of {head.dtype} {tuple(head.shape)} (it reads (V, {d}) bf16)"
    from mamba_jax.kernels.cuda_build import load  # lazy: only where a GPU may run it

    symbol = ("MambaJaxMegakernelHead" if head is not None else "MambaJaxMegakernel") + "Graph" * graph
    flags = (f"-DMK_D={d}", f"-DMK_H={h}") + ("-DMK_FP8=1",) * fp8
    return load("megakernel", symbol, _target(d, h, head is not None, graph, fp8), flags)


def not_here(model, quantize: str | None = None) -> str | None:
    """Why the CUDA kernel would not run `model`'s batch-1 decode here (`Engine(megakernel="auto")` takes it
    where this is None), checked on the packed weights' shapes: a GPU, a model the design covers, bf16 or float8
    rows (a float32 model packs float32: its reference runs), then `kernel_unsupported` (which builds the
    kernel for the model's size, once, where it can)."""
    if jax.default_backend() != "gpu":
        return "not a GPU"
    if reason := unsupported(model):
        return reason
    if jnp.dtype(model.cfg.dtype) == jnp.float32:
        return "a float32 model (the kernel streams bf16 or float8 rows)"
    shapes = jax.eval_shape(lambda m: pack(m, BF16, quantize=quantize), model)
    return kernel_unsupported(shapes, model.cfg.norm_eps)


def _target(d: int, h: int, head: bool, graph: bool, fp8: bool = False) -> str:
    """The FFI target of the (d_model, heads[, float8]) build: one library per model size and weight type, its
    handlers registered under names of their own."""
    return (TARGET_HEAD if head else TARGET) + f"_d{d}_h{h}" + "_fp8" * fp8 + "_graph" * graph


def kernel_mode() -> tuple[int, int]:
    """The kernel's variant (kernels/megakernel.cuh): mode 5 (each layer's SSM steps after in_proj, out_proj
    after every step; the default) or 10 (the steps inside in_proj's weight stream, out_proj by chunks of
    heads: slower on an H100, benchmarks/README.md), and mode 10's slack (in_proj slots between a head's last
    inputs and its step). MAMBA_JAX_MEGAKERNEL_MODE="10" or "10,2" picks them (read at trace time)."""
    raw = os.environ.get("MAMBA_JAX_MEGAKERNEL_MODE", "").strip()
    try:
        parts = [int(v) for v in raw.split(",")] if raw else []
    except ValueError:
        parts = [-1]
    mode = tuple(parts) + (DEFAULT_MODE, 1)[len(parts) :]  # the defaults fill what is not given; 3 parts fail
    return _checked_mode(mode, f"MAMBA_JAX_MEGAKERNEL_MODE={raw!r}: want MODE[,SLACK]")


def _checked_mode(mode, what: str | None = None) -> tuple[int, int]:
    """`step`'s mode argument or the variable's parts, (MODE, SLACK) as `kernel_mode` returns it, checked."""
    if not (isinstance(mode, tuple) and len(mode) == 2 and mode[0] in (5, 10) and mode[1] >= 0):
        what = what or f"megakernel.step: mode={mode!r}; want (MODE, SLACK)"
        raise ValueError(what + " with MODE 5 or 10, SLACK >= 0.")
    return mode


def kernel_graph() -> bool:
    """Whether `step` calls the command-buffer compatible targets (MAMBA_JAX_MEGAKERNEL_GRAPH=1, read at
    trace time; experimental): XLA may then capture the launch into its CUDA graphs, and with
    xla_gpu_enable_command_buffer including WHILE the decode loop itself, instead of driving the loop from the
    host."""
    raw = os.environ.get("MAMBA_JAX_MEGAKERNEL_GRAPH", "0")
    if raw not in ("0", "1"):
        raise ValueError(f"MAMBA_JAX_MEGAKERNEL_GRAPH={raw!r}: want 1 (command-buffer compatible launches) or 0.")
    return raw == "1"


def step(params: Params, cache: Cache, h_D, pos, work, *, eps: float, head=None, mode=None, graph=None):
    """One token through every layer: (the residual after the last layer, the new cache, the workspace), and
    with `head` (`pack_head`) the logits (V,) float32 as well. The CUDA kernel where `kernel_unsupported`
    allows (the caches and workspace updated in place; the head as its last phase), else `reference_step`
    (and `reference_head`). `mode` ((MODE, SLACK)) and `graph` default to `kernel_mode()` / `kernel_graph()`,
    read when traced: under jit pass them as static arguments, since jax reuses a function's trace whatever
    the environment says by then (the Engine reads them once, when built)."""
    graph = kernel_graph() if graph is None else bool(graph)
    mode, slack = kernel_mode() if mode is None else _checked_mode(mode)
    if kernel_unsupported(params, eps, head, graph) is None:
        shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (cache.ring, cache.state, h_D, work)]
        d, h, fp8 = params.win.shape[2], params.a_log.shape[1], params.win_scale is not None
        if mode == 10 and ((d, h) != MEASURED_DIMS or fp8):
            raise ValueError(f"megakernel: mode 10 is built for Mamba2-2.7B's (D, H) {MEASURED_DIMS} and bf16 only.")
        weights = tuple(a for a in params if a is not None)  # (the float8 rows' scales after dt_bias)
        args = (*weights, jnp.asarray(pos, jnp.int32), cache.ring, cache.state, h_D, work)
        n = len(weights)  # ring, state, h and work (after pos) are updated in place
        aliases = {n + 1: 0, n + 2: 1, n + 3: 2, n + 4: 3}
        if head is None:
            call = jax.ffi.ffi_call(_target(d, h, False, graph, fp8), shapes, input_output_aliases=aliases)
            ring, state, h_D, work = call(*args, mode=np.int32(mode), slack=np.int32(slack))
            return h_D, Cache(ring, state), work
        if mode != 5:
            raise ValueError(f"megakernel: the LM head phase runs in mode 5 (MAMBA_JAX_MEGAKERNEL_MODE={mode}).")
        shapes.append(jax.ShapeDtypeStruct((head.shape[0],), jnp.float32))
        call = jax.ffi.ffi_call(_target(d, h, True, graph, fp8), shapes, input_output_aliases=aliases)
        ring, state, h_D, work, logits = call(*args, head, mode=np.int32(mode), slack=np.int32(slack))
        return h_D, Cache(ring, state), work, logits
    h_D, cache = reference_step(params, cache, h_D, pos, eps=eps)
    if head is None:
        return h_D, cache, work
    return h_D, cache, work, reference_head(head, h_D, eps=eps)


def reference_logits(model, params: Params, cache: Cache, token, pos):
    """Logits (V,) float32 of one token at `pos` through the embedding, `reference_step` and the model's final
    norm and head (which the Engine would leave to XLA around the kernel), and the new cache."""
    h_D = model._embed(jnp.asarray([token]))[0].astype(jnp.float32)
    h_D, cache = reference_step(params, cache, h_D, pos, eps=model.cfg.norm_eps)
    return model._logits(model.norm_f(h_D[None]))[0], cache


__all__ = [
    "Cache",
    "Params",
    "cache_dtype",
    "engine_cache",
    "kernel_cache",
    "kernel_dims_unsupported",
    "kernel_unsupported",
    "not_here",
    "pack",
    "reference_logits",
    "reference_step",
    "step",
    "unsupported",
    "workspace",
]
