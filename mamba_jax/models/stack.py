"""The stack of layers: a pattern string cut into segments of a repeated unit, each applied with `scan`.

Unrolled, a 64-layer model is 64 copies of the layer in the compiled program (minutes of XLA compile
time); scanned, it is one. Hybrid patterns are not one repeated layer, so the pattern is cut greedily into
segments `unit × reps` that cover the most layers (Nemotron-H 8B: "M-" × 3, "M*-M-M-M-M-" × 4, "M-" × 1),
and each segment keeps its parameters stacked on a leading "layers" axis (MaxText's scanned layers; the
axis pipeline parallelism will split). A segment of one repetition is plain, unstacked layers.
`scan_layers=False` makes every layer its own segment.

Dimension key: B batch, L length, D model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.layers.norms import RMSNorm
from mamba_jax.layers.registry import LAYERS
from mamba_jax.models.config import ModelConfig
from mamba_jax.ops import fp8
from mamba_jax.parallel.sharding import constrain

# The residual stream between blocks: its length may be sharded over more than `sequence` (Megatron's
# sequence parallelism over `tensor` too, `mamba_jax.parallel.sharding.tensor_sequence_parallel`).
ACT_BLD = ("batch", "act_length", "act_embed")
MAX_UNIT = 16

# Activation checkpointing per block. "full" keeps only each block's input; "selective" also keeps the
# outputs of the input projections (the expensive matmuls, tagged "proj_in" in the layers) and recomputes
# the rest: conv, SSD scan, attention core, norms and activations.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "selective": jax.checkpoint_policies.save_only_these_names("proj_in"),
}


def segment_pattern(pattern: str, scan: bool = True, max_unit: int = MAX_UNIT) -> list[tuple[str, int]]:
    """Cut a pattern into (unit, reps): at each position the unit whose repetitions cover most layers
    (ties: the shorter unit); a position where nothing repeats becomes a single layer."""
    if not scan:
        return [(s, 1) for s in pattern]
    out, i = [], 0
    while i < len(pattern):
        best_unit, best_reps = pattern[i], 1
        for n in range(1, min(max_unit, len(pattern) - i) + 1):
            unit, reps = pattern[i : i + n], 1
            while pattern[i + reps * n : i + (reps + 1) * n] == unit:
                reps += 1
            if reps > 1 and reps * n > best_reps * len(best_unit):
                best_unit, best_reps = unit, reps
        if out and best_reps == 1 and out[-1][1] == 1 and len(out[-1][0]) < max_unit:
            out[-1] = (out[-1][0] + best_unit, 1)  # merge runs of singletons into one unrolled unit
        else:
            out.append((best_unit, best_reps))
        i += best_reps * len(best_unit)
    return out


class Block(nnx.Module):
    """Pre-norm residual layer around one mixer: x + mixer(RMSNorm(x))."""

    def __init__(self, cfg: ModelConfig, symbol: str, *, rngs: nnx.Rngs):
        self.symbol = symbol
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.mixer = LAYERS[symbol](cfg, 0, rngs=rngs)
        # True once `fold_norm_weights` moved the norm's weight into the mixer's in_proj (the norm is then
        # ones): a fused Mamba decode takes the raw input and the norm's 1/rms instead of the normed input.
        self.norm_folded = False

    def __call__(self, h_BLD, *, seq_idx=None, positions=None, key=None):
        out = self.mixer(self.norm(h_BLD), seq_idx=seq_idx, positions=positions, key=key)
        return h_BLD + out.astype(h_BLD.dtype)

    def prefill(self, h_BLD, *, seq_idx, positions, cache_len):
        out, cache = self.mixer.prefill(self.norm(h_BLD), seq_idx=seq_idx, positions=positions, cache_len=cache_len)
        return h_BLD + out.astype(h_BLD.dtype), cache

    def decode(self, stream, cache, *, pos, start):
        """One token: `stream` is (the residual stream (B, D), the same rounded to the compute dtype, which
        the next block's fused in_proj reads); returns the stream after this block and the cache."""
        h_BD, hc_BD = stream
        if self.norm_folded and self.mixer._decode_kernel():  # the mixer normalises and adds the residual
            return self.mixer._decode_fused(h_BD, cache, pos, residual_BD=h_BD, compute_BD=hc_BD)
        out, cache = self.mixer.decode(self.norm(h_BD), cache, pos=pos, start=start)
        h_BD = h_BD + out.astype(h_BD.dtype)
        return (h_BD, h_BD.astype(hc_BD.dtype)), cache  # (XLA fuses the cast into the add; unused: dropped)


def _remat_block(block, h_BLD, seq_idx, positions, key, remat: str, fp8_flag=None):
    """The block under jax.checkpoint, as a function of its state (plain JAX rather than nnx.remat, so that
    frozen and trained parameters may come from different traces, as under LoRA). A traced fp8 flag is an
    argument (the recomputation reads it), a Python one stays static."""
    graphdef, state = nnx.split(block)
    static = fp8_flag is None or isinstance(fp8_flag, bool)

    def run(state, h, seq_idx, positions, key, flag):
        with fp8.fp8_scope(fp8_flag if static else flag):
            return nnx.merge(graphdef, state)(h, seq_idx=seq_idx, positions=positions, key=key)

    flag = None if static else fp8_flag
    return jax.checkpoint(run, policy=REMAT_POLICIES[remat])(state, h_BLD, seq_idx, positions, key, flag)


def _fp8_flag(index, fp8_layers):
    """Whether layer `index` runs its projections in fp8 — a Python bool for an int index, a traced one inside
    a scan: fp8_layers is the half-open range (first, end) of such layers, or None (no fp8)."""
    if fp8_layers is None:
        return None
    lo, hi = fp8_layers
    return (index >= lo) & (index < hi)


class Unit(nnx.Module):
    """The layers of one repetition of a segment's unit, applied in order."""

    def __init__(self, cfg: ModelConfig, unit: str, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, s, rngs=rngs) for s in unit])

    def __call__(self, h_BLD, seq_idx, positions, remat: str, remat_layers: str, key=None, layer0=0, fp8_layers=None):
        for i, block in enumerate(self.blocks):
            k = None if key is None else jax.random.fold_in(key, i)
            flag = _fp8_flag(layer0 + i, fp8_layers)  # `layer0`: this unit's first layer in the model
            if remat != "none" and block.symbol in remat_layers:
                h_BLD = _remat_block(block, h_BLD, seq_idx, positions, k, remat, flag)
            else:
                with fp8.fp8_scope(flag):
                    h_BLD = block(h_BLD, seq_idx=seq_idx, positions=positions, key=k)
            h_BLD = constrain(h_BLD, ACT_BLD)
        return h_BLD

    def prefill(self, h_BLD, seq_idx, positions, cache_len):
        caches = []
        for block in self.blocks:
            h_BLD, cache = block.prefill(h_BLD, seq_idx=seq_idx, positions=positions, cache_len=cache_len)
            caches.append(cache)
        return h_BLD, tuple(caches)

    def decode(self, stream, caches, pos, start):
        new = []
        for block, cache in zip(self.blocks, caches, strict=True):
            stream, cache = block.decode(stream, cache, pos=pos, start=start)
            new.append(cache)
        return stream, tuple(new)


