"""Pallas GPU kernels of mamba_jax, installed as `mamba_jax.kernels` (see pyproject.toml).

The fused SSD scan kernels (Mosaic GPU, forward and backward) are the work of the kernels issue; until
they land, `ssd_pallas_unsupported` reports every call as unsupported and `mamba_jax.ssd` takes its
XLA path, saying so once in the log.
"""

from __future__ import annotations


def ssd_pallas_unsupported(**options) -> str | None:
    """Why the Pallas kernels cannot take these inputs (None when they can)."""
    del options
    return "any inputs yet (the fused kernels are not part of this build)"


def ssd_pallas(*args, **kwargs):
    raise NotImplementedError("mamba_jax.kernels.ssd_pallas: the fused SSD kernels are not part of this build.")
