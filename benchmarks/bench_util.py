"""What every benchmark here shares: timing a jitted call, the device's memory bandwidth, and the provenance
(command, device, versions, git revision) written with each result under `results/`.

The scripts run as `python benchmarks/<name>.py`, so this directory is on the path and they import it as
`bench_util`.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(fn, *args, reps: int = 20) -> float:
    """Median seconds of `fn(*args)` (until its outputs are ready) over `reps` calls after one warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bandwidth_bytes_per_s() -> tuple[float, float]:
    """(copy, read) bandwidth over 1 GiB: a + 1 (read + write) and a sum (read only, as a GEMV streams its
    weights)."""
    x = jnp.ones((1 << 28,), jnp.float32)
    copy = 2 * x.nbytes / timed(jax.jit(lambda a: a + 1), x, reps=10)
    read = x.nbytes / timed(jax.jit(lambda a: a.sum()), x, reps=10)
    return copy, read


def git_revision() -> str:
    if os.environ.get("GIT_REVISION"):  # the device machine's copy of the tree has no .git
        return os.environ["GIT_REVISION"]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return (rev or "unknown") + ("+uncommitted changes" if rev and dirty.strip() else "")
    except OSError:
        return "unknown"


def versions() -> dict:
    """Versions of what a result depends on: jax, jaxlib, flax, and torch / triton when the peer is importable."""
    from importlib import metadata

    out = {}
    for name in ("jax", "jaxlib", "flax", "torch", "triton"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def provenance() -> dict:
    """The fields every result JSON starts with."""
    return {
        "command": " ".join(["python3", *sys.argv]),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "versions": versions(),
        "git_revision": git_revision(),
        # the trace-time knobs (kernels/decode.py's MAMBA_JAX_DECODE_*, …) the run was given
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MAMBA_JAX_")},
    }


def write_result(path: str, result: dict) -> None:
    """`result` with its provenance, as indented JSON at `path` (nothing when `path` is empty)."""
    if path:
        with open(path, "w") as f:
            json.dump({**provenance(), **result}, f, indent=2)
