"""The fused Pallas SSD kernels (`mamba_jax.kernels`) against the naive recurrence, outputs and gradients.

On CPU the kernels run in Pallas interpret mode (every barrier, copy and wgmma simulated), so the shapes
stay small: one or two blocks of 64 tokens, head dim and state 64 (128 once). Tolerance, float32 inputs:
1e-5 relative for outputs and every gradient but dA and dt_bias, which get `SUM_TOL` = 3e-5. Those two
are one number per head, what is left of sums over every token after cancellation between decay terms;
the kernels form the gradient of each token's dt·A as a sum over the pairs whose decay spans it (see
`ssd_bwd`), and differ from the reference only in the order of float32 additions: over 16 random inputs
of the `seq_idx` and `dt_bias_softplus` cases the kernels landed at ≤ 9e-6 (as did the grouping before
this one), one input at 1.5e-5. The row-minus-column form that autodiff of the chunked XLA path produces
lands at 1.3e-4 against a float64 recurrence on the strong-decay inputs of
`test_each_option_alone[dt_bias_softplus]` at 64-token chunks, so the tolerance still tells them apart.
The `gpu` tests run the compiled kernels at real sizes: bf16 against the XLA path on float32 copies, and
float32 inputs, which the GPU kernels decline (they would run at tf32), falling back to XLA.
"""

import jax
import jax.numpy as jnp
import pytest
from helpers import rel_err, ssd_inputs

import mamba_jax
from mamba_jax.kernels import ssd_pallas, ssd_pallas_unsupported
from mamba_jax.ops import ssd_reference

F32_TOL = 1e-5
SUM_TOL = 3e-5  # dA and dt_bias in float32 (module docstring)
BF16_TOL = 2e-2
DIFF_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def _options(inp, opts):
    kw = {}
    for name in ("D", "z", "dt_bias", "initial_states", "seq_idx"):
        if name in opts:
            kw[name] = inp[name]
    if "softplus" in opts:
        kw["dt_softplus"] = True
    if "dt_limit" in opts:
        kw["dt_limit"] = (0.05, 0.8)
    return kw


def _run(fn, params, kw, pallas):
    args = [params[k] for k in ("x", "dt", "A", "B", "C")]
    kw = kw | {k: params[k] for k in DIFF_NAMES[5:] if k in params}
    if pallas:
        return fn(*args, chunk_size=64, **kw)
    return fn(*args, return_final_states=True, **kw)


def _check(inp, opts, *, grads, tol=F32_TOL):
    kw = _options(inp, opts)
    params = {k: inp[k] for k in DIFF_NAMES if k in ("x", "dt", "A", "B", "C") or k in kw}
    kw = {k: v for k, v in kw.items() if k not in params}
    y, final = _run(ssd_pallas, params, kw, True)
    y_ref, final_ref = _run(ssd_reference, params, kw, False)
    assert y.shape == inp["x"].shape and y.dtype == inp["x"].dtype
    assert final.shape == (*inp["x"].shape[:1], *inp["x"].shape[2:], inp["B"].shape[-1])
    assert rel_err(y, y_ref) <= tol
    assert rel_err(final, final_ref) <= tol
    if not grads:
        return
    wy = jax.random.normal(jax.random.key(11), y.shape)
    wf = jax.random.normal(jax.random.key(12), final.shape)

    def loss(fn, pallas):
        def f(p):
            out, fin = _run(fn, p, kw, pallas)
            return jnp.sum(out.astype(jnp.float32) * wy) + jnp.sum(fin * wf)

        return jax.grad(f)(params)

    got, want = loss(ssd_pallas, True), loss(ssd_reference, False)
    for k in params:
        assert got[k].shape == params[k].shape, k
        k_tol = max(tol, SUM_TOL) if k in ("A", "dt_bias") else tol
        assert rel_err(got[k], want[k]) <= k_tol, k


@pytest.mark.parametrize("groups,heads", [(1, 2), (2, 4)])
def test_all_options_with_gradients(groups, heads):
    """Odd length (two blocks, the second partial), documents, initial and final states, D, z, dt path."""
    inp = ssd_inputs(groups, 2, 100, heads, 64, groups, 64, n_docs=3)
    _check(inp, {"D", "z", "dt_bias", "softplus", "dt_limit", "initial_states", "seq_idx"}, grads=True)


@pytest.mark.parametrize(
    "opts",
    [set(), {"D"}, {"z"}, {"dt_bias", "softplus"}, {"initial_states"}, {"seq_idx"}],
    ids=["plain", "D", "z", "dt_bias_softplus", "initial_states", "seq_idx"],
)
def test_each_option_alone(opts):
    inp = ssd_inputs(len(opts) + 3, 1, 64, 1, 64, 1, 64, n_docs=2)
    _check(inp, opts, grads=True)


def test_head_dim_128_state_128_three_heads_per_group():
    """Two head-dim tiles per head, one head per program (3 heads per group is odd)."""
    inp = ssd_inputs(5, 1, 70, 3, 128, 1, 128)
    _check(inp, {"D", "initial_states"}, grads=True)


def test_bf16_inputs_close_to_float32_reference():
    inp = ssd_inputs(6, 1, 128, 2, 64, 1, 64, dtype=jnp.bfloat16, n_docs=2)
    _check(inp, {"D", "z", "seq_idx"}, grads=False, tol=BF16_TOL)


