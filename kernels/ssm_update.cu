// The decode step's state update with a state write-back window, as an XLA FFI call: the second launch of
// kernels/decode.py's split step (`ssm_step(split=True, window=…)`, `_update_kernel` with `_head_windowed`),
// same inputs, outputs and rounding, in CUDA. Built with nvcc on first use (kernels/cuda_build.py) and called
// from kernels/decode.py's `_split_step` where it runs (kernels/ssm_update.py says where).
//
// Why: at batch 32 a 2.7B layer moves 42 MB of bf16 state each way per token. With the window the state is
// read every step but written only every W steps (decode.py's docstring has the algebra): 84 → ≈ 50 MB. The
// Pallas version of this kernel ran slower than the per-token write (benchmarks/README.md, "State write-back
// window"): Triton's program did W slots of loads, masks and rank-1 updates per program in registers. Here a
// CTA stages the window's B rows and its rows' x values in shared memory once, computes the W decays and the W
// dot products B_i · C once per CTA, and every thread keeps only its own E state elements in registers.
//
// One CTA of 128 threads per (row b of the batch, head h, block j of BP state rows); thread t takes state row
// j·BP + t / TPR and E = S / TPR consecutive state columns (TPR = 128 / BP threads per row). Its state loads
// are issued first — they depend on nothing the launch before writes, so under programmatic dependent launch
// they overlap the prep kernel (griddepcontrol.wait guards every read of its outputs).
//
// Per token (slot wj = pos mod W of the window; slots after wj hold no token of this window: dt 0):
//   dt   = clip(softplus(round(zx_dt · scale) + dt_bias)),  A = −exp(A_log)
//   wᵢ   = exp(A Σ_{m>i} dtₘ) dtᵢ,  d₀ = exp(A Σ dtₘ)                    (i, m ≤ wj)
//   y    = d₀ (h₀ · C) + D x + Σᵢ wᵢ (Bᵢ · C) xᵢ
//   g    = round(y) · SiLU(round(zx_z · scale)),  ss[b, h, j] = Σ g²  (the gated norm's statistics)
//   at wj = W − 1:  h ← d₀ h₀ + Σᵢ wᵢ xᵢ Bᵢᵀ  (written in place, the state's dtype)
// and this token's x, B (by the group's first head's first block) and dt (by block 0) go to slot wj.
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
  int H, G, P, S, BP, W, ZW, F;
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

template <int E, typename T>
__global__ void __launch_bounds__(NT) ssm_update_window(Params p) {
  extern __shared__ float smem[];  // sB (W, S): the window's B rows (slot wj: this token's); sx (W, BP): xᵢ of the rows
  __shared__ float sC[MAX_S];
  __shared__ float sdt[MAX_W], scoef[MAX_W], sw[MAX_W], sdecay0;
  __shared__ float sss[NT / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nj = p.P / p.BP, j = blockIdx.x % nj, bh = blockIdx.x / nj, h = bh % p.H, b = bh / p.H;
  const int R = p.H / p.G, grp = h / R, r = h % R, TPR = NT / p.BP;
  const int row = tid / TPR, prow = j * p.BP + row, n0 = (tid % TPR) * E;
  const int W = p.W, S = p.S, RP = R * p.P, BP = p.BP;
  float* sB = smem;
  float* sx = smem + W * S;

  // 1. The state first: nothing the launch before writes.
  Row<E, T> st;
  const long soff = (((long)b * p.H + h) * p.P + prow) * S + n0;
  st.load(p.state, soff);
  const int wj = *p.pos % W;
  // The window's earlier slots (written by earlier steps): x of these rows, B of the group, dt of the head.
  for (int i = tid; i < wj * S; i += NT)
    sB[i] = __bfloat162float(p.wb[(((long)b * W + i / S) * p.G + grp) * S + i % S]);
  for (int i = tid; i < wj * p.BP; i += NT)
    sx[i] = __bfloat162float(p.wx[(((long)b * W + i / p.BP) * p.H + h) * p.P + j * p.BP + i % p.BP]);
  if (tid < W) sdt[tid] = tid < wj ? p.wdt[((long)b * W + tid) * p.H + h] : 0.f;

  // 2. This token's inputs: the prep kernel's and in_proj's outputs.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const float scale = p.scale[b];
  const __nv_bfloat16* zrow = p.zx + ((long)b * p.G + grp) * p.ZW;
  const __nv_bfloat16* xrow = p.xbc + ((long)b * p.G + grp) * p.F;
  float dt = bf(__bfloat162float(zrow[2 * RP + 2 * S + r]) * scale) + param(p.dtb, h, p.dtb_f32);
  dt = dt > 20.f ? dt : log1pf(expf(fminf(dt, 20.f)));
  if (p.clip) dt = fminf(fmaxf(dt, p.dt_lo), p.dt_hi);
  const float a = -expf(param(p.alog, h, p.alog_f32));
  const float x = __bfloat162float(xrow[r * p.P + prow]);
  const float z = bf(__bfloat162float(zrow[r * p.P + prow]) * scale);
  for (int n = tid; n < S; n += NT) {
    sC[n] = __bfloat162float(xrow[RP + S + n]);
    sB[(wj) * S + n] = __bfloat162float(xrow[RP + n]);
  }
  if (tid % TPR == 0) sx[(wj) * BP + row] = x;
  if (tid == 0) sdt[wj] = dt;
  __syncthreads();

  // 3. Per CTA: the decays and weights (one thread), the W dot products Bᵢ · C (a warp each).
  if (tid == 0) {
    float tail = 0.f;
    for (int i = wj; i >= 0; --i) {
      sw[i] = expf(a * tail) * sdt[i];
      tail += sdt[i];
    }
    sdecay0 = expf(a * tail);
  }
  for (int i = warp; i <= wj; i += NT / 32) {
    float acc = 0.f;
    for (int n = lane; n < S; n += 32) acc += sB[(i) * S + n] * sC[n];
#pragma unroll
    for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(~0u, acc, o);
    if (lane == 0) scoef[i] = acc;
  }
  __syncthreads();
  if (tid <= wj) scoef[tid] *= sw[tid];
  __syncthreads();

  // 4. y of this thread's row: h₀ · C over its E columns, summed over the row's TPR threads.
  float acc = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) acc += st.at(e) * sC[n0 + e];
  for (int o = TPR / 2; o; o >>= 1) acc += __shfl_xor_sync(~0u, acc, o);
  const float d0 = sdecay0;
  float y = d0 * acc + x * param(p.dskip, h, p.dskip_f32);
  for (int i = 0; i <= wj; ++i) y += scoef[i] * sx[(i) * BP + row];
  const float gated = bf(y) * silu(z);
  const long gi = (long)b * p.H * p.P + (long)h * p.P + prow;
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

  // 5. This token into slot wj of the window.
  if (tid % TPR == 0) p.wx[(((long)b * W + wj) * p.H + h) * p.P + prow] = __float2bfloat16_rn(x);
  if (j == 0 && tid == 0) p.wdt[((long)b * W + wj) * p.H + h] = dt;
  if (r == 0 && j == 0)
    for (int n = tid; n < S; n += NT) p.wb[(((long)b * W + wj) * p.G + grp) * S + n] = __float2bfloat16_rn(sB[(wj) * S + n]);

  // 6. The window's last slot: the state written back.
  if (wj == W - 1) {
    float v[E];
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] = d0 * st.at(e);
    for (int i = 0; i <= wj; ++i) {
      const float c = sw[i] * sx[(i) * BP + row];
#pragma unroll
      for (int e = 0; e < E; ++e) v[e] += c * sB[(i) * S + n0 + e];
    }
    Row<E, T>::store(p.state, soff, v);
  }
  __syncthreads();
  if (tid == 0) {
    float t = 0.f;
    for (int w = 0; w < NT / 32; ++w) t += sss[w];
    p.ss[((long)b * p.H + h) * nj + j] = t;
  }
}

