"""The Mosaic GPU decode GEMVs (mamba_jax.kernels.gemv: `gemv_t`'s split-K partials, `gemv_stream`'s stream-K
partials) against a float32 product. Mosaic's interpret mode on the CPU; the `gpu` tests compile them at the
2.7B projection shapes."""

import jax
import jax.numpy as jnp
import pytest
from helpers import rel_err

from mamba_jax.kernels.gemv import gemv_stream, gemv_t, stream_slots


def _check(b, k, n, fn=gemv_t, slots=None, **conf):
    kx, kw = jax.random.split(jax.random.key(b * 1000 + n))
    x = jax.random.normal(kx, (b, k), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (k, n), jnp.float32).astype(jnp.bfloat16)
    out = fn(x, w, **conf)
    assert out.shape == (slots or conf.get("splits", 1), n, b) and out.dtype == jnp.float32
    want = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest").T
    assert rel_err(out.sum(0), want) <= 1e-5


@pytest.mark.parametrize("b,k,n,conf", [
    (8, 256, 128, dict(bn=64, bk=64, splits=2, stages=2)),  # two K splits of two steps each
    (16, 512, 192, dict(bn=128, bk=128, splits=1, stages=4)),  # the last column tile half past N
])  # fmt: skip
def test_gemv_partials_sum_to_the_product(b, k, n, conf):
    _check(b, k, n, **conf)


@pytest.mark.parametrize("b,k,n,conf,slots", [
    (8, 256, 192, dict(bn=64, bk=64, programs=5, stages=2), 2),  # 12 boxes over 5 programs: tiles shared by 2
    (16, 512, 320, dict(bn=64, bk=128, programs=3, stages=3), 2),  # 20 boxes over 3: a program spans 3 tiles
    (32, 1024, 128, dict(bn=64, bk=64, programs=12, stages=3), 6),  # 32 boxes over 12: a tile split 6 ways
    (8, 256, 192, dict(bn=128, bk=64, programs=3, stages=2), 2),  # the last tile half past N
    (8, 256, 128, dict(bn=64, bk=128, programs=16, stages=2), 2),  # more programs than boxes: one box each
])  # fmt: skip
def test_stream_gemv_partials_sum_to_the_product(b, k, n, conf, slots):
    """Each program's range of (column tile, K step) boxes crosses tile boundaries at different places; every
    slot a tile's programs do not fill must come back zero, or the sum would take garbage."""
    _check(b, k, n, fn=gemv_stream, slots=slots, **conf)


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


@pytest.mark.gpu
@pytest.mark.parametrize("b,k,n,conf", [
    (8, 2560, 10624, dict(bn=64, bk=128, programs=132, stages=8)),  # 2.7B in_proj (columns padded to 64)
    (32, 2560, 10624, dict(bn=128, bk=128, programs=132, stages=4)),  # last tile half past N
    (32, 5120, 2560, dict(bn=64, bk=128, programs=132, stages=8)),  # 2.7B out_proj: tiles split 5 ways
])  # fmt: skip
def test_stream_gemv_compiled_at_real_shapes_on_gpu(b, k, n, conf):
    slots = stream_slots(-(-n // conf["bn"]), k // conf["bk"], conf["programs"])
    _check(b, k, n, fn=gemv_stream, slots=slots, **conf)
