"""How fast can a decode step read and rewrite the SSM states at batch 32? (the ceiling for `ssm_step`)

    python benchmarks/state_probe.py [--model mamba2_2_7b] [--batch 32] [--layers 16] [--quick] [--skip-update]
        [--out FILE.json]

At batch 32 the 2.7B's bf16 states are 42 MB per layer, read and written in place every token: as many
bytes as the layer's weights. `ssm_step` moves them at ≈ 1.9 TB/s (benchmarks/README.md). This probe times,
over a chain of `--layers` distinct state buffers (far beyond L2), in-place read-modify-writes of the same
arrays: torch `mul_` (one CUDA kernel per layer), XLA `s * c` on donated buffers, and Pallas Triton kernels
that do only the state update (s·e^{dtA} + dt·x⊗B, y = s·C) with the block shapes the step kernel can take
(rows of a head per program, heads per program, warps, L2 eviction hints), and `ssm_step` itself. What the
best of them reaches is what the step kernel could; the gap to `ssm_step` is what its other work costs.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.triton as plt
import jax.numpy as jnp
from bench_util import bandwidth_bytes_per_s, write_result
from decode_kernels import step_bench
from generate import MODELS, ROOT

import mamba_jax.config as mjc


def chain_time(fn, states, *extra, reps: int = 20) -> float:
    """Seconds per call of fn(states, *extra) → states (donated, so updated in place), after a warm-up."""
    states = fn(states, *extra)
    jax.block_until_ready(states)
    t = time.perf_counter()
    for _ in range(reps):
        states = fn(states, *extra)
    jax.block_until_ready(states)
    return (time.perf_counter() - t) / reps


def _update_kernel(s_ref, x_ref, b_ref, c_ref, dt_ref, s_out, y_ref, *, hp, bp, evict):
    """`hp` heads × `bp` rows of the state per program: the step kernel's state update and y, nothing else."""
    b, h0, j = pl.program_id(0), pl.program_id(1) * hp, pl.program_id(2)
    rows = pl.ds(j * bp, bp)
    f32 = jnp.float32
    bv = b_ref[b, :].astype(f32)
    cv = c_ref[b, :].astype(f32)
    kw = {"eviction_policy": "evict_first"} if evict else {}
    tiles = [plt.load(s_ref.at[b, h0 + i, rows], **kw) for i in range(hp)]  # all loads issued first
    for i in range(hp):
        dt = jnp.sum(dt_ref[pl.ds(b, 1), pl.ds(h0 + i, 1)].astype(f32))
        x = x_ref[b, h0 + i, rows].astype(f32)
        s = tiles[i].astype(f32) * jnp.exp(-dt) + (dt * x)[:, None] * bv[None, :]
        plt.store(s_out.at[b, h0 + i, rows], s.astype(s_out.dtype), **kw)
        y_ref[b, h0 + i, rows] = jnp.sum(s * cv[None, :], axis=1).astype(y_ref.dtype)


