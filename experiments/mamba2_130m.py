"""Mamba2 130M (state-spaces/mamba2-130m): 24 Mamba2 layers, d_model 768, GPT-NeoX vocabulary, tied head.

Variants: pretrain (default), finetune (SQuAD-style SFT with LoRA), finetune_full.
Pretrain (NeMo recipe: TP 1, bf16 mixed precision, sequence 4096):
  python -m mamba_jax.train --config experiments/mamba2_130m.py --workdir runs/mamba2_130m
Parameters: 128,989,632 (vocab 50277 padded to 50288), equal to mamba_ssm's count.
On one H100 (mock data, sequence 4096, selective remat, Pallas scan; benchmarks/README.md): 185,584 tokens/s
at global batch 16 (14.5 % MFU, 22.4 GiB), 1.53× mamba_ssm's 121,490.
"""

from mamba_jax import config as mjc


def get_config(arg=None):
    c = mjc.base_config()
    c.name = "mamba2_130m"
    c.variant = mjc.parse_variant(arg)
    mjc.state_spaces_mamba2(c, d_model=768, n_layers=24)
    mjc.nemo_recipe(c, seq_len=4096, global_batch_size=8)
    c.lock()
    return c
