// The decode step's state update with a state write-back window, as an XLA FFI call: the second launch of
// kernels/decode.py's split step (`ssm_step(split=True, window=…)`, `_update_kernel` with `_head_windowed`),
// same inputs, outputs and rounding, in CUDA. Built with nvcc on first use (kernels/cuda_build.py) and called
// from kernels/decode.py's `_split_step` where it runs (kernels/ssm_update.py says where).
//
// Why: at batch 32 a 2.7B layer moves 42 MB of bf16 state each way per token. With the window the state is
// read every step but written only every W steps (decode.py's docstring has the algebra): 84 → ≈ 50 MB. The
// Pallas version ran slower than the per-token write (benchmarks/README.md, "State write-back window"), and so
// did this kernel's first version (one kernel: each CTA staged the window and computed the W decays and dot
// products before its state's products; the CTAs' chain of dependent steps, not the bytes, set its time).
// Two launches, behind the Pallas prep kernel (its conv outputs xbc and the input norm's 1/rms in):
//   1. window_coef, one warp per (b, h): this token's dt, the window's weights and d₀, the W products Bᵢ · C,
//      folded into extra[p] (below); this token into slot wj of the window buffers. Latency-bound: every load
//      goes out in one round, before the slot is known, and everything stays in registers (4.4 µs per 2.7B
//      layer at batch 32 on an H100, against 9.0 for a version staging the window in shared memory).
//   2. window_stream, one CTA of 128 threads per (b, h, block of CB state rows): the state as a coalesced
//      stream (20.6 µs per layer there, against 22.6 for a row-per-thread layout), then y = d₀ (h₀ · C) +
//      extra, the gate, Σ g², and every W-th step the write-back.
// Programmatic dependent launch for kernel 2 (`pdl` 1, the default: its state loads overlap kernel 1; 7,769
// against 7,703 tok/s without), opt-in for kernel 1 too (2: its window loads overlap the prep kernel, which then
// triggers first thing; slower with the earlier kernels).
// (Measured slower and removed: the prep kernel's work in kernel 1, a CTA per block of 8 or 4 heads sharing the
// norm and the group's B, C conv, 7,375 against 7,769 tok/s, and before it a warp per head doing all of it,
// 6,605 against 6,965; a persistent stream loading its next tile ahead, 6,202 against 6,986.)
//
// Per token (slot wj = pos mod W of the window; slots after wj hold no token of this window: dt 0):
//   dt   = clip(softplus(round(zx_dt · scale) + dt_bias)),  A = −exp(A_log)
//   wᵢ   = exp(A Σ_{m>i} dtₘ) dtᵢ,  d₀ = exp(A Σ dtₘ)                    (i, m ≤ wj)
//   y    = d₀ (h₀ · C) + extra,   extra = D x + Σᵢ wᵢ (Bᵢ · C) xᵢ
//   g    = round(y) · SiLU(round(zx_z · scale)),  ss[b, h, j] = Σ g²  (the gated norm's statistics)
//   at wj = W − 1:  h ← d₀ h₀ + Σᵢ wᵢ xᵢ Bᵢᵀ  (written in place, the state's dtype)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int NT = 128;    // threads per CTA
constexpr int MAX_W = 16;  // window slots

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
  // Kernel 2 reads C at c + (b · G + grp) · c_stride (xbc's C columns).
  const __nv_bfloat16* c;
  int c_stride;
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
__device__ __forceinline__ float bf(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }

// 8 consecutive state elements of one row: bf16 (one 16-byte load) or float32 (two).
template <typename T>
struct Row8;
template <>
struct Row8<__nv_bfloat16> {
  uint4 raw;
  __device__ __forceinline__ void load(const void* base, long off) {  // streamed: read once per token
    raw = __ldcs(reinterpret_cast<const uint4*>(reinterpret_cast<const __nv_bfloat16*>(base) + off));
  }
  __device__ __forceinline__ float at(int e) const { return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(&raw)[e]); }
  __device__ __forceinline__ static void store(void* base, long off, const float* v) {
    __stcs(reinterpret_cast<uint4*>(reinterpret_cast<__nv_bfloat16*>(base) + off), pack8(v));
  }
};
template <>
struct Row8<float> {
  float4 raw[2];
  __device__ __forceinline__ void load(const void* base, long off) {
    const float4* p = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(base) + off);
    raw[0] = __ldcs(p), raw[1] = __ldcs(p + 1);
  }
  __device__ __forceinline__ float at(int e) const { return reinterpret_cast<const float*>(raw)[e]; }
  __device__ __forceinline__ static void store(void* base, long off, const float* v) {
    float4* p = reinterpret_cast<float4*>(reinterpret_cast<float*>(base) + off);
    __stcs(p, make_float4(v[0], v[1], v[2], v[3])), __stcs(p + 1, make_float4(v[4], v[5], v[6], v[7]));
  }
};

