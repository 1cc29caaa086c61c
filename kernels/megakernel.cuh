// The Mamba2 decode megakernel: one cooperative launch per token runs every layer of a pure Mamba2 model at
// batch 1 (its d_model and heads compiled in: MK_D / MK_H, Mamba2-2.7B's by default; MK_FP8: float8 rows).
// Shared by benchmarks/megakernel_probe.cu (all modes, timed and checked bit for bit against separate kernels;
// its header describes the design and the modes) and
// kernels/megakernel.cu (mode 5 as an XLA FFI call). Params.pos_dev / epoch_dev (optional): the token's
// position and the LL tags' epoch read from device memory, and the epoch advanced by the last CTA to finish,
// so that one captured launch can be replayed token after token.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ptx.cuh"

typedef __nv_bfloat16 bf16;

// The projections' weights (win, wout): bf16, or with -DMK_FP8=1 float8 e4m3 rows with one float32 scale per
// row, i.e. per output feature (mamba_jax.inference.megakernel.pack(quantize="fp8")), widened in registers:
// half the bytes streamed per token. The LM head, conv, states and the rest stay as they are.
#ifndef MK_FP8
#define MK_FP8 0
#endif
#if MK_FP8
#include <cuda_fp8.h>
typedef __nv_fp8_e4m3 wt;
#else
typedef __nv_bfloat16 wt;
#endif
constexpr int WB = sizeof(wt);  // bytes per weight

// The model's d_model and heads, one build per model size (kernels/megakernel.cu is built with -DMK_D=… -DMK_H=…
// for the model at hand; the probe uses the defaults, Mamba2-2.7B's: d_model 2560, 80 heads). The rest is every
// Mamba2's: heads of 64, d_state 128, one group, conv width 4.
#ifndef MK_D
#define MK_D 2560
#endif
#ifndef MK_H
#define MK_H 80
#endif
constexpr int D = MK_D, H = MK_H, P = 64, NS = 128, DI = H * P, CX = DI + 2 * NS, NIN = 2 * DI + 2 * NS + H, KW = 4;
// The build timed on an H100 (Mamba2-2.7B, bf16 rows): the FFI runs mode 10 only there, and the GEMV consumer keeps
// the measured row loop (kGeneralRows below).
constexpr bool kMeasuredBuild = D == 2560 && H == 80 && !MK_FP8;
constexpr float EPS = 1e-5f;
constexpr int W = 8;                  // consumer warps
constexpr int CT = 32 * W;            // consumer threads
constexpr int THREADS = CT + 32;      // + the producer warp
constexpr int MAX_PARTS = 2048;       // floats of per-(row, segment) partial sums in shared memory
constexpr int NEV = 17;               // trace events per (CTA, layer), see `megakernel` and `step_compute`
constexpr int MAX_OWN = 32;           // residual rows one CTA's out_proj may own (D / SMs, rounded up)

struct Params {
  const wt* win;        // [L][NIN][D]  in_proj, transposed: row j = output feature j
  const wt* wout;       // [L][D][DI]   out_proj, transposed
  const float* conv_w;  // [L][CX][KW]
  const float* conv_b;  // [L][CX]
  const float* a_log;   // [L][H]
  const float* dskip;   // [L][H]
  const float* dt_bias; // [L][H]
  bf16* ring;           // [L][CX][KW]  conv inputs, slot = position mod KW
  bf16* state;          // [L][H][P][NS]
  float* h;             // [D]   the residual stream (in / out)
  float* zx;            // [NIN] in_proj's output (scratch, reused by every layer)
  bf16* g;              // [DI]  the gated SSM output (scratch)
  float* gss;           // [H]   Σ g² per head (scratch)
  bf16* xb;             // [D]   reference only: the bf16 residual
  float* parts;         // reference only: partial sums
  float* scal;          // reference only: 1/rms values
  unsigned* cnt;        // [3][L] monotonic counters: in_done, step_done, out_done
  // Mode 4's flag-in-data buffers: each 8-byte word holds 4 bytes of data and the tag of the (token, layer)
  // that wrote it (`ll_tag`), stored and polled as one access, so a reader needs no fence, counter or
  // second round trip (NCCL's LL protocol).
  unsigned long long* zx_ll;   // [NIN] in_proj's output (a float)
  unsigned long long* g_ll;    // [DI / 2] the gated SSM output (two bf16)
  unsigned long long* gss_ll;  // [H] Σ g² per head (a float)
  unsigned long long* h_ll;    // [D] the residual stream after the layer (a float)
  unsigned long long* trace;  // [G][L][NEV] %globaltimer at the phase boundaries, or null
  int layers, pos, epoch, mode, slot, stages, pf;
  int slack;  // mode 10: in_proj positions between a head's last block and its step
  // Optional (null in the probe): pos and epoch from device memory, and a counter of finished CTAs with which
  // the last one advances *epoch_dev for the next launch (kernels/megakernel.cu: a launch replayed per token).
  const int* pos_dev;
  unsigned* epoch_dev;
  unsigned* done_dev;
  // Optional (tagged modes 4–9): the LM head as a last phase, its rows (the final norm's weight folded in)
  // streamed behind the last layer's: logits[v] = head[v] · bf16(h) / rms(h).
  const bf16* head;  // [vocab][D]
  float* logits;     // [vocab]
  int vocab;
#if MK_FP8
  const float* win_scale;   // [L][NIN] in_proj's row scales
  const float* wout_scale;  // [L][D]   out_proj's
#endif
};

