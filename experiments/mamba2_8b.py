"""Mamba2 8B (NVIDIA mamba2-8b-3t-4k, Megatron): 56 Mamba2 layers, d_model 4096, 8 groups, 256k SentencePiece
vocabulary, untied head.

Variants: pretrain (default), finetune (SQuAD-style SFT with LoRA), finetune_full.
Pretrain (NeMo recipe: TP 8 on one node of 8 GPUs, bf16 mixed precision, sequence 4096):
  python -m mamba_jax.train --config experiments/mamba2_8b.py --workdir runs/mamba2_8b
Parameters: 8,236,999,680 (8.24 B); float32 master weights 3.8 GiB per device at tensor=8.
"""

from mamba_jax import config as mjc


def get_config(arg=None):
    c = mjc.base_config()
    c.name = "mamba2_8b"
    c.variant = mjc.parse_variant(arg)
    c.model.update(
        pattern="M" * 56,
        d_model=4096,
        vocab_size=256000,
        vocab_multiple=128,
        mamba_num_groups=8,
        mamba_chunk_size=128,
    )
    c.mesh.tensor = 8
    mjc.nemo_recipe(c, seq_len=4096, global_batch_size=8)
    c.lock()
    return c
