"""Hugging Face model directories: load one into a LanguageModel (`load_hf`), write one (`export_hf`).

A directory is what transformers' `save_pretrained` writes for `Mamba2ForCausalLM` / `NemotronHForCausalLM`:
config.json (mapped by `hf_config`), the weights in model.safetensors or in several files with
model.safetensors.index.json (read lazily by `safetensors_io`), and tokenizer files beside them. Each weight is
checked against the shape the config implies before anything is placed on a device, converted to our layout
(`hf_weights`) and placed directly into its shards (`placement`).

An export is written into a temporary sibling directory and renamed into place when complete, so a failed or
interrupted export never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.interop import hf_config
from mamba_jax.interop.errors import ConversionError
from mamba_jax.interop.hf_weights import Entry, tensor_map
from mamba_jax.interop.placement import abstract_language_model, build_model, host_array
from mamba_jax.interop.safetensors_io import PlannedTensor, SafetensorsDir, parse_size, write_sharded
from mamba_jax.models.lm import LanguageModel

# Tokenizer files transformers keeps beside a model; copied along on export and conversion.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
IGNORED_PREFIXES = ("mtp.",)  # Nemotron-H's multi-token-prediction layers: transformers skips them too


def is_hf_dir(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            d = json.load(f)
    except ValueError:
        return False
    return isinstance(d, dict) and ("model_type" in d or "architectures" in d)


def _prefix(names: set[str]) -> str:
    return "model." if any(n.startswith("model.embeddings") for n in names) else "backbone."


def _examples(names, n: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _check_weights(path: str, files: SafetensorsDir, entries: list[Entry], tied: bool) -> None:
    """Every tensor present with the shape config.json implies, and nothing the config does not describe."""
    want = {e.hf_name: e for e in entries}
    missing = [n for n, e in want.items() if n not in files.names and e.rule.default is None]
    if missing:
        tie = " (or, for lm_head.weight, set tie_word_embeddings=true)" if "lm_head.weight" in missing else ""
        raise ConversionError(
            f"{path}: {len(missing)} weight(s) that config.json describes are missing from the safetensors files: "
            f"{_examples(missing)}. The download is incomplete, or config.json belongs to another model (e.g. "
            f"more layers than the weights have); fetch the complete model or the config.json that matches it{tie}."
        )
    wrong = [
        f"{n} is {files.shape(n)}, expected {e.rule.hf_shape}"
        for n, e in want.items()
        if n in files.names and files.shape(n) != e.rule.hf_shape
    ]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise ConversionError(
            f"{path}: weight shapes disagree with config.json: {'; '.join(wrong[:3])}{more}. config.json does not "
            f"describe these weights; use the config.json that came with them (check hidden_size, heads, n_groups, "
            f"state size, vocab_size)."
        )
    extra = {n for n in files.names - set(want) if not n.startswith(IGNORED_PREFIXES)}
    if tied:
        extra.discard("lm_head.weight")  # transformers overwrites a tied head with the embedding
    if extra:
        raise ConversionError(
            f"{path}: the safetensors files hold weight(s) that config.json does not describe: {_examples(extra)} "
            f"(biases with use_bias=false, more layers than num_hidden_layers / the pattern, or another "
            f"architecture). Fix config.json to describe the checkpoint; mamba_jax refuses to drop weights."
        )


def load_hf(path: str, *, mesh=None, dtype: str | None = None, param_dtype: str | None = None, rules=None):
    """A LanguageModel from a Hugging Face Mamba2 / Nemotron-H directory, placed on `mesh` when given.

    `dtype`: compute dtype (default: the config's `dtype` / `torch_dtype`); `param_dtype`: the parameters'
    (default float32). Returns (model, flavor).
    """
    cfg, flavor = hf_config.config_from_hf(hf_config.read_config(path), dtype=dtype, param_dtype=param_dtype)
    cfg = hf_config.with_tokenizer_vocab(cfg, _tokenizer_size(path))
    files = SafetensorsDir(path)
    stack = abstract_language_model(cfg).layers
    entries = tensor_map(cfg, stack, prefix=_prefix(files.names), head=not cfg.tie_embeddings)
    _check_weights(path, files, entries, cfg.tie_embeddings)
    by_leaf: dict[tuple, list[Entry]] = {}
    for e in entries:
        by_leaf.setdefault(e.path, []).append(e)

    def produce(leaf_path, spec) -> np.ndarray:
        out = np.empty(spec.shape, spec.dtype)
        for e in by_leaf[leaf_path]:
            raw = files.get(e.hf_name) if e.hf_name in files.names else e.rule.default()
            value = e.rule.to_ours(raw)
            if e.rep is None:
                out[...] = value
            else:
                out[e.rep] = value
        return out

    return build_model(cfg, produce, mesh=mesh, rules=rules), flavor


# ----------------------------------------------------------------------------------------------------------------
def copy_tokenizer(source: str | None, out_dir: str) -> list[str]:
    """Copy tokenizer files from a directory (the known names) or one file (tokenizer.json / a .model)."""
    if not source:
        return []
    if os.path.isdir(source):
        names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
        for n in names:
            shutil.copyfile(os.path.join(source, n), os.path.join(out_dir, n))
        return names
    if not os.path.isfile(source):
        raise ConversionError(f"tokenizer {source} does not exist; give a tokenizer.json, a .model or their folder.")
    name = "tokenizer.json" if source.endswith(".json") else "tokenizer.model"
    shutil.copyfile(source, os.path.join(out_dir, name))
    return [name]


def _tokenizer_size(directory: str) -> int | None:
    from mamba_jax.data.errors import DataError
    from mamba_jax.data.tokenizer import load_tokenizer

    if not any(os.path.isfile(os.path.join(directory, n)) for n in ("tokenizer.json", "tokenizer.model")):
        return None
    try:
        return load_tokenizer(directory).vocab_size
    except (DataError, OSError, ValueError):  # a tokenizer we cannot read does not stop the model from loading
        return None


def _special_tokens(tokenizer: str | None) -> dict[str, int | None]:
    if not tokenizer:
        return {}
    from mamba_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    return {"eos": tok.eos_id, "bos": tok.bos_id, "pad": tok.pad_id}


def export_hf(
    model: LanguageModel,
    out_dir: str,
    *,
    tokenizer: str | None = None,
    flavor: str | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> str:
    """Write `model` as a Hugging Face directory that transformers loads with the same logits.

    flavor: "mamba2" (Mamba2ForCausalLM; pure Mamba2 patterns) or "nemotron_h" (NemotronHForCausalLM; any
    M / * / - pattern); default "mamba2" for pure Mamba2 models, else "nemotron_h". tokenizer: a tokenizer file
    or a directory whose tokenizer files are copied along (and whose EOS / BOS / pad ids go into config.json).
    dtype: cast the floating weights (e.g. "bfloat16"); default: as the parameters are. Weights go into
    files of at most `max_shard_size` (with an index when there are several). Refuses a non-empty `out_dir`
    unless `overwrite`. Returns out_dir. LoRA adapters are merged into their weights first (the model passed in
    is left as it is); a prompt-tuned model is refused (Hugging Face checkpoints hold no virtual tokens).
    """
    if getattr(model, "prompt", None) is not None:
        raise ConversionError(
            "a prompt-tuned model carries virtual tokens that a Hugging Face checkpoint cannot hold; export its base "
            "model, and keep the mamba_jax checkpoint for the tuned prompt."
        )
    if any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(model))):
        from mamba_jax.models.peft import merge_lora

        model = nnx.clone(model)
        merge_lora(model)
    cfg = model.cfg
    flavor = flavor or hf_config.default_flavor(cfg)
    hf = hf_config.config_to_hf(cfg, flavor, special_tokens=_special_tokens(tokenizer))
    out_dtype = None if dtype is None else np.dtype(jnp.dtype(hf_config.HF_DTYPES.get(dtype, dtype)))
    if dtype is not None:
        hf["dtype"] = hf["torch_dtype"] = hf_config.HF_DTYPES.get(dtype, dtype)
    out_dir = os.path.abspath(out_dir)
    ensure_writable(out_dir, overwrite)

    state = dict(nnx.to_flat_state(nnx.state(model)))
    # The HF class ties the head itself only for Mamba2; Nemotron-H gets an explicit lm_head.
    entries = tensor_map(cfg, model.layers, head=not (cfg.tie_embeddings and flavor == "mamba2"))

    def planned(e: Entry) -> PlannedTensor:
        param = state[e.path].get_value()
        dt = out_dtype or np.dtype(param.dtype)

        def produce():
            # One layer of a stacked parameter is sliced on the devices: only that layer comes to the host.
            value = host_array(param if e.rep is None else param[e.rep])
            return e.rule.to_hf(value).astype(dt)

        return PlannedTensor(e.hf_name, e.rule.hf_shape, dt, produce)

    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_sharded(tmp, [planned(e) for e in entries], parse_size(max_shard_size))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
        copy_tokenizer(tokenizer, tmp)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_writable(out_dir: str, overwrite: bool) -> None:
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConversionError(f"{out_dir} is not empty; choose a new directory or pass overwrite=True (--overwrite).")


def _replace_dir(new: str, target: str) -> None:
    """Move `new` to `target`; an existing `target` is removed only once `new` is in place."""
    old = None
    if os.path.exists(target):
        old = f"{target}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(new, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)
