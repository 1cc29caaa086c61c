"""Inference: incremental decoding = full forward, the engine = re-running the model, sampling rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_mesh_generation_equals_single_device, full_forward_rows, rel_err, small_hybrid

from mamba_jax.inference.engine import Engine, SamplingParams, apply_repetition_penalty, pad_prompts
from mamba_jax.inference.naive import naive_generate
from mamba_jax.inference.sampling import filter_logits
from mamba_jax.parallel import MeshConfig, init_model

CONFIGS = {
    "mamba2": dict(pattern="MMMM", mamba_num_groups=2),
    "hybrid": dict(pattern="M*-M-M*-"),
    "hybrid_rope_scanned": dict(pattern="M*-M*-M*-", attn_rope=True, attn_num_kv_heads=2),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return init_model(small_hybrid(**CONFIGS[request.param]), seed=3)


@pytest.fixture(scope="module")
def hybrid():
    """Scanned segments, RoPE and GQA: the engine tests run on this one."""
    return init_model(small_hybrid(**CONFIGS["hybrid_rope_scanned"]), seed=3)


def _prompts(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in lengths]


def test_incremental_decoding_equals_full_forward(model):
    vocab = model.cfg.vocab_size
    prompts = _prompts([5, 19, 12], vocab)
    cont = _prompts([6, 6, 6], vocab, seed=1)  # teacher-forced continuations
    ids, start = pad_prompts(prompts, multiple=8)
    l = ids.shape[1]
    seq_idx = (np.arange(l)[None] >= start[:, None]).astype(np.int32)
    logits, cache = jax.jit(lambda i, s: model.prefill(i, seq_idx=s, cache_len=l + 6))(ids, seq_idx)
    decode = jax.jit(lambda t, c, pos, st: model.decode(t, c, pos=pos, start=st))
    steps = [logits]
    for t in range(5):
        logits, cache = decode(jnp.array([c[t] for c in cont]), cache, l + t, jnp.asarray(start))
        steps.append(logits)
    inc = np.stack(steps, axis=1)  # (B, 6, V): logits after the prompt and after each continuation token
    fulls = full_forward_rows(model, [p + c[:5] for p, c in zip(prompts, cont, strict=True)])
    for b, (p, full) in enumerate(zip(prompts, fulls, strict=True)):
        assert rel_err(inc[b], full[len(p) - 1 :]) <= 1e-4, b


def test_greedy_engine_equals_rerunning_the_model(hybrid):
    model = hybrid
    prompts = _prompts([3, 11], model.cfg.vocab_size, seed=2)
    out = Engine(model).generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    for p, got in zip(prompts, out.tokens, strict=True):
        assert got == naive_generate(model, p, 8, temperature=0.0)
    assert all(len(lp) == 8 and max(lp) <= 0 for lp in out.logprobs)


def test_seed_top_k_and_eos(hybrid):
    model = hybrid
    eng = Engine(model)
    prompts = _prompts([4, 9], model.cfg.vocab_size, seed=3)
    hot = SamplingParams(max_new_tokens=10, temperature=1.5, seed=7)
    a, b = eng.generate(prompts, hot), eng.generate(prompts, hot)
    assert a.tokens == b.tokens
    c = eng.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.5, seed=8))
    assert c.tokens != a.tokens
    greedy = eng.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.0))
    top1 = eng.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.3, top_k=1, seed=5))
    assert top1.tokens == greedy.tokens
    eos = greedy.tokens[0][3]  # pretend the 4th greedy token of row 0 is EOS
    stopped = eng.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.0), eos_id=eos)
    assert stopped.tokens[0] == greedy.tokens[0][:3] and stopped.finished[0]


def test_streaming_reports_every_token(hybrid):
    model = hybrid
    seen = []
    out = Engine(model).generate(
        _prompts([6], model.cfg.vocab_size), SamplingParams(max_new_tokens=5, temperature=0.0), stream=seen.append
    )
    assert [int(t[0]) for t in seen] == out.tokens[0]


def test_unstacked_layers_decode_like_the_scanned_ones(hybrid):
    """The engine decodes with every layer's weights in their own buffers (`unstack_layers`)."""
    prompts = _prompts([4, 13], hybrid.cfg.vocab_size, seed=5)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    scanned = Engine(hybrid, unstack=False).generate(prompts, params)
    unstacked = Engine(hybrid).generate(prompts, params)
    assert unstacked.tokens == scanned.tokens
    assert rel_err(np.array(unstacked.logprobs), np.array(scanned.logprobs)) <= 1e-5


