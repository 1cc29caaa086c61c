"""The pure training pieces: chunked loss, optimizer masks and schedule, accumulation, non-finite skipping,
loss scaling, activation checkpointing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import forward, rel_err
from helpers import small_hybrid as _small_hybrid

from mamba_jax.parallel import init_model
from mamba_jax.train.config import OptimConfig, TrainConfig
from mamba_jax.train.loss import lm_loss_sums, token_losses
from mamba_jax.train.optim import decay_mask, make_optimizer, schedule
from mamba_jax.train.state import init_state, make_train_step


def small_hybrid(**changes):
    """Three layers, one of each kind: enough for the step logic, quick to compile."""
    return _small_hybrid(**{"pattern": "M*-", **changes})


def _batch(seed, b, l, vocab, docs=False):
    ks = jax.random.split(jax.random.key(seed), 3)
    ids = jax.random.randint(ks[0], (b, l + 1), 0, vocab)
    batch = {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "loss_mask": (jax.random.uniform(ks[1], (b, l)) > 0.1).astype(jnp.float32),
    }
    if docs:
        batch["seq_idx"] = (jnp.arange(l)[None] >= jax.random.randint(ks[2], (b, 1), 1, l)).astype(jnp.int32)
    return batch


def test_chunked_loss_equals_full_logits():
    h = jax.random.normal(jax.random.key(0), (2, 37, 16))
    w = jax.random.normal(jax.random.key(1), (16, 50))
    y = jax.random.randint(jax.random.key(2), (2, 37), 0, 50)
    full = optax.softmax_cross_entropy_with_integer_labels(h @ w, y)
    for chunk in (5, 16, 64):
        assert rel_err(token_losses(h, w, y, chunk=chunk), full) <= 1e-6
    g_chunk = jax.grad(lambda h: token_losses(h, w, y, chunk=8).sum())(h)
    g_full = jax.grad(lambda h: optax.softmax_cross_entropy_with_integer_labels(h @ w, y).sum())(h)
    assert rel_err(g_chunk, g_full) <= 1e-6


def test_decay_mask_and_schedule():
    model = init_model(small_hybrid(), seed=0)
    _, params = nnx.split(model)
    mask = decay_mask(params)
    first = mask["layers"]["segments"][0]["layers"]["blocks"][0]
    m = first["mixer"]
    assert m["in_proj"] is True and m["out_proj"] is True and m["conv_weight"] is True
    assert m["A_log"] is False and m["D"] is False and m["dt_bias"] is False and m["conv_bias"] is False
    assert first["norm"]["weight"] is False and mask["embed"] is True

    sched = schedule(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10), total_steps=110)
    assert float(sched(0)) == 0.0
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(60)) == pytest.approx(0.55e-3, rel=1e-3)  # halfway down the cosine
    assert float(sched(110)) == pytest.approx(1e-4)


def test_no_weight_decay_on_marked_parameters():
    """With lr·wd only (zero gradients), decayed weights shrink and marked ones stay."""
    model = init_model(small_hybrid(), seed=0)
    _, params = nnx.split(model)
    tx = make_optimizer(OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, weight_decay=0.1, grad_clip=0), params, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    first = lambda t: t["layers"]["segments"][0]["layers"]["blocks"][0]["mixer"]  # noqa: E731
    mixer_new, mixer_old = first(new), first(params)
    assert np.allclose(mixer_new["A_log"][...], mixer_old["A_log"][...])
    assert np.allclose(mixer_new["in_proj"][...], 0.9 * mixer_old["in_proj"][...], rtol=1e-5)


def _step_fn(graphdef, tcfg, accum, params, dynamic=False):
    # (the graphdef of the model that `params` come from: building another model only for it compiled its init)
    ocfg = OptimConfig(lr=1e-3, warmup_steps=0, min_lr=1e-3)
    tx = make_optimizer(ocfg, params, tcfg.steps)
    step = jax.jit(make_train_step(graphdef, tx, tcfg, accum=accum, dynamic_scale=dynamic, schedule=schedule(ocfg, 10)))
    return step, init_state(params, tx, 0, dynamic)


def test_gradient_accumulation_equals_large_batch():
    cfg = small_hybrid()
    graphdef, params = nnx.split(init_model(cfg, seed=1))
    batch = _batch(3, 8, 24, cfg.vocab_size, docs=True)
    tcfg = TrainConfig(steps=10, global_batch_size=8)
    one, s1 = _step_fn(graphdef, tcfg, 1, params)
    four, s4 = _step_fn(graphdef, TrainConfig(steps=10, global_batch_size=8, micro_batch_size=2), 4, params)
    s1, m1 = one(s1, batch)
    s4, m4 = four(s4, batch)
    assert rel_err(m4["loss"], m1["loss"]) <= 1e-6
    assert rel_err(m4["grad_norm"], m1["grad_norm"]) <= 1e-6
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params), strict=True):
        assert rel_err(a, b) <= 1e-6


def test_accumulated_loss_equals_direct_loss():
    cfg = small_hybrid()
    model = init_model(cfg, seed=2)
    graphdef, params = nnx.split(model)
    batch = _batch(4, 4, 20, cfg.vocab_size)
    # (jitted: run op by op, these two forwards took most of the test's time)
    s, n = jax.jit(lambda m, b: lm_loss_sums(m, b, chunk=7))(model, batch)
    logits = forward(model, batch["input_ids"])
    direct = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    assert rel_err(s / n, jnp.sum(direct * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])) <= 1e-6
    step, st = _step_fn(graphdef, TrainConfig(steps=10, global_batch_size=4, micro_batch_size=1), 4, params)
    _, m = step(st, batch)
    assert rel_err(m["loss"], s / n) <= 1e-6


@pytest.mark.parametrize("remat", ["full", "selective"])
def test_remat_gives_the_same_gradients(remat):
    cfg = small_hybrid()
    model = init_model(cfg, seed=3)
    graphdef, params = nnx.split(model)
    batch = _batch(5, 2, 20, cfg.vocab_size, docs=True)

    def loss(params, remat):
        s, n = lm_loss_sums(nnx.merge(graphdef, params), batch, chunk=8, remat=remat)
        return s / n

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # (the reference jitted too: op by op it took ~15 s)
    g0 = grad(params, "none")
    g1 = grad(params, remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert rel_err(a, b) <= 1e-5


def test_nonfinite_step_is_skipped_and_counted():
    cfg = small_hybrid()
    graphdef, params = nnx.split(init_model(cfg, seed=4))
    step, st = _step_fn(graphdef, TrainConfig(steps=10, global_batch_size=2), 1, params)
    good = _batch(6, 2, 16, cfg.vocab_size)
    st, m = step(st, good)
    assert m["nonfinite_run"] == 0 and st.step == 1
    before = jax.tree.map(lambda x: x.copy(), st.params)
    # A NaN weight poisons the loss: the update must be skipped and the weights kept.
    poisoned = jax.tree.map(lambda x: x, st.params)
    poisoned["norm_f"]["weight"][...] = poisoned["norm_f"]["weight"][...].at[0].set(jnp.nan)
    st_bad = st.replace(params=poisoned)
    st2, m2 = step(st_bad, good)
    assert not np.isfinite(float(m2["loss"]))
    assert int(m2["nonfinite_run"]) == 1 and int(m2["skipped"]) == 1 and int(st2.step) == 2
    same = jax.tree.leaves(st2.params)[0]
    assert np.array_equal(np.asarray(same), np.asarray(jax.tree.leaves(poisoned)[0]))
    _, m3 = step(st2.replace(params=before), good)
    assert int(m3["nonfinite_run"]) == 0 and np.isfinite(float(m3["loss"]))


def test_dynamic_loss_scale_halves_on_overflow_and_float16_trains():
    cfg = small_hybrid(dtype="float16")
    graphdef, params = nnx.split(init_model(cfg, seed=5))
    step, st = _step_fn(graphdef, TrainConfig(steps=10, global_batch_size=2), 1, params, dynamic=True)
    assert float(st.loss_scale) == 2.0**15
    batch = _batch(7, 2, 16, cfg.vocab_size)
    huge = st.replace(loss_scale=jnp.float32(1e38))  # guaranteed overflow in the scaled gradients
    st2, m2 = step(huge, batch)
    assert float(st2.loss_scale) == pytest.approx(5e37) and int(m2["skipped"]) == 1
    assert int(m2["nonfinite_run"]) == 0  # routine under dynamic scaling
    losses = []
    for _ in range(6):
        st, m = step(st, batch)
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert float(st.loss_scale) <= 2.0**15 and int(st.skipped) < 6


class _Docs:
    def __init__(self, docs):
        self.docs = [np.asarray(d, np.int32) for d in docs]

    def doc(self, i):
        return self.docs[i]

    def doc_lengths(self):
        return np.array([len(d) for d in self.docs])


def test_packed_documents_have_the_per_token_losses_of_each_alone():
    """Data packing + model + loss: two documents packed in one row score exactly as each alone."""
    from mamba_jax.data import PackedRows

    cfg = small_hybrid(pattern="M*-M-")
    model = init_model(cfg, seed=7)
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, cfg.vocab_size, 23), rng.integers(1, cfg.vocab_size, 18)
    row = PackedRows(_Docs([a, b]), np.array([0, 1]), seq_len=40)[0]  # 41 tokens = both documents
    assert row["seq_idx"].tolist() == [0] * 23 + [1] * 17
    assert row["loss_mask"][22] == 0 and row["loss_mask"].sum() == 39

    @jax.jit  # (op by op, the three forwards took most of the test's time)
    def _losses(ids, labels, seq_idx):
        h = model.hidden_states(ids[None], seq_idx=None if seq_idx is None else seq_idx[None])
        return token_losses(h, model.head_weight(), labels[None], chunk=16)[0]

    def losses(ids, labels, seq_idx=None):
        return np.asarray(
            _losses(jnp.asarray(ids), jnp.asarray(labels), None if seq_idx is None else jnp.asarray(seq_idx))
        )

    packed = losses(row["input_ids"], row["labels"], row["seq_idx"])
    alone_a = losses(a[:-1], a[1:])
    alone_b = losses(b[:-1], b[1:])
    mask = row["loss_mask"].astype(bool)
    assert rel_err(packed[mask], np.concatenate([alone_a, alone_b])) <= 1e-5