// NQ values per lane summed over groups of C8 lanes (C8 a power of two ≤ 32, NQ ≤ C8) by halving exchanges:
// log₂ C8 shuffles in all, not NQ · log₂ C8. Lane l ends with the group's sum of value qsel_of(l), held in full
// by every lane of the group with the same qsel (those whose low log₂(C8 / NQ) bits are zero are one each).
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

// What kernel 1 reads for head h that no kernel of this step writes: the window's slots (all W: the slot is
// not known yet), their dt, this token's dt column and the head's parameters.
template <int PL, int SL, int WM>
struct HeadIn {
  typename RawT<SL>::type bw[WM];
  typename RawT<PL>::type xw[WM];
  float dt_old, zdt, dtb, alog, dskip;
  int pos;
  __device__ __forceinline__ void load(const Params& p, int b, int h, int grp, int r, int lane) {
    constexpr int P = 32 * PL, S = 32 * SL;
    const int W = p.W;
    pos = *p.pos;
#pragma unroll
    for (int i = 0; i < WM; ++i) {
      if (i < W) {
        bw[i] = ldraw<SL>(p.wb + (((long)b * W + i) * p.G + grp) * S + lane * SL);
        xw[i] = ldraw<PL>(p.wx + (((long)b * W + i) * p.H + h) * P + lane * PL);
      } else {
        bw[i] = {}, xw[i] = {};
      }
    }
    dt_old = lane < W ? p.wdt[((long)b * W + lane) * p.H + h] : 0.f;
    zdt = __bfloat162float(p.zx[((long)b * p.G + grp) * p.ZW + 2 * (p.H / p.G) * P + 2 * S + r]);
    dtb = param(p.dtb, h, p.dtb_f32), alog = param(p.alog, h, p.alog_f32), dskip = param(p.dskip, h, p.dskip_f32);
  }
};

