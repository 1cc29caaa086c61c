"""Hugging Face interop: parity with transformers' logits on committed fixtures, exact export ↔ import round trips,
sharded loading, the convert CLI both ways, tokenizers beside a model, and errors that name the fix.

The fixtures under tests/fixtures/hf/ were made by scripts/make_hf_fixtures.py (transformers 5.23, float32);
that script also checks, outside CI, that our exports load in transformers with the same logits.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import one_device_xla_flags, rel_err

from mamba_jax.data import load_tokenizer
from mamba_jax.interop import ConversionError, export_hf, from_pretrained, save_native
from mamba_jax.interop.hf_config import read_config
from mamba_jax.interop.placement import abstract_language_model, build_model
from mamba_jax.interop.safetensors_io import PlannedTensor, SafetensorsDir, write_sharded
from mamba_jax.models import ConfigError, ModelConfig
from mamba_jax.parallel import MeshConfig, make_mesh, use_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
NAMES = ("mamba2_g1", "mamba2_g2", "nemotron_h")


def _fixture(name):
    return os.path.join(FIXTURES, name)


def _expected(name):
    ref = np.load(os.path.join(_fixture(name), "expected.npz"))
    return ref["input_ids"], ref["logits"]


def _logits(model, ids, mesh=None):
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    if mesh is None:
        return np.asarray(fwd(state, jnp.asarray(ids)))
    with use_mesh(mesh):
        return np.asarray(fwd(state, jnp.asarray(ids)))


def _flat(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _rewrite(src, dst, *, config=None, rename=None, drop=(), max_shard_size=1 << 40):
    """A copy of a HF directory with its config edited, tensors renamed / dropped, or split into files."""
    os.makedirs(dst)
    files = SafetensorsDir(src)
    tensors = []
    for name in sorted(files.names):
        if name in drop:
            continue
        a = files.get(name)
        tensors.append(PlannedTensor(rename(name) if rename else name, a.shape, a.dtype, lambda a=a: a))
    write_sharded(dst, tensors, max_shard_size)
    cfg = read_config(src)
    for k, v in (config or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)  # bare Infinity, as transformers 4.x wrote non-finite floats
    return dst


# ------------------------------------------------------------------------------------------------------------
# Parity with transformers
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_imported_logits_equal_hugging_face(name):
    ids, expected = _expected(name)
    model = from_pretrained(_fixture(name), dtype="float32")
    assert rel_err(_logits(model, ids), expected) <= 1e-4


def test_config_mapping_follows_transformers():
    g1 = from_pretrained(_fixture("mamba2_g1"), dtype="float32").cfg
    assert (g1.pattern, g1.tie_embeddings, g1.residual_in_fp32, g1.mamba_num_groups) == ("MM", True, True, 1)
    # HF's vocab_size is the padded embedding (256 rows); ours is the tokenizer's beside it, padded to the rows.
    assert (g1.vocab_size, g1.padded_vocab_size, g1.mamba_chunk_size) == (173, 256, 8)
    assert g1.mamba_num_heads is None and g1.mamba_heads == 4  # derivable from expand, as the recipes write it
    g2 = from_pretrained(_fixture("mamba2_g2"), dtype="float32").cfg
    assert (g2.mamba_num_groups, g2.mamba_norm_per_group, g2.tie_embeddings, g2.residual_in_fp32) == (
        2,
        True,
        False,
        False,
    )
    assert g2.mamba_dt_limit == (0.05, 0.5) and g2.norm_eps == 1e-6
    assert (g2.vocab_size, g2.vocab_multiple) == (250, 2)  # no tokenizer: the rows, a multiple that divides them
    nh = from_pretrained(_fixture("nemotron_h"), dtype="float32").cfg
    assert nh.pattern == "M-M-M*-" and (nh.attn_num_heads, nh.attn_num_kv_heads, nh.attn_head_dim) == (8, 4, 8)
    assert nh.mlp_activation == "relu2" and not nh.attn_rope and not nh.tie_embeddings
    assert nh.mamba_dt_limit == (0.2, math.inf)  # transformers' Nemotron-H clamps dt at time_step_min


def test_published_nemotron_h_layout_loads(tmp_path):
    """hybrid_override_pattern + attention_head_dim + rms_norm_eps (the published configs), a `model.` prefix,
    weights in several files with an index."""
    changes = {
        "layers_block_type": None,
        "hybrid_override_pattern": "M-M-M*-",
        "head_dim": None,
        "attention_head_dim": 8,
        "layer_norm_epsilon": None,
        "rms_norm_eps": 1e-5,
        "n_groups": None,
        "mamba_n_groups": 4,
        "dtype": None,
        "torch_dtype": "float32",
    }
    d = _rewrite(
        _fixture("nemotron_h"),
        str(tmp_path / "nh"),
        config=changes,
        rename=lambda n: n.replace("backbone.", "model."),
        max_shard_size=60_000,
    )
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    ids, expected = _expected("nemotron_h")
    model = from_pretrained(d)
    assert model.cfg.dtype == "float32"
    assert rel_err(_logits(model, ids), expected) <= 1e-4


# ------------------------------------------------------------------------------------------------------------
# Export → import
# ------------------------------------------------------------------------------------------------------------
NATIVE = {
    # A scanned segment ("M-" × 2) with stacked parameters, all three kinds, GQA, tensor=4-divisible sizes.
    "nemotron_h": dict(pattern="M-M-M*-", mamba_num_groups=4, attn_num_heads=8, attn_num_kv_heads=4,
                       attn_head_dim=8, ffn_hidden_size=48),
    "mamba2": dict(pattern="MMM", mamba_num_groups=2, tie_embeddings=True, residual_in_fp32=True,
                   mamba_dt_limit=(0.0, 2.0)),
}  # fmt: skip


def _native_cfg(flavor, **changes):
    base = dict(d_model=32, vocab_size=250, vocab_multiple=16, mamba_d_state=8, mamba_head_dim=8,
                mamba_chunk_size=16, dtype="float32", init_std=0.1)  # fmt: skip
    return ModelConfig(**{**base, **NATIVE[flavor], **changes})


def _random_model(cfg, seed=0):
    """A model with random parameters, built without compiling an initialiser (seconds faster than init_model)."""
    rng = np.random.default_rng(seed)
    return build_model(cfg, lambda path, spec: rng.standard_normal(spec.shape).astype(spec.dtype))


@pytest.mark.parametrize("flavor", ["nemotron_h", "mamba2"])
def test_export_then_import_is_bitwise(tmp_path, flavor):
    model = _random_model(_native_cfg(flavor), seed=3)
    out = export_hf(model, str(tmp_path / "hf"), max_shard_size="20KB")
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    hf = read_config(out)
    assert hf["model_type"] == flavor and hf["vocab_size"] == 256
    if flavor == "mamba2":
        assert "lm_head.weight" not in SafetensorsDir(out).names  # tied: transformers ties it back
    back = from_pretrained(out)
    for key in ("pattern", "d_model", "padded_vocab_size", "mamba_heads", "mamba_num_groups", "tie_embeddings"):
        assert getattr(back.cfg, key) == getattr(model.cfg, key), key
    a, b = _flat(model), _flat(back)
    assert a.keys() == b.keys()
    for path in a:
        assert a[path].dtype == b[path].dtype and np.array_equal(a[path], b[path]), path


def test_hf_fixture_reexport_is_bitwise(tmp_path):
    """Import → export gives back transformers' own tensors, bit for bit (the fused in_proj / conv included)."""
    src = _fixture("nemotron_h")
    out = export_hf(from_pretrained(src), str(tmp_path / "hf"))
    orig, new = SafetensorsDir(src), SafetensorsDir(out)
    assert orig.names == new.names
    for name in orig.names:
        assert np.array_equal(orig.get(name), new.get(name)), name


