// Probe: Mamba2-2.7B's two projections at batch 32 in ONE persistent launch per token, to measure whether a
// weight stream that never stops at kernel boundaries reaches the ≈ 2.5 TB/s that issue 5's batch-32 target
// asks of them (benchmarks/README.md, "Batch 32: what 2× mamba_ssm asks of the bytes": 2× mamba_ssm is
// ≈ 66 µs per layer; the state update already runs at ≈ 3.1 TB/s, 27.2 µs, so in_proj + out_proj + the
// small kernels must fit in ≈ 39 µs, where XLA's cuBLAS GEMMs take 25.7 + 15.0 on 83 and 40 CTAs).
//
// Design. One CTA per SM, all resident (cooperative launch), 8 consumer warps and two producer threads (in
// warps of their own). A projection y (32, N) = x (32, K) · W (K, N) is cut into cells: (a group of 16 column
// units of 8, one k16 step), 4 KB of weight each, stored cell after cell ([group][k step]) in the mma.sync
// B-fragment order of the consumer warp that reads it (warp w takes units w and w + 8: 16 bytes per lane);
// every CTA owns an equal contiguous run of cells (±1), so every SM streams the same bytes whatever N.
//   - the weight producer copies its runs of every projection of every layer into a ring of shared-memory
//     slots (cells per slot × 4 KB, one bulk copy per slot), never waiting on data: weights do not depend on
//     the token, so it streams across the grid barriers below as far as the ring reaches;
//   - the x producer copies the slot's x fragments (32 rows × 16 k per cell, 1 KB, in the A-fragment order)
//     beside them, once the grid barrier that published x has passed;
//   - the consumer warps run mma.sync m16n8k16 (bf16 → float32) per cell and, when their run leaves a group
//     or ends, add their 32 × 16 partial sums to y (float32, red.global.add), so K splits between CTAs cost
//     nothing but the adds.
// Per layer: in_proj (2560 → 10,576, padded to 10,624) | grid barrier | convert (y's first 5120 columns → bf16
// A fragments of out_proj's x; zero the other y buffer) | barrier | out_proj (5120 → 2560) | barrier |
// convert (→ in_proj's x of the next layer) | barrier. The converts stand in for the SSM step and the
// residual + norm (not computed here: the step's state stream is the known 3.1 TB/s part; this measures
// the projections and the synchronisation around them).
//
// Modes (--modes): 0 the above; 1 the same without the products (ring, adds of zeros, barriers, converts);
// 2 products without barriers or converts (the projections' stream alone; x is stale, not checked);
// 3 the ring alone (slots released unread); diagnostics of mode 2 (not checked): 4 without the products
// (the ring and the adds alone), 5 plain float2 stores instead of the adds, 6 without the adds; 7 and 8:
// modes 2 and 0 with one float4 red.add per lane and tile (lanes exchange halves) instead of two float2;
// 9 mode 0 with no atomics: each CTA stores its partial sums of a group in a slot of its own ([group][split]),
// and the convert sums a group's splits in a fixed order (deterministic; checked like 0); 10 mode 9 without
// grid barriers (dataflow): the last CTA to store a group's partial sums (a counter per group) converts that
// group's 128 columns and publishes a flag; the x producer waits only for the groups its slot reads. x is
// double-buffered by layer parity: every CTA owns a share of every projection, so a projection complete
// means every CTA is past the one before it (checked like 0).
// The consumers walk a slot's cells in runs within one group, four cells' fragments loaded before their 16
// products, even and odd cells in two sets of accumulators (the first version, at 0841341, loaded and
// multiplied one cell at a time after a 64-bit division for the cell's group: 4 HMMA in the whole kernel).
// --clock 1: one thread per role adds up where its cycles go (waiting for a free slot, for x, for the weights,
// in products and adds, in barriers and converts) and a "cycles" line gives the means over CTAs per layer.
// 11: mode 0 whose consumers only arrive at the barrier after a convert (the x producer of the next projection
// waits for every CTA's arrival; the consumers go on to the weights already in the ring); 12: mode 11 with a
// state phase in place of in_proj's convert — the SSM state update of the layer at batch 32 (state_phase:
// 42 MB of bf16 states read through the same ring and written back, y into out_proj's x), i.e. a whole layer's
// bytes; 13: mode 12's state phases alone (a grid barrier before each, as after in_proj; no projections).
// --pf N: the weight producer prefetches N slots beyond the ring into L2 (cp.async.bulk.prefetch), so
// that DRAM keeps streaming while the consumers stand at a barrier.
// Correctness (--check 1): one layer of each checked mode named in --modes (0, 8, 9, 10, 11, 12) against a float64
// host product of the same bf16 inputs, the intermediate rounded to bf16 as the kernel rounds it.
// First H100 run (modes 0–3): benchmarks/README.md, results/batch32_probe_h100.jsonl.
//
// Build and run (an H100; nvcc 12.4+):
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/b32 benchmarks/batch32_probe.cu
//   /tmp/b32 --layers 64 --tokens 10 --cps 8 --modes 0,8,9,1,2,7,4,5,6,3 --check 1 [--clock 1]
// One JSON line per mode (µs per layer, weight TB/s) and one per check.
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

#include "../kernels/ptx.cuh"

#include "cuda_check.h"

constexpr int CW = 8;                    // consumer warps
constexpr int NT = (CW + 2) * 32;        // + the weight producer's warp and the x producer's warp
constexpr int GU = 16;                   // column units of 8 per group: units w and w + 8 for warp w
constexpr int CELL_W = GU * 8 * 16 * 2;  // weight bytes of a cell (16 units × 8 columns × 16 k, bf16): 4 KB
constexpr int CELL_X = 2 * 16 * 16 * 2;  // x bytes of a k16 step (2 m16 tiles × 16 k, bf16): 1 KB
constexpr int MAX_STAGES = 16;
constexpr int HEAD = 1024;  // the mbarriers, then the ring
constexpr int MAX_SPLIT = 16;  // CTAs sharing a group (mode 9's partial slots): ≈ 3 for in_proj, 8 for out_proj

struct Proj {           // one projection of one layer
  const uint4* w;       // its cells, [group][k step][warp][lane] of 16 bytes
  int groups, ksteps;   // cells = groups × ksteps; K = 16 ksteps, N padded = 128 groups
};
struct Params {
  const uint4* w_in;  // layer l's in_proj cells at w_in + l × in_cells × 256
  const uint4* w_out;
  int in_groups, in_ksteps, out_groups, out_ksteps;
  int layers, mode, cps, stages, epoch;
  uint4* x_in;   // in_proj's x, A fragments [k step][m tile][lane] (16 B each)
  uint4* x_mid;  // out_proj's x
  float* y_in[2];   // in_proj's sums (32, 128 · in_groups), float32, alternating by layer (the other zeroed)
  float* y_out[2];  // out_proj's sums (32, 128 · out_groups)
  unsigned* bar;    // grid barrier arrivals (never reset: targets grow with epoch)
  float* part_in;   // mode 9: partial sums [group][split][32][128], float32
  float* part_out;
  uint4* x_in1;     // mode 10: the odd layers' x (x_in, x_mid hold the even layers')
  uint4* x_mid1;
  unsigned* cnt_in;    // mode 10: per group, the splits that stored their partial sums (grows by layer)
  unsigned* cnt_out;
  unsigned* ready_in;  // mode 10: per group, 1 + the layer (counted over launches) whose x it converted
  unsigned* ready_out;
  unsigned long long* cycles;  // --clock 1: [CTA][8] cycles by role and cause, summed over launches
  int pf;                      // --pf: slots of weights the weight producer prefetches into L2 beyond the ring
  const uint4* state;  // mode 12: the SSM states, [layer][row][head][64 p][128 n] bf16: chunks of 16 p rows (4 KB)
  int heads;           // d_inner / 64
  int bulk_store;      // --bulk-store 1: mode 12 writes each slot's new states back by one bulk copy (TMA)
};