def test_document_outputs_do_not_depend_on_earlier_documents():
    inp = ssd_inputs(8, 1, 128, 2, 64, 1, 64)
    seq_idx = (jnp.arange(128) >= 37).astype(jnp.int32)[None]
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    packed, _ = ssd_pallas(*args, chunk_size=64, seq_idx=seq_idx)
    alone, _ = ssd_pallas(*(a[:, 37:] if a.ndim > 1 else a for a in args), chunk_size=64)
    assert rel_err(packed[:, 37:], alone) <= F32_TOL


def test_public_ssd_routes_to_the_kernels():
    """`mamba_jax.ssd(impl="pallas")` runs the kernels (interpret mode here) and agrees with the XLA path."""
    inp = ssd_inputs(9, 1, 64, 2, 64, 2, 64)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    kw = dict(chunk_size=128, D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True, return_final_states=True)
    assert ssd_pallas_unsupported(x=inp["x"], B=inp["B"], chunk_size=128) is None
    y, f = mamba_jax.ssd(*args, impl="pallas", **kw)
    y_xla, f_xla = mamba_jax.ssd(*args, impl="xla", **kw)
    assert rel_err(y, y_xla) <= F32_TOL and rel_err(f, f_xla) <= F32_TOL


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(chunk_size=32), "chunk_size"),
        (dict(p=32), "head dim"),
        (dict(n=96), "state size"),
        (dict(D_hp=True), "D of shape"),
        (dict(B_dtype=jnp.bfloat16), "one dtype"),
    ],
)
def test_unsupported_inputs_name_the_reason_and_fall_back(change, reason):
    p, n = change.get("p", 64), change.get("n", 64)
    inp = ssd_inputs(10, 1, 40, 2, p, 1, n)
    x, B = inp["x"], inp["B"].astype(change.get("B_dtype", jnp.float32))
    D = inp["D"][:, None] * jnp.ones((p,)) if change.get("D_hp") else inp["D"]
    chunk = change.get("chunk_size", 64)
    got = ssd_pallas_unsupported(x=x, B=B, chunk_size=chunk, D=D)
    assert got is not None and reason in got
    args = (x, inp["dt"], inp["A"], B, inp["C"].astype(B.dtype))
    y = mamba_jax.ssd(*args, chunk_size=chunk, D=D, impl="pallas")
    assert rel_err(y, mamba_jax.ssd(*args, chunk_size=chunk, D=D, impl="xla")) <= F32_TOL


# ---------------------------------------------------------------------------------------- GPU, real sizes


def _f32(t):
    return t.astype(jnp.float32) if t.dtype == jnp.bfloat16 else t


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape",
    [(2, 1024, 8, 64, 1, 128), (1, 1000, 4, 128, 2, 256)],
    ids=["2.7B-like", "odd_length-p128-n256"],
)
def test_gpu_bf16_outputs_and_gradients(shape):
    """bf16 kernels against the XLA path on float32 copies of the same inputs (highest matmul precision)."""
    b, l, h, p, g, n = shape
    inp = ssd_inputs(sum(shape), b, l, h, p, g, n, dtype=jnp.bfloat16, n_docs=3)
    fixed = dict(dt_bias=inp["dt_bias"], dt_softplus=True, seq_idx=inp["seq_idx"])
    names = ("x", "dt", "A", "B", "C", "D", "z", "initial_states")
    wy = jax.random.normal(jax.random.key(1), inp["x"].shape)

    def pallas(x, dt, A, B, C, D, z, S0):
        return ssd_pallas(x, dt, A, B, C, chunk_size=128, D=D, z=z, initial_states=S0, **fixed)

    def xla(x, dt, A, B, C, D, z, S0):
        args = map(_f32, (x, dt, A, B, C))
        kw = dict(D=D, z=_f32(z), initial_states=S0, impl="xla", return_final_states=True)
        return mamba_jax.ssd(*args, chunk_size=128, **kw, **fixed)

    def value_and_grads(fn):
        def loss(*a):
            y, f = fn(*a)
            return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(f), (y, f)

        return jax.jit(jax.grad(loss, argnums=tuple(range(8)), has_aux=True))(*(inp[k] for k in names))

    got, (y, f) = value_and_grads(pallas)
    with jax.default_matmul_precision("highest"):
        want, (y_ref, f_ref) = value_and_grads(xla)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y, y_ref) <= BF16_TOL and rel_err(f, f_ref) <= BF16_TOL
    for name, a, w in zip(names, got, want, strict=True):
        assert rel_err(a, w) <= BF16_TOL, name


@pytest.mark.gpu
def test_gpu_float32_inputs_fall_back_to_xla():
    inp = ssd_inputs(3, 1, 512, 4, 64, 1, 128)
    reason = ssd_pallas_unsupported(x=inp["x"], B=inp["B"], chunk_size=128)
    assert reason is not None and "float32" in reason
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    y = mamba_jax.ssd(*args, chunk_size=128, D=inp["D"], impl="pallas")
    assert rel_err(y, mamba_jax.ssd(*args, chunk_size=128, D=inp["D"], impl="xla")) <= F32_TOL
