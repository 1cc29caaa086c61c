"""Weight-only fp8 serving (`mamba_jax.inference.quantize`): the rounding bound, the model computing with
exactly its dequantized weights, the Engine (XLA and fused-kernel decode, scanned and unstacked, tensor
parallel) decoding that model's full forward, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_mesh_generation_equals_single_device, rel_err, small_hybrid

from mamba_jax.inference.engine import Engine, SamplingParams
from mamba_jax.inference.fold import fold_norm_weights
from mamba_jax.inference.naive import naive_generate
from mamba_jax.inference.quantize import FP8_MAX, dequantize_array, quantize_array, quantize_weights
from mamba_jax.layers.base import PROJ_IN_AXES, lora_names, scale_name
from mamba_jax.models.peft import PeftConfig, add_lora
from mamba_jax.models.stack import layer_mixers
from mamba_jax.parallel import MeshConfig, init_model


@pytest.fixture(scope="module")
def hybrid():
    """Mamba2, attention (RoPE, GQA) and MLP layers, scanned segments (weights stacked on a layers axis)."""
    return init_model(small_hybrid(pattern="M*-M*-M*-", attn_rope=True, attn_num_kv_heads=2), seed=3)


def _prompts(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in lengths]


def _projections(model):
    """(mixer, name, n_in, lead) of every projection weight, scanned segments with lead 1."""
    for mixer, lead in layer_mixers(model):
        for name, n_in in PROJ_IN_AXES.items():
            if isinstance(getattr(mixer, name, None), nnx.Variable):
                yield mixer, name, n_in, lead


def _dequantized(model):
    """A copy of a quantized model with every projection W_q · scale in float32 and no scales."""
    model = nnx.clone(model)
    for mixer, name, n_in, lead in _projections(model):
        var = getattr(mixer, name)
        var.set_value(dequantize_array(var[...], getattr(mixer, scale_name(name))[...], n_in, lead))
        delattr(mixer, scale_name(name))
    return model


def _decode_jaxpr(engine, batch: int) -> str:
    """The jaxpr of one decode step of the Engine's model after a 16-token prefill, as text."""

    def step(state):
        model = nnx.merge(engine.graphdef, state)
        _, cache = model.prefill(jnp.ones((batch, 16), jnp.int32), cache_len=20)
        return model.decode(jnp.zeros(batch, jnp.int32), cache, pos=16, start=jnp.zeros(batch, jnp.int32))

    return str(jax.make_jaxpr(step)(engine.state))


@pytest.mark.parametrize("shape,n_in,lead", [((96, 40), 1, 0), ((3, 8, 12, 40), 2, 1), ((24, 4, 10), 1, 0)])
def test_fp8_rounding_error_is_bounded(shape, n_in, lead):
    """Per output channel: the largest weight maps to ±448 exactly, every weight keeps 3 mantissa bits
    (relative error ≤ 2⁻⁴) or, below e4m3's normal range, an absolute error ≤ 2⁻¹⁰ of the scale; an
    all-zero channel stays zero; magnitudes spanning 10⁻³…10³ across channels."""
    k1, k2 = jax.random.split(jax.random.key(sum(shape)))
    out_shape = shape[lead + n_in :]
    magnitude = 10.0 ** jax.random.uniform(k2, out_shape, minval=-3, maxval=3)
    w = jax.random.normal(k1, shape) * magnitude
    w = w.at[(slice(None),) * (lead + n_in) + (0,) * len(out_shape)].set(0.0)  # one all-zero channel
    w_q, scale = quantize_array(w, n_in, lead)
    assert w_q.dtype == jnp.float8_e4m3fn and scale.shape == shape[:lead] + out_shape
    back = dequantize_array(w_q, scale, n_in, lead)
    s = jnp.expand_dims(scale, tuple(range(lead, lead + n_in)))
    err = jnp.abs(back - w)
    assert bool(jnp.all(err <= jnp.maximum(2.0**-4 * jnp.abs(w), 2.0**-10 * s) * (1 + 1e-6)))
    amax = jnp.max(jnp.abs(w_q.astype(jnp.float32)), axis=tuple(range(lead, lead + n_in)))
    assert bool(jnp.all(jnp.where(scale == 1.0, amax == 0, amax == FP8_MAX)))  # scale 1: the zero channel
    assert not bool(jnp.any(jnp.isnan(back)))