class Segment(nnx.Module):
    """`reps` repetitions of a unit; parameters stacked on a leading "layers" axis when reps > 1."""

    def __init__(self, cfg: ModelConfig, unit: str, reps: int, *, rngs: nnx.Rngs):
        self.unit, self.reps = unit, reps
        if reps == 1:
            self.layers = Unit(cfg, unit, rngs=rngs)
            return

        @nnx.split_rngs(splits=reps)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return Unit(cfg, unit, rngs=rngs)

        self.layers = make(rngs)

    @property
    def unrolled(self) -> bool:
        """True once `unstack_layers` gave every repetition its own Unit (a list rather than one stacked Unit)."""
        return isinstance(self.layers, nnx.List)

    def __call__(self, h_BLD, seq_idx, positions, remat: str, remat_layers: str, key=None, layer0=0, fp8_layers=None):
        n = len(self.unit)
        if self.reps == 1:
            return self.layers(h_BLD, seq_idx, positions, remat, remat_layers, key, layer0, fp8_layers)
        if self.unrolled:
            for r, unit in enumerate(self.layers):
                k = None if key is None else jax.random.fold_in(key, r)
                h_BLD = unit(h_BLD, seq_idx, positions, remat, remat_layers, k, layer0 + r * n, fp8_layers)
            return h_BLD

        # A plain lax.scan over the stacked state (rather than nnx.scan), so that the model also works when
        # closed over by a user's jax.jit.
        graphdef, state = nnx.split(self.layers)

        keys = None if key is None else jax.random.split(key, self.reps)

        def body(h, xs):
            unit_state, k, r = xs
            unit = nnx.merge(graphdef, unit_state)
            return unit(h, seq_idx, positions, remat, remat_layers, k, layer0 + r * n, fp8_layers), None

        return jax.lax.scan(body, h_BLD, (state, keys, jnp.arange(self.reps)))[0]

    def prefill(self, h_BLD, seq_idx, positions, cache_len):
        """Forward that also returns this segment's caches (stacked on a leading axis when scanned)."""
        if self.reps == 1:
            return self.layers.prefill(h_BLD, seq_idx, positions, cache_len)
        if self.unrolled:
            caches = []
            for unit in self.layers:
                h_BLD, cache = unit.prefill(h_BLD, seq_idx, positions, cache_len)
                caches.append(cache)
            return h_BLD, tuple(caches)
        graphdef, state = nnx.split(self.layers)

        def body(h, unit_state):
            return nnx.merge(graphdef, unit_state).prefill(h, seq_idx, positions, cache_len)

        return jax.lax.scan(body, h_BLD, state)

    def decode(self, stream, caches, pos, start):
        if self.reps == 1:
            return self.layers.decode(stream, caches, pos, start)
        if self.unrolled:
            new = []
            for unit, cache in zip(self.layers, caches, strict=True):
                stream, cache = unit.decode(stream, cache, pos, start)
                new.append(cache)
            return stream, tuple(new)
        graphdef, state = nnx.split(self.layers)

        def body(h, xs):
            unit_state, unit_caches = xs
            return nnx.merge(graphdef, unit_state).decode(h, unit_caches, pos, start)

        return jax.lax.scan(body, stream, (state, caches))


