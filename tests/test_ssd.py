"""`mamba_jax.ssd` (chunked XLA path) against the naive per-token recurrence, outputs and gradients."""

import jax
import jax.numpy as jnp
import pytest
from helpers import rel_err, ssd_inputs

import mamba_jax
from mamba_jax.ops import ssd_reference, ssd_step

F32_TOL = 1e-5
OPTION_SETS = {
    "plain": {},
    "D": {"D"},
    "D_per_channel": {"D_hp"},
    "z": {"z"},
    "dt_bias": {"dt_bias"},
    "softplus": {"softplus"},
    "dt_limit": {"softplus", "dt_limit"},
    "initial_states": {"initial_states"},
    "seq_idx": {"seq_idx"},
    "final_states": {"final"},
    "all": {"D", "z", "dt_bias", "softplus", "dt_limit", "initial_states", "seq_idx", "final"},
}


def _kwargs(inp, opts):
    kw = {}
    if "D" in opts:
        kw["D"] = inp["D"]
    if "D_hp" in opts:
        kw["D"] = inp["D"][:, None] * jnp.linspace(0.5, 1.5, inp["x"].shape[-1])
    if "z" in opts:
        kw["z"] = inp["z"]
    if "dt_bias" in opts:
        kw["dt_bias"] = inp["dt_bias"]
    if "softplus" in opts:
        kw["dt_softplus"] = True
    if "dt_limit" in opts:
        kw["dt_limit"] = (0.05, 0.8)
    if "initial_states" in opts:
        kw["initial_states"] = inp["initial_states"]
    if "seq_idx" in opts:
        kw["seq_idx"] = inp["seq_idx"]
    if "final" in opts:
        kw["return_final_states"] = True
    return kw


def _both(inp, chunk, kw):
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    got = mamba_jax.ssd(*args, chunk_size=chunk, impl="xla", **kw)
    want = ssd_reference(*args, **kw)
    return got, want


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("chunk,length", [(16, 77), (64, 200), (256, 300), (16, 64)])
def test_matches_recurrence_all_options(groups, chunk, length):
    inp = ssd_inputs(chunk + length + groups, 2, length, 4, 8, groups, 16, n_docs=3)
    (y, f), (y_ref, f_ref) = _both(inp, chunk, _kwargs(inp, OPTION_SETS["all"]))
    assert y.shape == inp["x"].shape and f.shape == inp["initial_states"].shape
    assert rel_err(y, y_ref) <= F32_TOL
    assert rel_err(f, f_ref) <= F32_TOL


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_each_option_alone(name):
    inp = ssd_inputs(hash(name) % 1000, 2, 45, 6, 4, 3, 8, n_docs=2)
    got, want = _both(inp, 16, _kwargs(inp, OPTION_SETS[name]))
    if isinstance(got, tuple):
        for a, b in zip(got, want, strict=True):
            assert rel_err(a, b) <= F32_TOL
    else:
        assert rel_err(got, want) <= F32_TOL


def test_seq_idx_resets_state_between_documents():
    """A document's outputs do not depend on what precedes it in the row."""
    inp = ssd_inputs(3, 1, 40, 2, 4, 1, 8)
    seq_idx = (jnp.arange(40) >= 23).astype(jnp.int32)[None]
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    packed = mamba_jax.ssd(*args, chunk_size=16, seq_idx=seq_idx, impl="xla")
    alone = mamba_jax.ssd(*(a[:, 23:] if a.ndim > 1 else a for a in args), chunk_size=16, impl="xla")
    assert rel_err(packed[:, 23:], alone) <= F32_TOL