// ---------------------------------------------------------------- PTX helpers (and kernels/ptx.cuh)
__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned long long ld_relaxed64(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed64(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
// Shared → global bulk copy (the TMA), in a bulk group of its own; fence_proxy_async first makes the threads'
// shared-memory writes visible to it, bulk_wait_read waits until its source may be overwritten.
__device__ __forceinline__ void bulk_store(void* dst, const void* src, unsigned bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(sa(src)), "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
__device__ __forceinline__ void prefetch_l2(const void* src, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ unsigned long long ll_pack(unsigned bits, unsigned tag) {
  return ((unsigned long long)tag << 32) | bits;
}
// Mode 4: the tag of layer l in this launch (never 0, which the zeroed buffers hold).
__device__ __forceinline__ unsigned ll_tag(const Params& p, int l) { return (unsigned)p.epoch * p.layers + l + 1; }
// Polls the words base[idx[i]] (idx < 0: none) until each carries `tag`; their data into out. Every pending
// word is loaded in each round, so a round costs one memory round trip however many words are late.
template <int N>
__device__ __forceinline__ void ll_poll(const unsigned long long* base, const int (&idx)[N], unsigned tag,
                                        unsigned (&out)[N]) {
  unsigned pending = 0;
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (idx[i] >= 0) pending |= 1u << i;
  while (pending) {
    unsigned long long v[N];
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (pending >> i & 1) v[i] = ld_relaxed64(base + idx[i]);
#pragma unroll
    for (int i = 0; i < N; ++i)
      if ((pending >> i & 1) && (unsigned)(v[i] >> 32) == tag) {
        out[i] = (unsigned)v[i];
        pending &= ~(1u << i);
      }
  }
}
// The consumer warps' own barrier (named barrier 1): the producer warp never joins it.
__device__ __forceinline__ void cbar() { asm volatile("bar.sync 1, %0;" ::"r"(CT) : "memory"); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float dot8(uint4 a, uint4 b, float acc) {
  const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 fa = __bfloat1622float2(pa[i]), fb = __bfloat1622float2(pb[i]);
    acc = fmaf(fa.x, fb.x, acc);
    acc = fmaf(fa.y, fb.y, acc);
  }
  return acc;
}
__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }
__device__ __forceinline__ float rnd(float v) { return __bfloat162float(__float2bfloat16(v)); }

// Rows [lo, hi) of a phase's n output features that CTA c of G owns.
// (32-bit: c · n stays below 2^31 for any grid and width here, and a 64-bit division is ≈ 70 instructions
// inlined at every call — code that competes for the instruction cache in a kernel of ≈ 6,400.)
__host__ __device__ inline void rows_of(int n, int c, int G, int& lo, int& hi) {
  lo = c * n / G;
  hi = (c + 1) * n / G;
}

// --------------------------------------------------------- shared device functions (megakernel and reference)
// Σ over the CT consumer threads of v, in a fixed order; red: W floats of shared memory.
__device__ float block_sum(float v, float* red, int tid) {
  v = warp_sum(v);
  if ((tid & 31) == 0) red[tid >> 5] = v;
  cbar();
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += red[i];
  cbar();
  return s;
}

// x_s ← bf16(h); returns 1/rms(h). With h_ll (mode 4) h is polled from it, tagged `tag`; hown[j − lo] keeps
// the float32 h[j] of the rows [lo, hi) that this CTA's out_proj updates.
__device__ float load_residual(const float* h, bf16* x_s, float* red, int tid, const unsigned long long* h_ll = nullptr,
                               unsigned tag = 0, float* hown = nullptr, int lo = 0, int hi = 0) {
  static_assert(D % CT == 0, "D must be a multiple of the consumer threads");
  constexpr int PER = D / CT;
  float v[PER], ss = 0.f;
  if (h_ll) {
    int idx[PER];
    unsigned u[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) idx[i] = tid + i * CT;
    ll_poll(h_ll, idx, tag, u);
#pragma unroll
    for (int i = 0; i < PER; ++i) v[i] = __uint_as_float(u[i]);
  } else {
#pragma unroll
    for (int i = 0; i < PER; ++i) v[i] = __ldcg(h + tid + i * CT);  // all loads in flight at once
  }
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    int j = tid + i * CT;
    x_s[j] = __float2bfloat16(v[i]);
    ss = fmaf(v[i], v[i], ss);
    if (hown && j >= lo && j < hi) hown[j - lo] = v[i];
  }
  return rsqrtf(block_sum(ss, red, tid) / D + EPS);
}

// One warp's share of a GEMV row: segment sg of segs of the K-long dot product of w_row and x (both bf16,
// shared or global memory), lane-strided over 16-byte vectors.
__device__ __forceinline__ float row_dot(const bf16* w_row, const bf16* x, int K, int sg, int segs, int lane) {
  const uint4* wv = reinterpret_cast<const uint4*>(w_row);
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  int nv = K / 8, v0 = sg * nv / segs, v1 = (sg + 1) * nv / segs;
  float acc = 0.f;
  for (int v = v0 + lane; v < v1; v += 32) acc = dot8(wv[v], xv[v], acc);
  return warp_sum(acc);
}
#if MK_FP8
// 16 float8 weights (one 16-byte word; every e4m3 value is exact in half precision) against 16 bf16 inputs.
__device__ __forceinline__ float dot16q(uint4 w, uint4 xa, uint4 xb, float acc) {
  const __nv_fp8x2_storage_t* pw = reinterpret_cast<const __nv_fp8x2_storage_t*>(&w);
  const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&xa);
  const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&xb);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float2 fw = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pw[i], __NV_E4M3)));
    float2 fx = __bfloat1622float2(i < 4 ? pa[i] : pb[i - 4]);
    acc = fmaf(fw.x, fx.x, acc);
    acc = fmaf(fw.y, fx.y, acc);
  }
  return acc;
}
// row_dot of a float8 row (unscaled: the caller multiplies by the row's scale).
__device__ __forceinline__ float row_dot_w(const wt* w_row, const bf16* x, int K, int sg, int segs, int lane) {
  const uint4* wv = reinterpret_cast<const uint4*>(w_row);
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  int nv = K / 16, v0 = sg * nv / segs, v1 = (sg + 1) * nv / segs;
  float acc = 0.f;
  for (int v = v0 + lane; v < v1; v += 32) acc = dot16q(wv[v], xv[2 * v], xv[2 * v + 1], acc);
  return warp_sum(acc);
}
#else
__device__ __forceinline__ float row_dot_w(const wt* w_row, const bf16* x, int K, int sg, int segs, int lane) {
  return row_dot(w_row, x, K, sg, segs, lane);
}
#endif

