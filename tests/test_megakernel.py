"""The megakernel's engine side (`mamba_jax.inference.megakernel`): its packed layouts, its caches and its JAX
reference of the kernel's arithmetic against the model's own decode (CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_err, small_hybrid

from mamba_jax.inference import megakernel as mk
from mamba_jax.inference.quantize import dequantize_array
from mamba_jax.models.stack import Block, unstack_layers
from mamba_jax.parallel import init_model


def _randomize_norms(model, seed=0):
    """Norm weights away from ones, so that folding them into the projections is checked too."""
    keys = iter(jax.random.split(jax.random.key(seed), 256))
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Block):
            for var in (module.norm.weight, module.mixer.norm):
                var[...] = 1 + 0.3 * jax.random.normal(next(keys), var[...].shape, var[...].dtype)
    return model


def _model(seed=3, **changes):
    cfg = small_hybrid(pattern="MMMM", mamba_head_dim=16, mamba_d_state=16, mamba_num_groups=1,
                       residual_in_fp32=True, decode_impl="xla", **changes)  # fmt: skip
    model = _randomize_norms(init_model(cfg, seed=seed), seed)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Block):
            # large steps and slow decay, no skip: the output depends on the state, not only on the token
            module.mixer.dt_bias[...] = jnp.full_like(module.mixer.dt_bias[...], 1.0)
            module.mixer.A_log[...] = jnp.full_like(module.mixer.A_log[...], -2.0)
            module.mixer.D[...] = jnp.zeros_like(module.mixer.D[...])
    return model


def _prefill(model, prompt, steps):
    """The unstacked model's caches after `prompt`, with the conv windows as the fused path's rings."""
    view = unstack_layers(model)
    ids = jnp.asarray([prompt])
    l = ids.shape[1]
    # (jitted here and below: op by op, these short loops spent most of their time compiling each op)
    logits, caches = jax.jit(lambda i: view.prefill(i, seq_idx=jnp.ones((1, l), jnp.int32), cache_len=l + steps))(ids)
    return view, logits, caches, mk.ring_caches(caches, l, model.cfg.mamba_d_conv), l


def _decode_both(model, prompt, cont, *, dtype=jnp.bfloat16, perturb=None):
    """Teacher-forced logits of the model's decode and of the megakernel reference, step by step."""
    view, _, caches, rings, l = _prefill(model, prompt, len(cont))
    params, cache = mk.pack(model, dtype), mk.kernel_cache(rings, dtype)
    if perturb:
        cache = perturb(cache)
    decode = jax.jit(lambda tok, caches, pos: view.decode(tok, caches, pos=pos, start=jnp.zeros(1, jnp.int32)))
    reference = jax.jit(lambda params, cache, tok, pos: mk.reference_logits(view, params, cache, tok, pos))
    out_model, out_ref = [], []
    for t, tok in enumerate(cont):
        logits, caches = decode(jnp.asarray([tok]), caches, l + t)
        out_model.append(logits[0])
        logits, cache = reference(params, cache, tok, l + t)
        out_ref.append(logits)
    return np.stack(out_model), np.stack(out_ref)


def test_reference_step_equals_the_model_decode():
    """In float32 the reference is the model's decode (layouts, folding, conv ring, state update, norms); with
    the kernel's bf16 weights, states and roundings it stays within bf16 error of it, far from what a conv
    ring one slot off or a lost state gives (0.4–1.0 here: the test can fail)."""
    model = _model()
    rng = np.random.default_rng(0)
    prompt, cont = rng.integers(1, 250, 11).tolist(), rng.integers(1, 250, 6).tolist()
    want, got = _decode_both(model, prompt, cont, dtype=jnp.float32)
    assert rel_err(got, want) <= 1e-4, rel_err(got, want)
    _, got = _decode_both(model, prompt, cont)
    err = rel_err(got, want)
    assert err <= 5e-2, err  # bf16 weights and states; measured 0.029
    for bad in (lambda c: c._replace(ring=jnp.roll(c.ring, 1, axis=-1)), lambda c: c._replace(state=0 * c.state)):
        assert rel_err(_decode_both(model, prompt, cont, perturb=bad)[1], want) > 0.2