@pytest.mark.parametrize("groups", [1, 2])
def test_gradients_match_recurrence(groups):
    inp = ssd_inputs(7 + groups, 2, 37, 4, 4, groups, 8, n_docs=2)
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
    wy = jax.random.normal(jax.random.key(11), inp["x"].shape)
    wf = jax.random.normal(jax.random.key(12), inp["initial_states"].shape)

    def loss(fn, **chunk):
        def f(params):
            y, fin = fn(
                params["x"],
                params["dt"],
                params["A"],
                params["B"],
                params["C"],
                D=params["D"],
                z=params["z"],
                dt_bias=params["dt_bias"],
                dt_softplus=True,
                dt_limit=(0.0, 4.0),
                initial_states=params["initial_states"],
                seq_idx=inp["seq_idx"],
                return_final_states=True,
                **chunk,
            )
            return jnp.sum(y * wy) + jnp.sum(fin * wf)

        return jax.grad(f)({k: inp[k] for k in names})

    got = loss(mamba_jax.ssd, chunk_size=16, impl="xla")
    want = loss(ssd_reference)
    for k in names:
        assert rel_err(got[k], want[k]) <= F32_TOL, k


def test_step_reproduces_scan_token_by_token():
    inp = ssd_inputs(21, 2, 33, 4, 8, 2, 16)
    kw = dict(D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True)
    y, final = mamba_jax.ssd(
        inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=16, z=inp["z"],
        initial_states=inp["initial_states"], return_final_states=True, impl="xla", **kw,
    )  # fmt: skip
    state = inp["initial_states"]
    ys = []
    for t in range(inp["x"].shape[1]):
        y_t, state = ssd_step(
            state,
            inp["x"][:, t],
            inp["dt"][:, t],
            inp["A"],
            inp["B"][:, t],
            inp["C"][:, t],
            z_BHP=inp["z"][:, t],
            **kw,
        )
        ys.append(y_t)
    assert rel_err(jnp.stack(ys, axis=1), y) <= F32_TOL
    assert rel_err(state, final) <= F32_TOL


def test_two_halves_with_carried_state_equal_one_pass():
    inp = ssd_inputs(5, 2, 90, 4, 8, 2, 16)
    args = lambda s: (inp["x"][:, s], inp["dt"][:, s], inp["A"], inp["B"][:, s], inp["C"][:, s])  # noqa: E731
    kw = dict(
        chunk_size=32,
        D=inp["D"],
        dt_bias=inp["dt_bias"],
        dt_softplus=True,
        return_final_states=True,
        impl="xla",
    )
    y, final = mamba_jax.ssd(*args(slice(None)), **kw)
    y1, s1 = mamba_jax.ssd(*args(slice(0, 41)), **kw)
    y2, s2 = mamba_jax.ssd(*args(slice(41, None)), initial_states=s1, **kw)
    assert rel_err(jnp.concatenate([y1, y2], axis=1), y) <= F32_TOL
    assert rel_err(s2, final) <= F32_TOL


def test_bf16_inputs_close_to_float32_reference():
    inp = ssd_inputs(9, 2, 128, 4, 16, 2, 32, dtype=jnp.bfloat16)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    y = mamba_jax.ssd(*args, chunk_size=64, D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True, impl="xla")
    assert y.dtype == jnp.bfloat16
    want = ssd_reference(*args, D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True)
    assert rel_err(y, want) <= 2e-2


def test_pallas_request_falls_back_to_xla_with_same_result():
    inp = ssd_inputs(4, 1, 20, 2, 4, 1, 8)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    y_xla = mamba_jax.ssd(*args, chunk_size=16, impl="xla")
    y_req = mamba_jax.ssd(*args, chunk_size=16, impl="pallas")
    assert rel_err(y_req, y_xla) <= F32_TOL


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(A=jnp.zeros((3,))), "A must be"),
        (dict(B=jnp.zeros((1, 20, 3, 8)), C=jnp.zeros((1, 20, 3, 8))), "multiple of groups"),
        (dict(dt=jnp.zeros((1, 20))), "dt must be"),
        (dict(seq_idx=jnp.zeros((1, 20), jnp.float32)), "integers"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(impl="cuda"), "impl must be"),
        (dict(initial_states=jnp.zeros((1, 2, 4, 4))), "initial_states must be"),
    ],
)
def test_bad_inputs_name_the_problem(change, message):
    inp = ssd_inputs(4, 1, 20, 2, 4, 1, 8)
    kw = dict(x=inp["x"], dt=inp["dt"], A=inp["A"], B=inp["B"], C=inp["C"], chunk_size=16)
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        mamba_jax.ssd(**kw)