def test_quantized_model_computes_with_its_dequantized_weights(hybrid):
    """Every projection (Mamba2 in / out, attention q / k / v / o, MLP up / down; stacked and not) is
    float8 with its scale, and the model's logits are those of the same model holding W_q · scale in
    float32 (≤ 1e-5), a few per cent from the unquantized model's."""
    q = nnx.clone(hybrid)
    n = quantize_weights(q)
    projections = list(_projections(q))
    assert n == len(projections) == 2 + 4 + 2  # one stacked unit of a Mamba2, an attention and an MLP layer
    assert all(getattr(m, name)[...].dtype == jnp.float8_e4m3fn for m, name, _, _ in projections)
    ids = jnp.asarray(_prompts([23], hybrid.cfg.vocab_size))
    got = q(ids)
    assert rel_err(got, _dequantized(q)(ids)) <= 1e-5
    drift = rel_err(got, hybrid(ids))
    assert 1e-4 < drift < 0.1, drift
    assert all(getattr(m, name)[...].dtype == jnp.float32 for m, name, _, _ in _projections(hybrid))  # untouched


def test_lora_adapters_stay_beside_quantized_weights(hybrid):
    """A LoRA-tuned model served in fp8: its base weights are quantized, the adapters (non-zero here) keep
    their dtype and still add their branch."""
    tuned = nnx.clone(hybrid)
    add_lora(tuned, PeftConfig(method="lora", lora_rank=4))
    keys = iter(jax.random.split(jax.random.key(9), 64))
    for mixer, name, _, _ in _projections(tuned):
        b = getattr(mixer, lora_names(name)[1])
        b.set_value(0.05 * jax.random.normal(next(keys), b[...].shape, b[...].dtype))
    q = nnx.clone(tuned)
    quantize_weights(q)
    ids = jnp.asarray(_prompts([17], hybrid.cfg.vocab_size, seed=1))
    got = q(ids)
    assert all(getattr(m, lora_names(name)[1])[...].dtype == jnp.float32 for m, name, _, _ in _projections(q))
    assert rel_err(got, _dequantized(q)(ids)) <= 1e-5
    base = nnx.clone(hybrid)
    quantize_weights(base)
    assert rel_err(got, base(ids)) > 1e-2  # the adapters' branch is there


def test_fp8_engine_decodes_its_full_forward(hybrid):
    """Greedy tokens of the fp8 Engine (unstacked, and scanned) = argmax of the quantized model's full
    forward re-run at every step, for prompts of different lengths in one batch."""
    prompts = _prompts([4, 13, 9], hybrid.cfg.vocab_size, seed=2)
    params = SamplingParams(max_new_tokens=7, temperature=0.0)
    out = Engine(hybrid, quantize="fp8").generate(prompts, params)
    scanned = Engine(hybrid, quantize="fp8", unstack=False).generate(prompts, params)
    reference = nnx.clone(hybrid)
    quantize_weights(reference)
    for p, got in zip(prompts, out.tokens, strict=True):
        assert got == naive_generate(reference, p, 7, temperature=0.0)
    assert scanned.tokens == out.tokens
    assert rel_err(np.array(scanned.logprobs), np.array(out.logprobs)) <= 1e-5


