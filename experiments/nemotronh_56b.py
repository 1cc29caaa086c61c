"""Nemotron-H 56B: 118 layers (54 Mamba2 with state 256, 10 attention, 54 MLP), d_model 8192, GQA 64/8 heads of
128 (NoPE), relu² MLP 32768, vocabulary 131072.

Variants: pretrain (default), finetune (SQuAD-style SFT with LoRA), finetune_full.
Pretrain (NeMo recipe: TP 8, sequence parallel, 32 nodes × 8 GPUs, global batch 768, sequence 8192; NeMo
trains it in fp8 with the first and last 2 layers in bf16: add --config.train.fp8=true
--config.train.fp8_bf16_layers=2 for that, not yet timed on GPUs, so bf16 mixed precision by default):
  python -m mamba_jax.train --config experiments/nemotronh_56b.py --workdir runs/nemotronh_56b
Parameters: 56,324,350,464 (56.32 B); float32 master weights 26.2 GiB per device at tensor=8.
"""

from mamba_jax import config as mjc


def get_config(arg=None):
    c = mjc.base_config()
    c.name = "nemotronh_56b"
    c.variant = mjc.parse_variant(arg)
    c.model.update(
        pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        d_model=8192,
        vocab_size=131072,
        vocab_multiple=128,
        mamba_d_state=256,
        mamba_num_groups=8,
        mamba_chunk_size=128,
        attn_num_heads=64,
        attn_num_kv_heads=8,
        attn_head_dim=128,
        ffn_hidden_size=32768,
        mlp_activation="relu2",
    )
    c.mesh.tensor = 8
    c.mesh.tensor_sequence_parallel = True  # NeMo's "SP"
    mjc.nemo_recipe(c, seq_len=8192, global_batch_size=768)
    c.lock()
    return c
