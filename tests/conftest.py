"""Test set-up: 8 fake CPU devices (set before jax is imported), XLA:CPU's code generation at -O0, a persistent
compilation cache, float32 matmuls, the `gpu` marker."""

import importlib.util
import os
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# The suite's programs run for milliseconds and compile for seconds, and most of a compile on the CPU is LLVM
# optimising the generated code: at -O0 the CPU suite takes ≈ 8 instead of ≈ 16 minutes on 2 cores. The flag
# is LLVM's level only; what a program computes is the same (no fast-math at any level), up to the last bits
# where -O2 would fuse a multiply and an add, far below every tolerance here. Only where jax has no
# accelerator plugin (jax_plugins: a CUDA jaxlib), so that the `gpu` tests compile at the default level.
if "xla_backend_optimization_level" not in _flags and importlib.util.find_spec("jax_plugins") is None:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

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
