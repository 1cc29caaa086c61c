"""Training: `python -m mamba_jax.train` (loop.py) and its pure pieces (state.py, loss.py, optim.py,
checkpoint.py, metrics.py, data.py)."""