// The SSM step of head hd in layer l, by the CT consumer threads, in three parts so that mode 4 can issue the
// loads that do not depend on in_proj (state, conv ring and weights, the head's scalars) before in_proj's
// output exists: step_preload, then step_gather_* (in_proj's output for the head), then step_compute.
constexpr int CH_PER = (P + 2 * NS + CT - 1) / CT;  // conv channels per thread
static_assert(CT == 4 * P, "four threads per state row");
__device__ __forceinline__ int step_channel(int hd, int i) { return i < P ? hd * P + i : DI + (i - P); }
struct StepPre {
  uint4 st[4];  // this thread's 32 states: row tid / 4, quarter tid % 4 (state_elem)
  float cw[CH_PER][KW], cb[CH_PER], cr[CH_PER][KW - 1];  // conv weights, bias, the ring's last inputs
  float dtb, alog, dsk;
};
struct StepIn {
  float cur[CH_PER];  // the conv inputs of the thread's channels (x of the head, then B, then C)
  float dt;
};
// The first of the 8 states (one uint4 of bf16) that thread (row, q) of a head's step holds as its v-th, as an
// element offset in the head's [P][NS] state: the four threads of a row take consecutive 16-byte words, so a
// quarter warp's 16-byte loads from shared memory meet 2-way bank conflicts (4-way with a quarter row each).
__host__ __device__ __forceinline__ int state_elem(int row, int q, int v) { return row * NS + (v * 4 + q) * 8; }
static_assert(KW == 4, "the conv taps are read as one float4");
// step_compute's view of StepPre (modes 0, 4 and the reference).
struct RegSrc {
  static constexpr bool kBulk = false;  // the new states stored thread by thread
  const StepPre& s;
  __device__ float4 cw4(int it) const { return make_float4(s.cw[it][0], s.cw[it][1], s.cw[it][2], s.cw[it][3]); }
  __device__ float cb(int it) const { return s.cb[it]; }
  __device__ void taps(int it, float (&r)[KW - 1]) const {
#pragma unroll
    for (int j = 0; j < KW - 1; ++j) r[j] = s.cr[it][j];
  }
  __device__ uint4 st(int v) const { return s.st[v]; }
  __device__ float dtb() const { return s.dtb; }
  __device__ float alog() const { return s.alog; }
  __device__ float dsk() const { return s.dsk; }
};
__device__ void step_preload(const Params& p, int l, int hd, StepPre& s, int tid) {
#pragma unroll
  for (int it = 0; it < CH_PER; ++it) {
    int i = tid + it * CT;
    if (i < P + 2 * NS) {
      int ch = step_channel(hd, i);
      const float* w = p.conv_w + ((size_t)l * CX + ch) * KW;
      const bf16* rg = p.ring + ((size_t)l * CX + ch) * KW;
#pragma unroll
      for (int j = 0; j < KW; ++j) s.cw[it][j] = w[j];
      s.cb[it] = p.conv_b[(size_t)l * CX + ch];
      // Slots pos + 1 … pos + KW − 1 (mod KW): inputs of earlier tokens; this token writes only slot pos.
#pragma unroll
      for (int j = 0; j < KW - 1; ++j) s.cr[it][j] = __bfloat162float(rg[(p.pos + 1 + j) & (KW - 1)]);
    }
  }
  int row = tid >> 2, q = tid & 3;
  const bf16* st = p.state + ((size_t)l * H + hd) * P * NS;
#pragma unroll
  for (int v = 0; v < 4; ++v) s.st[v] = *reinterpret_cast<const uint4*>(st + state_elem(row, q, v));
  s.dtb = p.dt_bias[(size_t)l * H + hd];
  s.alog = p.a_log[(size_t)l * H + hd];
  s.dsk = p.dskip[(size_t)l * H + hd];
}
// In_proj's output for head hd from p.zx (written before a counter or a kernel boundary); z into sz.
__device__ void step_gather_plain(const Params& p, int hd, StepIn& in, float* sz, int tid) {
#pragma unroll
  for (int it = 0; it < CH_PER; ++it) {
    int i = tid + it * CT;
    if (i < P + 2 * NS) in.cur[it] = __ldcg(p.zx + DI + step_channel(hd, i));
  }
  for (int i = tid; i < P; i += CT) sz[i] = __ldcg(p.zx + hd * P + i);
  in.dt = __ldcg(p.zx + DI + CX + hd);
}
// The same from zx_ll, polled until every word carries `tag`.
__device__ void step_gather_ll(const Params& p, int hd, StepIn& in, float* sz, int tid, unsigned tag) {
  static_assert(P <= CT, "one z per thread");
  int idx[CH_PER + 2];
  unsigned u[CH_PER + 2];
#pragma unroll
  for (int it = 0; it < CH_PER; ++it) {
    int i = tid + it * CT;
    idx[it] = i < P + 2 * NS ? DI + step_channel(hd, i) : -1;
  }
  idx[CH_PER] = tid < P ? hd * P + tid : -1;
  idx[CH_PER + 1] = DI + CX + hd;
  ll_poll(p.zx_ll, idx, tag, u);
#pragma unroll
  for (int it = 0; it < CH_PER; ++it) in.cur[it] = __uint_as_float(u[it]);
  if (tid < P) sz[tid] = __uint_as_float(u[CH_PER]);
  in.dt = __uint_as_float(u[CH_PER + 1]);
}
// The step itself: conv (ring written in place), softplus dt, the state update, y, D skip, SiLU(z) gate → g,
// Σ g². Outputs to p.g / p.gss, or (tag ≠ 0) to g_ll / gss_ll tagged `tag`. sx: P + 2·NS floats, red: W.
// LATE (mode 9): the conv ring's and the state's stores are issued after g and Σ g² are published, so those
// few stores do not queue behind 16 KB of state stores in a saturated memory system.
// Eight bf16 states u (one 16-byte word, the states n4 · 4 … n4 · 4 + 7 of a row) decayed by da and given
// xdt · B, rounded as stored; y (two partial sums) reads them as stored. B and C as float4 from shared memory.
__device__ __forceinline__ void update8(uint4& u, const float4* b4, const float4* c4, int n4, float da, float xdt,
                                        float& y0, float& y1) {
  const float4 ba = b4[n4], bb = b4[n4 + 1], ca = c4[n4], cb = c4[n4 + 1];
  const float bn[8] = {ba.x, ba.y, ba.z, ba.w, bb.x, bb.y, bb.z, bb.w};
  const float cn[8] = {ca.x, ca.y, ca.z, ca.w, cb.x, cb.y, cb.z, cb.w};
  __nv_bfloat162* e = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(e[i]);
    f.x = fmaf(f.x, da, xdt * bn[2 * i]);
    f.y = fmaf(f.y, da, xdt * bn[2 * i + 1]);
    e[i] = __floats2bfloat162_rn(f.x, f.y);
    float2 r = __bfloat1622float2(e[i]);
    y0 = fmaf(r.x, cn[2 * i], y0);
    y1 = fmaf(r.y, cn[2 * i + 1], y1);
  }
}
template <bool LATE = false, bool ROLLED = false, class Src>
__device__ void step_compute(const Params& p, int l, int hd, const Src& s, const StepIn& in, float* sx,
                             const float* sz, float* red, int tid, bool ring_bc, unsigned tag,
                             unsigned long long* tr = nullptr) {
  // tr (thread 0, tracing): [11] entry, [12] conv and dt done, [13] past the barrier, [14] states updated
  // and stored, [15] g published, [16] Σ g² published
  auto mark = [&](int e) {
    if (tr && tid == 0) tr[e] = globaltimer();
  };
  mark(11);
#pragma unroll
  for (int it = 0; it < CH_PER; ++it) {
    int i = tid + it * CT;
    if (i < P + 2 * NS) {
      int ch = step_channel(hd, i);
      const float4 w = s.cw4(it);  // taps oldest first
      float r[KW - 1];
      s.taps(it, r);
      float acc = fmaf(w.w, in.cur[it], s.cb(it));
      acc = fmaf(w.x, r[0], acc);
      acc = fmaf(w.y, r[1], acc);
      acc = fmaf(w.z, r[2], acc);
      sx[i] = silu(acc);
      // Slot pos mod KW holds the input of pos − KW, which no conv reads any more: writing it races with
      // nobody. The B / C channels are shared by all heads: one CTA writes them.
      if (!LATE && (i < P || ring_bc))
        p.ring[((size_t)l * CX + ch) * KW + (p.pos & (KW - 1))] = __float2bfloat16(in.cur[it]);
    }
  }
  float dt = in.dt + s.dtb();
  dt = dt > 20.f ? dt : log1pf(expf(dt));
  float da = expf(-dt * expf(s.alog()));
  mark(12);
  cbar();
  mark(13);
  int row = tid >> 2, q = tid & 3;  // 4 threads per state row, 32 states each (state_elem)
  bf16* st = p.state + ((size_t)l * H + hd) * P * NS;
  // B and C as float4 pairs (sx is 16-byte aligned), y in two partial sums: short dependency chains, since
  // the step sits on each layer's critical path with only the 8 consumer warps to hide latency
  const float4* b4 = reinterpret_cast<const float4*>(sx + P);
  const float4* c4 = reinterpret_cast<const float4*>(sx + P + NS);
  float xdt = sx[row] * dt, y0 = 0.f, y1 = 0.f;
  uint4 u4[4];
  if constexpr (ROLLED && Src::kBulk) {  // mode 11 (probe only): one 16-byte word at a time, a short loop body
#pragma unroll 1
    for (int v = 0; v < 4; ++v) {
      uint4 u = s.st(v);
      update8(u, b4, c4, state_elem(0, q, v) / 4, da, xdt, y0, y1);
      s.set_st(v, u);
    }
  } else {
#pragma unroll
    for (int v = 0; v < 4; ++v) u4[v] = s.st(v);
#pragma unroll
    for (int v = 0; v < 4; ++v) update8(u4[v], b4, c4, state_elem(0, q, v) / 4, da, xdt, y0, y1);
  }
  float y = y0 + y1;
  if constexpr (Src::kBulk) {  // the new states in place in the step slot; one bulk store after Σ g² below
    if constexpr (!ROLLED) {
#pragma unroll
      for (int v = 0; v < 4; ++v) s.set_st(v, u4[v]);
    }
    fence_proxy_async();
  } else if (!LATE) {
#pragma unroll
    for (int v = 0; v < 4; ++v) *reinterpret_cast<uint4*>(st + state_elem(row, q, v)) = u4[v];
  }
  mark(14);
  y += __shfl_xor_sync(0xffffffffu, y, 1);
  y += __shfl_xor_sync(0xffffffffu, y, 2);
  float g2 = 0.f, gv = 0.f;
  if (q == 0) {
    gv = rnd(fmaf(s.dsk(), sx[row], y) * silu(sz[row]));
    if (!tag) p.g[hd * P + row] = __float2bfloat16(gv);
    g2 = gv * gv;
  }
  if (tag) {  // rows 2k and 2k + 1 (lanes 8k and 8k + 4 of a warp) in one word
    float gn = __shfl_down_sync(0xffffffffu, gv, 4);
    if (q == 0 && !(row & 1)) {
      __nv_bfloat162 pair = __floats2bfloat162_rn(gv, gn);
      st_relaxed64(p.g_ll + (hd * P + row) / 2, ll_pack(*reinterpret_cast<unsigned*>(&pair), tag));
    }
  }
  mark(15);
  float sum = block_sum(g2, red, tid);
  if (tid == 0) {
    if (tag)
      st_relaxed64(p.gss_ll + hd, ll_pack(__float_as_uint(sum), tag));
    else
      p.gss[hd] = sum;
  }
  mark(16);
  if constexpr (Src::kBulk) {
    // 80 step CTAs storing 16 KB each thread by thread, all at once into a memory system saturated by the
    // weight stream, kept their threads ≈ 2 µs (the trace's "states"): the TMA stores them instead, and the
    // step slot is released once it has read them (the caller's arrival waits for warp 0)
    if (tid == 0) {
      bulk_store(st, s.state_smem(), P * NS * 2);
      bulk_wait_read();
    }
  }
  if (LATE) {
    if constexpr (!Src::kBulk) {
#pragma unroll
      for (int v = 0; v < 4; ++v) *reinterpret_cast<uint4*>(st + state_elem(row, q, v)) = u4[v];
    }
#pragma unroll
    for (int it = 0; it < CH_PER; ++it) {
      int i = tid + it * CT;
      if (i < P + 2 * NS && (i < P || ring_bc))
        p.ring[((size_t)l * CX + step_channel(hd, i)) * KW + (p.pos & (KW - 1))] = __float2bfloat16(in.cur[it]);
    }
  }
}
// The whole step from p.zx (mode 0 and the reference).
__device__ void ssm_step(const Params& p, int l, int hd, float* sx, float* sz, float* red, int tid, bool ring_bc) {
  StepPre pre;
  StepIn in;
  step_preload(p, l, hd, pre, tid);
  step_gather_plain(p, hd, in, sz, tid);
  step_compute(p, l, hd, RegSrc{pre}, in, sx, sz, red, tid, ring_bc, 0);
}

