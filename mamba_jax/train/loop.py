"""The training loop, readable top to bottom (big_vision's train.py order):
config → mesh → input → model → sharded state → step → checkpoint / resume → eval → loop → sample.

Everything numerical lives in pure, jitted functions (mamba_jax/train/state.py); this file orchestrates:
data, checkpoints, metrics, progress, signals, and the rules that keep a run safe — a non-finite step is
skipped and counted, K in a row abort the run without checkpointing, SIGTERM / SIGINT save and exit, and
rerunning the same command resumes from the newest checkpoint in the work directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from mamba_jax import config as mjc
from mamba_jax.models.peft import PeftConfig
from mamba_jax.parallel.sharding import logical_to_spec, make_mesh, use_mesh
from mamba_jax.train import setup
from mamba_jax.train.checkpoint import Checkpointer, abstract_like
from mamba_jax.train.config import CheckpointConfig, OptimConfig, TrainConfig
from mamba_jax.train.metrics import MetricWriter, peak_flops, peak_memory_bytes
from mamba_jax.train.optim import make_optimizer, schedule
from mamba_jax.train.state import TrainState, init_state, make_eval_step, make_train_step


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (non-finite steps); the last good checkpoint is intact."""


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _write_config(c: ConfigDict, workdir: str) -> None:
    """Write the resolved config beside the checkpoints (atomically: a crash never leaves half a file)."""
    path = os.path.join(workdir, "config.json")
    text = c.to_json_best_effort(indent=2, sort_keys=True)
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)


