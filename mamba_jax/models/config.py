"""The typed model configuration the library consumes, with the checks that make bad configs fail early.

A model is a string of layer symbols (`M` Mamba2 mixer, `*` self-attention, `-` MLP; see
`mamba_jax.layers.registry`), each layer pre-norm with a residual, then a final RMSNorm and the LM head.
Field names and defaults follow shared/docs/REFERENCE.md (Megatron / NeMo hybrid models); the experiment
files in `experiments/` fill them from a ConfigDict through `ModelConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from mamba_jax.schema import from_mapping

ACTIVATIONS = ("relu2", "gelu", "swiglu", "silu")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A model configuration that cannot be built; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Overall shape.
    pattern: str  # one symbol per layer, e.g. "M-M*-"; pure Mamba2 is "M" * n_layers
    d_model: int
    vocab_size: int  # the tokenizer's vocabulary
    vocab_multiple: int = 16  # embedding rows padded to a multiple of this (Megatron: divisor × TP)
    tie_embeddings: bool = False
    residual_in_fp32: bool = False
    norm_eps: float = 1e-5

    # Mamba2 mixer.
    mamba_d_state: int = 128
    mamba_head_dim: int = 64
    mamba_num_heads: int | None = None  # default: mamba_expand · d_model / mamba_head_dim
    mamba_expand: int = 2
    mamba_num_groups: int = 1
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 256
    mamba_dt_min: float = 0.001
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4
    mamba_dt_limit: tuple[float, float] = (0.0, math.inf)
    mamba_A_init_range: tuple[float, float] = (1.0, 16.0)
    # Gated RMSNorm over each group of d_inner / groups channels (Megatron, mamba_ssm, Nemotron-H) or
    # over all of d_inner at once (Hugging Face Mamba2; identical when groups = 1).
    mamba_norm_per_group: bool = True
    ssd_impl: str = "auto"
    # One-token decode of a Mamba block: "pallas" (the fused kernels of mamba_jax.kernels.decode: three
    # launches per block, interpret mode off the GPU), "xla", or "auto" (the kernels on a GPU, unsharded).
    decode_impl: str = "auto"

    # Self-attention.
    attn_num_heads: int = 0
    attn_num_kv_heads: int = 0
    attn_head_dim: int = 128
    attn_rope: bool = False  # NoPE by default, as in every hybrid of the references
    attn_rope_theta: float = 10000.0
    attn_impl: str = "auto"  # "cudnn" on GPU, "xla" elsewhere

    # MLP.
    ffn_hidden_size: int = 0
    mlp_activation: str = "relu2"

    # Compile the layer stack as scanned segments of a repeated unit (one copy of each unit in the program)
    # rather than one copy per layer; parameters of a segment are stacked on a leading axis.
    scan_layers: bool = True

    # Initialisation and numerics.
    init_std: float = 0.02
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master weights

    def __post_init__(self):
        # Lists arrive from ConfigDicts and JSON; keep the dataclass hashable.
        for name in ("mamba_dt_limit", "mamba_A_init_range"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        self.validate()

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping (ConfigDict, JSON); unknown keys fail with the nearest valid name."""
        return from_mapping(cls, d, error=ConfigError)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.pattern)

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def mamba_heads(self) -> int:
        if self.mamba_num_heads is not None:
            return self.mamba_num_heads
        return self.mamba_expand * self.d_model // self.mamba_head_dim

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.mamba_num_groups * self.mamba_d_state

    def count(self, symbol: str) -> int:
        return self.pattern.count(symbol)

    # ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        from mamba_jax.layers.registry import LAYERS  # the registry knows the symbols

        def fail(msg):
            raise ConfigError(msg)

        if not self.pattern:
            fail("pattern is empty: give one symbol per layer, e.g. 'M-M*-' (M Mamba2, * attention, - MLP).")
        bad = sorted({s for s in self.pattern if s not in LAYERS})
        if bad:
            fail(
                f"pattern {self.pattern!r} has unknown layer symbol(s) {bad}; "
                f"known symbols: {', '.join(f'{k!r} ({v.__name__})' for k, v in LAYERS.items())}."
            )
        for name in ("d_model", "vocab_size", "vocab_multiple"):
            if getattr(self, name) <= 0:
                fail(f"{name} must be positive, got {getattr(self, name)}.")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                fail(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}.")
        if "M" in self.pattern:
            self._validate_mamba(fail)
        if "*" in self.pattern:
            self._validate_attention(fail)
        if "-" in self.pattern:
            if self.ffn_hidden_size <= 0:
                fail("the pattern has MLP layers ('-') but ffn_hidden_size is not set (> 0).")
            if self.mlp_activation not in ACTIVATIONS:
                fail(f"mlp_activation must be one of {ACTIVATIONS}, got {self.mlp_activation!r}.")

    def _validate_mamba(self, fail) -> None:
        if self.mamba_num_heads is None and (self.mamba_expand * self.d_model) % self.mamba_head_dim:
            fail(
                f"mamba_expand · d_model = {self.mamba_expand * self.d_model} is not a multiple of "
                f"mamba_head_dim = {self.mamba_head_dim}; set mamba_num_heads explicitly or change the head dim."
            )
        h, g = self.mamba_heads, self.mamba_num_groups
        if h <= 0 or g <= 0:
            fail(f"mamba heads ({h}) and groups ({g}) must be positive.")
        if h % g:
            fail(f"mamba heads ({h}) must be a multiple of mamba_num_groups ({g}); pick groups dividing {h}.")
        if self.mamba_chunk_size <= 0:
            fail(f"mamba_chunk_size must be positive, got {self.mamba_chunk_size}.")
        if self.mamba_d_conv < 1:
            fail(f"mamba_d_conv must be at least 1, got {self.mamba_d_conv}.")
        lo, hi = self.mamba_dt_limit
        if not 0.0 <= lo < hi:
            fail(f"mamba_dt_limit must be (min, max) with 0 ≤ min < max, got {self.mamba_dt_limit}.")
        if self.ssd_impl not in ("auto", "xla", "pallas"):
            fail(f"ssd_impl must be 'auto', 'xla' or 'pallas', got {self.ssd_impl!r}.")
        if self.decode_impl not in ("auto", "xla", "pallas"):
            fail(f"decode_impl must be 'auto', 'xla' or 'pallas', got {self.decode_impl!r}.")

    def _validate_attention(self, fail) -> None:
        hq, hkv = self.attn_num_heads, self.attn_num_kv_heads
        if hq <= 0 or hkv <= 0:
            fail("the pattern has attention layers ('*') but attn_num_heads / attn_num_kv_heads are not set (> 0).")
        if hq % hkv:
            fail(f"attn_num_heads ({hq}) must be a multiple of attn_num_kv_heads ({hkv}) for grouped-query attention.")
        if self.attn_rope and self.attn_head_dim % 2:
            fail(f"RoPE needs an even attn_head_dim, got {self.attn_head_dim}.")
        if self.attn_impl not in ("auto", "xla", "cudnn"):
            fail(f"attn_impl must be 'auto', 'xla' or 'cudnn', got {self.attn_impl!r}.")

    def validate_tensor_parallel(self, tp: int) -> None:
        """Raise if the model cannot be split over `tp` tensor-parallel shards (Megatron's layout)."""
        if tp <= 1:
            return
        problems = []
        if "M" in self.pattern:
            if self.mamba_num_groups % tp:
                problems.append(
                    f"mamba_num_groups ({self.mamba_num_groups}) is not divisible by tensor={tp}: each shard must "
                    f"hold whole B/C groups (pure Mamba2 models with 1 group train with tensor=1; "
                    f"use data or fsdp parallelism instead)"
                )
            if self.mamba_heads % tp:
                problems.append(f"mamba heads ({self.mamba_heads}) are not divisible by tensor={tp}")
        if "*" in self.pattern:
            if self.attn_num_heads % tp:
                problems.append(f"attn_num_heads ({self.attn_num_heads}) is not divisible by tensor={tp}")
            if self.attn_num_kv_heads % tp:
                problems.append(f"attn_num_kv_heads ({self.attn_num_kv_heads}) is not divisible by tensor={tp}")
        if "-" in self.pattern and self.ffn_hidden_size % tp:
            problems.append(f"ffn_hidden_size ({self.ffn_hidden_size}) is not divisible by tensor={tp}")
        if self.padded_vocab_size % tp:
            problems.append(
                f"the padded vocabulary ({self.padded_vocab_size}) is not divisible by tensor={tp}; "
                f"set vocab_multiple to a multiple of {tp}"
            )
        if problems:
            raise ConfigError(
                "cannot split this model over the tensor-parallel axis: " + "; ".join(problems) + ". "
                "Choose a tensor size that divides them (mesh.tensor) or change the model."
            )
