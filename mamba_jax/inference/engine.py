"""The generation engine: prefill with the chunked scan, then a compiled decode loop over constant-size state.

A batch of prompts is left-padded to one length; the padding is its own document (`seq_idx` 0, the prompt 1),
so no SSM state, conv window or attention reaches the prompt from it, and every row then decodes at the same
position. Prefill runs the model once over the prompts and keeps, per Mamba layer, the final SSM state and
the last conv inputs, per attention layer the K / V in a cache preallocated to the final length. The decode
loop (`lax.while_loop`: no Python per token) samples a token, advances every layer by one token, and stops
when every row has produced EOS or the token budget is spent. With `stream`, each new token is handed to a
host callback as it is produced.

Sampling follows Hugging Face's logits processors, in this order: repetition penalty (over prompt and
generated tokens), temperature, top-k, top-p; temperature 0 is greedy.

Dimension key: B batch, L prompt length (padded), T new tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.inference.fold import fold_norm_weights
from mamba_jax.inference.quantize import quantize_weights
from mamba_jax.inference.sampling import filter_logits
from mamba_jax.models.stack import unstack_layers
from mamba_jax.ops.ssd import note_once


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already seen
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(
                "sampling needs temperature ≥ 0, top_k ≥ 0, 0 < top_p ≤ 1 and repetition_penalty > 0; got "
                f"{self.temperature}, {self.top_k}, {self.top_p}, {self.repetition_penalty}."
            )


@dataclasses.dataclass
class Generation:
    """Per prompt: the generated token ids (EOS excluded) and their log-probabilities under the model."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]  # True where the row stopped at EOS


def apply_repetition_penalty(logits_BV, seen_BV, penalty: float):
    """Hugging Face's rule: a seen token's logit is divided by the penalty if positive, multiplied if not."""
    if penalty == 1.0:
        return logits_BV
    return jnp.where(seen_BV, jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty), logits_BV)


