"""Fused SSD forward: one Mosaic GPU kernel for the whole chunked scan (Mamba2, Dao & Gu 2024, §6).

One program per (batch, pair of heads of one group, head-dim tile of 64). A memory warpgroup streams the
blocks of T = 64 tokens through a two-slot shared-memory ring with TMA (B and C once for both heads);
each compute warpgroup owns one head and walks the blocks in order, keeping its (64, N) float32 state
in registers (tiles of at most 128 columns), so per-chunk states never touch device memory. Per block
(the four stages of `mamba_jax/ops/ssd_xla.py`, fused):

  CB     = C Bᵀ                                   (T, T)  wgmma
  y_off  = C S_prevᵀ                              (T, 64) wgmma, same wait as CB
  y      = ((CB ∘ decay ∘ dt) x) + ain · y_off     (T, 64) wgmma on the masked, decayed scores
  y      = (y + D x) · silu(z)                    epilogue, TMA store
  S      = carry · S + (aw · x)ᵀ B                (64, N) wgmma

This is the structure of a FlashAttention-3 forward (jax's `attention_mgpu.py`) with the softmax replaced
by the decay mask and the KV loop replaced by the carried state. Decays are float32 and computed as
exp(cs_q − cs_s) after masking, never as a product of two exponentials. Matmul operands are in the input
dtype with float32 accumulation; the state is rounded to the input dtype only as the operand of y_off,
as in mamba_ssm. With `save_states` the state entering every block is also written (input dtype) for
the backward kernels.

Dimension key: B batch, L length, H heads, G groups, P head dim, N state, T tokens per block.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from mamba_jax.kernels.ssd_common import (
    COL,
    NVEC,
    PT,
    ROW,
    SMEM_BUDGET,
    VEC_AIN,
    VEC_AW,
    VEC_CARRY,
    VEC_CS,
    VEC_D,
    VEC_DT,
    VEC_SID,
    WGMMA,
    T,
    bcast_cols,
    bcast_rows,
    block_decay,
    compiler_params,
    sigmoid,
    smem_tile,
    wgmma_result,
)


def fwd_plan(h, g, n, dtype, has_z, heads=None):
    """(heads per program, ring slots) that fit shared memory, or None.

    Two slots (loads of the next block overlap this one) come first, then two heads per program (they
    share B and C, and two compute warpgroups hide each other's latencies). `heads` forces 1 or 2.
    """
    isz = min(jnp.dtype(dtype).itemsize, 2)  # float32 runs only in interpret mode: no shared-memory bound
    r = h // g
    for slots in (2, 1):
        for hp in (heads,) if heads else (2, 1):
            if r % hp:
                continue
            per_slot = 2 * T * n * isz + hp * (T * PT * isz * (2 if has_z else 1) + NVEC * T * 4)
            per_head = PT * n * isz + 3 * T * PT * isz
            if slots * per_slot + hp * per_head <= SMEM_BUDGET:
                return hp, slots
    return None


@functools.cache
def build_fwd(*, b, l, h, p, g, n, dtype, has_z, has_init, has_seq, save_states, interpret, heads=None):
    """The forward kernel for one static configuration: (x, [z], B, C, vec, [S0]) → (y, final, [states]).

    `heads` (heads per program, 1 or 2) overrides the plan, for benchmarks.
    """
    dtype = jnp.dtype(dtype)
    f32 = jnp.float32
    nblk, npt, r = l // T, p // PT, h // g
    heads, slots = fwd_plan(h, g, n, dtype, has_z, heads)
    NS = 128 if n % 128 == 0 else 64  # state columns per register tile
    n_slices = [slice(k * NS, (k + 1) * NS) for k in range(n // NS)]

    def ssd_fwd(*refs):
        refs = list(refs)
        x_ref = refs.pop(0)
        z_ref = refs.pop(0) if has_z else None
        B_ref, C_ref, vec_ref = refs.pop(0), refs.pop(0), refs.pop(0)
        S0_ref = refs.pop(0) if has_init else None
        y_ref, fin_ref = refs.pop(0), refs.pop(0)
        st_ref = refs.pop(0) if save_states else None
        (B_s, C_s, x_s, z_s, v_s, Sb_s, p_s, xw_s, y_s, bars, consumed) = refs

        hp, pt, bi = lax.axis_index("hp"), lax.axis_index("pt"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        grp = (hp * heads) // r
        cols = pl.ds(pt * PT, PT)
        n_in = 2 + int(has_z)  # barriers per head and slot: x, vec, [z]; B and C have one each per slot

        def bar(slot, kind, w=0):
            return bars.at[slot * (2 + heads * n_in) + (kind if kind < 2 else 2 + w * n_in + kind - 2)]

        @pl.when(wg == heads)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, nblk)
            def _load(blk):
                slot = lax.rem(blk, jnp.asarray(slots, blk.dtype))

                @pl.when(blk >= slots)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                rows = pl.ds(blk * T, T)
                plgpu.copy_gmem_to_smem(B_ref.at[bi, rows, grp], B_s.at[slot], bar(slot, 0))
                plgpu.copy_gmem_to_smem(C_ref.at[bi, rows, grp], C_s.at[slot], bar(slot, 1))
                for w in range(heads):
                    hd = hp * heads + w
                    plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, hd, cols], x_s.at[slot, w], bar(slot, 2, w))
                    plgpu.copy_gmem_to_smem(vec_ref.at[bi, hd, blk], v_s.at[slot, w], bar(slot, 3, w))
                    if has_z:
                        plgpu.copy_gmem_to_smem(z_ref.at[bi, rows, hd, cols], z_s.at[slot, w], bar(slot, 4, w))

            # Observe the last releases too (every phase of a barrier must be awaited by its waiters).
            for i in range(max(nblk - slots, 0), nblk):
                plgpu.barrier_wait(consumed.at[i % slots])

        @pl.when(wg < heads)
        def _compute():
            plgpu.set_max_registers(232 if heads == 2 else 240, action="increase")
            hd = hp * heads + wg
            Sb, ps, xws, ys = Sb_s.at[wg], p_s.at[wg], xw_s.at[wg], y_s.at[wg]
            # The state lives in register tiles of at most 128 columns: a (64, 256) float32 tile and its
            # update at once would not fit the register file.
            if has_init:
                S = tuple(plgpu.load(S0_ref.at[bi, hd, cols, sl], layout=WGMMA, optimized=False) for sl in n_slices)
            else:
                S = tuple(plgpu.layout_cast(jnp.zeros((PT, NS), f32), WGMMA) for _ in n_slices)
            for S_k, sl in zip(S, n_slices, strict=True):
                Sb.at[:, sl][...] = S_k.astype(dtype)
            plgpu.commit_smem()

            def step(blk, S):
                slot = lax.rem(blk, jnp.asarray(slots, blk.dtype))
                with jax.named_scope("fwd.wait_in"):
                    for kind in range(2 + n_in):
                        plgpu.barrier_wait(bar(slot, kind, wg) if kind >= 2 else bar(slot, kind))
                Bs, Cs, xs, vs = B_s.at[slot], C_s.at[slot], x_s.at[slot, wg], v_s.at[slot, wg]
                rows = pl.ds(blk * T, T)
                if save_states:  # the state entering this block, for the backward kernels
                    plgpu.copy_smem_to_gmem(Sb, st_ref.at[bi, blk, hd, cols])

                with jax.named_scope("fwd.cb_off"):
                    cs_q = plgpu.load(vs.at[VEC_CS], layout=ROW)
                    cs_s = plgpu.load(vs.at[VEC_CS], layout=COL)
                    dt_s = plgpu.load(vs.at[VEC_DT], layout=COL)
                    ain_q = plgpu.load(vs.at[VEC_AIN], layout=ROW)
                    aw_q = plgpu.load(vs.at[VEC_AW], layout=ROW)
                    sid = (plgpu.load(vs.at[VEC_SID], layout=ROW), plgpu.load(vs.at[VEC_SID], layout=COL))
                    sid = sid if has_seq else (None, None)

                    def cb_and_off(acc_cb, acc_off):
                        plgpu.wgmma(acc_cb, Cs, Bs.transpose((1, 0)))
                        plgpu.wgmma(acc_off, Cs, Sb.transpose((1, 0)))

                    cb_QS, off_QP = wgmma_result([(T, T), (T, PT)], cb_and_off)
                with jax.named_scope("fwd.scores"):
                    ps[...] = (cb_QS * block_decay(cs_q, cs_s, *sid) * bcast_cols(dt_s, (T, T))).astype(dtype)
                    plgpu.commit_smem()
                with jax.named_scope("fwd.y"):
                    y_QP = wgmma_result([(T, PT)], lambda acc: plgpu.wgmma(acc, ps, xs))
                with jax.named_scope("fwd.epilogue"):
                    x_QP = plgpu.load(xs, layout=WGMMA).astype(f32)
                    y_QP = y_QP + bcast_rows(ain_q, (T, PT)) * off_QP + vs[VEC_D, 0] * x_QP
                    if has_z:
                        z_QP = plgpu.load(z_s.at[slot, wg], layout=WGMMA).astype(f32)
                        y_QP = y_QP * z_QP * sigmoid(z_QP)
                    # The previous block's y store must have read y_s (the state store, if any, came after it).
                    plgpu.wait_smem_to_gmem(1 if save_states else 0, wait_read_only=True)
                    ys[...] = y_QP.astype(dtype)
                    xws[...] = (x_QP * bcast_rows(aw_q, (T, PT))).astype(dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(ys, y_ref.at[bi, rows, hd, cols])
                    if save_states:  # the state store issued at the top of this block must have read Sb
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                with jax.named_scope("fwd.state"):
                    carry = vs[VEC_CARRY, 0]
                    S_new = []
                    for S_k, sl in zip(S, n_slices, strict=True):
                        upd = wgmma_result(
                            [(PT, NS)], lambda acc, sl=sl: plgpu.wgmma(acc, xws.transpose((1, 0)), Bs.at[:, sl])
                        )
                        S_k = carry * S_k + upd
                        Sb.at[:, sl][...] = S_k.astype(dtype)
                        S_new.append(S_k)
                    plgpu.commit_smem()
                plgpu.barrier_arrive(consumed.at[slot])
                S = tuple(S_new)
                return S

            S = lax.fori_loop(0, nblk, step, S)
            for S_k, sl in zip(S, n_slices, strict=True):
                fin_ref.at[bi, hd, cols, sl][...] = S_k
            plgpu.wait_smem_to_gmem(0)

    n_bars = slots * (2 + heads * (2 + int(has_z)))
    scratch = [
        smem_tile((slots, T, n), dtype),  # B
        smem_tile((slots, T, n), dtype),  # C
        smem_tile((slots, heads, T, PT), dtype),  # x
        smem_tile((slots, heads, T, PT), dtype) if has_z else None,  # z
        plgpu.SMEM((slots, heads, NVEC, T), f32),  # vectors
        smem_tile((heads, PT, n), dtype),  # state entering the block, as a wgmma operand
        smem_tile((heads, T, T), dtype),  # masked, decayed scores
        smem_tile((heads, T, PT), dtype),  # aw · x
        smem_tile((heads, T, PT), dtype),  # y, staged for its TMA store
        plgpu.Barrier(num_barriers=n_bars),
        plgpu.Barrier(num_arrivals=heads, num_barriers=slots),
    ]
    out_type = [
        jax.ShapeDtypeStruct((b, l, h, p), dtype),
        jax.ShapeDtypeStruct((b, h, p, n), f32),
    ]
    if save_states:
        out_type.append(jax.ShapeDtypeStruct((b, nblk, h, p, n), dtype))
    return plgpu.kernel(
        ssd_fwd,
        out_type=out_type,
        grid=(h // heads, npt, b),
        grid_names=("hp", "pt", "b"),
        num_threads=heads + 1,
        thread_name="wg",
        scratch_types=scratch,
        compiler_params=compiler_params(),
        interpret=interpret,
    )
