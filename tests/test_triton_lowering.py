"""The Pallas-Triton decode kernels lower to Triton IR for an H100 on a machine without a GPU.

Interpret mode (tests/test_decode_kernels.py) checks their arithmetic but not that Triton's lowering accepts
them: an unsupported op, a type mismatch in an index computation or a bad cache modifier shows up only on the
GPU. jax lowers a Pallas-Triton call to Triton IR in Python (compilation to PTX happens later, in XLA), so
exporting for "cuda" here runs that lowering; the only GPU query on the way, the compute capability, is
answered with sm_90. Relies on jax internals (`jax._src.pallas.triton.gpu_info`): skipped where they moved.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from mamba_jax.kernels import decode as kd
from mamba_jax.kernels import gemv_q as gq
from mamba_jax.kernels import norm_gemv as ng

gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")


@pytest.fixture
def as_h100(monkeypatch):
    if not hasattr(gpu_info, "get_gpu_info") or not hasattr(gpu_info, "GpuInfo"):
        pytest.skip("jax moved the Pallas-Triton GPU query")
    h100 = gpu_info.GpuInfo(gpu_version=None, arch_name="sm_90", compute_capability=90)
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: h100)
    for module in (kd, ng, gq):  # the compiled path, not the interpreter
        monkeypatch.setattr(module, "_interpret", lambda: False)


def _lower(fn, *args):
    """Exports `fn` for CUDA (running the Triton lowering) and checks its kernels became Triton custom calls."""
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def _s(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("batch,state_dtype,prefetch,trigger,hp,split,zx_splits", [
    (1, jnp.bfloat16, 4096, False, 1, False, 0),  # batch 1: the prefetch row of programs
    (1, jnp.bfloat16, -4096, False, 1, False, 0),  # < 0: prefetching a float8 weight's bytes (uint8)
    (1, jnp.bfloat16, 4096, True, 1, False, 0),  # the PDL trigger of the opt-in Mosaic out_proj
    (32, jnp.float32, 0, False, 1, False, 0),
    (32, jnp.bfloat16, 0, False, 2, False, 0),  # two heads per program
    (32, jnp.bfloat16, 0, False, 1, True, 0),  # two launches (conv, then the state update)
    (32, jnp.bfloat16, 0, True, 2, True, 0),
    (32, jnp.bfloat16, 0, False, 1, True, 2),  # in_proj's output as float32 split-K partials
    (4, jnp.bfloat16, 4096, False, 1, False, 3),
])  # fmt: skip
def test_ssm_step_lowers(as_h100, batch, state_dtype, prefetch, trigger, hp, split, zx_splits):
    g, h, p, s, k, d = 1, 8, 64, 128, 4, 512  # Mamba2-2.7B's head dim and state size, fewer heads
    w = 2 * h * p + 2 * s + h
    f = h * p + 2 * s
    bf16 = jnp.bfloat16
    step = functools.partial(
        kd.ssm_step, heads=h, dt_limit=(0.0, float("inf")), norm_eps=1e-5, g_dtype=bf16,
        prefetch_elems=abs(prefetch), g_rows=8 if trigger else None, trigger=trigger, heads_per_program=hp, split=split,
        zx_dtype=bf16,
    )  # fmt: skip

    def fn(zx, conv, cw, cb, ssm, a_log, dvec, dtb, u, pf):
        return step(zx, conv, cw, cb, ssm, a_log, dvec, dtb, 5, u, prefetch=pf if prefetch else None)

    zx = _s((zx_splits, batch, g, w)) if zx_splits else _s((batch, g, w), bf16)
    _lower(fn, zx, _s((batch, k, g, f), bf16), _s((k, g, f), bf16), _s((g, f), bf16),
           _s((batch, h, p, s), state_dtype), _s((h,)), _s((h,)), _s((h,)), _s((batch, d)),
           _s((d, 2 * d), bf16 if prefetch >= 0 else jnp.uint8))  # fmt: skip


@pytest.mark.parametrize("state_dtype,hp,groups", [(jnp.bfloat16, 1, 1), (jnp.float32, 2, 2)])
def test_windowed_ssm_step_lowers(as_h100, state_dtype, hp, groups):
    """The split step with the state written back once per window (`ssm_step(window=…)`)."""
    batch, h, p, s, k, d, nwin = 32, 8, 64, 128, 4, 512, 8
    w = 2 * h // groups * p + 2 * s + h // groups
    f = h // groups * p + 2 * s
    bf16 = jnp.bfloat16
    step = functools.partial(
        kd.ssm_step, heads=h, dt_limit=(0.0, float("inf")), norm_eps=1e-5, g_dtype=bf16, heads_per_program=hp,
        split=True,
    )  # fmt: skip

    def fn(zx, conv, cw, cb, ssm, a_log, dvec, dtb, u, pos):
        window = kd.state_window(batch, h, p, groups, s, nwin, bf16)
        return step(zx, conv, cw, cb, ssm, a_log, dvec, dtb, pos, u, window=window)

    _lower(fn, _s((batch, groups, w), bf16), _s((batch, k, groups, f), bf16), _s((k, groups, f), bf16),
           _s((groups, f), bf16), _s((batch, h, p, s), state_dtype), _s((h,)), _s((h,)), _s((h,)), _s((batch, d)),
           _s((), jnp.int32))  # fmt: skip


@pytest.mark.parametrize("layout", [None, "SDB", "SBD"])
def test_gated_norm_residual_lowers(as_h100, layout):
    b, d = 3, 2560
    out = {None: _s((b, d), jnp.bfloat16), "SDB": _s((2, d, 8)), "SBD": _s((4, b, d))}[layout]
    fn = functools.partial(
        kd.gated_norm_residual, norm_dim=5120, eps=1e-5, layout=layout, copy_dtype=jnp.bfloat16,
        out_dtype=jnp.bfloat16 if layout else None,
    )  # fmt: skip
    _lower(fn, _s((b, d)), out, _s((b, 80, 4)))


def test_norm_gemv_lowers(as_h100):
    fn = functools.partial(ng.norm_gemv, eps=1e-5, groups=1)
    _lower(fn, _s((1, 2560)), _s((2560,)), _s((2560, 1024), jnp.bfloat16), _s((1, 1024)))


@pytest.mark.parametrize("b,k,n,conf", [
    (1, 2560, 10576, dict(mode="fma")),  # a 2.7B in_proj at batch 1: float8 tiles, FMA products
    (1, 2560, 10576, dict(mode="dot")),
    (3, 5120, 2560, dict(mode="dot", splits=4, partials=True)),  # out_proj: split-K partials
    (32, 5120, 2560, dict(mode="dot", splits=2)),  # 32 rows; the partials summed by XLA
])  # fmt: skip
def test_gemv_q_lowers(as_h100, b, k, n, conf):
    fn = functools.partial(gq.gemv_q, **conf)
    _lower(fn, _s((b, k), jnp.bfloat16), _s((k, n), jnp.float8_e4m3fn), _s((n,)))
