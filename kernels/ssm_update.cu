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
//   2. window_update, one CTA of 128 threads per (b, h, block of CB state rows): thread t takes row t / TPR of
//      the block and E = S / TPR consecutive state columns (TPR = 128 / CB). A plain stream: the state's
//      loads first (they depend on nothing the launches before write, so under programmatic dependent launch
//      they overlap kernel 1), then y = d₀ (h₀ · C) + extra, the gate, Σ g², and every W-th step the write-back.
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
};

__device__ __forceinline__ float param(const void* p, int i, int f32) {
  return f32 ? reinterpret_cast<const float*>(p)[i] : __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
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
    for (int q = 0; q < E / 8; ++q) {
      uint4 o;
      uint32_t* w = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        __nv_bfloat162 h2 = __floats2bfloat162_rn(v[q * 8 + 2 * k], v[q * 8 + 2 * k + 1]);
        w[k] = *reinterpret_cast<uint32_t*>(&h2);
      }
      __stcs(p + q, o);
    }
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
// bound, so its loads go out together (16-byte vectors, the window's before the wait) and lane i takes slot i.
__device__ __forceinline__ void bf8_to(float* dst, const uint4& v) {
  const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
  for (int k = 0; k < 8; ++k) dst[k] = __bfloat162float(h[k]);
}
// Rows `n` of `len` bf16 (len % 8 == 0) from src(i) into dst[i · stride …]: 4 vector loads per lane in flight.
template <typename Src>
__device__ __forceinline__ void stage_rows(float* dst, int stride, int n, int len, int lane, Src src) {
  const int per = len / 8, total = n * per;
  for (int base = lane; base < total; base += 128) {
    uint4 v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (base + 32 * k < total) v[k] = *src((base + 32 * k) / per, (base + 32 * k) % per * 8);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int idx = base + 32 * k;
      if (idx < total) bf8_to(dst + idx / per * stride + idx % per * 8, v[k]);
    }
  }
}

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
  stage_rows(sx, P, wj, P, lane, [&](int i, int q) {
    return reinterpret_cast<const uint4*>(p.wx + (((long)b * W + i) * p.H + h) * P + q);
  });
  stage_rows(sB, SB, wj, S, lane, [&](int i, int q) {
    return reinterpret_cast<const uint4*>(p.wb + (((long)b * W + i) * p.G + grp) * S + q);
  });
  asm volatile("griddepcontrol.wait;" ::: "memory");  // the prep kernel's outputs
  const __nv_bfloat16* zrow = p.zx + ((long)b * p.G + grp) * p.ZW;
  const __nv_bfloat16* xrow = p.xbc + ((long)b * p.G + grp) * p.F;
  const float scale = p.scale[b], zdt = __bfloat162float(zrow[2 * RP + 2 * S + r]);
  const float dtb = param(p.dtb, h, p.dtb_f32), alog = param(p.alog, h, p.alog_f32);
  const float dskip = param(p.dskip, h, p.dskip_f32);
  {  // this token's x (into slot wj), B (slot wj) and C (row wj + 1 ≤ W, never read as a slot): loads together
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

// Kernel 2: the state stream. One CTA per (b, h, block of CB rows); thread t: row t / TPR of the block (TPR =
// 128 / CB threads per row), E = S / TPR columns. The ss layout's blocks of BP rows may be smaller than CB.
template <int E, typename T>
__global__ void __launch_bounds__(NT) window_update(Params p) {
  __shared__ float sss[NT / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int CB = p.CB, nb = p.P / CB, blk = blockIdx.x % nb, bh = blockIdx.x / nb, h = bh % p.H, b = bh / p.H;
  const int R = p.H / p.G, grp = h / R, r = h % R, TPR = NT / CB;
  const int prow = blk * CB + tid / TPR, n0 = (tid % TPR) * E;
  const int W = p.W, S = p.S;
  Row<E, T> st;  // the state first: nothing the kernels before write
  const long soff = ((long)bh * p.P + prow) * S + n0;
  st.load(p.state, soff);
  asm volatile("griddepcontrol.wait;" ::: "memory");  // kernel 1 (and with it the prep kernel) complete
  const __nv_bfloat16* xrow = p.xbc + ((long)b * p.G + grp) * p.F;
  Row<E, __nv_bfloat16> c;
  c.load(xrow, R * p.P + S + n0);
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

cudaError_t launch_pair(const Params& p, bool f32_state, int E, cudaStream_t stream, bool pdl) {
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)((p.B * p.H + NT / 32 - 1) / (NT / 32)));
  cfg.blockDim = dim3(NT);
  cfg.dynamicSmemBytes = (size_t)(NT / 32) * (p.W * p.P + (p.W + 1) * (p.S + 1)) * 4;
  cfg.stream = stream;
  cfg.attrs = at;
  cfg.numAttrs = pdl ? 1 : 0;
  if (cfg.dynamicSmemBytes > 48 * 1024) {  // above the default limit (W = 16 at P = 64, S = 128: 51 KB)
    const cudaError_t a = cudaFuncSetAttribute(window_coef, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               (int)cfg.dynamicSmemBytes);
    if (a != cudaSuccess) return a;
  }
  cudaError_t e = cudaLaunchKernelEx(&cfg, window_coef, p);
  if (e != cudaSuccess) return e;
  cfg.gridDim = dim3((unsigned)(p.B * p.H * (p.P / p.CB)));
  cfg.dynamicSmemBytes = 0;
#define MJ_LAUNCH(EV)                                                                                       \
  if (E == EV)                                                                                              \
    return f32_state ? cudaLaunchKernelEx(&cfg, window_update<EV, float>, p)                                \
                     : cudaLaunchKernelEx(&cfg, window_update<EV, __nv_bfloat16>, p);
  MJ_LAUNCH(16)
  MJ_LAUNCH(32)
  MJ_LAUNCH(64)
#undef MJ_LAUNCH
  return cudaErrorInvalidValue;
}

bool f32_or_bf16(ffi::AnyBuffer x) { return x.element_type() == ffi::F32 || x.element_type() == ffi::BF16; }

}  // namespace

