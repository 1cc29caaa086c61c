"""Hugging Face `config.json` ↔ `ModelConfig`, for `Mamba2ForCausalLM` and `NemotronHForCausalLM`.

Field meanings follow transformers' `models/mamba2/{configuration,modeling}_mamba2.py` and
`models/nemotron_h/{configuration,modeling}_nemotron_h.py` (5.x), which reproduce state-spaces' `mamba_ssm`
and NVIDIA's Megatron-trained Nemotron-H. Where the two HF ports compute something other than what their
config fields say, the import follows the computation, so that logits match transformers':

  - Gated RMSNorm: both ports normalise each group of d_inner / n_groups channels (`group_size` in
    `MambaRMSNormGated`), as mamba_ssm and Megatron do → `mamba_norm_per_group=True`. (transformers 4.x's
    Mamba2 normalised the full width in its PyTorch path; that only differed for n_groups > 1, and was fixed.)
  - dt limit: Mamba2 clamps dt to `time_step_limit`; Nemotron-H ignores `time_step_limit` and clamps dt to
    `(time_step_min, inf)` → `mamba_dt_limit`.
  - Residual stream: Mamba2 keeps it in float32 when `residual_in_fp32`; Nemotron-H's block never does, whatever
    the field says → `residual_in_fp32=False`.
  - Vocabulary: HF's `vocab_size` is the embedding's row count, already padded. `vocab_multiple` becomes the
    checkpoint's `pad_vocab_size_multiple` when it divides it, else the largest power of two ≤ 128 that does (so
    the padded size stays HF's and the vocabulary can split over tensor shards); our `vocab_size` is the
    tokenizer's when one beside the model pads to exactly those rows (50277 → 50288), else the row count.
  - Nemotron-H's layer kinds come as `hybrid_override_pattern` ("M-M*-", the published configs) or as the
    `layers_block_type` list transformers 5 writes ("mamba"/"linear_attention", "attention"/"full_attention",
    "mlp"); older key spellings (`mamba_n_groups`, `attention_head_dim`, `rms_norm_eps`, …) are accepted.

What our layers cannot compute is refused with the field to change: linear biases, MoE layers, sliding-window
attention, LayerNorm instead of RMSNorm, activations other than SiLU in the mixer.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

from mamba_jax.interop.errors import ConversionError
from mamba_jax.models.config import ConfigError, ModelConfig

FLAVORS = ("mamba2", "nemotron_h")
ARCHITECTURES = {"mamba2": "Mamba2ForCausalLM", "nemotron_h": "NemotronHForCausalLM"}
HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32", "bf16": "bfloat16"}

# Nemotron-H layer kinds: pattern symbols and the names of `layers_block_type` (both spellings).
_BLOCK_SYMBOLS = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-"}
_MLP_ACTS = {"relu2": "relu2", "gelu": "gelu", "silu": "silu", "swish": "silu"}


def read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(
            f"{directory} has no config.json: not a Hugging Face model directory (expected config.json and "
            f"*.safetensors, as transformers' save_pretrained writes) nor a mamba_jax checkpoint."
        )
    with open(path) as f:
        try:
            return _decode_floats(json.load(f))
        except ValueError as e:
            raise ConversionError(f"{path} is not valid JSON ({e}).") from e


def _decode_floats(obj):
    """transformers 5 writes non-finite floats as {"__float__": "Infinity"}; older versions as bare Infinity."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: _decode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_floats(v) for v in obj]
    return obj


def detect_flavor(hf: dict[str, Any], where: str = "config.json") -> str:
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type == "mamba2" or "Mamba2ForCausalLM" in archs:
        return "mamba2"
    if model_type == "nemotron_h" or "NemotronHForCausalLM" in archs:
        return "nemotron_h"
    raise ConversionError(
        f"{where} describes a model_type={model_type!r} / architectures={archs} model; mamba_jax imports "
        f"Mamba2ForCausalLM (model_type 'mamba2') and NemotronHForCausalLM (model_type 'nemotron_h') only."
    )


