"""Fused one-token decode kernels of the Mamba2 layer (Pallas, Triton backend).

A decode step of Mamba2-2.7B at batch 1 is two weight streams per layer (in_proj 54 MB, out_proj 26 MB) and
a few kilobytes of everything else; XLA runs that everything else as ≈ 11 small kernels per layer (input
norm, conv, dt, state update, y, gated norm, residual), ≈ 16 µs per layer, a third of the step
(benchmarks/results/decode_profile_mamba2_2_7b_b1_h100.json). What `Mamba2Mixer._decode_fused` runs
instead, with the norms' weights folded into the projections (`mamba_jax.inference.fold`):

  XLA: in_proj GEMV on the raw residual, rounded to bf16 by the block before (`gated_norm_residual`'s copy) →
  `ssm_step`   1/rms of the input norm + conv (a ring of K inputs, updated in place) + SiLU + dt (bias,
               softplus, limit) + state update (in place) + y + D skip + SiLU(z) gate + Σ g² for the gated
               norm; one program per (row, head, block of state rows) →
  XLA: out_proj GEMV on the gated, unnormalised y →
  `gated_norm_residual`  the gated norm's 1/rms on out_proj's output + the residual add, and the new
               residual rounded to bf16 for the next block's in_proj (no XLA cast kernel between blocks).

From batch SPLIT_K_MIN_BATCH on, out_proj runs as float32 split-K partials of one batched GEMM
(`split_k_partials`) that `gated_norm_residual` sums: a 2.7B out_proj at batch 32 has only 20 column tiles
of output, too few to keep the SMs streaming its weight (+3 % tokens/s at batch 32).

From batch SPLIT_MIN_BATCH on, `ssm_step(split=True)` runs the step as two launches: the conv of every
channel and the 1/rms once per row (`ssm_step_prep`), then the state update alone (`ssm_step_update`). At
large batch the step is the state's read and write (84 MB per 2.7B layer at batch 32), and in one launch
the conv work in front of every program's state read held it to ≈ 2.0 TB/s (+7.6 % tokens/s at batch 32
split, benchmarks/README.md).

With the split step the state may also be written back only every W tokens (`window`; opt-in for now,
see STATE_WINDOW):
the state h₀ stays as it was at the window's start, and each step keeps its token's x, B and dt in a
W-slot buffer, so the state after j + 1 tokens of the window is
    h = exp(A Σᵢ dtᵢ) h₀ + Σᵢ exp(A Σ_{m>i} dtₘ) dtᵢ xᵢ Bᵢᵀ   (i, m ≤ j),
and y = C h needs only C·h₀ (one read of the state) plus W small terms (Bᵢ·C) xᵢ; the last step of a
window writes h. At large batch the state dominates a step's bytes (a 2.7B layer at batch 32: 42 MB of
bf16 state against 80 MB of weights), and this halves its traffic, less the buffer (W/N of it) and the
write-back (1/W). Same function: the state is rounded to its dtype every W tokens instead of every token.

At batch ≤ PREFETCH_MAX_BATCH the step kernel is latency-bound and the memory bus sits idle while it runs,
so one more row of its programs reads the first PREFETCH_FRACTION of out_proj's weight into L2 (evict_last
loads, summed into a dummy output); out_proj then finds that part in L2. Measured +1.5–2 % tokens/s at
batch 1 for the 2.7B (benchmarks/README.md); the environment variable MAMBA_JAX_DECODE_PREFETCH overrides
the fraction at trace time, for tuning.

Opt-in (MAMBA_JAX_DECODE_GEMV=mosaic): out_proj as `kernels.gemv.gemv_t` with programmatic dependent
launch; the step kernel then writes g padded to 8 rows (`g_rows`) and signals launch_dependents first thing
(`trigger`), and `gated_norm_residual` sums the GEMV's split-K partials (layout "SDB"). Slower than XLA's
GEMV in the decode loop (kernels/gemv.py says why).

Opt-in (MAMBA_JAX_DECODE_GEMM="in,out"): in_proj / out_proj as the CUDA skinny GEMM of
`kernels/skinny_gemm.py` (an XLA FFI call; with K splits its float32 partials summed by the step / residual
kernels, which then signal launch_dependents for it). Slower than XLA's GEMMs in the decode loop (above).

The normed GEMV tried first (the norm fused in front of a GEMV) is `kernels/norm_gemv.py`: slower than XLA's
GEMV, kept as a benchmark baseline.

Rounding follows the XLA decode path (`Mamba2Mixer.decode`): the in_proj output, conv output, x / B / C, y
and out_proj's output are rounded to the compute dtype where that path rounds them, so both paths agree to
float32 summation order (and, with folded norms, the bf16 rounding of the folded weights). Off the GPU the
kernels run in Pallas interpret mode (tests, CI).

Dimension key: B batch, K reduction (in features), N out features, G groups, H heads, R heads per group,
P head dim, S state size, F conv channels per group, W in_proj columns per group, C conv taps − 1.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.triton as plt
import jax.numpy as jnp

PREFETCH_FRACTION = 0.3  # of out_proj's weight: 0.15–0.3 best at batch 1 (2.7B, H100); ≥ 0.45 slower
PREFETCH_MAX_BATCH = 4  # above it the step kernel moves enough state to keep the bus busy itself
# From this batch on the step runs as two launches (`ssm_step(split=True)`, 32 state rows per program):
# 2.7B, H100: +5.8 % tokens/s at batch 8, +7.6 % at 32 (+1.3 % more with 32 rows); below 8 not measured.
SPLIT_MIN_BATCH = 8
# From this batch on in_proj / out_proj run as IN_SPLITS / OUT_SPLITS float32 split-K partials (1: XLA's GEMM);
# the same batch from which the Engine compiles the loop with cuBLAS GEMMs (engine.CUBLAS_MIN_BATCH).
# 2.7B batch 32, H100: out_proj in 2 splits +3.0 % tokens/s (4: +2.2 %, 8: +1.9 %), in_proj in 2 −3.2 %.
SPLIT_K_MIN_BATCH = 16
IN_SPLITS = 1
OUT_SPLITS = 2
# With the step in two launches, the state may be written back every W tokens rather than every token
# (`ssm_step(window=…)`): between write-backs each step reads the state once and adds the window's tokens
# from a small buffer. 2.7B at batch 32: 84 → ≈ 50 MB of state traffic per layer and step (bf16 states, W 8).
# On from batch 32 with the CUDA update of kernels/ssm_update.py: 2.7B batch 32 on an H100 7,670 tok/s with
# it (benchmarks/results/decode_variants_window_regs_coalesced_2_7b_b32_h100.json) where the per-token write
# made 6,717 (decode_variants_cuda_window_2_7b_b32_h100.json, the same day);
# the Pallas update with the window was 19 % slower (5,382 against 6,637), so where the CUDA kernel cannot run
# (`ssm_update.unsupported`) the window is off. Batches 8–31 not measured: off there.
# MAMBA_JAX_DECODE_WINDOW=W sets it at trace time (benchmarks/README.md, "State write-back window").
STATE_WINDOW = 8
WINDOW_MIN_BATCH = 32
# The CUDA window update under programmatic dependent launch: 1, its state stream (loads overlapping the
# coefficient launch); 2, its coefficient launch too (window loads overlapping the prep kernel, which then
# triggers first thing). With the earlier kernels 2 measured slower (6,852 against 6,929 tok/s, 2.7B batch 32,
# results/decode_variants_cuda_window_v2_2_7b_b32_h100.json); with the current ones 1 read 7,656 against 7,567
# (results/decode_variants_window_pdl_2_7b_b32_h100.json) and 7,769 against 7,703
# (decode_variants_window_pdl_fused_2_7b_b32_h100.json) in two H100 runs: 1.
WINDOW_PDL = 1
# The projections as the CUDA skinny GEMM (`kernels/skinny_gemm.py`: every SM streams its share of the weight
# through a ring of TMA copies) from this batch on, with these (in_proj, out_proj) K splits; 0 keeps XLA's.
# Off: on an H100 the 2.7B at batch 32 decoded 5,481 tok/s with it against 6,627 with XLA's GEMMs
# (benchmarks/results/decode_variants_skinny_2_7b_b32_h100.json); alone it streams ≈ 2.2 TB/s at best.
CUDA_GEMM_MIN_BATCH = 1 << 30
CUDA_GEMM = (1, 2)
PREFETCH_BLOCK = 8192  # elements per load of the L2 prefetch (16 KB of bf16 per program and load)


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _launch_dependents(v):
    """`v` (an int32 block), after `griddepcontrol.launch_dependents`: a kernel launched behind this one with
    programmatic dependent launch (`kernels.gemv.gemv_t(pdl=True)`) may start once every program of this
    one has passed here (it still waits for this kernel to finish before it reads what this one writes).
    The instruction goes through a value the kernel uses, so the compiler keeps it; off the GPU it is the
    identity."""
    if _interpret():
        return v
    [out] = plt.elementwise_inline_asm(
        "griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;",
        args=[v],
        constraints="=r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.int32)],
    )
    return out


# --- the SSM step -----------------------------------------------------------------------------------------
def _softplus(x):
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _silu(x):
    return x / (1.0 + jnp.exp(-x))


def _prefetch(i, pf_ref, out_ref, *, chunk, total, trigger):
    """Reads program `i`'s `chunk` elements of `pf_ref` (flat) into L2 with evict_last, so the GEMV that
    follows finds them there; the sum goes to a dummy output so the loads are not dead code."""
    acc = jnp.zeros((), jnp.float32)
    lanes = jnp.arange(min(PREFETCH_BLOCK, chunk))
    lanes = _launch_dependents(lanes) if trigger else lanes
    for part in range(0, chunk, PREFETCH_BLOCK):  # unrolled: the loads are independent, all in flight
        idx = i * chunk + part + lanes
        v = plt.load(pf_ref.at[pl.ds(i * chunk + part, min(PREFETCH_BLOCK, chunk))], mask=idx < total, other=0.0,
                     eviction_policy="evict_last")  # fmt: skip
        acc = acc + jnp.sum(v.astype(jnp.float32))
    out_ref[pl.ds(i, 1)] = jnp.full((1,), acc)


def prefetch_elems(batch: int, weight_elems: int) -> int:
    """How much of out_proj's weight `Mamba2Mixer._decode_fused` has the step kernel prefetch into L2."""
    frac = float(os.environ.get("MAMBA_JAX_DECODE_PREFETCH", PREFETCH_FRACTION))
    return int(frac * weight_elems) if batch <= PREFETCH_MAX_BATCH else 0


