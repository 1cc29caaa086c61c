"""Mamba2 370M (state-spaces/mamba2-370m): 48 Mamba2 layers, d_model 1024, GPT-NeoX vocabulary, tied head.

Variants: pretrain (default), finetune (SQuAD-style SFT with LoRA), finetune_full.
Pretrain (NeMo recipe: TP 1, data parallel over 8 GPUs, bf16 mixed precision, sequence 4096):
  python -m mamba_jax.train --config experiments/mamba2_370m.py --workdir runs/mamba2_370m
Parameters: 368,346,624 (vocab 50277 padded to 50288), within 1 % of the published size.
"""

from mamba_jax import config as mjc


def get_config(arg=None):
    c = mjc.base_config()
    c.name = "mamba2_370m"
    c.variant = mjc.parse_variant(arg)
    mjc.state_spaces_mamba2(c, d_model=1024, n_layers=48)
    mjc.nemo_recipe(c, seq_len=4096, global_batch_size=8)
    c.lock()
    return c