def _get(hf: dict, *names: str, default: Any = None) -> Any:
    """The first of `names` present in the config (current spelling first, then older ones)."""
    for n in names:
        if n in hf and hf[n] is not None:
            return hf[n]
    return default


def _refuse_if(cond: bool, problem: str, fix: str) -> None:
    if cond:
        raise ConversionError(f"unsupported Hugging Face config: {problem}; mamba_jax cannot compute it. {fix}")


def vocab_multiple_for(vocab_rows: int, hint: int | None = None) -> int:
    if hint and hint > 0 and vocab_rows % hint == 0:
        return int(hint)
    m = 1
    while m < 128 and vocab_rows % (2 * m) == 0:
        m *= 2
    return m


def with_tokenizer_vocab(cfg: ModelConfig, tokenizer_size: int | None) -> ModelConfig:
    """`vocab_size` is the tokenizer's vocabulary in our config; HF's is the padded embedding. When the
    tokenizer beside the model pads to exactly the embedding rows, take its size (the recipes' value)."""
    if not tokenizer_size or tokenizer_size >= cfg.vocab_size:
        return cfg
    candidate = cfg.replace(vocab_size=tokenizer_size)
    return candidate if candidate.padded_vocab_size == cfg.padded_vocab_size else cfg


def _dtype(hf: dict, override: str | None) -> str:
    if override is not None:
        return override
    return HF_DTYPES.get(str(_get(hf, "dtype", "torch_dtype", default="float32")), "float32")


def config_from_hf(
    hf: dict[str, Any], *, dtype: str | None = None, param_dtype: str | None = None
) -> tuple[ModelConfig, str]:
    """(ModelConfig, flavor) of a Hugging Face config.json (already parsed).

    `dtype` is the compute dtype (default: the config's `dtype` / `torch_dtype`, else float32);
    `param_dtype` the parameters' (default float32, the master weights training keeps).
    """
    flavor = detect_flavor(hf)
    fields = _mamba2_fields(hf) if flavor == "mamba2" else _nemotron_h_fields(hf)
    fields.update(_common(hf), dtype=_dtype(hf, dtype), param_dtype=param_dtype or "float32")
    try:
        return ModelConfig(**fields), flavor
    except ConfigError as e:
        raise ConversionError(f"the Hugging Face config does not make a valid model: {e}") from e


def _required(hf: dict, key: str) -> int:
    if hf.get(key) is None:
        raise ConversionError(f"config.json has no `{key}`; it is required to build the model. Add it.")
    return int(hf[key])


def _common(hf: dict) -> dict:
    rows = _required(hf, "vocab_size")
    return dict(
        d_model=_required(hf, "hidden_size"),
        vocab_size=rows,
        vocab_multiple=vocab_multiple_for(rows, _get(hf, "pad_vocab_size_multiple")),
        norm_eps=float(_get(hf, "layer_norm_epsilon", "rms_norm_eps", "norm_eps", default=1e-5)),
        # initializer_range is left out: it only shapes fresh weights, and HF Mamba2's default (0.1) is not
        # what the checkpoints were trained with; our init_std keeps its default.
    )