// 1/rms of the gated norm's input from the heads' Σ g², by one warp (the loads in flight at once).
__device__ float gated_inv(const Params& p, int lane) {
  static_assert(H <= 96, "three loads per lane");
  float a = lane < H ? __ldcg(p.gss + lane) : 0.f;
  float b = lane + 32 < H ? __ldcg(p.gss + lane + 32) : 0.f;
  float c = lane + 64 < H ? __ldcg(p.gss + lane + 64) : 0.f;
  return rsqrtf(warp_sum(a + b + c) / DI + EPS);
}
__device__ __forceinline__ float residual_update(const Params& p, int j, float o, float inv) {
  return __ldcg(p.h + j) + rnd(rnd(o) * inv);
}

// ----------------------------------------------------------------------------------------- the megakernel
__device__ void wait_count(const unsigned* c, unsigned target, int tid) {
  if (tid == 0)
    while (ld_acquire(c) < target) {
    }
  cbar();
}
__device__ void arrive_count(unsigned* c, int tid) {  // bar.sync, then one release (as grid.sync does)
  cbar();
  if (tid == 0) {
    __threadfence();
    atomicAdd(c, 1u);
  }
}

// The gated norm's 1/rms from every head's Σ g² polled from gss_ll (tagged `tag`; the sum in gated_inv's
// order), by the first warp, shared through misc[0]; all consumer threads call it.
__device__ float gated_inv_ll(const Params& p, unsigned tag, float* misc, int tid) {
  if (tid < 32) {
    static_assert(H <= 96, "three words per lane");
    int gi[3] = {tid < H ? tid : -1, tid + 32 < H ? tid + 32 : -1, tid + 64 < H ? tid + 64 : -1};
    unsigned gu[3];
    ll_poll(p.gss_ll, gi, tag, gu);
    float a = tid < H ? __uint_as_float(gu[0]) : 0.f;
    float b = tid + 32 < H ? __uint_as_float(gu[1]) : 0.f;
    float c = tid + 64 < H ? __uint_as_float(gu[2]) : 0.f;
    float v = rsqrtf(warp_sum(a + b + c) / DI + EPS);
    if (tid == 0) misc[0] = v;
  }
  cbar();
  return misc[0];
}
// Mode 4: g (bf16, DI) polled from g_ll into x_s and the gated norm's 1/rms from gss_ll (the sum in
// gated_inv's order), both tagged `tag`.
__device__ float load_g_ll(const Params& p, unsigned tag, bf16* x_s, float* misc, int tid) {
  constexpr int PER = DI / 2 / CT;
  static_assert(DI / 2 % CT == 0, "g words must be a multiple of the consumer threads");
  int idx[PER];
  unsigned u[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) idx[i] = tid + i * CT;
  ll_poll(p.g_ll, idx, tag, u);
  unsigned* xw = reinterpret_cast<unsigned*>(x_s);
#pragma unroll
  for (int i = 0; i < PER; ++i) xw[tid + i * CT] = u[i];
  return gated_inv_ll(p, tag, misc, tid);
}

// Mode 5: what the SSM step of head c in layer l reads besides in_proj's output, streamed through the ring
// as one more slot right after the CTA's in_proj rows (so it is in shared memory when the step runs): the
// head's state, then the conv weights, biases and ring inputs of its x channels and of the B / C channels.
constexpr int SS_STATE = 0, SS_CWX = SS_STATE + P * NS * 2, SS_CWBC = SS_CWX + P * KW * 4,
              SS_CBX = SS_CWBC + 2 * NS * KW * 4, SS_CBBC = SS_CBX + P * 4, SS_RX = SS_CBBC + 2 * NS * 4,
              SS_RBC = SS_RX + P * KW * 2, STEP_SLOT = SS_RBC + 2 * NS * KW * 2;
__device__ void load_step_slot(const Params& p, int l, int hd, unsigned char* dst, uint64_t* bar, uint64_t pol) {
  const size_t ch = (size_t)l * CX;
  mbar_expect(bar, STEP_SLOT);
  bulk_load(dst + SS_STATE, p.state + ((size_t)l * H + hd) * P * NS, P * NS * 2, bar, pol);
  bulk_load(dst + SS_CWX, p.conv_w + (ch + hd * P) * KW, P * KW * 4, bar, pol);
  bulk_load(dst + SS_CWBC, p.conv_w + (ch + DI) * KW, 2 * NS * KW * 4, bar, pol);
  bulk_load(dst + SS_CBX, p.conv_b + ch + hd * P, P * 4, bar, pol);
  bulk_load(dst + SS_CBBC, p.conv_b + ch + DI, 2 * NS * 4, bar, pol);
  bulk_load(dst + SS_RX, p.ring + (ch + hd * P) * KW, P * KW * 2, bar, pol);
  bulk_load(dst + SS_RBC, p.ring + (ch + DI) * KW, 2 * NS * KW * 2, bar, pol);
}
// step_compute's view of a step slot in shared memory (mode 5): read where it is used, so that nothing of it
// is held in registers (the kernel runs at its register limit; spilled values would come back from L2).
struct SlotSrc {
  const unsigned char* slot;
  int tid, pos;
  float dtb_, alog_, dsk_;
  __device__ int j(int it) const { int i = tid + it * CT; return i < P ? i : i - P; }
  __device__ bool x(int it) const { return tid + it * CT < P; }
  __device__ float4 cw4(int it) const {
    return reinterpret_cast<const float4*>(slot + (x(it) ? SS_CWX : SS_CWBC))[j(it)];
  }
  __device__ float cb(int it) const { return reinterpret_cast<const float*>(slot + (x(it) ? SS_CBX : SS_CBBC))[j(it)]; }
  __device__ void taps(int it, float (&r)[KW - 1]) const {  // the channel's 4 ring slots in one 8-byte load
    const uint2 w = reinterpret_cast<const uint2*>(slot + (x(it) ? SS_RX : SS_RBC))[j(it)];
#pragma unroll
    for (int t = 0; t < KW - 1; ++t) {
      const int e = (pos + 1 + t) & (KW - 1);
      const unsigned half = (e < 2 ? w.x : w.y) >> (16 * (e & 1));
      r[t] = __uint_as_float(half << 16);  // bf16 → float: the high half of a float's bits
    }
  }
  static constexpr bool kBulk = true;  // the new states written back into the slot, stored by the TMA
  __device__ uint4 st(int v) const {
    return *reinterpret_cast<const uint4*>(slot + SS_STATE + state_elem(tid >> 2, tid & 3, v) * 2);
  }
  __device__ void set_st(int v, uint4 u) const {
    *reinterpret_cast<uint4*>(const_cast<unsigned char*>(slot) + SS_STATE + state_elem(tid >> 2, tid & 3, v) * 2) = u;
  }
  __device__ const void* state_smem() const { return slot + SS_STATE; }
  __device__ float dtb() const { return dtb_; }
  __device__ float alog() const { return alog_; }
  __device__ float dsk() const { return dsk_; }
};

