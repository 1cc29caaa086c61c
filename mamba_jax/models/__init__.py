"""Model configuration and the language model assembled from a layer pattern."""

from mamba_jax.models.config import ConfigError, ModelConfig
from mamba_jax.models.lm import LanguageModel

__all__ = ["ConfigError", "LanguageModel", "ModelConfig"]
