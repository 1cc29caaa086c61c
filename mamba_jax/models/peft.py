"""Parameter-efficient fine-tuning: LoRA adapters (Hu et al. 2021) and prompt / p-tuning (Lester et al. 2021;
Liu et al. 2021), as NeMo offers them for transformers — here also on the Mamba projections, which NeMo lacks.

LoRA attaches to a projection W (in axes → out axes) two `nnx.LoRAParam`s, A (in axes…, r) and B (r, out
axes…), B zero so that training starts from the base model; the layers add scale · (dropout(x) · A) · B,
scale = alpha / r (`mamba_jax.layers.base.linear`). Targets are projection names: in_proj / out_proj (Mamba2),
q_proj / k_proj / v_proj / o_proj (attention), up_proj / gate_proj / down_proj (MLP). Adapters follow the
layer stack, so a scanned segment's adapters are stacked on its leading axis too, and their logical axes are
the weight's (B shards like W's output under tensor parallelism). `merge_lora` folds them into W for export.

Prompt tuning learns `num_virtual_tokens` input embeddings placed before each sequence; p-tuning produces
them from an MLP over learned embeddings (the reparametrisation of Liu et al.). Both are `PromptParam`s on
the model; nothing else trains.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.layers.base import LORA_DROPOUT, LORA_SCALE, PROJ_IN_AXES, lora_names, normal
from mamba_jax.models.stack import layer_mixers
from mamba_jax.schema import from_mapping

METHODS = ("none", "lora", "prompt", "ptuning")
LORA_IN_AXES = PROJ_IN_AXES  # the targets: projection names, with their contracted axes
DEFAULT_TARGETS = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


class PromptParam(nnx.Param):
    """Virtual-token parameters of prompt / p-tuning (the only trainable ones then)."""


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    method: str = "none"  # none (full fine-tuning / pretraining), lora, prompt, ptuning
    lora_rank: int = 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    num_virtual_tokens: int = 20
    ptuning_hidden: int = 512

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.method not in METHODS:
            raise ValueError(f"peft.method must be one of {METHODS}, got {self.method!r}.")
        unknown = [t for t in self.lora_targets if t not in LORA_IN_AXES]
        if unknown:
            raise ValueError(
                f"unknown LoRA target(s) {unknown}; targets are projection names: {', '.join(LORA_IN_AXES)}."
            )
        if self.lora_rank < 1 or not 0.0 <= self.lora_dropout < 1.0 or self.num_virtual_tokens < 1:
            raise ValueError("peft needs lora_rank ≥ 1, 0 ≤ lora_dropout < 1 and num_virtual_tokens ≥ 1.")

    @classmethod
    def from_dict(cls, d) -> PeftConfig:
        return from_mapping(cls, d)

    def trainable(self):
        """The nnx filter of the parameters this method trains."""
        return {"lora": nnx.LoRAParam, "prompt": PromptParam, "ptuning": PromptParam}.get(self.method, nnx.Param)


def add_lora(model, cfg: PeftConfig, *, seed: int = 0) -> int:
    """Attach LoRA adapters to the targeted projections of every layer; returns how many were attached."""
    key = jax.random.key(seed)
    attached = 0
    for mixer, lead in layer_mixers(model):
        for name in cfg.lora_targets:
            if not hasattr(mixer, name) or getattr(mixer, name) is None:
                continue
            w = getattr(mixer, name)
            axes = w.get_metadata()["out_sharding"]
            n_in = LORA_IN_AXES[name]
            in_shape, out_shape = w.shape[lead : lead + n_in], w.shape[lead + n_in :]
            in_axes, out_axes = axes[lead : lead + n_in], axes[lead + n_in :]
            stack_shape, stack_axes = w.shape[:lead], axes[:lead]
            fan_in = math.prod(in_shape)
            rngs = nnx.Rngs(params=jax.random.fold_in(key, attached))
            a = normal(rngs, (*stack_shape, *in_shape, cfg.lora_rank), 1.0 / math.sqrt(fan_in), w[...].dtype)
            b = jnp.zeros((*stack_shape, cfg.lora_rank, *out_shape), w[...].dtype)
            a_name, b_name = lora_names(name)
            meta = dict(eager_sharding=False, weight_decay=False)
            setattr(mixer, a_name, nnx.LoRAParam(a, out_sharding=(*stack_axes, *in_axes, None), **meta))
            setattr(mixer, b_name, nnx.LoRAParam(b, out_sharding=(*stack_axes, None, *out_axes), **meta))
            setattr(mixer, LORA_SCALE, cfg.lora_alpha / cfg.lora_rank)
            setattr(mixer, LORA_DROPOUT, cfg.lora_dropout)
            attached += 1
    if attached == 0:
        raise ValueError(
            f"none of the LoRA targets {list(cfg.lora_targets)} exists in this model (pattern "
            f"{model.cfg.pattern!r}); Mamba2 layers have in_proj / out_proj, attention q/k/v/o_proj, MLP up/down_proj."
        )
    return attached


def merge_lora(model) -> None:
    """Fold every adapter into its weight (W += scale · A·B) and remove the adapters, in place."""
    for mixer, lead in layer_mixers(model):
        for name in LORA_IN_AXES:
            a_name, b_name = lora_names(name)
            if not hasattr(mixer, a_name):
                continue
            w = getattr(mixer, name)
            a, b = getattr(mixer, a_name)[...], getattr(mixer, b_name)[...]
            delta = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b) if lead else jnp.tensordot(a, b, axes=1)
            w.set_value(w[...] + (getattr(mixer, LORA_SCALE) * delta).astype(w[...].dtype))
            delattr(mixer, a_name)
            delattr(mixer, b_name)
        for attr in (LORA_SCALE, LORA_DROPOUT):
            if hasattr(mixer, attr):
                delattr(mixer, attr)


class VirtualTokens(nnx.Module):
    """The learned prompt: (num_virtual_tokens, D) embeddings, directly (prompt tuning) or from an MLP
    (p-tuning)."""

    def __init__(self, d_model: int, cfg: PeftConfig, *, rngs: nnx.Rngs, init_from=None):
        n = cfg.num_virtual_tokens
        self.method = cfg.method
        # Start from real token embeddings when given (Lester et al.: better than random).
        base = init_from[:n] if init_from is not None else normal(rngs, (n, d_model), 0.02, jnp.float32)
        self.embed = PromptParam(jnp.asarray(base, jnp.float32), out_sharding=(None, None), eager_sharding=False)
        if cfg.method == "ptuning":
            h = cfg.ptuning_hidden
            self.w1 = PromptParam(normal(rngs, (d_model, h), 1 / math.sqrt(d_model), jnp.float32),
                                  out_sharding=(None, None), eager_sharding=False)  # fmt: skip
            self.w2 = PromptParam(jnp.zeros((h, d_model), jnp.float32), out_sharding=(None, None),
                                  eager_sharding=False)  # fmt: skip

    def __call__(self):
        e = self.embed[...]
        if self.method == "ptuning":  # residual MLP: starts equal to the initial embeddings
            e = e + jax.nn.gelu(e @ self.w1[...]) @ self.w2[...]
        return e


def attach_prompt(model, cfg: PeftConfig, *, seed: int = 0) -> None:
    """Give the model its virtual tokens (initialised from the embeddings of its first vocabulary rows)."""
    init = model.embed[...][: cfg.num_virtual_tokens]
    model.prompt = VirtualTokens(model.cfg.d_model, cfg, rngs=nnx.Rngs(params=seed), init_from=init)


def apply_peft(model, cfg: PeftConfig, *, seed: int = 0) -> None:
    """Add what `cfg.method` trains to a (pretrained) model, in place."""
    if cfg.method == "lora":
        add_lora(model, cfg, seed=seed)
    elif cfg.method in ("prompt", "ptuning"):
        attach_prompt(model, cfg, seed=seed)
