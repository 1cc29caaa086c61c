// The decode step's state update with a state write-back window, as an XLA FFI call: the second launch of
// kernels/decode.py's split step (`ssm_step(split=True, window=…)`, `_update_kernel` with `_head_windowed`),
// same inputs, outputs and rounding, in CUDA. Built with nvcc on first use (kernels/cuda_build.py) and called
// from kernels/decode.py's `_split_step` where it runs (kernels/ssm_update.py says where).
//
// Why: at batch 32 a 2.7B layer moves 42 MB of bf16 state each way per token. With the window the state is
// read every step but written only every W steps (decode.py's docstring has the algebra): 84 → ≈ 50 MB. The
// Pallas version ran slower than the per-token write (benchmarks/README.md, "State write-back window"), and so
// did this kernel's first version (one kernel: each CTA staged the window and computed the W decays and dot
// products before its state's products; 5,360 against 6,620 tok/s, the CTAs' chain of dependent steps, not
// the bytes, set its time). Now two launches:
//   1. window_coef, one warp per (b, h): this token's dt, the window's weights and d₀, the W products Bᵢ · C,
//      folded into extra[p] (below); this token into slot wj of the window buffers. Small, latency-bound.
//   2. window_update, one CTA of 128 threads per (b, h, block of CB state rows) (or, opt-in, a few persistent
//      CTAs per SM walking those tiles with the next one's state loaded ahead: window_update_persistent): thread t takes row t / TPR of
//      the block and E = S / TPR consecutive state columns (TPR = 128 / CB). A plain stream: the state's
//      loads first (they depend on nothing the launches before write, so under programmatic dependent launch
//      they overlap kernel 1), then y = d₀ (h₀ · C) + extra, the gate, Σ g², and every W-th step the write-back.
//
// Two FFI targets: MambaJaxSsmUpdateWindow runs behind the Pallas prep kernel (its conv outputs and 1/rms in),
// the default; MambaJaxSsmStepWindow (opt-in, kernels/ssm_update.py's FUSED_PREP) does the prep's work in
// kernel 1 (fused_prep: the 1/rms per CTA, the conv of the head's x and the group's B, C, the ring's update):
// one launch less, but measured slower (6,605 against 6,965 tok/s, 2.7B batch 32, H100) — kernel 1's chain
// grows by the norm's reduction and the conv's loads.
//
// Per token (slot wj = pos mod W of the window; slots after wj hold no token of this window: dt 0):
//   dt   = clip(softplus(round(zx_dt · scale) + dt_bias)),  A = −exp(A_log)
//   wᵢ   = exp(A Σ_{m>i} dtₘ) dtᵢ,  d₀ = exp(A Σ dtₘ)                    (i, m ≤ wj)
//   y    = d₀ (h₀ · C) + extra,   extra = D x + Σᵢ wᵢ (Bᵢ · C) xᵢ
//   g    = round(y) · SiLU(round(zx_z · scale)),  ss[b, h, j] = Σ g²  (the gated norm's statistics)
//   at wj = W − 1:  h ← d₀ h₀ + Σᵢ wᵢ xᵢ Bᵢᵀ  (written in place, the state's dtype)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int NT = 128;     // threads per CTA
constexpr int MAX_W = 16;   // window slots
constexpr int MAX_S = 256;  // state size

struct Params {
  const __nv_bfloat16* zx;   // (B, G, ZW): [z (R·P) | x (R·P) | B (S) | C (S) | dt (R)] per group
  const __nv_bfloat16* xbc;  // (B, G, F = R·P + 2S): the conv outputs [x | B | C]
  const float* scale;        // (B,): the input norm's 1/rms
  void* state;               // (B, H, P, S), bf16 or float32, in place
  const void *alog, *dskip, *dtb;  // (H,), bf16 or float32 each
  const int* pos;            // (1,): the token's position (its slot: pos mod W)
  __nv_bfloat16* wx;         // (B, W, H, P)
  __nv_bfloat16* wb;         // (B, W, G, S)
  float* wdt;                // (B, W, H)
  void* g;                   // (rows ≥ B, H·P), bf16 or float32
  float* ss;                 // (B, H, P / BP)
  float *d0, *extra, *wts;   // kernel 1 → 2: d₀ (B, H), extra (B, H, P), wᵢ (B, H, W)
  int B, H, G, P, S, BP, CB, W, ZW, F;  // BP: ss's rows per block; CB: kernel 2's rows per CTA
  float dt_lo, dt_hi;
  int clip, alog_f32, dskip_f32, dtb_f32, g_f32;
  // Kernel 2 reads C at c + (b · G + grp) · c_stride (+ the column): xbc's C columns, or kernel 1's copy.
  const __nv_bfloat16* c;
  int c_stride;
  // The fused prep (MambaJaxSsmStepWindow: kernel 1 does the prep kernel's work for its head): the conv ring
  // (B, K, G, F) updated in place, its weights (K, G, F) and bias (G, F), the input norm's input (B, D), and
  // kernel 1's outputs for kernel 2, the 1/rms and C (B, G, S).
  int fused, K, D, convw_f32, convb_f32, norm_f32;
  int variant;  // bit 0: window_coef_regs for kernel 1, bit 1: window_stream for kernel 2 (where they fit)
  __nv_bfloat16* ring;
  const void *convw, *convb, *norm_in;
  float eps;
  float* scale_out;
  __nv_bfloat16* c_out;
};

__device__ __forceinline__ float param(const void* p, int i, int f32) {
  return f32 ? reinterpret_cast<const float*>(p)[i] : __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
}
// 8 floats rounded to bf16, as one 16-byte store.
__device__ __forceinline__ uint4 pack8(const float* v) {
  uint4 o;
  uint32_t* w = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    __nv_bfloat162 h2 = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
    w[k] = *reinterpret_cast<uint32_t*>(&h2);
  }
  return o;
}
// 8 bf16 values (one 16-byte load) as floats.
__device__ __forceinline__ void bf8_to(float* dst, const uint4& v) {
  const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
  for (int k = 0; k < 8; ++k) dst[k] = __bfloat162float(h[k]);
}
// 8 consecutive values of a bf16 or float32 array from element i (a multiple of 8), as floats.
__device__ __forceinline__ void load8(float* dst, const void* base, long i, int f32) {
  if (f32) {
    const float4* q = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(base) + i);
    const float4 a = q[0], b = q[1];
    dst[0] = a.x, dst[1] = a.y, dst[2] = a.z, dst[3] = a.w, dst[4] = b.x, dst[5] = b.y, dst[6] = b.z, dst[7] = b.w;
  } else {
    bf8_to(dst, *reinterpret_cast<const uint4*>(reinterpret_cast<const __nv_bfloat16*>(base) + i));
  }
}
__device__ __forceinline__ float bf(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }

// E consecutive state elements of one row: bf16 (E / 8 loads of 16 bytes) or float32 (E / 4).
template <int E, typename T>
struct Row;
template <int E>
struct Row<E, __nv_bfloat16> {
  uint4 raw[E / 8];
  __device__ __forceinline__ void load(const void* base, long off) {
    const uint4* p = reinterpret_cast<const uint4*>(reinterpret_cast<const __nv_bfloat16*>(base) + off);
#pragma unroll
    for (int q = 0; q < E / 8; ++q) raw[q] = __ldcs(p + q);  // streamed: read once per token
  }
  __device__ __forceinline__ float at(int e) const {
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(raw);
    return __bfloat162float(h[e]);
  }
  __device__ __forceinline__ static void store(void* base, long off, const float* v) {
    uint4* p = reinterpret_cast<uint4*>(reinterpret_cast<__nv_bfloat16*>(base) + off);
#pragma unroll
    for (int q = 0; q < E / 8; ++q) __stcs(p + q, pack8(v + q * 8));
  }
};
template <int E>
struct Row<E, float> {
  float4 raw[E / 4];
  __device__ __forceinline__ void load(const void* base, long off) {
    const float4* p = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(base) + off);
#pragma unroll
    for (int q = 0; q < E / 4; ++q) raw[q] = __ldcs(p + q);
  }
  __device__ __forceinline__ float at(int e) const { return reinterpret_cast<const float*>(raw)[e]; }
  __device__ __forceinline__ static void store(void* base, long off, const float* v) {
    float4* p = reinterpret_cast<float4*>(reinterpret_cast<float*>(base) + off);
#pragma unroll
    for (int q = 0; q < E / 4; ++q) __stcs(p + q, make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]));
  }
};

// Kernel 1: one warp per (b, h) — this token's dt, the window's weights wᵢ, d₀ and the Bᵢ · C products, folded
// into extra[p] = D x[p] + Σᵢ wᵢ (Bᵢ · C) xᵢ[p]; and this token into slot wj of the window. Small and latency-
// bound, so its loads go out together (16-byte vectors, the window's in one batch before the wait) and lane i
// takes slot i.
// The window's slots before wj (written by earlier steps) into shared memory: x of this head (rows of P) and
// B of its group (rows of S, stride SB), as one batch of up to 8 vector loads per lane in flight (W 8, P 64,
// S 128: at most 168 loads over the warp, one batch), then their conversions.
__device__ __forceinline__ void stage_window(const Params& p, int b, int h, int grp, int wj, float* sx, float* sB,
                                             int SB, int lane) {
  // (P and S are powers of two, ssm_step_unsupported: shifts, not divisions, between the loads)
  const int nx = p.P / 8, nb = p.S / 8, lx = __ffs(nx) - 1, lb = __ffs(nb) - 1, tx = wj * nx, total = tx + wj * nb;
  for (int base = lane; base < total; base += 256) {
    uint4 v[8];
    float* dst[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int idx = base + 32 * k, j = idx - tx;
      const int ix = idx >> lx, qx = (idx & (nx - 1)) * 8, ib = j >> lb, qb = (j & (nb - 1)) * 8;
      const __nv_bfloat16* src = idx < tx ? p.wx + (((long)b * p.W + ix) * p.H + h) * p.P + qx
                                          : p.wb + (((long)b * p.W + ib) * p.G + grp) * p.S + qb;
      dst[k] = idx < tx ? sx + ix * p.P + qx : sB + ib * SB + qb;
      if (idx < total) v[k] = *reinterpret_cast<const uint4*>(src);
    }
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (base + 32 * k < total) bf8_to(dst[k], v[k]);
  }
}

// Kernel 1's prep (the fused target): the input norm's 1/rms of row b (the CTA's four warps, one row: H % 4
// == 0), then as kernels/decode.py's `_conv`: new = round(zx · scale), out = round(SiLU(round(bias + new ·
// w_K + Σ_t ring_t · w_t))) for this head's x channels and the group's B and C channels (into x_dst, b_dst,
// c_dst in shared memory); new goes to the ring's slot pos mod K (B and C by the group's first head, which
// also writes C and the 1/rms for kernel 2). Returns the 1/rms.
__device__ float fused_prep(const Params& p, int b, int h, int grp, int r, int lane, int warp, float* x_dst,
                            float* b_dst, float* c_dst) {
  __shared__ float red[NT / 32];
  float sq = 0.f;
  for (int i = threadIdx.x; i < p.D; i += NT) {
    const float u = param(p.norm_in, b * p.D + i, p.norm_f32);
    sq += u * u;
  }
#pragma unroll
  for (int o = 16; o; o >>= 1) sq += __shfl_xor_sync(~0u, sq, o);
  if (lane == 0) red[warp] = sq;
  __syncthreads();
  const float scale = rsqrtf((red[0] + red[1] + red[2] + red[3]) / p.D + p.eps);
  const int P = p.P, S = p.S, RP = (p.H / p.G) * P, K = p.K, slot = *p.pos % K;
  const int nx = P / 8, nb = S / 8, total = nx + 2 * nb;
  const __nv_bfloat16* zrow = p.zx + ((long)b * p.G + grp) * p.ZW + RP;  // the conv channels' columns
  for (int idx = lane; idx < total; idx += 32) {
    const int ch = idx < nx ? r * P + idx * 8 : RP + (idx - nx) * 8;  // conv channel of the 8
    float nw[8], acc[8], w[8];
    load8(nw, zrow, ch, 0);
    load8(acc, p.convb, (long)grp * p.F + ch, p.convb_f32);
    load8(w, p.convw, ((long)(K - 1) * p.G + grp) * p.F + ch, p.convw_f32);
#pragma unroll
    for (int k = 0; k < 8; ++k) nw[k] = bf(nw[k] * scale), acc[k] += nw[k] * w[k];
    for (int t = 0; t < K - 1; ++t) {
      float v[8];
      load8(v, p.ring, (((long)b * K + (slot + 1 + t) % K) * p.G + grp) * p.F + ch, 0);
      load8(w, p.convw, ((long)t * p.G + grp) * p.F + ch, p.convw_f32);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] += v[k] * w[k];
    }
    float* dst = idx < nx ? x_dst + idx * 8 : idx < nx + nb ? b_dst + (idx - nx) * 8 : c_dst + (idx - nx - nb) * 8;
#pragma unroll
    for (int k = 0; k < 8; ++k) dst[k] = bf(silu(bf(acc[k])));
    if (idx < nx || r == 0)  // the ring's new input (B and C: the group's first head)
      *reinterpret_cast<uint4*>(p.ring + (((long)b * K + slot) * p.G + grp) * p.F + ch) = pack8(nw);
    if (r == 0 && idx >= nx + nb)  // C for kernel 2
      *reinterpret_cast<uint4*>(p.c_out + ((long)b * p.G + grp) * S + (idx - nx - nb) * 8) = pack8(dst);
  }
  if (h == 0 && lane == 0) p.scale_out[b] = scale;
  return scale;
}

