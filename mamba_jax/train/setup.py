"""The model a run trains: built in its shards, started from pretrained weights when `train.init_from` names
them, given what `peft` trains, and split into the trained and the frozen parameters.

Full training (peft.method = none) trains every parameter. LoRA and prompt / p-tuning train only their own
parameters; the base weights stay frozen, are reloaded from `init_from` at every start and are not part of the
checkpoints, which hold the trained parameters and the optimizer alone (the adapter is the checkpoint).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from mamba_jax.models.config import ConfigError, ModelConfig
from mamba_jax.models.peft import PeftConfig, apply_peft
from mamba_jax.parallel.sharding import init_model, state_shardings
from mamba_jax.train.checkpoint import RUNTIME_FIELDS, same_config_value

# The fields that decide which weights exist and their shapes: these must agree with the loaded weights.
SHAPE_FIELDS = (
    "pattern", "d_model", "padded_vocab_size", "tie_embeddings", "mamba_d_state", "mamba_head_dim",
    "mamba_heads", "mamba_num_groups", "mamba_d_conv", "attn_num_heads", "attn_num_kv_heads", "attn_head_dim",
    "ffn_hidden_size", "scan_layers",
)  # fmt: skip
# Fields that only shape the random initialisation: irrelevant once weights are loaded.
INIT_ONLY_FIELDS = {"init_std", "mamba_dt_min", "mamba_dt_max", "mamba_dt_init_floor", "mamba_A_init_range"}


@dataclasses.dataclass
class TrainModel:
    graphdef: nnx.GraphDef
    trainable: nnx.State
    frozen: nnx.State
    n_params: int
    n_trainable: int


def _count(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def load_pretrained_into(model, path: str, *, mesh, rules) -> None:
    """Copy the weights at `path` (mamba_jax checkpoint or Hugging Face dir) into `model`, checking they fit."""
    from mamba_jax.interop import from_pretrained

    source = from_pretrained(path, mesh=mesh, rules=rules, param_dtype=model.cfg.param_dtype)
    mine, theirs = model.cfg, source.cfg
    diff = [
        f"{k}: {getattr(theirs, k)!r} (weights) vs {getattr(mine, k)!r} (recipe)"
        for k in SHAPE_FIELDS
        if not same_config_value(getattr(mine, k), getattr(theirs, k))
    ]
    if diff:
        raise ConfigError(
            f"train.init_from {path} holds a different model: {'; '.join(diff)}. Use the recipe of that model "
            f"(or override those model fields to match)."
        )
    # Other fields (dt limit, norm grouping, chunk size …) are the recipe's to decide: say where they differ.
    others = [
        k
        for k in mine.to_dict()
        if k not in SHAPE_FIELDS
        and k not in RUNTIME_FIELDS
        and not same_config_value(getattr(mine, k), getattr(theirs, k))
        and k not in INIT_ONLY_FIELDS
    ]
    if others and jax.process_index() == 0:
        print(
            f"note: the recipe's {', '.join(f'{k}={getattr(mine, k)!r}' for k in others)} replace the checkpoint's "
            f"{', '.join(repr(getattr(theirs, k)) for k in others)}",
            flush=True,
        )
    nnx.update(model, nnx.state(source))


def build(model_cfg: ModelConfig, peft: PeftConfig, *, init_from: str, seed: int, mesh, rules) -> TrainModel:
    if peft.method in ("lora", "prompt", "ptuning") and not init_from:
        raise ConfigError(
            f"peft.method={peft.method!r} trains adapters on top of a pretrained model: set train.init_from to a "
            f"mamba_jax checkpoint or a Hugging Face directory."
        )
    model = init_model(model_cfg, mesh=mesh, rules=rules, seed=seed)
    if init_from:
        load_pretrained_into(model, init_from, mesh=mesh, rules=rules)
    apply_peft(model, peft, seed=seed)
    graphdef, trainable, frozen = nnx.split(model, peft.trainable(), ...)
    # Adapters and prompts were made after the sharded init: place them (a no-op for everything else).
    trainable = jax.device_put(trainable, state_shardings(trainable, mesh, rules))
    frozen = jax.device_put(frozen, state_shardings(frozen, mesh, rules))
    n_trainable = _count(trainable)
    return TrainModel(graphdef, trainable, frozen, n_trainable + _count(frozen), n_trainable)
