"""Nemotron-H 4B: 52 layers (24 Mamba2 with 112 heads, 4 attention, 24 MLP), d_model 3072, GQA 32/8 heads of 128
(NoPE), relu² MLP 12288, vocabulary 131072.

Pretrain (NeMo-style recipe: TP 2, sequence parallel, bf16 mixed precision, sequence 8192):
  python -m mamba_jax.train --config experiments/nemotronh_4b.py --workdir runs/nemotronh_4b
Parameters: 4,489,223,040 (4.49 B); float32 master weights 8.4 GiB per device at tensor=2.
"""

from mamba_jax import config as mjc


def get_config(arg=None):
    c = mjc.base_config()
    c.name = "nemotronh_4b"
    c.variant = mjc.parse_variant(arg)
    c.model.update(
        pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        d_model=3072,
        vocab_size=131072,
        vocab_multiple=128,
        mamba_num_heads=112,
        mamba_num_groups=8,
        mamba_chunk_size=128,
        attn_num_heads=32,
        attn_num_kv_heads=8,
        attn_head_dim=128,
        ffn_hidden_size=12288,
        mlp_activation="relu2",
    )
    c.mesh.tensor = 2
    mjc.nemo_recipe(c, seq_len=8192, global_batch_size=768)
    c.lock()
    return c
