"""The training state and the pure, jitted step functions.

`train_step(state, batch) -> (state, metrics)` does one optimizer step over `accum` micro batches
(gradient accumulation with `lax.scan`, dividing once by the global token count so that it equals one
large batch), clips, updates, and skips the update when the loss or a gradient is not finite. float16
training uses dynamic loss scaling (halve on overflow, double after a run of good steps).

Batch arrays arrive as (global batch, L), sharded over the data-parallel axes; micro batch i takes rows
i, i + accum, … so that every micro batch stays spread over all data-parallel ranks without moving data.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mamba_jax.train.config import TrainConfig
from mamba_jax.train.loss import lm_loss_sums

LOSS_SCALE_INIT = 2.0**15
LOSS_SCALE_GROWTH_INTERVAL = 1000


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer steps taken (skipped ones included)
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array  # uint32 key data, for whatever randomness training needs (saved, so resume is exact)
    loss_scale: jax.Array  # float32; 1 when no loss scaling
    good_steps: jax.Array  # int32: finite steps since the loss scale last changed
    nonfinite_run: jax.Array  # int32: consecutive steps skipped for a non-finite loss or gradient
    skipped: jax.Array  # int32: all skipped steps


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int, dynamic_scale: bool) -> TrainState:
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    return TrainState(
        step=i32(0),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        loss_scale=jnp.asarray(LOSS_SCALE_INIT if dynamic_scale else 1.0, jnp.float32),
        good_steps=i32(0),
        nonfinite_run=i32(0),
        skipped=i32(0),
    )


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def split_micro_batches(batch: dict, accum: int, sharding=None) -> dict:
    """(B, L) → (accum, B / accum, L), micro batch i = rows i, i + accum, … (no data movement)."""

    def one(x):
        b = x.shape[0]
        x = jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    return {k: one(v) for k, v in batch.items()}


def make_train_step(graphdef, tx, tcfg: TrainConfig, *, accum: int, dynamic_scale: bool, schedule, micro_sharding=None):
    """`train_step(state, batch, frozen) -> (state, metrics)`: `state.params` are the trained parameters,
    `frozen` the rest of the model (empty in full training; the base weights under LoRA / prompt tuning)."""

    def micro_loss(params, frozen, micro, scale, key):
        model = nnx.merge(graphdef, params, *([] if frozen is None else [frozen]))
        s, n = lm_loss_sums(
            model, micro, chunk=tcfg.loss_chunk, remat=tcfg.remat, remat_layers=tcfg.remat_layers, key=key,
            fp8_layers=tcfg.fp8_layers(model.cfg.n_layers),
        )  # fmt: skip
        # Differentiate the sum scaled to about a mean (by the static token count of the micro batch), so
        # float16 gradients stay in range; the exact global division happens once after accumulation.
        return s * (scale / micro["labels"].size), (s, n)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def accumulate(params, frozen, micro, scale, key):
        def body(carry, xs):
            mb, i = xs
            g_acc, s_acc, n_acc = carry
            g, (s, n) = grad_fn(params, frozen, mb, scale, jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.float32(0), jnp.float32(0))
        return jax.lax.scan(body, init, (micro, jnp.arange(accum)))[0]

    def train_step(state: TrainState, batch: dict, frozen=None):
        # Randomness of this step (LoRA dropout): a function of the saved key and the step, so resume is exact.
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if accum == 1:  # no accumulation buffer: one gradient's worth of memory less
            g_sum, (loss_sum, count) = grad_fn(state.params, frozen, batch, state.loss_scale, key)
            micro_tokens = batch["labels"].size
        else:
            micro = split_micro_batches(batch, accum, micro_sharding)
            g_sum, loss_sum, count = accumulate(state.params, frozen, micro, state.loss_scale, key)
            micro_tokens = micro["labels"][0].size
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g * (micro_tokens / (count * state.loss_scale)), g_sum)
        loss = loss_sum / count

        loss_ok = jnp.isfinite(loss)
        grads_ok = _all_finite(grads)
        ok = loss_ok & grads_ok
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731

        # A gradient overflow under dynamic scaling is routine (the scale halves); it counts towards the
        # abort only once the scale cannot fall further.
        scale = state.loss_scale
        if dynamic_scale:
            grow = ok & (state.good_steps + 1 >= LOSS_SCALE_GROWTH_INTERVAL)
            new_scale = jnp.where(ok, jnp.where(grow, scale * 2, scale), jnp.maximum(scale / 2, 1.0))
            good = jnp.where(ok & ~grow, state.good_steps + 1, 0)
            alarming = ~loss_ok | (~grads_ok & (scale <= 1.0))
        else:
            new_scale, good, alarming = scale, state.good_steps + 1, ~ok

        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            loss_scale=new_scale,
            good_steps=good.astype(jnp.int32),
            nonfinite_run=jnp.where(alarming, state.nonfinite_run + 1, 0).astype(jnp.int32),
            skipped=state.skipped + (~ok).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "tokens": count,
            "loss_scale": scale,
            "nonfinite_run": new_state.nonfinite_run,
            "skipped": new_state.skipped,
        }
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, tcfg: TrainConfig):
    def eval_step(params, batch, frozen=None):
        model = nnx.merge(graphdef, params, *([] if frozen is None else [frozen]))
        s, n = lm_loss_sums(model, batch, chunk=tcfg.loss_chunk)
        return {"loss_sum": s, "tokens": n}

    return eval_step
