"""Hugging Face interop and loading pretrained models: `from_pretrained`, `export_hf`, and the pieces behind
`python -m mamba_jax.convert` (Hugging Face Mamba2 / Nemotron-H directories ↔ mamba_jax checkpoints)."""

from mamba_jax.interop.errors import ConversionError
from mamba_jax.interop.hf_checkpoint import export_hf, load_hf
from mamba_jax.interop.hf_config import config_from_hf, config_to_hf
from mamba_jax.interop.native import load_native, save_native
from mamba_jax.interop.pretrained import from_pretrained

__all__ = [
    "ConversionError",
    "config_from_hf",
    "config_to_hf",
    "export_hf",
    "from_pretrained",
    "load_hf",
    "load_native",
    "save_native",
]
