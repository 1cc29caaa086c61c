"""Helpers shared by the tests: relative error, random SSD inputs, a small hybrid config, a jitted forward,
sharded generation, subprocess flags."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.models import ModelConfig


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float32; a NaN anywhere fails."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    assert not bool(jnp.isnan(a).any()), "NaN in the result"
    assert not bool(jnp.isnan(b).any()), "NaN in the reference"
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.maximum(jnp.linalg.norm(b.ravel()), 1e-30))


def ssd_inputs(seed, b, l, h, p, g, n, *, dtype=jnp.float32, n_docs=None):
    """Fresh random inputs for the SSD scan (A < 0, dt ≥ 0)."""
    ks = jax.random.split(jax.random.key(seed), 10)
    r = lambda k, s, scale=1.0: scale * jax.random.normal(k, s, jnp.float32)  # noqa: E731
    out = dict(
        x=r(ks[0], (b, l, h, p)).astype(dtype),
        # dt ≥ 0 and dt_bias ≥ 0 so that every option set is a valid scan with or without softplus.
        dt=jnp.abs(r(ks[1], (b, l, h), 0.5)).astype(dtype),
        A=-jnp.exp(r(ks[2], (h,), 0.5)),
        B=r(ks[3], (b, l, g, n)).astype(dtype),
        C=r(ks[4], (b, l, g, n)).astype(dtype),
        D=r(ks[5], (h,)),
        z=r(ks[6], (b, l, h, p)).astype(dtype),
        dt_bias=jnp.abs(r(ks[7], (h,), 0.3)),
        initial_states=r(ks[8], (b, h, p, n)),
    )
    if n_docs:
        # Document starts at random positions (at least one inside the row), as packing produces.
        cuts = jax.random.randint(ks[9], (b, n_docs - 1), 1, l)
        out["seq_idx"] = (jnp.arange(l)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(jnp.int32)
    return out


def small_hybrid(**changes) -> ModelConfig:
    """A tiny model with all three layer kinds, divisible by tensor = 4 and data = 2."""
    base = dict(
        pattern="M*-M-",
        d_model=64,
        vocab_size=250,
        vocab_multiple=8,
        mamba_d_state=16,
        mamba_head_dim=8,
        mamba_num_groups=4,
        mamba_chunk_size=16,
        attn_num_heads=4,
        attn_num_kv_heads=4,
        attn_head_dim=16,
        ffn_hidden_size=128,
        dtype="float32",
    )
    base.update(changes)
    return ModelConfig(**base)


@jax.jit
def forward(model, ids, seq_idx=None):
    """The model's logits, jitted (op by op, a small model's forward spends seconds dispatching ops): one
    function for every test, so that calls on the same model structure and shapes share one compile."""
    return model(ids, seq_idx=seq_idx)


def full_forward_rows(model, seqs):
    """The model's logits over each token sequence of `seqs`, from one jitted forward of them right-padded
    into a batch: the model is causal, so a row's logits up to its own length never see the padding after
    it and are that sequence's forward alone (one compile for every length, where each sequence alone would
    compile, or run op by op, per length)."""
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for row, seq in zip(ids, seqs, strict=True):
        row[: len(seq)] = seq
    logits = np.asarray(forward(model, jnp.asarray(ids)))
    return [logits[b, : len(seq)] for b, seq in enumerate(seqs)]


def assert_mesh_generation_equals_single_device(cfg, mesh_config, prompts, *, new_tokens, seed, **engine_kwargs):
    """Greedy generation by the model built from `seed` on one device and on the mesh of `mesh_config` (a
    MeshConfig): the same tokens, log-probabilities within 1e-4. Returns the mesh's Engine."""
    from mamba_jax.inference.engine import Engine, SamplingParams
    from mamba_jax.parallel import init_model, make_mesh

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    single = Engine(init_model(cfg, seed=seed), **engine_kwargs).generate(prompts, params)
    mesh = make_mesh(mesh_config)
    engine = Engine(init_model(cfg, mesh=mesh, seed=seed), mesh=mesh, **engine_kwargs)
    sharded = engine.generate(prompts, params)
    assert sharded.tokens == single.tokens
    assert rel_err(np.array(sharded.logprobs), np.array(single.logprobs)) <= 1e-4
    return engine


def one_device_xla_flags() -> str:
    """XLA_FLAGS for a subprocess (a CLI run): conftest's flags but the 8 fake devices, so that it runs on one
    CPU device (quicker) and compiles as the test process does."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    return " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
