"""Weight-only float8 GEMV for decode (Pallas, Triton backend): y = (x · W_q) · scale for a few rows.

`Engine(quantize="fp8")` stores each projection as W_q (float8 e4m3fn, one byte) with a float32 scale per
output channel (`mamba_jax.inference.quantize`). At small batch a decode step is a read of the weights, so
float8 should halve it, but XLA's GEMV does not read the float8 weight at its bytes' rate: Mamba2-2.7B at
batch 1 on an H100 decoded at 319 tokens/s with float8 weights against 379 with bf16 (benchmarks/README.md,
"float8 weights"). This kernel streams the float8 tiles itself and widens them to bf16 in registers (every
e4m3 value is a bf16 value: exact), so the bytes read are the float8 bytes.

Each program owns `bn` output columns and one of `splits` equal slices of K, and walks its slice in (bk, bn)
tiles (W is (K, N), N contiguous: a tile row is bn bytes) with Triton's software pipeline (`stages` tiles in
flight). Two ways to multiply:
  "dot"  the rows (padded to 16 or 32, tensor cores' M) times the widened tile with `jnp.dot`: B ≤ 32;
  "fma"  one row: the tile times x's slice as products accumulated in a (bk, bn) float32 block and summed
         over K at the end (no padding, no shared-memory round trip for the dot's operand layout).
The scale multiplies each program's float32 sum. With splits > 1 the result is float32 partials (S, B, N)
that the consumer sums as it reads them (`ssm_step`, `gated_norm_residual` in kernels/decode.py: layout
"SBD", as `split_k_partials` writes them), or that `gemv_q` sums itself when asked for (B, N).

Rounding: one rounding of (x · W_q) · scale to the output dtype, where `layers.base.linear` rounds x · W_q
to the compute dtype first and the scaled product again — both within a bf16 ulp of the exact product.
Off the GPU it runs in Pallas interpret mode (tests, CI).

Dimension key: B rows (≤ ROWS), K reduction (in features), N out features, S K-splits.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.triton as plt
import jax.numpy as jnp

ROWS = 32  # the largest batch served; "dot" mode pads the rows to 16 or 32 (tensor cores' M is 16)
FLOAT8 = (jnp.dtype(jnp.float8_e4m3fn),)
# (bn, bk, splits, warps, stages, mode) by (rows, K, N) at decode; MAMBA_JAX_DECODE_GEMV_Q overrides it at
# trace time (benchmarks/decode_variants.py). Chosen for Mamba2 widths: enough programs to cover an H100's
# 132 SMs a few times over (in_proj 2560 → 10576: 166 column blocks of 64; out_proj 5120 → 2560: 40 blocks
# of 64 × 4 splits), tiles of 8–16 KB.
DEFAULT_TILES = {"bn": 64, "bk": 128, "warps": 4, "stages": 4}


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def gemv_q_unsupported(b: int, k: int, n: int, dtype, *, bn: int, bk: int, splits: int, mode: str) -> str | None:
    """Why this GEMV cannot run on these shapes, or None."""
    if jnp.dtype(dtype) not in FLOAT8:
        return f"weight dtype {jnp.dtype(dtype)} is not float8_e4m3fn"
    if b > ROWS:
        return f"{b} rows: at most {ROWS} (larger batches keep XLA's GEMM)"
    if mode == "fma" and b != 1:
        return "mode 'fma' multiplies one row"
    if mode not in ("dot", "fma"):
        return f"mode {mode!r}: 'dot' or 'fma'"
    if k % (bk * splits):
        return f"in features {k} are not a multiple of {bk} × {splits} splits"
    if bn & (bn - 1) or bk & (bk - 1):
        return f"tiles ({bk}, {bn}) must be powers of two (Triton blocks)"
    return None


def _kernel(x_ref, w_ref, s_ref, o_ref, *, b, n, bn, bk, kper, mode, partials):
    i, si = pl.program_id(0), pl.program_id(1)
    n0 = i * bn
    f32 = jnp.float32
    cols = n0 + jnp.arange(bn) < n
    wmask = None if n % bn == 0 else cols[None, :]
    steps = kper // bk

    def w_tile(k0, dtype):
        ref = w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)]
        w = plt.load(ref) if wmask is None else plt.load(ref, mask=wmask, other=0.0)
        return w.astype(dtype)  # float8 → bf16 / float32 in registers: exact

    if mode == "fma":

        def body(t, acc):
            k0 = pl.multiple_of(si * kper + t * bk, bk)
            xk = x_ref[0, pl.ds(k0, bk)].astype(f32)
            return acc + w_tile(k0, f32) * xk[:, None]

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bk, bn), f32))
        y = jnp.sum(acc, axis=0)[None, :]  # (1, bn)
        rows = 1
    else:
        rows = 16 if b <= 16 else 32
        rmask = (jnp.arange(rows) < b)[:, None]

        def body(t, acc):
            k0 = pl.multiple_of(si * kper + t * bk, bk)
            xt = plt.load(x_ref.at[pl.ds(0, rows), pl.ds(k0, bk)], mask=rmask, other=0.0)
            # float32 rows (a float32 model) multiply in full precision, not TF32
            prec = jax.lax.Precision.HIGHEST if xt.dtype == f32 else None
            return acc + jnp.dot(xt, w_tile(k0, xt.dtype), precision=prec, preferred_element_type=f32)

        y = jax.lax.fori_loop(0, steps, body, jnp.zeros((rows, bn), f32))
    y = y * plt.load(s_ref.at[pl.ds(n0, bn)], mask=cols, other=0.0)[None, :]
    omask = cols[None, :] & (jnp.arange(rows) < b)[:, None]
    if partials:
        plt.store(o_ref.at[pl.ds(si, 1), pl.ds(0, rows), pl.ds(n0, bn)], y[None].astype(o_ref.dtype),
                  mask=omask[None])  # fmt: skip
    else:
        plt.store(o_ref.at[pl.ds(0, rows), pl.ds(n0, bn)], y.astype(o_ref.dtype), mask=omask)


@functools.cache
def _build(b, k, n, x_dtype, out_dtype, bn, bk, splits, warps, stages, mode, partials, interpret):
    kernel = functools.partial(_kernel, b=b, n=n, bn=bn, bk=bk, kper=k // splits, mode=mode, partials=partials)
    shape = (splits, b, n) if partials else (b, n)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(shape, jnp.float32 if partials else out_dtype),
        grid=(pl.cdiv(n, bn), splits),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name=f"gemv_q_{mode}",
    )


def gemv_q(x_BK, w_KN, scale_N, *, out_dtype=None, partials: bool = False, bn: int = 64, bk: int = 128,
           splits: int = 1, warps: int = 4, stages: int = 4, mode: str = "dot"):  # fmt: skip
    """(x · W_q) · scale: x (B, K) in the compute dtype, W_q (K, N) float8_e4m3fn, scale (N,) float32.
    Returns (B, N) in `out_dtype` (default x's), or with `partials` float32 split-K partials (S, B, N)."""
    b, k = x_BK.shape
    n = w_KN.shape[1]
    if why := gemv_q_unsupported(b, k, n, w_KN.dtype, bn=bn, bk=bk, splits=splits, mode=mode):
        raise ValueError(f"gemv_q: {why}.")
    if scale_N.shape != (n,):
        raise ValueError(f"gemv_q: scale of shape {scale_N.shape}, want ({n},): one per output column.")
    out_dtype = jnp.dtype(out_dtype or x_BK.dtype)
    want_partials = partials or splits > 1
    call = _build(b, k, n, x_BK.dtype, out_dtype, bn, bk, splits, warps, stages, mode, want_partials, _interpret())
    out = call(x_BK, w_KN, scale_N.astype(jnp.float32))
    if want_partials and not partials:
        return out.sum(0).astype(out_dtype)
    return out


# Off by default: on an H100 (2.7B, batch 1, 2026-12-05) the decode loop ran 316 tok/s with it against 343 with
# XLA's float8 product and 390 with bf16 weights (benchmarks/README.md, "The float8 GEMV"): its best tiles read
# ≈ 1.2 TB/s of float8 bytes, under half what XLA's bf16 GEMV streams. MAMBA_JAX_DECODE_GEMV_Q turns it on.
ENABLED = False


def _parse_tiles(text: str, env: str) -> dict:
    try:
        parts = text.split(",")
        bn, bk, splits, warps, stages = (int(v) for v in parts[:5])
        return {"bn": bn, "bk": bk, "splits": splits, "warps": warps, "stages": stages, "mode": parts[5]}
    except (ValueError, IndexError):
        raise ValueError(
            f"MAMBA_JAX_DECODE_GEMV_Q={env!r}: give on, xla, bn,bk,splits,warps,stages,mode (e.g. 64,128,1,4,4,dot)"
            " or per shape KxN=bn,…|KxN=… (e.g. 2560x10576=64,128,2,4,4,fma)"
        ) from None


def decode_config(b: int, k: int, n: int, dtype) -> dict | None:
    """`gemv_q`'s keyword arguments for a decode projection of these shapes (Mamba2Mixer._decode_fused,
    layers.base.linear), or None where XLA's product runs instead: off (ENABLED), not float8, more than ROWS
    rows, shapes it cannot tile. MAMBA_JAX_DECODE_GEMV_Q, read at trace time: "on" (the default tiles), "xla"
    (off), "bn,bk,splits,warps,stages,mode" (these tiles for every shape; mode dot or fma), or per shape
    "KxN=bn,…|KxN=…" (listed shapes only), for A/B runs (benchmarks/decode_variants.py)."""
    env = os.environ.get("MAMBA_JAX_DECODE_GEMV_Q", "")
    if env == "xla" or not (env or ENABLED):
        return None
    splits = 1 if n >= 8192 else max(1, min(4, k // 1024))  # few column blocks: split K so more SMs stream
    conf = {**DEFAULT_TILES, "splits": splits, "mode": "fma" if b == 1 else "dot"}
    while conf["bk"] > 16 and k % (conf["bk"] * conf["splits"]):  # narrow models: smaller K tiles, fewer splits
        conf["bk"] //= 2
    while conf["splits"] > 1 and k % (conf["bk"] * conf["splits"]):
        conf["splits"] -= 1
    if "=" in env:
        shapes = dict(item.split("=", 1) for item in env.split("|") if item)
        if f"{k}x{n}" not in shapes:
            return None
        conf = _parse_tiles(shapes[f"{k}x{n}"], env)
    elif env and env != "on":
        conf = _parse_tiles(env, env)
    if conf["mode"] == "fma" and b != 1:
        conf["mode"] = "dot"
    if gemv_q_unsupported(b, k, n, dtype, **{key: conf[key] for key in ("bn", "bk", "splits", "mode")}):
        return None
    return conf