def _mamba_fields(hf: dict, *, heads: int, head_dim: int) -> dict:
    act = _get(hf, "mamba_hidden_act", "hidden_act", default="silu")
    _refuse_if(act not in ("silu", "swish"), f"the Mamba mixer's activation is {act!r}", "Only SiLU is supported.")
    t_min, t_max = _time_step_min(hf), float(_get(hf, "time_step_max", "mamba_dt_max", default=0.1))
    derived = _get(hf, "expand", "mamba_expand", default=2) * _required(hf, "hidden_size") == heads * head_dim
    return dict(
        # None when expand · d_model / head_dim gives the heads, as the recipes write it.
        mamba_num_heads=None if derived else int(heads),
        mamba_head_dim=int(head_dim),
        mamba_expand=int(_get(hf, "expand", "mamba_expand", default=2)),
        mamba_d_state=int(_get(hf, "state_size", "ssm_state_size", default=128)),
        mamba_num_groups=int(_get(hf, "n_groups", "mamba_n_groups", default=8)),
        mamba_d_conv=int(_get(hf, "conv_kernel", "mamba_d_conv", default=4)),
        # The dt initialisation range (log-uniform) only shapes freshly initialised weights; a checkpoint whose
        # time_step_min is 0 (a Nemotron-H export without dt clamp) keeps our default range.
        mamba_dt_min=t_min if 0 < t_min < t_max else 0.001,
        mamba_dt_max=t_max if 0 < t_min < t_max else 0.1,
        mamba_dt_init_floor=float(_get(hf, "time_step_floor", "mamba_dt_init_floor", default=1e-4)),
        mamba_norm_per_group=True,
    )


def _time_step_min(hf: dict) -> float:
    return float(_get(hf, "time_step_min", "mamba_dt_min", default=0.001))


def _mamba2_fields(hf: dict) -> dict:
    _refuse_if(bool(hf.get("use_bias")), "use_bias=true (biases on in_proj / out_proj)", "Set use_bias=false.")
    _refuse_if(hf.get("rms_norm") is False, "rms_norm=false (LayerNorm blocks)", "Only RMSNorm models load.")
    d, expand = _required(hf, "hidden_size"), int(_get(hf, "expand", default=2))
    heads, head_dim = int(_get(hf, "num_heads", default=128)), int(_get(hf, "head_dim", default=64))
    _refuse_if(
        heads * head_dim != expand * d,
        f"num_heads·head_dim = {heads * head_dim} differs from expand·hidden_size = {expand * d}",
        "Fix num_heads / head_dim / expand so that they agree (transformers refuses this config too).",
    )
    out = _mamba_fields(hf, heads=heads, head_dim=head_dim)
    lo, hi = (float(v) for v in _get(hf, "time_step_limit", default=(0.0, math.inf)))
    out.update(
        pattern="M" * _required(hf, "num_hidden_layers"),
        mamba_chunk_size=int(_get(hf, "chunk_size", default=256)),
        mamba_dt_limit=(lo, hi),
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", default=False)),
        residual_in_fp32=bool(_get(hf, "residual_in_fp32", default=True)),
    )
    return out


def nemotron_pattern(hf: dict) -> str:
    """The M / * / - pattern of a Nemotron-H config (`layers_block_type` list or `hybrid_override_pattern`)."""
    kinds = _get(hf, "layers_block_type", "layer_types")
    if kinds is not None:
        bad = sorted({k for k in kinds if k not in _BLOCK_SYMBOLS})
        _refuse_if(bool(bad), f"layers_block_type has layer kind(s) {bad}", "Only mamba, attention and mlp load.")
        return "".join(_BLOCK_SYMBOLS[k] for k in kinds)
    pattern = _get(hf, "hybrid_override_pattern")
    if not pattern:
        raise ConversionError(
            "the Nemotron-H config.json has neither `hybrid_override_pattern` nor `layers_block_type`, so the "
            'layer kinds are unknown; add one of them (e.g. "hybrid_override_pattern": "M-M-M*-").'
        )
    bad = sorted(set(pattern) - set("M*-"))
    _refuse_if(
        bool(bad),
        f"hybrid_override_pattern {pattern!r} has layer symbol(s) {bad} ('E' is a mixture-of-experts layer)",
        "Only M (Mamba2), * (attention) and - (MLP) layers load.",
    )
    return pattern


