"""Nemotron-H 8B: 52 layers (24 Mamba2, 4 attention, 24 MLP), d_model 4096, GQA 32/8 heads of 128 (NoPE), relu²
MLP 21504, vocabulary 131072.

Variants: pretrain (default), finetune (SQuAD-style SFT with LoRA), finetune_full.
Pretrain (NeMo recipe: TP 2, sequence parallel, 8 nodes × 8 GPUs, global batch 768, bf16 mixed precision,
sequence 8192):
  python -m mamba_jax.train --config experiments/nemotronh_8b.py --workdir runs/nemotronh_8b
Parameters: 8,100,852,736 (8.10 B); float32 master weights 15.1 GiB per device at tensor=2.
"""

from mamba_jax import config as mjc


def get_config(arg=None):
    c = mjc.base_config()
    c.name = "nemotronh_8b"
    c.variant = mjc.parse_variant(arg)
    c.model.update(
        pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        d_model=4096,
        vocab_size=131072,
        vocab_multiple=128,
        mamba_num_groups=8,
        mamba_chunk_size=128,
        attn_num_heads=32,
        attn_num_kv_heads=8,
        attn_head_dim=128,
        ffn_hidden_size=21504,
        mlp_activation="relu2",
    )
    c.mesh.tensor = 2
    c.mesh.tensor_sequence_parallel = True  # NeMo's "SP"
    mjc.nemo_recipe(c, seq_len=8192, global_batch_size=768)
    c.lock()
    return c
