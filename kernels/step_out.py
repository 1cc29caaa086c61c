"""The SSM step and out_proj in one launch at small batch (Mosaic GPU; opt-in).

At batch 1 a 2.7B layer runs, besides in_proj, the step kernel (≈ 6 µs, latency-bound: the memory bus mostly
idle), out_proj's GEMV (26 MB), XLA's split-K reduce and the residual kernel (benchmarks/README.md). out_proj's
K slice of head h is exactly the P values of g = y · SiLU(z) that head's step produces, so here program
(h, t) owns head h and the t-th range of out_proj's output columns and

  1. hands the TMA unit every (P, BC) tile of its weight range at once (each with its own barrier: nothing
     they wait on), then the step's inputs (in_proj's columns of the head, its conv window, the residual row
     for the input norm's 1/rms), and the state once the position's slots are read;
  2. runs the step of head h in registers while the weight lands — the conv window + SiLU, dt, the state
     update as a WGMMA-layout (P, S) tile, y, the D skip and the SiLU(z) gate, as `kernels.decode.ssm_step`
     does and rounds — and
  3. multiplies g into each tile as it arrives (one reduction over the tile's P rows per column) and stores
     float32 partials (H, B, N), which `gated_norm_residual(layout="SBD")` sums with the residual add.

Every column range's program recomputes its head's step; only range 0's program writes the new state, the
conv ring and Σ g². The others still read the old state meanwhile, so the state is double-buffered,
(2, B, H, P, S): the current one in slot pos mod 2 (`state_slots` builds it from prefill's state). The Triton
form of this kernel (8825efe) did not overlap the step with the weight loads (21.5 µs per 2.7B layer against
16.3 for the three launches it replaced); with TMA the overlap is explicit.

MAMBA_JAX_DECODE_STEP_OUT="ranges,bc" switches it on at trace time (column ranges per head and tile width;
unset or "0": off, the default until measured faster in the decode loop, benchmarks/decode_variants.py).
Off the GPU it runs in Mosaic GPU's interpret mode (tests).

Dimension key: B batch, G groups, R heads per group, H heads, P head dim, S state size, K conv taps, W in_proj
columns per group, F conv channels per group, N out features, D model width.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from mamba_jax.kernels import decode as kd

MAX_BATCH = 4  # each program keeps its rows' states (P × S) in shared memory
ROW = plgpu.Layout.WGMMA.reduce(1)  # a (P,) vector: one value per state row (x, z, y, g)
COL = plgpu.Layout.WGMMA.reduce(0)  # a (S,) or (BC,) vector: one value per column (B, C, outputs)
TMA_BYTES = 128  # Mosaic GPU copies move a multiple of a warpgroup's 128 threads in bytes


def step_out_config(batch: int) -> dict | None:
    """`ssm_step_out`'s launch shape for the decode at this batch, or None where the decode keeps the separate
    step kernel and GEMV (the default; MAMBA_JAX_DECODE_STEP_OUT="ranges,bc" asks for it)."""
    if os.environ.get("MAMBA_JAX_DECODE_STEP_OUT", "0") in ("", "0") or batch > MAX_BATCH:
        return None
    what = "two integers, column ranges per head and tile width (e.g. 5,256), or 0 for off"
    ranges, bc = kd._env_ints("MAMBA_JAX_DECODE_STEP_OUT", 2, what)
    return {"ranges": ranges, "block_c": bc}


def state_slots(ssm_BHPS):
    """The double-buffered state `ssm_step_out` reads and writes, (2, B, H, P, S): the state in both slots
    (whichever slot the position picks holds it)."""
    return jnp.stack([ssm_BHPS, ssm_BHPS])


def _softplus(a):
    # Mosaic GPU has no log1p: log(1 + e) with the rounding of 1 + e corrected (log1p's accuracy).
    e = jnp.exp(jnp.minimum(a, 20.0))
    w = 1.0 + e
    return jnp.where(a > 20.0, a, jnp.log(w) - (w - 1.0 - e) / w)


def _silu(x):
    return x / (1.0 + jnp.exp(-x))


def _swizzle(cols: int, dtype):
    """Tiling + swizzle for a shared-memory tile whose rows hold `cols` elements (as kernels/gemv.py)."""
    row_bytes = cols * jnp.dtype(dtype).itemsize
    sw = 128 if row_bytes % 128 == 0 else (64 if row_bytes % 64 == 0 else 32)
    return (plgpu.TilingTransform((8, sw // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(sw))


@functools.cache
def _build(bsz, g, r_heads, p, s, taps, n, d_rows, d, nr, bc, dt_cols, hpad, dtypes, dt_limit, norm_eps, interpret):
    """The kernel over a grid (H, ranges); the conv ring and the state are jax Refs updated in place."""
    cdt, sdt, wdt, rdt, cwdt, cbdt = dtypes
    heads, rp = g * r_heads, r_heads * p
    w_cols = 2 * rp + 2 * s + r_heads  # in_proj's columns per group: [z | x | B | C | dt]
    k = taps + 1
    cols = n // nr  # output columns of one program
    nt = cols // bc  # weight tiles of one program
    f32 = jnp.float32
    row_p = lambda v: jax.lax.broadcast_in_dim(v, (p, s), (0,))  # noqa: E731
    col_s = lambda v: jax.lax.broadcast_in_dim(v, (p, s), (1,))  # noqa: E731

    def body(zx_ref, ring_ref, cw_ref, cb_ref, ssm_ref, hp_ref, u_ref, slot_ref, w_ref, part_ref, ss_ref,
             w_s, st_s, z_s, x_s, bc_s, dt_s, rx_s, rbc_s, cwx_s, cwbc_s, cbx_s, cbbc_s, hp_s, u_s, slot_s,
             out_s, newx_s, newbc_s, ss_s, w_bar, in_bar, slot_bar, st_bar):  # fmt: skip
        h, t = jax.lax.axis_index("h"), jax.lax.axis_index("t")
        grp, r = h // r_heads, h % r_heads
        ch = r * p  # the head's x channels within its group's conv channels
        first = t == 0  # range 0's program writes the state, the conv ring and Σ g²
        # 1. The position's slots (the state copy needs them), every weight tile, the step's other inputs.
        with jax.named_scope("issue"):
            plgpu.copy_gmem_to_smem(slot_ref, slot_s, slot_bar.at[0])
            for i in range(nt):
                tile = w_ref.at[pl.ds(h * p, p), pl.ds((t * nt + i) * bc, bc)]
                plgpu.copy_gmem_to_smem(tile, w_s.at[i], w_bar.at[i])
            for b in range(bsz):
                plgpu.copy_gmem_to_smem(zx_ref.at[b, grp, pl.ds(ch, p)], z_s.at[b], in_bar.at[0])
                plgpu.copy_gmem_to_smem(zx_ref.at[b, grp, pl.ds(rp + ch, p)], x_s.at[b], in_bar.at[0])
                plgpu.copy_gmem_to_smem(zx_ref.at[b, grp, pl.ds(2 * rp, 2 * s)], bc_s.at[b], in_bar.at[0])
                plgpu.copy_gmem_to_smem(zx_ref.at[b, grp, pl.ds(w_cols - dt_cols, dt_cols)], dt_s.at[b], in_bar.at[0])
                plgpu.copy_gmem_to_smem(ring_ref.at[b, :, grp, pl.ds(ch, p)], rx_s.at[b], in_bar.at[0])
                plgpu.copy_gmem_to_smem(ring_ref.at[b, :, grp, pl.ds(rp, 2 * s)], rbc_s.at[b], in_bar.at[0])
                plgpu.copy_gmem_to_smem(u_ref.at[b], u_s.at[b], in_bar.at[0])
            plgpu.copy_gmem_to_smem(cw_ref.at[:, grp, pl.ds(ch, p)], cwx_s, in_bar.at[0])
            plgpu.copy_gmem_to_smem(cw_ref.at[:, grp, pl.ds(rp, 2 * s)], cwbc_s, in_bar.at[0])
            plgpu.copy_gmem_to_smem(cb_ref.at[grp, pl.ds(ch, p)], cbx_s, in_bar.at[0])
            plgpu.copy_gmem_to_smem(cb_ref.at[grp, pl.ds(rp, 2 * s)], cbbc_s, in_bar.at[0])
            plgpu.copy_gmem_to_smem(hp_ref, hp_s, in_bar.at[0])
        with jax.named_scope("inputs"):
            plgpu.barrier_wait(slot_bar.at[0])
            slot, cur = slot_s[0], slot_s[1]
            for b in range(bsz):
                plgpu.copy_gmem_to_smem(ssm_ref.at[cur, b, h], st_s.at[b], st_bar.at[0])
            plgpu.barrier_wait(in_bar.at[0])

        # 2. The step of head h, row by row.
        with jax.named_scope("step"):
            a = -jnp.exp(hp_s[0, h])
            dskip, dt_bias = hp_s[1, h], hp_s[2, h]
            cw_x = [plgpu.load(cwx_s.at[i], layout=ROW).astype(f32) for i in range(k)]
            cw_b = [plgpu.load(cwbc_s.at[i, pl.ds(0, s)], layout=COL).astype(f32) for i in range(k)]
            cw_c = [plgpu.load(cwbc_s.at[i, pl.ds(s, s)], layout=COL).astype(f32) for i in range(k)]
            cb_x = plgpu.load(cbx_s, layout=ROW).astype(f32)
            cb_b = plgpu.load(cbbc_s.at[pl.ds(0, s)], layout=COL).astype(f32)
            cb_c = plgpu.load(cbbc_s.at[pl.ds(s, s)], layout=COL).astype(f32)
            plgpu.barrier_wait(st_bar.at[0])
            gs = []
            for b in range(bsz):
                u = u_s[b]
                inv = jax.lax.rsqrt(jnp.sum(u * u) / d + norm_eps)  # the input norm's 1/rms (folded into in_proj)
                scaled = lambda v, inv=inv: (v.astype(f32) * inv).astype(cdt).astype(f32)  # noqa: E731  (`_scaled_cols`)

                def conv(new, ring, weights, bias, layout):
                    acc = bias + new * weights[taps]
                    for i in range(taps):  # tap i reads the input i + 1 slots after the one written now
                        acc = acc + plgpu.load(ring.at[(slot + 1 + i) % k], layout=layout).astype(f32) * weights[i]
                    return _silu(acc.astype(cdt).astype(f32)).astype(cdt).astype(f32)

                x_new = scaled(plgpu.load(x_s.at[b], layout=ROW))
                b_new = scaled(plgpu.load(bc_s.at[b, pl.ds(0, s)], layout=COL))
                c_new = scaled(plgpu.load(bc_s.at[b, pl.ds(s, s)], layout=COL))
                x = conv(x_new, rx_s.at[b], cw_x, cb_x, ROW)
                bv = conv(b_new, rbc_s.at[b, :, pl.ds(0, s)], cw_b, cb_b, COL)
                cv = conv(c_new, rbc_s.at[b, :, pl.ds(s, s)], cw_c, cb_c, COL)
                dt = _softplus((dt_s[b, dt_cols - r_heads + r].astype(f32) * inv).astype(cdt).astype(f32) + dt_bias)
                lo, hi = dt_limit
                if lo > 0.0 or hi != float("inf"):
                    dt = jnp.clip(dt, lo, hi)
                state = plgpu.load(st_s.at[b], layout=plgpu.Layout.WGMMA).astype(f32)
                state = state * jnp.exp(dt * a) + row_p(dt * x) * col_s(bv)
                y = jnp.sum(state * col_s(cv), axis=1) + x * dskip
                z = scaled(plgpu.load(z_s.at[b], layout=ROW))
                gated = y.astype(cdt).astype(f32) * _silu(z)
                gs.append(gated.astype(cdt).astype(f32))  # out_proj's input, as the GEMV path rounds it
                st_s.at[b][...] = state.astype(sdt)  # the new state, over the old (read above)
                ss_s.at[b][...] = gated * gated
                newx_s.at[b][...] = x_new.astype(rdt)
                newbc_s.at[b, pl.ds(0, s)][...] = b_new.astype(rdt)
                newbc_s.at[b, pl.ds(s, s)][...] = c_new.astype(rdt)
            plgpu.commit_smem()

        @pl.when(first)
        def _():
            for b in range(bsz):
                plgpu.copy_smem_to_gmem(st_s.at[b], ssm_ref.at[1 - cur, b, h])
                plgpu.copy_smem_to_gmem(newx_s.at[b], ring_ref.at[b, slot, grp, pl.ds(ch, p)])
                plgpu.copy_smem_to_gmem(ss_s.at[b], ss_ref.at[b, h])

        @pl.when(first & (r == 0))  # B and C are the group's: its first head's program writes their inputs
        def _():
            for b in range(bsz):
                plgpu.copy_smem_to_gmem(newbc_s.at[b], ring_ref.at[b, slot, grp, pl.ds(rp, 2 * s)])

        # 3. g into every weight tile as it lands: Σ over the tile's P rows, one float32 partial per column.
        with jax.named_scope("gemv"):
            for i in range(nt):
                plgpu.barrier_wait(w_bar.at[i])
                w = plgpu.load(w_s.at[i], layout=plgpu.Layout.WGMMA).astype(f32)
                for b in range(bsz):
                    out_s.at[i, b][...] = jnp.sum(w * jax.lax.broadcast_in_dim(gs[b], (p, bc), (0,)), axis=0)
                plgpu.commit_smem()
                for b in range(bsz):
                    plgpu.copy_smem_to_gmem(out_s.at[i, b], part_ref.at[h, b, pl.ds((t * nt + i) * bc, bc)])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        plgpu.SMEM((nt, p, bc), wdt, transforms=_swizzle(bc, wdt)),
        plgpu.SMEM((bsz, p, s), sdt, transforms=_swizzle(s, sdt)),
        plgpu.SMEM((bsz, p), cdt),
        plgpu.SMEM((bsz, p), cdt),
        plgpu.SMEM((bsz, 2 * s), cdt),
        plgpu.SMEM((bsz, dt_cols), cdt),
        plgpu.SMEM((bsz, k, p), rdt),
        plgpu.SMEM((bsz, k, 2 * s), rdt),
        plgpu.SMEM((k, p), cwdt),
        plgpu.SMEM((k, 2 * s), cwdt),
        plgpu.SMEM((p,), cbdt),
        plgpu.SMEM((2 * s,), cbdt),
        plgpu.SMEM((3, hpad), jnp.float32),
        plgpu.SMEM((bsz, d_rows, 256), jnp.float32),
        plgpu.SMEM((TMA_BYTES // 4,), jnp.int32),
        plgpu.SMEM((nt, bsz, bc), jnp.float32),
        plgpu.SMEM((bsz, p), rdt),
        plgpu.SMEM((bsz, 2 * s), rdt),
        plgpu.SMEM((bsz, p), jnp.float32),
    ]
    scratch += [
        plgpu.Barrier(num_barriers=nt),  # one per weight tile
        plgpu.Barrier(num_arrivals=7 * bsz + 5, num_barriers=1),  # the step's inputs
        plgpu.Barrier(num_barriers=1),  # the position's slots
        plgpu.Barrier(num_arrivals=bsz, num_barriers=1),  # the states
    ]
    return plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((heads, bsz, n), jnp.float32),
            jax.ShapeDtypeStruct((bsz, heads, p), jnp.float32),
        ),
        grid=(heads, nr),
        grid_names=("h", "t"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret,
    )


def step_out_unsupported(batch: int, p: int, s: int, n: int, ranges: int, bc: int) -> str | None:
    """Why `ssm_step_out` cannot run these shapes, or None."""
    if batch > MAX_BATCH:
        return f"batch {batch} > {MAX_BATCH}"
    if p != 64 or s % 32 or s > 128:
        return f"head dim {p} / state size {s} (needs 64 / a multiple of 32 up to 128)"
    if bc not in (64, 128, 256) or n % (ranges * bc):
        return f"{n} output columns in {ranges} ranges of {bc}-wide tiles"
    return None


@functools.partial(jax.jit, static_argnames=("heads", "dt_limit", "norm_eps", "ranges", "block_c"))
def ssm_step_out(
    zx_BGW, conv_BKGF, conv_w_KGF, conv_b_GF, ssm_2BHPS, A_log_H, D_H, dt_bias_H, pos, norm_in_BD, w_FN, *,
    heads, dt_limit, norm_eps=0.0, ranges=5, block_c=256,
):  # fmt: skip
    """One decode step of a Mamba2 mixer after in_proj and its out_proj, for the token at `pos`: as
    `kernels.decode.ssm_step` (same arguments; `norm_in` the raw residual whose input-norm weight was folded
    into in_proj) followed by g @ w_FN, w_FN out_proj's weight (H·P, N) with the gated norm's weight folded
    in (one norm group). The state is double-buffered, (2, B, H, P, S) (`state_slots`), and like the conv ring
    updated in place (donate both under jit).

    Returns (float32 partial products (H, B, N) whose sum over heads is g @ w_FN, g = y · SiLU(z) rounded to
    the compute dtype — `gated_norm_residual(layout="SBD")` sums them; g² (B, H, P) float32 for the gated
    norm; the conv ring; the state)."""
    bsz, k, g, f = conv_BKGF.shape
    two, _, _, p, s = ssm_2BHPS.shape
    fn, n = w_FN.shape
    r_heads = heads // g
    why = step_out_unsupported(bsz, p, s, n, ranges, block_c)
    if why or two != 2 or fn != heads * p or f != r_heads * p + 2 * s:
        raise ValueError(
            f"ssm_step_out: {why or 'shapes'}: state {ssm_2BHPS.shape} (needs (2, B, H, P, S): state_slots), "
            f"out_proj {w_FN.shape} for {heads} heads of {p}, conv ring {conv_BKGF.shape}."
        )
    interpret = None if jax.default_backend() == "gpu" else plgpu.InterpretGPUParams()
    # dt's R columns end the group's columns: read the last dt_cols, a whole number of 128-byte rows.
    dt_cols = -(-r_heads // 64) * 64
    if norm_in_BD is None:  # no input norm: rsqrt(1² / 1 + 0) = 1
        norm_in_BD, norm_eps = jnp.ones((bsz, 1), jnp.float32), 0.0
    d = norm_in_BD.shape[-1]
    d_rows = -(-d // 256)  # copies move at most 256 elements per dimension: the row as (d_rows, 256), zero-padded
    u = jnp.pad(norm_in_BD.astype(jnp.float32), ((0, 0), (0, d_rows * 256 - d))).reshape(bsz, d_rows, 256)
    hpad = -(-heads // 32) * 32
    hp = jnp.pad(jnp.stack([A_log_H, D_H, dt_bias_H]).astype(jnp.float32), ((0, 0), (0, hpad - heads)))
    pos = jnp.asarray(pos, jnp.int32)
    slots = jnp.zeros((TMA_BYTES // 4,), jnp.int32).at[0].set(pos % k).at[1].set(pos % 2)
    dtypes = tuple(jnp.dtype(a.dtype) for a in (zx_BGW, ssm_2BHPS, w_FN, conv_BKGF, conv_w_KGF, conv_b_GF))
    call = _build(bsz, g, r_heads, p, s, k - 1, n, d_rows, d, ranges, block_c, dt_cols, hpad, dtypes,
                  tuple(dt_limit), norm_eps, interpret)  # fmt: skip
    ring, state = jax.new_ref(conv_BKGF), jax.new_ref(ssm_2BHPS)  # written in place by the kernel
    parts, ss = call(zx_BGW, ring, conv_w_KGF, conv_b_GF, state, hp, u, slots, w_FN)
    return parts, ss, jax.freeze(ring), jax.freeze(state)
