"""Checkpoints with Orbax: asynchronous, sharded, atomic, restorable onto another mesh.

Each checkpoint is one Orbax step directory holding three items:
  - `state`: the TrainState (params, optimizer state, step, RNG, loss scale) — every process writes its own
    shards (OCDBT), and restoring with target shardings reshards onto whatever mesh the run has now;
  - `data`: the data iterator's state (JSON), so training resumes on the exact next batch;
  - `meta`: the model config, the fine-tuning method and its base weights (`init_from`) and the step (JSON), to
    refuse a checkpoint of another model and to rebuild an adapter's model.
Orbax writes into a temporary directory and renames it on commit: a save interrupted at any point (even by
SIGKILL) leaves the previous checkpoint as the newest one. Retention: the newest `keep_last` plus every
step that is a multiple of `keep_every`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mamba_jax.train.config import CheckpointConfig


class CheckpointMismatch(RuntimeError):
    """The work directory holds checkpoints of a different model."""


def same_config_value(a, b) -> bool:
    """Equal as config values, whether or not they went through JSON (which turns tuples into lists)."""
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return norm(a) == norm(b)


def _model_diff(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {saved.get(k)!r} → {current.get(k)!r}"
        for k in keys
        if not same_config_value(saved.get(k), current.get(k))
    ]


# Fields that change the computation but not the weights: a run may resume with other values.
RUNTIME_FIELDS = {"dtype", "ssd_impl", "decode_impl", "attn_impl"}


class Checkpointer:
    def __init__(self, directory: str, cfg: CheckpointConfig):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last,
            keep_period=cfg.keep_every,
            enable_async_checkpointing=cfg.async_save,
            create=True,
            # A save killed mid-write leaves a temporary directory that is never read; remove it.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def check_model(self, run_meta: dict) -> None:
        """Raise if the newest checkpoint was written for another model or another fine-tuning method."""
        step = self.latest_step()
        if step is None:
            return
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        saved = {k: v for k, v in meta["model"].items() if k not in RUNTIME_FIELDS}
        current = {k: v for k, v in run_meta["model"].items() if k not in RUNTIME_FIELDS}
        diff = _model_diff(saved, current)
        saved_peft = (meta.get("peft") or {}).get("method", "none")
        if saved_peft != run_meta.get("peft", {}).get("method", "none"):
            diff.append(f"peft.method: {saved_peft!r} → {run_meta['peft']['method']!r}")
        if diff:
            raise CheckpointMismatch(
                f"{self.directory} holds checkpoints (newest: step {step}) of a different model or run; differences "
                f"(checkpoint → config): {'; '.join(diff)}. Use another --workdir for this run, or move "
                f"the old checkpoints away. Nothing was changed."
            )

    def save(self, step: int, state, data_state: dict, run_meta: dict, *, force: bool = False) -> bool:
        if not bool(_params_finite(state.params)):
            raise FloatingPointError(f"refusing to checkpoint non-finite parameters at step {step}.")
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave({**run_meta, "step": step}),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state):
        """(state placed per abstract_state's shardings, data iterator state) of a checkpoint."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return out.state, out.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


@jax.jit
def _params_finite(params):
    # On device, so that it works for arrays no single process holds whole (multi-host).
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves))


def abstract_like(tree):
    """ShapeDtypeStructs with the shardings of a concrete tree: the target for restoring onto its mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