def test_pack_layouts():
    model = _model(seed=4)
    p = mk.pack(model)
    cfg = model.cfg
    d, h, hp, n, k = cfg.d_model, cfg.mamba_heads, cfg.mamba_heads * cfg.mamba_head_dim, cfg.mamba_d_state, 4
    assert p.win.shape == (4, 2 * hp + 2 * n + h, d) and p.win.dtype == jnp.bfloat16
    assert p.wout.shape == (4, d, hp) and p.conv_w.shape == (4, hp + 2 * n, cfg.mamba_d_conv)
    assert p.a_log.shape == p.d_skip.shape == p.dt_bias.shape == (4, h) and k == cfg.mamba_d_conv
    # the input norm's weight folded into in_proj (row j of win = output feature j)
    blk = next(b for _, b in nnx.iter_graph(unstack_layers(model)) if isinstance(b, Block))
    w = blk.mixer.in_proj[...].reshape(d, -1) * blk.norm.weight[...][:, None]
    np.testing.assert_allclose(np.asarray(p.win[0], np.float32), np.asarray(w.T.astype(jnp.bfloat16), np.float32))
    assert blk.norm.weight[...][0] != 1.0  # pack folded a copy, not the model


def test_caches_round_trip():
    model = _model(seed=5)
    _, _, _, rings, _ = _prefill(model, [5, 7, 11, 13, 17], 2)
    cache = mk.kernel_cache(rings)
    assert cache.ring.shape[0] == cache.state.shape[0] == 4
    back = mk.engine_cache(cache, rings)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(rings), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16).astype(b.dtype)))


def test_rings_pass_through_and_kernel_mode(monkeypatch):
    """`ring_caches` leaves caches that are rings already (the fused path's prefill) as they are; the kernel's
    variant comes from MAMBA_JAX_MEGAKERNEL_MODE, bad values named."""
    model = _model(seed=8)
    _, _, _, rings, l = _prefill(model, [2, 3, 5], 1)
    again = mk.ring_caches(rings, l, model.cfg.mamba_d_conv)
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(rings), strict=True))
    for raw, want in (("", (5, 1)), ("10", (10, 1)), ("10,2", (10, 2))):
        monkeypatch.setenv("MAMBA_JAX_MEGAKERNEL_MODE", raw)
        assert mk.kernel_mode() == want
    for raw in ("x", "7", "10,1,2", "10,-1"):
        monkeypatch.setenv("MAMBA_JAX_MEGAKERNEL_MODE", raw)
        with pytest.raises(ValueError, match="MAMBA_JAX_MEGAKERNEL_MODE"):
            mk.kernel_mode()
    for raw, want in (("0", False), ("1", True)):
        monkeypatch.setenv("MAMBA_JAX_MEGAKERNEL_GRAPH", raw)
        assert mk.kernel_graph() is want
    monkeypatch.setenv("MAMBA_JAX_MEGAKERNEL_GRAPH", "yes")
    with pytest.raises(ValueError, match="MAMBA_JAX_MEGAKERNEL_GRAPH"):
        mk.kernel_graph()
    with pytest.raises(ValueError, match=r"mode=\(7, 1\)"):  # step's explicit mode is checked as the variable is
        mk.step(mk.pack(model), mk.kernel_cache(rings), jnp.zeros(model.cfg.d_model), l, None, eps=1e-5, mode=(7, 1),
                graph=False)  # fmt: skip


@pytest.mark.parametrize("changes,what", [
    (dict(pattern="M*M"), "layers other than Mamba2"), (dict(mamba_num_groups=2), "groups"),
    (dict(residual_in_fp32=False), "float32"), (dict(mamba_dt_limit=(0.001, 0.1)), "dt limit"),
])  # fmt: skip
def test_unsupported_models(changes, what):
    base = dict(pattern="MM", mamba_head_dim=16, mamba_d_state=16, mamba_num_groups=1, residual_in_fp32=True)
    model = init_model(small_hybrid(**{**base, **changes}), seed=0)
    assert what in mk.unsupported(model)
    with pytest.raises(ValueError, match="does not cover"):
        mk.pack(model)


def test_step_off_the_gpu_is_the_reference():
    model = _model(seed=6)
    _, _, _, rings, l = _prefill(model, [3, 1, 4, 1, 5], 1)
    params, cache = mk.pack(model), mk.kernel_cache(rings)
    eps = model.cfg.norm_eps
    assert "it is built for" in mk.kernel_unsupported(params, eps)  # head dim 16, state 16: the reference
    h = jax.random.normal(jax.random.key(0), (model.cfg.d_model,), jnp.float32)
    work = mk.workspace(params)
    got_h, got_cache, got_work = mk.step(params, cache, h, l, work, eps=eps)
    want_h, want_cache = mk.reference_step(params, cache, h, l, eps=eps)
    np.testing.assert_array_equal(got_h, want_h)
    np.testing.assert_array_equal(got_cache.state, want_cache.state)
    assert got_work is work


