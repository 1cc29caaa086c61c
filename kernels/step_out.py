"""The SSM step and out_proj in one launch, for small batches (Pallas, Triton backend; opt-in).

At batch 1 a 2.7B layer runs, besides in_proj, the step kernel (latency-bound: ≈ 6 µs with the memory bus
mostly idle), out_proj's GEMV (26 MB), XLA's split-K reduce and the residual kernel
(benchmarks/README.md). Here one launch does the step and out_proj: program (hb, n) owns out_proj's K
slice of heads [hb·hp, (hb + 1)·hp) — exactly the g values those heads' step produces — and the column
tile n. It issues its weight tile's loads first (nothing they wait on), then runs the step of its heads
(conv, state update, y, gate, as `kernels.decode.ssm_step` does) while they land, and writes the partial
product g_K · W_KN in float32. `kernels.decode.gated_norm_residual(layout="SBD")` sums the H / hp partials
with the residual add, so no split-K reduce runs either.

Every column tile's program recomputes its heads' step (a few KB read from L2); only tile 0's programs
write the state, the conv ring and Σ g². Because the others still read the old state while those write,
the state is double-buffered: (2, B, H, P, S), the current state in slot pos mod 2 and the new one written
to the other (`state_slots` builds it from prefill's state). The conv ring is safe in place as in
`ssm_step` (no program reads the slot that is written).

MAMBA_JAX_DECODE_STEP_OUT="bn,bc,hp,warps" switches it on at trace time (unset or "0": off, the default
until it is measured faster in the decode loop: benchmarks/decode_variants.py).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.triton as plt
import jax.numpy as jnp

from mamba_jax.kernels import decode as kd

MAX_BATCH = 4  # every program keeps its rows' g and partial sums in registers


def step_out_config(batch: int) -> dict | None:
    """The launch shape of `ssm_step_out` for the decode at this batch, or None where the decode keeps the
    separate step kernel and GEMV (the default; MAMBA_JAX_DECODE_STEP_OUT="bn,bc,hp,warps" asks for it)."""
    if os.environ.get("MAMBA_JAX_DECODE_STEP_OUT", "0") in ("", "0") or batch > MAX_BATCH:
        return None
    what = "four integers bn,bc,hp,warps (e.g. 512,128,1,8), or 0 for off"
    bn, bc, hp, warps = kd._env_ints("MAMBA_JAX_DECODE_STEP_OUT", 4, what)
    return {"block_n": bn, "block_c": bc, "heads_per_program": hp, "warps": warps}


def state_slots(ssm_BHPS):
    """The double-buffered state `ssm_step_out` reads and writes, (2, B, H, P, S): the state in both slots
    (whichever slot the position picks holds it)."""
    return jnp.stack([ssm_BHPS, ssm_BHPS])


def current_state(ssm_2BHPS, pos):
    """The state of a double-buffered cache, (B, H, P, S), before the token at `pos` is decoded."""
    return ssm_2BHPS[jnp.asarray(pos) % 2]


def _step_out_kernel(
    zx_ref, conv_ref, cw_ref, cb_ref, ssm_ref, alog_ref, d_ref, dtb_ref, u_ref, slot_ref, w_ref,
    part_ref, ss_ref, conv_out_ref, ssm_out_ref, *, bsz, r_heads, hp, p, s, taps, bn, bc, dt_limit, norm_eps, cdtype,
):  # fmt: skip
    hb, n = pl.program_id(0), pl.program_id(1)
    f32 = jnp.float32
    h0 = hb * hp
    grp = h0 // r_heads
    rp = r_heads * p
    nc = bn // bc
    # out_proj's weight tile first: its loads wait on nothing and land while the step runs.
    tiles = [[w_ref[pl.ds((h0 + i) * p, p), pl.ds(n * bn + c * bc, bc)] for c in range(nc)] for i in range(hp)]
    slot = jnp.sum(slot_ref[pl.ds(0, 1)])  # the conv ring's slot of this position
    cur = jnp.sum(slot_ref[pl.ds(1, 1)])  # the state's slot (pos mod 2); the new state goes to the other
    first = n == 0  # the programs of column tile 0 write the state, the conv ring and Σ g²
    for b in range(bsz):  # unrolled; the weight tile serves every row
        scale = kd._inv_rms(u_ref, b, norm_eps, False)
        zx = kd._scaled_cols(zx_ref, b, grp, scale, cdtype)
        conv = functools.partial(kd._conv, zx, conv_ref, cw_ref, cb_ref, b, grp, slot, taps=taps, cdtype=cdtype)
        bv, b_win = conv(2 * rp, rp, s)
        cv, c_win = conv(2 * rp + s, rp + s, s)
        acc = [jnp.zeros((bc,), f32) for _ in range(nc)]
        for i in range(hp):
            h = h0 + i
            ch_x = (h % r_heads) * p
            x, x_win = conv(rp + ch_x, ch_x, p)
            state = ssm_ref[cur, b, h].astype(f32)  # the old state: the new one goes to the other slot
            state, gated = kd._head_math(h, 0, state, x, bv, cv, zx, alog_ref, d_ref, dtb_ref, r_heads=r_heads, p=p,
                                      bp=p, s=s, dt_limit=dt_limit, cdtype=cdtype)  # fmt: skip
            g = gated.astype(cdtype).astype(f32)[:, None]  # out_proj's input, as the GEMV path rounds it
            acc = [a + jnp.sum(t.astype(f32) * g, axis=0) for a, t in zip(acc, tiles[i], strict=True)]
            stores = [(ssm_out_ref.at[1 - cur, b, h], state), (conv_out_ref.at[b, slot, grp, pl.ds(ch_x, p)], x_win),
                      (ss_ref.at[b, pl.ds(h, 1)], jnp.sum(gated * gated, keepdims=True))]  # fmt: skip
            pl.when(first)(functools.partial(_store, stores))
        for c in range(nc):
            part_ref[hb, b, pl.ds(n * bn + c * bc, bc)] = acc[c]
        # B and C are a group's: the program of its first heads writes their conv inputs.
        stores = [(conv_out_ref.at[b, slot, grp, pl.ds(rp, s)], b_win),
                  (conv_out_ref.at[b, slot, grp, pl.ds(rp + s, s)], c_win)]  # fmt: skip
        pl.when(first & (h0 % r_heads == 0))(functools.partial(_store, stores))


def _store(pairs):
    for ref, value in pairs:
        ref[...] = value.astype(ref.dtype)


def _tile(n: int, want: int) -> int:
    """The largest power of two ≤ `want` dividing n (≥ 1)."""
    t = max(pl.next_power_of_2(want), 1)
    while t > 1 and (n % t or t > want):
        t //= 2
    return t


@functools.partial(
    jax.jit, static_argnames=("heads", "dt_limit", "norm_eps", "block_n", "block_c", "heads_per_program", "warps")
)
def ssm_step_out(
    zx_BGW, conv_BKGF, conv_w_KGF, conv_b_GF, ssm_2BHPS, A_log_H, D_H, dt_bias_H, pos, norm_in_BD, w_FN, *,
    heads, dt_limit, norm_eps=0.0, block_n=512, block_c=128, heads_per_program=1, warps=8,
):  # fmt: skip
    """One decode step of a Mamba2 mixer after in_proj and its out_proj, for the token at `pos`: as
    `kernels.decode.ssm_step` (same arguments; `norm_in` the raw residual whose input-norm weight was folded
    into in_proj) followed by g @ w_FN, w_FN out_proj's weight (H·P, N) with the gated norm's weight folded
    in, for one norm group. The state is double-buffered, (2, B, H, P, S) (`state_slots`), updated in place
    (donate it and the conv ring under jit).

    Returns (float32 partial products (H / heads_per_program, B, N) whose sum is g @ w_FN, g = y · SiLU(z)
    rounded to the compute dtype — `gated_norm_residual(layout="SBD")` sums them; Σ g² (B, H) float32 for
    the gated norm; the conv ring; the state)."""
    bsz, k, g, _ = conv_BKGF.shape
    two, _, _, p, s = ssm_2BHPS.shape
    f, n = w_FN.shape
    hp = heads_per_program
    reason = kd.ssm_step_unsupported(p, s)
    if reason or two != 2 or f != heads * p or bsz > MAX_BATCH or (heads // g) % hp:
        raise ValueError(
            f"ssm_step_out: {reason or ''} state {ssm_2BHPS.shape} (needs (2, B, H, P, S): state_slots), "
            f"out_proj {w_FN.shape} for {heads} heads of {p}, batch {bsz} (≤ {MAX_BATCH}), "
            f"heads_per_program={hp} (must divide the {heads // g} heads of a group)."
        )
    if norm_in_BD is None:  # no input norm: rsqrt(1² / 1 + 0) = 1
        norm_in_BD, norm_eps = jnp.ones((bsz, 1), jnp.float32), 0.0
    bn = _tile(n, block_n)
    bc = _tile(bn, block_c)
    slots = jnp.stack([jnp.asarray(pos, jnp.int32) % k, jnp.asarray(pos, jnp.int32) % 2])
    kernel = functools.partial(
        _step_out_kernel, bsz=bsz, r_heads=heads // g, hp=hp, p=p, s=s, taps=k - 1, bn=bn, bc=bc,
        dt_limit=tuple(dt_limit), norm_eps=norm_eps, cdtype=jnp.dtype(zx_BGW.dtype),
    )  # fmt: skip
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((heads // hp, bsz, n), jnp.float32),
            jax.ShapeDtypeStruct((bsz, heads), jnp.float32),
            jax.ShapeDtypeStruct(conv_BKGF.shape, conv_BKGF.dtype),
            jax.ShapeDtypeStruct(ssm_2BHPS.shape, ssm_2BHPS.dtype),
        ),
        grid=(heads // hp, n // bn),
        input_output_aliases={1: 2, 4: 3},
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1),
        interpret=kd._interpret(),
        name="ssm_step_out",
    )(zx_BGW, conv_BKGF, conv_w_KGF, conv_b_GF, ssm_2BHPS, A_log_H, D_H, dt_bias_H, norm_in_BD, slots, w_FN)