constexpr int CHUNKS_PER_HEAD = 4;  // mode 12: a head's 64 × 128 state as 4 chunks of 16 rows, 4 KB each like a cell
__host__ __device__ __forceinline__ long state_chunks(int heads) { return 32L * heads * CHUNKS_PER_HEAD; }

// The index (in bf16 elements) of x's element (row r, column col) in the A fragments ([k step][m tile][lane][8]).
__device__ __forceinline__ int frag_index(int r, int col) {
  const int t = col >> 4, c16 = col & 15, mt = r >> 4, r16 = r & 15;
  const int q = (c16 >> 3) * 2 + (r16 >> 3), ln = (r16 & 7) * 4 + ((c16 & 7) >> 1);
  return ((t * 2 + mt) * 32 + ln) * 8 + q * 2 + (c16 & 1);
}

__device__ __forceinline__ void mma(float* d, const uint4& a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// The run of cells CTA c of G owns in a projection of `cells`.
__host__ __device__ __forceinline__ void run_of(long cells, int c, int G, long& a, long& b) {
  a = cells * c / G;
  b = cells * (c + 1) / G;
}
__device__ __forceinline__ Proj proj(const Params& p, int l, int gi) {
  if (gi == 0) return {p.w_in + (long)l * p.in_groups * p.in_ksteps * (CELL_W / 16), p.in_groups, p.in_ksteps};
  return {p.w_out + (long)l * p.out_groups * p.out_ksteps * (CELL_W / 16), p.out_groups, p.out_ksteps};
}

// The CTA whose run holds cell i (runs as run_of makes them: every run non-empty when cells ≥ G).
__host__ __device__ __forceinline__ int owner(long i, long cells, int G) { return (int)(((i + 1) * G + cells - 1) / cells) - 1; }

// Consumer threads only (named barrier 1): all CTAs' consumers meet; arrivals count up in *bar.
__device__ void grid_sync(unsigned* bar, unsigned target, int tid) {
  asm volatile("bar.sync 1, %0;" ::"n"(CW * 32) : "memory");
  if (tid == 0) {
    __threadfence();
    atomicAdd(bar, 1u);
    while (ld_acquire(bar) < target) {
    }
  }
  asm volatile("bar.sync 1, %0;" ::"n"(CW * 32) : "memory");
}
// Modes 11 and 12: this CTA's consumers arrive (their stores before it) without waiting for the others.
__device__ void grid_arrive(unsigned* bar, int tid) {
  asm volatile("bar.sync 1, %0;" ::"n"(CW * 32) : "memory");
  if (tid == 0) {
    __threadfence();
    atomicAdd(bar, 1u);
  }
}

// y (32, ystride) float32 → the A fragments of the next projection's x (ksteps × 16 columns of y), then zero
// `zero` (n floats, a multiple of 4): every consumer thread of the grid takes its share.
__device__ void convert(const float* y, int ystride, int ksteps, uint4* x, float* zero, long n, long gt, long gs) {
  for (long it = gt; it < (long)ksteps * 64; it += gs) {
    const int t = (int)(it >> 6), mt = (int)(it >> 5) & 1, ln = (int)it & 31;
    uint32_t w[4];
    for (int q = 0; q < 4; ++q) {  // register q holds elements 2q, 2q + 1
      const int r = mt * 16 + ln / 4 + (q & 1) * 8, col = t * 16 + (ln % 4) * 2 + (q >> 1) * 8;
      const float2 v = __ldcg(reinterpret_cast<const float2*>(y + (long)r * ystride + col));
      __nv_bfloat162 h = __floats2bfloat162_rn(v.x, v.y);
      w[q] = *reinterpret_cast<uint32_t*>(&h);
    }
    x[it] = make_uint4(w[0], w[1], w[2], w[3]);
  }
  for (long i = gt; i < n / 4; i += gs) reinterpret_cast<float4*>(zero)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
}

// Mode 9: as `convert`, summing each group's partial slots (split 0 first) instead of reading a sum.
__device__ void convert_parts(const float* part, int ks_src, long cells, int G, long it0, long it1, uint4* x,
                              long gt, long gs) {
  for (long it = it0 + gt; it < it1; it += gs) {
    const int t = (int)(it >> 6), mt = (int)(it >> 5) & 1, ln = (int)it & 31;
    const int g = t / 8, f = owner((long)g * ks_src, cells, G), n = owner((long)(g + 1) * ks_src - 1, cells, G) - f + 1;
    uint32_t w[4];
    for (int q = 0; q < 4; ++q) {
      const int r = mt * 16 + ln / 4 + (q & 1) * 8, col = (t % 8) * 16 + (ln % 4) * 2 + (q >> 1) * 8;
      float2 v = make_float2(0.f, 0.f);
      for (int sp = 0; sp < n; ++sp) {
        const float2 u = __ldcg(reinterpret_cast<const float2*>(part + (((long)g * MAX_SPLIT + sp) * 32 + r) * 128 + col));
        v.x += u.x;
        v.y += u.y;
      }
      __nv_bfloat162 h = __floats2bfloat162_rn(v.x, v.y);
      w[q] = *reinterpret_cast<uint32_t*>(&h);
    }
    x[it] = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// The weight producer's sequence of slots, phase by phase (0 in_proj, 1 the states in mode 12, 2 out_proj), for
// the L2 prefetch running ahead of it.
struct Walk {
  int l = 0, ph = 0;
  long i = 0, b = 0;
  bool done = false;
};
__device__ __forceinline__ long phase_cells(const Params& p, int ph) {
  return ph == 0 ? (long)p.in_groups * p.in_ksteps : ph == 1 ? state_chunks(p.heads) : (long)p.out_groups * p.out_ksteps;
}
__device__ __forceinline__ const uint4* phase_base(const Params& p, int l, int ph) {
  return ph == 0 ? p.w_in + (long)l * p.in_groups * p.in_ksteps * (CELL_W / 16)
         : ph == 1 ? p.state + (long)l * state_chunks(p.heads) * (CELL_W / 16)
                   : p.w_out + (long)l * p.out_groups * p.out_ksteps * (CELL_W / 16);
}
// Whether phase ph runs in this mode: the states only in modes 12 and 13, the projections in all but 13.
__device__ __forceinline__ bool phase_on(const Params& p, int ph) {
  return p.mode == 13 ? ph == 1 : ph != 1 || p.mode == 12;
}
__device__ __forceinline__ void walk_next(Walk& w, const Params& p, int c, int G, bool first = false) {
  if (!first) w.i += p.cps;
  while (first || w.i >= w.b || !phase_on(p, w.ph)) {
    if (!first || !phase_on(p, w.ph)) {
      if (++w.ph == 3 && (w.ph = 0, ++w.l == p.layers)) {
        w.done = true;
        return;
      }
    }
    first = false;
    if (!phase_on(p, w.ph)) continue;
    long a;
    run_of(phase_cells(p, w.ph), c, G, a, w.b);
    w.i = a;
  }
}
__device__ __forceinline__ void prefetch_l2(const void* src, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
}

// A role's position in the ring: the slot, its phase parity, and whether every slot has been used once (no 64-bit
// divisions by the depth per slot).
struct Cursor {
  int s = 0;
  unsigned ph = 0;
  bool wrapped = false;
  __device__ __forceinline__ void next(int S) {
    if (++s == S) s = 0, ph ^= 1u, wrapped = true;
  }
};

// m consecutive cells of one group (this lane's weight fragments at sw, its x fragments at sx, one cell apart
// by CELL_W / CELL_X): four cells' loads before their products, and two sets of accumulators (even cells in
// acc, odd in acc2) so that no mma waits on the one before it.
__device__ __forceinline__ void mma_cells(float (&acc)[2][2][4], float (&acc2)[2][2][4], const unsigned char* sw,
                                      const unsigned char* sx, int m) {
  int j = 0;
  for (; j + 4 <= m; j += 4) {
    uint4 bw[4], a0[4], a1[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      bw[q] = *reinterpret_cast<const uint4*>(sw + (j + q) * CELL_W);
      a0[q] = *reinterpret_cast<const uint4*>(sx + (j + q) * CELL_X);
      a1[q] = *reinterpret_cast<const uint4*>(sx + (j + q) * CELL_X + 512);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      float(&d)[2][2][4] = q & 1 ? acc2 : acc;
      mma(d[0][0], a0[q], bw[q].x, bw[q].y);
      mma(d[1][0], a1[q], bw[q].x, bw[q].y);
      mma(d[0][1], a0[q], bw[q].z, bw[q].w);
      mma(d[1][1], a1[q], bw[q].z, bw[q].w);
    }
  }
  for (; j < m; ++j) {
    const uint4 bw = *reinterpret_cast<const uint4*>(sw + j * CELL_W);
    const uint4 a0 = *reinterpret_cast<const uint4*>(sx + j * CELL_X);
    const uint4 a1 = *reinterpret_cast<const uint4*>(sx + j * CELL_X + 512);
    mma(acc[0][0], a0, bw.x, bw.y);
    mma(acc[1][0], a1, bw.x, bw.y);
    mma(acc[0][1], a0, bw.z, bw.w);
    mma(acc[1][1], a1, bw.z, bw.w);
  }
}

// Mode 12: the SSM state update of layer l between the projections, its states streamed through the same ring
// (chunks of 16 p rows × 128 n of one (row, head), 4 KB like a cell). From in_proj's sums y_in (float32; no conv
// here): x = y[d_inner + 64 h + p], B = y[2 d_inner + n], C = y[2 d_inner + 128 + n], dt = softplus(y[2 d_inner
// + 256 + h]); s ← s · exp(−dt · A_h) + dt · x · B (A_h = 1 + h / 100), stored back in place as bf16; y_h,p =
// Σ_n s · C + x (D = 1) → out_proj's x fragments (bf16). Warp w takes rows 2w, 2w + 1 of every chunk, a lane 4 n.
__device__ __forceinline__ void state_phase(const Params& p, int l, int c, int G, int tid, unsigned char* ring, int slot,
                            uint64_t* wfull, uint64_t* xfull, uint64_t* empty, Cursor& cur, bool clk, long long* cyc) {
  const int warp = tid / 32, lane = tid % 32, S = p.stages, H = p.heads;
  unsigned char* st = reinterpret_cast<unsigned char*>(const_cast<uint4*>(phase_base(p, l, 1)));
  unsigned* xm = reinterpret_cast<unsigned*>(p.x_mid);
  const int H4 = H * CHUNKS_PER_HEAD, row_floats = 256 + H;
  long a, b;
  run_of(state_chunks(H), c, G, a, b);
  for (long i = a; i < b; i += p.cps, cur.next(S)) {
    const int s = cur.s, n = (int)(b - i < p.cps ? b - i : p.cps);
    long long t0 = clk ? clock64() : 0;
    mbar_wait(&wfull[s], cur.ph);
    if (clk) cyc[0] += clock64() - t0, t0 = clock64();
    mbar_wait(&xfull[s], cur.ph);
    if (clk) cyc[1] += clock64() - t0, t0 = clock64();
    const unsigned char* sw = ring + (long)s * slot;
    const float* sx = reinterpret_cast<const float*>(sw + p.cps * CELL_W);  // the x producer's inputs
    const int b0 = (int)(i / H4);
    int kr = (int)(i - (long)b0 * H4);  // the chunk's index within its row of the batch
#pragma unroll 2  // two chunks' shuffle chains and exponentials in flight
    for (int j = 0; j < n; ++j, ++kr) {
      const int r = kr >= H4, bb = b0 + r, h = (kr - r * H4) >> 2, p0 = ((kr - r * H4) & 3) * 16 + 2 * warp;
      const float* rowp = sx + 128 + r * row_floats;  // B (128), C (128), dt (H) of row bb
      const float4 Bv = *reinterpret_cast<const float4*>(rowp + lane * 4);
      const float4 Cv = *reinterpret_cast<const float4*>(rowp + 128 + lane * 4);
      const float2 xv = *reinterpret_cast<const float2*>(sx + j * 16 + 2 * warp);
      const float dt = log1pf(__expf(rowp[256 + h])), dA = __expf(-dt * (1.f + 0.01f * h));
      float ysum[2];
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const long kk = i + j;
        const uint2 raw = *reinterpret_cast<const uint2*>(sw + (long)j * CELL_W + (2 * warp + q) * 256 + lane * 8);
        const float2 s01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
        const float2 s23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
        const float dx = dt * (q ? xv.y : xv.x);
        const float n0 = s01.x * dA + dx * Bv.x, n1 = s01.y * dA + dx * Bv.y;
        const float n2 = s23.x * dA + dx * Bv.z, n3 = s23.y * dA + dx * Bv.w;
        float acc = n0 * Cv.x + n1 * Cv.y + n2 * Cv.z + n3 * Cv.w;
        __nv_bfloat162 h01 = __floats2bfloat162_rn(n0, n1), h23 = __floats2bfloat162_rn(n2, n3);
        const uint2 out = make_uint2(*reinterpret_cast<unsigned*>(&h01), *reinterpret_cast<unsigned*>(&h23));
        if (p.bulk_store)  // back into the slot, stored to global by one bulk copy per slot below
          *reinterpret_cast<uint2*>(const_cast<unsigned char*>(sw) + (long)j * CELL_W + (2 * warp + q) * 256 + lane * 8) = out;
        else
          *reinterpret_cast<uint2*>(st + kk * CELL_W + (2 * warp + q) * 256 + lane * 8) = out;
#pragma unroll
        for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(~0u, acc, o);
        ysum[q] = acc;
      }
      if (lane == 0) {
        __nv_bfloat162 hv = __floats2bfloat162_rn(ysum[0] + xv.x, ysum[1] + xv.y);
        xm[frag_index(bb, h * 64 + p0) >> 1] = *reinterpret_cast<unsigned*>(&hv);
      }
    }
    if (p.bulk_store) {  // the slot's new states: one bulk copy shared → global once every warp has written
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      asm volatile("bar.sync 1, %0;" ::"n"(CW * 32) : "memory");
      if (tid == 0) {
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(st + i * CELL_W),
                     "r"(sa(sw)), "r"(n * CELL_W)
                     : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");  // the slot read: it may be refilled
      }
    }
    if (clk) cyc[2] += clock64() - t0;
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);
  }
  if (p.bulk_store && tid == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");  // stores complete
  grid_arrive(p.bar, tid);  // y published: out_proj's x producer waits for every CTA's arrival (episode 4l + 2)
}

__global__ void __launch_bounds__(NT, 1) probe(Params p) {
  extern __shared__ __align__(1024) unsigned char smem[];
  uint64_t* wfull = reinterpret_cast<uint64_t*>(smem);
  uint64_t* xfull = wfull + MAX_STAGES;
  uint64_t* empty = xfull + MAX_STAGES;
  unsigned char* ring = smem + HEAD;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, c = blockIdx.x, G = gridDim.x;
  const int S = p.stages, slot = p.cps * (CELL_W + CELL_X);
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(&wfull[s], 1);
      mbar_init(&xfull[s], 1);
      mbar_init(&empty[s], CW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const unsigned base = (unsigned)p.epoch * 4u * p.layers;  // barrier episodes before this launch
  Cursor cur;                     // this role's slot in the ring (every role walks the same slots)
  const bool clk = p.cycles != nullptr;  // --clock 1: where each role's cycles go (see cycle_names)
  long long cyc[4] = {};
  const long long start = clk ? clock64() : 0;
  if (warp == CW && lane == 0) {  // ---------------------------------------------- the weight producer
    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    Walk w, pf;  // the slot to load; the slot to prefetch into L2 (--pf slots beyond the ring)
    walk_next(w, p, c, G, true);
    walk_next(pf, p, c, G, true);
    for (int k = 0; k < S + p.pf && !pf.done; ++k) {
      if (k >= S) prefetch_l2(phase_base(p, pf.l, pf.ph) + pf.i * (CELL_W / 16), (unsigned)(pf.b - pf.i < p.cps ? pf.b - pf.i : p.cps) * CELL_W);
      walk_next(pf, p, c, G);
    }
    for (; !w.done; walk_next(w, p, c, G), cur.next(S)) {
      const int s = cur.s, n = (int)(w.b - w.i < p.cps ? w.b - w.i : p.cps);
      if (cur.wrapped) {
        const long long t0 = clk ? clock64() : 0;
        mbar_wait(&empty[s], cur.ph ^ 1u);
        if (clk) cyc[0] += clock64() - t0;
      }
      mbar_expect(&wfull[s], n * CELL_W);
      bulk_load(ring + (long)s * slot, phase_base(p, w.l, w.ph) + w.i * (CELL_W / 16), n * CELL_W, &wfull[s], pol);
      if (p.pf && !pf.done) {
        prefetch_l2(phase_base(p, pf.l, pf.ph) + pf.i * (CELL_W / 16), (unsigned)(pf.b - pf.i < p.cps ? pf.b - pf.i : p.cps) * CELL_W);
        walk_next(pf, p, c, G);
      }
    }
  } else if (warp == CW + 1 && lane == 0) {  // --------------------------------------- the x producer
    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
    for (int l = 0; l < p.layers; ++l)
      for (int ph = 0; ph < 3; ++ph) {
        if (ph == 1) {  // mode 12: beside a slot's state chunks, their inputs from in_proj's sums (state_inputs)
          if (p.mode != 12 && p.mode != 13) continue;
          const float* yi = (l & 1) ? p.y_in[1] : p.y_in[0];
          const long ys = (long)p.in_groups * GU * 8;
          const int H4 = p.heads * CHUNKS_PER_HEAD, DI = p.out_ksteps * 16;
          const long long t0 = clk ? clock64() : 0;
          while (ld_acquire(p.bar) < (unsigned)G * (base + 4u * l + 1u)) {  // in_proj's sums complete
          }
          if (clk) cyc[1] += clock64() - t0;
          asm volatile("fence.proxy.async.global;" ::: "memory");
          long a, b;
          run_of(state_chunks(p.heads), c, G, a, b);
          for (long i = a; i < b; i += p.cps, cur.next(S)) {
            const int s = cur.s, n = (int)(b - i < p.cps ? b - i : p.cps);
            if (cur.wrapped) mbar_wait(&empty[s], cur.ph ^ 1u);
            const int b0 = (int)(i / H4), b1 = (int)((i + n - 1) / H4), rows = b1 - b0 + 1;
            const unsigned row_bytes = (unsigned)(256 + p.heads) * 4;  // B, C and dt: contiguous in y_in
            mbar_expect(&xfull[s], (unsigned)n * 64u + rows * row_bytes);
            unsigned char* dst = ring + (long)s * slot + p.cps * CELL_W;
            for (int r = 0; r < rows; ++r) {  // x: 16 floats per chunk, contiguous within a row of the batch
              const long k0 = r ? (long)b1 * H4 : i, k1 = r ? i + n : (rows > 1 ? (long)b1 * H4 : i + n);
              bulk_load(dst + (k0 - i) * 64, yi + (b0 + r) * ys + DI + (k0 % H4) * 16, (unsigned)(k1 - k0) * 64,
                        &xfull[s], pol);
              bulk_load(dst + 512 + r * row_bytes, yi + (b0 + r) * ys + 2 * DI, row_bytes, &xfull[s], pol);
            }
          }
          continue;
        }
        if (p.mode == 13) continue;
        const int gi = ph >> 1;
        const Proj pr = proj(p, l, gi);
        const long q = (long)p.epoch * p.layers + l;  // the layer counted over launches (mode 10's flags)
        const uint4* xs = p.mode == 10 && (q & 1) ? (gi == 0 ? p.x_in1 : p.x_mid1) : (gi == 0 ? p.x_in : p.x_mid);
        const unsigned char* x = reinterpret_cast<const unsigned char*>(xs);
        // mode 10: x of k step t comes from the previous projection's group t / 8, converted for layer q
        const unsigned* ready = gi == 0 ? p.ready_out : p.ready_in;
        const unsigned want = (unsigned)(gi == 0 ? q : q + 1);
        if (p.mode <= 1 || p.mode == 8 || p.mode == 9 || p.mode >= 11) {  // x published before this projection
          const unsigned target = (unsigned)G * (base + 4u * l + 2u * gi);
          const long long t0 = clk ? clock64() : 0;
          while (ld_acquire(p.bar) < target) {
          }
          if (clk) cyc[1] += clock64() - t0;
          asm volatile("fence.proxy.async.global;" ::: "memory");  // generic stores → the bulk copies' reads
        }
        long a, b;
        run_of((long)pr.groups * pr.ksteps, c, G, a, b);
        for (long i = a; i < b; i += p.cps, cur.next(S)) {
          const int s = cur.s, n = (int)(b - i < p.cps ? b - i : p.cps);
          if (cur.wrapped) {
            const long long t0 = clk ? clock64() : 0;
            mbar_wait(&empty[s], cur.ph ^ 1u);
            if (clk) cyc[0] += clock64() - t0;
          }
          if (p.mode == 10) {
            const long t0 = i % pr.ksteps, t1 = (i + n - 1) % pr.ksteps;  // the slot's k steps wrap at most once
            const long long c0 = clk ? clock64() : 0;
            for (long gg = 0; gg < (pr.ksteps + 7) / 8; ++gg) {
              const bool used = t0 <= t1 ? (gg * 8 + 7 >= t0 && gg * 8 <= t1) : (gg * 8 + 7 >= t0 || gg * 8 <= t1);
              if (used)
                while (ld_acquire(ready + gg) < want) {
                }
            }
            if (clk) cyc[1] += clock64() - c0;
            asm volatile("fence.proxy.async.global;" ::: "memory");
          }
          mbar_expect(&xfull[s], n * CELL_X);
          unsigned char* dst = ring + (long)s * slot + p.cps * CELL_W;
          for (int j = 0; j < n;) {  // contiguous k steps until the run wraps into the next group
            const int t = (int)((i + j) % pr.ksteps), m = n - j < pr.ksteps - t ? n - j : pr.ksteps - t;
            bulk_load(dst + j * CELL_X, x + (long)t * CELL_X, m * CELL_X, &xfull[s], pol);
            j += m;
          }
        }
      }
  } else if (warp < CW) {  // ------------------------------------------------------------ the consumers
    const bool products = p.mode == 0 || p.mode == 2 || p.mode >= 5;
    const bool barriers = p.mode <= 1 || p.mode == 8 || p.mode == 9 || p.mode >= 11, flow = p.mode == 10;
    const bool arrive_only = p.mode >= 11;  // the barrier after a convert: arrive, do not wait (see the header)
    // none, float2 red.add, plain stores, float4 red.add, partial slots
    const int adds = p.mode == 3 || p.mode == 6 ? 0 : p.mode == 5 ? 2 : p.mode == 9 || p.mode == 10 ? 4
                   : p.mode == 7 || p.mode == 8 ? 3 : 1;
    __shared__ int last;  // mode 10: this CTA stored a group's last partial sums
    for (int l = 0; l < p.layers; ++l)
      for (int ph = 0; ph < 3; ++ph) {
        if (ph == 1) {
          if (p.mode >= 12) state_phase(p, l, c, G, tid, ring, slot, wfull, xfull, empty, cur, clk, cyc);
          continue;
        }
        if (p.mode == 13) {  // the state phases alone, with the barrier before each and 4 arrivals per layer
          if (ph == 0)
            grid_sync(p.bar, (unsigned)G * (base + 4u * l + 1u), tid);
          else
            grid_arrive(p.bar, tid), grid_arrive(p.bar, tid);
          continue;
        }
        const int gi = ph >> 1;
        const Proj pr = proj(p, l, gi);
        float* y = gi == 0 ? ((l & 1) ? p.y_in[1] : p.y_in[0]) : ((l & 1) ? p.y_out[1] : p.y_out[0]);  // (no dynamic index into the parameters: that copies them to local memory)
        const int ystride = pr.groups * GU * 8;
        const long cells = (long)pr.groups * pr.ksteps;
        float* part = gi == 0 ? p.part_in : p.part_out;
        const long q = (long)p.epoch * p.layers + l;
        long a, b;
        run_of(cells, c, G, a, b);
        float acc[2][2][4] = {}, acc2[2][2][4] = {};
        int g = (int)(a / pr.ksteps);
        auto flush = [&]() {
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              const int col = (g * GU + warp + 8 * u) * 8 + (lane % 4) * 2, r = mt * 16 + lane / 4;
              float2* y0 = reinterpret_cast<float2*>(y + (long)r * ystride + col);
              float2* y1 = reinterpret_cast<float2*>(y + (long)(r + 8) * ystride + col);
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[mt][u][e] += acc2[mt][u][e], acc2[mt][u][e] = 0.f;
              if (adds == 4) {  // this CTA's slot of the group
                const int sp = c - owner((long)g * pr.ksteps, cells, G), cg = col - g * GU * 8;
                float* base = part + ((long)g * MAX_SPLIT + sp) * 32 * 128;
                *reinterpret_cast<float2*>(base + r * 128 + cg) = make_float2(acc[mt][u][0], acc[mt][u][1]);
                *reinterpret_cast<float2*>(base + (r + 8) * 128 + cg) = make_float2(acc[mt][u][2], acc[mt][u][3]);
              } else if (adds == 3) {  // even lanes add row r's 4 columns, odd lanes row r + 8's
                const bool odd = lane & 1;
                const float2 mine = odd ? make_float2(acc[mt][u][0], acc[mt][u][1]) : make_float2(acc[mt][u][2], acc[mt][u][3]);
                const float2 got = make_float2(__shfl_xor_sync(~0u, mine.x, 1), __shfl_xor_sync(~0u, mine.y, 1));
                if (odd)
                  atomicAdd(reinterpret_cast<float4*>(y1 - 1), make_float4(got.x, got.y, acc[mt][u][2], acc[mt][u][3]));
                else
                  atomicAdd(reinterpret_cast<float4*>(y0), make_float4(acc[mt][u][0], acc[mt][u][1], got.x, got.y));
              } else if (adds == 1) {
                atomicAdd(y0, make_float2(acc[mt][u][0], acc[mt][u][1]));
                atomicAdd(y1, make_float2(acc[mt][u][2], acc[mt][u][3]));
              } else {
                *y0 = make_float2(acc[mt][u][0], acc[mt][u][1]);
                *y1 = make_float2(acc[mt][u][2], acc[mt][u][3]);
              }
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[mt][u][e] = 0.f;
            }
        };
        // mode 10: the group's partial sums stored, the last of its splits converts it and publishes the flag
        auto group_done = [&]() {
          asm volatile("bar.sync 1, %0;" ::"n"(CW * 32) : "memory");
          const long f = owner((long)g * pr.ksteps, cells, G);
          const unsigned n = (unsigned)(owner((long)(g + 1) * pr.ksteps - 1, cells, G) - f + 1);
          unsigned* cnt = (gi == 0 ? p.cnt_in : p.cnt_out) + g;
          if (tid == 0) {
            __threadfence();
            last = atomicAdd(cnt, 1u) == n * (unsigned)(q + 1) - 1;
            __threadfence();
          }
          asm volatile("bar.sync 1, %0;" ::"n"(CW * 32) : "memory");
          const int dst_groups = gi == 0 ? p.out_ksteps / 8 : p.in_ksteps / 8;  // the columns the next one reads
          if (last && g < dst_groups) {
            uint4* xd = gi == 0 ? ((q & 1) ? p.x_mid1 : p.x_mid) : ((q & 1) ? p.x_in : p.x_in1);  // x of q / q + 1
            convert_parts(part, pr.ksteps, cells, G, g * 512L, (g + 1) * 512L, xd, tid, CW * 32);
            asm volatile("bar.sync 1, %0;" ::"n"(CW * 32) : "memory");
            if (tid == 0) {
              __threadfence();
              atomicMax((gi == 0 ? p.ready_in : p.ready_out) + g, (unsigned)(q + 1));
            }
          }
        };
        int t = (int)(a % pr.ksteps);  // the k step of the next cell within group g
        for (long i = a; i < b; i += p.cps, cur.next(S)) {
          const int s = cur.s, n = (int)(b - i < p.cps ? b - i : p.cps);
          long long t0 = clk ? clock64() : 0;
          mbar_wait(&wfull[s], cur.ph);
          if (clk) cyc[0] += clock64() - t0, t0 = clock64();
          mbar_wait(&xfull[s], cur.ph);
          if (clk) cyc[1] += clock64() - t0, t0 = clock64();
          if (products) {
            const unsigned char* sw = ring + (long)s * slot + (warp * 32 + lane) * 16;
            const unsigned char* sx = ring + (long)s * slot + p.cps * CELL_W + lane * 16;
            for (int j = 0; j < n;) {  // runs of cells within one group
              if (t == pr.ksteps) {
                if (adds) flush();
                if (flow) group_done();
                ++g;
                t = 0;
              }
              const int m = n - j < pr.ksteps - t ? n - j : pr.ksteps - t;
              mma_cells(acc, acc2, sw + j * CELL_W, sx + j * CELL_X, m);
              j += m;
              t += m;
            }
            if (clk) cyc[2] += clock64() - t0;
          }
          __syncwarp();
          if (lane == 0) mbar_arrive(&empty[s]);
        }
        if (adds && a < b) {
          if (!products)  // modes 1 and 4: the adds of a run as the products would make them (one per group)
            for (long gg = a / pr.ksteps; gg < (b - 1) / pr.ksteps; ++gg) {
              g = (int)gg;
              flush();
            }
          g = (int)((b - 1) / pr.ksteps);
          flush();
          if (flow) group_done();
        }
        if (barriers) {
          const long gt = (long)c * CW * 32 + tid, gs = (long)G * CW * 32;
          const unsigned e = base + 4u * l + 2u * gi;
          const long long t0 = clk ? clock64() : 0;
          grid_sync(p.bar, (unsigned)G * (e + 1), tid);
          if (p.mode == 12 && gi == 0) {  // the state phase reads y_in itself and arrives at e + 2
            if (clk) cyc[3] += clock64() - t0;
            continue;
          }
          if (adds == 4)
            convert_parts(part, pr.ksteps, cells, G, 0, (gi == 0 ? p.out_ksteps : p.in_ksteps) * 64L,
                          gi == 0 ? p.x_mid : p.x_in, gt, gs);
          else if (gi == 0)  // y_in's first out_ksteps × 16 columns → out_proj's x; zero next layer's y_in
            convert(y, ystride, p.out_ksteps, p.x_mid, (l & 1) ? p.y_in[0] : p.y_in[1], 32L * ystride, gt, gs);
          else
            convert(y, ystride, p.in_ksteps, p.x_in, (l & 1) ? p.y_out[0] : p.y_out[1], 32L * ystride, gt, gs);
          if (p.mode == 12 && gi == 1) {  // (no convert of y_in in this mode: zero the next layer's here)
            float4* z = reinterpret_cast<float4*>((l & 1) ? p.y_in[0] : p.y_in[1]);
            for (long i = gt; i < 32L * p.in_groups * GU * 8 / 4; i += gs) z[i] = make_float4(0.f, 0.f, 0.f, 0.f);
          }
          if (arrive_only)
            grid_arrive(p.bar, tid);
          else
            grid_sync(p.bar, (unsigned)G * (e + 2), tid);
          if (clk) cyc[3] += clock64() - t0;
        }
      }
  }
  if (clk) {  // one thread of each role: see cycle_names on the host
    unsigned long long* o = p.cycles + (long)c * 8;
    if (warp == CW && lane == 0) {
      atomicAdd(o, (unsigned long long)cyc[0]);
    } else if (warp == CW + 1 && lane == 0) {
      atomicAdd(o + 1, (unsigned long long)cyc[0]);
      atomicAdd(o + 2, (unsigned long long)cyc[1]);
    } else if (tid == 0) {
      for (int r = 0; r < 4; ++r) atomicAdd(o + 3 + r, (unsigned long long)cyc[r]);
      atomicAdd(o + 7, (unsigned long long)(clock64() - start));
    }
  }
}

// ------------------------------------------------------------------------------------------------- host
static uint16_t bf16_bits(float f) {
  __nv_bfloat16 h = __float2bfloat16_rn(f);
  return *reinterpret_cast<uint16_t*>(&h);
}
static float bf16_val(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static uint64_t rng = 0x9E3779B97F4A7C15ull;
static float urand() {  // uniform in [-1, 1)
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (float)((rng >> 40) * (1.0 / (1ull << 23))) - 1.0f;
}
// W (K, N) row-major bf16 bits → cells [group][k step][warp][lane][unit pair × 4], columns past N zero.
static std::vector<uint16_t> pack_w(const std::vector<uint16_t>& W, int K, int N, int groups) {
  const int ks = K / 16;
  std::vector<uint16_t> out((size_t)groups * ks * CELL_W / 2);
  size_t o = 0;
  for (int g = 0; g < groups; ++g)
    for (int t = 0; t < ks; ++t)
      for (int w = 0; w < CW; ++w)
        for (int ln = 0; ln < 32; ++ln)
          for (int e = 0; e < 8; ++e) {
            const int j = w + 8 * (e >> 2), q = e & 3;  // b0, b1 at k, k + 1; b2, b3 at k + 8, k + 9
            const int kk = t * 16 + (ln % 4) * 2 + (q & 1) + (q >> 1) * 8, n = (g * GU + j) * 8 + ln / 4;
            out[o++] = n < N ? W[(size_t)kk * N + n] : 0;
          }
  return out;
}
// The (row, column) of x (32, K) that element i of its A fragments ([k step][m tile][lane][8]) holds.
static void frag_pos(size_t i, int& r, int& col) {
  const int e = (int)(i % 8), ln = (int)(i / 8 % 32), mt = (int)(i / 256 % 2), t = (int)(i / 512), q = e >> 1;
  r = mt * 16 + ln / 4 + (q & 1) * 8;
  col = t * 16 + (ln % 4) * 2 + (e & 1) + (q >> 1) * 8;
}

int main(int argc, char** argv) {
  int L = 64, tokens = 10, cps = 8, check = 1, clock = 0, pf = 0, bulk_store = 0, D = 2560, NIN = 10576, DI = 5120;
  std::string modes = "0,1,2,3";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--layers")) L = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--tokens")) tokens = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--cps")) cps = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--modes")) modes = argv[i + 1];
    else if (!strcmp(argv[i], "--check")) check = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--clock")) clock = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--pf")) pf = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--bulk-store")) bulk_store = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--dims")) sscanf(argv[i + 1], "%d,%d,%d", &D, &NIN, &DI);
    else {
      fprintf(stderr, "unknown argument %s\n", argv[i]);
      return 2;
    }
  }
  if (L % 2) {  // the y buffers alternate by layer: an odd count would start the next launch on an unzeroed one
    fprintf(stderr, "--layers %d: want an even number\n", L);
    return 2;
  }
  if (D % 128 || DI % 128 || DI > NIN || cps < 1 || pf < 0) {
    fprintf(stderr, "want d_model and d_inner multiples of 128, d_inner <= in_proj's width, cps >= 1, pf >= 0\n");
    return 2;
  }
  const int heads = DI / 64;
  const bool states = ("," + modes + ",").find(",12,") != std::string::npos ||
                      ("," + modes + ",").find(",13,") != std::string::npos;
  if (states && (cps > 8 || NIN < 2 * DI + 256 + heads || heads % 4)) {
    fprintf(stderr, "modes 12 and 13 want --cps <= 8, in_proj's width >= 2 d_inner + 256 + heads (z, x, B, C, dt) and "
            "heads a multiple of 4\n");
    return 2;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int G = prop.multiProcessorCount;
  {  // the run: machine, CUDA versions, command line (results/ keep it beside the numbers)
    int rt = 0, drv = 0;
    CK(cudaRuntimeGetVersion(&rt));
    CK(cudaDriverGetVersion(&drv));
    std::string cmd;
    for (int i = 0; i < argc; ++i) cmd += (i ? " " : "") + std::string(argv[i]);
    const char* rev = getenv("GIT_REVISION");
    printf("{\"kind\": \"run\", \"device\": \"%s\", \"sms\": %d, \"cuda_runtime\": %d, \"cuda_driver\": %d, "
           "\"git_revision\": \"%s\", \"command\": \"%s\"}\n", prop.name, G, rt, drv, rev ? rev : "", cmd.c_str());
  }
  const int slot = cps * (CELL_W + CELL_X);
  cudaFuncAttributes fa;
  CK(cudaFuncGetAttributes(&fa, probe));  // (its static shared memory counts against the same 227 KB)
  const int stages = std::min<int>(MAX_STAGES, ((int)prop.sharedMemPerBlockOptin - (int)fa.sharedSizeBytes - HEAD) / slot);
  if (stages < 2) {
    fprintf(stderr, "cps %d: a slot of %d bytes leaves fewer than 2 stages\n", cps, slot);
    return 2;
  }
  const size_t smem = HEAD + (size_t)stages * slot;
  CK(cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));

  const int in_groups = (NIN + 127) / 128, out_groups = D / 128, in_ks = D / 16, out_ks = DI / 16;
  const size_t in_cells = (size_t)in_groups * in_ks, out_cells = (size_t)out_groups * out_ks;
  for (auto [groups, ks] : {std::pair<int, int>{in_groups, in_ks}, {out_groups, out_ks}}) {
    const long cells = (long)groups * ks;  // owner() inverts run_of; mode 9 has MAX_SPLIT slots per group
    for (int c = 0; c < G; ++c) {
      long a, b;
      run_of(cells, c, G, a, b);
      if (a >= b || owner(a, cells, G) != c || owner(b - 1, cells, G) != c) {
        fprintf(stderr, "CTA %d's run [%ld, %ld) of %ld cells: owner() disagrees\n", c, a, b, cells);
        return 1;
      }
    }
    for (int g = 0; g < groups; ++g)
      if (owner((long)(g + 1) * ks - 1, cells, G) - owner((long)g * ks, cells, G) + 1 > MAX_SPLIT) {
        fprintf(stderr, "group %d is split over more than %d CTAs\n", g, MAX_SPLIT);
        return 1;
      }
  }
  // One layer's weights on the host, ~ U(-1, 1) · sqrt(3 / K) (unit variance through each product)
  std::vector<uint16_t> Win((size_t)D * NIN), Wout((size_t)DI * D), x0((size_t)32 * D);
  for (auto& v : Win) v = bf16_bits(urand() * sqrtf(3.f / D));
  for (auto& v : Wout) v = bf16_bits(urand() * sqrtf(3.f / DI));
  for (auto& v : x0) v = bf16_bits(urand() * 1.7f);
  const std::vector<uint16_t> pin = pack_w(Win, D, NIN, in_groups), pout = pack_w(Wout, DI, D, out_groups);
  std::vector<uint16_t> xf((size_t)in_ks * 64 * 8);
  for (size_t i = 0; i < xf.size(); ++i) {
    int r, col;
    frag_pos(i, r, col);
    xf[i] = x0[(size_t)r * D + col];
  }
  // Every layer a copy of layer 0's (the bytes streamed are what is timed: 64 layers ≫ the 50 MB L2)
  uint4 *w_in, *w_out, *x_in, *x_mid;
  float* ybuf;
  unsigned* bar;
  const size_t in_b = in_cells * CELL_W, out_b = out_cells * CELL_W;
  CK(cudaMalloc(&w_in, in_b * L));
  CK(cudaMalloc(&w_out, out_b * L));
  CK(cudaMemcpy(w_in, pin.data(), in_b, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(w_out, pout.data(), out_b, cudaMemcpyHostToDevice));
  for (int l = 1; l < L; ++l) {
    CK(cudaMemcpy((char*)w_in + in_b * l, w_in, in_b, cudaMemcpyDeviceToDevice));
    CK(cudaMemcpy((char*)w_out + out_b * l, w_out, out_b, cudaMemcpyDeviceToDevice));
  }
  CK(cudaMalloc(&x_in, (size_t)in_ks * CELL_X));
  CK(cudaMalloc(&x_mid, (size_t)out_ks * CELL_X));
  const size_t yin_n = (size_t)32 * in_groups * 128, yout_n = (size_t)32 * out_groups * 128;
  CK(cudaMalloc(&ybuf, (2 * yin_n + 2 * yout_n) * 4));
  CK(cudaMalloc(&bar, 4));
  float *part_in, *part_out;
  uint4 *x_in1, *x_mid1;
  unsigned* flags;  // cnt_in, cnt_out, ready_in, ready_out
  CK(cudaMalloc(&x_in1, (size_t)in_ks * CELL_X));
  CK(cudaMalloc(&x_mid1, (size_t)out_ks * CELL_X));
  CK(cudaMalloc(&flags, (size_t)2 * (in_groups + out_groups) * 4));
  CK(cudaMalloc(&part_in, (size_t)in_groups * MAX_SPLIT * 32 * 128 * 4));
  CK(cudaMalloc(&part_out, (size_t)out_groups * MAX_SPLIT * 32 * 128 * 4));
  // mode 12: every layer's states (32 rows × heads × 64 × 128, bf16), each a copy of layer 0's ~ U(-1, 1)
  const size_t st_n = (size_t)32 * heads * 64 * 128;
  std::vector<uint16_t> S0(states ? st_n : 0);
  for (auto& v : S0) v = bf16_bits(urand());
  uint4* sbuf = nullptr;
  if (states) {
    CK(cudaMalloc(&sbuf, st_n * 2 * L));
    CK(cudaMemcpy(sbuf, S0.data(), st_n * 2, cudaMemcpyHostToDevice));
    for (int l = 1; l < L; ++l) CK(cudaMemcpy((char*)sbuf + st_n * 2 * l, sbuf, st_n * 2, cudaMemcpyDeviceToDevice));
  }
  unsigned long long* cycles = nullptr;
  if (clock) CK(cudaMalloc(&cycles, (size_t)G * 8 * 8));
  Params p{};
  p.w_in = w_in;
  p.w_out = w_out;
  p.in_groups = in_groups;
  p.in_ksteps = in_ks;
  p.out_groups = out_groups;
  p.out_ksteps = out_ks;
  p.cps = cps;
  p.pf = pf;
  p.state = sbuf;
  p.heads = heads;
  p.bulk_store = bulk_store;
  p.stages = stages;
  p.x_in = x_in;
  p.x_mid = x_mid;
  p.y_in[0] = ybuf;
  p.y_in[1] = ybuf + yin_n;
  p.y_out[0] = ybuf + 2 * yin_n;
  p.y_out[1] = ybuf + 2 * yin_n + yout_n;
  p.bar = bar;
  p.part_in = part_in;
  p.part_out = part_out;
  p.x_in1 = x_in1;
  p.x_mid1 = x_mid1;
  p.cnt_in = flags;
  p.cnt_out = flags + in_groups;
  p.ready_in = flags + in_groups + out_groups;
  p.ready_out = flags + 2 * in_groups + out_groups;
  auto reset = [&]() {
    CK(cudaMemcpy(x_in, xf.data(), xf.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemset(ybuf, 0, (2 * yin_n + 2 * yout_n) * 4));
    CK(cudaMemset(bar, 0, 4));
    CK(cudaMemset(flags, 0, (size_t)2 * (in_groups + out_groups) * 4));
    if (states) CK(cudaMemcpy(sbuf, S0.data(), st_n * 2, cudaMemcpyHostToDevice));  // (updated in place)
  };
  auto launch = [&](int layers, int mode, int epoch) {
    p.layers = layers;
    p.mode = mode;
    p.epoch = epoch;
    void* args[] = {&p};
    CK(cudaLaunchCooperativeKernel((const void*)probe, G, NT, args, smem, 0));
  };
  const double wbytes_all = (double)(in_b + out_b);
  // one layer of each checked mode in --modes against float64 products of the same bf16 inputs
  for (int cm : {0, 8, 9, 10, 11, 12}) {
    if (!check || ("," + modes + ",").find("," + std::to_string(cm) + ",") == std::string::npos) continue;
    reset();
    launch(1, cm, 0);
    CK(cudaDeviceSynchronize());
    std::vector<uint16_t> got(xf.size());
    // (mode 10 double-buffers x by layer: layer 0's out_proj writes layer 1's, the odd buffer)
    CK(cudaMemcpy(got.data(), cm == 10 ? x_in1 : x_in, got.size() * 2, cudaMemcpyDeviceToHost));
    std::vector<float> mid((size_t)32 * DI), want((size_t)32 * D), want_state(cm == 12 ? st_n : 0);
    for (int r = 0; r < 32; ++r) {
      std::vector<double> acc(NIN, 0.0);
      for (int kk = 0; kk < D; ++kk) {
        const double xv = bf16_val(x0[(size_t)r * D + kk]);
        const uint16_t* wr = &Win[(size_t)kk * NIN];
        for (int n = 0; n < (cm == 12 ? NIN : DI); ++n) acc[n] += xv * bf16_val(wr[n]);
      }
      for (int n = 0; n < DI; ++n) mid[(size_t)r * DI + n] = bf16_val(bf16_bits((float)acc[n]));
      if (cm == 12)  // the state update between the projections (state_phase's arithmetic, in float64)
        for (int h = 0; h < heads; ++h) {
          const double dt = std::log1p(std::exp(acc[2 * DI + 256 + h])), dA = std::exp(-dt * (1.0 + 0.01 * h));
          for (int q = 0; q < 64; ++q) {
            const double xv = acc[DI + h * 64 + q];
            double y = xv;
            const uint16_t* s0 = &S0[(((size_t)r * heads + h) * 64 + q) * 128];
            float* ws = &want_state[(((size_t)r * heads + h) * 64 + q) * 128];
            for (int n = 0; n < 128; ++n) {
              const double sn = bf16_val(s0[n]) * dA + dt * xv * acc[2 * DI + n];
              ws[n] = (float)sn;
              y += sn * acc[2 * DI + 128 + n];
            }
            mid[(size_t)r * DI + h * 64 + q] = bf16_val(bf16_bits((float)y));
          }
        }
      std::vector<double> o(D, 0.0);
      for (int kk = 0; kk < DI; ++kk) {
        const double xv = mid[(size_t)r * DI + kk];
        const uint16_t* wr = &Wout[(size_t)kk * D];
        for (int n = 0; n < D; ++n) o[n] += xv * bf16_val(wr[n]);
      }
      for (int n = 0; n < D; ++n) want[(size_t)r * D + n] = (float)o[n];
    }
    double err = 0, ss = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      int r, col;
      frag_pos(i, r, col);
      const double w = want[(size_t)r * D + col];
      err = std::max(err, std::fabs(bf16_val(got[i]) - w));
      ss += w * w;
    }
    const double rms = std::sqrt(ss / (32.0 * D)), rel = err / rms;
    // bf16 output (2^-8 relative) plus the intermediate's roundings where float32 and float64 sums differ
    double st_err = 0, st_ss = 0;  // mode 12: the states written back (bf16) against the float64 update
    if (cm == 12) {
      std::vector<uint16_t> gs(st_n);
      CK(cudaMemcpy(gs.data(), sbuf, st_n * 2, cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < st_n; ++i) st_ss += (double)want_state[i] * want_state[i];
      const double floor = 1e-3 * std::sqrt(st_ss / st_n);
      for (size_t i = 0; i < st_n; ++i)  // elementwise: bf16's rounding is relative (values reach ≈ 30× the rms)
        st_err = std::max(st_err, std::fabs((double)bf16_val(gs[i]) - want_state[i]) / (std::fabs(want_state[i]) + floor));
    }
    const double st_rel = st_err;  // ≤ 2^-8 for a correct rounding, plus float32 against float64
    const bool ok = rel < 0.03 && std::isfinite(rel) && st_rel < 1.0 / 128 && std::isfinite(st_rel);
    printf("{\"kind\": \"check\", \"mode\": %d, \"ok\": %s, \"max_abs_err\": %.4g, \"rms\": %.4g, "
           "\"max_err_over_rms\": %.4g, \"state_max_rel_err\": %.4g, \"bulk_store\": %d}\n", cm,
           ok ? "true" : "false", err, rms, rel, st_rel, bulk_store);
    fflush(stdout);
  }
  for (size_t a = 0; a < modes.size();) {
    size_t b = modes.find(',', a);
    const int mode = atoi(modes.substr(a, b == std::string::npos ? std::string::npos : b - a).c_str());
    reset();
    launch(L, mode, 0);  // warm-up
    CK(cudaDeviceSynchronize());
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    if (clock) CK(cudaMemset(cycles, 0, (size_t)G * 8 * 8));
    CK(cudaEventRecord(e0));
    p.cycles = cycles;  // (the warm-up and the checks run without the clock reads)
    for (int t = 1; t <= tokens; ++t) launch(L, mode, t);
    p.cycles = nullptr;
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    const double us = ms * 1e3 / ((double)tokens * L);
    const double sbytes = mode >= 12 ? 4.0 * st_n : 0.0;  // the states read and written
    const double wbytes = mode == 13 ? 0.0 : wbytes_all;
    printf("{\"kind\": \"batch32\", \"mode\": %d, \"layers\": %d, \"tokens\": %d, \"cps\": %d, \"stages\": %d, "
           "\"ctas\": %d, \"dims\": [%d, %d, %d], \"weight_mb_per_layer\": %.2f, \"us_per_layer\": %.3f, "
           "\"weight_tb_s\": %.3f, \"state_mb_per_layer\": %.2f, \"bytes_tb_s\": %.3f, \"pf\": %d, \"bulk_store\": %d, "
           "\"clock\": %d}\n",
           mode, L, tokens, cps, stages, G, D, NIN, DI, wbytes / 1e6, us, wbytes / us / 1e6, sbytes / 1e6,
           (wbytes + sbytes) / us / 1e6, pf, bulk_store, clock);
    if (clock) {  // per role and cause, the mean over CTAs in µs per layer
      static const char* cycle_names[8] = {"weights_wait_empty", "x_wait_empty", "x_wait_published",
                                           "cons0_wait_weights", "cons0_wait_x", "cons0_products_adds",
                                           "cons0_barriers_converts", "cons0_total"};
      std::vector<unsigned long long> cy((size_t)G * 8);
      CK(cudaMemcpy(cy.data(), cycles, cy.size() * 8, cudaMemcpyDeviceToHost));
      int khz = 0;
      CK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
      printf("{\"kind\": \"cycles\", \"mode\": %d, \"clock_khz\": %d", mode, khz);
      for (int r = 0; r < 8; ++r) {
        double sum = 0;
        for (int c = 0; c < G; ++c) sum += (double)cy[(size_t)c * 8 + r];
        printf(", \"%s_us\": %.3f", cycle_names[r], sum / G / ((double)tokens * L) / (khz * 1e-3));
      }
      printf("}\n");
    }
    fflush(stdout);
    if (b == std::string::npos) break;
    a = b + 1;
  }
  return 0;
}