def _recipe_config(name: str):
    """The model config of experiments/NAME.py."""
    import os

    import mamba_jax.config as mjc

    root = os.path.join(os.path.dirname(__file__), "..")
    return mjc.model_config(mjc.load_config(os.path.join(root, "experiments", f"{name}.py")))


@pytest.mark.parametrize("recipe", ["mamba2_130m", "mamba2_370m", "mamba2_780m", "mamba2_1_3b", "mamba2_2_7b"])
def test_every_mamba2_checkpoint_size_builds(recipe):
    """Every pure Mamba2 checkpoint (130M … 2.7B) meets the kernel's constraints: one build per (d_model,
    heads), e.g. 130M's (768, 24); eval_shape only (no weights)."""
    cfg = _recipe_config(recipe)
    model = nnx.eval_shape(lambda: init_model(cfg.replace(pattern="MM"), seed=0))
    assert mk.unsupported(model) is None
    shapes = jax.eval_shape(mk.pack, model)
    d, h = shapes.win.shape[2], shapes.a_log.shape[1]
    assert mk.kernel_dims_unsupported(d, h, 64, 128, 4, cfg.norm_eps) is None
    assert mk._target(d, h, False, False) == f"mamba_jax_megakernel_d{d}_h{h}"
    assert "Hopper" in mk.kernel_unsupported(shapes, cfg.norm_eps)  # checked, then no GPU here
    shapes8 = jax.eval_shape(lambda m: mk.pack(m, quantize="fp8"), model)  # float8 rows: a build of their own
    assert shapes8.win.dtype == jnp.float8_e4m3fn and "Hopper" in mk.kernel_unsupported(shapes8, cfg.norm_eps)
    assert mk._target(d, h, True, True, True) == f"mamba_jax_megakernel_head_d{d}_h{h}_fp8_graph"


@pytest.mark.parametrize("dims,what", [
    ((768, 24, 32, 128, 4, 1e-5), "head dim"), ((768, 24, 64, 64, 4, 1e-5), "head dim"),
    ((768, 24, 64, 128, 4, 1e-6), "eps"), ((800, 24, 64, 128, 4, 1e-5), "multiple of 256"),
    ((768, 20, 64, 128, 4, 1e-5), "multiple of 8"), ((4096, 128, 64, 128, 4, 1e-5), "at most 96"),
])  # fmt: skip
def test_kernel_dimensions_outside_its_constraints_are_named(dims, what):
    assert what in mk.kernel_dims_unsupported(*dims)


