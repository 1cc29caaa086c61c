"""Mamba2-Hybrid 8B (NVIDIA mamba2-hybrid-8b-3t-4k): 56 layers (24 Mamba2, 4 attention, 28 MLP), d_model 4096,
GQA 32/8 heads of 128 without positional encoding, GELU MLP 16384, 256k SentencePiece vocabulary.

Variants: pretrain (default), finetune (SQuAD-style SFT with LoRA), finetune_full.
Pretrain (NeMo recipe: TP 8 on one node of 8 GPUs, bf16 mixed precision, sequence 4096):
  python -m mamba_jax.train --config experiments/hybrid_8b.py --workdir runs/hybrid_8b
Parameters: 8,654,517,248 (8.65 B); float32 master weights 4.0 GiB per device at tensor=8.
"""

from mamba_jax import config as mjc


def get_config(arg=None):
    c = mjc.base_config()
    c.name = "hybrid_8b"
    c.variant = mjc.parse_variant(arg)
    c.model.update(
        pattern="M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-",
        d_model=4096,
        vocab_size=256000,
        vocab_multiple=128,
        mamba_num_groups=8,
        mamba_chunk_size=128,
        attn_num_heads=32,
        attn_num_kv_heads=8,
        attn_head_dim=128,
        ffn_hidden_size=16384,
        mlp_activation="gelu",
    )
    c.mesh.tensor = 8
    mjc.nemo_recipe(c, seq_len=4096, global_batch_size=8)
    c.lock()
    return c
