"""The Mosaic GPU decode GEMV (mamba_jax.kernels.gemv): split-K partials against a float32 product. Mosaic's
interpret mode on the CPU; the `gpu` test compiles it at the 2.7B projection shapes."""

import jax
import jax.numpy as jnp
import pytest
from helpers import rel_err

from mamba_jax.kernels.gemv import gemv_t


def _check(b, k, n, **conf):
    kx, kw = jax.random.split(jax.random.key(b * 1000 + n))
    x = jax.random.normal(kx, (b, k), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (k, n), jnp.float32).astype(jnp.bfloat16)
    out = gemv_t(x, w, **conf)
    assert out.shape == (conf.get("splits", 1), n, b) and out.dtype == jnp.float32
    want = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest").T
    assert rel_err(out.sum(0), want) <= 1e-5


@pytest.mark.parametrize("b,k,n,conf", [
    (8, 256, 128, dict(bn=64, bk=64, splits=2, stages=2)),  # two K splits of two steps each
    (16, 512, 192, dict(bn=128, bk=128, splits=1, stages=4)),  # the last column tile half past N
])  # fmt: skip
def test_gemv_partials_sum_to_the_product(b, k, n, conf):
    _check(b, k, n, **conf)


def test_gemv_names_what_it_cannot_take():
    x, w = jnp.ones((8, 256), jnp.bfloat16), jnp.ones((256, 100), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 64"):
        gemv_t(x, w)
    with pytest.raises(ValueError, match="rows 3"):
        gemv_t(x[:3], jnp.ones((256, 128), jnp.bfloat16))
    with pytest.raises(ValueError, match="splits"):
        gemv_t(x, jnp.ones((256, 128), jnp.bfloat16), bk=128, splits=3)


@pytest.mark.gpu
@pytest.mark.parametrize("b,k,n,conf", [
    (8, 2560, 10624, dict(bn=128, bk=64, splits=1, stages=4)),  # 2.7B in_proj (columns padded to 64)
    (32, 5120, 2560, dict(bn=64, bk=128, splits=2, stages=4)),  # 2.7B out_proj at batch 32
])  # fmt: skip
def test_gemv_compiled_at_real_shapes_on_gpu(b, k, n, conf):
    _check(b, k, n, **conf)
