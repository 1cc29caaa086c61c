"""Typed training configuration: the `train`, `optim` and `checkpoint` sections of a recipe's ConfigDict.

Defaults follow the NeMo 2 recipes for these models (shared/docs/REFERENCE.md): Adam β = (0.9, 0.95),
eps 1e-5, weight decay 0.1, clipping at 1.0, cosine decay after a linear warm-up, bf16 compute with float32
master weights. Library code reads these dataclasses, never the ConfigDict.
"""

from __future__ import annotations

import dataclasses

REMAT = ("none", "full", "selective")
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 8  # sequences per optimizer step, over all devices and micro steps
    micro_batch_size: int | None = None  # per data-parallel rank and micro step; None: no accumulation
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: no validation during training
    eval_batches: int = 8
    remat: str = "selective"  # activation checkpointing: none | full | selective (see mamba_jax.models.stack)
    remat_layers: str = "M*-"  # which layer symbols it applies to
    loss_scale: str = "auto"  # auto (dynamic for float16, none otherwise) | dynamic | none
    max_nonfinite_steps: int = 5  # abort after this many non-finite steps in a row
    loss_chunk: int = 1024  # cross-entropy in chunks of this many tokens (the (B, L, V) logits never exist)
    sample_prompt: str = ""  # if set, a sample is generated from it at the end of training
    sample_tokens: int = 64
    sample_temperature: float = 0.0  # 0: greedy
    sample_top_k: int = 0
    profile_steps: tuple[int, int] | None = None  # (first, last) step of a jax profiler trace
    init_from: str = ""  # start from these weights: a mamba_jax checkpoint / work dir or a Hugging Face dir
    eval_generate: int = 0  # sft data: held-out examples answered by generation for exact match / F1
    eval_max_new_tokens: int = 32
    # fp8 projections in training (tensorwise current scaling, mamba_jax.ops.fp8), except in the first and last
    # fp8_bf16_layers layers (NeMo's Nemotron-H 47B / 56B recipe: fp8 with 2 and 2 kept in bf16).
    fp8: bool = False
    fp8_bf16_layers: int = 0

    def __post_init__(self):
        if self.steps <= 0 or self.global_batch_size <= 0:
            raise ValueError("train.steps and train.global_batch_size must be positive.")
        if self.remat not in REMAT:
            raise ValueError(f"train.remat must be one of {REMAT}, got {self.remat!r}.")
        if self.loss_scale not in ("auto", "dynamic", "none"):
            raise ValueError(f"train.loss_scale must be auto, dynamic or none, got {self.loss_scale!r}.")
        if self.fp8_bf16_layers < 0:
            raise ValueError(f"train.fp8_bf16_layers must be ≥ 0, got {self.fp8_bf16_layers}.")
        if self.profile_steps is not None:
            object.__setattr__(self, "profile_steps", tuple(self.profile_steps))

    def fp8_layers(self, n_layers: int) -> tuple[int, int] | None:
        """The half-open range of layers whose projections train in fp8, or None."""
        if not self.fp8:
            return None
        return (self.fp8_bf16_layers, max(n_layers - self.fp8_bf16_layers, self.fp8_bf16_layers))

    def accumulation_steps(self, data_parallel: int) -> int:
        """Micro steps per optimizer step, checking global = micro × steps × data-parallel size."""
        if self.global_batch_size % data_parallel:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) is not divisible by the data-parallel size "
                f"({data_parallel} = mesh.data × mesh.fsdp); choose a multiple of {data_parallel}."
            )
        per_rank = self.global_batch_size // data_parallel
        micro = self.micro_batch_size or per_rank
        if per_rank % micro:
            raise ValueError(
                f"train.micro_batch_size ({micro}) must divide the per-rank batch ({per_rank} = global batch "
                f"{self.global_batch_size} / data-parallel {data_parallel})."
            )
        return per_rank // micro


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 2000
    decay_steps: int | None = None  # None: decay until train.steps
    schedule: str = "cosine"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # clip by global norm; 0 disables

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim needs 0 ≤ min_lr ≤ lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}.")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 3  # the newest N checkpoints are kept …
    keep_every: int | None = None  # … plus every checkpoint whose step is a multiple of this
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps <= 0 or self.keep_last <= 0:
            raise ValueError("checkpoint.every_steps and checkpoint.keep_last must be positive.")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Raw text to turn into token shards before training (skipped when `inputs` is empty).

    The shards go to `output` (default: <workdir>/corpus) and become the training data; preparation is
    idempotent, so a resumed run finds them ready. Either name a `tokenizer` or let one be trained on the
    corpus with `train_tokenizer_vocab` tokens.
    """

    inputs: tuple[str, ...] = ()  # files or globs: .jsonl / .json (field below) or plain text
    output: str = ""
    tokenizer: str = ""
    train_tokenizer_vocab: int = 0
    field: str = "text"
    text_mode: str = "file"  # file: one document per file; line: one per non-empty line
    workers: int = 2
    max_files: int = 0  # use only the first N files (sorted) when > 0
