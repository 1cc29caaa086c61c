"""The CUDA skinny GEMM (`mamba_jax.kernels.skinny_gemm`): against a float32 product on fresh random inputs,
on the GPU (shapes that give CTAs unequal column shares, K slices, more CTAs than SMs, 1–32 rows, inside a
compiled loop); off the GPU, its XLA fallback and what it says it cannot run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.kernels.skinny_gemm import pack, skinny_gemm, unpack, unsupported


def _operands(m, k, n, seed):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (k, n), jnp.float32) * 0.05).astype(jnp.bfloat16)
    want = np.asarray(x, np.float32) @ np.asarray(w, np.float32)  # exact bf16 products, float32 sums
    return x, w, want


def _check(got, want, splits, out_dtype):
    got = np.asarray(got, np.float32)
    if splits > 1:
        assert got.shape == (splits, *want.shape)
        got = got.sum(0)
    assert got.shape == want.shape
    scale = np.abs(want).max()
    # float32 summation order (≈ 3e-6 of the largest output over K = 2560–5120 on an H100); bf16 rounding
    tol, atol = (1e-5, 1e-5 * scale) if out_dtype == jnp.float32 else (2**-8, 2**-8 * scale * 1e-2)
    np.testing.assert_allclose(got, want, rtol=tol, atol=atol)


@pytest.mark.parametrize("m,k,n,splits", [(3, 256, 64, 1), (5, 512, 200, 2), (32, 384, 24, 3)])
def test_fallback_off_the_gpu_is_the_float32_product(m, k, n, splits):
    x, w, want = _operands(m, k, n, seed=m)
    for weight in (w, pack(w, splits=splits, ctas=5)):
        got = skinny_gemm(x, weight, splits=splits, ctas=5)
        assert got.dtype == (jnp.float32 if splits > 1 else jnp.bfloat16)
        _check(got, want, splits, got.dtype)


@pytest.mark.parametrize("n,splits,ctas", [(10576, 1, 132), (2560, 2, 132), (1032, 1, 3), (64, 1, 132)])
def test_pack_round_trips(n, splits, ctas):
    w = jnp.arange(48 * n, dtype=jnp.float32).reshape(48, n)
    p = pack(w, splits=splits, ctas=ctas)
    assert p.shape == (n // 8, 48, 8)
    np.testing.assert_array_equal(unpack(p, splits=splits, ctas=ctas), w)


def test_says_what_it_cannot_run():
    assert "rows" in unsupported(33, 256, 64)
    assert "N % 8" in unsupported(4, 256, 60)
    assert "(K / splits) % 16" in unsupported(4, 264, 64, splits=2)
    assert "float32" in unsupported(4, 256, 64, dtype=jnp.float32)
    if jax.default_backend() != "gpu":
        assert "Hopper" in unsupported(4, 256, 64)
    with pytest.raises(ValueError, match="must be \\(K, N\\)"):
        skinny_gemm(jnp.zeros((2, 8), jnp.bfloat16), jnp.zeros((16, 8), jnp.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,splits,ctas,out", [
    (1, 2560, 10576, 1, 0, jnp.bfloat16),  # Mamba2-2.7B in_proj at batch 1: 1,322 units over the SMs
    (32, 2560, 10576, 1, 0, jnp.bfloat16),  # … at batch 32: two 16-row tiles
    (17, 2560, 10576, 2, 0, jnp.float32),  # odd rows, K slices
    (32, 5120, 2560, 2, 0, jnp.float32),  # out_proj, float32 partials
    (16, 5120, 2560, 4, 0, jnp.float32),
    (7, 5120, 2560, 1, 0, jnp.float32),  # one float32 product
    (9, 768, 3352, 1, 0, jnp.bfloat16),  # 130M in_proj: K of 6 slots, 419 units
    (32, 400, 1032, 1, 3, jnp.bfloat16),  # 3 CTAs asked: 16 units each, more CTAs than asked; K with a short slot
    (2, 48, 8, 1, 0, jnp.bfloat16),  # one unit, a partial slot
])  # fmt: skip
def test_kernel_matches_the_float32_product_on_gpu(m, k, n, splits, ctas, out):
    assert unsupported(m, k, n, splits) is None
    x, w, want = _operands(m, k, n, seed=k + n + m)
    for weight in (w, pack(w, splits=splits, ctas=ctas)):  # row-major, and packed by CTA
        got = jax.jit(lambda x, w: skinny_gemm(x, w, splits=splits, out_dtype=out, ctas=ctas))(x, weight)
        hlo = jax.jit(lambda x, w: skinny_gemm(x, w, splits=splits)).lower(x, weight).as_text()
        assert "mamba_jax_skinny_gemm" in hlo
        _check(got, want, splits, out if splits == 1 else jnp.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_chained_products_on_gpu(pdl):
    """One product feeding the next directly: with programmatic dependent launch the second starts before the
    first ends and must still read its finished output."""
    x, w1, _ = _operands(32, 2560, 5120, seed=4)
    _, w2, _ = _operands(32, 5120, 2560, seed=5)
    f = jax.jit(lambda x: skinny_gemm(skinny_gemm(x, w1, pdl=pdl), w2, pdl=pdl, out_dtype=jnp.float32))
    y1 = (np.asarray(x, np.float32) @ np.asarray(w1, np.float32)).astype(jnp.bfloat16)
    want = np.asarray(y1, np.float32) @ np.asarray(w2, np.float32)
    # y1 rounds to bf16 in both; where float32 order flips a rounding, a term moves by one bf16 ulp
    np.testing.assert_allclose(np.asarray(f(x)), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_kernel_in_a_compiled_loop_on_gpu(pdl):
    """Inside a while loop (XLA's command buffers capture the FFI call): every iteration's product."""
    x, w, _ = _operands(32, 1024, 512, seed=3)

    def body(i, carry):
        x, acc = carry
        y = skinny_gemm(x, w, splits=2, pdl=pdl).sum(0)
        return (x * 0.5).astype(x.dtype), acc + y

    _, acc = jax.jit(lambda x: jax.lax.fori_loop(0, 4, body, (x, jnp.zeros((32, 512), jnp.float32))))(x)
    xs = [np.asarray(x, np.float32) * 0.5**i for i in range(4)]
    want = sum(xi @ np.asarray(w, np.float32) for xi in xs)
    np.testing.assert_allclose(np.asarray(acc), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