def test_float8_gemv_serves_every_projection_at_decode(hybrid, monkeypatch):
    """With `kernels.gemv_q` on and allowed off the GPU (interpret mode), XLA's decode path runs every float8
    projection — Mamba in/out_proj, attention q/k/v/o, MLP up/down — through it at batch 3 (prefill keeps
    XLA's product: more rows), and generates what XLA's float8 product does, log-probabilities within 1e-4."""
    import mamba_jax.layers.base as base

    prompts = _prompts([4, 11, 6], hybrid.cfg.vocab_size, seed=5)
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    want = Engine(hybrid, decode_impl="xla", quantize="fp8").generate(prompts, params)
    monkeypatch.setattr(base, "FLOAT8_GEMV_OFF_GPU", True)
    monkeypatch.setenv("MAMBA_JAX_DECODE_GEMV_Q", "on")  # (off by default: slower than XLA's, benchmarks/README.md)
    engine = Engine(hybrid, decode_impl="xla", quantize="fp8")
    jaxpr = _decode_jaxpr(engine, batch=3)
    n_proj = sum(1 for _ in _projections(nnx.merge(engine.graphdef, engine.state)))
    assert jaxpr.count("name=gemv_q_dot") == n_proj, (jaxpr.count("name=gemv_q_dot"), n_proj)
    got = engine.generate(prompts, params)
    assert got.tokens == want.tokens
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lengths,gemv", [
    ([7], "on"),  # batch 1: the float8 GEMV (off by default) with its default tiles: FMAs, one K split
    ([5, 12], "32,32,2,4,2,dot"),  # tensor-core products, two K splits: partials summed by the consumer kernels
])  # fmt: skip
def test_fp8_fused_kernel_decoding_equals_xla_decoding(monkeypatch, lengths, gemv):
    """The fused decode path (interpret mode here; norms folded before quantizing, out_proj's float8
    weight prefetched as bytes at batch ≤ 4, both projections through `kernels.gemv_q`) generates what
    XLA's decode path does on the same weights."""
    monkeypatch.setenv("MAMBA_JAX_DECODE_GEMV_Q", gemv)
    cfg = small_hybrid(pattern="M*-M", mamba_head_dim=16, mamba_num_groups=1, residual_in_fp32=True)
    model = init_model(cfg, seed=4)
    prompts = _prompts(lengths, cfg.vocab_size, seed=3)
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    xla = Engine(model, decode_impl="xla", quantize="fp8").generate(prompts, params)
    engine = Engine(model, decode_impl="pallas", quantize="fp8")
    jaxpr = _decode_jaxpr(engine, batch=len(lengths))
    assert "pallas_call" in jaxpr and "bitcast_convert_type" in jaxpr  # the fused step, prefetching bytes
    mode = "fma" if len(lengths) == 1 else "dot"
    n = jaxpr.count(f"name=gemv_q_{mode}")
    # in_proj and out_proj of both Mamba layers; on a GPU `linear` sends the attention and MLP projections
    # through the float8 GEMV too (test_float8_gemv_serves_every_projection_at_decode checks those).
    assert n >= 4 if jax.default_backend() == "gpu" else n == 4, n
    fused = engine.generate(prompts, params)
    assert fused.tokens == xla.tokens
    np.testing.assert_allclose(fused.logprobs, xla.logprobs, rtol=1e-3, atol=1e-4)


def test_tensor_parallel_fp8_generation_equals_single_device():
    cfg = small_hybrid(pattern="M*-M-")
    prompts = _prompts([7, 12], cfg.vocab_size, seed=4)
    engine = assert_mesh_generation_equals_single_device(
        cfg, MeshConfig(data=2, tensor=4), prompts, new_tokens=6, seed=5, quantize="fp8"
    )
    w = nnx.merge(engine.graphdef, engine.state).layers.segments[0].layers.blocks[0].mixer.in_proj[...]
    assert w.dtype == jnp.float8_e4m3fn and "tensor" in str(w.sharding.spec)  # still column-parallel


def test_quantization_errors_are_named(hybrid):
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        Engine(hybrid, quantize="int4")
    q = nnx.clone(hybrid)
    quantize_weights(q)
    with pytest.raises(ValueError, match="before quantizing"):
        fold_norm_weights(q)
