"""Probe: does one persistent Pallas-Triton kernel stream a Mamba2 layer's two GEMVs faster than XLA does?

A batch-1 decode step of Mamba2-2.7B is two weight streams per layer (in_proj 2,560 → 10,576 columns,
out_proj 5,120 → 2,560) and ≈ 8 µs of short kernels between them; XLA's GEMVs alone take 21.4 + 11.2 µs
(2.5 TB/s) where a read stream reaches ≈ 2.9 TB/s. A persistent "megakernel" (one program per SM, grid
barriers between the steps, no kernel boundaries) is the known way past that (all programs must be resident
at once: a few per SM, few registers each, or the barrier never completes). Before building one, this
measures its upper bound: a chain of L layers of

    y1 = W_in · bf16(x)          (N1 × K1, weights stored (N, K), bf16, float32 accumulation)
    x  = W_out · bf16(y1[:K2])   (N2 × K2, N2 = K1)

  xla:        one jnp.dot per GEMV, unrolled over per-layer (K, N) weights (as the decode loop holds them;
              XLA picks other GEMV kernels here than in the model: 40–44 µs per layer against 32.6 there),
  persistent: the whole chain as one Pallas-Triton kernel; each program takes every P-th block of R rows,
              loads its K / BK tiles at once, and all programs meet at a grid barrier (an atomic counter,
              spun on) between the GEMVs,
  stream:     the persistent kernel without the barriers (wrong results; the streaming rate alone),

and the latency of one grid barrier. Prints one JSON line per variant and writes them with --out.

    python benchmarks/persistent_probe.py [--layers 64] [--out results/persistent_probe_h100.json]
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.triton as plt
import jax.numpy as jnp
import numpy as np
from bench_util import provenance, timed, write_result

F32, BF16 = jnp.float32, jnp.bfloat16


def _barrier(cnt_ref, target):
    """Wait until `target` arrivals in total have reached the counter (monotonic over the kernel)."""
    on_gpu = jax.default_backend() == "gpu"  # (the interpreter runs a program's threads as one)
    if on_gpu:
        plt.debug_barrier()  # every thread's stores come before this program's arrival (released below)
    # A float32 counter (exact to 2^24 arrivals): jax 0.11.2's Triton lowering emits a float add for an int32
    # atomic_add, which on an int32 counter adds denormals and never arrives.
    one = (pl.ds(0, 1),)
    plt.atomic_add(cnt_ref, one, jnp.ones((1,), F32))
    read = lambda _: jnp.sum(plt.atomic_add(cnt_ref, one, jnp.zeros((1,), F32)))  # noqa: E731  (acquire)
    jax.lax.while_loop(lambda v: v < target, read, jnp.float32(0))
    if on_gpu:
        plt.debug_barrier()


def _gemv_phase(x_ref, w_ref, y_ref, layer, pid, *, programs, r, bk, k):
    """y[n] = Σ_k W[layer, n, k] · bf16(x[k]) for this program's blocks of `r` rows (every `programs`-th).

    x is read once (it was written by other programs: volatile, not from this SM's L1); each block's K / bk
    weight tiles are loaded together (straight-line code: all in flight at once) before they are used."""
    n = w_ref.shape[1]
    nk = k // bk
    assert k % bk == 0 and n % r == 0, (k, bk, n, r)
    xs = [plt.load(x_ref.at[pl.ds(c * bk, bk)], volatile=True).astype(BF16).astype(F32) for c in range(nk)]
    mine = jax.lax.div(n // r - pid + programs - 1, programs)

    def body(j, carry):
        u = pid + j * programs
        ws = [plt.load(w_ref.at[layer, pl.ds(u * r, r), pl.ds(c * bk, bk)]) for c in range(nk)]
        acc = sum(jnp.sum(w.astype(F32) * xk[None, :], axis=1) for w, xk in zip(ws, xs, strict=True))
        plt.store(y_ref.at[pl.ds(u * r, r)], acc)
        return carry

    jax.lax.fori_loop(0, mine, body, 0)


def _chain_kernel(w_in_ref, w_out_ref, x_ref, cnt_in_ref, y1_ref, x_out_ref, cnt_ref, *, layers, programs, r, bk,
                  barriers):  # fmt: skip
    del x_ref, cnt_in_ref  # aliased with x_out_ref / cnt_ref
    pid = pl.program_id(0)
    k1, k2 = w_in_ref.shape[2], w_out_ref.shape[2]

    def layer(l, _):
        _gemv_phase(x_out_ref, w_in_ref, y1_ref, l, pid, programs=programs, r=r, bk=bk, k=k1)
        if barriers:
            _barrier(cnt_ref, (2 * l + 1) * programs)
        # out_proj's rows are twice as long: half as many per block, the same bytes in flight
        _gemv_phase(y1_ref, w_out_ref, x_out_ref, l, pid, programs=programs, r=max(r * k1 // k2, 1), bk=bk, k=k2)
        if barriers:
            _barrier(cnt_ref, (2 * l + 2) * programs)
        return 0

    jax.lax.fori_loop(0, layers, layer, 0)


@functools.partial(jax.jit, static_argnames=("programs", "r", "bk", "warps", "stages", "barriers"))
def persistent_chain(w_in_LNK, w_out_LNK, x_K, *, programs, r, bk, warps, stages, barriers=True):
    """x after the chain (float32). Off the GPU (interpret mode: programs run one after another) only
    programs=1 finishes; it checks the arithmetic."""
    layers, n1, _ = w_in_LNK.shape
    kernel = functools.partial(_chain_kernel, layers=layers, programs=programs, r=r, bk=bk, barriers=barriers)
    _, x_out, _ = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((n1,), F32),
            jax.ShapeDtypeStruct(x_K.shape, F32),
            jax.ShapeDtypeStruct((1,), F32),
        ),
        grid=(programs,),
        input_output_aliases={2: 1, 3: 2},
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=jax.default_backend() != "gpu",
        name="persistent_chain",
    )(w_in_LNK, w_out_LNK, x_K, jnp.zeros((1,), F32))
    return x_out


def _barrier_kernel(cnt_in_ref, cnt_ref, *, n, programs):
    del cnt_in_ref
    jax.lax.fori_loop(0, n, lambda i, c: (_barrier(cnt_ref, (i + 1) * programs), c)[1], 0)


@functools.partial(jax.jit, static_argnames=("n", "programs"))
def barriers_only(*, n, programs):
    return pl.pallas_call(
        functools.partial(_barrier_kernel, n=n, programs=programs),
        out_shape=jax.ShapeDtypeStruct((1,), F32),
        grid=(programs,),
        input_output_aliases={0: 0},
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=jax.default_backend() != "gpu",
        name="barriers_only",
    )(jnp.zeros((1,), F32))


@jax.jit
def xla_chain(w_in_KN, w_out_KN, x_K):
    """The chain as XLA GEMVs, unrolled over per-layer weight arrays (lists) as the decode loop holds them."""
    for w1, w2 in zip(w_in_KN, w_out_KN, strict=True):  # bf16 in, bf16 out: the decode loop's GEMVs
        y1 = jnp.dot(x_K.astype(BF16)[None], w1)[0]
        x_K = jnp.dot(y1[: w2.shape[0]][None], w2)[0].astype(F32)
    return x_K


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--d-model", type=int, default=2560)
    p.add_argument("--n-in", type=int, default=10576)
    p.add_argument("--d-inner", type=int, default=5120)
    p.add_argument("--configs", default="2:8:512:4:1,4:4:512:4:1,2:16:512:8:1,4:8:512:4:1,2:8:256:4:2",
                   help="programs per SM : rows R : BK : warps : stages, comma separated")  # fmt: skip
    p.add_argument("--parts", default="barrier,xla,persistent")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out")
    args = p.parse_args()
    dev = jax.devices()[0]
    sms = getattr(dev, "core_count", None) or 132
    L, d, n1, k2 = args.layers, args.d_model, args.n_in, args.d_inner
    parts = args.parts.split(",")
    weight_bytes = 2 * L * (n1 * d + d * k2)  # bf16
    rows, head = [], {"sms": sms, "layers": L, "weight_mb_per_layer": weight_bytes / L / 1e6}
    print(json.dumps(head), flush=True)

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # what ran so far survives a time limit
            write_result(args.out, {**provenance(), **head, "rows": rows})

    def report(name, seconds, **extra):
        record({"variant": name, "us_per_layer": seconds / L * 1e6, "tb_per_s": weight_bytes / seconds / 1e12,
                **extra})  # fmt: skip

    for per_sm in (1, 2) if "barrier" in parts else ():  # needs no weights
        n = 2000
        t = timed(functools.partial(barriers_only, n=n, programs=per_sm * sms), reps=args.reps)
        record({"variant": "barrier", "programs": per_sm * sms, "us_per_barrier": t / n * 1e6})
    if "xla" not in parts and "persistent" not in parts:
        return
    key = jax.random.split(jax.random.key(0), 3)
    w_in = (jax.random.normal(key[0], (L, n1, d), F32) / np.sqrt(d)).astype(BF16)
    w_out = (jax.random.normal(key[1], (L, d, k2), F32) / np.sqrt(k2)).astype(BF16)
    x = jax.random.normal(key[2], (d,), F32)
    # Correctness on 4 layers against XLA (same bf16 roundings; summation order differs).
    w_in_t, w_out_t = [w.T for w in w_in], [w.T for w in w_out]  # per layer (K, N), as the model holds them
    ref4 = xla_chain(w_in_t[:4], w_out_t[:4], x)
    if "xla" in parts:
        report("xla", timed(xla_chain, w_in_t, w_out_t, x, reps=args.reps))
    del w_in_t, w_out_t
    for cfg in args.configs.split(",") if "persistent" in parts else ():
        per_sm, r, bk, warps, stages = map(int, cfg.split(":"))
        conf = dict(programs=per_sm * sms, r=r, bk=bk, warps=warps, stages=stages)
        try:
            got4 = persistent_chain(w_in[:4], w_out[:4], x, **conf)
            err = float(jnp.max(jnp.abs(got4 - ref4)) / jnp.max(jnp.abs(ref4)))
            report("persistent", timed(functools.partial(persistent_chain, **conf), w_in, w_out, x, reps=args.reps),
                   config=cfg, rel_err_4_layers=err)  # fmt: skip
            report("stream", timed(functools.partial(persistent_chain, barriers=False, **conf), w_in, w_out, x,
                                   reps=args.reps), config=cfg)  # fmt: skip
        except Exception as e:  # a config that does not compile is a result too
            print(json.dumps({"config": cfg, "error": repr(e)[:400]}), flush=True)


if __name__ == "__main__":
    main()