template <bool FUSED>  // the fused target's kernel 1 (fused_prep) or the one behind the Pallas prep kernel
__global__ void __launch_bounds__(NT) window_coef(Params p) {
  extern __shared__ float smem[];  // per warp: sx (W, P), sB (W + 1, S + 1: the last row C), padded rows
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");  // kernel 2 may start its state reads
  const int bh = blockIdx.x * (NT / 32) + warp;
  if (bh >= p.B * p.H) return;
  const int h = bh % p.H, b = bh / p.H, R = p.H / p.G, grp = h / R, r = h % R;
  const int W = p.W, S = p.S, P = p.P, RP = R * P, SB = S + 1;
  const int wj = *p.pos % W;
  float* sx = smem + warp * (W * P + (W + 1) * SB);
  float* sB = sx + W * P;
  // The window's earlier slots (written by earlier steps): before the wait.
  float dt_i = lane < wj ? p.wdt[((long)b * W + lane) * p.H + h] : 0.f;
  stage_window(p, b, h, grp, wj, sx, sB, SB, lane);
  asm volatile("griddepcontrol.wait;" ::: "memory");  // the prep kernel's outputs
  const __nv_bfloat16* zrow = p.zx + ((long)b * p.G + grp) * p.ZW;
  const float zdt = __bfloat162float(zrow[2 * RP + 2 * S + r]);
  const float dtb = param(p.dtb, h, p.dtb_f32), alog = param(p.alog, h, p.alog_f32);
  const float dskip = param(p.dskip, h, p.dskip_f32);
  float scale;
  if (FUSED) {
    scale = fused_prep(p, b, h, grp, r, lane, warp, sx + wj * P, sB + wj * SB, sB + (wj + 1) * SB);
  } else {  // this token's x (into slot wj), B (slot wj) and C (row wj + 1 ≤ W, never a slot): loads together
    const __nv_bfloat16* xrow = p.xbc + ((long)b * p.G + grp) * p.F;
    scale = p.scale[b];
    const int nx = P / 8, nb = S / 8, total = nx + 2 * nb;
    uint4 v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int idx = lane + 32 * k;
      if (idx < total)
        v[k] = *reinterpret_cast<const uint4*>(idx < nx ? xrow + r * P + idx * 8 : xrow + RP + (idx - nx) * 8);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int idx = lane + 32 * k;
      if (idx < total) bf8_to(idx < nx ? sx + wj * P + idx * 8 : sB + (wj + (idx - nx) / nb) * SB + (idx - nx) % nb * 8, v[k]);
    }
  }
  float dt = bf(zdt * scale) + dtb;
  dt = dt > 20.f ? dt : log1pf(expf(fminf(dt, 20.f)));
  if (p.clip) dt = fminf(fmaxf(dt, p.dt_lo), p.dt_hi);
  if (lane == wj) dt_i = dt;
  __syncwarp();
  // Σ_{m ≥ i} dtₘ by a suffix scan over the lanes, then wᵢ = exp(A Σ_{m > i} dtₘ) dtᵢ and d₀ = exp(A Σ dtₘ).
  const float a = -expf(alog);
  float suf = dt_i;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float v = __shfl_down_sync(~0u, suf, o);
    if (lane + o < 32) suf += v;
  }
  const float w_i = expf(a * (suf - dt_i)) * dt_i;
  const float d0 = expf(a * __shfl_sync(~0u, suf, 0));
  // Lane i ≤ wj: coefᵢ = wᵢ (Bᵢ · C) over the padded rows (no bank conflicts), four partial sums.
  float coef = 0.f;
  if (lane <= wj) {
    const float* bi = sB + lane * SB;
    const float* c = sB + (wj + 1) * SB;
    float a4[4] = {0.f, 0.f, 0.f, 0.f};
    for (int n = 0; n < S; n += 4) {
#pragma unroll
      for (int k = 0; k < 4; ++k) a4[k] += bi[n + k] * c[n + k];
    }
    coef = w_i * ((a4[0] + a4[1]) + (a4[2] + a4[3]));
  }
  for (int q = lane; q < P; q += 32) {
    float e = dskip * sx[wj * P + q];
    for (int i = 0; i <= wj; ++i) e += __shfl_sync(~0u, coef, i) * sx[i * P + q];
    p.extra[(long)bh * P + q] = e;
    p.wx[(((long)b * W + wj) * p.H + h) * P + q] = __float2bfloat16_rn(sx[wj * P + q]);  // this token's x
  }
  if (lane == 0) p.d0[bh] = d0, p.wdt[((long)b * W + wj) * p.H + h] = dt;
  if (lane < W) p.wts[(long)bh * W + lane] = lane <= wj ? w_i : 0.f;
  if (r == 0)  // the group's B: its first head keeps it
    for (int n = lane; n < S; n += 32) p.wb[(((long)b * W + wj) * p.G + grp) * S + n] = __float2bfloat16_rn(sB[wj * SB + n]);
}

