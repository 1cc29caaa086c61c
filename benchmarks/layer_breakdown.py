"""Where a Mamba2 training step spends its time: one layer's forward + backward, split into its parts, on the
GPU, for a recipe's shape (a profile by subtraction that needs no trace viewer).

  python benchmarks/layer_breakdown.py --recipe experiments/mamba2_2_7b.py --batch 1 [--impl xla,pallas]
      [--out benchmarks/results/breakdown_mamba2_2_7b.json]

Parts: the two projections (in_proj, out_proj: the matmul floor), the SSD scan alone, and the whole mixer
(projections + conv + scan + gated norm), each forward + backward, median of 20 after warm-up; plus the
floor of the matmuls at the measured bf16 rate.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
from bench_util import timed, write_result
from flax import nnx

import mamba_jax
from mamba_jax import config as mjc
from mamba_jax.layers.mamba2 import Mamba2Mixer


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--impl", default="xla,pallas")
    p.add_argument("--out", default="")
    args = p.parse_args()
    base = mjc.model_config(mjc.load_config(args.recipe))
    b, l, d = args.batch, args.seq_len, base.d_model
    h, pdim, g, n = base.mamba_heads, base.mamba_head_dim, base.mamba_num_groups, base.mamba_d_state
    key = jax.random.key(0)
    x = jax.random.normal(key, (b, l, d), jnp.bfloat16)
    rows = {}

    # Projections alone: the matmuls of the layer at its real shapes.
    w_in = jax.random.normal(key, (d, base.mamba_conv_dim + base.mamba_d_inner + h), jnp.bfloat16) * 0.02
    w_out = jax.random.normal(key, (base.mamba_d_inner, d), jnp.bfloat16) * 0.02

    def proj(x, w_in, w_out):
        u = x @ w_in
        return (u[..., : base.mamba_d_inner] @ w_out).astype(jnp.float32).sum()

    rows["projections fwd+bwd"] = timed(jax.jit(jax.grad(proj, argnums=(0, 1, 2))), x, w_in, w_out)
    flops = 6 * b * l * (d * w_in.shape[1] + base.mamba_d_inner * d)
    a = jax.random.normal(key, (8192, 8192), jnp.bfloat16)
    rate = 2 * 8192**3 / timed(jax.jit(lambda a: a @ a), a)
    rows["projections floor (measured bf16 rate)"] = flops / rate

    for impl in args.impl.split(","):
        ks = jax.random.split(key, 6)
        xs = jax.random.normal(ks[0], (b, l, h, pdim), jnp.bfloat16)
        dt = jax.random.normal(ks[1], (b, l, h), jnp.bfloat16)
        A = -jnp.exp(jax.random.normal(ks[2], (h,)))
        Bm = jax.random.normal(ks[3], (b, l, g, n), jnp.bfloat16)
        Cm = jax.random.normal(ks[4], (b, l, g, n), jnp.bfloat16)

        def scan(xs, dt, Bm, Cm, impl=impl, A=A):
            y = mamba_jax.ssd(xs, dt, A, Bm, Cm, chunk_size=base.mamba_chunk_size, D=jnp.ones((h,)),
                              dt_bias=jnp.zeros((h,)), dt_softplus=True, impl=impl)  # fmt: skip
            return y.astype(jnp.float32).sum()

        rows[f"ssd {impl} fwd+bwd"] = timed(jax.jit(jax.grad(scan, argnums=(0, 1, 2, 3))), xs, dt, Bm, Cm)
        mixer = Mamba2Mixer(base.replace(ssd_impl=impl, dtype="bfloat16"), 0, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(mixer)
        loss = lambda st, x, gd=graphdef: nnx.merge(gd, st)(x).astype(jnp.float32).sum()  # noqa: E731
        rows[f"mixer ({impl} scan) fwd+bwd"] = timed(jax.jit(jax.grad(loss, argnums=(0, 1))), state, x)

    print(f"\n{args.recipe}: one Mamba2 layer, batch {b} × {l} tokens, {jax.devices()[0].device_kind}")
    for k, v in rows.items():
        print(f"  {k:42s} {1000 * v:8.3f} ms")
    write_result(
        args.out,
        {"batch": b, "seq_len": l, "bf16_matmul_tflops": rate / 1e12, "ms": {k: 1000 * v for k, v in rows.items()}},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