class _StopSignal:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits at the next step boundary."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(c: ConfigDict, workdir: str) -> dict:
    """Train per the recipe `c` in `workdir`; returns the last logged metrics."""
    # --- config -----------------------------------------------------------------------------------
    model_cfg = mjc.model_config(c)
    tcfg = TrainConfig(**c.train.to_dict())
    ocfg = OptimConfig(**c.optim.to_dict())
    ckcfg = CheckpointConfig(**c.checkpoint.to_dict())
    peft = PeftConfig.from_dict(c.peft)
    rules = mjc.sharding_rules(c)
    os.makedirs(workdir, exist_ok=True)
    _log(f"mamba_jax.train: {c.name or 'recipe'} ({c.variant}) in {os.path.abspath(workdir)}")
    _log("config:\n" + c.to_json_best_effort(indent=2, sort_keys=True))

    # --- mesh -------------------------------------------------------------------------------------
    mesh = make_mesh(mjc.mesh_config(c))
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    accum = tcfg.accumulation_steps(dp)
    model_cfg.validate_tensor_parallel(mesh.shape["tensor"])
    sp = ", residual stream sharded over tensor (sequence parallel)" if c.mesh.tensor_sequence_parallel else ""
    _log(f"mesh: {dict(mesh.shape)}{sp} on {jax.device_count()} {jax.devices()[0].device_kind} device(s); "
         f"{accum} micro step(s) per optimizer step")  # fmt: skip

    # --- checkpoints: refuse another model's before touching anything -------------------------------
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), ckcfg)
    # The base of an adapter is reloaded from init_from whenever the checkpoint is used: keep it findable.
    init_from = os.path.abspath(tcfg.init_from) if tcfg.init_from else ""
    run_meta = {"model": model_cfg.to_dict(), "peft": dataclasses.asdict(peft), "init_from": init_from}
    ckpt.check_model(run_meta)

    # --- input ------------------------------------------------------------------------------------
    from mamba_jax.train import data as train_data  # the data pipeline pulls in grain: import when needed

    data_cfg = train_data.resolve_data(c, workdir, model_cfg)
    train_ds = train_data.make(data_cfg, "train", tcfg.global_batch_size, model_cfg.vocab_size)
    _write_config(c, workdir)  # only once the config has proven usable
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", None), rules))
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, *logical_to_spec(("batch", None), rules)))

    with use_mesh(mesh, rules):
        # --- model and sharded train state ----------------------------------------------------------
        tm = setup.build(model_cfg, peft, init_from=tcfg.init_from, seed=tcfg.seed, mesh=mesh, rules=rules)
        graphdef, frozen, n_params = tm.graphdef, tm.frozen, tm.n_params
        _log(
            f"model: {model_cfg.n_layers} layers '{model_cfg.pattern}', {n_params:,} parameters"
            + (f", training {tm.n_trainable:,} ({peft.method})" if peft.method != "none" else "")
            + (f", from {tcfg.init_from}" if tcfg.init_from else "")
        )
        dynamic_scale = tcfg.loss_scale == "dynamic" or (tcfg.loss_scale == "auto" and model_cfg.dtype == "float16")
        tx = make_optimizer(ocfg, tm.trainable, tcfg.steps)
        state = jax.jit(lambda p: init_state(p, tx, tcfg.seed, dynamic_scale))(tm.trainable)
        del tm

        # --- step functions ---------------------------------------------------------------------------
        sched = schedule(ocfg, tcfg.steps)
        train_step = jax.jit(
            make_train_step(graphdef, tx, tcfg, accum=accum, dynamic_scale=dynamic_scale, schedule=sched,
                            micro_sharding=micro_sharding),
            donate_argnums=0,
        )  # fmt: skip
        eval_step = jax.jit(make_eval_step(graphdef, tcfg))

        # --- resume -----------------------------------------------------------------------------------
        start = ckpt.latest_step()
        if start is not None:
            state, data_state = ckpt.restore(start, abstract_like(state))
            if data_state:  # a converted model (python -m mamba_jax.convert) has read no data yet
                train_ds.set_state(data_state)
            _log(f"resumed from step {start} ({ckpt.directory})")
        start = int(start or 0)
        writer = MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=start)

        def to_device(batch):
            return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)) for k, v in batch.items()}

        def evaluate(state) -> dict:
            eval_ds = train_data.make(data_cfg, "eval", tcfg.global_batch_size, model_cfg.vocab_size)
            loss_sum = tokens = 0.0
            for i, batch in enumerate(eval_ds):
                if i >= tcfg.eval_batches:
                    break
                out = eval_step(state.params, to_device(batch), frozen)
                loss_sum += float(out["loss_sum"])
                tokens += float(out["tokens"])
            loss = loss_sum / max(tokens, 1.0)
            out = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}
            if tcfg.eval_generate and data_cfg.kind == "sft":
                out.update(_evaluate_generation(graphdef, state.params, frozen, data_cfg, tcfg, mesh))
            return out

        # --- loop -------------------------------------------------------------------------------------
        tokens_per_step = tcfg.global_batch_size * data_cfg.seq_len
        peak = peak_flops()
        last: dict = {}
        if start >= tcfg.steps:
            _log(f"nothing to do: the checkpoint is at step {start} ≥ train.steps = {tcfg.steps}")
        progress = _Progress(start, tcfg.steps)
        window_t, window_steps = time.perf_counter(), 0
        with _StopSignal() as stop:
            for step in range(start + 1, tcfg.steps + 1):
                if tcfg.profile_steps and step == tcfg.profile_steps[0]:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                state, metrics = train_step(state, to_device(next(train_ds)), frozen)
                window_steps += 1
                if tcfg.profile_steps and step == tcfg.profile_steps[1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()

                stopping = stop.received is not None  # read once: the signal may land anywhere below
                is_log = step % tcfg.log_every == 0 or step == tcfg.steps or step == start + 1 or stopping
                is_ckpt = step % ckcfg.every_steps == 0 or step == tcfg.steps or stopping
                if is_log or is_ckpt:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    dt = time.perf_counter() - window_t
                    m["tokens_per_s"] = window_steps * tokens_per_step / dt
                    m["step_time_s"] = dt / window_steps
                    if peak:
                        m["mfu"] = 6 * n_params * m["tokens_per_s"] / (peak * jax.device_count())
                    if (mem := peak_memory_bytes()) is not None:
                        m["peak_memory_gib"] = mem / 2**30
                    window_t, window_steps = time.perf_counter(), 0
                    if (
                        tcfg.eval_every
                        and (step % tcfg.eval_every == 0 or step == tcfg.steps)
                        and not m["nonfinite_run"]
                    ):
                        m.update(evaluate(state))
                    writer.write(step, m)
                    progress.update(step, m)
                    last = {"step": step, **m}
                    if m["nonfinite_run"] >= tcfg.max_nonfinite_steps:
                        ckpt.close()
                        writer.close()
                        raise TrainingAborted(
                            f"{int(m['nonfinite_run'])} non-finite steps in a row at step {step} (each update was "
                            f"skipped); nothing after them was checkpointed, the newest checkpoint is step "
                            f"{ckpt.latest_step()}. "
                            f"Lower optim.lr, check the data, or use train.loss_scale=dynamic for float16."
                        )
                if is_ckpt:
                    ckpt.save(step, state, train_ds.get_state(), run_meta, force=True)
                if stopping:
                    ckpt.wait()
                    _log(f"stopped by signal {stop.received} at step {step}; checkpoint saved. "
                         f"Rerun the same command to resume.")  # fmt: skip
                    break
        progress.close()
        ckpt.close()
        writer.close()

        # --- sample -----------------------------------------------------------------------------------
        if tcfg.sample_prompt and stop.received is None and jax.process_index() == 0:
            last["sample"] = _sample(graphdef, state, frozen, data_cfg, tcfg)
    return last


def _evaluate_generation(graphdef, params, frozen, data_cfg, tcfg: TrainConfig, mesh) -> dict:
    """Exact match / F1 of greedy answers to the first `eval_generate` held-out SFT examples."""
    from mamba_jax.data.sft import load_split
    from mamba_jax.train.sft_eval import evaluate_generation

    tokenizer, _, examples = load_split(data_cfg.paths, data_cfg.tokenizer, data_cfg.prompt_template,
                                        data_cfg.eval_fraction)  # fmt: skip
    model = nnx.merge(graphdef, params, frozen)
    scores = evaluate_generation(
        model, tokenizer, examples[: tcfg.eval_generate], max_new_tokens=tcfg.eval_max_new_tokens, mesh=mesh
    )
    return {"eval_exact_match": scores["exact_match"], "eval_f1": scores["f1"]}


def _sample(graphdef, state: TrainState, frozen, data_cfg, tcfg: TrainConfig) -> str:
    from mamba_jax.data import load_tokenizer
    from mamba_jax.inference.api import generate
    from mamba_jax.train.data import tokenizer_path

    path = tokenizer_path(data_cfg)
    if path is None:
        return ""
    model = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(frozen))
    out = generate(
        model,
        tcfg.sample_prompt,
        tokenizer=load_tokenizer(path),
        max_new_tokens=tcfg.sample_tokens,
        temperature=tcfg.sample_temperature,
        top_k=tcfg.sample_top_k,
        seed=tcfg.seed,
    )[0]
    text = tcfg.sample_prompt + out.text
    how = (
        "greedy"
        if tcfg.sample_temperature == 0
        else f"temperature {tcfg.sample_temperature}, top-k {tcfg.sample_top_k}"
    )
    _log(f"sample ({how}):\n{text}")
    return text


class _Progress:
    """A progress bar with loss, tokens/s and ETA on a terminal; plain log lines otherwise."""

    def __init__(self, start: int, total: int):
        self.tty = sys.stdout.isatty() and jax.process_index() == 0
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.last = start

    def update(self, step: int, m: dict) -> None:
        line = (
            f"step {step}: loss {m['loss']:.4f}  grad_norm {m['grad_norm']:.3f}  lr {m['lr']:.2e}  "
            f"{m['tokens_per_s']:,.0f} tok/s" + (f"  MFU {100 * m['mfu']:.1f}%" if "mfu" in m else "")
        )
        if "eval_loss" in m:
            line += f"  eval_loss {m['eval_loss']:.4f}"
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:,.0f}")
            self.bar.write(line)
        else:
            _log(line)
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["TrainingAborted", "train"]