// The in_proj rows CTA c of G owns, as up to two ranges (part 0, part 1; an empty one has lo == hi): in mode 6
// first its share of the B, C and dt rows (which every head's step reads), then its share of the z and x
// rows; otherwise one contiguous range.
__device__ __forceinline__ void in_range(int mode, int part, int c, int G, int& lo, int& hi) {
  if (mode == 6) {
    rows_of(part == 0 ? NIN - 2 * DI : 2 * DI, c, G, lo, hi);
    if (part == 0) lo += 2 * DI, hi += 2 * DI;
  } else if (part == 0 && mode == 7) {
    // Mode 7: the CTAs that run a step also stream its slot (STEP_SLOT bytes), so they take that many fewer
    // bytes of in_proj rows than the others: every CTA then streams the same bytes per layer.
    const double ds = (double)STEP_SLOT / (D * WB), ns = H < G ? H : G;
    const double r_step = (NIN - (G - ns) * ds) / G;  // rows of a step CTA; the others take ds more
    auto start = [&](int i) { return (int)llround(i <= ns ? i * r_step : ns * r_step + (i - ns) * (r_step + ds)); };
    lo = start(c);
    hi = c == G - 1 ? NIN : start(c + 1);
  } else if (part == 0) {
    rows_of(NIN, c, G, lo, hi);
  } else {
    lo = hi = 0;
  }
}

// The producer's walk over this CTA's ring slots, in the consumers' order: per layer its in_proj rows
// (phases 0 and 1, see in_range), in modes 5 and 6 the step slot of CTAs that run a step (phase 2), its
// out_proj rows (phase 3); slots of R rows.
struct Cursor {
  int l, ph, r0, hi, R, rb;
  const unsigned char* base;
};
// cursor_enter and cursor_next are both inlined: out of line, the entry took the Params by reference, which
// put them (and the Cursor) in local memory, and the step's slot and out_proj's g waited on it (measured on an
// H100, 2026-12-06, mode 5, 2.7B: 34.85 µs per layer out of line against 32.5 inlined;
// benchmarks/results/megakernel_probe_cursor_h100.jsonl).
// Enter phase (u.l, u.ph) at its first slot, skipping empty ones; false past the last layer. MODE is the
// kernel's (the producer's code holds only its own mode's paths).
template <int MODE>
__device__ __forceinline__ bool cursor_enter_impl(Cursor& u, const Params& p, int c, int G) {
  while (u.l < p.layers + (p.head ? 1 : 0)) {
    if (u.l == p.layers) {  // the LM head: one phase, this CTA's vocabulary rows (K = D)
      if (u.ph == 0) {
        int lo, hi;
        rows_of(p.vocab, c, G, lo, hi);
        u.rb = D * 2;
        u.R = p.slot / u.rb;
        u.r0 = lo;
        u.hi = hi;
        u.base = reinterpret_cast<const unsigned char*>(p.head);
        if (lo < hi) return true;
      }
    } else if (u.ph == 2) {
      if (MODE >= 5 && c < H) {
        u.r0 = 0, u.hi = 1, u.R = 1, u.rb = STEP_SLOT, u.base = nullptr;
        return true;
      }
    } else {
      bool in = u.ph < 2;
      int lo, hi;
      if (in)
        in_range(MODE, u.ph, c, G, lo, hi);
      else
        rows_of(D, c, G, lo, hi);
      u.rb = (in ? D : DI) * WB;
      u.R = p.slot / u.rb;
      u.r0 = lo;
      u.hi = hi;
      u.base = in ? reinterpret_cast<const unsigned char*>(p.win + (size_t)u.l * NIN * D)
                  : reinterpret_cast<const unsigned char*>(p.wout + (size_t)u.l * D * DI);
      if (lo < hi) return true;
    }
    if (++u.ph == 4) u.ph = 0, ++u.l;
  }
  return false;
}
template <int MODE>
__device__ __forceinline__ bool cursor_enter(Cursor& u, const Params& p, int c, int G) {
  return cursor_enter_impl<MODE>(u, p, c, G);
}
template <int MODE>
__device__ __forceinline__ bool cursor_next(Cursor& u, const Params& p, int c, int G) {
  u.r0 += u.R;
  if (u.r0 < u.hi) return true;
  if (++u.ph == 4) u.ph = 0, ++u.l;
  return cursor_enter<MODE>(u, p, c, G);
}
__device__ __forceinline__ unsigned cursor_bytes(const Cursor& u) { return (unsigned)(min(u.R, u.hi - u.r0) * u.rb); }
__device__ __forceinline__ const unsigned char* cursor_src(const Cursor& u) { return u.base + (size_t)u.r0 * u.rb; }

#if !MK_FP8  // mode 10 streams bf16 rows (a 2.7B experiment, slower: benchmarks/README.md)
// ------------------------------------------------------------------ mode 10: early steps, out_proj by heads
// In modes 4–9 every head's step waits for the end of in_proj (every step reads B, C and dt, the last rows of
// the last CTAs' contiguous shares), and out_proj waits for every head's g: the step sits whole on each
// layer's critical path (≈ 3 µs: mode 8). Mode 10 reorders both GEMVs so that the steps run inside the
// weight stream:
//  - in_proj in blocks of BR rows (one 40 KB slot), taken round robin (block b by CTA b mod G, at position
//    b / G of its stream) in the order [B, C, dt rows | head 0's z, x rows | head 1's | …]: every CTA streams
//    the shared rows first, and head h's inputs are all published by position (NB_SHARED + 16 h + 15) / G;
//    the rows past the last full round (NB mod G blocks) go as pieces of a few rows to every CTA, so that
//    no CTA streams a whole block more than the others;
//  - CTA h < H runs head h's step (its slot in the ring at that point) `slack` positions after that one,
//    between its own in_proj blocks, so the steps of the first heads run while the stream goes on;
//  - out_proj by chunks of heads (columns of its weights, the CTA's rows of each): chunk j waits only for its
//    heads' g, the rows' partial sums add up over the chunks, and the gated norm's 1/rms (a scalar) multiplies
//    the sum at the end. The last heads' steps then overlap the first chunks' stream.
// Every block is BR consecutive rows of in_proj's own layout and each chunk row a contiguous piece of an
// out_proj row, so the layouts stay those of the other modes. The sums run in another order than the
// reference's (out_proj's rows in chunks): checked to a tolerance, not bit for bit.
constexpr int BR = 8;                         // in_proj rows per block (a slot of BR · D · 2 = 40 KB)
constexpr int NB = NIN / BR;                  // 1322 blocks
constexpr int NB_SHARED = (2 * NS + H) / BR;  // the blocks of B, C and dt rows, read by every head's step
constexpr int NB_HEAD = 2 * P / BR;           // a head's blocks: its z rows, then its x rows
static_assert(NIN % BR == 0 && (2 * NS + H) % BR == 0 && P % BR == 0 && BR == W, "one in_proj row per warp");

