"""Parallelism: device mesh, logical → mesh sharding rules, sharded initialisation."""

from mamba_jax.parallel.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    MeshConfig,
    abstract_mesh,
    abstract_model,
    constrain,
    init_model,
    make_mesh,
    param_count,
    per_device_bytes,
    state_shardings,
    use_mesh,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "MeshConfig",
    "abstract_mesh",
    "abstract_model",
    "constrain",
    "init_model",
    "make_mesh",
    "param_count",
    "per_device_bytes",
    "state_shardings",
    "use_mesh",
]