def _env_ints(name: str, count: int, what: str) -> tuple[int, ...] | None:
    """The `count` comma-separated integers of the environment variable `name` (a tuning knob read at trace
    time), or None where it is unset; anything else is an error that says what to give (`what`)."""
    env = os.environ.get(name)
    if not env:
        return None
    try:
        values = tuple(int(v) for v in env.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ValueError(f"{name}={env!r}: give {what}")
    return values


def step_config(batch: int, heads_per_group: int, head_dim: int) -> dict:
    """The step kernel's launch shape for `Mamba2Mixer._decode_fused` at this batch: heads_per_program,
    block_p (None: `ssm_step`'s default; 32 state rows, or the whole head below that, when split), warps and
    split. MAMBA_JAX_DECODE_STEP="hp,bp,warps,split"
    overrides it at trace time, for tuning (benchmarks/decode_variants.py): 0 for hp, bp or warps means the
    default; split is 0 (one launch) or 1 (two)."""
    split = batch >= SPLIT_MIN_BATCH
    conf = {"heads_per_program": 1, "block_p": min(32, head_dim) if split else None, "warps": 4, "split": split}
    if env := _env_ints("MAMBA_JAX_DECODE_STEP", 4, "four integers hp,bp,warps,split (e.g. 1,0,4,1)"):
        hp, bp, warps, split = env
        conf = {"heads_per_program": hp or 1, "block_p": bp or None, "warps": warps or 4, "split": bool(split)}
    if heads_per_group % conf["heads_per_program"]:
        conf["heads_per_program"] = 1
    return conf


def _step_kernel(*refs, has_prefetch, pf_chunk, pf_total, nj, bsz, trigger, **kw):
    # Program ids are read here, outside the branches (the interpreter cannot lower them inside a cond).
    # h: which block of `hp` heads; j: which `bp` rows of their state (more, smaller programs at small batch).
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kw["trigger"] = trigger
    if not has_prefetch:
        return _step_body(b, h, j, *refs, **kw)
    pf_ref, pf_out_ref = refs[10], refs[-1]  # the last input and the last output
    refs = refs[:10] + refs[11:-1]
    # One extra row of programs (b == bsz): the prefetchers.

    @pl.when(b == bsz)
    def _():
        _prefetch(h * nj + j, pf_ref, pf_out_ref, chunk=pf_chunk, total=pf_total, trigger=trigger)

    @pl.when(b < bsz)
    def _():
        _step_body(b, h, j, *refs, **kw)


def _inv_rms(u_ref, b, norm_eps, trigger):
    """The input RMSNorm's 1/rms of row b when its weight was folded into in_proj (`fold_norm_weights`):
    in_proj ran on the raw residual, so every column is scaled by it and rounded as the unfolded path
    rounds it. Each program sums the row's squares itself (a few KB from L2) rather than waiting on an XLA
    reduce. With `trigger` this is the first load, after `launch_dependents`: the out_proj GEMV behind the
    kernel starts filling its weight ring now."""
    d = u_ref.shape[1]
    dp = pl.next_power_of_2(d)
    cols = _launch_dependents(jnp.arange(dp)) if trigger else jnp.arange(dp)
    u = plt.load(u_ref.at[pl.ds(b, 1), pl.ds(0, dp)], mask=(cols < d)[None, :], other=0.0).astype(jnp.float32)
    return jax.lax.rsqrt(jnp.sum(u * u) / d + norm_eps)


def _scaled_cols(zx_ref, b, grp, scale, cdtype):
    """`zx(col, width)`: in_proj's output columns of row b and group grp times the input norm's 1/rms,
    rounded to the compute dtype as the unfolded path rounds them. With zx as float32 split-K partials
    (S, B, G, W) the columns are their sum, first rounded to the compute dtype as a GEMM's output rounds."""
    if len(zx_ref.shape) == 4:

        def raw(col, width):
            acc = zx_ref[0, b, grp, pl.ds(col, width)]
            for si in range(1, zx_ref.shape[0]):
                acc = acc + zx_ref[si, b, grp, pl.ds(col, width)]
            return acc.astype(cdtype)

    else:
        raw = lambda col, width: zx_ref[b, grp, pl.ds(col, width)]  # noqa: E731
    return lambda col, width: (raw(col, width).astype(jnp.float32) * scale).astype(cdtype)


def _conv(zx, conv_ref, cw_ref, cb_ref, b, grp, slot, col, ch, width, *, taps, cdtype):
    """Causal conv of `width` channels (from `ch`; in_proj column `col`, read by `zx`: `_scaled_cols`) over
    the cached window and the new input, + bias, SiLU; returns (the output, the new input for the ring).
    The conv window is a ring of K = taps + 1 inputs indexed by position mod K: the new input goes to
    `slot` (which held the input K steps back, no longer read) and tap t reads slot + 1 + t. Every program
    then reads only slots no program writes, so the ring is updated in place (aliased)."""
    f32 = jnp.float32
    new = zx(col, width)
    tap = lambda t: cw_ref[t, grp, pl.ds(ch, width)].astype(f32)  # noqa: E731
    acc = cb_ref[grp, pl.ds(ch, width)].astype(f32) + new.astype(f32) * tap(taps)
    for t in range(taps):
        acc = acc + conv_ref[b, (slot + 1 + t) % (taps + 1), grp, pl.ds(ch, width)].astype(f32) * tap(t)
    return _silu(acc.astype(cdtype).astype(f32)).astype(cdtype).astype(f32), new


def _head(b, h, j, state, x, bv, cv, zx, alog_ref, d_ref, dtb_ref, g_ref, ss_ref, ssm_out_ref, *, r_heads, p, bp,
          s, dt_limit, cdtype):  # fmt: skip
    """The state update, y, D skip and SiLU(z) gate of `bp` rows (block j) of head h, from its state rows
    (float32), conv output x and the group's B, C; `zx(col, width)` reads scaled in_proj columns."""
    f32 = jnp.float32
    r = h % r_heads
    p0 = j * bp
    dt = _dt(zx, dtb_ref, h, r, r_heads, p, s, dt_limit)
    a = -jnp.exp(jnp.sum(alog_ref[pl.ds(h, 1)].astype(f32)))
    state = state * jnp.exp(dt * a) + (dt * x)[:, None] * bv[None, :]
    ssm_out_ref[b, h, pl.ds(p0, bp)] = state.astype(ssm_out_ref.dtype)  # aliased with ssm_ref: in place
    y = jnp.sum(state * cv[None, :], axis=1) + x * jnp.sum(d_ref[pl.ds(h, 1)].astype(f32))
    _gate(b, h, j, y, zx, g_ref, ss_ref, r=r, p=p, bp=bp, cdtype=cdtype)


def _gate(b, h, j, y, zx, g_ref, ss_ref, *, r, p, bp, cdtype):
    """y · SiLU(z) of rows block j of head h (r-th of its group) into g, and Σ g² for the gated norm."""
    f32 = jnp.float32
    gated = y.astype(cdtype).astype(f32) * _silu(zx(r * p + j * bp, bp).astype(f32))
    g_ref[b, pl.ds(h * p + j * bp, bp)] = gated.astype(g_ref.dtype)
    ss_ref[b, h, pl.ds(j, 1)] = jnp.sum(gated * gated, keepdims=True)  # the gated norm's statistics


def _step_body(
    b, hb, j, zx_ref, conv_ref, cw_ref, cb_ref, ssm_ref, alog_ref, d_ref, dtb_ref, u_ref, slot_ref,
    g_ref, ss_ref, conv_out_ref, ssm_out_ref, *, r_heads, hp, p, bp, s, taps, dt_limit, norm_eps, cdtype, trigger,
):  # fmt: skip
    # `hp` heads of one group per program (`hb`-th block of them): the input norm's 1/rms and the group's
    # B and C convs are computed once for all of them.
    h0 = hb * hp
    grp = h0 // r_heads
    rp = r_heads * p
    # in_proj columns of a group: [z (R·P) | x (R·P) | B (S) | C (S) | dt (R)]; conv channels: [x | B | C].
    scale = _inv_rms(u_ref, b, norm_eps, trigger)
    slot = jnp.sum(slot_ref[...])
    zx = _scaled_cols(zx_ref, b, grp, scale, cdtype)
    conv = functools.partial(_conv, zx, conv_ref, cw_ref, cb_ref, b, grp, slot, taps=taps, cdtype=cdtype)
    for i in range(hp):  # unrolled
        h = h0 + i
        ch_x = (h % r_heads) * p + j * bp
        x, x_win = conv(rp + ch_x, ch_x, bp)
        if i == 0:
            bv, b_win = conv(2 * rp, rp, s)
            cv, c_win = conv(2 * rp + s, rp + s, s)
        state = ssm_ref[b, h, pl.ds(j * bp, bp)].astype(jnp.float32)
        _head(b, h, j, state, x, bv, cv, zx, alog_ref, d_ref, dtb_ref, g_ref, ss_ref, ssm_out_ref, r_heads=r_heads,
              p=p, bp=bp, s=s, dt_limit=dt_limit, cdtype=cdtype)  # fmt: skip
        conv_out_ref[b, slot, grp, pl.ds(ch_x, bp)] = x_win.astype(conv_out_ref.dtype)

    @pl.when((h0 % r_heads == 0) & (j == 0))  # B and C are shared by a group's heads: its first program writes them
    def _():
        conv_out_ref[b, slot, grp, pl.ds(rp, s)] = b_win.astype(conv_out_ref.dtype)
        conv_out_ref[b, slot, grp, pl.ds(rp + s, s)] = c_win.astype(conv_out_ref.dtype)


# The step in two launches (`ssm_step(split=True)`, for large batches): `_prep_kernel` runs the conv once
# per channel (and the 1/rms once per row), `_update_kernel` only the state update of `_head`. In one
# launch every program also does that small, latency-bound work in front of its state read, and the state
# traffic runs at ≈ 2.0 TB/s against ≈ 2.6 for the update alone (benchmarks/state_probe.py).
def _prep_kernel(zx_ref, conv_ref, cw_ref, cb_ref, u_ref, slot_ref, xbc_ref, scale_ref, conv_out_ref, *, rp, bc,
                 taps, norm_eps, cdtype, trigger):  # fmt: skip
    b, grp, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    scale = _inv_rms(u_ref, b, norm_eps, trigger)
    slot = jnp.sum(slot_ref[...])
    ch = c * bc
    zx = _scaled_cols(zx_ref, b, grp, scale, cdtype)
    out, new = _conv(zx, conv_ref, cw_ref, cb_ref, b, grp, slot, rp + ch, ch, bc, taps=taps, cdtype=cdtype)
    xbc_ref[b, grp, pl.ds(ch, bc)] = out.astype(xbc_ref.dtype)
    conv_out_ref[b, slot, grp, pl.ds(ch, bc)] = new.astype(conv_out_ref.dtype)

    @pl.when((grp == 0) & (c == 0))
    def _():
        scale_ref[pl.ds(b, 1)] = jnp.full((1,), scale)


def _update_kernel(*refs, r_heads, hp, p, bp, s, nwin, dt_limit, cdtype, trigger):
    b, hb, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    if nwin:  # inputs: 7 + (slot, x, B, dt); outputs: g, ss, state + (x, B, dt)
        zx_ref, xbc_ref, scale_ref, ssm_ref, alog_ref, d_ref, dtb_ref, wslot_ref, *win_in = refs[:11]
        g_ref, ss_ref, ssm_out_ref, *win_out = refs[11:]
    else:
        zx_ref, xbc_ref, scale_ref, ssm_ref, alog_ref, d_ref, dtb_ref, g_ref, ss_ref, ssm_out_ref = refs
    h0 = hb * hp
    grp = h0 // r_heads
    rp = r_heads * p
    f32 = jnp.float32
    rows = pl.ds(j * bp, bp)
    states = [ssm_ref[b, h0 + i, rows] for i in range(hp)]  # the state reads first: nothing they wait on
    lanes = _launch_dependents(jnp.arange(bp)) if trigger else jnp.arange(bp)
    scale = jnp.sum(scale_ref[pl.ds(b, 1)])
    zx = _scaled_cols(zx_ref, b, grp, scale, cdtype)
    bv = xbc_ref[b, grp, pl.ds(rp, s)].astype(f32)
    cv = xbc_ref[b, grp, pl.ds(rp + s, s)].astype(f32)
    if nwin:
        wj = jnp.sum(wslot_ref[...])  # this token's slot in the window

        @pl.when((h0 % r_heads == 0) & (j == 0))  # B is the group's: its first program keeps it
        def _():
            win_out[1][b, wj, grp, :] = bv.astype(win_out[1].dtype)

    for i in range(hp):
        h = h0 + i
        x_ref = xbc_ref.at[b, grp, pl.ds((h % r_heads) * p + j * bp, bp)]
        x = plt.load(x_ref, mask=lanes < bp, other=0.0).astype(f32)
        if nwin:
            _head_windowed(b, h, j, states[i].astype(f32), x, bv, cv, zx, alog_ref, d_ref, dtb_ref, g_ref, ss_ref,
                           ssm_out_ref, wj, win_in, win_out, r_heads=r_heads, p=p, bp=bp, nwin=nwin,
                           dt_limit=dt_limit, cdtype=cdtype)  # fmt: skip
        else:
            _head(b, h, j, states[i].astype(f32), x, bv, cv, zx, alog_ref, d_ref, dtb_ref, g_ref, ss_ref,
                  ssm_out_ref, r_heads=r_heads, p=p, bp=bp, s=s, dt_limit=dt_limit, cdtype=cdtype)  # fmt: skip


def _dt(zx, dtb_ref, h, r, r_heads, p, s, dt_limit):
    """dt of head h (r-th of its group) from in_proj's column: softplus(dt + bias), clamped to dt_limit."""
    f32 = jnp.float32
    dt = jnp.sum(zx(2 * r_heads * p + 2 * s + r, 1).astype(f32)) + jnp.sum(dtb_ref[pl.ds(h, 1)].astype(f32))
    dt = _softplus(dt)
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = jnp.clip(dt, lo, hi)
    return dt


def _head_windowed(b, h, j, state, x, bv, cv, zx, alog_ref, d_ref, dtb_ref, g_ref, ss_ref, ssm_out_ref, wj, win_in,
                   win_out, *, r_heads, p, bp, nwin, dt_limit, cdtype):  # fmt: skip
    """`_head` with the state written back once per window (module docstring): h₀ = `state` (rows of block j)
    as of the window's start, slots 0 … wj − 1 of the window buffers (x (B, W, H, P), B (B, W, G, S), dt
    (B, W, H) float32) this window's earlier tokens, slot wj this token's (written here; read from
    registers, as the write of another program may not have landed). The last slot writes h back."""
    f32 = jnp.float32
    wx_ref, wb_ref, wdt_ref = win_in
    wx_out, _, wdt_out = win_out
    r, grp = h % r_heads, h // r_heads
    p0 = j * bp
    s = bv.shape[0]
    dt = _dt(zx, dtb_ref, h, r, r_heads, p, s, dt_limit)
    a = -jnp.exp(jnp.sum(alog_ref[pl.ds(h, 1)].astype(f32)))
    wx_out[b, wj, h, pl.ds(p0, bp)] = x.astype(wx_out.dtype)

    @pl.when(j == 0)
    def _():
        wdt_out[b, wj, pl.ds(h, 1)] = jnp.full((1,), dt, wdt_out.dtype)

    # Slot i's token: where i > wj, dt = 0 (a slot of a later token, or of the last window): it adds nothing
    # and decays nothing.
    xs, bs, dts = [], [], []
    for i in range(nwin):  # unrolled: W small loads, all independent
        now, later = i == wj, i > wj
        xs.append(jnp.where(now, x, wx_ref[b, i, h, pl.ds(p0, bp)].astype(f32)))
        bs.append(jnp.where(now, bv, wb_ref[b, i, grp, :].astype(f32)))
        dt_i = jnp.where(now, dt, jnp.sum(wdt_ref[b, i, pl.ds(h, 1)]))
        dts.append(jnp.where(later, 0.0, dt_i))
    # decay from slot i's token to this one: exp(A Σ_{m > i} dtₘ); from the window's start: exp(A Σ dt)
    decays, tail = [None] * nwin, jnp.zeros((), f32)
    for i in reversed(range(nwin)):
        decays[i] = jnp.exp(a * tail)
        tail = tail + dts[i]
    start_decay = jnp.exp(a * tail)
    weights = [decays[i] * dts[i] for i in range(nwin)]  # the weight of xᵢ Bᵢᵀ in h
    y = start_decay * jnp.sum(state * cv[None, :], axis=1) + x * jnp.sum(d_ref[pl.ds(h, 1)].astype(f32))
    for i in range(nwin):
        y = y + (weights[i] * jnp.sum(bs[i] * cv)) * xs[i]

    @pl.when(wj == nwin - 1)  # the window is full: write the state back
    def _():
        new = start_decay * state
        for i in range(nwin):
            new = new + (weights[i] * xs[i])[:, None] * bs[i][None, :]
        ssm_out_ref[b, h, pl.ds(p0, bp)] = new.astype(ssm_out_ref.dtype)

    _gate(b, h, j, y, zx, g_ref, ss_ref, r=r, p=p, bp=bp, cdtype=cdtype)


def _split_step(zx_BGW, conv_BKGF, conv_w_KGF, conv_b_GF, ssm_BHPS, A_log_H, D_H, dt_bias_H, norm_in_BD, slot,
                window, pos, *, heads, hp, bp, warps, dt_limit, norm_eps, g_dtype, g_rows, trigger,
                cdtype):  # fmt: skip
    bsz, k, g, f = conv_BKGF.shape
    _, _, p, s = ssm_BHPS.shape
    bc = 1024
    while f % bc:  # f = R·P + 2S: a multiple of 16 (ssm_step_unsupported)
        bc //= 2
    nwin = 0 if window is None else window[0].shape[1]
    # With the window, the update as the CUDA kernel of kernels/ssm_update.py where it runs (the Pallas one
    # below elsewhere); under programmatic dependent launch (WINDOW_PDL) its state stream's loads overlap its
    # coefficient launch (1), whose window loads overlap this prep kernel (2: the prep kernel triggers).
    cuda_update = nwin and zx_BGW.ndim == 3 and _cuda_update_unsupported(zx_BGW, ssm_BHPS, A_log_H, D_H, dt_bias_H,
                                                                          g_dtype, nwin, bp) is None  # fmt: skip
    pdl = _window_pdl() if cuda_update else 0
    prep = functools.partial(_prep_kernel, rp=heads // g * p, bc=bc, taps=k - 1, norm_eps=norm_eps, cdtype=cdtype,
                             trigger=pdl >= 2)  # fmt: skip
    xbc_BGF, scale_B, conv = pl.pallas_call(
        prep,
        out_shape=(
            jax.ShapeDtypeStruct((bsz, g, f), cdtype),
            jax.ShapeDtypeStruct((bsz,), jnp.float32),
            jax.ShapeDtypeStruct(conv_BKGF.shape, conv_BKGF.dtype),
        ),
        grid=(bsz, g, f // bc),
        input_output_aliases={1: 2},
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=_interpret(),
        name="ssm_step_prep",
    )(zx_BGW, conv_BKGF, conv_w_KGF, conv_b_GF, norm_in_BD, slot)
    if cuda_update:
        from mamba_jax.kernels.ssm_update import update_window

        g_BF, ss_BHJ, ssm, win = update_window(
            zx_BGW, xbc_BGF, scale_B, ssm_BHPS, A_log_H, D_H, dt_bias_H, pos, window, block_p=bp,
            dt_limit=dt_limit, g_dtype=g_dtype, g_rows=g_rows, pdl=pdl,
        )  # fmt: skip
        return g_BF, ss_BHJ, conv, ssm, win
    update = functools.partial(
        _update_kernel, r_heads=heads // g, hp=hp, p=p, bp=bp, s=s, nwin=nwin, dt_limit=tuple(dt_limit),
        cdtype=cdtype, trigger=trigger,
    )  # fmt: skip
    args = [zx_BGW, xbc_BGF, scale_B, ssm_BHPS, A_log_H, D_H, dt_bias_H]
    out_shape = [
        jax.ShapeDtypeStruct((g_rows, heads * p), g_dtype),
        jax.ShapeDtypeStruct((bsz, heads, p // bp), jnp.float32),
        jax.ShapeDtypeStruct(ssm_BHPS.shape, ssm_BHPS.dtype),
    ]
    aliases = {3: 2}
    if nwin:
        args += [jnp.reshape(jnp.asarray(pos, jnp.int32) % nwin, (1,)), *window]
        out_shape += [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in window]
        aliases.update({8: 3, 9: 4, 10: 5})
    g_BF, ss_BHJ, ssm, *win = pl.pallas_call(
        update,
        out_shape=tuple(out_shape),
        grid=(bsz, heads // hp, p // bp),
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1),
        interpret=_interpret(),
        name="ssm_step_update",
    )(*args)
    if nwin:
        return g_BF, ss_BHJ, conv, ssm, tuple(win)
    return g_BF, ss_BHJ, conv, ssm


def _cuda_update_unsupported(zx_BGW, ssm_BHPS, A_log_H, D_H, dt_bias_H, g_dtype, nwin, bp) -> str | None:
    from mamba_jax.kernels.ssm_update import unsupported

    _, _, p, s = ssm_BHPS.shape
    dtypes = (A_log_H.dtype, D_H.dtype, dt_bias_H.dtype)
    return unsupported(state_dtype=ssm_BHPS.dtype, act_dtype=zx_BGW.dtype, g_dtype=g_dtype, param_dtypes=dtypes,
                       window=nwin, head_dim=p, state_size=s, block_p=bp)  # fmt: skip


def _window_pdl() -> int:
    """How much of the CUDA window update runs under programmatic dependent launch (WINDOW_PDL: 0 none, 1 the
    state stream, 2 the coefficient launch too); MAMBA_JAX_DECODE_WINDOW_PDL=0|1|2 overrides it at trace
    time, for A/B runs."""
    env = os.environ.get("MAMBA_JAX_DECODE_WINDOW_PDL")
    if env is not None and env not in ("0", "1", "2"):
        raise ValueError(f"MAMBA_JAX_DECODE_WINDOW_PDL={env!r}: give 0 (off), 1 (the state stream) or 2 (both)")
    return WINDOW_PDL if env is None else int(env)


def ssm_step_unsupported(p: int, s: int) -> str | None:
    if not (_pow2(p) and _pow2(s) and p >= 16 and s >= 16):
        return f"head dim {p} / state size {s} (the step kernel needs powers of two ≥ 16)"
    return None


@functools.partial(
    jax.jit,
    static_argnames=(
        "heads", "dt_limit", "norm_eps", "g_dtype", "block_p", "heads_per_program", "warps", "prefetch_elems",
        "g_rows", "trigger", "split", "zx_dtype",
    ),
)  # fmt: skip
def ssm_step(
    zx_BGW, conv_BKGF, conv_w_KGF, conv_b_GF, ssm_BHPS, A_log_H, D_H, dt_bias_H, pos, norm_in_BD=None, *,
    heads, dt_limit, norm_eps=0.0, g_dtype=jnp.float32, block_p=None, heads_per_program=1, warps=4, prefetch=None,
    prefetch_elems=0, g_rows=None, trigger=False, split=False, zx_dtype=None, window=None,
):  # fmt: skip
    """One decode step of a Mamba2 mixer after in_proj, for the token at position `pos` (int scalar).

    zx: in_proj output (B, G, W) as [z | x | B | C | dt] per group; with `norm_in` (B, D), in_proj's
    unnormalised input, it is scaled by that input's 1/rms = rsqrt(mean(norm_in²) + norm_eps) (the
    norm's weight folded into in_proj: `mamba_jax.inference.fold`). conv: the conv inputs as a ring of K slots
    (B, K, G, F), the input at position t in slot t mod K (`conv_ring` builds it from the last K − 1);
    updated in place. ssm: the state (B, H, P, S), updated in place. Donate both under jit (aliased).
    One program per (row, `heads_per_program` heads of a group, `block_p` rows of their state); by default
    the largest `block_p` that gives ≈ 512 programs (≥ 16 rows). Several heads per program share the input
    norm's 1/rms and the group's B and C convs, which every program otherwise recomputes (measured no faster
    on the 2.7B: benchmarks/README.md). Returns (g = y · SiLU(z) (B, H·P) in `g_dtype`, the gated norm's
    input; Σ g² (B, H, P / block_p) float32 per head and block of rows, from g before rounding; the conv
    ring; the state).

    `prefetch` (any array, read flat) with `prefetch_elems` > 0: one more row of programs reads its first
    `prefetch_elems` elements into L2 meanwhile (the next GEMV's weight: at small batch this kernel is
    latency-bound and leaves the memory bus idle).

    `g_rows` ≥ B: g gets that many rows (those past B are not written: the padded input of
    `kernels.gemv.gemv_t`, whose output columns each depend on their own row only, with no XLA pad kernel
    between the two). `trigger`: the programs signal `griddepcontrol.launch_dependents` first thing, so a
    GEMV launched behind with `pdl=True` starts streaming its weight while this kernel runs.

    `split`: two launches, the conv of every channel (and the input norm's 1/rms) once per row first, then
    the state update; for large batches, where the state traffic dominates (faster there: benchmarks/README.md).
    Same results.

    zx may also be in_proj's output as float32 split-K partials (S, B, G, W) (`split_k_partials`; the decode
    runs in_proj that way only when MAMBA_JAX_DECODE_SPLITS asks, measured slower): the kernels sum them and
    round the sum to `zx_dtype`, the compute dtype, as the GEMM's own output would be rounded.

    `window` (with `split`): the buffers of the state's write-back window, (x (B, W, H, P), B (B, W, G, S),
    dt (B, W, H) float32) as `state_window` makes them; `ssm` is then the state as of the window's start
    (the last position p with p mod W = W − 1, or the prefill), written back by the step at a position
    ≡ W − 1 mod W (module docstring; `window_state` computes the current state). Returns the buffers
    updated (in place: donate them) as a fifth value."""
    bsz, k, g, _ = conv_BKGF.shape
    _, _, p, s = ssm_BHPS.shape
    reason = ssm_step_unsupported(p, s)
    if reason:
        raise ValueError(f"ssm_step does not support {reason}.")
    if k != conv_w_KGF.shape[0]:
        raise ValueError(f"the conv ring has {k} slots for a {conv_w_KGF.shape[0]}-tap conv (see conv_ring).")
    if zx_BGW.ndim == 4 and zx_dtype is None:
        raise ValueError("ssm_step: zx given as split-K partials (S, B, G, W) needs zx_dtype (the compute dtype).")
    cdtype = jnp.dtype(zx_dtype or zx_BGW.dtype)
    if norm_in_BD is None:  # no input norm: rsqrt(1² / 1 + 0) = 1
        norm_in_BD, norm_eps = jnp.ones((bsz, 1), jnp.float32), 0.0
    # Enough programs to fill the GPU a few times over (at batch 1 a 2.7B layer has only 80 heads).
    hp = heads_per_program
    if hp < 1 or (heads // g) % hp:
        raise ValueError(f"heads_per_program={hp} must divide the {heads // g} heads of a group.")
    bp = block_p or p // min(max(p // 16, 1), pl.next_power_of_2(-(-512 // (bsz * heads // hp))))
    if p % bp or not _pow2(bp) or bp < 16:
        raise ValueError(f"block_p={bp} must be a power of two ≥ 16 dividing the head dim {p}.")
    nj = p // bp
    g_rows = max(g_rows or bsz, bsz)
    slot = jnp.reshape(jnp.asarray(pos, jnp.int32) % k, (1,))
    if split and prefetch_elems:
        raise ValueError("ssm_step(split=True) does not prefetch (its launches are bandwidth-bound already).")
    if window is not None:
        want = state_window(bsz, heads, p, g, s, window[0].shape[1], window[0].dtype, window[1].dtype)
        if not split or [(w.shape, w.dtype) for w in window] != [(w.shape, w.dtype) for w in want]:
            raise ValueError(
                f"ssm_step: window {[(w.shape, w.dtype.name) for w in window]} needs split=True and the "
                "buffers of state_window(batch, heads, head_dim, groups, state_size, W)."
            )
    if split:
        return _split_step(
            zx_BGW, conv_BKGF, conv_w_KGF, conv_b_GF, ssm_BHPS, A_log_H, D_H, dt_bias_H, norm_in_BD, slot,
            window, pos, heads=heads, hp=hp, bp=bp, warps=warps, dt_limit=dt_limit, norm_eps=norm_eps, g_dtype=g_dtype,
            g_rows=g_rows, trigger=trigger, cdtype=cdtype,
        )  # fmt: skip
    pf_elems = min(prefetch_elems, prefetch.size) if prefetch is not None else 0
    pf_chunk = pl.next_power_of_2(-(-pf_elems // (heads // hp * nj))) if pf_elems else 0
    kernel = functools.partial(
        _step_kernel, r_heads=heads // g, hp=hp, p=p, bp=bp, s=s, taps=k - 1, dt_limit=tuple(dt_limit),
        norm_eps=norm_eps, cdtype=cdtype, has_prefetch=bool(pf_elems), pf_chunk=pf_chunk,
        pf_total=pf_elems, nj=nj, bsz=bsz, trigger=trigger,
    )  # fmt: skip
    args = [zx_BGW, conv_BKGF, conv_w_KGF, conv_b_GF, ssm_BHPS, A_log_H, D_H, dt_bias_H, norm_in_BD, slot]
    out_shape = [
        jax.ShapeDtypeStruct((g_rows, heads * p), g_dtype),
        jax.ShapeDtypeStruct((bsz, heads, nj), jnp.float32),
        jax.ShapeDtypeStruct(conv_BKGF.shape, conv_BKGF.dtype),
        jax.ShapeDtypeStruct(ssm_BHPS.shape, ssm_BHPS.dtype),
    ]
    if pf_elems:
        args.append(prefetch.reshape(-1))
        out_shape.append(jax.ShapeDtypeStruct((heads // hp * nj,), jnp.float32))
    g_BF, ss_BHJ, conv, ssm, *_ = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(bsz + bool(pf_elems), heads // hp, nj),
        input_output_aliases={1: 2, 4: 3},
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1),
        interpret=_interpret(),
        name="ssm_step",
    )(*args)
    return g_BF, ss_BHJ, conv, ssm


def state_window(batch, heads, head_dim, groups, state_size, size, x_dtype, b_dtype=None):
    """Zeroed buffers of a state write-back window of `size` tokens for `ssm_step(window=…)`: x
    (B, W, H, P) and B (B, W, G, S) in the compute dtype (as the step kernel reads them), dt (B, W, H)
    float32. Zero dt in the slots before the first decoded position makes them add nothing."""
    return (
        jnp.zeros((batch, size, heads, head_dim), x_dtype),
        jnp.zeros((batch, size, groups, state_size), b_dtype or x_dtype),
        jnp.zeros((batch, size, heads), jnp.float32),
    )


def window_size(split: bool, batch: int, dtype=jnp.bfloat16, head_dim: int = 64, state_size: int = 128) -> int:
    """The state write-back window `Mamba2Mixer` decodes with: with the split step from WINDOW_MIN_BATCH rows
    (large batch, where the state's traffic counts) STATE_WINDOW where the CUDA update runs (a GPU, nvcc,
    `dtype` bf16, its head dim and state sizes: with the Pallas update the window is slower);
    MAMBA_JAX_DECODE_WINDOW, read at trace time, sets it at any batch of the split step (0 or 1: off); else 0
    (the state written every token)."""
    from mamba_jax.kernels import ssm_update

    fits = ssm_update.shape_unsupported(STATE_WINDOW, head_dim, state_size) is None
    size = STATE_WINDOW if batch >= WINDOW_MIN_BATCH and split and fits and ssm_update.available(dtype) else 0
    if env := _env_ints("MAMBA_JAX_DECODE_WINDOW", 1, "one integer, the window in tokens (0: off)"):
        size = env[0]
    return size if split and size > 1 else 0


def window_state(ssm_BHPS, window, pos, A_log_H):
    """The SSM state after the token at position `pos` − 1 from `ssm_step(window=…)`'s state (as of the
    window's start) and buffers, in float32 (plain XLA: for tests and for handing the state on). Slots
    (pos − 1) mod W + 1 … W − 1 belong to no token yet; at a window boundary (pos mod W = 0) the state is
    `ssm_BHPS` itself."""
    x_BWHP, b_BWGS, dt_BWH = window
    w = x_BWHP.shape[1]
    h, g = x_BWHP.shape[2], b_BWGS.shape[2]
    pos = jnp.asarray(pos, jnp.int32)
    live = (jnp.arange(w) <= (pos - 1) % w) & (pos % w != 0)  # a full window was written back already
    dt_BWH = jnp.where(live[None, :, None], dt_BWH, 0.0)
    dA_BWH = dt_BWH * -jnp.exp(A_log_H.astype(jnp.float32))
    after_BWH = jnp.cumsum(dA_BWH[:, ::-1], axis=1)[:, ::-1] - dA_BWH  # Σ over the later slots
    b_BWHS = jnp.repeat(b_BWGS.astype(jnp.float32), h // g, axis=2)
    upd_BHPS = jnp.einsum("bwh,bwhp,bwhs->bhps", jnp.exp(after_BWH) * dt_BWH, x_BWHP.astype(jnp.float32), b_BWHS)
    total_BH = jnp.sum(dA_BWH, axis=1)
    return jnp.exp(total_BH)[..., None, None] * ssm_BHPS.astype(jnp.float32) + upd_BHPS


def conv_ring(window_BCGF, pos: int):
    """The ring `ssm_step` reads from a window of the last C = K − 1 conv inputs in order, the newest at
    position `pos` − 1: input at position t in slot t mod K (slot `pos` mod K, not yet written, zero)."""
    k = window_BCGF.shape[1] + 1
    ring = jnp.concatenate([window_BCGF, jnp.zeros_like(window_BCGF[:, :1])], axis=1)  # positions pos−C … pos
    return jnp.roll(ring, (pos - (k - 1)) % k, axis=1)


# --- the projections as split-K partials -------------------------------------------------------------------
def proj_splits(batch: int) -> tuple[int, int]:
    """(in_proj, out_proj) K splits for `Mamba2Mixer._decode_fused` at this batch: 1 is XLA's own GEMM;
    S > 1 runs the projection as `split_k_partials` (its consumer kernel sums them). From
    SPLIT_K_MIN_BATCH on, defaults IN_SPLITS / OUT_SPLITS. MAMBA_JAX_DECODE_SPLITS="in,out" overrides it at
    trace time, for tuning (benchmarks/decode_variants.py)."""
    splits = (IN_SPLITS, OUT_SPLITS) if batch >= SPLIT_K_MIN_BATCH else (1, 1)
    if env := _env_ints("MAMBA_JAX_DECODE_SPLITS", 2, "two integers, in_proj's and out_proj's splits (e.g. 1,2)"):
        splits = (max(env[0], 1), max(env[1], 1))
    return splits


def cuda_gemm_splits(batch: int) -> tuple[int, int]:
    """(in_proj, out_proj) K splits of the CUDA skinny GEMM (`kernels.skinny_gemm`) for
    `Mamba2Mixer._decode_fused` at this batch, 0 where the projection keeps the plan above (XLA's GEMM or
    `split_k_partials`). From CUDA_GEMM_MIN_BATCH on, CUDA_GEMM. MAMBA_JAX_DECODE_GEMM="in,out" overrides it
    at trace time, for tuning (benchmarks/decode_variants.py)."""
    splits = CUDA_GEMM if batch >= CUDA_GEMM_MIN_BATCH else (0, 0)
    what = "two integers, the CUDA GEMM's K splits for in_proj and out_proj (0: XLA's product), e.g. 1,2"
    if env := _env_ints("MAMBA_JAX_DECODE_GEMM", 2, what):
        splits = (max(env[0], 0), max(env[1], 0))
    return splits


def split_k_partials(x_BK, w_KX, splits: int):
    """x @ w (w's leading axis the reduction, any output axes X) as `splits` float32 partial products over
    equal slices of K, (S, B, X…), one batched GEMM: with few rows and few output columns (out_proj of a
    2.7B layer at batch 32: 20 column tiles of 128) a plain GEMM keeps too few SMs busy, and XLA's split-K
    then adds a reduce kernel; here the consumer (`ssm_step`, `gated_norm_residual`) sums the partials as
    it reads them."""
    b, k = x_BK.shape
    if k % splits:
        raise ValueError(f"split_k_partials: {splits} splits do not divide K = {k}.")
    w_SKN = w_KX.reshape(splits, k // splits, -1)
    out = jnp.einsum("bsk,skn->sbn", x_BK.reshape(b, splits, k // splits), w_SKN, preferred_element_type=jnp.float32)
    return out.reshape(splits, b, *w_KX.shape[1:])


# --- the residual add behind out_proj ---------------------------------------------------------------------
def _residual_kernel(h_ref, o_ref, ss_ref, out_ref, *copy_ref, d, bd, nss, norm_dim, eps, cdtype, layout):
    b = pl.program_id(0)
    d0 = pl.program_id(1) * bd
    f32 = jnp.float32
    sp = pl.next_power_of_2(nss)  # Triton blocks are powers of two: mask the rest
    cols = (d0 + jnp.arange(bd) < d)[None, :]
    ss = plt.load(ss_ref.at[pl.ds(b, 1), pl.ds(0, sp)], mask=(jnp.arange(sp) < nss)[None, :], other=0.0)
    inv = jax.lax.rsqrt(jnp.sum(ss) / norm_dim + eps)
    # Float32 split-K partials of out_proj: summed here and rounded as a GEMV's output rounds.
    if layout == "SDB":  # (S, D, Bp) of `gemv_t`: whole (bd, Bp) blocks (contiguous) and a select of row b
        bpad = o_ref.shape[2]
        bq = pl.next_power_of_2(bpad)
        lane = jnp.arange(bq)[None, :]
        o = jnp.zeros((bd, bq), f32)
        for si in range(o_ref.shape[0]):
            blk = o_ref.at[jnp.int32(si), pl.ds(d0, bd), pl.ds(0, bq)]
            o = o + plt.load(blk, mask=cols.T & (lane < bpad), other=0.0)
        o = jnp.sum(jnp.where(lane == b, o, 0.0), axis=1)
        o = o.astype(cdtype).astype(f32)[None, :]
    elif layout == "SBD":  # (S, B, D) of `split_k_partials`
        o = jnp.zeros((1, bd), f32)
        for si in range(o_ref.shape[0]):
            o = o + plt.load(o_ref.at[jnp.int32(si), pl.ds(b, 1), pl.ds(d0, bd)], mask=cols, other=0.0)
        o = o.astype(cdtype).astype(f32)
    else:
        o = plt.load(o_ref.at[pl.ds(b, 1), pl.ds(d0, bd)], mask=cols, other=0.0).astype(f32)
    h = plt.load(h_ref.at[pl.ds(b, 1), pl.ds(d0, bd)], mask=cols, other=0.0).astype(f32)
    y = h + (o * inv).astype(cdtype).astype(f32)  # out_proj's output rounds as the unfused path rounds it
    plt.store(out_ref.at[pl.ds(b, 1), pl.ds(d0, bd)], y.astype(out_ref.dtype), mask=cols)
    for c in copy_ref:  # the next block's in_proj input, rounded here rather than by one more XLA kernel
        plt.store(c.at[pl.ds(b, 1), pl.ds(d0, bd)], y.astype(c.dtype), mask=cols)


@functools.partial(jax.jit, static_argnames=("norm_dim", "eps", "out_dtype", "layout", "copy_dtype"))
def gated_norm_residual(h_BD, out_BD, ss_BX, *, norm_dim, eps, out_dtype=None, layout=None, copy_dtype=None):
    """h + (out · rsqrt(Σ ss / norm_dim + eps)) rounded to out's dtype: the gated RMSNorm's 1/rms (one norm
    group; its weight folded into out_proj) applied to out_proj's output, and the residual add, in one
    launch. ss: the step kernel's sums of squares of the norm's input, (B, any number of partial sums).

    With `copy_dtype`, returns (the new residual, the new residual in copy_dtype): the next block's in_proj
    input (the model's compute dtype where the residual stream is float32), written by the same launch.

    `out` is out_proj's output (B, D), or with layout="SDB" its float32 split-K partials (S, D, Bp ≥ B)
    from `kernels.gemv.gemv_t`, or with layout="SBD" float32 partials (S, B, D) from `split_k_partials`,
    summed here and rounded to `out_dtype` (the model's compute dtype) as a GEMV rounds its output."""
    bsz, d = h_BD.shape
    ss_BX = ss_BX.reshape(bsz, -1)
    want = {
        None: (bsz, d),
        "SDB": (out_BD.shape[0], d, max(out_BD.shape[-1], bsz)),
        "SBD": (out_BD.shape[0], bsz, d),
    }
    if layout not in want or out_BD.shape != want[layout] or (layout and out_dtype is None):
        raise ValueError(
            f"gated_norm_residual: out {out_BD.shape} with layout={layout!r} for a ({bsz}, {d}) residual "
            "(layout None, 'SDB' or 'SBD'; partials need out_dtype)"
        )
    bd = min(pl.next_power_of_2(d), 512)  # a few programs per row: at batch 1 one would work alone
    cdtype = jnp.dtype(out_dtype or out_BD.dtype)
    kernel = functools.partial(
        _residual_kernel, d=d, bd=bd, nss=ss_BX.shape[1], norm_dim=norm_dim, eps=eps, cdtype=cdtype, layout=layout
    )
    copy = copy_dtype is not None and jnp.dtype(copy_dtype) != h_BD.dtype
    out_shape = [jax.ShapeDtypeStruct(h_BD.shape, h_BD.dtype)]
    if copy:
        out_shape.append(jax.ShapeDtypeStruct(h_BD.shape, copy_dtype))
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(bsz, pl.cdiv(d, bd)),
        input_output_aliases={0: 0},
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=_interpret(),
        name="gated_norm_residual",
    )(h_BD, out_BD, ss_BX)
    if copy_dtype is None:
        return outs[0]
    return (outs[0], outs[1]) if copy else (outs[0], outs[0])
