"""Sharding foundation on 8 fake CPU devices: mesh, rules, sharded init, and sharded = single-device math."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from helpers import rel_err, small_hybrid
from jax.sharding import PartitionSpec as P

from mamba_jax.models import ConfigError
from mamba_jax.parallel import MeshConfig, init_model, make_mesh, per_device_bytes, use_mesh
from mamba_jax.parallel.sharding import DEFAULT_RULES, tensor_sequence_parallel


def _loss_and_grads(model, ids, mesh=None, rules=DEFAULT_RULES):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    if mesh is None:
        return step(params)
    with use_mesh(mesh, rules):
        return step(params)


def test_data_by_tensor_mesh_equals_single_device():
    assert jax.device_count() == 8
    cfg = small_hybrid()
    ids = jax.random.randint(jax.random.key(0), (4, 33), 0, cfg.vocab_size)
    loss1, grads1 = _loss_and_grads(init_model(cfg, seed=3), ids)

    mesh = make_mesh(MeshConfig(data=2, tensor=4))
    model = init_model(cfg, mesh=mesh, seed=3)
    in_proj = model.layers.block(0).mixer.in_proj[...]
    assert in_proj.sharding.spec == P("fsdp", "tensor", None)
    assert in_proj.addressable_shards[0].data.shape == (64, 1, in_proj.shape[2])  # one group per shard
    loss8, grads8 = _loss_and_grads(model, ids, mesh)

    assert rel_err(loss8, loss1) <= 1e-5
    flat1, flat8 = jax.tree.leaves(grads1), jax.tree.leaves(grads8)
    assert len(flat1) == len(flat8)
    for g1, g8 in zip(flat1, flat8, strict=True):
        assert rel_err(g8, g1) <= 1e-5


def test_fsdp_mesh_equals_single_device():
    cfg = small_hybrid()
    ids = jax.random.randint(jax.random.key(1), (8, 17), 0, cfg.vocab_size)
    loss1, _ = _loss_and_grads(init_model(cfg, seed=5), ids)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = init_model(cfg, mesh=mesh, seed=5)
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    loss8, _ = _loss_and_grads(model, ids, mesh)
    assert rel_err(loss8, loss1) <= 1e-5


def test_tensor_sequence_parallel_equals_single_device():
    """Megatron's sequence parallelism (the residual stream sharded along the sequence over `tensor`): the
    hidden states between blocks are split over tensor, and loss and gradients equal the single device's."""
    cfg = small_hybrid()
    ids = jax.random.randint(jax.random.key(2), (4, 33), 0, cfg.vocab_size)
    loss1, grads1 = _loss_and_grads(init_model(cfg, seed=3), ids)
    mesh, rules = make_mesh(MeshConfig(data=2, tensor=4)), tensor_sequence_parallel()
    model = init_model(cfg, mesh=mesh, rules=rules, seed=3)
    with use_mesh(mesh, rules):
        h = jax.jit(lambda m, i: m.hidden_states(i))(model, ids[:, :-1])
    assert tuple(h.sharding.spec)[:2] == ("data", "tensor")  # 32 positions, 8 per tensor shard
    loss8, grads8 = _loss_and_grads(model, ids, mesh, rules)
    assert rel_err(loss8, loss1) <= 1e-5
    for g1, g8 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8), strict=True):
        assert rel_err(g8, g1) <= 1e-5


def test_per_device_bytes_shrink_with_tensor_parallelism():
    cfg = small_hybrid()
    one = per_device_bytes(nnx.state(init_model(cfg, mesh=make_mesh(MeshConfig(data=8)))))
    four = per_device_bytes(nnx.state(init_model(cfg, mesh=make_mesh(MeshConfig(data=2, tensor=4)))))
    assert four < one / 2


def test_model_that_cannot_split_raises_before_allocating():
    with pytest.raises(ConfigError, match="tensor=8"):
        init_model(small_hybrid(), mesh=make_mesh(MeshConfig(tensor=8, data=1)))


@pytest.mark.parametrize(
    "mesh,message",
    [
        (dict(data=3), "positions but there are 8 devices"),
        (dict(data=-1, tensor=3), "multiple of 3 devices"),
        (dict(data=-1, fsdp=-1), "at most one mesh axis"),
        (dict(data=-1, pipeline=2), "not available in this version"),
        (dict(data=-1, expert=2), "unknown MeshConfig key"),
    ],
)
def test_bad_mesh_configs(mesh, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(mesh)


def test_activation_constraint_is_noop_without_mesh():
    from mamba_jax.parallel import constrain

    x = jnp.ones((2, 3))
    assert constrain(x, ("batch", None)) is x
