"""Inference: the generation engine (prefill + compiled decode loop), sampling rules, the notebook API."""

from mamba_jax.inference.api import Completion, generate
from mamba_jax.inference.engine import Engine, Generation, SamplingParams
from mamba_jax.inference.sampling import filter_logits, sample_logits

__all__ = ["Completion", "Engine", "Generation", "SamplingParams", "filter_logits", "generate", "sample_logits"]
