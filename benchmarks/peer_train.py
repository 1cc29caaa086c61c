"""The peer: training throughput of mamba_ssm's MambaLMHeadModel (Mamba2 layers) in PyTorch, as a user
would run it: fp32 master weights, bf16 autocast, fused AdamW, mock tokens. Its conv runs in torch
(`use_mem_eff_path=False`: causal_conv1d's CUDA extension is not built), the SSD in mamba_ssm's Triton
kernels. Needs torch + triton + einops and `.peer/mamba_ssm` on the path (git-ignored, never committed).

  python benchmarks/peer_train.py --size 130m --batch 8 --steps 20 [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SIZES = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1_3b": (2048, 48), "2_7b": (2560, 64)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", required=True, choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="")
    args = p.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".peer"))
    import torch
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    d, n = SIZES[args.size]
    cfg = MambaConfig(
        d_model=d, n_layer=n, vocab_size=50277, ssm_cfg={"layer": "Mamba2", "use_mem_eff_path": False},
        rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=16, tie_embeddings=True,
    )  # fmt: skip
    model = MambaLMHeadModel(cfg, device="cuda", dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, fused=True)
    ids = torch.randint(0, 50277, (args.batch, args.seq_len + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    s = statistics.median(times)
    r = {
        "peer": "mamba_ssm MambaLMHeadModel (Mamba2, torch conv, Triton SSD)",
        "size": args.size,
        "params": n_params,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "step_time_median_s": s,
        "tokens_per_s": args.batch * args.seq_len / s,
        "mfu_6N_989T": 6 * n_params * args.batch * args.seq_len / s / 989e12,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "final_loss": float(loss),
        "torch": torch.__version__,
    }
    print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