def test_bf16_state_tracks_the_float32_state(hybrid):
    """State held in bf16 between steps (mamba_ssm's cache dtype): the same tokens here, log-probs close."""
    prompts = _prompts([5, 10], hybrid.cfg.vocab_size, seed=6)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    exact = Engine(hybrid).generate(prompts, params)
    half = Engine(hybrid, state_dtype="bfloat16").generate(prompts, params)
    assert half.tokens == exact.tokens
    assert rel_err(np.array(half.logprobs), np.array(exact.logprobs)) <= 2e-2


def test_tensor_parallel_generation_equals_single_device():
    cfg = small_hybrid(pattern="M*-M-")
    prompts = _prompts([7, 12], cfg.vocab_size, seed=4)
    assert_mesh_generation_equals_single_device(cfg, MeshConfig(data=2, tensor=4), prompts, new_tokens=6, seed=5)


def test_top_p_temperature_and_penalty_follow_their_definitions():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs))[None]
    keep = lambda p: np.isfinite(np.asarray(filter_logits(logits, top_p=p)))[0].tolist()  # noqa: E731
    assert keep(0.5) == [True, False, False, False]
    assert keep(0.7) == [True, True, False, False]
    assert keep(0.81) == [True, True, True, False]
    assert keep(1.0) == [True, True, True, True]
    assert np.isfinite(np.asarray(filter_logits(logits, top_k=2)))[0].tolist() == [True, True, False, False]
    # Temperature: sampling frequencies follow softmax(logits / T).
    draws = jax.random.categorical(jax.random.key(0), filter_logits(logits, temperature=0.5), shape=(20000,))
    freq = np.bincount(np.asarray(draws), minlength=4) / 20000
    want = probs**2 / (probs**2).sum()
    assert np.abs(freq - want).max() < 0.015
    pen = apply_repetition_penalty(jnp.array([[2.0, -2.0, 1.0]]), jnp.array([[True, True, False]]), 2.0)
    assert np.asarray(pen).tolist() == [[1.0, -4.0, 1.0]]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least one token"):
        pad_prompts([[1, 2], []])
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_compiler_options_reach_the_generation_loop(hybrid):
    """Options go to XLA with the loop's compilation: a real one changes nothing, an unknown one is named."""
    params = SamplingParams(max_new_tokens=3, temperature=0.0)
    plain = Engine(hybrid).generate([[5, 6, 7]], params)
    tuned = Engine(hybrid, compiler_options={"xla_gpu_exhaustive_tiling_search": True}).generate([[5, 6, 7]], params)
    assert tuned.tokens == plain.tokens
    with pytest.raises(Exception, match="no_such_option"):
        Engine(hybrid, compiler_options={"no_such_option": 1}).generate([[5, 6, 7]], params)


def test_decode_knobs_key_the_compiled_loop(hybrid, monkeypatch):
    """The decode kernels' A/B variables are read when the loop is traced: a changed one gets a loop of its
    own instead of the one compiled under the old setting."""
    from mamba_jax.inference.engine import _generate_fn

    engine, params = Engine(hybrid), SamplingParams(max_new_tokens=2, temperature=0.0)
    want = engine.generate([[5, 6, 7]], params)
    misses = _generate_fn.cache_info().misses
    engine.generate([[5, 6, 7]], params)
    assert _generate_fn.cache_info().misses == misses  # same settings: the same loop
    monkeypatch.setenv("MAMBA_JAX_DECODE_PREFETCH", "0.5")
    assert engine.generate([[5, 6, 7]], params).tokens == want.tokens
    assert _generate_fn.cache_info().misses == misses + 1
