"""Mamba2 1.3B (state-spaces/mamba2-1.3b): 48 Mamba2 layers, d_model 2048, GPT-NeoX vocabulary, tied head.

Variants: pretrain (default), finetune (SQuAD-style SFT with LoRA), finetune_full.
Pretrain (NeMo recipe: TP 1, one GPU, bf16 mixed precision, sequence 4096):
  python -m mamba_jax.train --config experiments/mamba2_1_3b.py --workdir runs/mamba2_1_3b
Parameters: 1,343,757,312 (vocab 50277 padded to 50288), equal to mamba_ssm's count.
On one H100 (mock data, sequence 4096, selective remat, Pallas scan; benchmarks/README.md): 31,898 tokens/s
at global batch 4 (26.0 % MFU, 40.6 GiB), 1.43× mamba_ssm's 22,374.
"""

from mamba_jax import config as mjc


def get_config(arg=None):
    c = mjc.base_config()
    c.name = "mamba2_1_3b"
    c.variant = mjc.parse_variant(arg)
    mjc.state_spaces_mamba2(c, d_model=2048, n_layers=48)
    mjc.nemo_recipe(c, seq_len=4096, global_batch_size=8)
    c.lock()
    return c
