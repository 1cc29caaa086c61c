"""The SSM step and out_proj in one launch (mamba_jax.kernels.step_out, Mosaic GPU): against the Triton step kernel
and a float32 product, and a model decoding with it against the full forward. Mosaic GPU interpret mode on the
CPU; the `gpu` test in tests/test_decode_kernels.py runs it compiled at real widths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_err, small_hybrid
from test_decode_kernels import _prefill, _random_norm_weights, _teacher_forced_logits

from mamba_jax.inference.engine import Engine, SamplingParams
from mamba_jax.inference.fold import fold_norm_weights
from mamba_jax.kernels import decode as kd
from mamba_jax.kernels import step_out as so
from mamba_jax.parallel import init_model


@pytest.mark.parametrize("groups,batch,ranges,block_c,state_dtype,pos", [
    (1, 1, 2, 64, jnp.float32, 9),  # two column ranges per head: the second recomputes the step, writes nothing
    (2, 3, 1, 64, jnp.bfloat16, 10),  # two groups, three rows, two tiles per program, bf16 states, even position
    (2, 2, 1, 128, jnp.float32, 7),
])  # fmt: skip
def test_step_out_matches_the_step_kernel_and_the_product(groups, batch, ranges, block_c, state_dtype, pos):
    h, p, s, taps, n = 4, 64, 32, 3, 128
    r = h // groups
    f, w = r * p + 2 * s, 2 * r * p + 2 * s + r
    ks = jax.random.split(jax.random.key(batch), 10)
    zx = jax.random.normal(ks[0], (batch, groups, w), jnp.float32)
    conv = jax.random.normal(ks[1], (batch, taps, groups, f), jnp.float32)
    cw = jax.random.normal(ks[2], (taps + 1, groups, f), jnp.float32) / 2
    cb = jax.random.normal(ks[3], (groups, f), jnp.float32) / 4
    ssm = jax.random.normal(ks[4], (batch, h, p, s), jnp.float32).astype(state_dtype)
    a_log = jnp.log(jax.random.uniform(ks[5], (h,), jnp.float32, 1, 16))
    dvec = jax.random.normal(ks[6], (h,), jnp.float32)
    dtb = jax.random.normal(ks[7], (h,), jnp.float32)
    u = jax.random.normal(ks[8], (batch, 300), jnp.float32) * 2  # the raw residual (input norm folded); 300 > 256
    w_FN = jax.random.normal(ks[9], (h * p, n), jnp.float32)
    ring = kd.conv_ring(conv, pos)
    kw = {"heads": h, "dt_limit": (0.01, 0.1) if groups > 1 else (0.0, float("inf")), "norm_eps": 1e-5}
    g_BF, ss_BHJ, ring_want, ssm_want = kd.ssm_step(zx, ring, cw, cb, ssm, a_log, dvec, dtb, pos, u, **kw)
    parts, ss_BHP, ring_new, ssm2 = so.ssm_step_out(
        zx, ring, cw, cb, so.state_slots(ssm), a_log, dvec, dtb, pos, u, w_FN, ranges=ranges, block_c=block_c, **kw
    )
    assert parts.shape == (h, batch, n) and parts.dtype == jnp.float32
    assert rel_err(parts.sum(0), jnp.dot(g_BF, w_FN, precision="highest")) <= 1e-5
    assert rel_err(ss_BHP.sum(-1), ss_BHJ.sum(-1)) <= 1e-5
    np.testing.assert_array_equal(ring_new, ring_want)
    new = ssm2[(pos + 1) % 2].astype(jnp.float32)  # the new state in the other slot
    assert rel_err(new, ssm_want.astype(jnp.float32)) <= (1e-5 if state_dtype == jnp.float32 else 1e-2)
    np.testing.assert_array_equal(ssm2[pos % 2], ssm)  # the old one untouched (other ranges' programs read it)


def test_step_out_rejects_what_it_cannot_take():
    assert so.step_out_unsupported(1, 64, 128, 2560, 5, 256) is None
    assert "head dim" in so.step_out_unsupported(1, 32, 128, 2560, 5, 256)
    assert "batch" in so.step_out_unsupported(so.MAX_BATCH + 1, 64, 128, 2560, 5, 256)
    assert "ranges" in so.step_out_unsupported(1, 64, 128, 2560, 3, 256)


def test_residual_kernel_sums_many_partials():
    """One partial per head (more than the residual kernel unrolls): summed as one block."""
    b, d, heads = 2, 200, 80
    ks = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(ks[0], (b, d), jnp.float32)
    parts = jax.random.normal(ks[1], (heads, b, d), jnp.float32)
    ss = jax.random.uniform(ks[2], (b, heads, 4), jnp.float32, 0.5, 2.0)
    got = kd.gated_norm_residual(h, parts, ss, norm_dim=512, eps=1e-5, out_dtype=jnp.float32, layout="SBD")
    inv = jax.lax.rsqrt(ss.sum((1, 2))[:, None] / 512 + 1e-5)
    assert rel_err(got, h + parts.sum(0) * inv) <= 1e-6


def test_step_out_config_reads_the_knob(monkeypatch):
    assert so.step_out_config(1) is None  # off unless asked for
    monkeypatch.setenv("MAMBA_JAX_DECODE_STEP_OUT", "5,256")
    assert so.step_out_config(1) == {"ranges": 5, "block_c": 256}
    assert so.step_out_config(so.MAX_BATCH + 1) is None
    monkeypatch.setenv("MAMBA_JAX_DECODE_STEP_OUT", "5")
    with pytest.raises(ValueError, match=r"MAMBA_JAX_DECODE_STEP_OUT.*two integers"):
        so.step_out_config(1)


def _model_cfg(pattern, **changes):
    return small_hybrid(pattern=pattern, d_model=128, mamba_head_dim=64, mamba_d_state=32, mamba_num_groups=1,
                        **changes)  # fmt: skip


@pytest.mark.parametrize("pattern,batch", [("MM", 2), ("M*-M", 1)])
def test_decoding_with_step_out_equals_full_forward(monkeypatch, pattern, batch):
    monkeypatch.setenv("MAMBA_JAX_DECODE_STEP_OUT", "2,64")
    cfg = _model_cfg(pattern, decode_impl="pallas", residual_in_fp32=True)
    reference = _random_norm_weights(init_model(cfg, seed=5), seed=batch)
    model = fold_norm_weights(nnx.clone(reference))
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(1, 250, n).tolist() for n in rng.integers(2, 20, batch)]
    cont = [rng.integers(1, 250, 3).tolist() for _ in range(batch)]
    _, cache, l, start = _prefill(model, prompts, 3)
    states = [c for path, c in jax.tree_util.tree_leaves_with_path(cache) if getattr(path[-1], "key", "") == "ssm"]
    assert states and all(c.shape[-5:-3] == (2, batch) for c in states)  # double-buffered by prefill
    decode = jax.jit(lambda t, c, pos: model.decode(t, c, pos=pos, start=jnp.asarray(start)))
    assert "ssm_step_out" in str(jax.make_jaxpr(decode)(jnp.zeros(batch, jnp.int32), cache, l))
    inc = _teacher_forced_logits(model, prompts, cont, 3)
    for b, (p, c) in enumerate(zip(prompts, cont, strict=True)):
        full = reference(jnp.asarray([p + c]))[0, len(p) :]
        assert rel_err(inc[b], full) <= 1e-4, b


def test_engine_with_step_out_generates_as_xla(monkeypatch):
    model = _random_norm_weights(init_model(_model_cfg("MM"), seed=2), seed=1)
    prompts = [[5, 9, 2, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    xla = Engine(model, decode_impl="xla", state_dtype="bfloat16").generate(prompts, params)
    monkeypatch.setenv("MAMBA_JAX_DECODE_STEP_OUT", "1,128")
    fused = Engine(model, decode_impl="pallas", state_dtype="bfloat16").generate(prompts, params)
    assert fused.tokens == xla.tokens
    np.testing.assert_allclose(fused.logprobs, xla.logprobs, rtol=1e-3, atol=1e-4)