def _f32(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def _two_layers(steps, recipe="mamba2_2_7b"):
    """2 random layers of a Mamba2 checkpoint's dimensions (default 2.7B's), every norm weight away from one,
    after a 37-token prompt with room for `steps` more: (model, the conv rings and states, the prompt's
    length)."""
    cfg = _recipe_config(recipe).replace(pattern="MM", param_dtype="float32", decode_impl="xla")
    model = _randomize_norms(init_model(cfg, seed=1))
    model.norm_f.weight[...] = 1 + 0.3 * jax.random.normal(jax.random.key(1), model.norm_f.weight[...].shape)
    _, _, _, rings, l = _prefill(model, list(range(3, 40)), steps)
    return model, rings, l


def _as_close_as_the_reference(got, want, truth, what):
    """The kernel sums in another order than XLA, so it cannot equal the bf16 reference bit for bit; it must
    be as close to the float32 truth as the bf16 reference is (a ring slot off or a lost state: ≳ 0.2)."""
    g, w, x = (np.asarray(a, np.float32) for a in (got, want, truth))
    assert rel_err(w, x) > 1e-4, (what, "the bf16 reference did not round")
    assert rel_err(g, x) <= 2 * rel_err(w, x) + 1e-3, (what, rel_err(g, x), rel_err(w, x))


@pytest.mark.gpu
@pytest.mark.parametrize("mode,graph,recipe,quantize", [
    ("5", "0", "mamba2_2_7b", None), ("10", "0", "mamba2_2_7b", None), ("10,0", "0", "mamba2_2_7b", None),
    ("5", "1", "mamba2_2_7b", None),
    # smaller models' rows spread over the warps otherwise (kGeneralRows): 130M's in_proj / out_proj slots
    # hold 26 / 13 rows, 1.3B's 10 / 5 (more rows than warps, and fewer that do not divide them)
    ("5", "0", "mamba2_130m", None), ("5", "0", "mamba2_1_3b", None),
    # float8 rows (-DMK_FP8=1): 2.7B's slots hold 16 / 8 rows
    ("5", "0", "mamba2_2_7b", "fp8"), ("5", "0", "mamba2_130m", "fp8"),
])  # fmt: skip
def test_kernel_matches_the_reference_on_gpu(mode, graph, recipe, quantize, monkeypatch):
    """The CUDA megakernel (2 random layers of a checkpoint's dimensions, norms folded; modes 5 and 10 at
    2.7B's; bf16 or float8 rows) against `reference_step` over 3 tokens, compiled, the workspace and caches
    carried from token to token."""
    monkeypatch.setenv("MAMBA_JAX_MEGAKERNEL_MODE", mode)  # parsed by kernel_mode, then passed explicitly:
    options = {"mode": mk.kernel_mode(), "graph": graph == "1"}  # jax reuses a trace whatever the environment
    model, rings, l = _two_layers(3, recipe)
    cfg = model.cfg
    params, cache = mk.pack(model, quantize=quantize), mk.kernel_cache(rings)
    eps = cfg.norm_eps
    assert (why := mk.kernel_unsupported(params, eps, graph=graph == "1")) is None, why
    target = mk._target(cfg.d_model, params.a_log.shape[1], False, graph == "1", quantize == "fp8")
    kernel = functools.partial(jax.jit(mk.step, static_argnames=("eps", "mode", "graph")), **options)
    assert target in kernel.func.lower(params, cache, jnp.zeros(cfg.d_model), l, mk.workspace(params), eps=eps,
                                       **options).as_text()  # fmt: skip
    # The references run on the CPU: XLA's GPU fusions kept float32 where the reference rounded to bf16 with
    # astype round trips (excess precision), which made the "bf16" reference there the float32 truth; it
    # rounds with reduce_precision since 249cb52, and the CPU stays the safe place. The truth: the same bf16
    # weights and starting caches, no rounding after.
    cpu = jax.devices("cpu")[0]
    ref = jax.jit(mk.reference_step, static_argnames="eps")
    on_cpu = lambda tree: jax.device_put(tree, cpu)  # noqa: E731
    p_cpu, p32_cpu = on_cpu(params), on_cpu(_f32(params))
    kc, rc, tc, work = cache, on_cpu(cache), on_cpu(_f32(cache)), mk.workspace(params)
    for t, tok in enumerate([7, 8, 9]):
        h = model._embed(jnp.asarray([tok]))[0].astype(jnp.float32)
        got, kc, work = kernel(params, kc, h, l + t, work, eps=eps)
        want, rc = ref(p_cpu, rc, on_cpu(h), l + t, eps=eps)
        truth, tc = ref(p32_cpu, tc, on_cpu(h), l + t, eps=eps)
        _as_close_as_the_reference(got, want, truth, (t, "h"))
        _as_close_as_the_reference(kc.state, rc.state, tc.state, (t, "state"))
        _as_close_as_the_reference(kc.ring, rc.ring, tc.ring, (t, "ring"))


def test_head_phase_reference_equals_the_model_head():
    """`pack_head` + `reference_head` (the kernel's LM head phase, float32 here) give the model's logits."""
    model = _model(seed=9)
    model.norm_f.weight[...] = 1 + 0.3 * jax.random.normal(jax.random.key(1), model.norm_f.weight[...].shape)
    h = jax.random.normal(jax.random.key(2), (model.cfg.d_model,), jnp.float32)
    want = model._logits(model.norm_f(h[None]))[0]
    got = mk.reference_head(mk.pack_head(model, jnp.float32), h, eps=model.cfg.norm_eps)
    assert rel_err(got, want) <= 1e-5
    assert mk.pack_head(model).dtype == jnp.bfloat16 and mk.pack_head(model).shape == (model.cfg.padded_vocab_size,
                                                                                      model.cfg.d_model)  # fmt: skip


@pytest.mark.gpu
def test_kernel_head_phase_on_gpu():
    """The kernel with the LM head as its last phase (2 random 2.7B-shaped layers, norms folded): logits as
    close to the float32 truth as the bf16 reference's, the residual as without the head."""
    model, rings, l = _two_layers(1)
    params, cache, head = mk.pack(model), mk.kernel_cache(rings), mk.pack_head(model)
    eps = model.cfg.norm_eps
    assert mk.kernel_unsupported(params, eps, head) is None
    h = model._embed(jnp.asarray([7]))[0].astype(jnp.float32)
    step = jax.jit(mk.step, static_argnames="eps")
    got_h, _, _, logits = step(params, cache, h, l, mk.workspace(params), eps=eps, head=head)
    want_h, _, _ = step(params, cache, h, l, mk.workspace(params), eps=eps)
    np.testing.assert_array_equal(np.asarray(got_h), np.asarray(want_h))
    cpu = jax.devices("cpu")[0]  # the references on the CPU, as above
    h_cpu = jax.device_put(got_h, cpu)
    ref = jax.jit(mk.reference_head, static_argnames="eps")
    want = ref(jax.device_put(head, cpu), h_cpu, eps=eps)
    truth = ref(jax.device_put(_f32(head), cpu), h_cpu, eps=eps)
    _as_close_as_the_reference(logits, want, truth, "logits")


def test_float8_rows_pack_and_their_reference():
    """pack(quantize="fp8"): float8 rows with a float32 scale each, within e4m3's rounding of the folded
    weights; `reference_step` on them is the step on those rows dequantized (up to the input's bf16 rounding,
    which the float8 path applies as the kernel does), near the unquantized step, and far from it without
    the scales."""
    model = _model(seed=5)
    _, _, _, rings, l = _prefill(model, [3, 1, 4, 1, 5], 1)
    p32, p8 = mk.pack(model, jnp.float32), mk.pack(model, quantize="fp8")
    assert p8.win.dtype == p8.wout.dtype == jnp.float8_e4m3fn and p32.win_scale is None
    assert p8.win_scale.shape == p8.win.shape[:2] and p8.wout_scale.shape == p8.wout.shape[:2]
    assert mk.cache_dtype(p8) == jnp.bfloat16 and mk.cache_dtype(p32) == jnp.float32

    def deq(w, scale):  # rows: the last axis is the contracted one
        return dequantize_array(w, scale, 1, w.ndim - 1)

    for w, scale, want in ((p8.win, p8.win_scale, p32.win), (p8.wout, p8.wout_scale, p32.wout)):
        err = jnp.abs(deq(w, scale) - want)  # e4m3: 3 mantissa bits; subnormals 2^-10 of the scale apart
        assert bool(jnp.all(err <= 2.0**-4 * jnp.abs(want) + 2.0**-10 * scale[..., None]))
    cache, eps = mk.kernel_cache(rings), model.cfg.norm_eps
    h = jax.random.normal(jax.random.key(0), (model.cfg.d_model,), jnp.float32)
    deq_params = p8._replace(win=deq(p8.win, p8.win_scale), wout=deq(p8.wout, p8.wout_scale), win_scale=None,
                             wout_scale=None)  # fmt: skip
    got, got_cache = mk.reference_step(p8, cache, h, l, eps=eps)
    same, _ = mk.reference_step(deq_params, cache, h, l, eps=eps)
    plain, _ = mk.reference_step(p32, mk.kernel_cache(rings, jnp.float32), h, l, eps=eps)
    unscaled, _ = mk.reference_step(p8._replace(win_scale=jnp.ones_like(p8.win_scale)), cache, h, l, eps=eps)
    assert got_cache.state.dtype == jnp.bfloat16
    assert rel_err(got, same) <= 1e-2 and rel_err(got, plain) <= 0.1 < rel_err(unscaled, plain)


def test_engine_with_the_float8_megakernel_decodes_its_reference():
    """Engine(megakernel=True, quantize="fp8"): the prompt through the model's own float8 weights (XLA),
    then the megakernel's float8 rows (here its JAX reference): the tokens of that same loop by hand."""
    from mamba_jax.inference.engine import Engine, SamplingParams
    from mamba_jax.inference.quantize import quantize_weights

    model, prompt, steps = _model(seed=8), [5, 9, 2, 7], 6
    sp = SamplingParams(max_new_tokens=steps, temperature=0.0)
    got = Engine(model, megakernel=True, quantize="fp8").generate([prompt], sp)
    quantized = nnx.clone(model)
    quantize_weights(quantized, "fp8")
    view, logits, _, rings, l = _prefill(quantized, prompt, steps)
    params, cache = mk.pack(model, quantize="fp8"), mk.kernel_cache(rings)
    want, want_lp = [int(jnp.argmax(logits[0]))], [float(jax.nn.log_softmax(logits[0]).max())]  # (the last position)
    for t in range(steps - 1):
        step_logits, cache = mk.reference_logits(view, params, cache, want[-1], l + t)
        want.append(int(jnp.argmax(step_logits)))
        want_lp.append(float(jax.nn.log_softmax(step_logits).max()))
    assert got.tokens[0] == want
    np.testing.assert_allclose(got.logprobs[0], want_lp, rtol=1e-5, atol=1e-5)  # (bf16 rows instead: ≈ 1e-3 off)


def test_engine_with_the_megakernel_generates_as_without():
    """Engine(megakernel=True) at batch 1 (here the JAX reference, float32 as the model) generates the tokens
    and log-probabilities of the usual decode loop, with 4, 2 or 1 tokens per iteration of the loop, the LM
    head inside the kernel or not, EOS in mid-iteration; batch 2 decodes as without it; bad settings fail."""
    from mamba_jax.inference.engine import Engine, SamplingParams

    model = _model(seed=7)
    base, eng, prompt = Engine(model), Engine(model, megakernel=True), [[5, 9, 2, 7]]
    wants = {}
    for t in (8, 7):  # 4 and 1 tokens per iteration of the loop
        sp = SamplingParams(max_new_tokens=t, temperature=0.0)
        want, got = base.generate(prompt, sp), eng.generate(prompt, sp)
        assert got.tokens == want.tokens and len(got.tokens[0]) == t
        np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-4, atol=1e-4)
        wants[t] = want
    sp8 = SamplingParams(max_new_tokens=8, temperature=0.0)
    # EOS in the middle of an iteration: cut at the same place, the rest of the iteration not returned
    eos = wants[8].tokens[0][2]
    want, got = base.generate(prompt, sp8, eos_id=eos), eng.generate(prompt, sp8, eos_id=eos)
    assert got.tokens == want.tokens and got.finished == want.finished == [True]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAMBA_JAX_MEGAKERNEL_HEAD", "1")  # the LM head inside the kernel (here its reference)
        mp.setenv("MAMBA_JAX_MEGAKERNEL_UNROLL", "2")  # the A/B override: 2 tokens per iteration
        # no cache clearing: the Engine reads the variables when built, and its loop's cache key holds them
        got = Engine(model, megakernel=True).generate(prompt, sp8)
        assert got.tokens == wants[8].tokens
        np.testing.assert_allclose(got.logprobs, wants[8].logprobs, rtol=1e-4, atol=1e-4)
        for name, bad in (("MAMBA_JAX_MEGAKERNEL_HEAD", "yes"), ("MAMBA_JAX_MEGAKERNEL_UNROLL", "0")):
            mp.setenv(name, bad)
            with pytest.raises(ValueError, match=name):
                Engine(model, megakernel=True)
            mp.delenv(name)
    two = [[5, 9, 2, 7], [3, 3]]
    assert eng.generate(two, sp8).tokens == base.generate(two, sp8).tokens
    streamed = []  # the CLI streams a single prompt: the megakernel's case
    assert eng.generate(prompt, sp8, stream=lambda t: streamed.append(int(t[0]))).tokens == [streamed]
    assert streamed == wants[8].tokens[0]
    # "auto" (the default) takes the kernel only where the CUDA build runs: not on this CPU
    assert not Engine(model).megakernel and not Engine(model, megakernel="auto").megakernel
    with pytest.MonkeyPatch.context() as mp:  # past the backend check, on the Engine's unstacked, folded model
        seen = []
        mp.setattr(jax, "default_backend", lambda: "gpu")
        mp.setattr(mk, "kernel_unsupported", lambda shapes, *a, **k: seen.append(shapes) or "no kernel here")
        bf16 = _model(seed=7, dtype="bfloat16")
        assert not Engine(bf16, megakernel="auto").megakernel and seen[0].win.dtype == jnp.bfloat16
        mp.setattr(mk, "kernel_unsupported", lambda *a, **k: None)  # as on an H100 with nvcc
        auto = Engine(bf16, megakernel="auto")
    assert auto.megakernel and auto.mk_params is None  # packed on the first batch-1 generate, not before
    sp2 = SamplingParams(max_new_tokens=2, temperature=0.0)
    auto.generate(two, sp2)
    assert auto.mk_params is None
    auto.generate(prompt, sp2)  # (the kernel's JAX reference here)
    assert auto.mk_params is not None
    with pytest.raises(ValueError, match="megakernel='yes'"):
        Engine(model, megakernel="yes")
    with pytest.raises(ValueError, match="does not cover"):
        Engine(init_model(small_hybrid(), seed=0), megakernel=True)
