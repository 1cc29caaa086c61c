// Probe: one CUDA launch per token for the decode step of Mamba2 2.7B at batch 1 (a "megakernel"), to
// measure whether a dataflow design reaches the ≈ 33 µs per layer that 450 tokens/s needs
// (benchmarks/README.md, "Generation": the separate XLA / Pallas kernels take 39.6 µs per layer, and the
// Mosaic GPU probes with grid barriers 41–43).
//
// Design (after Hazy Research's "No Bubbles" megakernel): one CTA per SM, all resident (cooperative launch).
// In every CTA a producer warp streams the CTA's share of every layer's weights — its rows of in_proj, then
// its rows of out_proj, layer after layer — through a ring of shared-memory slots with bulk async copies
// (cp.async.bulk + mbarrier), never waiting on data: weights do not depend on the token. Eight consumer
// warps multiply each slot by the layer's input and synchronise with the other CTAs only through counters
// in global memory, one per (phase, layer), waited for by polling:
//   A  wait out_proj(l − 1) done by all CTAs; read the residual h (fp32, D), round it to bf16, its 1/rms;
//   B  in_proj rows (weights stored transposed, a row = one output feature, K contiguous) · x → zx · 1/rms;
//      arrive in_done[l];
//   C  CTA c < H: the SSM step of head c once in_done[l] is complete — conv (ring of K slots, in place),
//      softplus dt, the state update of its (P, N) bf16 state, y, D skip, SiLU(z) gate → g, Σ g²; arrive
//      step_done[l];
//   D  wait step_done[l]; g (bf16, DI) and the gated norm's 1/rms from the 80 Σ g²; out_proj rows · g;
//      h[j] += bf16(o_j · 1/rms); arrive out_done[l].
// The ring keeps the memory system busy while consumers wait at a counter, so a wait costs stream time only
// when it outlasts the ring (slots · slot bytes at ≈ 20 GB/s per SM).
//
// Modes (MODE:SLOT_BYTES:STAGES[:PF] on the command line; one kernel instance per mode):
//   0  the full step, phases chained by the counters above;
//   1  no waits and no SSM step: the weight stream and its GEMVs alone (the design's ceiling);
//   2  the counters' waits without the SSM step;  3  the ring alone (slots released unread);
//   4  the full step chained by tagged data instead: in_proj's output, g, Σ g² and the residual are published
//      as 8-byte words (4 bytes of data, the tag of the token and layer) with relaxed stores, and readers poll
//      the words until every tag matches (NCCL's LL protocol): an arrival is one store, a wait one or two round
//      trips, a step waits only for the CTAs owning its head's rows, and an in_proj row is published as soon
//      as its warp has it; the step's state and conv inputs are loaded at the layer's start;
//   5  mode 4 with the step's state, conv weights and conv inputs streamed through the ring as one more slot
//      behind the CTA's in_proj rows (read in place from shared memory);
//   6  mode 5 with every CTA computing its share of in_proj's B, C and dt rows (read by every step) first;
//   7  mode 5 with the in_proj rows split so that every CTA streams the same bytes (a step slot counted);
//   8  mode 5 without the step's arithmetic (timing only: g = 0 published; not checked);
//   9  mode 5 with the step's state and conv-ring stores issued after g is published.
// PF > 0: the producer also pulls the rows PF slots past the ring's into L2 (cp.async.bulk.prefetch), so HBM
// keeps streaming while the ring is full and the consumers wait.
// Measured (H100, 2026-12-05; benchmarks/README.md, results/megakernel_probe_*_h100.json): mode 0 38–40 µs per
// layer, mode 1 27.8–30.4, mode 4 36.6–37.8, modes 5 / 7 / 9 with PF 2 33.8–34.0, mode 8 with PF 2 30.8; the
// loop of separate XLA / Pallas kernels 38.0–38.75 on the same machines. With the LM head that is ≈ 440 tok/s
// against the loop's 389 and issue 5's 450. With
// --trace, one more launch per config records %globaltimer at the phase boundaries of every (CTA, layer),
// summarised as medians (`phases_us`) and as the layer's critical path (`path_us`). The norms' weights are taken as folded into the
// projections (as mamba_jax.inference.fold does), so they do not appear.
//
// Correctness: a reference runs the same math as separate kernels (one per phase, the same device functions
// and reduction orders, compiled with --fmad=false), so the megakernel's final residual, SSM states and conv
// ring must equal it bit for bit after several tokens; that checks the cross-CTA synchronisation and the
// ring protocol, not the Mamba2 math (which mamba_jax's own kernels and tests check against references).
//
//   nvcc -O3 -std=c++17 -arch=sm_90a --fmad=false -o /tmp/mk benchmarks/megakernel_probe.cu
//   /tmp/mk [--layers 64] [--tokens 20] [--configs MODE:SLOT_BYTES:STAGES,...]
// prints one JSON object per line (read ceiling, correctness, one per config); megakernel_probe.py runs it.
// --load DIR takes a real model's layers, caches and residual from DIR instead of random ones (raw arrays as
// mamba_jax.inference.megakernel lays them out), --pos P the first token's position, --check-tokens N how
// many tokens the check decodes, --dump DIR writes the residual, states and conv ring after them:
// benchmarks/megakernel_check.py compares those with the JAX reference of the model's decode step.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define CK(x)                                                                                   \
  do {                                                                                          \
    cudaError_t e_ = (x);                                                                       \
    if (e_ != cudaSuccess) {                                                                    \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));        \
      exit(1);                                                                                  \
    }                                                                                           \
  } while (0)