def pad_prompts(prompts: list[list[int]], pad_id: int = 0, multiple: int = 1):
    """Left-pad token lists to one length (rounded up to `multiple`); returns (ids (B, L) int32, start (B,))."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (an empty prompt cannot be continued).")
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    ids = np.full((len(prompts), length), pad_id, np.int32)
    start = np.zeros(len(prompts), np.int32)
    for b, p in enumerate(prompts):
        ids[b, length - len(p) :] = p
        start[b] = length - len(p)
    return ids, start


class Engine:
    """Compiled generation for one model; reuse it across calls (each new shape compiles once)."""

    def __init__(
        self,
        model,
        *,
        dtype=None,
        state_dtype="float32",
        mesh=None,
        unstack: bool = True,
        decode_impl=None,
        compiler_options: dict | None = None,
        quantize: str | None = None,
        megakernel: bool | str = "auto",
    ):
        """`dtype`: cast the weight matrices (e.g. bf16 for serving a float32-trained model). `state_dtype`:
        the SSM state kept between decode steps; float32 (default) is exact, bfloat16 halves the bytes every
        step moves (what mamba_ssm keeps in a bf16 model; at batch 32 of Mamba2-2.7B the float32 states are
        as many bytes as the weights) at some drift over long generations. The update itself is float32.
        `unstack`: decode with every layer's weights in their own buffers (see `unstack_layers`: several
        times faster per token; costs a second copy of the layer weights while `model` is alive).
        `decode_impl`: override the model's `decode_impl` ("auto", "xla", "pallas": the fused Mamba decode
        kernels, see mamba_jax.kernels.decode). `unstack` with the fused kernels also folds the Mamba blocks'
        norm weights into their projections (`mamba_jax.inference.fold`; same function, fewer launches).
        `compiler_options`: XLA options for compiling the generation loop (e.g.
        {"xla_gpu_exhaustive_tiling_search": True}: a wider autotuning of the GEMVs); None: `default_options`
        for the batch. `quantize`: "fp8" stores the projection weights in float8 with a scale per output
        channel (`mamba_jax.inference.quantize`: half the bytes of bf16 per decode step; logits within a few
        per cent); None or "none" keeps them as they are. `megakernel` (pure Mamba2 models): decode batch 1
        with one launch per token through every layer (`mamba_jax.inference.megakernel`; it keeps a packed
        copy of the layer weights, made by the first batch-1 `generate`; other batches decode as without
        it). "auto" (default): where the CUDA kernel runs for this model (a Hopper GPU with nvcc, bf16 weights
        or quantize="fp8", one device), else off; True: always (its JAX reference where the kernel does not
        run: same arithmetic, not faster; a model it does not cover is an error); False: never."""
        if dtype is not None:
            model = nnx.merge(*_cast_state(nnx.split(model), dtype))
        if unstack:
            model = unstack_layers(model)
        if decode_impl is not None:
            model = _with_decode_impl(model if unstack else nnx.clone(model), decode_impl)
        if unstack and _fused_decode_possible(model.cfg.decode_impl, mesh):
            model = fold_norm_weights(model)  # the unstacked view's own arrays (see mamba_jax.inference.fold)
        self.quantize = None if quantize in (None, "none") else quantize
        self.mk_params = self.mk_head = self.mk_options = self._mk_pack = None
        auto = megakernel == "auto"
        if auto:  # where the CUDA kernel runs for this model (one device), else off
            from mamba_jax.inference.megakernel import not_here

            megakernel = (mesh is None or mesh.size == 1) and not_here(model, self.quantize) is None
        elif megakernel not in (True, False):
            raise ValueError(f"megakernel={megakernel!r}: want 'auto', True or False.")
        if megakernel:
            from mamba_jax.inference import megakernel as mk

            if reason := mk.unsupported(model) or (mesh is not None and mesh.size > 1 and "a sharded model"):
                raise ValueError(f"megakernel=True: the megakernel does not cover {reason}.")
            # bf16 as the kernel reads them; a float32 model keeps float32 (then the JAX reference runs it); with
            # quantize="fp8" float8 rows packed from the unquantized weights (the norms folded in first), while
            # prefill's XLA path gets the model's own float8 weights below: two roundings of the same model
            mk_dtype = jnp.float32 if jnp.dtype(model.cfg.dtype) == jnp.float32 else mk.BF16
            head = os.environ.get("MAMBA_JAX_MEGAKERNEL_HEAD", "0")
            if head not in ("0", "1"):
                raise ValueError(f"MAMBA_JAX_MEGAKERNEL_HEAD={head!r}: want 1 (the LM head inside the kernel) or 0.")
            # The packed copy (as large as the layer weights) is made on the first batch-1 generate, so that a
            # server that only decodes batches never holds it; with quantize="fp8" now, from the weights that
            # quantize_weights below replaces.
            self._mk_pack = functools.partial(_pack_megakernel, model, mk_dtype, self.quantize, head == "1")
            # the A/B variables, read once here (a cached trace of the loop would not see them change)
            self.mk_options = _MegakernelOptions(mk.kernel_mode(), mk.kernel_graph(), _unroll_override())
            if not auto:  # (auto took it only where not_here found that the kernel runs)
                shapes = jax.eval_shape(lambda m: mk.pack(m, mk_dtype, quantize=self.quantize), model)
                if why := mk.kernel_unsupported(shapes, model.cfg.norm_eps):
                    note_once(f"megakernel=True: the CUDA megakernel does not run here ({why}); batch 1 decodes "
                              "through its JAX reference instead (the same arithmetic, not faster).")  # fmt: skip
            if self.quantize is not None:
                self._pack_megakernel()
        if self.quantize is not None:
            model = model if (unstack or dtype is not None) else nnx.clone(model)  # never the caller's modules
            quantize_weights(model, self.quantize)
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.mesh = mesh
        self.state_dtype = jnp.dtype(state_dtype).name
        self.compiler_options = None if compiler_options is None else tuple(sorted(compiler_options.items()))

    @property
    def megakernel(self) -> bool:
        """Whether batch 1 decodes through the megakernel (its packed weights are made on first use)."""
        return self.mk_options is not None

    def _pack_megakernel(self):
        self.mk_params, self.mk_head = self._mk_pack()
        self._mk_pack = None  # holds the model it packed from

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams = SamplingParams(),
        *,
        eos_id: int | None = None,
        stream=None,
        pad_multiple: int = 16,
        vocab_size: int | None = None,
    ) -> Generation:
        """Continue each prompt (a list of token ids). `stream(token_ids_B)` is called per step if given.
        `vocab_size` (the tokenizer's) keeps sampling off the padding rows of a padded embedding."""
        ids, start = pad_prompts(prompts, multiple=pad_multiple)
        # The seed travels as a key argument, so that other seeds reuse the compiled loop.
        fn = _generate_fn(
            self.graphdef,
            dataclasses.replace(params, seed=0),
            -1 if eos_id is None else eos_id,
            bool(stream),
            vocab_size,
            self.state_dtype,
            default_options(len(prompts), self.quantize) if self.compiler_options is None else self.compiler_options,
            self.mk_options if (megakernel := self.megakernel and len(prompts) == 1) else None,
            _decode_knobs(),
        )
        args = (self.state, jnp.asarray(ids), jnp.asarray(start), jax.random.key(params.seed))
        if megakernel and self.mk_params is None:
            self._pack_megakernel()
        args += ((self.mk_params, self.mk_head) if megakernel else None,)
        if stream is not None:
            _STREAM[0] = stream
        if self.mesh is not None:
            from mamba_jax.parallel.sharding import use_mesh

            with use_mesh(self.mesh):
                tokens, logprobs, n = fn(*args)
        else:
            tokens, logprobs, n = fn(*args)
        tokens, logprobs, n = np.asarray(tokens), np.asarray(logprobs), int(n)
        out_t, out_l, fin = [], [], []
        for b in range(len(prompts)):
            row = tokens[b, :n].tolist()
            stopped = eos_id is not None and eos_id in row
            cut = row.index(eos_id) if stopped else len(row)
            out_t.append(row[:cut])
            out_l.append(logprobs[b, :cut].tolist())
            fin.append(stopped)
        return Generation(out_t, out_l, fin)


_STREAM = [None]  # the host callback of the running streamed generation


def _emit(tokens_B):
    if _STREAM[0] is not None:
        _STREAM[0](np.asarray(tokens_B))


def _with_decode_impl(model, impl: str):
    """`model` (modified) with every module's config asking for `impl` in one-token decode."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and hasattr(module, "cfg"):
            module.cfg = module.cfg.replace(decode_impl=impl)
    return model


def _fused_decode_possible(impl: str, mesh) -> bool:
    """Whether decoding may take the fused kernel path (the Mamba layers decide per trace; this only says
    whether folding the norm weights for it can pay off)."""
    if impl == "xla" or (mesh is not None and mesh.size > 1):
        return False
    return impl == "pallas" or jax.default_backend() == "gpu"


def _cast_state(split, dtype):
    """Cast the matrices (the weight-decayed parameters: projections, embeddings, conv) to `dtype`; A_log, D,
    dt_bias, norms and biases keep their precision (exp(A_log) compounds over every step)."""
    graphdef, state = split
    dtype = jnp.dtype(dtype)

    def cast(v):
        if isinstance(v, nnx.Variable) and v.get_metadata().get("weight_decay", False):
            value = v.get_value()
            if jnp.issubdtype(value.dtype, jnp.floating):
                return v.replace(value.astype(dtype))
        return v

    return graphdef, jax.tree.map(cast, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


CUBLAS_MIN_BATCH = 16


def default_options(batch: int, quantize: str | None = None) -> tuple:
    """XLA options for the generation loop at this batch, as `Engine.compiler_options` holds them. From
    CUBLAS_MIN_BATCH rows on, the projections run as cuBLAS GEMMs rather than XLA's Triton GEMMs: Mamba2-2.7B
    at batch 32 decodes 2.3–2.7 % faster (H100, benchmarks/README.md), while at batch 1 cuBLAS's GEMVs are
    slower than XLA's. Quantized weights keep the Triton GEMMs: they read the float8 weight and cast it in
    registers, where a cuBLAS GEMM would need it cast to bf16 in memory first."""
    if batch >= CUBLAS_MIN_BATCH and quantize is None and jax.default_backend() == "gpu":
        return (("xla_gpu_enable_triton_gemm", False),)
    return ()


def _cast_ssm_states(cache, dtype: str):
    """The SSM states (the "ssm" entries of the Mamba layers' caches) in `dtype`; decode keeps that dtype."""

    def cast(path, leaf):
        name = getattr(path[-1], "key", None)
        return leaf.astype(dtype) if name == "ssm" else leaf

    return jax.tree_util.tree_map_with_path(cast, cache)


def _pack_megakernel(model, dtype, quantize, head: bool):
    """The megakernel's packed layers and (MAMBA_JAX_MEGAKERNEL_HEAD=1) LM head for `Engine`."""
    from mamba_jax.inference import megakernel as mk

    return mk.pack(model, dtype, quantize=quantize), mk.pack_head(model, dtype) if head else None


def _megakernel_cache(mk_params, cache, length: int):
    """The prefill's caches as the megakernel's (its ring of conv inputs: the fused decode path's prefill
    already keeps one, the XLA path's a window of the last K − 1) and a fresh workspace."""
    from mamba_jax.inference import megakernel as mk

    rings = mk.ring_caches(cache, length, mk_params.conv_w.shape[-1])
    return mk.kernel_cache(rings, mk.cache_dtype(mk_params)), mk.workspace(mk_params)


class _MegakernelOptions(NamedTuple):
    """The megakernel's A/B variables as the Engine read them when built (part of its loop's cache key)."""

    mode: tuple[int, int]  # kernel_mode(): (MODE, SLACK)
    graph: bool  # kernel_graph()
    unroll: int  # _unroll_override(): tokens per loop iteration, 0 for the default


def _unroll_override() -> int:
    """MAMBA_JAX_MEGAKERNEL_UNROLL (tokens per iteration of the megakernel loop, an A/B knob), 0 where unset."""
    raw = os.environ.get("MAMBA_JAX_MEGAKERNEL_UNROLL", "")
    if raw and (not raw.isdigit() or int(raw) < 1):
        raise ValueError(f"MAMBA_JAX_MEGAKERNEL_UNROLL={raw!r}: want a positive number of steps per iteration.")
    return int(raw or 0)


def _megakernel_decode(model, mk, tok_B, cache, pos, options):
    """One token of batch 1 through the megakernel, with the embedding and (unless the kernel runs it as its
    last phase, `mk_head`) the final norm and head around it. `options`: the Engine's `_MegakernelOptions`."""
    from mamba_jax.inference import megakernel

    mk_params, mk_head = mk
    mk_cache, work = cache
    h_D = model._embed(tok_B)[0].astype(jnp.float32)
    kw = {"eps": model.cfg.norm_eps, "mode": options.mode, "graph": options.graph}
    if mk_head is not None:
        h_D, mk_cache, work, logits_V = megakernel.step(mk_params, mk_cache, h_D, pos, work, head=mk_head, **kw)
        return logits_V[None], (mk_cache, work)
    h_D, mk_cache, work = megakernel.step(mk_params, mk_cache, h_D, pos, work, **kw)
    return model._logits(model.norm_f(h_D[None])), (mk_cache, work)


def _decode_knobs() -> tuple:
    """The decode kernels' A/B variables (MAMBA_JAX_DECODE_* and MAMBA_JAX_SKINNY_*, read when the loop is
    traced), as part of the compiled loop's cache key: a loop traced under other settings is not reused."""
    return tuple(
        sorted((k, v) for k, v in os.environ.items() if k.startswith(("MAMBA_JAX_DECODE_", "MAMBA_JAX_SKINNY_")))
    )


@functools.lru_cache(maxsize=32)
def _generate_fn(
    graphdef,
    params: SamplingParams,
    eos_id: int,
    stream: bool,
    vocab_size: int | None,
    state_dtype: str,
    compiler_options: tuple = (),
    megakernel: _MegakernelOptions | None = None,
    knobs: tuple = (),
):
    """The compiled generation loop. `megakernel`: None, or the Engine's `_MegakernelOptions` for batch 1
    through it. `knobs`: `_decode_knobs()` (only a cache key)."""
    T = params.max_new_tokens
    # Steps per iteration of the loop. The megakernel is an FFI call XLA cannot put in a command buffer, so
    # the loop runs from the host: each iteration the host reads the loop's predicate back before it launches
    # the next, and the GPU waits for it. A few tokens per iteration share that round trip (the body is one
    # kernel, the head and the sampling: cheap to repeat). A finished batch then stops at the iteration's end;
    # the extra tokens are EOS, cut on the host.
    unroll = next((u for u in (4, 2) if T % u == 0), 1) if megakernel else 1
    if megakernel and megakernel.unroll:  # MAMBA_JAX_MEGAKERNEL_UNROLL: A/B of the above
        unroll = math.gcd(megakernel.unroll, T)  # a divisor of T: no step past the last token

    def run(state, ids_BL, start_B, key, mk):  # mk: (the megakernel's packed layers, its head or None)
        model = nnx.merge(graphdef, state)
        b, l = ids_BL.shape
        seq_idx = (jnp.arange(l)[None] >= start_B[:, None]).astype(jnp.int32)
        logits_BV, cache = model.prefill(ids_BL, seq_idx=seq_idx, cache_len=l + T)
        cache = _cast_ssm_states(cache, state_dtype)
        if megakernel:  # batch 1: the caches as the kernel's [layer, …] arrays, and its workspace
            cache = _megakernel_cache(mk[0], cache, l)
        v = logits_BV.shape[-1]
        seen_BV = jnp.zeros((b, v), bool)
        if params.repetition_penalty != 1.0:  # the prompt counts as seen
            seen_BV = jax.vmap(lambda s, i, m: s.at[i].max(m))(seen_BV, ids_BL, seq_idx.astype(bool))

        def cond(carry):
            t, done = carry[0], carry[5]
            return (t < T) & ~jnp.all(done)

        def step(carry):
            t, logits_BV, cache, key, seen_BV, done_B, tokens_BT, logprobs_BT = carry
            key, sub = jax.random.split(key)
            if vocab_size is not None:  # ids past the tokenizer's vocabulary are padding rows
                logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_size, logits_BV, -jnp.inf)
            raw_BV = logits_BV
            logits_BV = apply_repetition_penalty(logits_BV, seen_BV, params.repetition_penalty)
            if params.temperature == 0.0:
                tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
            else:
                filtered = filter_logits(
                    logits_BV, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p
                )
                tok_B = jax.random.categorical(sub, filtered, axis=-1).astype(jnp.int32)
            # A finished row keeps emitting EOS (cheaper than ragged batches; cut off on the host).
            tok_B = jnp.where(done_B, max(eos_id, 0), tok_B)
            # Log-probabilities under the model itself (before penalty, temperature and truncation).
            lp_B = jnp.take_along_axis(jax.nn.log_softmax(raw_BV, axis=-1), tok_B[:, None], axis=-1)[:, 0]
            tokens_BT = tokens_BT.at[:, t].set(tok_B)
            logprobs_BT = logprobs_BT.at[:, t].set(lp_B)
            if stream:
                jax.debug.callback(_emit, tok_B, ordered=True)
            seen_BV = seen_BV.at[jnp.arange(b), tok_B].set(True)
            done_B = done_B | (tok_B == eos_id)
            if megakernel:
                logits_BV, cache = _megakernel_decode(model, mk, tok_B, cache, l + t, megakernel)
            else:
                logits_BV, cache = model.decode(tok_B, cache, pos=l + t, start=start_B)
            return t + 1, logits_BV, cache, key, seen_BV, done_B, tokens_BT, logprobs_BT

        def body(carry):
            for _ in range(unroll):  # t advances by `unroll` per iteration and `unroll` divides T
                carry = step(carry)
            return carry

        carry = (
            jnp.int32(0),
            logits_BV,
            cache,
            key,
            seen_BV,
            jnp.zeros((b,), bool),
            jnp.zeros((b, T), jnp.int32),
            jnp.zeros((b, T), jnp.float32),
        )
        out = jax.lax.while_loop(cond, body, carry)
        return out[6], out[7], out[0]

    return jax.jit(run, compiler_options=dict(compiler_options) or None)