// Kernel 2: the state stream. A tile is (b, h, block of CB rows); thread t takes row t / TPR of the block
// (TPR = 128 / CB threads per row) and E = S / TPR columns. The ss layout's blocks of BP rows may be smaller
// than CB. Tile `tile`'s state offset for this thread:
__device__ __forceinline__ long tile_offset(const Params& p, int tile) {
  const int nb = p.P / p.CB, TPR = NT / p.CB;
  return ((long)(tile / nb) * p.P + (tile % nb) * p.CB + threadIdx.x / TPR) * p.S + (threadIdx.x % TPR) * (p.S / TPR);
}
// Everything of a tile after its state (st) arrived: y, the gate, Σ g² (through sss, one __syncthreads), and at
// the window's last slot the write-back.
template <int E, typename T>
__device__ __forceinline__ void stream_tile(const Params& p, int tile, const Row<E, T>& st, float* sss) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int CB = p.CB, nb = p.P / CB, blk = tile % nb, bh = tile / nb, h = bh % p.H, b = bh / p.H;
  const int R = p.H / p.G, grp = h / R, r = h % R, TPR = NT / CB;
  const int prow = blk * CB + tid / TPR, n0 = (tid % TPR) * E;
  const int W = p.W, S = p.S;
  Row<E, __nv_bfloat16> c;
  c.load(p.c + ((long)b * p.G + grp) * p.c_stride, n0);
  const float d0 = p.d0[bh], extra = p.extra[(long)bh * p.P + prow];
  const float z = bf(__bfloat162float(p.zx[((long)b * p.G + grp) * p.ZW + r * p.P + prow]) * p.scale[b]);
  float acc = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) acc += st.at(e) * c.at(e);
  for (int o = TPR / 2; o; o >>= 1) acc += __shfl_xor_sync(~0u, acc, o);
  const float gated = bf(d0 * acc + extra) * silu(z);
  const long gi = (long)bh * p.P + prow;
  if (tid % TPR == 0) {
    if (p.g_f32)
      reinterpret_cast<float*>(p.g)[gi] = gated;
    else
      reinterpret_cast<__nv_bfloat16*>(p.g)[gi] = __float2bfloat16_rn(gated);
  }
  float sq = tid % TPR == 0 ? gated * gated : 0.f;
#pragma unroll
  for (int o = 16; o; o >>= 1) sq += __shfl_xor_sync(~0u, sq, o);
  if (lane == 0) sss[warp] = sq;
  if (*p.pos % W == W - 1) {  // the window's last slot: h ← d₀ h₀ + Σᵢ wᵢ xᵢ Bᵢᵀ, in place, 8 columns at a time
    const long soff = tile_offset(p, tile);
    float ci[MAX_W];
    for (int i = 0; i < W; ++i)
      ci[i] = p.wts[(long)bh * W + i] * __bfloat162float(p.wx[(((long)b * W + i) * p.H + h) * p.P + prow]);
#pragma unroll
    for (int q = 0; q < E / 8; ++q) {
      float v[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = d0 * st.at(q * 8 + k);
      for (int i = 0; i < W; ++i) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p.wb + (((long)b * W + i) * p.G + grp) * S + n0) + q);
        float bi[8];
        bf8_to(bi, raw);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] += ci[i] * bi[k];
      }
      Row<8, T>::store(p.state, soff + q * 8, v);
    }
  }
  __syncthreads();
  if (tid == 0) {  // Σ g² per block of BP rows (a warp's CB / 4 rows lie in one)
    const int per = p.P / p.BP;
    for (int w = 0; w < NT / 32; ++w) {
      const int jj = (blk * CB + w * (CB / 4)) / p.BP;
      if (w == 0 || jj != (blk * CB + (w - 1) * (CB / 4)) / p.BP) p.ss[(long)bh * per + jj] = 0.f;
      p.ss[(long)bh * per + jj] += sss[w];
    }
  }
}

// One tile per CTA (the default).
template <int E, typename T>
__global__ void __launch_bounds__(NT) window_update(Params p) {
  __shared__ float sss[NT / 32];
  Row<E, T> st;  // the state first: nothing the kernels before write
  st.load(p.state, tile_offset(p, blockIdx.x));
  asm volatile("griddepcontrol.wait;" ::: "memory");  // kernel 1 (and with it the prep kernel) complete
  stream_tile<E, T>(p, blockIdx.x, st, sss);
}

// The coalesced stream (variant bit 1): thread t takes the 8-column chunk t % C8 (C8 = S / 8) of rows t / C8 +
// RPI · q (RPI = 128 / C8 rows per pass, q < NQ), so each load instruction of a warp reads whole rows (512
// contiguous bytes at S 128) and each thread needs one chunk of C. The NQ row sums are reduced over the C8
// lanes of a row by halving exchanges (log₂ C8 shuffles in all, not NQ · log₂ C8): lane l ends with the sum
// of row q = qsel(l), held in full by the lanes whose low log₂(C8 / NQ) bits are zero.
template <int C8, int NQ>
__device__ __forceinline__ int qsel_of(int lane) {
  int q = 0;
#pragma unroll
  for (int o = C8 / 2, n = NQ; n > 1; o >>= 1, n >>= 1)
    if (lane & o) q += n / 2;
  return q;
}
template <int C8, int NQ>
__device__ __forceinline__ float reduce_rows(float (&v)[NQ], int lane) {
#pragma unroll
  for (int o = C8 / 2, n = NQ; o >= 1; o >>= 1) {
    if (n > 1) {
      const bool up = lane & o;
#pragma unroll
      for (int j = 0; j < n / 2; ++j) {
        const float send = up ? v[j] : v[j + n / 2], keep = up ? v[j + n / 2] : v[j];
        v[j] = keep + __shfl_xor_sync(~0u, send, o);
      }
      n /= 2;
    } else {
      v[0] += __shfl_xor_sync(~0u, v[0], o);
    }
  }
  return v[0];
}