// After the loads: dt, the weights, d₀, the products Bᵢ · C, extra; this token into slot wj.
template <int PL, int SL, int WM>
__device__ __forceinline__ void coef_body(const Params& p, const HeadIn<PL, SL, WM>& in, int b, int h, int grp, int r,
                                          int lane, typename RawT<PL>::type xn, typename RawT<SL>::type bn,
                                          typename RawT<SL>::type cn, float scale) {
  constexpr int P = 32 * PL, S = 32 * SL;
  using XR = typename RawT<PL>::type;
  using BR = typename RawT<SL>::type;
  const int W = p.W, bh = b * p.H + h, pos = in.pos;
  const float zdt = in.zdt, dtb = in.dtb, alog = in.alog, dskip = in.dskip, dt_old = in.dt_old;
  const BR* bw = in.bw;
  const XR* xw = in.xw;
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

// Kernel 1: one warp per (b, h), lane l holds columns l·SL … of the window's B rows and C (S = 32 SL) and rows
// l·PL … of its x rows (P = 32 PL). Every load goes out at once, before the slot wj = pos mod W is known (all W
// slots; those after wj are masked), and the W products Bᵢ · C are reduced over the lanes together.
template <int PL, int SL, int WM, bool PDL>
__global__ void __launch_bounds__(NT) window_coef(Params p) {
  constexpr int P = 32 * PL, S = 32 * SL;
  using XR = typename RawT<PL>::type;
  using BR = typename RawT<SL>::type;
  const int lane = threadIdx.x & 31, bh = blockIdx.x * (NT / 32) + (threadIdx.x >> 5);
  if (bh >= p.B * p.H) return;
  const int h = bh % p.H, b = bh / p.H, R = p.H / p.G, grp = h / R, r = h % R, RP = R * P;
  HeadIn<PL, SL, WM> in;
  in.load(p, b, h, grp, r, lane);
  // Above, nothing the prep kernel writes; below, its outputs: launched under programmatic dependent launch
  // (opt-in, pdl 2) the loads above overlap the prep kernel.
  if (PDL) asm volatile("griddepcontrol.wait;" ::: "memory");
  const __nv_bfloat16* xrow = p.xbc + ((long)b * p.G + grp) * p.F;
  const XR xn = ldraw<PL>(xrow + r * P + lane * PL);
  const BR bn = ldraw<SL>(xrow + RP + lane * SL), cn = ldraw<SL>(xrow + RP + S + lane * SL);
  const float scale = p.scale[b];
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  coef_body<PL, SL, WM>(p, in, b, h, grp, r, lane, xn, bn, cn, scale);
}

// Kernel 2, the state stream: thread t takes the 8-column chunk t % C8 (C8 = S / 8) of rows t / C8 + RPI · q
// (RPI = 128 / C8 rows per pass, q < NQ), so each load instruction of a warp reads whole rows (512 contiguous
// bytes at S 128) and each thread needs one chunk of C; the row sums by reduce_rows.
template <int C8, int NQ, typename T>
__global__ void __launch_bounds__(NT) window_stream(Params p) {
  constexpr int RPI = NT / C8, CB = RPI * NQ, S = C8 * 8;
  __shared__ float srow[CB];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, col = tid % C8, rl = tid / C8;
  const int nb = p.P / CB, blk = blockIdx.x % nb, bh = blockIdx.x / nb, h = bh % p.H, b = bh / p.H;
  const int R = p.H / p.G, grp = h / R, r = h % R, W = p.W;
  const long row0 = (long)bh * p.P + blk * CB;  // the tile's first state row
  Row8<T> st[NQ];  // the state first: nothing the kernels before write
#pragma unroll
  for (int q = 0; q < NQ; ++q) st[q].load(p.state, (row0 + rl + RPI * q) * S + col * 8);
  asm volatile("griddepcontrol.wait;" ::: "memory");  // kernel 1 (and with it the prep kernel) complete
  const int qs = qsel_of<C8, NQ>(lane), prow = blk * CB + rl + RPI * qs;
  Row8<__nv_bfloat16> c;
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
      Row8<T>::store(p.state, (row0 + rl + RPI * q) * S + col * 8, o);
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

template <int C8, int NQ>
cudaError_t launch_stream(const cudaLaunchConfig_t& cfg, const Params& p, bool f32_state) {
  return f32_state ? cudaLaunchKernelEx(&cfg, window_stream<C8, NQ, float>, p)
                   : cudaLaunchKernelEx(&cfg, window_stream<C8, NQ, __nv_bfloat16>, p);
}

template <bool PDL>
cudaError_t launch_coef_t(const cudaLaunchConfig_t& cfg, const Params& p) {
  const bool w8 = p.W <= 8;  // (P 64, S 128 or 256 and the tiles below: setup's checks)
  return p.S == 128
             ? cudaLaunchKernelEx(&cfg, w8 ? window_coef<2, 4, 8, PDL> : window_coef<2, 4, 16, PDL>, p)
             : cudaLaunchKernelEx(&cfg, w8 ? window_coef<2, 8, 8, PDL> : window_coef<2, 8, 16, PDL>, p);
}
cudaError_t launch_coef(const cudaLaunchConfig_t& cfg, const Params& p, bool pdl) {
  return pdl ? launch_coef_t<true>(cfg, p) : launch_coef_t<false>(cfg, p);
}

// Kernel 1, then kernel 2.
cudaError_t launch_pair(const Params& p, bool f32_state, cudaStream_t stream, int pdl) {
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)((p.B * p.H + NT / 32 - 1) / (NT / 32)));
  cfg.blockDim = dim3(NT);
  cfg.stream = stream;
  cfg.attrs = at;
  cfg.numAttrs = pdl >= 2 ? 1 : 0;  // (opt-in) kernel 1's window loads overlap the prep kernel
  const cudaError_t e = launch_coef(cfg, p, pdl >= 2);
  if (e != cudaSuccess) return e;
  cfg.gridDim = dim3((unsigned)(p.B * p.H * (p.P / p.CB)));
  cfg.blockDim = dim3(NT);
  cfg.dynamicSmemBytes = 0;
  cfg.numAttrs = pdl >= 1 ? 1 : 0;  // (the default) its state loads start once kernel 1's CTAs have issued theirs
  if (p.S == 256) return launch_stream<32, 8>(cfg, p, f32_state);
  return p.CB == 32 ? launch_stream<16, 4>(cfg, p, f32_state) : launch_stream<16, 8>(cfg, p, f32_state);
}

bool f32_or_bf16(ffi::AnyBuffer x) { return x.element_type() == ffi::F32 || x.element_type() == ffi::BF16; }

using Buf = ffi::AnyBuffer;
using Out = ffi::Result<ffi::AnyBuffer>;

