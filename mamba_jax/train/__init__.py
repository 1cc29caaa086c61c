"""Training: the `python -m mamba_jax.train` entry point (arrives with the training issue)."""
