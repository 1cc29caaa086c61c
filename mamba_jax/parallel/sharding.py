"""Device mesh, the logical → mesh axis rules, and model initialisation straight into its shards.

Layers name the logical axes of every weight ("embed", "ssm_heads", …; see `mamba_jax.layers.base`) and
activations are constrained at block boundaries only; this module alone maps those names onto mesh axes,
through one small rule table (MaxText's scheme, kept to a handful of rules). The mesh always has the five
axes below, unused ones of size 1, so every rule resolves on every mesh:

  pipeline · data · fsdp · sequence · tensor      (tensor innermost: the fastest links)

Tensor parallelism follows Megatron's layout: Mamba groups and heads, attention heads and the MLP hidden
dimension split over `tensor` (column-parallel in, row-parallel out, with XLA inserting the collectives);
`fsdp` shards the model width of every weight (ZeRO-3 style) and, with `data`, the batch; `sequence` splits
the length of the activations (context parallelism: the Mamba layers pass their state between the slices,
`mamba_jax.parallel.context`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from mamba_jax.schema import from_mapping

MESH_AXES = ("pipeline", "data", "fsdp", "sequence", "tensor")

# logical axis → mesh axis (or axes). Unlisted names are replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("act_length", "sequence"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("ssm_groups", "tensor"),
    ("ssm_heads", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
)


# Every logical axis name the layers and the model use (unlisted in the rules → replicated).
LOGICAL_AXES = (
    "batch", "length", "act_length", "act_embed", "vocab", "embed", "norm", "layers",
    "ssm_groups", "ssm_heads", "q_heads", "kv_heads", "mlp",
)  # fmt: skip


def tensor_sequence_parallel(rules=DEFAULT_RULES) -> tuple:
    """`rules` with Megatron's sequence parallelism: the residual stream between blocks (logical length
    "act_length") sharded along the sequence over `tensor` as well, so that norms and residual adds — and the
    block inputs that activation checkpointing keeps — take 1 / tensor of the memory; XLA turns the
    all-reduce after each row-parallel projection into a reduce-scatter and gathers before the next
    column-parallel one (Korthikanti et al. 2022)."""
    return tuple((n, a) for n, a in rules if n != "act_length") + (("act_length", ("sequence", "tensor")),)


def complete_rules(rules=DEFAULT_RULES) -> tuple:
    """The rules with an explicit `None` for every other known logical axis (what flax's helpers expect)."""
    listed = {name for name, _ in rules}
    return tuple(rules) + tuple((name, None) for name in LOGICAL_AXES if name not in listed)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 (all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    sequence: int = 1
    tensor: int = 1
    pipeline: int = 1
    # Megatron's sequence parallelism: the residual stream sharded along the sequence over `tensor` too
    # (`tensor_sequence_parallel`; the recipes' "SP"). Not a mesh axis: it changes the sharding rules.
    tensor_sequence_parallel: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MeshConfig:
        return from_mapping(cls, d)

    def resolve(self, n_devices: int) -> dict[str, int]:
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        free = [a for a, s in sizes.items() if s == -1]
        if len(free) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {free}.")
        bad = [a for a, s in sizes.items() if s == 0 or s < -1]
        if bad:
            raise ValueError(f"mesh axis sizes must be positive (or -1 for one axis), got {sizes}.")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if free:
            if n_devices % fixed:
                raise ValueError(
                    f"the mesh {sizes} needs a multiple of {fixed} devices for its fixed axes, but there are "
                    f"{n_devices}; change the axis sizes so that their product divides the device count."
                )
            sizes[free[0]] = n_devices // fixed
        elif fixed != n_devices:
            raise ValueError(
                f"the mesh {sizes} has {fixed} positions but there are {n_devices} devices; make the product "
                f"of the axis sizes equal the device count, or set one axis (usually data) to -1."
            )
        if sizes["pipeline"] > 1:
            raise ValueError(
                "pipeline parallelism is not available in this version; set mesh.pipeline = 1 and use data, "
                "fsdp, sequence and tensor."
            )
        return sizes


def make_mesh(mesh_cfg: MeshConfig | Mapping | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with the five axes of MESH_AXES."""
    if mesh_cfg is None:
        mesh_cfg = MeshConfig()
    elif not isinstance(mesh_cfg, MeshConfig):
        mesh_cfg = MeshConfig.from_dict(mesh_cfg)
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_cfg.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def abstract_mesh(**sizes: int) -> AbstractMesh:
    """A device-free mesh for planning (shapes and per-device bytes of models larger than the host)."""
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    return AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None], rules=DEFAULT_RULES) -> PartitionSpec:
    table = dict(rules)
    return PartitionSpec(*(table.get(a) if a is not None else None for a in axes))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | AbstractMesh, rules=DEFAULT_RULES):
    """Make `mesh` and `rules` current: activation constraints inside the model then take effect."""
    with jax.set_mesh(mesh), spmd.logical_axis_rules(complete_rules(rules)):
        yield mesh


SEQUENCE_AXIS = "sequence"


def sequence_parallel_size() -> int:
    """Devices on the current mesh's `sequence` axis (1 outside a mesh): the slices of a sequence."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[SEQUENCE_AXIS]


def constrain(x, axes: Sequence[str | None]):
    """Constrain an activation to its logical sharding; a no-op outside `use_mesh`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    rules = spmd.get_logical_axis_rules() or DEFAULT_RULES
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules))


def state_shardings(state, mesh: Mesh | AbstractMesh, rules=DEFAULT_RULES):
    """NamedShardings for an (abstract) nnx.State, from each Variable's logical axis names.

    Returns the state's own tree (Variables kept) with a NamedSharding in place of each value, the form
    `jax.jit(out_shardings=...)` and `jax.device_put` take for an `nnx.state(...)`.
    """

    def one(v):
        axes = v.get_metadata().get("out_sharding") or ()
        spec = logical_to_spec(axes, rules) if axes else PartitionSpec()
        return v.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_model(cfg, *, mesh: Mesh | None = None, rules=DEFAULT_RULES, seed: int = 0):
    """Build a LanguageModel with every parameter created directly in its shards (under `jit`)."""
    from mamba_jax.models.lm import LanguageModel

    def build():
        return LanguageModel(cfg, rngs=nnx.Rngs(params=seed))

    if mesh is None:
        graphdef, state = nnx.split(nnx.eval_shape(build))
        state = jax.jit(lambda: nnx.state(build()))()
        return nnx.merge(graphdef, state)
    cfg.validate_tensor_parallel(mesh.shape["tensor"])
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_model(cfg, mesh: Mesh | AbstractMesh, rules=DEFAULT_RULES):
    """(graphdef, state of ShapeDtypeStructs carrying their shardings): allocates nothing."""
    from mamba_jax.models.lm import LanguageModel

    cfg.validate_tensor_parallel(mesh.shape["tensor"])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(params=0))))
    shardings = state_shardings(abstract, mesh, rules)
    leaves = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return graphdef, leaves


def param_count(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def per_device_bytes(state) -> int:
    """Bytes of the largest device's share of a sharded (abstract or concrete) state."""
    total = 0
    for x in jax.tree.leaves(state):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total
