"""Pallas GPU kernels of mamba_jax, installed as `mamba_jax.kernels` (see pyproject.toml).

The fused SSD scan (Mosaic GPU, forward and backward) lives in `ssd_fwd.py`, `ssd_bwd.py` and
`ssd_scan.py`; `mamba_jax.ssd(impl="pallas" | "auto")` reaches it through the two names below.
"""

from __future__ import annotations

from mamba_jax.kernels.ssd_scan import ssd_pallas, ssd_pallas_unsupported

__all__ = ["ssd_pallas", "ssd_pallas_unsupported"]