ffi::Error SsmUpdateWindowImpl(cudaStream_t stream, ffi::AnyBuffer zx, ffi::AnyBuffer xbc, ffi::AnyBuffer scale,
                               ffi::AnyBuffer ssm, ffi::AnyBuffer alog, ffi::AnyBuffer dskip, ffi::AnyBuffer dtb,
                               ffi::AnyBuffer pos, ffi::AnyBuffer wx, ffi::AnyBuffer wb, ffi::AnyBuffer wdt,
                               ffi::Result<ffi::AnyBuffer> g, ffi::Result<ffi::AnyBuffer> ss,
                               ffi::Result<ffi::AnyBuffer> ssm_out, ffi::Result<ffi::AnyBuffer> wx_out,
                               ffi::Result<ffi::AnyBuffer> wb_out, ffi::Result<ffi::AnyBuffer> wdt_out,
                               ffi::Result<ffi::AnyBuffer> d0, ffi::Result<ffi::AnyBuffer> extra,
                               ffi::Result<ffi::AnyBuffer> wts, int64_t bp, int64_t cb,
                               float dt_lo, float dt_hi, bool pdl) {
  auto err = [](const std::string& m) { return ffi::Error::InvalidArgument("ssm_update_window: " + m); };
  const auto sd = ssm.dimensions(), zd = zx.dimensions(), xd = xbc.dimensions(), wd = wx.dimensions(),
             bd = wb.dimensions();
  if (sd.size() != 4 || zd.size() != 3 || xd.size() != 3 || wd.size() != 4 || bd.size() != 4)
    return err("want ssm (B, H, P, S), zx (B, G, ZW), xbc (B, G, F), win_x (B, W, H, P), win_B (B, W, G, S)");
  if (zx.element_type() != ffi::BF16 || xbc.element_type() != ffi::BF16 || wx.element_type() != ffi::BF16 ||
      wb.element_type() != ffi::BF16 || scale.element_type() != ffi::F32 || wdt.element_type() != ffi::F32 ||
      pos.element_type() != ffi::S32 || ss->element_type() != ffi::F32)
    return err("zx, xbc, win_x and win_B must be bfloat16; scale, win_dt and ss float32; pos int32");
  if (!f32_or_bf16(ssm) || !f32_or_bf16(alog) || !f32_or_bf16(dskip) || !f32_or_bf16(dtb) || !f32_or_bf16(*g))
    return err("the state, A_log, D, dt_bias and g must be float32 or bfloat16");
  Params p{};
  const int B = (int)sd[0];
  p.H = (int)sd[1], p.P = (int)sd[2], p.S = (int)sd[3], p.G = (int)zd[1], p.ZW = (int)zd[2], p.F = (int)xd[2];
  p.W = (int)wd[1], p.BP = (int)bp, p.CB = cb > 0 ? (int)cb : (int)bp;
  const int R = p.G ? p.H / p.G : 0;
  if (p.G < 1 || p.H % p.G || p.ZW != 2 * R * p.P + 2 * p.S + R || p.F != R * p.P + 2 * p.S || zd[0] != B ||
      xd[0] != B || wd[0] != B || wd[2] != p.H || wd[3] != p.P || bd[0] != B || bd[1] != p.W || bd[2] != p.G ||
      bd[3] != p.S)
    return err("inconsistent shapes");
  if (p.W < 1 || p.W > MAX_W || p.S > MAX_S || p.S % 8 || p.P % 8 || p.BP < 1 || p.P % p.BP || p.CB < 4 ||
      p.CB > NT || NT % p.CB || p.P % p.CB || p.CB % p.BP || p.BP % (p.CB / 4))
    return err("needs W ≤ 16, S ≤ 256, and blocks of state rows (bp for ss, cb ≥ 4 per CTA) with cb | 128, "
               "cb | P, bp | cb and cb / 4 | bp");
  if (ssm_out->untyped_data() != ssm.untyped_data() || wx_out->untyped_data() != wx.untyped_data() ||
      wb_out->untyped_data() != wb.untyped_data() || wdt_out->untyped_data() != wdt.untyped_data())
    return err("the state and the window buffers must be updated in place (aliased outputs)");
  const int E = p.S / (NT / p.CB);
  p.zx = reinterpret_cast<const __nv_bfloat16*>(zx.untyped_data());
  p.xbc = reinterpret_cast<const __nv_bfloat16*>(xbc.untyped_data());
  p.scale = reinterpret_cast<const float*>(scale.untyped_data());
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
  p.dt_lo = dt_lo, p.dt_hi = dt_hi, p.clip = dt_lo > 0.f || dt_hi < INFINITY;
  const bool f32 = ssm.element_type() == ffi::F32;
  if (E != 16 && E != 32 && E != 64) return err("needs S / (128 / cb) in {16, 32, 64} state columns per thread");
  if (d0->element_count() != (size_t)B * p.H || extra->element_count() != (size_t)B * p.H * p.P ||
      wts->element_count() != (size_t)B * p.H * p.W)
    return err("the scratch outputs d0 (B, H), extra (B, H, P) and wts (B, H, W) have the wrong sizes");
  p.B = B;
  p.d0 = reinterpret_cast<float*>(d0->untyped_data());
  p.extra = reinterpret_cast<float*>(extra->untyped_data());
  p.wts = reinterpret_cast<float*>(wts->untyped_data());
  const cudaError_t e = launch_pair(p, f32, E, stream, pdl);
  if (e != cudaSuccess) return ffi::Error::Internal(std::string("ssm_update_window: ") + cudaGetErrorString(e));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaJaxSsmUpdateWindow, SsmUpdateWindowImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // zx
                                  .Arg<ffi::AnyBuffer>()  // xbc
                                  .Arg<ffi::AnyBuffer>()  // scale
                                  .Arg<ffi::AnyBuffer>()  // ssm
                                  .Arg<ffi::AnyBuffer>()  // A_log
                                  .Arg<ffi::AnyBuffer>()  // D
                                  .Arg<ffi::AnyBuffer>()  // dt_bias
                                  .Arg<ffi::AnyBuffer>()  // pos
                                  .Arg<ffi::AnyBuffer>()  // win_x
                                  .Arg<ffi::AnyBuffer>()  // win_B
                                  .Arg<ffi::AnyBuffer>()  // win_dt
                                  .Ret<ffi::AnyBuffer>()  // g
                                  .Ret<ffi::AnyBuffer>()  // ss
                                  .Ret<ffi::AnyBuffer>()  // ssm (aliased)
                                  .Ret<ffi::AnyBuffer>()  // win_x (aliased)
                                  .Ret<ffi::AnyBuffer>()  // win_B (aliased)
                                  .Ret<ffi::AnyBuffer>()  // win_dt (aliased)
                                  .Ret<ffi::AnyBuffer>()  // d0 (scratch)
                                  .Ret<ffi::AnyBuffer>()  // extra (scratch)
                                  .Ret<ffi::AnyBuffer>()  // wts (scratch)
                                  .Attr<int64_t>("bp")
                                  .Attr<int64_t>("cb")
                                  .Attr<float>("dt_lo")
                                  .Attr<float>("dt_hi")
                                  .Attr<bool>("pdl"),
                              {ffi::Traits::kCmdBufferCompatible});