def update_fn(shape, *, hp, bp, warps, evict):
    bsz, h, p, _ = shape
    kernel = lambda *r: _update_kernel(*r, hp=hp, bp=bp, evict=evict)  # noqa: E731
    call = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(shape, jnp.bfloat16), jax.ShapeDtypeStruct((bsz, h, p), jnp.bfloat16)),
        grid=(bsz, h // hp, p // bp),
        input_output_aliases={0: 0},
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1),
        interpret=jax.default_backend() != "gpu",
    )

    def run(states, x, bm, cm, dt):
        return [call(st, x, bm, cm, dt)[0] for st in states]

    return jax.jit(run, donate_argnums=0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mamba2_2_7b", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="a few kernel shapes (CPU check)")
    ap.add_argument("--skip-update", action="store_true", help="only the baselines and ssm_step")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    cfg = mjc.model_config(mjc.load_config(os.path.join(ROOT, "experiments", MODELS[args.model][0])))
    h, p, n = cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_d_state
    shape = (args.batch, h, p, n)
    nbytes = 2 * args.layers * math.prod(shape) * 2  # read + write, bf16
    copy_bw, read_bw = bandwidth_bytes_per_s()
    result = {"model": args.model, "batch": args.batch, "layers": args.layers, "state_shape": list(shape),
              "copy_bandwidth_bytes_per_s": copy_bw, "read_bandwidth_bytes_per_s": read_bw, "rows": []}  # fmt: skip
    print(f"state {shape} bf16 × {args.layers} layers; XLA copy {copy_bw / 1e12:.2f} TB/s, read {read_bw / 1e12:.2f}")

    def record(row, sec):
        row |= {"us_per_layer": 1e6 * sec / args.layers, "tb_per_s": nbytes / sec / 1e12}
        print(row, flush=True)
        result["rows"].append(row)

    key = jax.random.split(jax.random.key(0), 6)
    fresh = lambda: [jax.random.normal(key[i % 4], shape, jnp.bfloat16) for i in range(args.layers)]  # noqa: E731
    x = jax.random.normal(key[4], shape[:3], jnp.bfloat16)
    bm, cm = jax.random.normal(key[5], (2, args.batch, n), jnp.bfloat16)
    dt = jnp.full((args.batch, h), 0.1, jnp.float32)

    try:  # torch's elementwise kernel: the plainest in-place read-modify-write
        import torch

        ts = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(args.layers)]
        for _ in range(3):
            [t.mul_(0.999) for t in ts]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            [t.mul_(0.999) for t in ts]
        torch.cuda.synchronize()
        record({"impl": "torch mul_"}, (time.perf_counter() - t0) / args.reps)
        del ts
    except Exception as e:  # no torch / no CUDA (CPU check)
        print("torch skipped:", str(e).splitlines()[0][:120])

    xla = jax.jit(lambda ss: [s * jnp.bfloat16(0.9) for s in ss], donate_argnums=0)  # (bf16 0.999 is 1: a no-op)
    record({"impl": "xla s*c"}, chain_time(xla, fresh(), reps=args.reps))

    grid = [(1, 64, 4, False), (1, 32, 4, False), (1, 64, 8, False), (1, 16, 2, False)]
    if not args.quick:
        grid = [
            (hp, bp, w, ev)
            for hp, bp, w, ev in itertools.product((1, 2, 4), (16, 32, 64), (2, 4, 8), (False, True))
            if hp * bp <= 128 and not (bp == 16 and w == 8)
        ]
    for hp, bp, warps, evict in [] if args.skip_update else grid:
        conf = {"impl": "pallas update", "heads_per_program": hp, "block_p": bp, "warps": warps, "evict_first": evict}
        try:
            sec = chain_time(update_fn(shape, hp=hp, bp=bp, warps=warps, evict=evict), fresh(), x, bm, cm, dt,
                             reps=args.reps)  # fmt: skip
        except Exception as e:  # a shape Triton cannot compile (registers)
            print(conf, "failed:", str(e).splitlines()[0][:200], flush=True)
            continue
        record(conf, sec)

    # The step kernel as the decode loop runs it (the input norm's 1/rms from a d_model row), by launch shape.
    confs = [{"norm_in": False}, {}, {"heads_per_program": 2}, {"split": True}, {"split": True, "heads_per_program": 2}]
    if not args.quick:
        confs += [
            {"split": True, "heads_per_program": hp, "block_p": bp, "warps": w}
            for hp, bp, w in itertools.product((1, 2, 4), (32, 64), (4, 8))
            if (hp, bp, w) not in ((1, 64, 4), (2, 64, 4))
        ]
    for conf in confs:
        try:
            sec, _ = step_bench(cfg, args.layers, args.batch, jnp.bfloat16, **{"norm_in": True, **conf})
        except Exception as e:
            print(conf, "failed:", str(e).splitlines()[0][:200], flush=True)
            continue
        record({"impl": "ssm_step", **conf}, sec * args.layers)
    if args.out:
        write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