typedef __nv_bfloat16 bf16;

// Mamba2 2.7B: d_model 2560, 80 heads of 64, d_state 128, one group, conv width 4.
constexpr int D = 2560, H = 80, P = 64, NS = 128, DI = H * P, CX = DI + 2 * NS, NIN = 2 * DI + 2 * NS + H, KW = 4;
constexpr float EPS = 1e-5f;
constexpr int W = 8;                  // consumer warps
constexpr int CT = 32 * W;            // consumer threads
constexpr int THREADS = CT + 32;      // + the producer warp
constexpr int MAX_PARTS = 2048;       // floats of per-(row, segment) partial sums in shared memory
constexpr int NEV = 11;               // trace events per (CTA, layer), see `megakernel`
constexpr int MAX_OWN = 32;           // residual rows one CTA's out_proj may own (D / SMs, rounded up)

struct Params {
  const bf16* win;      // [L][NIN][D]  in_proj, transposed: row j = output feature j
  const bf16* wout;     // [L][D][DI]   out_proj, transposed
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
};

// ---------------------------------------------------------------- PTX helpers
__device__ __forceinline__ uint32_t sa(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(uint64_t* b, unsigned n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(sa(b)), "r"(n) : "memory");
}
__device__ __forceinline__ bool mbar_try(uint64_t* b, unsigned parity) {
  uint32_t ok;
  asm volatile(
      "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
      : "=r"(ok)
      : "r"(sa(b)), "r"(parity)
      : "memory");
  return ok;
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, unsigned parity) {
  while (!mbar_try(b, parity)) {
  }
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(sa(b)) : "memory");
}
__device__ __forceinline__ void mbar_expect(uint64_t* b, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sa(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned bytes, uint64_t* bar, uint64_t pol) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          sa(dst)),
      "l"(src), "r"(bytes), "r"(sa(bar)), "l"(pol)
      : "memory");
}
__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long ld_relaxed64(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed64(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
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
__host__ __device__ inline void rows_of(int n, int c, int G, int& lo, int& hi) {
  lo = (int)((long long)c * n / G);
  hi = (int)((long long)(c + 1) * n / G);
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

// The SSM step of head hd in layer l, by the CT consumer threads, in three parts so that mode 4 can issue the
// loads that do not depend on in_proj (state, conv ring and weights, the head's scalars) before in_proj's
// output exists: step_preload, then step_gather_* (in_proj's output for the head), then step_compute.
constexpr int CH_PER = (P + 2 * NS + CT - 1) / CT;  // conv channels per thread
static_assert(CT == 4 * P, "four threads per state row");
__device__ __forceinline__ int step_channel(int hd, int i) { return i < P ? hd * P + i : DI + (i - P); }
struct StepPre {
  uint4 st[4];  // this thread's 32 states: row tid / 4, quarter tid % 4
  float cw[CH_PER][KW], cb[CH_PER], cr[CH_PER][KW - 1];  // conv weights, bias, the ring's last inputs
  float dtb, alog, dsk;
};
struct StepIn {
  float cur[CH_PER];  // the conv inputs of the thread's channels (x of the head, then B, then C)
  float dt;
};
// step_compute's view of StepPre (modes 0, 4 and the reference).
struct RegSrc {
  const StepPre& s;
  __device__ float cw(int it, int j) const { return s.cw[it][j]; }
  __device__ float cb(int it) const { return s.cb[it]; }
  __device__ float cr(int it, int j) const { return s.cr[it][j]; }
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
  const uint4* st = reinterpret_cast<const uint4*>(p.state + (((size_t)l * H + hd) * P + row) * NS + q * 32);
#pragma unroll
  for (int v = 0; v < 4; ++v) s.st[v] = st[v];
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
template <bool LATE = false, class Src>
__device__ void step_compute(const Params& p, int l, int hd, const Src& s, const StepIn& in, float* sx,
                             const float* sz, float* red, int tid, bool ring_bc, unsigned tag) {
#pragma unroll
  for (int it = 0; it < CH_PER; ++it) {
    int i = tid + it * CT;
    if (i < P + 2 * NS) {
      int ch = step_channel(hd, i);
      float acc = fmaf(s.cw(it, KW - 1), in.cur[it], s.cb(it));
#pragma unroll
      for (int j = 0; j < KW - 1; ++j) acc = fmaf(s.cw(it, j), s.cr(it, j), acc);
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
  cbar();
  int row = tid >> 2, q = tid & 3;  // 4 threads per state row, 32 states each
  uint4* st = reinterpret_cast<uint4*>(p.state + (((size_t)l * H + hd) * P + row) * NS + q * 32);
  float xdt = sx[row] * dt, y = 0.f;
  const float* bv = sx + P + q * 32;
  const float* cv = sx + P + NS + q * 32;
  uint4 u4[4];
#pragma unroll
  for (int v = 0; v < 4; ++v) u4[v] = s.st(v);
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    uint4& u = u4[v];
    __nv_bfloat162* e = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 f = __bfloat1622float2(e[i]);
      int n = v * 8 + 2 * i;
      f.x = fmaf(f.x, da, xdt * bv[n]);
      f.y = fmaf(f.y, da, xdt * bv[n + 1]);
      e[i] = __floats2bfloat162_rn(f.x, f.y);
      float2 r = __bfloat1622float2(e[i]);  // y reads the state as stored
      y = fmaf(r.x, cv[n], y);
      y = fmaf(r.y, cv[n + 1], y);
    }
  }
  if (!LATE) {
#pragma unroll
    for (int v = 0; v < 4; ++v) st[v] = u4[v];
  }
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
  float sum = block_sum(g2, red, tid);
  if (tid == 0) {
    if (tag)
      st_relaxed64(p.gss_ll + hd, ll_pack(__float_as_uint(sum), tag));
    else
      p.gss[hd] = sum;
  }
  if (LATE) {
#pragma unroll
    for (int v = 0; v < 4; ++v) st[v] = u4[v];
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
  __device__ float cw(int it, int t) const {
    return reinterpret_cast<const float*>(slot + (x(it) ? SS_CWX : SS_CWBC))[j(it) * KW + t];
  }
  __device__ float cb(int it) const { return reinterpret_cast<const float*>(slot + (x(it) ? SS_CBX : SS_CBBC))[j(it)]; }
  __device__ float cr(int it, int t) const {
    const bf16* rg = reinterpret_cast<const bf16*>(slot + (x(it) ? SS_RX : SS_RBC)) + j(it) * KW;
    return __bfloat162float(rg[(pos + 1 + t) & (KW - 1)]);
  }
  __device__ uint4 st(int v) const {
    return reinterpret_cast<const uint4*>(slot + SS_STATE + ((tid >> 2) * NS + (tid & 3) * 32) * 2)[v];
  }
  __device__ float dtb() const { return dtb_; }
  __device__ float alog() const { return alog_; }
  __device__ float dsk() const { return dsk_; }
};

// The in_proj rows CTA c of G owns, as up to two ranges (part 0, part 1; an empty one has lo == hi): in mode 6
// first its share of the B, C and dt rows (which every head's step reads), then its share of the z and x
// rows; otherwise one contiguous range.
__device__ void in_range(int mode, int part, int c, int G, int& lo, int& hi) {
  if (mode == 6) {
    rows_of(part == 0 ? NIN - 2 * DI : 2 * DI, c, G, lo, hi);
    if (part == 0) lo += 2 * DI, hi += 2 * DI;
  } else if (part == 0 && mode == 7) {
    // Mode 7: the CTAs that run a step also stream its slot (STEP_SLOT bytes), so they take that many fewer
    // bytes of in_proj rows than the others: every CTA then streams the same bytes per layer.
    const double ds = (double)STEP_SLOT / (D * 2), ns = H < G ? H : G;
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
// Enter phase (u.l, u.ph) at its first slot, skipping empty ones; false past the last layer.
__device__ bool cursor_enter(Cursor& u, const Params& p, int c, int G) {
  while (u.l < p.layers) {
    if (u.ph == 2) {
      if (p.mode >= 5 && c < H) {
        u.r0 = 0, u.hi = 1, u.R = 1, u.rb = STEP_SLOT, u.base = nullptr;
        return true;
      }
    } else {
      bool in = u.ph < 2;
      int lo, hi;
      if (in)
        in_range(p.mode, u.ph, c, G, lo, hi);
      else
        rows_of(D, c, G, lo, hi);
      u.rb = (in ? D : DI) * 2;
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
__device__ bool cursor_next(Cursor& u, const Params& p, int c, int G) {
  u.r0 += u.R;
  if (u.r0 < u.hi) return true;
  if (++u.ph == 4) u.ph = 0, ++u.l;
  return cursor_enter(u, p, c, G);
}
__device__ __forceinline__ unsigned cursor_bytes(const Cursor& u) { return (unsigned)(min(u.R, u.hi - u.r0) * u.rb); }
__device__ __forceinline__ const unsigned char* cursor_src(const Cursor& u) { return u.base + (size_t)u.r0 * u.rb; }

// One instance per mode, so that each is register-allocated for its own paths (the kernel runs at its
// register limit, and a spilled value comes back from L2).
template <int MODE>
__global__ void __launch_bounds__(THREADS, 1) megakernel(Params p) {
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
    if (lane == 0) {
      uint64_t pol;
      asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
      // With pf > 0 a second cursor runs pf slots ahead of the ring's loads and pulls those rows into L2, so
      // the memory system keeps streaming while the ring is full and the consumers wait.
      Cursor a{0, 0}, b{0, 0};
      bool va = cursor_enter(a, p, c, G), vb = p.pf > 0 && cursor_enter(b, p, c, G);
      for (int i = 0; i < p.pf && vb; ++i) {
        if (b.ph != 2) prefetch_l2(cursor_src(b), cursor_bytes(b));
        vb = cursor_next(b, p, c, G);
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
        va = cursor_next(a, p, c, G);
        if (vb) {
          if (b.ph != 2) prefetch_l2(cursor_src(b), cursor_bytes(b));
          vb = cursor_next(b, p, c, G);
        }
      }
    }
    return;
  }

  const int tid = threadIdx.x;
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
      const int K = K_[ph], rb = K * 2, R = p.slot / rb, segs = W / R;
      int lo, hi;
      for (int part = 0; part < (ph == 0 && MODE == 6 ? 2 : 1); ++part) {
        if (ph == 0)
          in_range(MODE, part, c, G, lo, hi);
        else
          rows_of(N_[ph], c, G, lo, hi);
        for (int r0 = lo; r0 < hi; r0 += R, ++k) {
          int s = k % p.stages, rows = min(R, hi - r0), r = warp % R, sg = warp / R;
          mbar_wait(full + s, (k / p.stages) & 1);
          if (gemv && r < rows) {
            float v = row_dot(reinterpret_cast<const bf16*>(ring + (size_t)s * p.slot + (size_t)r * rb), x_s, K, sg, segs,
                              lane);
            if (lane == 0) {
              // Tagged modes publish an in_proj row whose dot product one warp holds whole as soon as it is
              // done: a step waits for its own rows, not for the end of their owners' passes.
              if (ll && ph == 0 && segs == 1)
                st_relaxed64(p.zx_ll + r0 + r, ll_pack(__float_as_uint(v * scale), ll_tag(p, l)));
              else
                parts[(r0 - lo + r) * segs + sg] = v;
            }
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
            } else if (MODE == 9) {
              step_compute<true>(p, l, c, src, in, sx, sz, red, tid, c == 0, tag);
            } else {
              step_compute(p, l, c, src, in, sx, sz, red, tid, c == 0, tag);
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
}

// --------------------------------------------------------------------- the reference: one launch per phase
__global__ void ref_residual(Params p) {
  __shared__ float red[W];
  float inv = load_residual(p.h, p.xb, red, threadIdx.x);
  if (threadIdx.x == 0) p.scal[0] = inv;
}
__global__ void ref_gemv(Params p, int ph, int l, int segs, const bf16* x) {  // block = one row, warp = segment
  int j = blockIdx.x, sg = threadIdx.x >> 5, K = ph == 0 ? D : DI;
  const bf16* w = ph == 0 ? p.win + ((size_t)l * NIN + j) * D : p.wout + ((size_t)l * D + j) * DI;
  float v = row_dot(w, x, K, sg, segs, threadIdx.x & 31);
  if ((threadIdx.x & 31) == 0) p.parts[(size_t)j * segs + sg] = v;
}
__global__ void ref_epilogue(Params p, int ph, int segs) {
  int j = blockIdx.x * blockDim.x + threadIdx.x, n = ph == 0 ? NIN : D;
  if (j >= n) return;
  float o = 0.f;
  for (int s = 0; s < segs; ++s) o += p.parts[(size_t)j * segs + s];
  if (ph == 0)
    p.zx[j] = o * p.scal[0];
  else
    p.h[j] = residual_update(p, j, o, p.scal[1]);
}
__global__ void ref_step(Params p, int l) {
  __shared__ float sx[P + 2 * NS], sz[P], red[W];
  ssm_step(p, l, blockIdx.x, sx, sz, red, threadIdx.x, blockIdx.x == 0);
}
__global__ void ref_gated_inv(Params p) {
  float v = gated_inv(p, threadIdx.x);
  if (threadIdx.x == 0) p.scal[1] = v;
}

// --------------------------------------------------------------------------------------------- the host
__global__ void fill_bf16(bf16* x, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t v = (uint32_t)i * 2654435761u ^ seed;
    v ^= v >> 15; v *= 2246822519u; v ^= v >> 13; v *= 3266489917u; v ^= v >> 16;
    x[i] = __float2bfloat16(((v >> 8) * (1.f / 16777216.f) * 2.f - 1.f) * scale);
  }
}
__global__ void read_sum(const uint4* x, size_t n, float* out) {
  float acc = 0.f;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint4 v = __ldcs(x + i);
    acc += __uint_as_float(v.x) + __uint_as_float(v.y) + __uint_as_float(v.z) + __uint_as_float(v.w);
  }
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) atomicAdd(out, acc);
}

static std::vector<float> host_rand(size_t n, uint32_t seed, float lo, float hi) {
  std::vector<float> v(n);
  uint64_t s = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (auto& x : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x = lo + (hi - lo) * (float)((s >> 40) * (1.0 / 16777216.0));
  }
  return v;
}
template <class T> static T* dev(size_t n) {
  T* p;
  CK(cudaMalloc(&p, n * sizeof(T)));
  return p;
}
template <class T> static T* upload(const std::vector<T>& v) {
  T* p = dev<T>(v.size());
  CK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}
// --load / --dump: raw little-endian arrays (benchmarks/megakernel_check.py writes and reads them).
template <class T> static std::vector<T> read_raw(const std::string& dir, const char* name, size_t n) {
  std::string path = dir + "/" + name;
  FILE* f = fopen(path.c_str(), "rb");
  if (!f) {
    fprintf(stderr, "cannot open %s\n", path.c_str());
    exit(2);
  }
  std::vector<T> v(n);
  size_t got = fread(v.data(), sizeof(T), n, f);
  bool extra = fgetc(f) != EOF;
  fclose(f);
  if (got != n || extra) {
    fprintf(stderr, "%s: expected %zu values of %zu bytes\n", path.c_str(), n, sizeof(T));
    exit(2);
  }
  return v;
}
template <class T> static void write_raw(const std::string& dir, const char* name, const std::vector<T>& v) {
  std::string path = dir + "/" + name;
  FILE* f = fopen(path.c_str(), "wb");
  if (!f || fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) {
    fprintf(stderr, "cannot write %s\n", path.c_str());
    exit(2);
  }
  fclose(f);
}
template <class T> static std::vector<T> download(const T* p, size_t n) {
  std::vector<T> v(n);
  CK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

struct Config {
  int mode, slot, stages, pf;  // pf: slots the producer's L2 prefetch runs ahead of the ring (0: none)
};
static bool has_step(int mode) { return mode == 0 || mode >= 4; }

static size_t smem_bytes(const Config& c) {
  return (size_t)c.stages * c.slot + DI * 2 + (MAX_PARTS + P + 2 * NS + P + W + MAX_OWN + 8) * 4 + 2 * c.stages * 8;
}

static const void* kernel_of(int mode) {
  static const void* k[] = {(const void*)megakernel<0>, (const void*)megakernel<1>, (const void*)megakernel<2>,
                            (const void*)megakernel<3>, (const void*)megakernel<4>, (const void*)megakernel<5>,
                            (const void*)megakernel<6>, (const void*)megakernel<7>, (const void*)megakernel<8>,
                            (const void*)megakernel<9>};
  return k[mode];
}

static void launch(Params p, const Config& c, int G) {
  p.mode = c.mode;
  p.slot = c.slot;
  p.stages = c.stages;
  p.pf = c.pf;
  void* args[] = {&p};
  CK(cudaLaunchCooperativeKernel(kernel_of(c.mode), G, THREADS, args, smem_bytes(c), 0));
}

static double median(std::vector<double> v) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// One more launch with the trace on; medians over (CTA, layer ≥ 1) of each phase, and per layer the critical
// path: the last CTA's residual ready → its in_proj done → the last step done → the last out_done arrival.
static std::string trace_summary(Params p, const Config& c, int G, int& e, int L) {
  size_t n = (size_t)G * L * NEV;
  p.trace = dev<unsigned long long>(n);
  CK(cudaMemset(p.trace, 0, n * 8));
  p.pos = e, p.epoch = ++e;
  launch(p, c, G);
  CK(cudaDeviceSynchronize());
  auto t = download(p.trace, n);
  CK(cudaFree(p.trace));
  auto T = [&](int cta, int l, int ev) { return (double)t[((size_t)cta * L + l) * NEV + ev]; };
  const char* names[] = {"wait_prev", "residual", "in_rows", "in_arrive", "step_wait", "step", "out_wait", "g_load",
                         "out_rows", "out_arrive"};
  std::vector<double> ph[10], path[4];
  for (int l = 1; l < L; ++l) {
    double last_out_prev = 0, last_in = 0, last_step = 0, last_out = 0;
    for (int cta = 0; cta < G; ++cta) {
      bool st = has_step(c.mode) && cta < H;
      ph[0].push_back(T(cta, l, 1) - T(cta, l, 0));
      ph[1].push_back(T(cta, l, 2) - T(cta, l, 1));
      ph[2].push_back(T(cta, l, 3) - T(cta, l, 2));
      ph[3].push_back(T(cta, l, 4) - T(cta, l, 3));
      if (st) {
        ph[4].push_back(T(cta, l, 5) - T(cta, l, 4));
        ph[5].push_back(T(cta, l, 6) - T(cta, l, 5));
        last_step = fmax(last_step, T(cta, l, 6));
      }
      ph[6].push_back(T(cta, l, 7) - T(cta, l, st ? 6 : 4));
      ph[7].push_back(T(cta, l, 8) - T(cta, l, 7));
      ph[8].push_back(T(cta, l, 9) - T(cta, l, 8));
      ph[9].push_back(T(cta, l, 10) - T(cta, l, 9));
      last_out_prev = fmax(last_out_prev, T(cta, l - 1, 10));
      last_in = fmax(last_in, T(cta, l, 3));
      last_out = fmax(last_out, T(cta, l, 10));
    }
    path[0].push_back(last_in - last_out_prev);
    path[1].push_back(has_step(c.mode) ? last_step - last_in : NAN);
    path[2].push_back(last_out - (has_step(c.mode) ? last_step : last_in));
    path[3].push_back(last_out - last_out_prev);
  }
  std::string out = ", \"phases_us\": {";
  char buf[96];
  for (int i = 0; i < 10; ++i) {
    double m = median(ph[i]);
    snprintf(buf, sizeof buf, "%s\"%s\": %s", i ? ", " : "", names[i], std::isfinite(m) ? std::to_string(m / 1e3).c_str() : "null");
    out += buf;
  }
  const char* pn[] = {"to_last_in_proj", "to_last_step", "to_last_out", "layer"};
  out += "}, \"path_us\": {";
  for (int i = 0; i < 4; ++i) {
    double m = median(path[i]);
    snprintf(buf, sizeof buf, "%s\"%s\": %s", i ? ", " : "", pn[i], std::isfinite(m) ? std::to_string(m / 1e3).c_str() : "null");
    out += buf;
  }
  return out + "}";
}

int main(int argc, char** argv) {
  int L = 64, tokens = 20, check_tokens = 3, pos0 = 0;
  bool trace = false;
  std::string load, dump;  // a model's packed layers, caches and residual in / the state after the check out
  std::string configs = "0:40960:5,1:40960:5,4:40960:5,5:40960:5";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--layers")) L = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--tokens")) tokens = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--configs")) configs = argv[i + 1];
    else if (!strcmp(argv[i], "--trace")) trace = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--check-tokens")) check_tokens = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--pos")) pos0 = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--load")) load = argv[i + 1];
    else if (!strcmp(argv[i], "--dump")) dump = argv[i + 1];
  }
  std::vector<Config> cfgs;
  for (size_t a = 0; a < configs.size();) {
    size_t b = configs.find(',', a);
    std::string t = configs.substr(a, b == std::string::npos ? std::string::npos : b - a);
    Config c{0, 0, 0, 0};
    int got = sscanf(t.c_str(), "%d:%d:%d:%d", &c.mode, &c.slot, &c.stages, &c.pf);
    if (got < 3 || c.mode < 0 || c.mode > 9 || c.pf < 0 || (c.mode >= 5 && c.slot != 40960)) {
      fprintf(stderr, "bad config %s (want MODE:SLOT_BYTES:STAGES[:L2_PREFETCH_SLOTS], mode 0-9; modes 5-9 slots of 40960 bytes, >= %d)\n", t.c_str(), STEP_SLOT);
      return 2;
    }
    cfgs.push_back(c);
    if (b == std::string::npos) break;
    a = b + 1;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int G = prop.multiProcessorCount;
  for (int m = 0; m <= 9; ++m)
    CK(cudaFuncSetAttribute(kernel_of(m), cudaFuncAttributeMaxDynamicSharedMemorySize, prop.sharedMemPerBlockOptin));
  for (auto& c : cfgs) {
    int rb[2] = {D * 2, DI * 2};
    for (int ph = 0; ph < 2; ++ph) {
      int R = c.slot / rb[ph];
      int n = ph == 0 ? NIN : D;
      if (R < 1 || W % R || c.slot % rb[ph] || (n / G + 1) * (W / R) > MAX_PARTS) {
        fprintf(stderr, "slot %d: need a multiple of %d bytes holding 1..%d rows that divide %d\n", c.slot, rb[1], W, W);
        return 2;
      }
    }
    if (smem_bytes(c) > prop.sharedMemPerBlockOptin) {
      fprintf(stderr, "config %d:%d:%d needs %zu bytes of shared memory (max %zu)\n", c.mode, c.slot, c.stages,
              smem_bytes(c), (size_t)prop.sharedMemPerBlockOptin);
      return 2;
    }
  }
  if (G < H || (D + G - 1) / G > MAX_OWN) {
    fprintf(stderr, "needs at least %d SMs (and at most %d residual rows per SM)\n", H, MAX_OWN);
    return 2;
  }

  // Weights: uniform with the variance of a fan-in init, so 64 layers keep the residual finite.
  Params p{};
  size_t nwin = (size_t)L * NIN * D, nwout = (size_t)L * D * DI;
  bf16* win = dev<bf16>(nwin);
  bf16* wout = dev<bf16>(nwout);
  size_t nring = (size_t)L * CX * KW, nstate = (size_t)L * H * P * NS;
  std::vector<bf16> ring0(nring), state0(nstate);
  std::vector<float> h0;
  if (!load.empty()) {  // a real model's layers (mamba_jax.inference.megakernel.pack) and caches
    CK(cudaMemcpy(win, read_raw<bf16>(load, "win.bin", nwin).data(), nwin * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(wout, read_raw<bf16>(load, "wout.bin", nwout).data(), nwout * 2, cudaMemcpyHostToDevice));
    p.conv_w = upload(read_raw<float>(load, "conv_w.bin", (size_t)L * CX * KW));
    p.conv_b = upload(read_raw<float>(load, "conv_b.bin", (size_t)L * CX));
    p.a_log = upload(read_raw<float>(load, "a_log.bin", (size_t)L * H));
    p.dskip = upload(read_raw<float>(load, "d_skip.bin", (size_t)L * H));
    p.dt_bias = upload(read_raw<float>(load, "dt_bias.bin", (size_t)L * H));
    ring0 = read_raw<bf16>(load, "ring.bin", nring);
    state0 = read_raw<bf16>(load, "state.bin", nstate);
    h0 = read_raw<float>(load, "h.bin", D);
  } else {
    fill_bf16<<<1024, 256>>>(win, nwin, 1, sqrtf(3.f / D));
    fill_bf16<<<1024, 256>>>(wout, nwout, 2, 0.5f * sqrtf(3.f / DI));
    p.conv_w = upload(host_rand((size_t)L * CX * KW, 3, -0.5f, 0.5f));
    p.conv_b = upload(host_rand((size_t)L * CX, 4, -0.1f, 0.1f));
    p.a_log = upload(host_rand((size_t)L * H, 5, 0.f, 2.7f));
    p.dskip = upload(host_rand((size_t)L * H, 6, 0.5f, 1.5f));
    p.dt_bias = upload(host_rand((size_t)L * H, 7, -4.f, -1.f));
    auto r = host_rand(nring, 8, -1.f, 1.f), s = host_rand(nstate, 9, -1.f, 1.f);
    for (size_t i = 0; i < nring; ++i) ring0[i] = __float2bfloat16(r[i]);
    for (size_t i = 0; i < nstate; ++i) state0[i] = __float2bfloat16(s[i]);
    h0 = host_rand(D, 10, -1.f, 1.f);
  }
  p.win = win;
  p.wout = wout;
  p.ring = upload(ring0);
  p.state = upload(state0);
  p.h = upload(h0);
  p.zx = dev<float>(NIN);
  p.g = dev<bf16>(DI);
  p.gss = dev<float>(H);
  p.xb = dev<bf16>(D);
  p.parts = dev<float>((size_t)NIN * W);
  p.scal = dev<float>(2);
  p.cnt = dev<unsigned>(3 * (size_t)L);
  p.zx_ll = dev<unsigned long long>(NIN);
  p.g_ll = dev<unsigned long long>(DI / 2);
  p.gss_ll = dev<unsigned long long>(H);
  p.h_ll = dev<unsigned long long>(D);
  p.layers = L;
  // Counters and tagged words start from zero whenever the epochs restart at 1.
  auto reset_sync = [&](const Params& q) {
    CK(cudaMemset(q.cnt, 0, 3 * sizeof(unsigned) * L));
    CK(cudaMemset(q.zx_ll, 0, NIN * 8));
    CK(cudaMemset(q.g_ll, 0, DI / 2 * 8));
    CK(cudaMemset(q.gss_ll, 0, H * 8));
    CK(cudaMemset(q.h_ll, 0, D * 8));
  };
  CK(cudaDeviceSynchronize());

  // The read ceiling: a plain read of the in_proj weights (3.5 GB; a sum, streaming loads).
  {
    float* out = dev<float>(1);
    size_t n = nwin * 2 / 16;
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    read_sum<<<G * 4, 512>>>(reinterpret_cast<const uint4*>(win), n, out);
    CK(cudaEventRecord(a));
    for (int i = 0; i < 5; ++i) read_sum<<<G * 4, 512>>>(reinterpret_cast<const uint4*>(win), n, out);
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    printf("{\"kind\": \"read_ceiling\", \"device\": \"%s\", \"sms\": %d, \"bytes\": %zu, \"tb_per_s\": %.3f}\n", prop.name,
           G, n * 16, 5.0 * n * 16 / (ms * 1e-3) / 1e12);
    fflush(stdout);
  }

  // Correctness: check_tokens tokens of the megakernel (the first config of each mode with the SSM step)
  // against the reference.
  Params q = p;
  q.h = upload(h0);
  q.ring = upload(ring0);
  q.state = upload(state0);
  {
    int segs[2] = {W / (40960 / (D * 2)), W / (40960 / (DI * 2))};  // the reference's segments: 40 KB slots
    for (int t = 0; t < check_tokens; ++t) {
      q.pos = pos0 + t;
      for (int l = 0; l < L; ++l) {
        ref_residual<<<1, CT>>>(q);
        ref_gemv<<<NIN, 32 * segs[0]>>>(q, 0, l, segs[0], q.xb);
        ref_epilogue<<<(NIN + 255) / 256, 256>>>(q, 0, segs[0]);
        ref_step<<<H, CT>>>(q, l);
        ref_gated_inv<<<1, 32>>>(q);
        ref_gemv<<<D, 32 * segs[1]>>>(q, 1, l, segs[1], q.g);
        ref_epilogue<<<(D + 255) / 256, 256>>>(q, 1, segs[1]);
      }
    }
    CK(cudaDeviceSynchronize());
  }
  auto hr = download(q.h, D);
  auto sr = download(q.state, nstate);
  auto rr = download(q.ring, nring);
  for (int mode : {0, 4, 5, 6, 7, 9}) {
    const Config* c0 = nullptr;
    for (auto& c : cfgs)
      if (c.mode == mode && !c0) c0 = &c;
    if (!c0) continue;
    // Bit for bit needs the same split of each row's dot product into segments as the reference's.
    if (c0->slot / (D * 2) != 40960 / (D * 2) || c0->slot / (DI * 2) != 40960 / (DI * 2)) {
      fprintf(stderr, "the check needs the first mode-%d config with 40960-byte slots\n", mode);
      return 2;
    }
    Params m = p;
    m.h = upload(h0);
    m.ring = upload(ring0);
    m.state = upload(state0);
    reset_sync(m);
    for (int t = 0; t < check_tokens; ++t) {
      m.pos = pos0 + t;
      m.epoch = t + 1;
      launch(m, *c0, G);
    }
    CK(cudaDeviceSynchronize());
    auto hm = download(m.h, D);
    auto sm = download(m.state, nstate);
    auto rm = download(m.ring, nring);
    size_t hdiff = 0, sdiff = 0, rdiff = 0;
    double hmax = 0;
    for (int i = 0; i < D; ++i) {
      hdiff += memcmp(&hr[i], &hm[i], 4) != 0;
      hmax = fmax(hmax, fabs(hr[i]));
    }
    for (size_t i = 0; i < nstate; ++i) sdiff += memcmp(&sr[i], &sm[i], 2) != 0;
    for (size_t i = 0; i < nring; ++i) rdiff += memcmp(&rr[i], &rm[i], 2) != 0;
    bool ok = !hdiff && !sdiff && !rdiff && std::isfinite(hmax);
    printf("{\"kind\": \"check\", \"config\": \"%d:%d:%d:%d\", \"tokens\": %d, \"layers\": %d, \"residual_max_abs\": %.4g, "
           "\"residual_differing\": %zu, \"states_differing\": %zu, \"ring_differing\": %zu, \"ok\": %s}\n",
           c0->mode, c0->slot, c0->stages, c0->pf, check_tokens, L, hmax, hdiff, sdiff, rdiff, ok ? "true" : "false");
    fflush(stdout);
    if (!dump.empty() && ok) {  // the megakernel's residual, states and conv ring after the check's tokens
      write_raw(dump, "h.out.bin", hm);
      write_raw(dump, "state.out.bin", sm);
      write_raw(dump, "ring.out.bin", rm);
      dump.clear();  // the first checked mode's
    }
    CK(cudaFree(m.h));
    CK(cudaFree(m.ring));
    CK(cudaFree(m.state));
    if (!ok) return 1;
  }

  // Timing: tokens launches back to back per config (pos and epoch advance as in decoding).
  double wbytes = (double)(nwin + nwout) * 2 / L;
  for (auto& c : cfgs) {
    reset_sync(p);
    int e = 0;
    for (int t = 0; t < 3; ++t) {
      p.pos = e, p.epoch = ++e;
      launch(p, c, G);
    }
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    CK(cudaEventRecord(a));
    for (int t = 0; t < tokens; ++t) {
      p.pos = e, p.epoch = ++e;
      launch(p, c, G);
    }
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    CK(cudaGetLastError());
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    double us_token = ms * 1e3 / tokens, us_layer = us_token / L;
    printf("{\"kind\": \"megakernel\", \"mode\": %d, \"slot_bytes\": %d, \"stages\": %d, \"l2_prefetch_slots\": %d, "
           "\"us_per_token\": %.1f, \"us_per_layer\": %.2f, \"weight_tb_per_s\": %.3f%s}\n",
           c.mode, c.slot, c.stages, c.pf, us_token, us_layer, wbytes / (us_layer * 1e-6) / 1e12,
           trace ? trace_summary(p, c, G, e, L).c_str() : "");
    fflush(stdout);
  }
  return 0;
}
