"""Every recipe in experiments/ loads, builds abstractly, and has the reference parameter count."""

import glob
import os

import pytest

from mamba_jax import config as mjc
from mamba_jax.parallel import abstract_mesh, abstract_model, param_count, per_device_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))
CONTRACT = {
    "mamba2_130m", "mamba2_370m", "mamba2_780m", "mamba2_1_3b", "mamba2_2_7b", "mamba2_8b", "hybrid_8b",
    "nemotronh_4b", "nemotronh_8b", "nemotronh_47b", "nemotronh_56b",
}  # fmt: skip
# Exact counts: mamba_ssm's MambaLMHeadModel for the state-spaces models, the published Nemotron-H 8B.
EXACT = {
    "mamba2_130m": 128_989_632,
    "mamba2_1_3b": 1_343_757_312,
    "mamba2_2_7b": 2_702_599_680,
    "nemotronh_8b": 8_100_852_736,
}
# Published sizes, matched within 3 %.
PUBLISHED = {"mamba2_370m": 370e6, "mamba2_780m": 780e6, "nemotronh_47b": 46.8e9, "nemotronh_56b": 56.3e9}
LAYERS = {  # (Mamba2, attention, MLP) per shared/docs/REFERENCE.md
    "hybrid_8b": (24, 4, 28),
    "nemotronh_4b": (24, 4, 24),
    "nemotronh_8b": (24, 4, 24),
    "nemotronh_47b": (45, 5, 48),
    "nemotronh_56b": (54, 10, 54),
}


def _name(path):
    return os.path.splitext(os.path.basename(path))[0]


def test_contract_recipes_exist():
    assert {_name(p) for p in RECIPES} >= CONTRACT


@pytest.mark.parametrize("path", RECIPES, ids=_name)
def test_recipe_loads_and_builds_abstractly(path):
    for variant in mjc.VARIANTS:  # every recipe takes every variant
        assert mjc.load_config(f"{path}:{variant}").variant == variant
    c = mjc.load_config(path)
    assert c.variant == "pretrain"
    with open(path) as f:
        assert f.read().lstrip().startswith('"""'), "each recipe opens with a docstring"
    cfg = mjc.model_config(c)
    mesh = abstract_mesh(tensor=c.mesh.tensor)
    _, state = abstract_model(cfg, mesh, mjc.sharding_rules(c))
    n = param_count(state)
    name = _name(path)
    if name in EXACT:
        assert n == EXACT[name]
    if name in PUBLISHED:
        assert abs(n / PUBLISHED[name] - 1) < 0.03, n
    if name in LAYERS:
        assert (cfg.count("M"), cfg.count("*"), cfg.count("-")) == LAYERS[name]
    assert per_device_bytes(state) <= n * 4 / c.mesh.tensor * 1.2


def test_nemotronh_56b_builds_abstractly_at_tensor_8():
    c = mjc.load_config(os.path.join(ROOT, "experiments", "nemotronh_56b.py"))
    assert c.mesh.tensor == 8
    cfg = mjc.model_config(c)
    _, state = abstract_model(cfg, abstract_mesh(tensor=8))
    per_device = per_device_bytes(state)
    total = param_count(state) * 4
    print(f"Nemotron-H 56B: {param_count(state):,} parameters, {per_device / 2**30:.2f} GiB per device at TP 8")
    # Everything but the norms splits eight ways.
    assert total / 8 <= per_device < total / 8 * 1.001


def test_variants_and_locked_keys():
    path = os.path.join(ROOT, "experiments", "mamba2_130m.py")
    assert mjc.load_config(path + ":pretrain").variant == "pretrain"
    with pytest.raises(ValueError, match="unknown recipe variant 'pretrian'"):
        mjc.load_config(path + ":pretrian")
    for variant in ("finetune", "finetune_full"):
        ft = mjc.load_config(path + ":" + variant)
        assert ft.variant == variant and ft.data.kind == "sft"
        assert ft.peft.method == ("lora" if variant == "finetune" else "none")
    c = mjc.load_config(path)
    with pytest.raises(AttributeError, match="d_modle"):
        c.model.d_modle = 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mjc.load_config("experiments/nope.py")