template <int C8, int NQ, typename T>
__global__ void __launch_bounds__(NT) window_stream(Params p) {
  constexpr int RPI = NT / C8, CB = RPI * NQ, S = C8 * 8;
  __shared__ float srow[CB];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, col = tid % C8, rl = tid / C8;
  const int nb = p.P / CB, blk = blockIdx.x % nb, bh = blockIdx.x / nb, h = bh % p.H, b = bh / p.H;
  const int R = p.H / p.G, grp = h / R, r = h % R, W = p.W;
  const long row0 = (long)bh * p.P + blk * CB;  // the tile's first state row
  Row<8, T> st[NQ];  // the state first: nothing the kernels before write
#pragma unroll
  for (int q = 0; q < NQ; ++q) st[q].load(p.state, (row0 + rl + RPI * q) * S + col * 8);
  asm volatile("griddepcontrol.wait;" ::: "memory");  // kernel 1 (and with it the prep kernel) complete
  const int qs = qsel_of<C8, NQ>(lane), prow = blk * CB + rl + RPI * qs;
  Row<8, __nv_bfloat16> c;
  c.load(p.c + ((long)b * p.G + grp) * p.c_stride, col * 8);
  const float d0 = p.d0[bh], extra = p.extra[(long)bh * p.P + prow];
  const float z = bf(__bfloat162float(p.zx[((long)b * p.G + grp) * p.ZW + r * p.P + prow]) * p.scale[b]);
  const bool last = *p.pos % W == W - 1;
  float v[NQ];
#pragma unroll
  for (int q = 0; q < NQ; ++q) {
    float a4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int k = 0; k < 8; ++k) a4[k & 3] += st[q].at(k) * c.at(k);
    v[q] = (a4[0] + a4[1]) + (a4[2] + a4[3]);
  }
  const float acc = reduce_rows<C8, NQ>(v, lane);
  const bool holder = (lane & (C8 / NQ - 1)) == 0;
  const float gated = bf(d0 * acc + extra) * silu(z);
  if (holder) {
    const long gi = (long)bh * p.P + prow;
    if (p.g_f32)
      reinterpret_cast<float*>(p.g)[gi] = gated;
    else
      reinterpret_cast<__nv_bfloat16*>(p.g)[gi] = __float2bfloat16_rn(gated);
    srow[prow - blk * CB] = gated * gated;
  }
  if (last) {  // the window's last slot: h ← d₀ h₀ + Σᵢ wᵢ xᵢ Bᵢᵀ, in place, a row's chunk at a time
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
      const int row = blk * CB + rl + RPI * q;
      float o[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) o[k] = d0 * st[q].at(k);
#pragma unroll 4
      for (int i = 0; i < W; ++i) {
        const float ci = p.wts[(long)bh * W + i] * __bfloat162float(p.wx[(((long)b * W + i) * p.H + h) * p.P + row]);
        float bi[8];
        bf8_to(bi, __ldg(reinterpret_cast<const uint4*>(p.wb + (((long)b * W + i) * p.G + grp) * S + col * 8)));
#pragma unroll
        for (int k = 0; k < 8; ++k) o[k] += ci * bi[k];
      }
      Row<8, T>::store(p.state, (row0 + rl + RPI * q) * S + col * 8, o);
    }
  }
  __syncthreads();
  // Σ g² per block of BP rows (CB / BP of them in the tile), a warp per block, in a fixed order
  const int per = CB / p.BP;
  for (int j = warp; j < per; j += NT / 32) {
    float sq = 0.f;
    for (int k = lane; k < p.BP; k += 32) sq += srow[j * p.BP + k];
#pragma unroll
    for (int o = 16; o; o >>= 1) sq += __shfl_xor_sync(~0u, sq, o);
    if (lane == 0) p.ss[(long)bh * (p.P / p.BP) + blk * per + j] = sq;
  }
}

// The coefficients in registers (variant bit 0): one warp per (b, h), lane l holds columns l·SL … of the
// window's B rows and C (S = 32 SL) and rows l·PL … of its x rows (P = 32 PL). Every load goes out at once,
// before the slot wj = pos mod W is known (all W slots; the slots after wj are masked), and the W products
// Bᵢ · C are reduced over the lanes together by halving exchanges: no shared memory, one round of loads.
template <int N>
struct RawT;
template <>
struct RawT<2> {
  using type = uint32_t;
};
template <>
struct RawT<4> {
  using type = uint2;
};
template <>
struct RawT<8> {
  using type = uint4;
};
template <int N>
__device__ __forceinline__ typename RawT<N>::type ldraw(const __nv_bfloat16* q) {
  return *reinterpret_cast<const typename RawT<N>::type*>(q);
}
template <int N>
__device__ __forceinline__ void straw(__nv_bfloat16* q, const typename RawT<N>::type& v) {
  *reinterpret_cast<typename RawT<N>::type*>(q) = v;
}
template <typename V>
__device__ __forceinline__ float bfat(const V& v, int k) {
  return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(&v)[k]);
}

template <int PL, int SL, int WM>
__global__ void __launch_bounds__(NT) window_coef_regs(Params p) {
  constexpr int P = 32 * PL, S = 32 * SL;
  using XR = typename RawT<PL>::type;
  using BR = typename RawT<SL>::type;
  const int lane = threadIdx.x & 31, bh = blockIdx.x * (NT / 32) + (threadIdx.x >> 5);
  if (bh >= p.B * p.H) return;
  const int h = bh % p.H, b = bh / p.H, R = p.H / p.G, grp = h / R, r = h % R, W = p.W, RP = R * P;
  const int pos = *p.pos;
  BR bw[WM];
  XR xw[WM];
#pragma unroll
  for (int i = 0; i < WM; ++i) {
    if (i < W) {
      bw[i] = ldraw<SL>(p.wb + (((long)b * W + i) * p.G + grp) * S + lane * SL);
      xw[i] = ldraw<PL>(p.wx + (((long)b * W + i) * p.H + h) * P + lane * PL);
    } else {
      bw[i] = BR{}, xw[i] = XR{};
    }
  }
  const float dt_old = lane < W ? p.wdt[((long)b * W + lane) * p.H + h] : 0.f;
  const __nv_bfloat16* xrow = p.xbc + ((long)b * p.G + grp) * p.F;
  const XR xn = ldraw<PL>(xrow + r * P + lane * PL);
  const BR bn = ldraw<SL>(xrow + RP + lane * SL), cn = ldraw<SL>(xrow + RP + S + lane * SL);
  const float zdt = __bfloat162float(p.zx[((long)b * p.G + grp) * p.ZW + 2 * RP + 2 * S + r]);
  const float scale = p.scale[b];
  const float dtb = param(p.dtb, h, p.dtb_f32), alog = param(p.alog, h, p.alog_f32);
  const float dskip = param(p.dskip, h, p.dskip_f32);
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int wj = pos % W;
  float dt = bf(zdt * scale) + dtb;
  dt = dt > 20.f ? dt : log1pf(expf(fminf(dt, 20.f)));
  if (p.clip) dt = fminf(fmaxf(dt, p.dt_lo), p.dt_hi);
  const float dt_i = lane < wj ? dt_old : lane == wj ? dt : 0.f;
  // Σ_{m ≥ i} dtₘ by a suffix scan over the lanes, then wᵢ = exp(A Σ_{m > i} dtₘ) dtᵢ and d₀ = exp(A Σ dtₘ).
  const float a = -expf(alog);
  float suf = dt_i;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float t = __shfl_down_sync(~0u, suf, o);
    if (lane + o < 32) suf += t;
  }
  const float w_i = expf(a * (suf - dt_i)) * dt_i;
  const float d0 = expf(a * __shfl_sync(~0u, suf, 0));
  // Bᵢ · C: this lane's SL columns of every slot (slot wj: this token's B), reduced over the lanes together.
  float c[SL];