def _nemotron_h_fields(hf: dict) -> dict:
    pattern = nemotron_pattern(hf)
    _refuse_if(
        bool(hf.get("use_bias")) or bool(hf.get("mamba_proj_bias")),
        "use_bias / mamba_proj_bias = true (biases on the Mamba projections)",
        "Set them to false.",
    )
    out = _mamba_fields(
        hf, heads=int(_get(hf, "mamba_num_heads", default=128)), head_dim=int(_get(hf, "mamba_head_dim", default=64))
    )
    out.update(
        pattern=pattern,
        mamba_chunk_size=int(_get(hf, "chunk_size", "mamba_chunk_size", default=128)),
        # transformers' NemotronHMamba2Mixer: `time_step_limit = (config.time_step_min, inf)`, time_step_limit unread.
        mamba_dt_limit=(_time_step_min(hf), math.inf),
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", default=False)),
        residual_in_fp32=False,  # NemotronHBlock adds the residual in the activations' dtype
    )
    if "*" in pattern:
        _refuse_if(bool(hf.get("attention_bias")), "attention_bias=true", "Set attention_bias=false.")
        _refuse_if(hf.get("sliding_window") is not None, "sliding_window attention", "Set sliding_window=null.")
        heads = int(_get(hf, "num_attention_heads", default=32))
        out.update(
            attn_num_heads=heads,
            attn_num_kv_heads=int(_get(hf, "num_key_value_heads", default=heads)),
            # transformers 5 reads `head_dim` (class default 128); the published configs say attention_head_dim.
            attn_head_dim=int(_get(hf, "head_dim", "attention_head_dim", default=128)),
            attn_rope=False,  # Nemotron-H attention has no positional encoding
        )
    if "-" in pattern:
        _refuse_if(bool(hf.get("mlp_bias")), "mlp_bias=true", "Set mlp_bias=false.")
        act = _get(hf, "mlp_hidden_act", "hidden_act", default="relu2")
        _refuse_if(act not in _MLP_ACTS, f"mlp_hidden_act={act!r}", f"Use one of {sorted(_MLP_ACTS)}.")
        out.update(ffn_hidden_size=int(_get(hf, "intermediate_size", default=21504)), mlp_activation=_MLP_ACTS[act])
    return out


# ----------------------------------------------------------------------------------------------------------------
def default_flavor(cfg: ModelConfig) -> str:
    return "mamba2" if set(cfg.pattern) == {"M"} else "nemotron_h"


def config_to_hf(cfg: ModelConfig, flavor: str, *, special_tokens: dict[str, int | None] | None = None) -> dict:
    """The config.json of `cfg` as a Hugging Face `flavor` ("mamba2" or "nemotron_h") model.

    Raises ConversionError for what that transformers class cannot compute. The weights' layout is in
    `mamba_jax.interop.hf_weights`; `special_tokens` (eos / bos / pad ids) come from a tokenizer.
    """
    if flavor not in FLAVORS:
        raise ConversionError(f"unknown Hugging Face flavor {flavor!r}; choose one of {FLAVORS}.")

    def refuse(problem: str, fix: str) -> None:
        raise ConversionError(f"cannot export to Hugging Face {ARCHITECTURES[flavor]}: {problem}. {fix}")

    if "M" in cfg.pattern and cfg.mamba_num_groups > 1 and not cfg.mamba_norm_per_group:
        refuse(
            "the model normalises the gated RMSNorm over all of d_inner with several groups, and transformers "
            "normalises per group",
            "Only models with mamba_norm_per_group=True (or one group) export.",
        )
    hf: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[flavor]],
        model_type=flavor,
        hidden_size=cfg.d_model,
        vocab_size=cfg.padded_vocab_size,
        pad_vocab_size_multiple=cfg.vocab_multiple,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        dtype=cfg.param_dtype,
        torch_dtype=cfg.param_dtype,  # the name transformers 4.x reads
        use_bias=False,
        use_conv_bias=True,  # our mixer always has a conv bias (zeros for checkpoints that had none)
        use_cache=True,
    )
    if "M" in cfg.pattern:
        d_inner = cfg.mamba_d_inner
        hf.update(
            state_size=cfg.mamba_d_state,
            n_groups=cfg.mamba_num_groups,
            conv_kernel=cfg.mamba_d_conv,
            chunk_size=cfg.mamba_chunk_size,
            time_step_min=cfg.mamba_dt_min,
            time_step_max=cfg.mamba_dt_max,
            time_step_floor=cfg.mamba_dt_init_floor,
            time_step_limit=list(cfg.mamba_dt_limit),
            expand=d_inner // cfg.d_model if d_inner % cfg.d_model == 0 else cfg.mamba_expand,
        )
    if flavor == "mamba2":
        if set(cfg.pattern) != {"M"}:
            refuse(
                f"the pattern {cfg.pattern!r} has layers other than Mamba2", "Export hybrids with flavor='nemotron_h'."
            )
        if d_inner % cfg.d_model:
            refuse(
                f"d_inner = {d_inner} is not a multiple of d_model = {cfg.d_model} (HF's Mamba2 derives it from "
                f"an integer expand)",
                "Export with flavor='nemotron_h', which takes the heads explicitly.",
            )
        hf.update(
            num_hidden_layers=cfg.n_layers,
            num_heads=cfg.mamba_heads,
            head_dim=cfg.mamba_head_dim,
            hidden_act="silu",
            residual_in_fp32=cfg.residual_in_fp32,
            rms_norm=True,
            tie_word_embeddings=cfg.tie_embeddings,
        )
    else:
        _nemotron_h_to_hf(cfg, hf, refuse)
    for name, value in (special_tokens or {}).items():
        if value is not None:
            hf[f"{name}_token_id"] = value
    return hf


