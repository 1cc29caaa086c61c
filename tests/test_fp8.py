"""fp8 training (`mamba_jax.ops.fp8`, `train.fp8`): the rounding, the backward of an fp8 product as the
recipe defines it, the per-layer choice inside scanned segments, and a training step close to bf16's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import rel_err, small_hybrid

from mamba_jax.models.stack import unstack_layers
from mamba_jax.ops import fp8
from mamba_jax.parallel import init_model
from mamba_jax.train.config import OptimConfig, TrainConfig
from mamba_jax.train.loss import lm_loss_sums
from mamba_jax.train.optim import make_optimizer, schedule
from mamba_jax.train.state import init_state, make_train_step


@pytest.mark.parametrize("dtype,rel", [(fp8.E4M3, 2.0**-4), (fp8.E5M2, 2.0**-3)])
def test_qdq_keeps_the_mantissa_bits_of_the_format(dtype, rel):
    """One scale per tensor from its current amax: the largest value is exact, values in the format's
    normal range keep its mantissa (half an ulp: 2⁻⁴ for e4m3, 2⁻³ for e5m2), zeros stay zero."""
    x = jax.random.normal(jax.random.key(0), (64, 48)) * 3.0
    back = fp8.qdq(x, dtype)
    amax = jnp.max(jnp.abs(x))
    assert float(jnp.max(jnp.abs(back))) == pytest.approx(float(amax), rel=1e-6)
    normal = jnp.abs(x) >= amax / float(jnp.finfo(dtype).max) * float(jnp.finfo(dtype).smallest_normal)
    err = jnp.where(normal, jnp.abs(back - x) / jnp.abs(x), 0.0)
    assert float(jnp.max(err)) <= rel * (1 + 1e-5) and float(jnp.max(err)) > rel / 8  # it did round
    assert not bool(jnp.any(fp8.qdq(jnp.zeros((4, 4)), dtype)))


def test_fp8_product_forward_and_backward_follow_the_recipe():
    """y = q(x) · q(W) with e4m3; dx = q(dy) · q(W)ᵀ and dW = q(x)ᵀ · q(dy) with dy in e5m2."""
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x, w = jax.random.normal(kx, (5, 7, 24)), jax.random.normal(kw, (24, 3, 10)) * 0.1
    y, vjp = jax.vjp(lambda a, b: fp8.tensordot(a, b, 1), x, w)
    dy = jax.random.normal(kg, y.shape)
    dx, dw = vjp(dy)
    qx, qw, qg = fp8.qdq(x, fp8.E4M3), fp8.qdq(w, fp8.E4M3), fp8.qdq(dy, fp8.E5M2)
    assert rel_err(y, jnp.tensordot(qx, qw, 1)) <= 1e-6
    assert rel_err(dx, jnp.einsum("btgn,dgn->btd", qg, qw)) <= 1e-6
    assert rel_err(dw, jnp.einsum("btd,btgn->dgn", qx, qg)) <= 1e-6
    assert rel_err(y, jnp.tensordot(x, w, 1)) > 1e-3  # fp8 rounding is really there


@pytest.fixture(scope="module")
def hybrid():
    """Scanned segments (9 layers as 3 repetitions of 'M*-'), float32 so that fp8 is the only rounding."""
    return init_model(small_hybrid(pattern="M*-M*-M*-"), seed=2)


def _loss_and_grads(model, fp8_layers, remat="selective"):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 250, (2, 32)), jnp.int32)
    batch = dict(input_ids=ids, labels=jnp.roll(ids, -1, axis=1), loss_mask=jnp.ones((2, 32)))

    def loss(m):
        s, n = lm_loss_sums(m, batch, chunk=16, remat=remat, fp8_layers=fp8_layers)
        return s / n

    return jax.jit(nnx.value_and_grad(loss))(model)


def _flat(grads):
    return jnp.concatenate([g.ravel() for g in jax.tree.leaves(nnx.state(grads))])


def test_fp8_layers_are_chosen_by_index_inside_scanned_segments(hybrid):
    """Inside a scan the layer index is traced (lax.cond picks the product); unstacked, every index is a
    Python int. Layers 1…7 in fp8: both give the same loss and gradients. An empty range is exactly the
    plain model; all layers in fp8 differ from it, by the rounding of fp8 (≈ 10 % on the gradients here)."""
    loss_s, g_s = _loss_and_grads(hybrid, (1, 8))
    loss_u, g_u = _loss_and_grads(unstack_layers(hybrid), (1, 8))
    # (the layers' gradients are stacked in one tree, per layer in the other: compare the embedding's,
    # which every layer's backward reaches)
    assert rel_err(loss_s, loss_u) <= 1e-6 and rel_err(g_s.embed[...], g_u.embed[...]) <= 1e-6
    loss_0, g_0 = _loss_and_grads(hybrid, None)
    loss_e, g_e = _loss_and_grads(hybrid, (5, 5))
    assert float(loss_e) == float(loss_0) and rel_err(_flat(g_e), _flat(g_0)) <= 1e-6  # (lax.cond's fusion)
    loss_a, g_a = _loss_and_grads(hybrid, (0, 9))
    assert 1e-4 < rel_err(_flat(g_a), _flat(g_0)) < 0.2  # e5m2 gradients: 2 mantissa bits
    assert 0 < abs(float(loss_a) - float(loss_0)) < 1e-2 * float(loss_0)
    assert 1e-6 < rel_err(_flat(g_s), _flat(g_0)) < rel_err(_flat(g_a), _flat(g_0))  # fewer fp8 layers


def test_every_layer_gets_the_flag_of_its_own_index(hybrid, monkeypatch):
    """Unstacked, the stack enters one fp8 scope per layer in order with a Python bool: (1, 8) of 9 layers
    is [False, True × 7, False] — the layer offsets of segments and repetitions add up."""
    seen, scope = [], fp8.fp8_scope

    def recording(flag):
        seen.append(flag)
        return scope(flag)

    monkeypatch.setattr(fp8, "fp8_scope", recording)
    jax.eval_shape(lambda m: m.hidden_states(jnp.ones((1, 16), jnp.int32), fp8_layers=(1, 8)), unstack_layers(hybrid))
    assert seen == [False] + [True] * 7 + [False]


def test_fp8_training_step_stays_close_to_bf16():
    """The jitted train step with train.fp8 (first and last layer in bf16, as NeMo keeps 2 and 2): the
    projections carry float8 converts, the loss equals the bf16 step's within 1 % and the gradient norm
    within 5 %, and the update points
    the same way (Adam's first step is close to lr · sign(g), so entries near zero flip: cosine > 0.95)."""
    cfg = small_hybrid(pattern="M*-M*-", dtype="bfloat16")
    model = init_model(cfg, seed=3)
    graphdef, params = nnx.split(model)
    ocfg = OptimConfig(warmup_steps=0)  # (a warm-up starts at lr 0: no update to compare)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(1, 250, (4, 64)), jnp.int32)
    batch = dict(input_ids=ids, labels=jnp.roll(ids, -1, axis=1), loss_mask=jnp.ones((4, 64)))
    out = {}
    for use_fp8 in (False, True):
        tcfg = TrainConfig(steps=10, loss_chunk=64, fp8=use_fp8, fp8_bf16_layers=1)
        tx = make_optimizer(ocfg, params, tcfg.steps)
        step = make_train_step(graphdef, tx, tcfg, accum=1, dynamic_scale=False, schedule=schedule(ocfg, 10))
        state = init_state(params, tx, 0, False)
        if use_fp8:
            jaxpr = str(jax.make_jaxpr(step)(state, batch))
            assert "f8_e4m3fn" in jaxpr and "f8_e5m2" in jaxpr
        new, metrics = jax.jit(step)(state, batch)
        delta = jax.tree.map(lambda a, b: (a - b).ravel(), jax.tree.leaves(new.params), jax.tree.leaves(params))
        out[use_fp8] = float(metrics["loss"]), float(metrics["grad_norm"]), jnp.concatenate(delta)
    (l0, n0, d0), (l8, n8, d8) = out[False], out[True]
    assert np.isfinite(l8) and abs(l8 - l0) <= 1e-2 * l0 and abs(n8 - n0) <= 5e-2 * n0
    assert float(optax.cosine_similarity(d8, d0)) > 0.95


def test_fp8_config_errors_are_named():
    with pytest.raises(ValueError, match="fp8_bf16_layers"):
        TrainConfig(fp8=True, fp8_bf16_layers=-1)
    assert TrainConfig(fp8=True, fp8_bf16_layers=2).fp8_layers(56) == (2, 54)
    assert TrainConfig(fp8=False).fp8_layers(56) is None
