"""What a batch-1 GEMV of the 2.7B decode shapes can reach on this GPU, outside the model: cuBLAS through
torch, and hand-written Pallas Triton GEMVs (split-K, both weight layouts, tensor-core and FMA), against the
device's copy / read bandwidth. It backs benchmarks/README.md's statement that XLA's own GEMV (≈ 2.5 TB/s
in the decode trace) is the best of these.

    python benchmarks/gemv_probe.py --torch > torch.txt     # cuBLAS (run alone: jax preallocates memory)
    python benchmarks/gemv_probe.py > pallas.txt            # the Pallas variants

Every variant runs a chain of 16 GEMVs with distinct weights (more bytes than L2 holds) and prints one JSON
line per configuration: µs per GEMV and weight bytes / time. Exploratory: timed from the host around the
chain (median of 20), so a few µs of launch per chain are included.

Dimension key: K reduction, N out features, BM the 16 rows of a tensor-core tile (the batch is masked in).
"""

from __future__ import annotations

import argparse
import json
import statistics

L = 16  # GEMVs per timed chain
SHAPES = [(2560, 10576), (2560, 10240), (5120, 2560)]  # 2.7B in_proj, the same rounded to 256, out_proj


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
                f = jax.jit(lambda x, ws, fn=fn, conf=conf: [fn(x, w, **conf) for w in ws])
                err = float(jnp.max(jnp.abs(f(x, ws[:1])[0] - want)))
                t = timed(f, x, ws)
            except Exception as e:  # a configuration Triton cannot compile
                print(json.dumps({"impl": name, **conf, "failed": repr(e)[:200]}), flush=True)
                continue
            print(json.dumps({"impl": name, "k": k, "n": n, **conf, "us": t / L * 1e6,
                              "tb_per_s": nbytes / t / 1e12, "max_abs_err": err}), flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--torch", action="store_true", help="cuBLAS through torch instead of the Pallas GEMVs")
    torch_probe() if ap.parse_args().torch else pallas_probe()


if __name__ == "__main__":
    main()
