"""Weight names and layouts: Hugging Face's torch tensors ↔ mamba_jax's parameters, one rule per tensor.

Names follow transformers' `Mamba2ForCausalLM` and `NemotronHForCausalLM` (models/mamba2, models/nemotron_h):
`{prefix}embeddings.weight`, `{prefix}layers.{i}.norm.weight`, `{prefix}layers.{i}.mixer.…`,
`{prefix}norm_f.weight`, `lm_head.weight`, with prefix `backbone.` (Mamba2 and the published Nemotron-H
checkpoints) or `model.` (what transformers 5 calls Nemotron-H's base model; it reads both).

Layouts. torch's Linear stores (out, in); ours are (in, …out) with named axes. The Mamba2 mixer's in_proj is
one fused (2·d_inner + 2·G·N + H, D) matrix with rows [z | x | B | C | dt], and its depthwise conv one
(d_inner + 2·G·N, 1, K) kernel over [x | B | C]; ours keep each SSM group's slices side by side, in_proj
(D, G, [z_g | x_g | B_g | C_g | dt_g]) and conv (K, G, [x_g | B_g | C_g]) (see mamba_jax/layers/mamba2.py), so
the import splits the fused rows by part and then by group — the split that makes tensor-parallel shards hold
whole groups — and the export concatenates them back. Heads of a group are contiguous in z, x and dt (head h
reads group h // (H / G)), so the split is a reshape.

Dimension key: D model width, G groups, R heads per group, H heads, P head dim, N state, K conv kernel,
V vocabulary rows, Q query heads, J key/value heads, E attention head dim, F MLP hidden size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from mamba_jax.models.config import ModelConfig

LAYER_PATH = ("layers", "segments")  # LanguageModel.layers.segments[s].layers.blocks[k]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One parameter of ours (a path below its block, or in the model) and the HF tensor it equals."""

    ours: tuple[str, ...]
    hf: str  # below the layer prefix (`…layers.{i}.`), or the full name for model-level tensors
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    default: Callable[[], np.ndarray] | None = None  # the value when a checkpoint leaves the tensor out


def _identity(a):
    return a


def _transpose(a):
    return a.T