// The shapes, dtypes and aliasing checked into p (F: the conv channels per group); returns
// an error message, or "" with p filled.
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
  p.B = B, p.H = (int)sd[1], p.P = (int)sd[2], p.S = (int)sd[3], p.G = (int)zd[1], p.ZW = (int)zd[2];
  p.F = (int)F, p.W = (int)wd[1], p.BP = (int)bp, p.CB = cb > 0 ? (int)cb : (int)bp;
  const int R = p.G ? p.H / p.G : 0;
  if (p.G < 1 || p.H % p.G || p.ZW != 2 * R * p.P + 2 * p.S + R || p.F != R * p.P + 2 * p.S || zd[0] != B ||
      wd[0] != B || wd[2] != p.H || wd[3] != p.P || bd[0] != B || bd[1] != p.W || bd[2] != p.G || bd[3] != p.S)
    return "inconsistent shapes";
  // (the kernels' register tiles: kernels/ssm_update.py's `unsupported` says the same before the call)
  if (p.P != 64 || (p.S != 128 && p.S != 256) || p.W < 1 || p.W > MAX_W || (p.CB != 32 && p.CB != 64) ||
      (p.S == 256 && p.CB != 32) || p.BP < 1 || p.CB % p.BP)
    return "needs head dim 64, state size 128 or 256, W ≤ 16, 32 or 64 state rows per CTA (32 at state size 256) "
           "and bp | rows per CTA";
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

ffi::Error run(const Params& p, Buf ssm, cudaStream_t stream, int64_t pdl, const char* name) {
  const cudaError_t e = launch_pair(p, ssm.element_type() == ffi::F32, stream, (int)pdl);
  if (e != cudaSuccess) return ffi::Error::Internal(std::string(name) + ": " + cudaGetErrorString(e));
  return ffi::Error::Success();
}

}  // namespace

// After the Pallas prep kernel (kernels/decode.py's `ssm_step_prep`): its conv outputs xbc and 1/rms scale.
ffi::Error SsmUpdateWindowImpl(cudaStream_t stream, Buf zx, Buf xbc, Buf scale, Buf ssm, Buf alog, Buf dskip, Buf dtb,
                               Buf pos, Buf wx, Buf wb, Buf wdt, Out g, Out ss, Out ssm_out, Out wx_out, Out wb_out,
                               Out wdt_out, Out d0, Out extra, Out wts, int64_t bp, int64_t cb, float dt_lo,
                               float dt_hi, int64_t pdl) {
  Params p{};
  const auto xd = xbc.dimensions(), sd = ssm.dimensions(), zd = zx.dimensions();
  std::string m = xd.size() != 3 || xbc.element_type() != ffi::BF16 || scale.element_type() != ffi::F32
                      ? "want xbc (B, G, F) bfloat16 and scale (B,) float32"
                      : setup(p, zx, ssm, alog, dskip, dtb, pos, wx, wb, wdt, g, ss, ssm_out, wx_out, wb_out, wdt_out,
                              d0, extra, wts, xd[2], bp, cb, dt_lo, dt_hi);
  if (m.empty() && (xd[0] != sd[0] || xd[1] != zd[1] || scale.element_count() != (size_t)sd[0]))
    m = "xbc (B, G, F) and scale (B,) do not match the state and zx";
  if (!m.empty()) return ffi::Error::InvalidArgument("ssm_update_window: " + m);
  p.xbc = reinterpret_cast<const __nv_bfloat16*>(xbc.untyped_data());
  p.scale = reinterpret_cast<const float*>(scale.untyped_data());
  p.c = p.xbc + (p.H / p.G) * p.P + p.S, p.c_stride = p.F;  // xbc's C columns
  return run(p, ssm, stream, pdl, "ssm_update_window");
}

// zx, xbc, scale, ssm, A_log, D, dt_bias, pos, win_x, win_B, win_dt → g, ss, ssm, win_x, win_B, win_dt (aliased),
// d0, extra, wts (scratch)
XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaJaxSsmUpdateWindow, SsmUpdateWindowImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>()
                                  .Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>()
                                  .Ret<Buf>().Ret<Buf>().Ret<Buf>().Ret<Buf>().Ret<Buf>().Ret<Buf>()
                                  .Ret<Buf>().Ret<Buf>().Ret<Buf>()
                                  .Attr<int64_t>("bp")
                                  .Attr<int64_t>("cb")
                                  .Attr<float>("dt_lo")
                                  .Attr<float>("dt_hi")
                                  .Attr<int64_t>("pdl"),
                              {ffi::Traits::kCmdBufferCompatible});