// Block b's first row in in_proj's layout (z, x, B, C, dt).
__host__ __device__ inline int block_row(int b) {
  if (b < NB_SHARED) return 2 * DI + b * BR;
  const int u = (b - NB_SHARED) * BR, hd = u / (2 * P), w = u % (2 * P);
  return w < P ? hd * P + w : DI + hd * P + (w - P);
}
// Row q of the order above, in in_proj's layout.
__host__ __device__ inline int perm_row(int q) { return block_row(q / BR) + q % BR; }
// CTA c's leftover rows [q0, q1) of that order (after the NB / G full rounds of blocks).
__host__ __device__ inline void piece_of(int c, int G, int& q0, int& q1) {
  const int base = NB / G * G * BR;
  rows_of(NIN - base, c, G, q0, q1);
  q0 += base, q1 += base;
}
// CTA c's in_proj slots: NB / G blocks, then its piece if it has one.
__host__ __device__ inline int positions_of(int c, int G) {
  int q0, q1;
  piece_of(c, G, q0, q1);
  return NB / G + (q1 > q0);
}
// How many of CTA c's in_proj slots come before its step (CTA c < H runs head c's): `slack` past the
// position of head c's last block (the pieces' position if that block is one of the leftovers).
__host__ __device__ inline int step_at(int c, int G, int slack) {
  const int last = NB_SHARED + NB_HEAD * c + NB_HEAD - 1, full = NB / G;
  const int at = (last < full * G ? last / G : full) + 1 + slack, n = positions_of(c, G);
  return at < n ? at : n;
}
// Heads per out_proj chunk: as many as fit one slot with the most rows a CTA owns.
__host__ __device__ inline int heads_per_chunk(int slot, int G) {
  const int rows = (D + G - 1) / G, hpc = slot / (rows * P * 2);
  return hpc < H ? hpc : H;
}
// CTA c's slots of one layer: nb in_proj blocks with the step slot (CTA c < H) after the first `sat`, then
// nch out_proj chunks. Item i → kind 0 (in_proj position idx), 1 (the step), 2 (out_proj chunk idx).
struct Plan10 {
  int nb, full, q0, q1, sat, nch, hpc, olo, ohi, items;  // nb in_proj slots, the first `full` of them blocks
  bool step;
  __device__ Plan10(const Params& p, int c, int G) {
    nb = positions_of(c, G);
    step = c < H;
    full = NB / G;
    piece_of(c, G, q0, q1);
    sat = step ? step_at(c, G, p.slack) : -1;
    hpc = heads_per_chunk(p.slot, G);
    nch = (H + hpc - 1) / hpc;
    rows_of(D, c, G, olo, ohi);
    items = nb + (step ? 1 : 0) + nch;
  }
  __device__ int kind(int i, int& idx) const {
    if (step && i == sat) return idx = 0, 1;
    if (step && i > sat) --i;
    return i < nb ? (idx = i, 0) : (idx = i - nb, 2);
  }
};

// The producer of mode 10: the layers' items in order through the ring; with pf > 0 the weights pf items
// ahead pulled into L2 as well.
__device__ void produce10(const Params& p, int c, int G, unsigned char* ring, uint64_t* full, uint64_t* empty) {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  const Plan10 pl(p, c, G);
  const int no = pl.ohi - pl.olo;
  const long total = (long)p.layers * pl.items;
  // load (s >= 0: into ring slot s) or prefetch into L2 (s < 0) item k
  auto item = [&](long k, int s) {
    const int l = (int)(k / pl.items);
    int idx;
    const int kind = pl.kind((int)(k % pl.items), idx);
    unsigned char* dst = s >= 0 ? ring + (size_t)s * p.slot : nullptr;
    if (kind == 1) {
      if (s >= 0) load_step_slot(p, l, c, dst, full + s, pol);
    } else if (kind == 0) {
      // a block, or the piece's rows as runs of consecutive rows in in_proj's layout (a block boundary
      // breaks a run)
      const int q0 = idx < pl.full ? (c + idx * G) * BR : pl.q0, q1 = idx < pl.full ? q0 + BR : pl.q1;
      if (s >= 0) mbar_expect(full + s, (q1 - q0) * D * 2);
      for (int q = q0; q < q1;) {
        const int e = min(q1, (q / BR + 1) * BR), bytes = (e - q) * D * 2;
        const bf16* src = p.win + ((size_t)l * NIN + perm_row(q)) * D;
        if (s < 0)
          prefetch_l2(src, bytes);
        else
          bulk_load(dst + (size_t)(q - q0) * D * 2, src, bytes, full + s, pol);
        q = e;
      }
    } else {
      const int h0 = idx * pl.hpc, h1 = min(H, h0 + pl.hpc), bytes = (h1 - h0) * P * 2;
      const bf16* src = p.wout + ((size_t)l * D + pl.olo) * DI + h0 * P;
      if (s >= 0) mbar_expect(full + s, bytes * no);
      for (int r = 0; r < no; ++r) {
        if (s < 0)
          prefetch_l2(src + (size_t)r * DI, bytes);
        else
          bulk_load(dst + (size_t)r * bytes, src + (size_t)r * DI, bytes, full + s, pol);
      }
    }
  };
  for (long k = 0; k < p.pf && k < total; ++k) item(k, -1);
  for (long k = 0; k < total; ++k) {
    const int s = (int)(k % p.stages);
    mbar_wait(empty + s, ((k / p.stages) & 1) ^ 1);
    item(k, s);
    if (k + p.pf < total) item(k + p.pf, -1);
  }
}

// The consumers of mode 10 (all CT threads), layer after layer; k counts the ring's slots as the producer's.
__device__ void consume10(const Params& p, int c, int G, unsigned char* ring, uint64_t* full, uint64_t* empty,
                          bf16* x_s, float* parts, float* sx, float* sz, float* red, float* hown, float* misc) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const Plan10 pl(p, c, G);
  const int no = pl.ohi - pl.olo;
  auto ev = [&](int l, int e) {
    if (p.trace && tid == 0) p.trace[((size_t)c * p.layers + l) * NEV + e] = globaltimer();
  };
  long k = 0;
  for (int l = 0; l < p.layers; ++l) {
    const unsigned tag = ll_tag(p, l);
    if (pl.step && tid == 0) {  // the step's scalars, in shared memory until the step (load_residual syncs)
      misc[1] = p.dt_bias[(size_t)l * H + c];
      misc[2] = p.a_log[(size_t)l * H + c];
      misc[3] = p.dskip[(size_t)l * H + c];
    }
    ev(l, 0);
    ev(l, 1);
    // A: the residual after layer l − 1, bf16 into x_s; this CTA's out_proj rows of it kept in float32
    const float scale = load_residual(p.h, x_s, red, tid, l > 0 ? p.h_ll : nullptr, ll_tag(p, l - 1), hown, pl.olo,
                                      pl.ohi);
    ev(l, 2);
    // B: in_proj blocks (a row per warp, published as soon as it is summed) with the step among them
    for (int i = 0; i < pl.nb + (pl.step ? 1 : 0); ++i, ++k) {
      const int s = (int)(k % p.stages);
      const unsigned par = (k / p.stages) & 1;
      int idx;
      if (pl.kind(i, idx) == 1) {
        StepIn in;
        step_gather_ll(p, c, in, sz, tid, tag);
        ev(l, 5);
        mbar_wait(full + s, par);
        const SlotSrc src{ring + (size_t)s * p.slot, tid, p.pos, misc[1], misc[2], misc[3]};
        step_compute(p, l, c, src, in, sx, sz, red, tid, c == 0, tag,
                     p.trace ? p.trace + ((size_t)c * p.layers + l) * NEV : nullptr);
        ev(l, 6);
      } else {
        mbar_wait(full + s, par);
        const int q0 = idx < pl.full ? (c + idx * G) * BR : pl.q0, rows = idx < pl.full ? BR : pl.q1 - pl.q0;
        if (warp < rows) {
          const bf16* w = reinterpret_cast<const bf16*>(ring + (size_t)s * p.slot) + (size_t)warp * D;
          const float v = row_dot(w, x_s, D, 0, 1, lane);
          if (lane == 0) st_relaxed64(p.zx_ll + perm_row(q0 + warp), ll_pack(__float_as_uint(v * scale), tag));
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty + s);
    }
    ev(l, 3);
    ev(l, 4);
    cbar();  // every warp is done with the residual in x_s before g's chunks overwrite it
    // D: out_proj chunk by chunk, each after its heads' g
    for (int j = 0; j < pl.nch; ++j, ++k) {
      const int h0 = j * pl.hpc, h1 = min(H, h0 + pl.hpc), cols = (h1 - h0) * P;
      if (j == 0) ev(l, 7);
      {
        constexpr int PER = (16 * P / 2 + CT - 1) / CT;  // g words per thread, up to 16 heads a chunk
        int gi[PER];
        unsigned gu[PER];
#pragma unroll
        for (int t = 0; t < PER; ++t) {
          const int wd = h0 * (P / 2) + tid + t * CT;
          gi[t] = wd < h1 * (P / 2) ? wd : -1;
        }
        ll_poll(p.g_ll, gi, tag, gu);
        unsigned* xw = reinterpret_cast<unsigned*>(x_s);
#pragma unroll
        for (int t = 0; t < PER; ++t)
          if (gi[t] >= 0) xw[gi[t]] = gu[t];
        for (int wd = h0 * (P / 2) + tid + PER * CT; wd < h1 * (P / 2); wd += CT) {  // chunks past 16 heads
          int gj[1] = {wd};
          unsigned gv[1];
          ll_poll(p.g_ll, gj, tag, gv);
          xw[wd] = gv[0];
        }
      }
      cbar();
      if (j == 0) ev(l, 8);
      const int s = (int)(k % p.stages);
      mbar_wait(full + s, (k / p.stages) & 1);
      const bf16* w = reinterpret_cast<const bf16*>(ring + (size_t)s * p.slot);
      for (int r = warp; r < no; r += W) {
        const float v = row_dot(w + (size_t)r * cols, x_s + h0 * P, cols, 0, 1, lane);
        if (lane == 0) parts[r] = j ? parts[r] + v : v;
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty + s);
    }
    ev(l, 9);
    // the gated norm's 1/rms from every head's Σ g², then the residual rows
    const float inv_g = gated_inv_ll(p, tag, misc, tid);
    if (tid < no) {
      const float nh = hown[tid] + rnd(rnd(parts[tid]) * inv_g);
      st_relaxed64(p.h_ll + pl.olo + tid, ll_pack(__float_as_uint(nh), tag));
      p.h[pl.olo + tid] = nh;  // for the next launch (its layer 0) and the check
    }
    cbar();  // parts, hown and misc are read above before the next layer writes them
    ev(l, 10);
  }
}

