"""A tiny hybrid on mock data for the end-to-end training tests (seconds per run on a CPU).

python -m mamba_jax.train --config tests/recipes/tiny.py --workdir /tmp/tiny
"""

from mamba_jax import config as mjc


def get_config(arg=None):
    c = mjc.base_config()
    c.name = "tiny"
    c.variant = mjc.parse_variant(arg)
    c.model.update(
        pattern="M*-",
        d_model=64,
        vocab_size=256,
        vocab_multiple=8,
        mamba_d_state=16,
        mamba_head_dim=16,
        mamba_num_groups=4,
        mamba_chunk_size=32,
        attn_num_heads=4,
        attn_num_kv_heads=4,
        attn_head_dim=16,
        ffn_hidden_size=128,
        dtype="float32",
    )
    c.data.update(kind="mock", seq_len=64, num_threads=1)
    c.train.update(steps=12, global_batch_size=8, log_every=1, loss_chunk=64)
    c.optim.update(lr=3e-3, min_lr=3e-4, warmup_steps=2)
    c.checkpoint.update(every_steps=3, keep_last=10, async_save=True)
    c.lock()
    return c
