"""Test set-up: 8 fake CPU devices (set before jax is imported), a persistent compilation cache, float32
matmuls, the `gpu` marker."""

import os
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# A persistent compilation cache for the whole run, subprocesses included (they inherit the environment):
# the suite compiles the same programs many times over — every `train()` of the tiny recipe, the e2e tests'
# straight / killed / resumed subprocesses — and XLA:CPU's compile is most of their time (the SIGKILL resume
# test: 41 → 25 s). Keys hash the program, the options and the jax version, so a stale entry is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mamba_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402

# Float32 references must be float32 on every backend (GPU matmuls would otherwise use TF32).
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