def test_bfloat16_weights(tmp_path):
    model = _random_model(_native_cfg("nemotron_h"), seed=4)
    out = export_hf(model, str(tmp_path / "hf"), dtype="bfloat16")
    assert read_config(out)["dtype"] == "bfloat16"
    back = from_pretrained(out, param_dtype="bfloat16")
    a, b = _flat(model), _flat(back)
    for path in a:
        want = a[path].astype(jnp.bfloat16).astype(b[path].dtype)
        assert np.array_equal(want, b[path]), path


def test_export_refuses_what_transformers_cannot_compute(tmp_path):
    def model(flavor, **changes):  # refused before any weight is read: an abstract model is enough
        return abstract_language_model(_native_cfg(flavor, **changes))

    with pytest.raises(ConversionError, match="flavor='nemotron_h'"):
        export_hf(model("nemotron_h"), str(tmp_path / "a"), flavor="mamba2")
    with pytest.raises(ConversionError, match="upper bound"):
        export_hf(model("mamba2", residual_in_fp32=False), str(tmp_path / "b"), flavor="nemotron_h")
    with pytest.raises(ConversionError, match="SwiGLU"):
        export_hf(model("nemotron_h", mlp_activation="swiglu"), str(tmp_path / "c"))
    with pytest.raises(ConversionError, match="per group"):
        export_hf(model("mamba2", mamba_norm_per_group=False), str(tmp_path / "d"))
    with pytest.warns(UserWarning, match="residual_in_fp32"), pytest.raises(ConversionError, match="upper bound"):
        export_hf(model("mamba2"), str(tmp_path / "f"), flavor="nemotron_h")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        export_hf(model("mamba2"), str(tmp_path / "e"))
    assert os.listdir(tmp_path / "e") == ["keep.txt"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


# ------------------------------------------------------------------------------------------------------------
# Sharded loading
# ------------------------------------------------------------------------------------------------------------
def test_load_onto_data_by_tensor_mesh_equals_one_device():
    assert jax.device_count() == 8
    ids, expected = _expected("nemotron_h")
    mesh = make_mesh(MeshConfig(data=2, tensor=4))
    model = from_pretrained(_fixture("nemotron_h"), mesh=mesh, dtype="float32")
    in_proj = model.layers.block(0).mixer.in_proj[...]  # stacked: (reps, D, G, W)
    assert in_proj.sharding.spec[2] == "tensor"
    assert in_proj.addressable_shards[0].data.shape[2] == 1  # each tensor shard holds one whole group
    q = model.layers.block(5).mixer.q_proj[...]
    assert q.addressable_shards[0].data.shape == (32, 2, 8)
    one = _logits(from_pretrained(_fixture("nemotron_h"), dtype="float32"), ids)
    sharded = _logits(model, ids, mesh)
    assert rel_err(sharded, one) <= 1e-5
    assert rel_err(sharded, expected) <= 1e-4


def test_one_group_model_cannot_split_over_tensor():
    with pytest.raises(ConfigError, match="tensor=4"):
        from_pretrained(_fixture("mamba2_g1"), mesh=make_mesh(MeshConfig(data=2, tensor=4)))


# ------------------------------------------------------------------------------------------------------------
# The convert CLI and mamba_jax checkpoints
# ------------------------------------------------------------------------------------------------------------
def _convert(*args):
    env = dict(os.environ, XLA_FLAGS=one_device_xla_flags(), PYTHONUNBUFFERED="1")  # one CPU device: quicker
    out = subprocess.run(
        [sys.executable, "-m", "mamba_jax.convert", *args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    return out


def test_convert_cli_both_ways(tmp_path):
    src, ckpt, hf = _fixture("mamba2_g1"), str(tmp_path / "ckpt"), str(tmp_path / "hf")
    out = _convert("--from-hf", src, "--to", ckpt)
    assert out.returncode == 0, out.stderr[-3000:]
    # The training loop's layout: config.json, checkpoints/0/{state,data,meta}; the tokenizer came along.
    assert {"config.json", "checkpoints", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(ckpt))
    assert {"state", "data", "meta"} <= set(os.listdir(os.path.join(ckpt, "checkpoints", "0")))
    with open(os.path.join(ckpt, "config.json")) as f:
        assert json.load(f)["model"]["pattern"] == "MM"

    ids, expected = _expected("mamba2_g1")
    for path in (ckpt, os.path.join(ckpt, "checkpoints"), os.path.join(ckpt, "checkpoints", "0")):
        assert rel_err(_logits(from_pretrained(path, dtype="float32"), ids), expected) <= 1e-4
    assert load_tokenizer(ckpt).eos_id == load_tokenizer(src).eos_id

    out = _convert("--from", ckpt, "--to-hf", hf)
    assert out.returncode == 0, out.stderr[-3000:]
    orig, new = SafetensorsDir(src), SafetensorsDir(hf)
    assert orig.names == new.names
    for name in orig.names:
        assert np.array_equal(orig.get(name), new.get(name)), name
    assert os.path.isfile(os.path.join(hf, "tokenizer.json"))
    assert read_config(hf)["eos_token_id"] == load_tokenizer(src).eos_id


def test_converted_checkpoint_restores_as_a_training_state(tmp_path):
    """What convert writes is what the training loop restores: a TrainState with a fresh AdamW state."""
    from mamba_jax.train.checkpoint import Checkpointer, abstract_like
    from mamba_jax.train.config import CheckpointConfig, OptimConfig, TrainConfig
    from mamba_jax.train.optim import make_optimizer
    from mamba_jax.train.state import init_state

    model = from_pretrained(_fixture("nemotron_h"))
    save_native(model, str(tmp_path / "w"), tokenizer=None)
    params = nnx.state(_random_model(model.cfg))  # the loop's own template: its freshly initialised state
    like = init_state(params, make_optimizer(OptimConfig(), params, TrainConfig().steps), 0, False)
    ckpt = Checkpointer(str(tmp_path / "w" / "checkpoints"), CheckpointConfig())
    ckpt.check_model({"model": model.cfg.to_dict()})  # the loop's "same model?" check passes
    state, data = ckpt.restore(0, abstract_like(like))
    ckpt.close()
    assert int(state.step) == 0 and data == {}
    restored = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state.params)}
    for path, value in _flat(model).items():
        assert np.array_equal(restored[path], value), path
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))

    with pytest.raises(ConversionError, match="already holds checkpoints"):
        save_native(model, str(tmp_path / "w"))


