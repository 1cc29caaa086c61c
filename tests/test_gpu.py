"""On the GPU (device machine): cuDNN attention against the XLA path, the SSD at real sizes against the
float32 reference, and a bf16 model forward. Skipped without a GPU."""

import jax
import jax.numpy as jnp
import pytest
from helpers import rel_err, small_hybrid, ssd_inputs

import mamba_jax
from mamba_jax.layers.attention import Attention
from mamba_jax.ops import ssd_reference
from mamba_jax.parallel import init_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("docs", [False, True])
def test_cudnn_attention_matches_xla(docs):
    from flax import nnx

    cfg = small_hybrid(
        d_model=512, attn_num_heads=8, attn_num_kv_heads=2, attn_head_dim=128, dtype="bfloat16", attn_impl="cudnn"
    )
    a = Attention(cfg, 0, rngs=nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.key(1), (2, 1024, 512), jnp.bfloat16)
    seq_idx = (jnp.arange(1024)[None] >= jnp.array([[300], [1024]])).astype(jnp.int32) if docs else None
    got = a(x, seq_idx=seq_idx)
    a.cfg = cfg.replace(attn_impl="xla")
    want = a(x, seq_idx=seq_idx)
    assert rel_err(got, want) <= 2e-2


@pytest.mark.parametrize("shape", [(2, 2048, 16, 64, 1, 128), (1, 4096, 32, 64, 8, 128)])
def test_ssd_real_size_bf16(shape):
    b, l, h, p, g, n = shape
    inp = ssd_inputs(0, b, l, h, p, g, n, dtype=jnp.bfloat16, n_docs=3)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    kw = dict(D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True, seq_idx=inp["seq_idx"], return_final_states=True)
    y, f = mamba_jax.ssd(*args, chunk_size=256, impl="xla", **kw)
    y_ref, f_ref = jax.jit(lambda *a: ssd_reference(*a, **kw))(*args)
    assert rel_err(y, y_ref) <= 2e-2 and rel_err(f, f_ref) <= 2e-2


def test_bf16_model_forward_on_gpu():
    cfg = small_hybrid(dtype="bfloat16", attn_head_dim=64, d_model=256, ssd_impl="xla")
    logits = jax.jit(lambda ids: init_model(cfg)(ids))(jnp.zeros((2, 512), jnp.int32))
    assert bool(jnp.all(jnp.isfinite(logits)))
