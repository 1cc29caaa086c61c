"""Inference: sampling rules and generation."""

from mamba_jax.inference.sampling import sample_logits

__all__ = ["sample_logits"]
