"""`from_pretrained`: one entry point for a Hugging Face model directory or a mamba_jax checkpoint.

A path is a mamba_jax checkpoint when it is a training work directory (holding checkpoints/), its checkpoints/
folder, or one checkpoints/<step> folder (mamba_jax/interop/native.py); otherwise it must be a Hugging Face
directory of a Mamba2 or Nemotron-H model (mamba_jax/interop/hf_checkpoint.py). Either way the result is a
LanguageModel, with every parameter placed into its shards on `mesh` when one is given.
"""

from __future__ import annotations

import os

from mamba_jax.interop.errors import ConversionError
from mamba_jax.interop.hf_checkpoint import is_hf_dir, load_hf
from mamba_jax.interop.native import find_checkpoint, load_native
from mamba_jax.models.lm import LanguageModel


def from_pretrained(
    path: str | os.PathLike,
    *,
    mesh=None,
    dtype: str | None = None,
    param_dtype: str | None = None,
    rules=None,
) -> LanguageModel:
    """A ready LanguageModel: `model(input_ids (B, L) int32) → logits (B, L, V) float32`.

    path: a Hugging Face directory (config.json + *.safetensors of Mamba2ForCausalLM / NemotronHForCausalLM)
      or a mamba_jax checkpoint (a training work directory → its newest checkpoint, or a checkpoint step dir).
    mesh: a mesh from `mamba_jax.parallel.make_mesh`; each weight is placed directly with its sharding (with
      `rules`, default `DEFAULT_RULES`). Default: the first device.
    dtype: the compute dtype ("float32", "bfloat16", "float16"); default: the checkpoint's (a Hugging Face
      config's `dtype` / `torch_dtype`, a mamba_jax checkpoint's model config).
    param_dtype: the parameters' dtype; default float32 for Hugging Face weights (training's master weights),
      the saved one for mamba_jax checkpoints.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConversionError(f"{path} does not exist; give a Hugging Face model directory or a mamba_jax checkpoint.")
    if os.path.isdir(path) and find_checkpoint(path) is not None:
        return load_native(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, rules=rules)[0]
    if os.path.isdir(path) and is_hf_dir(path):
        return load_hf(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, rules=rules)[0]
    raise ConversionError(
        f"{path} is not a supported model: expected a Hugging Face directory (config.json with model_type "
        f"'mamba2' or 'nemotron_h', and *.safetensors weights) or a mamba_jax checkpoint (a training work "
        f"directory, its checkpoints/ folder, or one checkpoints/<step> folder)."
    )
