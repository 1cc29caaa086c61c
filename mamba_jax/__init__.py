"""mamba_jax: pretrain, fine-tune and serve Mamba2 and hybrid Mamba2 + attention + MLP models in JAX."""

from mamba_jax.ops import ssd, ssd_step

__version__ = "0.1.0"
__all__ = ["ssd", "ssd_step"]