def layer_mixers(model):
    """(mixer, leading stacked axes of its weights: 1 in a scanned segment, else 0) of every layer, in order,
    for a model as built or as `unstack_layers` made it."""
    for segment in model.layers.segments:
        lead = int(segment.reps > 1 and not segment.unrolled)
        for unit in segment.layers if segment.unrolled else [segment.layers]:
            for block in unit.blocks:
                yield block.mixer, lead


def unstack_layers(model):
    """A view of `model` for decoding whose scanned segments hold one Unit per repetition.

    A decode step is memory-bound: it reads every weight once. Under `scan` each layer's weights are a
    dynamic slice of the stacked arrays, which XLA copies before the matmul (measured on an H100: 3.4 of
    7.4 ms per Mamba2-2.7B token), and the stacked caches are rebuilt every step. Sliced once here, every
    layer's weights are their own buffers and its cache is updated in place. The slices are new arrays (the
    layers' weights exist twice while `model` is alive too); embeddings, norms and the head are shared.
    """
    model = nnx.clone(model)  # new module objects around the same arrays
    for segment in model.layers.segments:
        if segment.reps == 1 or segment.unrolled:
            continue
        graphdef, state = nnx.split(segment.layers)
        segment.layers = nnx.List(
            [nnx.merge(graphdef, jax.tree.map(lambda a, r=r: a[r], state)) for r in range(segment.reps)]
        )
    return model


class LayerStack(nnx.Module):
    """All layers of a model, as segments (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.plan = tuple(segment_pattern(cfg.pattern, cfg.scan_layers))
        self.segments = nnx.List([Segment(cfg, unit, reps, rngs=rngs) for unit, reps in self.plan])

    def __call__(
        self, h_BLD, *, seq_idx=None, positions=None, remat="none", remat_layers="M*-", key=None, fp8_layers=None
    ):
        """`fp8_layers` (first, end): the layers whose projections run in fp8 (training; mamba_jax.ops.fp8)."""
        layer0 = 0
        for i, segment in enumerate(self.segments):
            k = None if key is None else jax.random.fold_in(key, i)
            h_BLD = segment(h_BLD, seq_idx, positions, remat, remat_layers, k, layer0, fp8_layers)
            layer0 += segment.reps * len(segment.unit)
        return h_BLD

    def prefill(self, h_BLD, *, seq_idx, positions, cache_len):
        caches = []
        for segment in self.segments:
            h_BLD, cache = segment.prefill(h_BLD, seq_idx, positions, cache_len)
            caches.append(cache)
        return h_BLD, tuple(caches)

    def decode(self, stream, caches, *, pos, start):
        """One token through every layer; `stream` as `Block.decode` takes it."""
        new = []
        for segment, cache in zip(self.segments, caches, strict=True):
            stream, cache = segment.decode(stream, cache, pos, start)
            new.append(cache)
        return stream, tuple(new)

    def locate(self, layer: int) -> tuple[int, int | None, int]:
        """Where layer `layer` lives: (segment, repetition or None when unstacked, position in the unit)."""
        start = 0
        for s, (unit, reps) in enumerate(self.plan):
            if layer < start + reps * len(unit):
                r, k = divmod(layer - start, len(unit))
                return s, (r if reps > 1 else None), k
            start += reps * len(unit)
        raise IndexError(f"layer {layer} of a {start}-layer model")

    def block(self, layer: int) -> Block:
        """The Block object of a layer; for a stacked segment its parameters carry the leading layers axis
        (index them with the repetition from `locate`)."""
        s, _, k = self.locate(layer)
        return self.segments[s].layers.blocks[k]