def _nemotron_h_to_hf(cfg: ModelConfig, hf: dict, refuse) -> None:
    if cfg.residual_in_fp32:
        # The weights are the same; only rounding in bfloat16 / float16 differs (float32 logits are equal).
        warnings.warn(
            "exporting a model trained with residual_in_fp32=True as Nemotron-H, whose transformers block keeps "
            "the residual in the compute dtype: low-precision logits will differ slightly.",
            stacklevel=3,
        )
    lo, hi = cfg.mamba_dt_limit
    if "M" in cfg.pattern and hi != math.inf:
        refuse(
            f"the dt limit {cfg.mamba_dt_limit} has an upper bound, and transformers' Nemotron-H clamps dt to "
            f"(time_step_min, inf) only",
            "Export pure Mamba2 models with flavor='mamba2', or train with mamba_dt_limit=(min, inf).",
        )
    hf.update(
        num_hidden_layers=cfg.n_layers,
        hybrid_override_pattern=cfg.pattern,
        residual_in_fp32=False,
        # An untied head: transformers' NemotronHForCausalLM ties nothing, so a tied model exports its head.
        tie_word_embeddings=False,
    )
    if "M" in cfg.pattern:
        hf.update(
            mamba_num_heads=cfg.mamba_heads,
            mamba_head_dim=cfg.mamba_head_dim,
            ssm_state_size=hf.pop("state_size"),
            mamba_hidden_act="silu",
            mamba_proj_bias=False,
            time_step_min=lo,  # the runtime clamp of transformers' Nemotron-H (see the module docstring)
        )
    if "*" in cfg.pattern:
        if cfg.attn_rope:
            refuse(
                "the attention uses RoPE, and Nemotron-H attention has no positional encoding", "Use attn_rope=False."
            )
        hf.update(
            num_attention_heads=cfg.attn_num_heads,
            num_key_value_heads=cfg.attn_num_kv_heads,
            head_dim=cfg.attn_head_dim,
            attention_head_dim=cfg.attn_head_dim,  # the published configs' name
            attention_bias=False,
            sliding_window=None,
        )
    if "-" in cfg.pattern:
        if cfg.mlp_activation == "swiglu":
            refuse("the MLP is gated (SwiGLU), and Nemotron-H's MLP is not", "Only relu2 / gelu / silu MLPs export.")
        hf.update(intermediate_size=cfg.ffn_hidden_size, mlp_hidden_act=cfg.mlp_activation, mlp_bias=False)
