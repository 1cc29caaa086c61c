"""Mamba2 2.7B (state-spaces/mamba2-2.7b): 64 Mamba2 layers, d_model 2560, GPT-NeoX vocabulary, tied head.

Variants: pretrain (default), finetune (SQuAD-style SFT with LoRA), finetune_full.
Pretrain (NeMo recipe: TP 1, data parallel over 8 GPUs, bf16 mixed precision, sequence 4096):
  python -m mamba_jax.train --config experiments/mamba2_2_7b.py --workdir runs/mamba2_2_7b
Parameters: 2,702,599,680 (vocab 50277 padded to 50288), equal to mamba_ssm's count.
On one H100 (mock data, sequence 4096, selective remat, Pallas scan; benchmarks/README.md): 13,132 tokens/s
at global batch 1 (21.5 % MFU, 48.6 GiB), 1.27× mamba_ssm's 10,337.
"""

from mamba_jax import config as mjc


def get_config(arg=None):
    c = mjc.base_config()
    c.name = "mamba2_2_7b"
    c.variant = mjc.parse_variant(arg)
    mjc.state_spaces_mamba2(c, d_model=2560, n_layers=64)
    mjc.nemo_recipe(c, seq_len=4096, global_batch_size=8)
    c.lock()
    return c
