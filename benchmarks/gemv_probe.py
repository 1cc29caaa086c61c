"""What a GEMV of the 2.7B decode shapes can reach on this GPU, outside the model: cuBLAS through torch,
hand-written Pallas Triton GEMVs (split-K, both weight layouts, tensor-core and FMA) and the Mosaic GPU GEMV
of `mamba_jax.kernels.gemv`, each against XLA's own dot on the same chain.

    python benchmarks/gemv_probe.py --torch > torch.txt     # cuBLAS (run alone: jax preallocates memory)
    python benchmarks/gemv_probe.py > pallas.txt            # the Pallas Triton variants
    python benchmarks/gemv_probe.py --mosaic > mosaic.txt   # kernels/gemv.py, batch 1 and 32
    python benchmarks/gemv_probe.py --fp8 --out r.json      # kernels/gemv_q.py (float8 weights), batch 1 and 32
    python benchmarks/gemv_probe.py --skinny --out r.json   # kernels/skinny_gemm.py (CUDA, FFI), batch 1–32

Every variant runs a chain of 16 GEMVs with distinct weights (more bytes than L2 holds), REPS times inside
one compiled loop (`looped`), and prints one JSON line per configuration: µs per GEMV and weight bytes /
time. (Timed once per host call instead, as the first version of this script did, a chain measured the
launches: ≈ 30 µs per GEMV whatever the kernel.) The torch probe still times per call.

Dimension key: K reduction, N out features, BM the 16 rows of a tensor-core tile (the batch is masked in).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics

L = 16  # GEMVs per timed chain
REPS = 10  # passes over the chain per timed call
SHAPES = [(2560, 10576), (2560, 10240), (5120, 2560)]  # 2.7B in_proj, the same rounded to 256, out_proj
FP8_SHAPES, FP8_BATCHES = [(2560, 10576), (5120, 2560)], [1, 32]  # --fp8: 2.7B in_proj and out_proj


def looped(gemv):
    """REPS passes over the chain inside one compiled loop: the kernels queue back to back on the GPU
    (timing a chain per host call measured the launches, ≈ 30 µs per GEMV whatever the kernel)."""
    import jax  # not at the top: the torch probe runs without jax's memory preallocation
    import jax.numpy as jnp

    def run(x, ws):
        def body(_, carry):
            x, _ = carry
            outs = [gemv(x, w) for w in ws]
            # x takes a value from the last output: nothing in the loop is invariant (XLA would hoist it)
            return x.at[0, 0].set(outs[-1].reshape(-1)[0].astype(x.dtype)), outs

        init = [jnp.zeros(s.shape, s.dtype) for s in (jax.eval_shape(gemv, x, w) for w in ws)]
        return jax.lax.fori_loop(0, REPS, body, (x, init))

    return jax.jit(run)


def torch_probe() -> None:
    import torch
    import torch.nn.functional as F

    def bench(fn, reps=50):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    x = torch.ones(1 << 28, device="cuda")
    print(json.dumps({"copy_tb_per_s": 2 * x.numel() * 4 / bench(lambda: x.add_(1.0), 20) / 1e12}))
    print(json.dumps({"read_tb_per_s": x.numel() * 4 / bench(lambda: x.sum(), 20) / 1e12}))
    del x
    for k, n in SHAPES[::2]:
        w_kn = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(L)]
        w_nk = [w.t().contiguous() for w in w_kn]
        nbytes = L * k * n * 2
        for m in (1, 32):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_kn = bench(lambda: [x @ w for w in w_kn])  # noqa: B023
            t_nk = bench(lambda: [F.linear(x, w) for w in w_nk])  # noqa: B023
            print(json.dumps({"impl": "cublas", "k": k, "n": n, "m": m, "KN_us": t_kn / L * 1e6,
                              "KN_tb_per_s": nbytes / t_kn / 1e12, "NK_us": t_nk / L * 1e6,
                              "NK_tb_per_s": nbytes / t_nk / 1e12}))  # fmt: skip


def pallas_probe() -> None:
    import jax
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.triton as plt
    import jax.numpy as jnp
    from bench_util import timed  # imports jax: kept out of the torch run

    bm, f32 = 16, jnp.float32

    def splitk(x, w, *, bn, bk, splits, warps, stages, transposed):
        """Split-K tensor-core GEMV: program (column block, K split) → partial sums, added by XLA."""
        rows, k = x.shape
        n = w.shape[0] if transposed else w.shape[1]
        kper = k // splits

        def kernel(x_ref, w_ref, o_ref):
            n0, s = pl.program_id(0) * bn, pl.program_id(1)
            cmask, rmask = n0 + jnp.arange(bn) < n, jnp.arange(bm) < rows

            def step(i, acc):
                k0 = pl.multiple_of(s * kper + i * bk, bk)
                xt = plt.load(x_ref.at[pl.ds(0, bm), pl.ds(k0, bk)], mask=rmask[:, None], other=0.0)
                if transposed:  # w (N, K): K contiguous per output row
                    wt = plt.load(w_ref.at[pl.ds(n0, bn), pl.ds(k0, bk)], mask=cmask[:, None], other=0.0).T
                else:  # w (K, N): N contiguous
                    wt = plt.load(w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)], mask=cmask[None, :], other=0.0)
                return acc + jnp.dot(xt, wt, preferred_element_type=f32)

            acc = jax.lax.fori_loop(0, kper // bk, step, jnp.zeros((bm, bn), f32))
            plt.store(o_ref.at[pl.ds(s, 1), pl.ds(0, bm), pl.ds(n0, bn)], acc[None], mask=cmask[None, None, :])

        out = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((splits, bm, n), f32),
            grid=(pl.cdiv(n, bn), splits),
            compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
        )(x, w)
        return out.sum(0)[:rows]

    def fma(x, w, *, bn, bk, warps):
        """CUDA-core GEMV on w (N, K): program = bn output rows, elementwise products summed at the end."""
        n, k = w.shape

        def kernel(x_ref, w_ref, o_ref):
            n0 = pl.program_id(0) * bn
            rmask = n0 + jnp.arange(bn) < n

            def step(i, acc):
                k0 = pl.multiple_of(i * bk, bk)
                wv = plt.load(w_ref.at[pl.ds(n0, bn), pl.ds(k0, bk)], mask=rmask[:, None], other=0.0)
                return acc + wv.astype(f32) * x_ref[0, pl.ds(k0, bk)].astype(f32)[None, :]

            acc = jax.lax.fori_loop(0, k // bk, step, jnp.zeros((bn, bk), f32))
            plt.store(o_ref.at[pl.ds(0, 1), pl.ds(n0, bn)], jnp.sum(acc, axis=1)[None], mask=rmask[None, :])

        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((1, n), f32),
            grid=(pl.cdiv(n, bn),),
            compiler_params=plt.CompilerParams(num_warps=warps, num_stages=3),
        )(x, w)

    key = jax.random.key(0)
    for k, n in SHAPES:
        w_kn = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16) * 0.02 for i in range(L)]
        w_nk = [w.T.copy() for w in w_kn]
        nbytes = L * k * n * 2
        x = jax.random.normal(key, (1, k), jnp.bfloat16)
        want = x.astype(f32) @ w_kn[0].astype(f32)
        t = timed(looped(lambda x, w: x @ w), x, w_kn) / REPS
        print(json.dumps({"impl": "xla", "k": k, "n": n, "us": t / L * 1e6, "tb_per_s": nbytes / t / 1e12}))
        confs = [("splitk", splitk, w_kn, dict(bn=bn, bk=128, splits=sp, warps=4, stages=st, transposed=False))
                 for bn, sp, st in [(64, 1, 4), (128, 1, 4), (128, 2, 4), (128, 4, 4), (256, 2, 3), (256, 4, 3),
                                    (256, 5, 3), (256, 10, 3), (128, 10, 4), (64, 4, 4)]]  # fmt: skip
        confs += [
            ("splitk_NK", splitk, w_nk, dict(bn=bn, bk=bk, splits=sp, warps=4, stages=3, transposed=True))
            for bn, bk, sp in [(32, 256, 1), (64, 128, 1), (64, 256, 2), (128, 128, 2), (16, 512, 1)]
        ]
        confs += [("fma_NK", fma, w_nk, dict(bn=bn, bk=bk, warps=4)) for bn, bk in [(8, 512), (16, 256)]]
        for name, fn, ws, conf in confs:
            if k // conf.get("splits", 1) % conf["bk"]:
                continue
            try:
                err = float(jnp.max(jnp.abs(fn(x, ws[0], **conf) - want)))
                t = timed(looped(lambda x, w, fn=fn, conf=conf: fn(x, w, **conf)), x, ws) / REPS
            except Exception as e:  # a configuration Triton cannot compile
                print(json.dumps({"impl": name, **conf, "failed": repr(e)[:200]}), flush=True)
                continue
            print(json.dumps({"impl": name, "k": k, "n": n, **conf, "us": t / L * 1e6,
                              "tb_per_s": nbytes / t / 1e12, "max_abs_err": err}), flush=True)  # fmt: skip


def mosaic_probe() -> None:
    """`mamba_jax.kernels.gemv.gemv_t` (Mosaic GPU, TMA ring + transposed wgmma, split-K partials) against
    XLA's dot on the same chain, batch 1 (padded to 8 rows) and 32; in_proj's columns padded to 64."""
    import jax
    import jax.numpy as jnp
    from bench_util import timed

    from mamba_jax.kernels.gemv import gemv_t, gemv_unsupported

    f32, key = jnp.float32, jax.random.key(0)

    best = {}  # K → the six fastest configurations at batch 1, the only ones tried at batch 32
    shapes = [(2560, 10624, (1, 2, 4, 5)), (5120, 2560, (2, 4, 5, 8, 10))]
    for k, n, split_opts in shapes:
        ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16) * 0.02 for i in range(L)]
        nbytes = L * k * n * 2
        for rows in (1, 32):
            bp = -(-rows // 8) * 8
            x = jax.random.normal(key, (bp, k), jnp.bfloat16)
            xla = looped(lambda x, w, rows=rows: x[:rows] @ w)
            t = timed(xla, x, ws) / REPS
            print(json.dumps({"impl": "xla", "k": k, "n": n, "rows": rows, "us": t / L * 1e6,
                              "tb_per_s": nbytes / t / 1e12}), flush=True)  # fmt: skip
            want = (x.astype(f32) @ ws[0].astype(f32)).T
            results = []
            for bn, bk, splits, stages in itertools.product((64, 128), (64, 128, 256), split_opts, (4, 8)):
                if gemv_unsupported(bp, k, n, bn=bn, bk=bk, splits=splits) or stages * bk * bn * 2 > 160 * 1024:
                    continue
                if rows > 1 and (bn, bk, splits, stages) not in best[k]:
                    continue
                conf = dict(bn=bn, bk=bk, splits=splits, stages=stages)
                try:
                    err = float(jnp.max(jnp.abs(gemv_t(x, ws[0], **conf).sum(0) - want)))
                    t = timed(looped(lambda x, w, conf=conf: gemv_t(x, w, **conf)), x, ws) / REPS
                except Exception as e:  # a configuration Mosaic cannot compile
                    print(json.dumps({"impl": "mosaic", **conf, "failed": repr(e)[:300]}), flush=True)
                    continue
                results.append((t, (bn, bk, splits, stages)))
                print(json.dumps({"impl": "mosaic", "k": k, "n": n, "rows": rows, **conf, "us": t / L * 1e6,
                                  "tb_per_s": nbytes / t / 1e12, "max_abs_err": err}), flush=True)  # fmt: skip
            if rows == 1:
                best[k] = [c for _, c in sorted(results)[:6]]


def fp8_probe(out: str) -> None:
    """The float8 GEMV (`kernels/gemv_q.py`) over its tiles against XLA's product on the same float8 weights
    (`layers.base.linear`'s: the weight cast to bf16, the output scaled) and XLA's bf16 GEMV, at batch 1
    and 32; µs per GEMV and the bytes actually stored (float8: half of bf16's) per second."""
    import jax
    import jax.numpy as jnp
    from bench_util import provenance, timed, write_result

    from mamba_jax.inference.quantize import quantize_array
    from mamba_jax.kernels.gemv_q import decode_config, gemv_q

    key, rows_out = jax.random.key(0), []
    os.environ["MAMBA_JAX_DECODE_GEMV_Q"] = "on"  # `decode_config`'s default tiles (the kernel is off by default)

    def emit(row):
        print(json.dumps(row), flush=True)
        rows_out.append(row)

    for (k, n), b in itertools.product(FP8_SHAPES, FP8_BATCHES):
        w_kn = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32) * 0.02 for i in range(L)]
        qs = [quantize_array(w, 1) for w in w_kn]
        w_bf = [w.astype(jnp.bfloat16) for w in w_kn]
        del w_kn
        x = jax.random.normal(key, (b, k), jnp.bfloat16)
        want = (x.astype(jnp.float32) @ qs[0][0].astype(jnp.float32)) * qs[0][1]

        def xla_q(x, wq_s):
            y = jnp.dot(x, wq_s[0].astype(jnp.bfloat16))
            return (y.astype(jnp.float32) * wq_s[1]).astype(jnp.bfloat16)

        t = timed(looped(lambda x, w: x @ w), x, w_bf) / REPS
        emit({"impl": "xla_bf16", "b": b, "k": k, "n": n, "us": t / L * 1e6, "tb_per_s": L * k * n * 2 / t / 1e12})
        t = timed(looped(xla_q), x, qs) / REPS
        emit({"impl": "xla_fp8", "b": b, "k": k, "n": n, "us": t / L * 1e6, "tb_per_s": L * k * n / t / 1e12})
        default = decode_config(b, k, n, jnp.float8_e4m3fn)
        # rows of 128–256 float8 bytes per tile (64 bytes read poorly), more programs through K splits
        confs = [dict(bn=bn, bk=bk, splits=sp, warps=wp, stages=st, mode=mode)
                 for bn, bk, sp, wp, st in [(64, 128, 2, 4, 4), (64, 128, 4, 4, 4), (32, 128, 4, 4, 4),
                                            (128, 64, 2, 4, 4), (128, 64, 4, 4, 4), (128, 32, 8, 4, 4),
                                            (256, 32, 4, 4, 4), (256, 32, 8, 8, 4), (256, 64, 4, 8, 3),
                                            (128, 128, 4, 8, 3), (256, 16, 8, 4, 6)]
                 for mode in (["fma", "dot"] if b == 1 else ["dot"])]  # fmt: skip
        for conf in [default] + confs:
            try:
                fn = lambda x, wq_s, conf=conf: gemv_q(x, wq_s[0], wq_s[1], **conf)  # noqa: E731
                err = float(jnp.max(jnp.abs(fn(x, qs[0]).astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
                t = timed(looped(fn), x, qs) / REPS
            except Exception as e:  # a configuration Triton cannot compile
                emit({"impl": "gemv_q", "b": b, "k": k, "n": n, **conf, "failed": repr(e)[:300]})
                continue
            emit({"impl": "gemv_q", "default": conf is default, "b": b, "k": k, "n": n, **conf, "us": t / L * 1e6,
                  "tb_per_s": L * k * n / t / 1e12, "rel_err": err})  # fmt: skip
    write_result(out, {**provenance(), "rows": rows_out})


def skinny_probe(out: str) -> None:
    """The CUDA skinny GEMM (`kernels/skinny_gemm.py`) against XLA's dot (its Triton GEMMs, and cuBLAS as the
    Engine compiles the loop from batch 16) and, for out_proj, the split-K partials the decode path runs
    (`kernels.decode.split_k_partials`): the 2.7B in_proj and out_proj at 1, 16 and 32 rows."""
    import jax
    import jax.numpy as jnp
    from bench_util import provenance, timed, write_result

    from mamba_jax.kernels.decode import split_k_partials
    from mamba_jax.kernels.skinny_gemm import pack, skinny_gemm, unsupported

    key, rows_out = jax.random.key(0), []
    reason = unsupported(32, 2560, 10576)
    if reason:
        raise SystemExit(f"skinny_gemm does not run here: {reason}")

    def emit(row):
        print(json.dumps(row), flush=True)
        rows_out.append(row)

    def compiled(fn, x, ws, options=None):
        lowered = looped(fn).lower(x, ws)
        return lowered.compile(options) if options else lowered.compile()

    for k, n in [(2560, 10576), (5120, 2560)]:
        ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16) * 0.02 for i in range(L)]
        nbytes = L * k * n * 2
        for rows in (1, 16, 32):
            x = jax.random.normal(jax.random.fold_in(key, rows), (rows, k), jnp.bfloat16)
            want = x.astype(jnp.float32) @ ws[0].astype(jnp.float32)
            variants = [("xla", lambda x, w: x @ w, None),
                        ("xla_cublas", lambda x, w: x @ w, {"xla_gpu_enable_triton_gemm": False})]  # fmt: skip
            if k == 5120:
                variants.append(("xla_splitk2_cublas", lambda x, w: split_k_partials(x, w, 2),
                                 {"xla_gpu_enable_triton_gemm": False}))  # fmt: skip
            for s in (1, 2, 4) if k == 5120 else (1,):
                fn = lambda x, w, s=s: skinny_gemm(x, w, splits=s, pdl=False)  # noqa: E731
                variants.append((f"skinny_s{s}", fn, None))
                # packed by CTA: each ring slot one contiguous copy
                variants.append((f"skinny_packed_s{s}", fn, s))
                fn = lambda x, w, s=s: skinny_gemm(x, w, splits=s, pdl=True)  # noqa: E731
                variants.append((f"skinny_packed_s{s}_pdl", fn, s))
            for name, fn, options in variants:
                w_in = [pack(w, splits=options) for w in ws] if isinstance(options, int) else ws
                options = None if isinstance(options, int) else options
                try:
                    got = fn(x, w_in[0])
                    got = got.sum(0) if got.ndim == 3 else got
                    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
                    t = timed(compiled(fn, x, w_in, options), x, w_in) / REPS
                except Exception as e:  # keep the others going
                    emit({"impl": name, "k": k, "n": n, "rows": rows, "failed": repr(e)[:400]})
                    continue
                emit({"impl": name, "k": k, "n": n, "rows": rows, "us": t / L * 1e6, "tb_per_s": nbytes / t / 1e12,
                      "rel_err": err})  # fmt: skip
    write_result(out, {**provenance(), "rows": rows_out})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp8", action="store_true", help="the float8 GEMV (kernels/gemv_q.py) against XLA")
    ap.add_argument("--out", default="", help="with --fp8 / --skinny: the JSON result")
    ap.add_argument("--torch", action="store_true", help="cuBLAS through torch instead of the Pallas GEMVs")
    ap.add_argument("--mosaic", action="store_true", help="the Mosaic GPU GEMV (kernels/gemv.py) against XLA")
    ap.add_argument("--skinny", action="store_true", help="the CUDA skinny GEMM (kernels/skinny_gemm.py) against XLA")
    args = ap.parse_args()
    if args.skinny:
        return skinny_probe(args.out)
    if args.fp8:
        return fp8_probe(args.out)
    torch_probe() if args.torch else mosaic_probe() if args.mosaic else pallas_probe()


if __name__ == "__main__":
    main()
