"""Shared pieces of the fused SSD kernels: block sizes, shared-memory layouts, the per-block vectors.

The kernels walk the sequence in blocks of T = 64 tokens and the head dimension in tiles of 64 channels.
Everything that is a per-token scalar of a head (the within-block cumulative log-decay, dt, the decays
that carry a state into and out of a block, the document index, D) is prepared here in XLA, in float32,
as one small (B, H, nblk, 8, T) array that each kernel reads with one copy per block. Autodiff of this
preparation gives the gradients of dt, A, dt_bias and D from the per-token gradients the kernels write,
so the kernels themselves never see softplus, limits or masks of the dt path.

Rows of the vector array (VEC_*), per block of T tokens of one head:
  cs    cumulative sum of dt·A inside the block (restarts every block, so differences stay small)
  dt    dt after bias / softplus / limit (0 on padding)
  ain   exp(cs) where the token belongs to the document of the state entering the block, else 0
  aw    exp(cs_last − cs)·dt where the token belongs to the document of the block's last token, else 0
  carry exp(cs_last) in element 0 (0 where a document starts inside the block), 0 elsewhere
  sid   document index (float32, exact below 2²⁴), for the intra-block mask
  D     the head's skip weight in element 0, 0 elsewhere

Dimension key: B batch, L length, H heads, G groups, P head dim, N state, T tokens per block.
"""

from __future__ import annotations

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

T = 64  # tokens per block: one wgmma M group
PT = 64  # head-dim channels per program: one wgmma M group for the state tile (PT, N)
NVEC = 8
VEC_CS, VEC_DT, VEC_AIN, VEC_AW, VEC_CARRY, VEC_SID, VEC_D = range(7)
# Rows of the per-block gradient vectors the backward kernel writes (DV_*): partial sums over one
# head-dim tile; `vector_grads` turns them into the gradient of the vector array above. DV_DA is the
# gradient of the intra-block scores w.r.t. each token's dt·A, Σ_{q ≥ t > s} (G ∘ M)[q, s]: summed over
# the pairs whose decay spans token t, not as the difference of row and column sums of G ∘ M, which
# cancels catastrophically when the decay inside a block is strong.
NDV = 6
DV_DA, DV_DT, DV_AIN, DV_AW, DV_CARRY, DV_D = range(NDV)

# Mosaic GPU's on-device profiler: `benchmarks/ssd_profile.py` sets {"profile_space": …, "profile_dir": …}
# (and clears the builders' caches); the kernels mark their stages with `jax.named_scope`, free otherwise.
PROFILE: dict = {}


def compiler_params():
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane, **PROFILE)


SMEM_BUDGET = 220 * 1024  # H100 allows 227 KiB per block; leave room for barriers and reduction scratch

ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a WGMMA tile
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column
WGMMA = plgpu.Layout.WGMMA


def swizzle(dtype):
    """Tiling and 128-byte swizzle for a shared-memory tile whose rows are ≥ 128 bytes (TMA + wgmma)."""
    elems = 128 // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(128))


def smem_tile(shape, dtype):
    return plgpu.SMEM(shape, dtype, transforms=swizzle(dtype))


def bcast_rows(v, shape):
    """(M,) in ROW layout → (M, K): v[m] along row m."""
    return jax.lax.broadcast_in_dim(v, shape, [0])


def bcast_cols(v, shape):
    """(K,) in COL layout → (M, K): v[k] along column k."""
    return jax.lax.broadcast_in_dim(v, shape, [1])


def block_decay(cs_q, cs_s, sid_q=None, sid_s=None):
    """(T, T) float32: exp(cs_q − cs_s) where s ≤ q (and same document), 0 elsewhere.

    The difference is masked before the exponential: above the diagonal it is positive and could overflow.
    """
    shape = (T, T)
    q = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=WGMMA)
    s = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=WGMMA)
    keep = s <= q
    if sid_q is not None:
        keep = keep & (bcast_rows(sid_q, shape) == bcast_cols(sid_s, shape))
    diff = bcast_rows(cs_q, shape) - bcast_cols(cs_s, shape)
    return jnp.exp(jnp.where(keep, diff, -jnp.inf))


def sigmoid(v):
    return 1.0 / (1.0 + jnp.exp(-v))