#endif  // !MK_FP8

// One instance per mode, so that each is register-allocated for its own paths (the kernel runs at its
// register limit, and a spilled value comes back from L2).
template <int MODE>
__global__ void __launch_bounds__(THREADS, 1) megakernel(Params p) {
  if (p.pos_dev) {  // every CTA reads them before any advances the epoch (the last one, after all finished)
    p.pos = *p.pos_dev;
    p.epoch = (int)*p.epoch_dev;
  }
  extern __shared__ __align__(128) unsigned char smem[];
  const int G = gridDim.x, c = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned char* ring = smem;
  bf16* x_s = reinterpret_cast<bf16*>(smem + (size_t)p.stages * p.slot);
  float* parts = reinterpret_cast<float*>(x_s + DI);
  float* sx = parts + MAX_PARTS;
  float* sz = sx + P + 2 * NS;
  float* red = sz + P;
  float* hown = red + W;
  float* misc = hown + MAX_OWN;
  uint64_t* full = reinterpret_cast<uint64_t*>(misc + 8);
  uint64_t* empty = full + p.stages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < p.stages; ++s) {
      mbar_init(full + s, 1);
      mbar_init(empty + s, W);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  const int K_[2] = {D, DI}, N_[2] = {NIN, D};
  if (warp == W) {  // the producer: every layer's weight rows of this CTA, in the consumers' order
    if constexpr (MODE == 10) {
#if !MK_FP8
      if (lane == 0) produce10(p, c, G, ring, full, empty);
#endif
    } else if (lane == 0) {
      uint64_t pol;
      asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
      // With pf > 0 a second cursor runs pf slots ahead of the ring's loads and pulls those rows into L2, so
      // the memory system keeps streaming while the ring is full and the consumers wait.
      Cursor a{0, 0}, b{0, 0};
      bool va = cursor_enter<MODE>(a, p, c, G), vb = p.pf > 0 && cursor_enter<MODE>(b, p, c, G);
      for (int i = 0; i < p.pf && vb; ++i) {
        if (b.ph != 2) prefetch_l2(cursor_src(b), cursor_bytes(b));
        vb = cursor_next<MODE>(b, p, c, G);
      }
      for (int k = 0; va; ++k) {
        int s = k % p.stages;
        mbar_wait(empty + s, ((k / p.stages) & 1) ^ 1);
        if (a.ph == 2) {
          load_step_slot(p, a.l, c, ring + (size_t)s * p.slot, full + s, pol);
        } else {
          unsigned bytes = cursor_bytes(a);
          mbar_expect(full + s, bytes);
          bulk_load(ring + (size_t)s * p.slot, cursor_src(a), bytes, full + s, pol);
        }
        va = cursor_next<MODE>(a, p, c, G);
        if (vb) {
          if (b.ph != 2) prefetch_l2(cursor_src(b), cursor_bytes(b));
          vb = cursor_next<MODE>(b, p, c, G);
        }
      }
    }
    return;
  }

  const int tid = threadIdx.x;
  if constexpr (MODE == 10) {
#if !MK_FP8
    consume10(p, c, G, ring, full, empty, x_s, parts, sx, sz, red, hown, misc);
#endif
  } else {
  const unsigned G_ = (unsigned)G * p.epoch, H_ = (unsigned)H * p.epoch;
  unsigned* in_done = p.cnt;
  unsigned* step_done = p.cnt + p.layers;
  unsigned* out_done = p.cnt + 2 * p.layers;
  constexpr bool gemv = MODE != 3, waits = MODE == 0 || MODE == 2, ll = MODE >= 4, step = MODE == 0 || ll;
  const bool step_cta = step && c < H;
  int olo, ohi;  // the residual rows this CTA's out_proj updates
  rows_of(D, c, G, olo, ohi);
  StepPre pre;
  float sc[3];  // mode 5: the step's scalars (dt_bias, A_log, D), loaded at the layer's start
  // Trace events (thread 0, %globaltimer ns): 0 layer start, 1 residual ready, 2 x loaded, 3 in_proj rows done,
  // 4 in_done arrived, 5 in_done complete (step CTAs), 6 step done, 7 g ready, 8 g loaded, 9 out_proj rows done,
  // 10 out_done arrived. Mode 4 polls data rather than counters: 1 → 2 holds the residual's wait, 4 → 5 the
  // step's inputs' wait, 7 → 8 g's wait.
  auto ev = [&](int l, int e) {
    if (p.trace && tid == 0) p.trace[((size_t)c * p.layers + l) * NEV + e] = globaltimer();
  };
  int k = 0;
  for (int l = 0; l < p.layers; ++l) {
    for (int ph = 0; ph < 2; ++ph) {
      float scale = 1.f;
      if (ph == 0) {  // A: the residual after layer l − 1
        ev(l, 0);
        if (MODE == 4 && step_cta) step_preload(p, l, c, pre, tid);  // in flight while the residual and in_proj go
        if (MODE >= 5 && step_cta) {
          sc[0] = p.dt_bias[(size_t)l * H + c];
          sc[1] = p.a_log[(size_t)l * H + c];
          sc[2] = p.dskip[(size_t)l * H + c];
        }
        if (l > 0 && waits) wait_count(out_done + l - 1, G_, tid);
        ev(l, 1);
        if (ll)
          scale = load_residual(p.h, x_s, red, tid, l > 0 ? p.h_ll : nullptr, ll_tag(p, l - 1), hown, olo, ohi);
        else if (gemv)
          scale = load_residual(p.h, x_s, red, tid);
        ev(l, 2);
      } else if (ll) {  // D: g after every head's step
        ev(l, 7);
        scale = load_g_ll(p, ll_tag(p, l), x_s, misc, tid);
        ev(l, 8);
      } else {
        if (step) wait_count(step_done + l, H_, tid);
        if (MODE == 2) wait_count(in_done + l, G_, tid);
        ev(l, 7);
        if (gemv) {
          const uint4* gv = reinterpret_cast<const uint4*>(p.g);
          uint4* xv = reinterpret_cast<uint4*>(x_s);
          constexpr int NV = DI / 8, PER = (NV + CT - 1) / CT;
          uint4 t[PER];
#pragma unroll
          for (int i = 0; i < PER; ++i)
            if (tid + i * CT < NV) t[i] = __ldcg(gv + tid + i * CT);
#pragma unroll
          for (int i = 0; i < PER; ++i)
            if (tid + i * CT < NV) xv[tid + i * CT] = t[i];
          if (warp == 0) {
            float v = gated_inv(p, lane);
            if (lane == 0) misc[0] = v;
          }
          cbar();
          scale = misc[0];
        }
        ev(l, 8);
      }
      // B / D: this CTA's rows of the projection, slot by slot as the producer fills them.
      // A slot holds R rows. Mamba2-2.7B's (in_proj 5 KB, out_proj 10 KB; 40 or 20 KB slots) are 8, 4 or 2, so
      // W / R warps share each row (segs segments of its dot product). Smaller models' rows may outnumber the
      // warps or not divide them (kGeneralRows): then a warp takes rows r, r + W, … whole, or with R < W the
      // first segs · R warps share them as above and the others idle. (The 2.7B build keeps the measured code.)
      constexpr bool kGeneralRows = !kMeasuredBuild;
      const int K = K_[ph], rb = K * WB, R = p.slot / rb, segs = kGeneralRows && R > W ? 1 : W / R;
      int lo, hi;
      for (int part = 0; part < (ph == 0 && MODE == 6 ? 2 : 1); ++part) {
        if (ph == 0)
          in_range(MODE, part, c, G, lo, hi);
        else
          rows_of(N_[ph], c, G, lo, hi);
        for (int r0 = lo; r0 < hi; r0 += R, ++k) {
          int s = k % p.stages, rows = min(R, hi - r0), r = warp % R, sg = warp / R;
          mbar_wait(full + s, (k / p.stages) & 1);
          int step = R;  // the rows between a warp's rows of the slot
          if constexpr (kGeneralRows) {
            step = R > W ? W : R;
            r = warp % step, sg = warp / step;
            if (sg >= segs) r = rows;  // a warp past the first segs · R: nothing
          }
          for (; gemv && r < rows; r += step) {
            float v = row_dot_w(reinterpret_cast<const wt*>(ring + (size_t)s * p.slot + (size_t)r * rb), x_s, K, sg,
                                segs, lane);
            if (lane == 0) {
              // Tagged modes publish an in_proj row whose dot product one warp holds whole as soon as it is
              // done: a step waits for its own rows, not for the end of their owners' passes.
              if (ll && ph == 0 && segs == 1) {
#if MK_FP8
                v *= __ldg(p.win_scale + (size_t)l * NIN + r0 + r);  // the row's scale
#endif
                st_relaxed64(p.zx_ll + r0 + r, ll_pack(__float_as_uint(v * scale), ll_tag(p, l)));
              } else {
                parts[(r0 - lo + r) * segs + sg] = v;
              }
            }
            if constexpr (!kGeneralRows) break;  // (2.7B: one row per warp and slot)
          }
          __syncwarp();
          if (lane == 0) mbar_arrive(empty + s);
        }
      }
      cbar();
      ev(l, ph == 0 ? 3 : 9);
      const unsigned tag = ll_tag(p, l);
      const bool published = ll && ph == 0 && segs == 1;
      for (int i = tid; gemv && !published && i < hi - lo; i += CT) {
        float o = 0.f;
        for (int s = 0; s < segs; ++s) o += parts[i * segs + s];
#if MK_FP8
        o *= __ldg(ph == 0 ? p.win_scale + (size_t)l * NIN + lo + i : p.wout_scale + (size_t)l * D + lo + i);
#endif
        if (ph == 0) {
          if (ll)
            st_relaxed64(p.zx_ll + lo + i, ll_pack(__float_as_uint(o * scale), tag));
          else
            p.zx[lo + i] = o * scale;
        } else if (ll) {  // the same sum as residual_update, from the float32 h kept at the layer's start
          float nh = hown[i] + rnd(rnd(o) * scale);
          st_relaxed64(p.h_ll + lo + i, ll_pack(__float_as_uint(nh), tag));
          p.h[lo + i] = nh;  // for the next launch (its layer 0) and the check
        } else {
          p.h[lo + i] = residual_update(p, lo + i, o, scale);
        }
      }
      if (ll)
        cbar();  // parts are read above before the next phase writes them
      else
        arrive_count((ph == 0 ? in_done : out_done) + l, tid);
      ev(l, ph == 0 ? 4 : 10);
      if (ph == 0 && step_cta) {  // C: the SSM step of head c
        if (ll) {
          StepIn in;
          step_gather_ll(p, c, in, sz, tid, tag);
          ev(l, 5);
          if (MODE >= 5) {  // from the step slot, released after the step
            int s = k % p.stages;
            mbar_wait(full + s, (k / p.stages) & 1);
            const SlotSrc src{ring + (size_t)s * p.slot, tid, p.pos, sc[0], sc[1], sc[2]};
            if (MODE == 8) {  // timing only: no step arithmetic, g = 0 and Σ g² = 1 published (no state update)
              if (tid < P / 2) st_relaxed64(p.g_ll + c * (P / 2) + tid, ll_pack(0u, tag));
              if (tid == 0) st_relaxed64(p.gss_ll + c, ll_pack(__float_as_uint(1.f), tag));
            } else if (MODE == 11) {
              step_compute<false, true>(p, l, c, src, in, sx, sz, red, tid, c == 0, tag,
                                        p.trace ? p.trace + ((size_t)c * p.layers + l) * NEV : nullptr);
            } else if (MODE == 9) {
              step_compute<true>(p, l, c, src, in, sx, sz, red, tid, c == 0, tag);
            } else {
              step_compute(p, l, c, src, in, sx, sz, red, tid, c == 0, tag,
                           p.trace ? p.trace + ((size_t)c * p.layers + l) * NEV : nullptr);
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(empty + s);
            ++k;
          } else {
            step_compute(p, l, c, RegSrc{pre}, in, sx, sz, red, tid, c == 0, tag);
          }
        } else {
          wait_count(in_done + l, G_, tid);
          ev(l, 5);
          ssm_step(p, l, c, sx, sz, red, tid, c == 0);
          arrive_count(step_done + l, tid);
        }
        ev(l, 6);
      }
    }
  }
    if constexpr (ll) {
      if (p.head) {  // the LM head: this CTA's vocabulary rows, from the residual after the last layer
        const float scale = load_residual(p.h, x_s, red, tid, p.h_ll, ll_tag(p, p.layers - 1));
        int lo, hi;
        rows_of(p.vocab, c, G, lo, hi);
        const int R = p.slot / (D * 2);
        for (int r0 = lo; r0 < hi; r0 += R, ++k) {
          const int s = k % p.stages, rows = min(R, hi - r0);
          mbar_wait(full + s, (k / p.stages) & 1);
          for (int r = warp; r < rows; r += W) {
            const float v = row_dot(reinterpret_cast<const bf16*>(ring + (size_t)s * p.slot + (size_t)r * D * 2), x_s,
                                    D, 0, 1, lane);
            if (lane == 0) p.logits[r0 + r] = v * scale;
          }
          __syncwarp();
          if (lane == 0) mbar_arrive(empty + s);
        }
      }
    }
  }
  if (MODE >= 5 && tid == 0) bulk_wait();  // the step's state stores complete before the CTA exits
  if (p.epoch_dev && tid == 0) {  // the last CTA to finish advances the epoch for the next launch
    __threadfence();
    if (atomicAdd(p.done_dev, 1u) == (unsigned)G - 1) {
      *p.done_dev = 0;
      *p.epoch_dev = (unsigned)p.epoch + 1;
      __threadfence();
    }
  }
}

// Dynamic shared memory of a launch with these ring slots.
inline size_t megakernel_smem_bytes(int slot, int stages) {
  return (size_t)stages * slot + DI * 2 + (MAX_PARTS + P + 2 * NS + P + W + MAX_OWN + 8) * 4 + 2 * stages * 8;
}