#pragma unroll
  for (int k = 0; k < SL; ++k) c[k] = bfat(cn, k);
  float part[WM];
#pragma unroll
  for (int i = 0; i < WM; ++i) {
    const BR bi = i == wj ? bn : bw[i];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < SL; ++k) s += bfat(bi, k) * c[k];
    part[i] = i <= wj ? s : 0.f;
  }
  const float red = reduce_rows<32, WM>(part, lane);
  // lane i < WM takes slot i's product from a lane holding it (qsel_of<32, WM>(l) == i)
  int src = 0;
#pragma unroll
  for (int o = 16, n = WM; n > 1; o >>= 1, n >>= 1)
    if ((lane & (WM - 1)) & (n / 2)) src |= o;
  const float dot = __shfl_sync(~0u, red, src);
  const float coef = lane <= wj ? w_i * dot : 0.f;
  // extra = D x + Σᵢ wᵢ (Bᵢ · C) xᵢ over this lane's PL rows
  float e[PL];
#pragma unroll
  for (int k = 0; k < PL; ++k) e[k] = dskip * bfat(xn, k);
#pragma unroll
  for (int i = 0; i < WM; ++i) {
    const float ci = __shfl_sync(~0u, coef, i);
    const XR xi = i == wj ? xn : xw[i];
    if (i <= wj)
#pragma unroll
      for (int k = 0; k < PL; ++k) e[k] += ci * bfat(xi, k);
  }
#pragma unroll
  for (int k = 0; k < PL; ++k) p.extra[(long)bh * P + lane * PL + k] = e[k];
  straw<PL>(p.wx + (((long)b * W + wj) * p.H + h) * P + lane * PL, xn);  // this token into slot wj
  if (r == 0) straw<SL>(p.wb + (((long)b * W + wj) * p.G + grp) * S + lane * SL, bn);  // the group's B: its first head
  if (lane == 0) p.d0[bh] = d0, p.wdt[((long)b * W + wj) * p.H + h] = dt;
  if (lane < W) p.wts[(long)bh * W + lane] = lane <= wj ? w_i : 0.f;
}

template <int C8, int NQ>
cudaError_t launch_coalesced(const cudaLaunchConfig_t& cfg, const Params& p, bool f32_state) {
  return f32_state ? cudaLaunchKernelEx(&cfg, window_stream<C8, NQ, float>, p)
                   : cudaLaunchKernelEx(&cfg, window_stream<C8, NQ, __nv_bfloat16>, p);
}
template <int E>
cudaError_t launch_rowwise(const cudaLaunchConfig_t& cfg, const Params& p, bool f32_state) {
  return f32_state ? cudaLaunchKernelEx(&cfg, window_update<E, float>, p)
                   : cudaLaunchKernelEx(&cfg, window_update<E, __nv_bfloat16>, p);
}
// Whether the variants run at these shapes (P 64, S 128 or 256; the stream's tile at most 8 rows per thread).
bool coef_regs_fits(const Params& p) { return !p.fused && p.P == 64 && (p.S == 128 || p.S == 256); }
bool coalesced_fits(const Params& p) { return (p.S == 128 && (p.CB == 32 || p.CB == 64)) || (p.S == 256 && p.CB == 32); }

cudaError_t launch_pair(const Params& p, bool f32_state, cudaStream_t stream, bool pdl) {
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)((p.B * p.H + NT / 32 - 1) / (NT / 32)));
  cfg.blockDim = dim3(NT);
  cfg.stream = stream;
  cfg.attrs = at;
  cfg.numAttrs = pdl ? 1 : 0;
  if (((p.variant & 1) && !coef_regs_fits(p)) || ((p.variant & 2) && !coalesced_fits(p))) return cudaErrorNotSupported;
  cudaError_t e;
  if (p.variant & 1) {
    const bool w8 = p.W <= 8;
    e = p.S == 128 ? cudaLaunchKernelEx(&cfg, w8 ? window_coef_regs<2, 4, 8> : window_coef_regs<2, 4, 16>, p)
                   : cudaLaunchKernelEx(&cfg, w8 ? window_coef_regs<2, 8, 8> : window_coef_regs<2, 8, 16>, p);
  } else {
    cfg.dynamicSmemBytes = (size_t)(NT / 32) * (p.W * p.P + (p.W + 1) * (p.S + 1)) * 4;
    auto coef = p.fused ? window_coef<true> : window_coef<false>;
    if (cfg.dynamicSmemBytes > 48 * 1024) {  // above the default limit (W = 16 at P = 64, S = 128: 51 KB)
      const cudaError_t a =
          cudaFuncSetAttribute(coef, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)cfg.dynamicSmemBytes);
      if (a != cudaSuccess) return a;
    }
    e = cudaLaunchKernelEx(&cfg, coef, p);
  }
  if (e != cudaSuccess) return e;
  cfg.gridDim = dim3((unsigned)(p.B * p.H * (p.P / p.CB)));
  cfg.dynamicSmemBytes = 0;
  if (p.variant & 2) {
    if (p.S == 256) return launch_coalesced<32, 8>(cfg, p, f32_state);
    return p.CB == 32 ? launch_coalesced<16, 4>(cfg, p, f32_state) : launch_coalesced<16, 8>(cfg, p, f32_state);
  }
  const int E = p.S / (NT / p.CB);
  if (E == 16) return launch_rowwise<16>(cfg, p, f32_state);
  if (E == 32) return launch_rowwise<32>(cfg, p, f32_state);
  if (E == 64) return launch_rowwise<64>(cfg, p, f32_state);
  return cudaErrorInvalidValue;
}

bool f32_or_bf16(ffi::AnyBuffer x) { return x.element_type() == ffi::F32 || x.element_type() == ffi::BF16; }

using Buf = ffi::AnyBuffer;
using Out = ffi::Result<ffi::AnyBuffer>;

