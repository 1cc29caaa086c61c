"""mamba_jax's own checkpoints, in the training loop's layout (mamba_jax/train/checkpoint.py):

    WORKDIR/config.json                      the resolved recipe (its `model` section is the model)
    WORKDIR/checkpoints/<step>/state         Orbax StandardSave of the TrainState (params, opt_state, step, …)
    WORKDIR/checkpoints/<step>/data          the data iterator's position (JSON)
    WORKDIR/checkpoints/<step>/meta          {"model": ModelConfig dict, "step": step, …} (JSON)

`load_native` accepts the work directory (→ its newest finished checkpoint), its checkpoints/ folder, or one
step folder, and restores only `params` (Orbax partial restore), straight into the shards of a mesh when one is
given. `save_native` writes a converted model as step 0 of such a work directory, through the training loop's
own `Checkpointer`: the params with a fresh optimizer state (what `init_state` makes for the default AdamW
recipe, all zeros) and an empty data position `{}` (no data stream has been read), or the params alone.
"""

from __future__ import annotations

import os

import flax.struct
import jax
import orbax.checkpoint as ocp
from flax import nnx

from mamba_jax.interop.errors import ConversionError
from mamba_jax.interop.placement import abstract_language_model, target_shardings
from mamba_jax.models.config import ConfigError, ModelConfig
from mamba_jax.models.lm import LanguageModel


@flax.struct.dataclass
class ParamsOnly:
    """A checkpoint `state` of the parameters alone (smaller; the training loop cannot resume it)."""

    params: nnx.State


def _committed_steps(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return sorted(
        int(n)
        for n in os.listdir(root)
        if n.isdigit() and os.path.exists(os.path.join(root, n, "_CHECKPOINT_METADATA"))
    )


def find_checkpoint(path: str) -> tuple[str, int] | None:
    """(checkpoints folder, step) that `path` names, or None when it is no mamba_jax checkpoint."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        root = os.path.join(path, "checkpoints")
    elif os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(path), int(os.path.basename(path))
    elif _committed_steps(path):
        root = path
    else:
        return None
    steps = _committed_steps(root)
    if not steps:
        raise ConversionError(
            f"{root} holds no finished checkpoint (a run that stopped before its first save, or a save that was "
            f"interrupted); train until a checkpoint is written, or point at another one."
        )
    return root, steps[-1]


def ensure_no_checkpoints(workdir: str) -> None:
    """Refuse a work directory that already holds checkpoints: a conversion never mixes with a run."""
    steps = _committed_steps(os.path.join(workdir, "checkpoints"))
    if steps:
        raise ConversionError(
            f"{workdir} already holds checkpoints (steps {steps}); nothing was written. Choose an empty directory "
            f"for the converted model."
        )


def workdir_of(path: str) -> str:
    """The work directory of a checkpoint path (where config.json and tokenizer files live)."""
    root, _ = find_checkpoint(path)
    return os.path.dirname(root)


def read_meta(root: str, step: int) -> dict:
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        os.path.join(root, str(step), "meta"), args=ocp.args.JsonRestore()
    )


def load_native(path: str, *, mesh=None, dtype: str | None = None, param_dtype: str | None = None, rules=None):
    """A LanguageModel from a mamba_jax checkpoint (params only), on `mesh` when given. Returns (model, step)."""
    root, step = find_checkpoint(path)
    meta = read_meta(root, step)
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (KeyError, ConfigError) as e:
        raise ConversionError(f"{root}/{step}/meta does not hold a usable model config ({e}).") from e
    changes = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    cfg = cfg.replace(**changes)
    peft = meta.get("peft") or {}
    if peft.get("method", "none") != "none":
        return _load_adapter(root, step, meta, mesh=mesh, dtype=dtype, param_dtype=param_dtype, rules=rules), step
    graphdef, abstract = nnx.split(abstract_language_model(cfg))
    params = _restore_params(root, step, abstract, target_shardings(cfg, abstract, mesh, rules))
    return nnx.merge(graphdef, params), step


def _restore_params(root: str, step: int, abstract, shardings: dict):
    """The `params` of a checkpoint's TrainState (Orbax partial restore), placed per `shardings`."""
    flat = [
        (p, v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=shardings[p])))
        for p, v in nnx.to_flat_state(abstract)
    ]
    item = {"params": nnx.from_flat_state(flat)}
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(root, str(step), "state"),
        args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
        ),
    )
    return restored["params"]


def _load_adapter(root: str, step: int, meta: dict, *, mesh, dtype, param_dtype, rules):
    """A LoRA / prompt-tuning checkpoint holds the adapter alone: its base (the run's `init_from`, recorded
    in the meta) is loaded first, the adapter is attached and filled from the checkpoint."""
    from mamba_jax.interop.pretrained import from_pretrained
    from mamba_jax.models.peft import PeftConfig, apply_peft

    base_path = meta.get("init_from") or ""
    if not base_path or not os.path.exists(base_path):
        raise ConversionError(
            f"{root}/{step} is a {meta['peft']['method']} adapter whose base model {base_path!r} is not there; "
            f"the adapter needs the weights it was trained on (the run's train.init_from)."
        )
    peft = PeftConfig.from_dict(meta["peft"])
    model = from_pretrained(base_path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, rules=rules)
    apply_peft(model, peft)
    graphdef, trainable, frozen = nnx.split(model, peft.trainable(), ...)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = {path: one for path, _ in nnx.to_flat_state(trainable)}
    else:
        from mamba_jax.parallel.sharding import DEFAULT_RULES, state_shardings

        shardings = {
            p: v.get_value() for p, v in nnx.to_flat_state(state_shardings(trainable, mesh, rules or DEFAULT_RULES))
        }
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), trainable)
    return nnx.merge(graphdef, _restore_params(root, step, abstract, shardings), frozen)


def save_native(
    model: LanguageModel,
    workdir: str,
    *,
    name: str = "",
    tokenizer: str | None = None,
    optimizer_state: bool = True,
    seed: int = 0,
) -> str:
    """Write `model` as step 0 of a training work directory (see the module docstring). Returns the step dir."""
    from mamba_jax import config as mjc
    from mamba_jax.interop.hf_checkpoint import copy_tokenizer
    from mamba_jax.train.checkpoint import Checkpointer
    from mamba_jax.train.config import CheckpointConfig, OptimConfig, TrainConfig
    from mamba_jax.train.optim import make_optimizer
    from mamba_jax.train.state import init_state

    workdir = os.path.abspath(workdir)
    root = os.path.join(workdir, "checkpoints")
    ensure_no_checkpoints(workdir)
    os.makedirs(workdir, exist_ok=True)
    cfg = model.cfg
    params = nnx.state(model)
    if optimizer_state:
        tx = make_optimizer(OptimConfig(), params, TrainConfig().steps)
        state = jax.jit(lambda p: init_state(p, tx, seed, dynamic_scale=False))(params)
    else:
        state = ParamsOnly(params)
    ckpt = Checkpointer(root, CheckpointConfig(async_save=False))
    try:
        # The run metadata of a full-training run that has not started (no fine-tuning method, no init_from).
        ckpt.save(0, state, {}, {"model": cfg.to_dict()}, force=True)
    finally:
        ckpt.close()

    c = mjc.base_config()
    c.name = name or "converted"
    c.model.update(cfg.to_dict())
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
        f.write(c.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(tmp, os.path.join(workdir, "config.json"))
    copy_tokenizer(tokenizer, workdir)
    return os.path.join(root, "0")
