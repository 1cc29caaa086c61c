"""Training metrics: JSONL and TensorBoard writers, tokens/s and model FLOPs utilisation.

MFU is 6 · N · tokens/s over the chip's dense bf16 peak (N = all parameters, embedding included), the
convention of shared/docs/PERFORMANCE.md, so our figures compare directly with the mamba_ssm anchors there.
"""

from __future__ import annotations

import json
import os

import jax

# Dense bf16 peak FLOP/s per device kind (datasheets); None where unknown (CPU).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12, "GH200": 989e12}


def peak_flops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in kind:
            return flops
    return None


def peak_memory_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


class MetricWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        # A run killed after its last checkpoint logged steps it will now redo: drop them.
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard is optional; the JSONL file always exists
            self._tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return v