// What both targets share: the state, the parameters, the window buffers, the outputs and the scratch; F is the
// conv channels per group (from xbc or the conv ring). Returns an error message, or "" with p filled.
std::string setup(Params& p, Buf zx, Buf ssm, Buf alog, Buf dskip, Buf dtb, Buf pos, Buf wx, Buf wb, Buf wdt, Out g,
                  Out ss, Out ssm_out, Out wx_out, Out wb_out, Out wdt_out, Out d0, Out extra, Out wts, int64_t F,
                  int64_t bp, int64_t cb, float dt_lo, float dt_hi) {
  const auto sd = ssm.dimensions(), zd = zx.dimensions(), wd = wx.dimensions(), bd = wb.dimensions();
  if (sd.size() != 4 || zd.size() != 3 || wd.size() != 4 || bd.size() != 4)
    return "want ssm (B, H, P, S), zx (B, G, ZW), win_x (B, W, H, P), win_B (B, W, G, S)";
  if (zx.element_type() != ffi::BF16 || wx.element_type() != ffi::BF16 || wb.element_type() != ffi::BF16 ||
      wdt.element_type() != ffi::F32 || pos.element_type() != ffi::S32 || ss->element_type() != ffi::F32)
    return "zx, win_x and win_B must be bfloat16; win_dt and ss float32; pos int32";
  if (!f32_or_bf16(ssm) || !f32_or_bf16(alog) || !f32_or_bf16(dskip) || !f32_or_bf16(dtb) || !f32_or_bf16(*g))
    return "the state, A_log, D, dt_bias and g must be float32 or bfloat16";
  const int B = (int)sd[0];
  p.B = B, p.H = (int)sd[1], p.P = (int)sd[2], p.S = (int)sd[3], p.G = (int)zd[1], p.ZW = (int)zd[2], p.F = (int)F;
  p.W = (int)wd[1], p.BP = (int)bp, p.CB = cb > 0 ? (int)cb : (int)bp;
  const int R = p.G ? p.H / p.G : 0;
  if (p.G < 1 || p.H % p.G || p.ZW != 2 * R * p.P + 2 * p.S + R || p.F != R * p.P + 2 * p.S || zd[0] != B ||
      wd[0] != B || wd[2] != p.H || wd[3] != p.P || bd[0] != B || bd[1] != p.W || bd[2] != p.G || bd[3] != p.S)
    return "inconsistent shapes";
  if (p.W < 1 || p.W > MAX_W || p.S > MAX_S || p.S < 8 || p.P < 8 || (p.S & (p.S - 1)) || (p.P & (p.P - 1)) ||
      p.BP < 1 || p.P % p.BP || p.CB < 4 || p.CB > NT || NT % p.CB || p.P % p.CB || p.CB % p.BP ||
      p.BP % (p.CB / 4))
    return "needs W ≤ 16, P and S powers of two ≥ 8, S ≤ 256, and blocks of state rows (bp for ss, cb ≥ 4 per "
           "CTA) with cb | 128, cb | P, bp | cb and cb / 4 | bp";
  const int E = p.S / (NT / p.CB);
  if (E != 16 && E != 32 && E != 64) return "needs S / (128 / cb) in {16, 32, 64} state columns per thread";
  if (ssm_out->untyped_data() != ssm.untyped_data() || wx_out->untyped_data() != wx.untyped_data() ||
      wb_out->untyped_data() != wb.untyped_data() || wdt_out->untyped_data() != wdt.untyped_data())
    return "the state and the window buffers must be updated in place (aliased outputs)";
  if (d0->element_count() != (size_t)B * p.H || extra->element_count() != (size_t)B * p.H * p.P ||
      wts->element_count() != (size_t)B * p.H * p.W)
    return "the scratch outputs d0 (B, H), extra (B, H, P) and wts (B, H, W) have the wrong sizes";
  p.zx = reinterpret_cast<const __nv_bfloat16*>(zx.untyped_data());
  p.state = ssm_out->untyped_data();
  p.alog = alog.untyped_data(), p.dskip = dskip.untyped_data(), p.dtb = dtb.untyped_data();
  p.alog_f32 = alog.element_type() == ffi::F32, p.dskip_f32 = dskip.element_type() == ffi::F32;
  p.dtb_f32 = dtb.element_type() == ffi::F32, p.g_f32 = g->element_type() == ffi::F32;
  p.pos = reinterpret_cast<const int*>(pos.untyped_data());
  p.wx = reinterpret_cast<__nv_bfloat16*>(wx_out->untyped_data());
  p.wb = reinterpret_cast<__nv_bfloat16*>(wb_out->untyped_data());
  p.wdt = reinterpret_cast<float*>(wdt_out->untyped_data());
  p.g = g->untyped_data();
  p.ss = reinterpret_cast<float*>(ss->untyped_data());
  p.d0 = reinterpret_cast<float*>(d0->untyped_data());
  p.extra = reinterpret_cast<float*>(extra->untyped_data());
  p.wts = reinterpret_cast<float*>(wts->untyped_data());
  p.dt_lo = dt_lo, p.dt_hi = dt_hi, p.clip = dt_lo > 0.f || dt_hi < INFINITY;
  return "";
}

ffi::Error run(const Params& p, Buf ssm, cudaStream_t stream, bool pdl, const char* name) {
  const cudaError_t e = launch_pair(p, ssm.element_type() == ffi::F32, stream, pdl);
  if (e != cudaSuccess) return ffi::Error::Internal(std::string(name) + ": " + cudaGetErrorString(e));
  return ffi::Error::Success();
}

}  // namespace

// After the Pallas prep kernel (kernels/decode.py's `ssm_step_prep`): its conv outputs xbc and 1/rms scale.
ffi::Error SsmUpdateWindowImpl(cudaStream_t stream, Buf zx, Buf xbc, Buf scale, Buf ssm, Buf alog, Buf dskip, Buf dtb,
                               Buf pos, Buf wx, Buf wb, Buf wdt, Out g, Out ss, Out ssm_out, Out wx_out, Out wb_out,
                               Out wdt_out, Out d0, Out extra, Out wts, int64_t bp, int64_t cb, float dt_lo,
                               float dt_hi, bool pdl, int64_t variant) {
  Params p{};
  const auto xd = xbc.dimensions();
  std::string m = xd.size() != 3 || xbc.element_type() != ffi::BF16 || scale.element_type() != ffi::F32
                      ? "want xbc (B, G, F) bfloat16 and scale (B,) float32"
                      : setup(p, zx, ssm, alog, dskip, dtb, pos, wx, wb, wdt, g, ss, ssm_out, wx_out, wb_out, wdt_out,
                              d0, extra, wts, xd[2], bp, cb, dt_lo, dt_hi);
  if (!m.empty()) return ffi::Error::InvalidArgument("ssm_update_window: " + m);
  p.xbc = reinterpret_cast<const __nv_bfloat16*>(xbc.untyped_data());
  p.scale = reinterpret_cast<const float*>(scale.untyped_data());
  p.c = p.xbc + (p.H / p.G) * p.P + p.S, p.c_stride = p.F;  // xbc's C columns
  p.variant = (int)variant;
  return run(p, ssm, stream, pdl, "ssm_update_window");
}