def test_params_only_checkpoint_on_a_mesh(tmp_path):
    model = from_pretrained(_fixture("nemotron_h"), dtype="float32")
    save_native(model, str(tmp_path / "w"), optimizer_state=False)
    mesh = make_mesh(MeshConfig(data=2, tensor=4))
    back = from_pretrained(str(tmp_path / "w"), mesh=mesh)
    assert back.layers.block(0).mixer.in_proj[...].addressable_shards[0].data.shape[2] == 1
    a, b = _flat(model), _flat(back)
    assert all(np.array_equal(a[p], b[p]) for p in a)


def test_cli_errors_exit_2_with_the_problem(tmp_path, capsys):
    from mamba_jax.convert import main

    assert main(["--from-hf", str(tmp_path / "nowhere"), "--to", str(tmp_path / "x")]) == 2
    assert "config.json" in capsys.readouterr().err
    step = tmp_path / "run" / "checkpoints" / "3"
    step.mkdir(parents=True)
    (step / "_CHECKPOINT_METADATA").write_text("{}")
    assert main(["--from-hf", _fixture("mamba2_g1"), "--to", str(tmp_path / "run")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--from-hf", _fixture("mamba2_g1"), "--to-hf", str(tmp_path / "y")])


# ------------------------------------------------------------------------------------------------------------
# Tokenizers and errors
# ------------------------------------------------------------------------------------------------------------
def test_tokenizer_json_beside_a_model_loads():
    tok = load_tokenizer(_fixture("mamba2_g1"))
    ids = tok.encode("Mamba layers mix the sequence.")
    assert ids and max(ids) < 173 and tok.decode(ids) == "Mamba layers mix the sequence."
    assert tok.eos_id == 0


def test_not_a_supported_model(tmp_path):
    with pytest.raises(ConversionError, match="not a supported model"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConversionError, match=r"'llama'.*Mamba2ForCausalLM"):
        from_pretrained(str(tmp_path))
    with pytest.raises(ConversionError, match="does not exist"):
        from_pretrained(str(tmp_path / "missing"))


def test_missing_weights(tmp_path):
    d = _rewrite(_fixture("mamba2_g2"), str(tmp_path / "m"), drop={"backbone.layers.2.mixer.in_proj.weight"})
    with pytest.raises(ConversionError, match=r"missing .*layers\.2\.mixer\.in_proj\.weight.*incomplete"):
        from_pretrained(d)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(ConversionError, match=r"no \.safetensors"):
        from_pretrained(d)
    split = _rewrite(_fixture("mamba2_g2"), str(tmp_path / "s"), max_shard_size=60_000)
    second = sorted(f for f in os.listdir(split) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(split, second))
    with pytest.raises(ConversionError, match=f"{second} is missing.*download"):
        from_pretrained(split)


def test_untied_config_without_a_head(tmp_path):
    d = _rewrite(_fixture("mamba2_g1"), str(tmp_path / "t"), config={"tie_word_embeddings": False})
    with pytest.raises(ConversionError, match=r"lm_head\.weight.*tie_word_embeddings=true"):
        from_pretrained(d)


def test_no_conv_bias_loads_as_zeros():
    model = from_pretrained(_fixture("mamba2_g2"))
    assert "backbone.layers.0.mixer.conv1d.bias" not in SafetensorsDir(_fixture("mamba2_g2")).names
    assert not np.any(np.asarray(model.layers.block(0).mixer.conv_bias[...]))


def test_wrong_shape(tmp_path):
    d = _rewrite(_fixture("mamba2_g2"), str(tmp_path / "w"), config={"state_size": 16})
    with pytest.raises(ConversionError, match=r"in_proj\.weight is \(168, 32\), expected \(200, 32\).*config\.json"):
        from_pretrained(d)


@pytest.mark.parametrize(
    "name,change,message",
    [
        ("mamba2_g2", {"use_bias": True}, "use_bias=true"),
        ("mamba2_g2", {"hidden_act": "gelu"}, "activation is 'gelu'"),
        ("nemotron_h", {"layers_block_type": ["mamba", "moe", "mamba", "mlp", "mamba", "attention", "mlp"]}, "moe"),
        ("nemotron_h", {"layers_block_type": None, "hybrid_override_pattern": "M-MEM*-"}, "mixture-of-experts"),
        ("nemotron_h", {"attention_bias": True}, "attention_bias"),
        ("nemotron_h", {"sliding_window": 64}, "sliding_window"),
        ("nemotron_h", {"mlp_hidden_act": "gelu_pytorch_tanh"}, "mlp_hidden_act"),
    ],
)
def test_unsupported_config_option(tmp_path, name, change, message):
    d = _rewrite(_fixture(name), str(tmp_path / "u"), config=change)
    with pytest.raises(ConversionError, match=message) as e:
        from_pretrained(d)
    assert "unsupported" in str(e.value)


def test_weights_the_config_does_not_describe(tmp_path):
    d = _rewrite(_fixture("mamba2_g2"), str(tmp_path / "x"), config={"num_hidden_layers": 2})
    with pytest.raises(ConversionError, match=r"does not describe: backbone\.layers\.2\."):
        from_pretrained(d)
