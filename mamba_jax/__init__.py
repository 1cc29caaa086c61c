"""mamba_jax: pretrain, fine-tune and serve Mamba2 and hybrid Mamba2 + attention + MLP models in JAX."""

from mamba_jax.ops import ssd, ssd_step

__version__ = "0.1.0"
__all__ = ["from_pretrained", "ssd", "ssd_step"]


def __getattr__(name):
    # Loaded on first use: checkpoint reading pulls in Orbax, which `import mamba_jax` need not pay for.
    if name == "from_pretrained":
        from mamba_jax.interop import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'mamba_jax' has no attribute {name!r}")
