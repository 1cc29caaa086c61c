"""The SSM step and out_proj in one launch (mamba_jax.kernels.step_out): against the separate step kernel and a
float32 product, and a model decoding with it against the full forward. Pallas interpret mode on the CPU;
tests/test_triton_lowering.py checks it lowers for an H100, the `gpu` test runs it compiled."""

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


@pytest.mark.parametrize("groups,batch,n,block_n,block_c,hp,state_dtype", [
    (1, 1, 64, 16, 8, 1, jnp.float32),  # four column tiles of two chunks: three programs per head recompute
    (2, 3, 48, 48, 16, 2, jnp.bfloat16),  # two heads per program, a 48-wide tile (16-wide chunks), bf16 states
    (2, 2, 40, 64, 64, 1, jnp.float32),  # a tile that does not divide 40: the largest power of two that does (8)
])  # fmt: skip
def test_step_out_matches_the_step_kernel_and_the_product(groups, batch, n, block_n, block_c, hp, state_dtype):
    h, s, taps, p = 4, 32, 3, 16
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
    u = jax.random.normal(ks[8], (batch, 48), jnp.float32) * 2  # the raw residual (input norm folded)
    w_FN = jax.random.normal(ks[9], (h * p, n), jnp.float32)
    pos = 9 + batch  # odd and even positions: the state's slot alternates
    ring = kd.conv_ring(conv, pos)
    kw = {"heads": h, "dt_limit": (0.01, 0.1) if groups > 1 else (0.0, float("inf")), "norm_eps": 1e-5}
    g_BF, ss_BHJ, ring_want, ssm_want = kd.ssm_step(zx, ring, cw, cb, ssm, a_log, dvec, dtb, pos, u, **kw)
    parts, ss_BH, ring_new, ssm2 = so.ssm_step_out(
        zx, ring, cw, cb, so.state_slots(ssm), a_log, dvec, dtb, pos, u, w_FN, block_n=block_n, block_c=block_c,
        heads_per_program=hp, **kw,
    )  # fmt: skip
    assert parts.shape == (h // hp, batch, n) and parts.dtype == jnp.float32
    want = jnp.dot(g_BF, w_FN, precision="highest")
    assert rel_err(parts.sum(0), want) <= 1e-5
    assert rel_err(ss_BH, ss_BHJ.sum(-1)) <= 1e-6
    np.testing.assert_array_equal(ring_new, ring_want)
    np.testing.assert_array_equal(ssm2[(pos + 1) % 2], ssm_want)  # the new state in the other slot
    np.testing.assert_array_equal(so.current_state(ssm2, pos + 1), ssm_want)
    np.testing.assert_array_equal(ssm2[pos % 2], ssm)  # the old one untouched (other tiles' programs read it)


def test_step_out_partials_sum_in_the_residual_kernel():
    """More partials than the residual kernel unrolls (one per head): summed as one block."""
    b, d, heads = 2, 200, 80
    ks = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(ks[0], (b, d), jnp.float32)
    parts = jax.random.normal(ks[1], (heads, b, d), jnp.float32)
    ss = jax.random.uniform(ks[2], (b, heads), jnp.float32, 0.5, 2.0)
    got = kd.gated_norm_residual(h, parts, ss, norm_dim=512, eps=1e-5, out_dtype=jnp.float32, layout="SBD")
    inv = jax.lax.rsqrt(ss.sum(1, keepdims=True) / 512 + 1e-5)
    assert rel_err(got, h + parts.sum(0) * inv) <= 1e-6


def test_step_out_config_reads_the_knob(monkeypatch):
    assert so.step_out_config(1) is None  # off unless asked for
    monkeypatch.setenv("MAMBA_JAX_DECODE_STEP_OUT", "256,128,2,4")
    assert so.step_out_config(1) == {"block_n": 256, "block_c": 128, "heads_per_program": 2, "warps": 4}
    assert so.step_out_config(so.MAX_BATCH + 1) is None
    monkeypatch.setenv("MAMBA_JAX_DECODE_STEP_OUT", "256,128")
    with pytest.raises(ValueError, match=r"MAMBA_JAX_DECODE_STEP_OUT.*four integers"):
        so.step_out_config(1)


@pytest.mark.parametrize("pattern,batch,knob", [("MMM", 3, "16,8,1,4"), ("M*-M", 2, "32,16,2,4")])
def test_decoding_with_step_out_equals_full_forward(monkeypatch, pattern, batch, knob):
    monkeypatch.setenv("MAMBA_JAX_DECODE_STEP_OUT", knob)
    cfg = small_hybrid(pattern=pattern, mamba_head_dim=16, decode_impl="pallas", residual_in_fp32=True,
                       mamba_num_groups=1)  # fmt: skip
    reference = _random_norm_weights(init_model(cfg, seed=5), seed=batch)
    model = fold_norm_weights(nnx.clone(reference))
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(1, 250, n).tolist() for n in rng.integers(2, 20, batch)]
    cont = [rng.integers(1, 250, 4).tolist() for _ in range(batch)]
    _, cache, l, start = _prefill(model, prompts, 4)
    states = [c for path, c in jax.tree_util.tree_leaves_with_path(cache) if getattr(path[-1], "key", "") == "ssm"]
    assert states and all(c.shape[-5:-3] == (2, batch) for c in states)  # double-buffered by prefill
    decode = jax.jit(lambda t, c, pos: model.decode(t, c, pos=pos, start=jnp.asarray(start)))
    assert "ssm_step_out" in str(jax.make_jaxpr(decode)(jnp.zeros(batch, jnp.int32), cache, l))
    inc = _teacher_forced_logits(model, prompts, cont, 4)
    for b, (p, c) in enumerate(zip(prompts, cont, strict=True)):
        full = reference(jnp.asarray([p + c]))[0, len(p) :]
        assert rel_err(inc[b], full) <= 1e-4, b


def test_engine_with_step_out_generates_as_xla(monkeypatch):
    cfg = small_hybrid(pattern="MM", mamba_head_dim=16, mamba_num_groups=1)
    model = _random_norm_weights(init_model(cfg, seed=2), seed=1)
    prompts = [[5, 9, 2, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    xla = Engine(model, decode_impl="xla", state_dtype="bfloat16").generate(prompts, params)
    monkeypatch.setenv("MAMBA_JAX_DECODE_STEP_OUT", "32,16,1,4")
    fused = Engine(model, decode_impl="pallas", state_dtype="bfloat16").generate(prompts, params)
    assert fused.tokens == xla.tokens
    np.testing.assert_allclose(fused.logprobs, xla.logprobs, rtol=1e-3, atol=1e-4)