// The whole split step (the fused target): kernel 1 does the prep's work for its head (fused_prep).
ffi::Error SsmStepWindowImpl(cudaStream_t stream, Buf zx, Buf ring, Buf convw, Buf convb, Buf norm_in, Buf ssm,
                             Buf alog, Buf dskip, Buf dtb, Buf pos, Buf wx, Buf wb, Buf wdt, Out g, Out ss,
                             Out ring_out, Out ssm_out, Out wx_out, Out wb_out, Out wdt_out, Out d0, Out extra, Out wts,
                             Out scale, Out c, int64_t bp, int64_t cb, float dt_lo, float dt_hi, float eps,
                             int64_t variant) {
  Params p{};
  const auto rd = ring.dimensions(), nd = norm_in.dimensions();
  std::string m;
  if (rd.size() != 4 || ring.element_type() != ffi::BF16 || nd.size() != 2 || !f32_or_bf16(norm_in) ||
      !f32_or_bf16(convw) || !f32_or_bf16(convb) || scale->element_type() != ffi::F32 || c->element_type() != ffi::BF16)
    m = "want the conv ring (B, K, G, F) bfloat16, norm_in (B, D), conv weights float32 or bfloat16";
  else
    m = setup(p, zx, ssm, alog, dskip, dtb, pos, wx, wb, wdt, g, ss, ssm_out, wx_out, wb_out, wdt_out, d0, extra,
              wts, rd[3], bp, cb, dt_lo, dt_hi);
  if (m.empty() && (p.H % (NT / 32) || rd[0] != p.B || rd[2] != p.G || nd[0] != p.B ||
                    convw.element_count() != (size_t)rd[1] * p.G * p.F || convb.element_count() != (size_t)p.G * p.F ||
                    scale->element_count() != (size_t)p.B || c->element_count() != (size_t)p.B * p.G * p.S))
    m = "needs heads % 4 == 0 and consistent conv ring, weights, norm input and scratch shapes";
  if (m.empty() && ring_out->untyped_data() != ring.untyped_data()) m = "the conv ring must be updated in place";
  if (!m.empty()) return ffi::Error::InvalidArgument("ssm_step_window: " + m);
  p.fused = 1, p.K = (int)rd[1], p.D = (int)nd[1], p.eps = eps;
  p.ring = reinterpret_cast<__nv_bfloat16*>(ring_out->untyped_data());
  p.convw = convw.untyped_data(), p.convb = convb.untyped_data(), p.norm_in = norm_in.untyped_data();
  p.convw_f32 = convw.element_type() == ffi::F32, p.convb_f32 = convb.element_type() == ffi::F32;
  p.norm_f32 = norm_in.element_type() == ffi::F32;
  p.scale_out = reinterpret_cast<float*>(scale->untyped_data());
  p.scale = p.scale_out;
  p.c_out = reinterpret_cast<__nv_bfloat16*>(c->untyped_data());
  p.c = p.c_out, p.c_stride = p.S;
  p.variant = (int)variant;
  return run(p, ssm, stream, false, "ssm_step_window");
}

#define MJ_ARGS(n) .Arg<ffi::AnyBuffer>()
#define MJ_RETS(n) .Ret<ffi::AnyBuffer>()
// zx, xbc, scale, ssm, A_log, D, dt_bias, pos, win_x, win_B, win_dt → g, ss, ssm, win_x, win_B, win_dt (aliased),
// d0, extra, wts (scratch)
XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaJaxSsmUpdateWindow, SsmUpdateWindowImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  MJ_ARGS(1) MJ_ARGS(2) MJ_ARGS(3) MJ_ARGS(4) MJ_ARGS(5) MJ_ARGS(6) MJ_ARGS(7)
                                  MJ_ARGS(8) MJ_ARGS(9) MJ_ARGS(10) MJ_ARGS(11)
                                  MJ_RETS(1) MJ_RETS(2) MJ_RETS(3) MJ_RETS(4) MJ_RETS(5) MJ_RETS(6) MJ_RETS(7)
                                  MJ_RETS(8) MJ_RETS(9)
                                  .Attr<int64_t>("bp")
                                  .Attr<int64_t>("cb")
                                  .Attr<float>("dt_lo")
                                  .Attr<float>("dt_hi")
                                  .Attr<bool>("pdl")
                                  .Attr<int64_t>("variant"),
                              {ffi::Traits::kCmdBufferCompatible});
// zx, conv ring, conv_w, conv_b, norm_in, ssm, A_log, D, dt_bias, pos, win_x, win_B, win_dt → g, ss, ring, ssm,
// win_x, win_B, win_dt (aliased), d0, extra, wts, scale, C (scratch)
XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaJaxSsmStepWindow, SsmStepWindowImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  MJ_ARGS(1) MJ_ARGS(2) MJ_ARGS(3) MJ_ARGS(4) MJ_ARGS(5) MJ_ARGS(6) MJ_ARGS(7)
                                  MJ_ARGS(8) MJ_ARGS(9) MJ_ARGS(10) MJ_ARGS(11) MJ_ARGS(12) MJ_ARGS(13)
                                  MJ_RETS(1) MJ_RETS(2) MJ_RETS(3) MJ_RETS(4) MJ_RETS(5) MJ_RETS(6) MJ_RETS(7)
                                  MJ_RETS(8) MJ_RETS(9) MJ_RETS(10) MJ_RETS(11) MJ_RETS(12)
                                  .Attr<int64_t>("bp")
                                  .Attr<int64_t>("cb")
                                  .Attr<float>("dt_lo")
                                  .Attr<float>("dt_hi")
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("variant"),
                              {ffi::Traits::kCmdBufferCompatible});
