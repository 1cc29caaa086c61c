"""Optimizer: optax AdamW with the recipes' defaults, warm-up + cosine schedule, global-norm clipping, and
no weight decay where the parameters say so (A_log, D, dt_bias, norms, biases: their `weight_decay` mark).
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from mamba_jax.train.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to lr, then cosine / linear decay to min_lr (or constant)."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max((cfg.decay_steps or total_steps) - warmup, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, cfg.min_lr, decay_steps)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr / cfg.lr)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def decay_mask(params: nnx.State):
    """True where weight decay applies, read from each parameter's metadata (a prefix tree of params)."""
    return jax.tree.map(
        lambda v: bool(v.get_metadata().get("weight_decay", True)),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def make_optimizer(cfg: OptimConfig, params: nnx.State, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(params),
        )
    )
    return optax.chain(*parts)
