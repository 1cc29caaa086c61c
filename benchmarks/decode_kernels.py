"""The fused decode kernels (`mamba_jax.kernels.decode`) on one model's shapes: the normed GEMVs' block-size
sweep against XLA, and the SSM step kernel's bandwidth.

    python benchmarks/decode_kernels.py [--model mamba2_2_7b] [--layers 16] [--batch 1,32] [--out FILE.json]

GEMVs: a chain of `--layers` layers, each [input RMSNorm + in_proj] then [gated-norm + out_proj + residual]
(the real sizes; every layer its own weights, more bytes than L2 holds, so weights stream from HBM as in a
decode step), per block-size configuration of the kernels and as XLA compiles the same chain (rms_norm +
dot); reported per layer and as weight bytes / time. Step: `--layers` independent SSM steps (states donated
and updated in place), reported per layer and as state bytes read + written / time.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
from bench_util import write_result
from generate import MODELS, ROOT

from mamba_jax import config as mjc
from mamba_jax.kernels import decode as kd
from mamba_jax.kernels.norm_gemv import norm_gemv
from mamba_jax.layers.norms import grouped_rms_norm, rms_norm


def wall(fn, args, reps=10):
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def gemv_chain(cfg, layers: int, batch: int):
    d, h, p, g = cfg.d_model, cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_num_groups
    x = 2 * h * p + 2 * g * cfg.mamba_d_state + h
    ks = jax.random.split(jax.random.key(0), 4)
    w_in = jax.random.normal(ks[0], (layers, d, x), jnp.bfloat16) * 0.02
    w_out = jax.random.normal(ks[1], (layers, h * p, d), jnp.bfloat16) * 0.02
    ws = [(jnp.ones((d,)), w_in[i], jnp.ones((h * p,)), w_out[i]) for i in range(layers)]
    h0 = jax.random.normal(ks[2], (batch, d), jnp.float32)
    groups = g if cfg.mamba_norm_per_group else 1
    eps = cfg.norm_eps
    bytes_ = layers * (d * x + h * p * d) * 2

    def fused(conf):
        def run(h_BD, ws):
            for nw_in, wi, nw_out, wo in ws:
                zx = norm_gemv(h_BD, nw_in, wi, eps=eps, **conf["in"])
                h_BD = norm_gemv(zx[:, : h * p].astype(jnp.float32), nw_out, wo, h_BD, eps=eps, groups=groups,
                                    **conf["out"])  # fmt: skip
            return h_BD

        return jax.jit(run)

    def xla(h_BD, ws):
        for nw_in, wi, nw_out, wo in ws:
            zx = jnp.dot(rms_norm(h_BD, nw_in, eps, jnp.bfloat16), wi)
            y = grouped_rms_norm(zx[:, None, : h * p].reshape(batch, 1, h, p), nw_out.reshape(h, p), groups=groups,
                                 eps=eps, out_dtype=jnp.bfloat16)  # fmt: skip
            h_BD = h_BD + jnp.dot(y.reshape(batch, h * p), wo).astype(h_BD.dtype)
        return h_BD

    return fused, jax.jit(xla), (h0, ws), bytes_


def step_bench(cfg, layers: int, batch: int, state_dtype, norm_in: bool = False, **conf):
    """Seconds per layer and state bytes / s of `ssm_step` over a chain of `layers` layers; `norm_in`: with
    the folded input norm's 1/rms computed from a d_model row (as the decode loop runs it)."""
    h, p, g, n = cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_num_groups, cfg.mamba_d_state
    f = h // g * p + 2 * n
    k = cfg.mamba_d_conv
    key = jax.random.split(jax.random.key(1), 8)
    zx = jax.random.normal(key[0], (layers, batch, g, 2 * (h // g) * p + 2 * n + h // g), jnp.bfloat16)
    conv = [jax.random.normal(key[1], (batch, k, g, f), jnp.bfloat16) for _ in range(layers)]  # rings of K inputs
    ssm = [jax.random.normal(key[2 + i % 4], (batch, h, p, n), jnp.float32).astype(state_dtype) for i in range(layers)]
    cw = jax.random.normal(key[6], (k, g, f), jnp.bfloat16)
    cb = jnp.zeros((g, f), jnp.bfloat16)
    a_log, dvec, dtb = jnp.zeros((h,)), jnp.ones((h,)), jnp.zeros((h,))
    u = jax.random.normal(key[7], (batch, cfg.d_model), jnp.float32) if norm_in else None

    def run(zx, conv, ssm):
        outs, rings, states = [], [], []
        for i in range(layers):
            y, _, c, s = kd.ssm_step(zx[i], conv[i], cw, cb, ssm[i], a_log, dvec, dtb, 0, u, heads=h,
                                     dt_limit=(0, math.inf), norm_eps=1e-5, g_dtype=jnp.bfloat16, **conf)  # fmt: skip
            outs.append(y)
            rings.append(c)
            states.append(s)
        return outs, rings, states

    fn = jax.jit(run, donate_argnums=(1, 2))  # ring and state updated in place, as in the decode loop
    _, conv, ssm = fn(zx, conv, ssm)
    jax.block_until_ready(ssm)
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        _, conv, ssm = fn(zx, conv, ssm)
    jax.block_until_ready(ssm)
    sec = (time.perf_counter() - t) / reps
    state_bytes = 2 * layers * batch * h * p * n * jnp.dtype(state_dtype).itemsize
    return sec / layers, state_bytes / sec


def gemv_sweep(cfg, args, result):
    """The normed GEMVs' block sizes against XLA's rms_norm + dot, per layer of a chain."""
    fused, xla, chain_args, bytes_ = gemv_chain(cfg, args.layers, 1)
    t = wall(xla, chain_args)
    row = {"impl": "xla", "us_per_layer": 1e6 * t / args.layers, "tb_per_s": bytes_ / t / 1e12}
    print(row, flush=True)
    result["gemv"].append(row)
    product = itertools.product
    grid_in = [dict(bn=bn, bk=bk, warps=4, stages=s) for bn, bk, s in product((32, 64, 128), (128, 256), (3, 5))]
    grid_out = [dict(bn=bn, bk=bk, warps=4, stages=s) for bn, bk, s in product((16, 32, 64), (128, 256), (3, 5))]
    default = dict(bn=64, bk=128, warps=4, stages=3)
    confs = [{"in": default, "out": default}, {"in": {**default, "stages": 1}, "out": {**default, "stages": 1}}]
    if not args.quick:  # sweep one side with the other at the default
        confs += [{"in": c, "out": default} for c in grid_in] + [{"in": default, "out": c} for c in grid_out]
    for conf in confs:
        try:
            t = wall(fused(conf), chain_args)
        except Exception as e:  # a configuration Triton cannot compile (registers, shared memory)
            print(conf, "failed:", str(e).splitlines()[0][:200], flush=True)
            continue
        row = {"impl": "pallas", **conf, "us_per_layer": 1e6 * t / args.layers, "tb_per_s": bytes_ / t / 1e12}
        print(row, flush=True)
        result["gemv"].append(row)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mamba2_2_7b", choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--quick", action="store_true", help="only the default block sizes")
    ap.add_argument("--skip-gemv", action="store_true", help="only the step kernel")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    recipe, _ = MODELS[args.model]
    cfg = mjc.model_config(mjc.load_config(os.path.join(ROOT, "experiments", recipe)))
    result = {"model": args.model, "layers": args.layers, "gemv": [], "step": []}

    if not args.skip_gemv:
        gemv_sweep(cfg, args, result)

    p = cfg.mamba_head_dim
    for batch in [int(b) for b in args.batch.split(",")]:
        for sd in ("bfloat16", "float32"):
            confs = (
                [{}]
                if args.quick
                else [{}]
                + [dict(block_p=bp, warps=w) for bp in sorted({p, p // 2, p // 4} - {0}) if bp >= 16 for w in (2, 4, 8)]
            )
            for conf in confs:
                us, bw = step_bench(cfg, args.layers, batch, jnp.dtype(sd), **conf)
                row = {"batch": batch, "state_dtype": sd, **(conf or {"block_p": "default", "warps": 4}),
                       "us_per_layer": 1e6 * us, "state_tb_per_s": bw / 1e12}  # fmt: skip
                print(row, flush=True)
                result["step"].append(row)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
