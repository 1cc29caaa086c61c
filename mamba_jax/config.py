"""Experiment configuration: the base ConfigDict every recipe in `experiments/` starts from, loading a
recipe by path with its variant, and the conversion to typed dataclasses at the library boundary.

A recipe is a Python file with `get_config(arg=None)` returning a locked ConfigDict (big_vision's
convention); `arg` names the variant (`pretrain`, the default, or `finetune`). Library code never reads a
ConfigDict: `model_config(c)` and `mesh_config(c)` turn its sections into frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from ml_collections import ConfigDict, config_dict

from mamba_jax.data.pipeline import DataConfig
from mamba_jax.models.config import ModelConfig
from mamba_jax.models.peft import PeftConfig
from mamba_jax.parallel.sharding import DEFAULT_RULES, MeshConfig, tensor_sequence_parallel
from mamba_jax.train.config import CheckpointConfig, CorpusConfig, OptimConfig, TrainConfig

# pretrain: NeMo's pretraining recipe; finetune: SQuAD-style SFT with LoRA (rank 32, alpha 32) on every
# projection; finetune_full: the same data, every weight trained.
VARIANTS = ("pretrain", "finetune", "finetune_full")

_MISSING = dataclasses.MISSING


def _placeholder_type(annotation: str):
    for name, kind in (("tuple", tuple), ("str", str), ("float", float), ("int", int), ("bool", bool)):
        if name in str(annotation):
            return kind
    return object


def _section(cls) -> ConfigDict:
    """A ConfigDict with every field of a config dataclass: its default, or a typed placeholder for None."""
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = None
        fields[f.name] = config_dict.placeholder(_placeholder_type(f.type)) if default is None else default
    return ConfigDict(fields)


def base_config() -> ConfigDict:
    """Defaults shared by every recipe; a recipe sets the model fields and what differs."""
    c = ConfigDict()
    c.name = config_dict.placeholder(str)
    c.variant = "pretrain"
    c.model = _section(ModelConfig)
    c.train = _section(TrainConfig)
    c.optim = _section(OptimConfig)
    c.checkpoint = _section(CheckpointConfig)
    c.data = _section(DataConfig)
    c.corpus = _section(CorpusConfig)  # raw text to tokenize before training (optional)
    c.peft = _section(PeftConfig)  # what fine-tuning trains: everything, LoRA adapters or a prompt
    c.mesh = ConfigDict(dataclasses.asdict(MeshConfig()))
    # logical axis → mesh axes (see mamba_jax.parallel.sharding); a recipe may override the table.
    c.sharding_rules = DEFAULT_RULES
    return c


def state_spaces_mamba2(c: ConfigDict, *, d_model: int, n_layers: int) -> None:
    """The state-spaces Mamba2 family (130M–2.7B): pure Mamba2 layers, GPT-NeoX vocabulary padded to ×16,
    tied embeddings, float32 residual stream, chunk 256, one group (mamba_ssm's MambaLMHeadModel)."""
    c.model.update(
        pattern="M" * n_layers,
        d_model=d_model,
        vocab_size=50277,
        vocab_multiple=16,
        tie_embeddings=True,
        residual_in_fp32=True,
        mamba_chunk_size=256,
    )


def nemo_recipe(c: ConfigDict, *, seq_len: int, global_batch_size: int) -> None:
    """The NeMo recipe of `c.variant`: pretraining at (seq_len, global_batch_size), or fine-tuning."""
    if c.variant == "pretrain":
        nemo_pretrain(c, seq_len=seq_len, global_batch_size=global_batch_size)
    else:
        nemo_finetune(c, full=c.variant == "finetune_full")


def nemo_finetune(c: ConfigDict, *, full: bool) -> None:
    """NeMo's SQuAD fine-tuning recipe (shared/docs/REFERENCE.md): the prompt template, EOS, no BOS, loss on the
    answer only, 5 % of the examples held out; lr 1e-4 for LoRA (5e-6 for full fine-tuning), 50 warm-up steps,
    cosine to 0. Give the data, its tokenizer and the starting weights on the command line:

      --config.data.paths='("squad_train.jsonl",)' --config.data.tokenizer=TOKENIZER --config.train.init_from=PATH
    """
    c.data.update(kind="sft", seq_len=2048, eval_fraction=0.05)
    c.model.dtype = "bfloat16"
    c.peft.update(method="none" if full else "lora", lora_rank=32, lora_alpha=32.0)
    c.train.update(
        steps=1000,
        global_batch_size=32,
        micro_batch_size=None,
        log_every=10,
        eval_every=100,
        eval_batches=16,
        eval_generate=64,
    )
    c.optim.update(lr=5e-6 if full else 1e-4, min_lr=0.0, warmup_steps=50, weight_decay=0.1 if full else 0.0)
    c.checkpoint.update(every_steps=100, keep_last=3)


def nemo_pretrain(c: ConfigDict, *, seq_len: int, global_batch_size: int, micro_batch_size: int = 1) -> None:
    """The NeMo 2 pretraining recipe defaults (shared/docs/REFERENCE.md): mock data, bf16 mixed precision,
    Adam (0.9, 0.95) with weight decay 0.1, lr 3e-4 → 3e-5 cosine after 2000 warm-up steps, clip 1.0."""
    c.data.update(kind="mock", seq_len=seq_len)
    c.model.dtype = "bfloat16"
    c.train.update(
        steps=1_168_251,  # NeMo's max_steps for these recipes; set --config.train.steps for a shorter run
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        log_every=10,
        eval_every=2000,
        eval_batches=32,
    )
    c.optim.update(lr=3e-4, min_lr=3e-5, warmup_steps=2000, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, grad_clip=1.0)
    c.checkpoint.update(every_steps=2000, keep_last=3)


def parse_variant(arg: str | None) -> str:
    variant = (arg or "pretrain").strip()
    if variant.startswith("variant="):
        variant = variant.removeprefix("variant=")
    if variant not in VARIANTS:
        raise ValueError(f"unknown recipe variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    return variant


def load_config(spec: str) -> ConfigDict:
    """Load `path/to/recipe.py[:variant]` and call its `get_config(variant)`."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist (expected experiments/<recipe>.py).")
    name = "mamba_jax_recipe_" + os.path.splitext(os.path.basename(path))[0]
    spec_ = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} defines no get_config(arg) function.")
    return module.get_config(arg or None)


def model_config(c: ConfigDict) -> ModelConfig:
    return ModelConfig.from_dict(c.model)


def mesh_config(c: ConfigDict) -> MeshConfig:
    return MeshConfig.from_dict(c.mesh)


def sharding_rules(c: ConfigDict) -> tuple:
    """The recipe's logical → mesh rules, with Megatron's sequence parallelism where mesh asks for it."""
    rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in c.sharding_rules)
    return tensor_sequence_parallel(rules) if c.mesh.get("tensor_sequence_parallel", False) else rules
