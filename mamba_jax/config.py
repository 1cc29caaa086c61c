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

from mamba_jax.models.config import ModelConfig
from mamba_jax.parallel.sharding import DEFAULT_RULES, MeshConfig

VARIANTS = ("pretrain", "finetune")
# Variants whose machinery is built; the others fail with a clear message until they are.
AVAILABLE_VARIANTS = ("pretrain",)

_MISSING = dataclasses.MISSING


def _section(cls) -> ConfigDict:
    """A ConfigDict with every field of a dataclass: its default, or a typed placeholder."""
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = None
        if default is None:
            kind = {"pattern": str}.get(f.name, int)
            fields[f.name] = config_dict.placeholder(kind)
        else:
            fields[f.name] = default
    return ConfigDict(fields)


def base_config() -> ConfigDict:
    """Defaults shared by every recipe; a recipe sets the model fields and what differs."""
    c = ConfigDict()
    c.name = config_dict.placeholder(str)
    c.variant = "pretrain"
    c.model = _section(ModelConfig)
    c.mesh = ConfigDict(dataclasses.asdict(MeshConfig()))
    # logical axis → mesh axes (see mamba_jax.parallel.sharding); a recipe may override the table.
    c.sharding_rules = DEFAULT_RULES
    return c


def parse_variant(arg: str | None) -> str:
    variant = (arg or "pretrain").strip()
    if variant.startswith("variant="):
        variant = variant.removeprefix("variant=")
    if variant not in VARIANTS:
        raise ValueError(f"unknown recipe variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    if variant not in AVAILABLE_VARIANTS:
        raise ValueError(
            f"the {variant!r} variant is not available in this version; available: {', '.join(AVAILABLE_VARIANTS)}."
        )
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
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in c.sharding_rules)
