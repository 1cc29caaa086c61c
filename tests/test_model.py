"""The language model: causality, packing, heads, numerics options and config errors."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import forward, rel_err, small_hybrid

from mamba_jax.models import ConfigError, LanguageModel, ModelConfig
from mamba_jax.models.lm import document_positions
from mamba_jax.parallel import init_model

TOL = 1e-5


@pytest.fixture(scope="module")
def hybrid():
    return init_model(small_hybrid(), seed=0)


def test_logits_shape_and_padded_vocab(hybrid):
    ids = jax.random.randint(jax.random.key(0), (2, 21), 0, 250)
    logits = hybrid(ids)
    assert logits.shape == (2, 21, 256) and logits.dtype == jnp.float32


def test_hybrid_is_causal(hybrid):
    ids = jax.random.randint(jax.random.key(1), (1, 40), 0, 250)
    t = 23
    changed = ids.at[0, t].set((ids[0, t] + 1) % 250)
    a, b = hybrid(ids), hybrid(changed)
    assert float(jnp.abs(a[:, :t] - b[:, :t]).max()) == 0.0
    assert float(jnp.abs(a[:, t:] - b[:, t:]).max()) > 1e-4


@pytest.mark.parametrize("use_rope", [False, True])
def test_packed_documents_equal_each_alone(use_rope):
    model = init_model(small_hybrid(attn_rope=use_rope), seed=1)
    ids = jax.random.randint(jax.random.key(2), (1, 45), 0, 250)
    cut = 19  # not a multiple of the chunk (16)
    seq_idx = (jnp.arange(45) >= cut).astype(jnp.int32)[None]
    packed = forward(model, ids, seq_idx)
    first, second = forward(model, ids[:, :cut]), forward(model, ids[:, cut:])
    assert rel_err(packed[:, :cut], first) <= TOL
    assert rel_err(packed[:, cut:], second) <= TOL


def test_document_positions_restart():
    seq_idx = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2]])
    assert document_positions(seq_idx).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]


def test_tied_and_untied_heads():
    tied = LanguageModel(small_hybrid(pattern="M", tie_embeddings=True), rngs=nnx.Rngs(params=0))
    untied = LanguageModel(small_hybrid(pattern="M"), rngs=nnx.Rngs(params=0))
    assert tied.lm_head is None and untied.lm_head[...].shape == (64, 256)
    ids = jnp.arange(10)[None]
    h = tied.hidden_states(ids)
    assert rel_err(tied(ids), h @ tied.embed[...].T) <= TOL


def test_bf16_compute_and_fp32_residual_track_float32():
    cfg = small_hybrid()
    ids = jax.random.randint(jax.random.key(3), (2, 32), 0, 250)
    ref = forward(init_model(cfg, seed=4), ids)
    for changes in (dict(dtype="bfloat16"), dict(dtype="bfloat16", residual_in_fp32=True)):
        out = forward(init_model(cfg.replace(**changes), seed=4), ids)
        assert rel_err(out, ref) < 3e-2, changes


def test_every_parameter_has_logical_axes_and_decay_marker(hybrid):
    known = {None, "vocab", "embed", "norm", "ssm_groups", "ssm_heads", "q_heads", "kv_heads", "mlp"}
    for path, v in nnx.iter_graph(hybrid):
        if isinstance(v, nnx.Param):
            meta = v.get_metadata()
            axes = meta["out_sharding"]
            assert len(axes) == v[...].ndim and set(axes) <= known, path
            assert isinstance(meta["weight_decay"], bool), path


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(pattern="M-X"), "unknown layer symbol"),
        (dict(pattern=""), "pattern is empty"),
        (dict(mamba_num_groups=3), "multiple of mamba_num_groups"),
        (dict(attn_num_heads=0), "attn_num_heads"),
        (dict(attn_num_heads=6, attn_num_kv_heads=4), "multiple of attn_num_kv_heads"),
        (dict(ffn_hidden_size=0), "ffn_hidden_size"),
        (dict(mlp_activation="tanh"), "mlp_activation"),
        (dict(d_model=60, mamba_head_dim=16), "set mamba_num_heads"),
        (dict(mamba_dt_limit=(0.5, 0.1)), "mamba_dt_limit"),
        (dict(dtype="float8"), "dtype must be"),
    ],
)
def test_bad_model_configs_say_what_to_change(changes, message):
    with pytest.raises(ConfigError, match=message):
        small_hybrid(**changes)


def test_unknown_config_key_suggests_the_right_one():
    d = small_hybrid().to_dict()
    d["mamba_d_sate"] = d.pop("mamba_d_state")
    with pytest.raises(ConfigError, match="did you mean 'mamba_d_state'"):
        ModelConfig.from_dict(d)


def test_tensor_parallel_divisibility_is_checked():
    small_hybrid().validate_tensor_parallel(4)
    with pytest.raises(ConfigError, match=r"mamba_num_groups .* not divisible by tensor=8"):
        small_hybrid().validate_tensor_parallel(8)
    with pytest.raises(ConfigError, match="attn_num_kv_heads"):
        small_hybrid(attn_num_kv_heads=2).validate_tensor_parallel(4)
    with pytest.raises(ConfigError, match="1 group train with tensor=1"):
        small_hybrid(mamba_num_groups=1).validate_tensor_parallel(2)
