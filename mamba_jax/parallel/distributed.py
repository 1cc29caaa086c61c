"""Multi-process start-up: `jax.distributed.initialize` when the job spans several processes.

SLURM (srun with one task per GPU or per node) and explicit coordinator variables are detected; on a
single process nothing happens, so the same command runs on a laptop, one GPU node or a cluster. Must run
before anything touches a JAX backend.
"""

from __future__ import annotations

import os

import jax

_initialized = False


def maybe_initialize() -> None:
    global _initialized
    if _initialized:
        return
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ or os.environ.get("MAMBA_JAX_DISTRIBUTED") == "1"
    if slurm_tasks > 1 or explicit:
        # jax reads the cluster (SLURM, or the coordinator address / process count / id variables) itself.
        jax.distributed.initialize()
    _initialized = True