template <int E>
cudaError_t launch_e(const Params& p, bool f32_state, int B, cudaStream_t stream, bool pdl) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)(B * p.H * (p.P / p.BP)));
  cfg.blockDim = dim3(NT);
  cfg.dynamicSmemBytes = (size_t)p.W * (p.S + p.BP) * 4;
  cfg.stream = stream;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = at;
  cfg.numAttrs = pdl ? 1 : 0;
  return f32_state ? cudaLaunchKernelEx(&cfg, ssm_update_window<E, float>, p)
                   : cudaLaunchKernelEx(&cfg, ssm_update_window<E, __nv_bfloat16>, p);
}

bool f32_or_bf16(ffi::AnyBuffer x) { return x.element_type() == ffi::F32 || x.element_type() == ffi::BF16; }

}  // namespace

ffi::Error SsmUpdateWindowImpl(cudaStream_t stream, ffi::AnyBuffer zx, ffi::AnyBuffer xbc, ffi::AnyBuffer scale,
                               ffi::AnyBuffer ssm, ffi::AnyBuffer alog, ffi::AnyBuffer dskip, ffi::AnyBuffer dtb,
                               ffi::AnyBuffer pos, ffi::AnyBuffer wx, ffi::AnyBuffer wb, ffi::AnyBuffer wdt,
                               ffi::Result<ffi::AnyBuffer> g, ffi::Result<ffi::AnyBuffer> ss,
                               ffi::Result<ffi::AnyBuffer> ssm_out, ffi::Result<ffi::AnyBuffer> wx_out,
                               ffi::Result<ffi::AnyBuffer> wb_out, ffi::Result<ffi::AnyBuffer> wdt_out, int64_t bp,
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
  p.W = (int)wd[1], p.BP = (int)bp;
  const int R = p.G ? p.H / p.G : 0;
  if (p.G < 1 || p.H % p.G || p.ZW != 2 * R * p.P + 2 * p.S + R || p.F != R * p.P + 2 * p.S || zd[0] != B ||
      xd[0] != B || wd[0] != B || wd[2] != p.H || wd[3] != p.P || bd[0] != B || bd[1] != p.W || bd[2] != p.G ||
      bd[3] != p.S)
    return err("inconsistent shapes");
  if (p.W < 1 || p.W > MAX_W || p.S > MAX_S || p.BP < 1 || p.BP > NT || NT % p.BP || p.P % p.BP)
    return err("needs W ≤ 16, S ≤ 256 and a power-of-two block of state rows ≤ 128 dividing the head dim");
  if (ssm_out->untyped_data() != ssm.untyped_data() || wx_out->untyped_data() != wx.untyped_data() ||
      wb_out->untyped_data() != wb.untyped_data() || wdt_out->untyped_data() != wdt.untyped_data())
    return err("the state and the window buffers must be updated in place (aliased outputs)");
  const int E = p.S / (NT / p.BP);
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
  cudaError_t e;
  if (E == 16)
    e = launch_e<16>(p, f32, B, stream, pdl);
  else if (E == 32)
    e = launch_e<32>(p, f32, B, stream, pdl);
  else if (E == 64)
    e = launch_e<64>(p, f32, B, stream, pdl);
  else
    return err("needs S / (128 / block rows) in {16, 32, 64} state columns per thread");
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
                                  .Attr<int64_t>("bp")
                                  .Attr<float>("dt_lo")
                                  .Attr<float>("dt_hi")
                                  .Attr<bool>("pdl"),
                              {ffi::Traits::kCmdBufferCompatible});
