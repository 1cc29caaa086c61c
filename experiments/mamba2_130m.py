"""Mamba2 130M (state-spaces/mamba2-130m): 24 Mamba2 layers, d_model 768, GPT-NeoX vocabulary, tied head.

Pretrain (NeMo recipe: TP 1, bf16 mixed precision, sequence 4096):
  python -m mamba_jax.train --config experiments/mamba2_130m.py --workdir runs/mamba2_130m
Parameters: 128,989,632 (vocab 50277 padded to 50288), equal to mamba_ssm's count.
"""

from mamba_jax import config as mjc


def get_config(arg=None):
    c = mjc.base_config()
    c.name = "mamba2_130m"
    c.variant = mjc.parse_variant(arg)
    c.model.update(
        pattern="M" * 24,
        d_model=768,
        vocab_size=50277,
        vocab_multiple=16,
        tie_embeddings=True,
        residual_in_fp32=True,
        mamba_chunk_size=256,
    )
    mjc.nemo_pretrain(c, seq_len=4096, global_batch_size=8)
    c.lock()
    return c
