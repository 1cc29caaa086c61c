"""Building a LanguageModel from host arrays, each parameter placed straight into its shards.

The model's structure comes from `nnx.eval_shape` (nothing allocated); each parameter's value is produced on
the host in our layout and handed to `jax.make_array_from_callback`, which gives every device only its own
slice (on a mesh, with the sharding that `mamba_jax.parallel.state_shardings` derives from the parameter's
logical axes). No device ever holds a whole weight it does not own, and no process reads more than the host
copy of one parameter at a time. The reverse, `host_array`, gathers one parameter back to the host.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mamba_jax.models.config import ModelConfig
from mamba_jax.models.lm import LanguageModel
from mamba_jax.parallel.sharding import DEFAULT_RULES, state_shardings


def abstract_language_model(cfg: ModelConfig) -> LanguageModel:
    """A LanguageModel whose parameters are ShapeDtypeStructs (for its structure, `locate`, shapes)."""
    return nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(params=0)))


def target_shardings(cfg: ModelConfig, abstract_state, mesh, rules=None):
    """{leaf path: Sharding} for the model's parameters on `mesh` (one device when mesh is None)."""
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return {path: one for path, _ in nnx.to_flat_state(abstract_state)}
    cfg.validate_tensor_parallel(mesh.shape["tensor"])
    shardings = state_shardings(abstract_state, mesh, rules or DEFAULT_RULES)
    return {path: v.get_value() for path, v in nnx.to_flat_state(shardings)}


def build_model(
    cfg: ModelConfig,
    produce: Callable[[tuple, jax.ShapeDtypeStruct], np.ndarray],
    *,
    mesh=None,
    rules=None,
) -> LanguageModel:
    """A LanguageModel whose every parameter is `produce(path, abstract_value)` (a host array of that shape),
    placed on `mesh` (or the default device)."""
    graphdef, abstract = nnx.split(abstract_language_model(cfg))
    shardings = target_shardings(cfg, abstract, mesh, rules)
    leaves = []
    for path, var in nnx.to_flat_state(abstract):
        spec = var.get_value()
        host = produce(path, spec)
        if host.shape != spec.shape:
            raise AssertionError(f"{path}: produced {host.shape}, expected {spec.shape}")
        host = np.asarray(host, dtype=spec.dtype)
        value = jax.make_array_from_callback(spec.shape, shardings[path], lambda idx, host=host: host[idx])
        leaves.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def host_array(x) -> np.ndarray:
    """A parameter (possibly sharded, possibly over several processes) as one numpy array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
