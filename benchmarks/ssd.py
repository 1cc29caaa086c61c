"""Benchmark of the SSD chunked scan: XLA path, fused Pallas kernels, mamba_ssm's Triton kernels.

Command (on the GPU machine, from the repository root; mamba_ssm's source in .peer/mamba_ssm is optional):

    python benchmarks/ssd.py [--shapes 0,1,...] [--reps 30] [--variants] [--out DIR]

For each shape (b, l, h, p, g, n) and chunk size, on the same random bf16 inputs (D, dt_bias and softplus
on, as in a Mamba2 layer whose gate goes to the RMSNorm): checks every implementation's output and
gradients against the XLA path on float32 copies at highest matmul precision, then times the forward
and forward + backward (jax.vjp with a random cotangent; torch.autograd.grad) as the median of `reps`
samples, each the mean of 5 back-to-back calls between synchronisations, after a warm-up. The floor is
PERFORMANCE.md's: forward FLOPs 2·(Q·P + 2·N·P + Q·N·G/H) per token and head at 683 TFLOP/s against
reading x, B, C, dt and writing y once at 2.8 TB/s; forward + backward 3× the FLOPs against also reading
dy and writing dx, dB, dC, ddt. Prints a table and writes benchmarks/results/ssd_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_util import git_revision

import mamba_jax
from mamba_jax.kernels import ssd_scan

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPES = [  # ((b, l, h, p, g, n), chunk)
    ((4, 4096, 80, 64, 1, 128), 128),  # Mamba2-2.7B layer
    ((4, 4096, 80, 64, 1, 128), 256),
    ((2, 8192, 128, 64, 8, 128), 128),  # Hybrid-8B layer
    ((2, 8192, 128, 64, 8, 128), 256),
    ((1, 8192, 256, 64, 8, 256), 128),  # Nemotron-H 56B layer
]
PEAK_FLOPS, PEAK_BYTES = 683e12, 2.8e12
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def floor_ms(shape, chunk):
    b, l, h, p, g, n = shape
    q = chunk
    flops = 2 * (q * p + 2 * n * p + q * n * g / h) * b * l * h
    io_fwd = 2 * b * l * h * p * 2 + 2 * b * l * g * n * 2 + b * l * h * 2  # x, y, B, C, dt (bf16)
    io_bwd = io_fwd + 2 * b * l * h * p * 2 + 2 * b * l * g * n * 2 + b * l * h * 2  # + dy, dx, dB, dC, ddt
    fwd = max(flops / PEAK_FLOPS, io_fwd / PEAK_BYTES) * 1e3
    fwd_bwd = max(3 * flops / PEAK_FLOPS, io_bwd / PEAK_BYTES) * 1e3
    return fwd, fwd_bwd, flops


def make_inputs(shape, seed=0):
    b, l, h, p, g, n = shape
    ks = jax.random.split(jax.random.key(seed), 8)
    bf16 = jnp.bfloat16
    dt0 = jnp.exp(jax.random.uniform(ks[6], (h,), minval=math.log(1e-3), maxval=math.log(0.1)))
    return dict(
        x=jax.random.normal(ks[0], (b, l, h, p), bf16),
        dt=(0.5 * jax.random.normal(ks[1], (b, l, h))).astype(bf16),
        A=-jnp.exp(jax.random.uniform(ks[2], (h,), minval=0.0, maxval=math.log(16.0))),
        B=jax.random.normal(ks[3], (b, l, g, n), bf16),
        C=jax.random.normal(ks[4], (b, l, g, n), bf16),
        D=1.0 + 0.1 * jax.random.normal(ks[5], (h,)),
        dt_bias=dt0 + jnp.log(-jnp.expm1(-dt0)),  # inverse softplus
        dy=jax.random.normal(ks[7], (b, l, h, p), bf16),
    )


def jax_fns(impl, chunk):
    def fwd(x, dt, A, B, C, D, dt_bias):
        return mamba_jax.ssd(x, dt, A, B, C, chunk_size=chunk, D=D, dt_bias=dt_bias, dt_softplus=True, impl=impl)

    def fwd_bwd(args, dy):
        _, vjp = jax.vjp(fwd, *args)
        return vjp(dy)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def time_jax(fn, *args, reps, inner=5):
    jax.block_until_ready(fn(*args))  # compile
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(samples), samples


def rel_err(a, b):
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if not np.isfinite(a).all():
        return float("nan")
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def load_mamba_ssm():
    sys.path.insert(0, str(ROOT / ".peer"))
    try:
        import torch
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        return torch, mamba_chunk_scan_combined
    except Exception as e:  # optional peer
        print(f"mamba_ssm not importable ({type(e).__name__}: {e}); skipping it", flush=True)
        return None, None


def mamba_ssm_runner(torch, scan, inp, chunk):
    def to_t(a, dtype):
        return torch.from_numpy(np.asarray(a, np.float32)).to("cuda", dtype).contiguous()

    t = {k: to_t(inp[k], torch.bfloat16) for k in ("x", "dt", "B", "C", "dy")}
    t |= {k: to_t(inp[k], torch.float32) for k in ("A", "D", "dt_bias")}
    leaves = [t[k] for k in GRAD_NAMES]

    def fwd():
        return scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True)

    def fwd_bwd():
        for v in leaves:
            v.requires_grad_(True)
        y = fwd()
        grads = torch.autograd.grad(y, leaves, t["dy"])
        for v in leaves:
            v.requires_grad_(False)
        return grads

    def timed(fn, reps, inner=5):
        for _ in range(4):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / inner)
        return statistics.median(samples), samples

    return fwd, fwd_bwd, timed


def kernel_breakdown(inp, reps):
    """Median ms of each piece of the Pallas path: the XLA preparation, the forward kernel (without and
    with the states saved for the backward), the two backward kernels and the XLA vector gradients."""
    from mamba_jax.kernels import ssd_bwd, ssd_common, ssd_fwd
    from mamba_jax.ops.ssd_reference import process_dt

    x, B, C, dy = inp["x"], inp["B"], inp["C"], inp["dy"]
    b, l, h, p = x.shape
    g, n = B.shape[-2:]

    def prep(dt, A, D, dt_bias):
        return ssd_common.block_vectors(process_dt(dt, dt_bias, True), A, None, D)

    prep = jax.jit(prep)
    vec = prep(inp["dt"], inp["A"], inp["D"], inp["dt_bias"])
    kw = dict(b=b, l=l, h=h, p=p, g=g, n=n, dtype=jnp.dtype(x.dtype), has_z=False, has_seq=False, interpret=None)
    fwd = jax.jit(ssd_fwd.build_fwd(**kw, has_init=False, save_states=False))
    fwd_save = jax.jit(ssd_fwd.build_fwd(**kw, has_init=False, save_states=True))
    heads = jax.jit(ssd_bwd.build_bwd_heads(**kw))
    groups = jax.jit(ssd_bwd.build_bwd_groups(**kw))
    grads = jax.jit(ssd_common.vector_grads)
    _, fin, states = fwd_save(x, B, C, vec)
    dfin = jnp.zeros_like(fin)
    _, dvp, dS, _ = heads(x, dy, B, C, vec, states, dfin)
    out = dict(
        prep=time_jax(prep, inp["dt"], inp["A"], inp["D"], inp["dt_bias"], reps=reps)[0],
        fwd_kernel=time_jax(fwd, x, B, C, vec, reps=reps)[0],
        fwd_kernel_save_states=time_jax(fwd_save, x, B, C, vec, reps=reps)[0],
        bwd_heads_kernel=time_jax(heads, x, dy, B, C, vec, states, dfin, reps=reps)[0],
        bwd_groups_kernel=time_jax(groups, x, dy, B, C, vec, states, dS, reps=reps)[0],
        vector_grads=time_jax(grads, dvp, reps=reps)[0],
    )
    return out


def print_table(rows):
    print()
    print(
        f"{'shape (b,l,h,p,g,n)':28s} {'Q':>4s} {'impl':10s} {'fwd ms':>8s} {'/floor':>7s} {'×mamba':>7s} "
        f"{'fwd+bwd':>8s} {'/floor':>7s} {'×mamba':>7s}"
    )
    for r in rows:
        print(
            f"{r['shape']!s:28s} {r['chunk']:4d} {r['impl']:10s} {r['fwd']:8.3f} {r['fwd_vs_floor']:7.2f} "
            f"{r['fwd_speedup_vs_mamba_ssm']:7.2f} {r['fwd_bwd']:8.3f} {r['fwd_bwd_vs_floor']:7.2f} "
            f"{r['fwd_bwd_speedup_vs_mamba_ssm']:7.2f}"
        )
    print("(×mamba: mamba_ssm time / this time; /floor: this time / floor)")


def write_json(args, device_name, torch, results, rows):
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in device_name.lower()).strip("_")
    path = out_dir / f"ssd_{slug}.json"
    import jaxlib

    versions = dict(jax=jax.__version__, jaxlib=jaxlib.__version__)
    if torch is not None:
        import triton

        versions |= dict(torch=torch.__version__, triton=triton.__version__)
    doc = dict(
        device=device_name,
        versions=versions,
        python=platform.python_version(),
        git_revision=git_revision(),
        command="python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        timing="median of reps samples, each the mean of 5 back-to-back calls between synchronisations",
        floor=dict(
            peak_flops=PEAK_FLOPS,
            peak_bytes_per_s=PEAK_BYTES,
            formula=" ".join(__doc__.split("The floor is")[1].split(". Prints")[0].split()),
        ),
        results=results,
        table=rows,
    )
    path.write_text(json.dumps(doc, indent=1, default=str))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(str(i) for i in range(len(SHAPES))))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--variants", action="store_true", help="also time the forward with 1 and 2 heads per program")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="also time each kernel of the Pallas path")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--smoke", action="store_true", help="one tiny shape (runs on CPU in interpret mode)")
    args = ap.parse_args()
    if args.smoke:
        SHAPES[:] = [((1, 128, 2, 64, 1, 64), 64)]
        args.shapes, args.reps = "0", 2

    dev = jax.devices()[0]
    device_name = getattr(dev, "device_kind", dev.platform)
    torch, scan = load_mamba_ssm()
    rows, results = [], []
    for idx in map(int, args.shapes.split(",")):
        shape, chunk = SHAPES[idx]
        print(f"=== shape {shape} chunk {chunk}", flush=True)
        inp = make_inputs(shape)
        jargs = tuple(inp[k] for k in GRAD_NAMES)
        f_fwd, f_fb = floor_ms(shape, chunk)[:2]
        entry = dict(shape=dict(zip("blhpgn", shape, strict=True)), chunk=chunk, floor_ms=dict(fwd=f_fwd, fwd_bwd=f_fb))
        impls = {}
        impls["xla"] = jax_fns("xla", chunk)
        impls["pallas"] = jax_fns("pallas", chunk)
        # Correctness first: against the XLA path on float32 copies at highest precision.
        errs = {}
        if not args.skip_check:
            up = [a.astype(jnp.float32) for a in jargs]
            with jax.default_matmul_precision("highest"):
                ref_fwd, ref_fb = jax_fns("xla", chunk)
                y_ref = np.asarray(ref_fwd(*up))
                g_ref = [np.asarray(g) for g in ref_fb(up, inp["dy"].astype(jnp.float32))]
            for name, (fwd, fb) in impls.items():
                try:
                    y = fwd(*jargs)
                    g = fb(jargs, inp["dy"])
                    errs[name] = dict(y=rel_err(y, y_ref)) | {
                        f"d{k}": rel_err(gi, gr) for k, gi, gr in zip(GRAD_NAMES, g, g_ref, strict=True)
                    }
                except Exception as e:
                    errs[name] = dict(error=f"{type(e).__name__}: {str(e)[:2000]}")
            if scan is not None:
                try:
                    mfwd, mfb, _ = mamba_ssm_runner(torch, scan, inp, chunk)
                    y = mfwd().float().cpu().numpy()
                    g = [gi.float().cpu().numpy() for gi in mfb()]
                    errs["mamba_ssm"] = dict(y=rel_err(y, y_ref)) | {
                        f"d{k}": rel_err(gi, gr) for k, gi, gr in zip(GRAD_NAMES, g, g_ref, strict=True)
                    }
                except Exception as e:
                    errs["mamba_ssm"] = dict(error=f"{type(e).__name__}: {str(e)[:2000]}")
            del y_ref, g_ref, up
            for name, e in errs.items():
                print(
                    f"  check {name:10s} "
                    + " ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in e.items()),
                    flush=True,
                )
        entry["rel_err_vs_f32"] = errs
        times = {}
        variants = [("xla", None), ("pallas", None)]
        if args.variants:
            variants += [("pallas", 1), ("pallas", 2)]
        for name, heads in variants:
            label = name if heads is None else f"{name}_h{heads}"
            ssd_scan.FWD_HEADS = heads
            fwd, fb = jax_fns(name, chunk) if heads is not None else impls[name]
            try:
                t_f, _ = time_jax(fwd, *jargs, reps=args.reps)
                t_fb, _ = time_jax(fb, jargs, inp["dy"], reps=args.reps) if heads is None else (float("nan"), None)
                times[label] = dict(fwd=t_f, fwd_bwd=t_fb)
            except Exception as e:
                times[label] = dict(error=f"{type(e).__name__}: {str(e)[:2000]}")
            print(f"  time {label:10s} {times[label]}", flush=True)
        ssd_scan.FWD_HEADS = None
        if scan is not None:
            try:
                mfwd, mfb, timed = mamba_ssm_runner(torch, scan, inp, chunk)
                times["mamba_ssm"] = dict(fwd=timed(mfwd, args.reps)[0], fwd_bwd=timed(mfb, args.reps)[0])
            except Exception as e:
                times["mamba_ssm"] = dict(error=f"{type(e).__name__}: {str(e)[:2000]}")
            print(f"  time mamba_ssm  {times['mamba_ssm']}", flush=True)
        entry["median_ms"] = times
        if args.breakdown:
            try:
                entry["pallas_breakdown_ms"] = kernel_breakdown(inp, args.reps)
            except Exception as e:
                entry["pallas_breakdown_ms"] = dict(error=f"{type(e).__name__}: {str(e)[:2000]}")
            print(f"  pallas breakdown {entry['pallas_breakdown_ms']}", flush=True)
        peer = times.get("mamba_ssm", {})
        for label, t in times.items():
            if "fwd" not in t:
                continue
            r = dict(impl=label, shape=shape, chunk=chunk)
            for k in ("fwd", "fwd_bwd"):
                r[k] = t[k]
                r[f"{k}_vs_floor"] = t[k] / entry["floor_ms"][k]
                r[f"{k}_speedup_vs_mamba_ssm"] = peer[k] / t[k] if k in peer and t[k] == t[k] else float("nan")
            rows.append(r)
        results.append(entry)
        write_json(args, device_name, torch, results, rows)
        del inp, jargs

    print_table(rows)
    print(f"wrote {write_json(args, device_name, torch, results, rows)}")


if __name__ == "__main__":
    main()