def _fused_to_grouped(a, widths: tuple[int, ...], g: int):
    """Last axis [part_0 | part_1 | …] (each part g equal groups) → (…, G, [part_0_g | part_1_g | …])."""
    parts = np.split(a, np.cumsum(widths)[:-1], axis=-1)
    return np.concatenate([p.reshape(*p.shape[:-1], g, p.shape[-1] // g) for p in parts], axis=-1)


def _grouped_to_fused(a, group_widths: tuple[int, ...]):
    parts = np.split(a, np.cumsum(group_widths)[:-1], axis=-1)
    return np.concatenate([p.reshape(*p.shape[:-2], -1) for p in parts], axis=-1)


def mamba_rules(cfg: ModelConfig) -> list[Rule]:
    d, h, p = cfg.d_model, cfg.mamba_heads, cfg.mamba_head_dim
    g, n, k = cfg.mamba_num_groups, cfg.mamba_d_state, cfg.mamba_d_conv
    r = h // g
    proj_widths = (h * p, h * p, g * n, g * n, h)  # z | x | B | C | dt
    proj_group = (r * p, r * p, n, n, r)
    conv_widths, conv_group = proj_widths[1:4], proj_group[1:4]  # x | B | C
    conv_dim = sum(conv_widths)
    return [
        Rule(
            ("mixer", "in_proj"),
            "mixer.in_proj.weight",
            (sum(proj_widths), d),
            lambda w: _fused_to_grouped(w.T, proj_widths, g),
            lambda w_DGW: _grouped_to_fused(w_DGW, proj_group).T,
        ),
        Rule(
            ("mixer", "conv_weight"),
            "mixer.conv1d.weight",
            (conv_dim, 1, k),
            lambda w: _fused_to_grouped(w[:, 0, :].T, conv_widths, g),
            lambda w_KGF: _grouped_to_fused(w_KGF, conv_group).T[:, None, :],
        ),
        Rule(
            ("mixer", "conv_bias"),
            "mixer.conv1d.bias",
            (conv_dim,),
            lambda b: _fused_to_grouped(b, conv_widths, g),
            lambda b_GF: _grouped_to_fused(b_GF, conv_group),
            # use_conv_bias=false: a conv without bias is a conv with a zero bias.
            default=lambda: np.zeros((conv_dim,), np.float32),
        ),
        Rule(("mixer", "dt_bias"), "mixer.dt_bias", (h,), _identity, _identity),
        Rule(("mixer", "A_log"), "mixer.A_log", (h,), _identity, _identity),
        Rule(("mixer", "D"), "mixer.D", (h,), _identity, _identity),
        Rule(("mixer", "norm"), "mixer.norm.weight", (h * p,), lambda w: w.reshape(h, p), lambda w: w.reshape(-1)),
        _heads_to_model("out_proj", h, p, d),
    ]


def _heads_to_model(name: str, heads: int, dim: int, d: int) -> Rule:
    """An output projection: ours (heads, dim, D), Hugging Face's nn.Linear weight (D, heads · dim)."""
    return Rule(
        ("mixer", name),
        f"mixer.{name}.weight",
        (d, heads * dim),
        lambda w: w.T.reshape(heads, dim, d),
        lambda w_HED: w_HED.reshape(heads * dim, d).T,
    )


def attention_rules(cfg: ModelConfig) -> list[Rule]:
    d, q, j, e = cfg.d_model, cfg.attn_num_heads, cfg.attn_num_kv_heads, cfg.attn_head_dim

    def proj(name: str, heads: int) -> Rule:
        return Rule(
            ("mixer", name),
            f"mixer.{name}.weight",
            (heads * e, d),
            lambda w: w.T.reshape(d, heads, e),
            lambda w_DHE: w_DHE.reshape(d, heads * e).T,
        )

    return [
        proj("q_proj", q),
        proj("k_proj", j),
        proj("v_proj", j),
        _heads_to_model("o_proj", q, e, d),
    ]


def mlp_rules(cfg: ModelConfig) -> list[Rule]:
    d, f = cfg.d_model, cfg.ffn_hidden_size
    return [
        Rule(("mixer", "up_proj"), "mixer.up_proj.weight", (f, d), _transpose, _transpose),
        Rule(("mixer", "down_proj"), "mixer.down_proj.weight", (d, f), _transpose, _transpose),
    ]


LAYER_RULES = {"M": mamba_rules, "*": attention_rules, "-": mlp_rules}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor: its full name, the leaf of our state it fills, and which layer of a stacked leaf."""

    hf_name: str
    path: tuple  # the leaf's path in nnx.state(model)
    rep: int | None  # index on the leading "layers" axis of a scanned segment; None when unstacked
    rule: Rule


def tensor_map(cfg: ModelConfig, layer_stack, *, prefix: str = "backbone.", head: bool = True) -> list[Entry]:
    """Every HF tensor of the model in file order. `layer_stack` is the model's LayerStack (for `locate`);
    `head=False` leaves out lm_head (tied embeddings that the HF class ties itself)."""
    d, v = cfg.d_model, cfg.padded_vocab_size
    out = [Entry(prefix + "embeddings.weight", ("embed",), None, Rule(("embed",), "", (v, d), _identity, _identity))]
    per_symbol = {s: LAYER_RULES[s](cfg) for s in set(cfg.pattern)}
    block_norm = Rule(("norm", "weight"), "norm.weight", (d,), _identity, _identity)
    for i, symbol in enumerate(cfg.pattern):
        s, rep, k = layer_stack.locate(i)
        base = (*LAYER_PATH, s, "layers", "blocks", k)
        for rule in [block_norm, *per_symbol[symbol]]:
            out.append(Entry(f"{prefix}layers.{i}.{rule.hf}", base + rule.ours, rep, rule))
    out.append(Entry(prefix + "norm_f.weight", ("norm_f", "weight"), None, block_norm))
    if head:
        # Ours is (D, V) (or the embedding itself when tied); HF's lm_head is (V, D).
        if cfg.tie_embeddings:
            out.append(Entry("lm_head.weight", ("embed",), None, Rule(("embed",), "", (v, d), _identity, _identity)))
        else:
            out.append(
                Entry("lm_head.weight", ("lm_head",), None, Rule(("lm_head",), "", (v, d), _transpose, _transpose))
            )
    return out