def wgmma_result(shapes, issue):
    """Runs `issue(*accumulators)` on fresh float32 accumulators and returns their values."""

    def body(*accs):
        issue(*accs)
        return tuple(a[...] for a in accs)

    out = pl.run_scoped(body, *(plgpu.ACC(s, jnp.float32) for s in shapes))
    return out if len(shapes) > 1 else out[0]


def block_vectors(dt_BLH, A_H, seq_idx_BL, D_H):
    """The (B, H, nblk, NVEC, T) float32 vectors (module docstring) from processed, padded dt.

    dt_BLH (B, L, H) float32 with L a multiple of T (0 on padding); seq_idx_BL (B, L) int or None;
    D_H (H,) or None. Differentiable w.r.t. dt, A and D.
    """
    f32 = jnp.float32
    b, l, h = dt_BLH.shape
    nb = l // T
    dt_BHCT = jnp.moveaxis(dt_BLH, 1, 2).reshape(b, h, nb, T)
    dA_BHCT = dt_BHCT * A_H.astype(f32)[None, :, None, None]
    cs_BHCT = jnp.cumsum(dA_BHCT, axis=-1)
    cs_last_BHC1 = cs_BHCT[..., -1:]
    ain_BHCT = jnp.exp(cs_BHCT)
    # cs_last − cs as its own (reverse, exclusive) sum: the difference would differentiate into
    # total − suffix sums that cancel when the decay is strong.
    rest_BHCT = jnp.flip(jnp.cumsum(jnp.flip(dA_BHCT, -1), axis=-1), -1) - dA_BHCT
    aw_BHCT = jnp.exp(rest_BHCT) * dt_BHCT
    carry_BHC1 = jnp.exp(cs_last_BHC1)
    zeros = jnp.zeros_like(dt_BHCT)
    sid_BHCT = zeros
    if seq_idx_BL is not None:
        sid_BCT = seq_idx_BL.reshape(b, nb, T)
        sid_last_BC1 = sid_BCT[..., -1:]
        # Document of the token before each block; the first block's is its own first token's, so that
        # initial states belong to the first document.
        sid_prev_BC1 = jnp.concatenate([sid_BCT[:, :1, :1], sid_last_BC1[:, :-1]], axis=1)
        ain_BHCT = jnp.where((sid_BCT == sid_prev_BC1)[:, None], ain_BHCT, 0.0)
        aw_BHCT = jnp.where((sid_BCT == sid_last_BC1)[:, None], aw_BHCT, 0.0)
        carry_BHC1 = jnp.where((sid_last_BC1 == sid_prev_BC1)[:, None], carry_BHC1, 0.0)
        sid_BHCT = jnp.broadcast_to(sid_BCT.astype(f32)[:, None], dt_BHCT.shape)
    first = (jnp.arange(T) == 0).astype(f32)
    carry_BHCT = carry_BHC1 * first
    D_BHCT = zeros if D_H is None else jnp.broadcast_to(D_H.astype(f32)[None, :, None, None] * first, zeros.shape)
    rows = [cs_BHCT, dt_BHCT, ain_BHCT, aw_BHCT, carry_BHCT, sid_BHCT, D_BHCT, zeros]
    return jnp.stack(rows, axis=3)


def vector_grads(dvp_BHPCVT):
    """Gradient of the vector array from the backward kernel's per-tile partials (B, H, P/PT, nblk, NDV, T)."""
    dv = dvp_BHPCVT.sum(axis=2)
    zeros = jnp.zeros_like(dv[..., 0, :])
    first = (jnp.arange(T) == 0).astype(dv.dtype)
    carry = dv[..., DV_CARRY, :].sum(-1, keepdims=True) * first
    D = dv[..., DV_D, :].sum(-1, keepdims=True) * first
    # The kernels use cs only through differences cs_q − cs_s; a gradient R_q − R_{q+1} w.r.t. cs becomes,
    # through the cumulative sum's transpose, exactly R_t w.r.t. dt_t·A.
    R = dv[..., DV_DA, :]
    d_cs = R - jnp.concatenate([R[..., 1:], zeros[..., :1]], axis=-1)
    rows = [d_cs, dv[..., DV_DT, :], dv[..., DV_AIN, :], dv[..., DV_AW, :]]
    return jnp.stack([*rows, carry, zeros, D, zeros], axis=3)
