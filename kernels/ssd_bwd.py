"""Fused SSD backward: two Mosaic GPU kernels, no atomics.

Per block of T tokens of one head (S_in the state entering the block, dS the gradient of the state leaving
it, M = CB ∘ decay ∘ dt the masked scores, G = dY Xᵀ), the forward of `ssd_fwd.py` differentiates to

  dX     = Mᵀ dY + aw · (B dSᵀ) + D dY
  dC     = (G ∘ decay ∘ dt) B + ain · dY S_in        dB = (G ∘ decay ∘ dt)ᵀ C + aw · X dS
  dS_in  = carry · dS + (ain · dY)ᵀ C
  d dA_t = Σ_{q ≥ t > s} (G ∘ M)[q, s],  d dt = colsum(G ∘ CB ∘ decay),  d ain = rowsum(dY ∘ C S_inᵀ),
  d aw   = rowsum(X ∘ B dSᵀ),  d carry = ⟨dS, S_in⟩,  dD = Σ dY ∘ X,  and through the gate silu(z) first.

`build_bwd_heads`: one program per (batch, head, head-dim tile) walks the blocks in reverse, carrying dS in
registers (the reverse of the forward's state walk), and writes everything that belongs to one head: dX,
dz, the per-token vector gradients, and dS of every block (input dtype) for the second kernel.

`build_bwd_groups`: one program per (batch, group, block) loops over the group's heads and sums their dB
and dC in registers: the scores part is summed first as W = Σ_h G_h ∘ decay_h ∘ dt_h, so the two (T, T, N)
products with B and C run once per group instead of once per head; warpgroup 0 makes dC, warpgroup 1 dB,
and they split the heads between them for W (each recomputes half of the decays).
mamba_ssm reaches the same sums with per-head partials and atomics across about 15 kernels.

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
    DV_AIN,
    DV_AW,
    DV_CARRY,
    DV_D,
    DV_DA,
    DV_DT,
    NDV,
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


def _slots(per_slot, fixed):
    for slots in (2, 1):
        if slots * per_slot + fixed <= SMEM_BUDGET:
            return slots
    return None


def heads_plan(n, dtype, has_z):
    isz = min(jnp.dtype(dtype).itemsize, 2)  # float32 runs only in interpret mode: no shared-memory bound
    tile = T * PT * isz
    per_slot = 2 * T * n * isz + (3 if has_z else 2) * tile + NVEC * T * 4 + PT * n * isz
    fixed = PT * n * isz + 2 * T * T * isz + (5 if has_z else 4) * tile + NDV * T * 4
    return _slots(per_slot, fixed)


def groups_plan(n, dtype, has_z):
    isz = min(jnp.dtype(dtype).itemsize, 2)  # float32 runs only in interpret mode: no shared-memory bound
    tile = T * PT * isz
    per_slot = (3 if has_z else 2) * tile + NVEC * T * 4 + 2 * PT * n * isz
    fixed = 2 * T * n * isz + 2 * (2 * tile + T * T * 4)
    return _slots(per_slot, fixed)


def _vectors(vs, has_seq):
    sid = (plgpu.load(vs.at[VEC_SID], layout=ROW), plgpu.load(vs.at[VEC_SID], layout=COL)) if has_seq else ()
    cs_q = plgpu.load(vs.at[VEC_CS], layout=ROW)
    cs_s = plgpu.load(vs.at[VEC_CS], layout=COL)
    return block_decay(cs_q, cs_s, *sid), plgpu.load(vs.at[VEC_DT], layout=COL)


@functools.cache
def build_bwd_heads(*, b, l, h, p, g, n, dtype, has_z, has_seq, interpret):
    """(x, [z], dy, B, C, vec, states, d_final) → (dx, [dz], vector-gradient partials, dS per block, dS_0)."""
    dtype = jnp.dtype(dtype)
    f32 = jnp.float32
    nblk, npt = l // T, p // PT
    slots = heads_plan(n, dtype, has_z)

    def ssd_bwd_heads(*refs):
        refs = list(refs)
        x_ref = refs.pop(0)
        z_ref = refs.pop(0) if has_z else None
        dy_ref, B_ref, C_ref, vec_ref, st_ref, dfin_ref = (refs.pop(0) for _ in range(6))
        dx_ref = refs.pop(0)
        dz_ref = refs.pop(0) if has_z else None
        dv_ref, dst_ref, ds0_ref = refs.pop(0), refs.pop(0), refs.pop(0)
        (B_s, C_s, x_s, dyo_s, z_s, v_s, Sp_s, dSb, p_s, ge_s, dy_s, ady_s, dx_s, dz_s, dv_s, bars, consumed) = refs

        hd, pt, bi = lax.axis_index("h"), lax.axis_index("pt"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        grp = hd // (h // g)
        cols = pl.ds(pt * PT, PT)
        n_in = 6 + int(has_z)  # B, C, x, dy, vec, states, [z]

        @pl.when(wg == 1)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, nblk)
            def _load(i):
                blk = nblk - 1 - i
                slot = lax.rem(i, jnp.asarray(slots, i.dtype))

                @pl.when(i >= slots)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                rows = pl.ds(blk * T, T)
                k = slot * n_in
                plgpu.copy_gmem_to_smem(B_ref.at[bi, rows, grp], B_s.at[slot], bars.at[k])
                plgpu.copy_gmem_to_smem(C_ref.at[bi, rows, grp], C_s.at[slot], bars.at[k + 1])
                plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, hd, cols], x_s.at[slot], bars.at[k + 2])
                plgpu.copy_gmem_to_smem(dy_ref.at[bi, rows, hd, cols], dyo_s.at[slot], bars.at[k + 3])
                plgpu.copy_gmem_to_smem(vec_ref.at[bi, hd, blk], v_s.at[slot], bars.at[k + 4])
                plgpu.copy_gmem_to_smem(st_ref.at[bi, blk, hd, cols], Sp_s.at[slot], bars.at[k + 5])
                if has_z:
                    plgpu.copy_gmem_to_smem(z_ref.at[bi, rows, hd, cols], z_s.at[slot], bars.at[k + 6])

            for i in range(max(nblk - slots, 0), nblk):  # observe the last releases too
                plgpu.barrier_wait(consumed.at[i % slots])

        @pl.when(wg == 0)
        def _compute():
            plgpu.set_max_registers(240, action="increase")
            dS = plgpu.load(dfin_ref.at[bi, hd, cols], layout=WGMMA, optimized=False)
            t_TQ = plgpu.broadcasted_iota(jnp.int32, (T, T), 0, layout=WGMMA)
            q_TQ = plgpu.broadcasted_iota(jnp.int32, (T, T), 1, layout=WGMMA)
            ge_s[...] = jnp.where(q_TQ >= t_TQ, 1.0, 0.0).astype(dtype)  # [q ≥ t]
            plgpu.commit_smem()

            def step(i, dS):
                blk = nblk - 1 - i
                slot = lax.rem(i, jnp.asarray(slots, i.dtype))
                with jax.named_scope("bh.wait_in"):
                    for k in range(n_in):
                        plgpu.barrier_wait(bars.at[slot * n_in + k])
                Bs, Cs, xs, dyos, vs, Sps = (r.at[slot] for r in (B_s, C_s, x_s, dyo_s, v_s, Sp_s))
                rows = pl.ds(blk * T, T)

                with jax.named_scope("bh.carry_dS"):
                    # The previous block's output stores must have read their staging buffers.
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    # d carry = ⟨dS, S_in⟩ first, while little else is live (keeps the kernel out of spills).
                    dv_s.at[DV_CARRY][...] = (dS * plgpu.load(Sps, layout=WGMMA).astype(f32)).sum(axis=1)
                    dSb[...] = dS.astype(dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(dSb, dst_ref.at[bi, blk, hd, cols])

                decay_QS, dt_S = _vectors(vs, has_seq)
                ain_q = plgpu.load(vs.at[VEC_AIN], layout=ROW)
                D = vs[VEC_D, 0]

                def load_x():
                    return plgpu.load(xs, layout=WGMMA).astype(f32)

                def load_dy():  # the scan's dy (through the gate), recomputed from smem when needed
                    dyo_QP = plgpu.load(dyos, layout=WGMMA).astype(f32)
                    if not has_z:
                        return dyo_QP, None, None
                    z_QP = plgpu.load(z_s.at[slot], layout=WGMMA).astype(f32)
                    sg_QP = sigmoid(z_QP)
                    return dyo_QP * z_QP * sg_QP, (dyo_QP, z_QP), sg_QP

                def cb_and_off(acc_cb, acc_off):
                    plgpu.wgmma(acc_cb, Cs, Bs.transpose((1, 0)))
                    plgpu.wgmma(acc_off, Cs, Sps.transpose((1, 0)))

                with jax.named_scope("bh.cb_off"):
                    cb_QS, off_QP = wgmma_result([(T, T), (T, PT)], cb_and_off)
                with jax.named_scope("bh.scores"):
                    cbL_QS = cb_QS * decay_QS
                    p_s[...] = (cbL_QS * bcast_cols(dt_S, (T, T))).astype(dtype)
                    plgpu.commit_smem()
                with jax.named_scope("bh.gate"):
                    x_QP = load_x()
                    dy_QP, gate, sg_QP = load_dy()
                    if has_z:  # recompute the gate's input y + D x
                        y_QP = wgmma_result([(T, PT)], lambda acc: plgpu.wgmma(acc, p_s, xs))
                        y_QP = y_QP + bcast_rows(ain_q, (T, PT)) * off_QP + D * x_QP
                        dyo_QP, z_QP = gate
                        dz_s[...] = (dyo_QP * y_QP * sg_QP * (1.0 + z_QP * (1.0 - sg_QP))).astype(dtype)
                    dv_s.at[DV_AIN][...] = (dy_QP * off_QP).sum(axis=1)
                    dv_s.at[DV_D][...] = (dy_QP * x_QP).sum(axis=1)
                    if has_z:  # without the gate the scan's dy is the output's, already in shared memory
                        dy_s[...] = dy_QP.astype(dtype)
                    ady_s[...] = (dy_QP * bcast_rows(ain_q, (T, PT))).astype(dtype)
                    plgpu.commit_smem()

                dy_op = dy_s if has_z else dyos

                def g_and_dx(acc_g, acc_mt, acc_bds):
                    plgpu.wgmma(acc_g, dy_op, xs.transpose((1, 0)))
                    plgpu.wgmma(acc_mt, p_s.transpose((1, 0)), dy_op)
                    plgpu.wgmma(acc_bds, Bs, dSb.transpose((1, 0)))

                with jax.named_scope("bh.g_mt_bds"):
                    G_QS, mtdy_SP, bds_SP = wgmma_result([(T, T), (T, PT), (T, PT)], g_and_dx)
                with jax.named_scope("bh.gm"):
                    # Both sums over q below come from one product R = [q ≥ t]ᵀ (G ∘ CB ∘ decay) (M has been
                    # read from p_s by now), so that they end as sums along rows, within a warp, instead of
                    # column sums across the warpgroup's four warps.
                    p_s[...] = (G_QS * cbL_QS).astype(dtype)
                    plgpu.commit_smem()

                def tail(acc_r, acc_ds):
                    # Both products run while dx is formed.
                    plgpu.wgmma(acc_r, ge_s, p_s)
                    plgpu.wgmma(acc_ds, ady_s.transpose((1, 0)), Cs)
                    x_QP = load_x()
                    dy_QP = load_dy()[0]
                    aw_q = plgpu.load(vs.at[VEC_AW], layout=ROW)
                    dv_s.at[DV_AW][...] = (x_QP * bds_SP).sum(axis=1)
                    dx_s[...] = (mtdy_SP + bcast_rows(aw_q, (T, PT)) * bds_SP + D * dy_QP).astype(dtype)
                    return acc_r[...], acc_ds[...]

                with jax.named_scope("bh.tail"):
                    R_TS, ds_PN = pl.run_scoped(tail, plgpu.ACC((T, T), f32), plgpu.ACC((PT, n), f32))
                with jax.named_scope("bh.da_update"):
                    # R[t, s] = Σ_{q ≥ t} (G ∘ CB ∘ decay)[q, s]. Its diagonal is the whole column sum (the
                    # decay is 0 for q < s): d dt_s. d(dt·A)_t = Σ_{q ≥ t > s} (G ∘ M)[q, s] = Σ_{s < t} R[t, s] dt_s,
                    # summed pair by pair, not as row minus column sums, which cancel under strong decay.
                    t_TS = plgpu.broadcasted_iota(jnp.int32, (T, T), 0, layout=WGMMA)
                    s_TS = plgpu.broadcasted_iota(jnp.int32, (T, T), 1, layout=WGMMA)
                    dt_S = plgpu.load(vs.at[VEC_DT], layout=COL)
                    dv_s.at[DV_DT][...] = jnp.where(t_TS == s_TS, R_TS, 0.0).sum(axis=1)
                    dv_s.at[DV_DA][...] = jnp.where(s_TS < t_TS, R_TS * bcast_cols(dt_S, (T, T)), 0.0).sum(axis=1)
                    dS = vs[VEC_CARRY, 0] * dS + ds_PN
                    plgpu.commit_smem()
                with jax.named_scope("bh.stores"):
                    plgpu.copy_smem_to_gmem(dx_s, dx_ref.at[bi, rows, hd, cols])
                    if has_z:
                        plgpu.copy_smem_to_gmem(dz_s, dz_ref.at[bi, rows, hd, cols])
                    plgpu.copy_smem_to_gmem(dv_s, dv_ref.at[bi, hd, pt, blk])
                plgpu.barrier_arrive(consumed.at[slot])
                return dS

            dS = lax.fori_loop(0, nblk, step, dS)
            ds0_ref.at[bi, hd, cols][...] = dS
            plgpu.wait_smem_to_gmem(0)

    n_in = 6 + int(has_z)
    scratch = [
        smem_tile((slots, T, n), dtype),  # B
        smem_tile((slots, T, n), dtype),  # C
        smem_tile((slots, T, PT), dtype),  # x
        smem_tile((slots, T, PT), dtype),  # dy (of the output)
        smem_tile((slots, T, PT), dtype) if has_z else None,  # z
        plgpu.SMEM((slots, NVEC, T), f32),  # vectors
        smem_tile((slots, PT, n), dtype),  # state entering the block
        smem_tile((PT, n), dtype),  # dS leaving the block: wgmma operand and TMA source
        smem_tile((T, T), dtype),  # M, then G ∘ M
        smem_tile((T, T), dtype),  # upper-triangular ones [q ≥ t]
        smem_tile((T, PT), dtype) if has_z else None,  # dy of the scan, after the gate (without z: dyo_s)
        smem_tile((T, PT), dtype),  # ain · dy
        smem_tile((T, PT), dtype),  # dx staging
        smem_tile((T, PT), dtype) if has_z else None,  # dz staging
        plgpu.SMEM((NDV, T), f32),  # vector gradients staging
        plgpu.Barrier(num_barriers=slots * n_in),
        plgpu.Barrier(num_arrivals=1, num_barriers=slots),
    ]
    out_type = [jax.ShapeDtypeStruct((b, l, h, p), dtype)]
    if has_z:
        out_type.append(jax.ShapeDtypeStruct((b, l, h, p), dtype))
    out_type += [
        jax.ShapeDtypeStruct((b, h, npt, nblk, NDV, T), f32),
        jax.ShapeDtypeStruct((b, nblk, h, p, n), dtype),
        jax.ShapeDtypeStruct((b, h, p, n), f32),
    ]
    return plgpu.kernel(
        ssd_bwd_heads,
        out_type=out_type,
        grid=(h, npt, b),
        grid_names=("h", "pt", "b"),
        num_threads=2,
        thread_name="wg",
        scratch_types=scratch,
        compiler_params=compiler_params(),
        interpret=interpret,
    )


@functools.cache
def build_bwd_groups(*, b, l, h, p, g, n, dtype, has_z, has_seq, interpret):
    """(x, [z], dy, B, C, vec, states, dS per block) → (dB, dC), summed over each group's heads."""
    dtype = jnp.dtype(dtype)
    f32 = jnp.float32
    nblk, npt, r = l // T, p // PT, h // g
    steps = r * npt
    slots = groups_plan(n, dtype, has_z)

    def ssd_bwd_groups(*refs):
        refs = list(refs)
        x_ref = refs.pop(0)
        z_ref = refs.pop(0) if has_z else None
        dy_ref, B_ref, C_ref, vec_ref, st_ref, dst_ref, dB_ref, dC_ref = refs[:8]
        (B_s, C_s, x_s, dyo_s, z_s, v_s, Sp_s, dS_s, dy_s, a_s, wf_s, bc_bar, w_bar, bars, consumed) = refs[8:]

        blk, grp, bi = lax.axis_index("blk"), lax.axis_index("g"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        rows = pl.ds(blk * T, T)
        n_in = 6 + int(has_z)  # x, dy, vec, states, dS, [z] (+1 spare index keeps the arithmetic simple)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            plgpu.copy_gmem_to_smem(B_ref.at[bi, rows, grp], B_s, bc_bar.at[0])
            plgpu.copy_gmem_to_smem(C_ref.at[bi, rows, grp], C_s, bc_bar.at[1])

            @pl.loop(0, steps)
            def _load(j):
                hd = grp * r + j // npt
                cols = pl.ds(lax.rem(j, jnp.asarray(npt, j.dtype)) * PT, PT)
                slot = lax.rem(j, jnp.asarray(slots, j.dtype))

                @pl.when(j >= slots)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                k = slot * n_in
                plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, hd, cols], x_s.at[slot], bars.at[k])
                plgpu.copy_gmem_to_smem(dy_ref.at[bi, rows, hd, cols], dyo_s.at[slot], bars.at[k + 1])
                plgpu.copy_gmem_to_smem(vec_ref.at[bi, hd, blk], v_s.at[slot], bars.at[k + 2])
                plgpu.copy_gmem_to_smem(st_ref.at[bi, blk, hd, cols], Sp_s.at[slot], bars.at[k + 3])
                plgpu.copy_gmem_to_smem(dst_ref.at[bi, blk, hd, cols], dS_s.at[slot], bars.at[k + 4])
                if has_z:
                    plgpu.copy_gmem_to_smem(z_ref.at[bi, rows, hd, cols], z_s.at[slot], bars.at[k + 5])

            for j in range(max(steps - slots, 0), steps):  # observe the last releases too
                plgpu.barrier_wait(consumed.at[j % slots])

        def compute(c):
            """Warpgroup c: c = 0 makes dC (state term ain · dY S_in), c = 1 makes dB (aw · X dS).

            The scores part W is split between the two: warpgroup c adds the heads of the steps j with
            j % 2 == c, so each recomputes half of the decays; the halves meet in shared memory at the end.
            """
            plgpu.set_max_registers(232, action="increase")
            dys, a_smem = dy_s.at[c], a_s.at[c]
            waits = [0, 1, 2, 3 if c == 0 else 4] + ([5] if has_z else [])

            def scope(acc):
                def step(j, W_QS, with_w):
                    slot = lax.rem(j, jnp.asarray(slots, j.dtype))
                    with jax.named_scope("bg.wait_in"):
                        for k in waits:
                            plgpu.barrier_wait(bars.at[slot * n_in + k])
                    xs, dyos, vs = x_s.at[slot], dyo_s.at[slot], v_s.at[slot]
                    dy_op = dyos
                    with jax.named_scope("bg.state_term"):
                        if has_z and (with_w or c == 0):  # the scan's dy is the output's dy through the gate
                            z_QP = plgpu.load(z_s.at[slot], layout=WGMMA).astype(f32)
                            dy_QP = plgpu.load(dyos, layout=WGMMA).astype(f32) * z_QP * sigmoid(z_QP)
                            if with_w:
                                dys[...] = dy_QP.astype(dtype)
                                dy_op = dys
                        elif c == 0:
                            dy_QP = plgpu.load(dyos, layout=WGMMA).astype(f32)
                        if c == 0:
                            a_QP = dy_QP * bcast_rows(plgpu.load(vs.at[VEC_AIN], layout=ROW), (T, PT))
                        else:
                            x_QP = plgpu.load(xs, layout=WGMMA).astype(f32)
                            a_QP = x_QP * bcast_rows(plgpu.load(vs.at[VEC_AW], layout=ROW), (T, PT))
                        # The previous step's state-term wgmma has finished with a_smem (waited below).
                        a_smem[...] = a_QP.astype(dtype)
                        plgpu.commit_smem()
                        plgpu.wgmma(acc, a_smem, (Sp_s if c == 0 else dS_s).at[slot])
                    if with_w:
                        with jax.named_scope("bg.w"):
                            decay_QS, dt_S = _vectors(vs, has_seq)
                            G_QS = wgmma_result([(T, T)], lambda acc_g: plgpu.wgmma(acc_g, dy_op, xs.transpose((1, 0))))
                            W_QS = W_QS + G_QS * decay_QS * bcast_cols(dt_S, (T, T))
                    with jax.named_scope("bg.wgmma_wait"):
                        plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(consumed.at[slot])
                    return W_QS

                def pair(k, W_QS):
                    W_QS = step(2 * k, W_QS, c == 0)
                    return step(2 * k + 1, W_QS, c == 1)

                W_QS = lax.fori_loop(0, steps // 2, pair, plgpu.layout_cast(jnp.zeros((T, T), f32), WGMMA))
                if steps % 2:
                    W_QS = step(jnp.int32(steps - 1), W_QS, c == 0)
                wf_s.at[c][...] = W_QS
                plgpu.barrier_arrive(w_bar.at[0])
                plgpu.barrier_wait(w_bar.at[0])
                W_QS = plgpu.load(wf_s.at[0], layout=WGMMA, optimized=False) + plgpu.load(
                    wf_s.at[1], layout=WGMMA, optimized=False
                )
                ws = dys  # (T, PT) = (T, T): free by now
                ws[...] = W_QS.astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_wait(bc_bar.at[0 if c == 0 else 1])
                if c == 0:
                    plgpu.wgmma(acc, ws, B_s)
                else:
                    plgpu.wgmma(acc, ws.transpose((1, 0)), C_s)
                return acc[...]

            out = pl.run_scoped(scope, plgpu.ACC((T, n), f32))
            # Warpgroup 0 no longer reads B (nor warpgroup 1 C): stage the result there.
            out_s = B_s if c == 0 else C_s
            out_s[...] = out.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_s, (dC_ref if c == 0 else dB_ref).at[bi, rows, grp])
            plgpu.wait_smem_to_gmem(0)

        pl.when(wg == 0)(lambda: compute(0))
        pl.when(wg == 1)(lambda: compute(1))

    n_in = 6 + int(has_z)
    scratch = [
        smem_tile((T, n), dtype),  # B (then dC staging)
        smem_tile((T, n), dtype),  # C (then dB staging)
        smem_tile((slots, T, PT), dtype),  # x
        smem_tile((slots, T, PT), dtype),  # dy of the output
        smem_tile((slots, T, PT), dtype) if has_z else None,  # z
        plgpu.SMEM((slots, NVEC, T), f32),  # vectors
        smem_tile((slots, PT, n), dtype),  # state entering the block
        smem_tile((slots, PT, n), dtype),  # dS leaving the block
        smem_tile((2, T, PT), dtype),  # dy after the gate, per warpgroup
        smem_tile((2, T, PT), dtype),  # ain · dY (warpgroup 0) or aw · X (warpgroup 1)
        plgpu.SMEM((2, T, T), f32),  # the two halves of W
        plgpu.Barrier(num_barriers=2),
        plgpu.Barrier(num_arrivals=2, num_barriers=1),  # both halves of W written
        plgpu.Barrier(num_barriers=slots * n_in),
        plgpu.Barrier(num_arrivals=2, num_barriers=slots),
    ]
    out_type = [jax.ShapeDtypeStruct((b, l, g, n), dtype)] * 2
    return plgpu.kernel(
        ssd_bwd_groups,
        out_type=out_type,
        grid=(nblk, g, b),
        grid_names=("blk", "g", "b"),
        num_threads=3,
        thread_name="wg",
        scratch_types=scratch,
        compiler_params=compiler_params(),
        interpret=interpret,
    )
