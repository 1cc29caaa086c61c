"""Numerical operations: the SSD scan (chunked XLA path, references, decoding step)."""

from mamba_jax.ops.ssd import ssd
from mamba_jax.ops.ssd_reference import process_dt, ssd_reference, ssd_step

__all__ = ["process_dt", "ssd", "ssd_reference", "ssd_step"]
