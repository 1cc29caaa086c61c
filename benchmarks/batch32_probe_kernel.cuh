// The device code of benchmarks/batch32_probe.cu: its constants, Params, helpers and the persistent kernel
// `probe` (one CTA per SM, cooperative launch, one launch per token over every layer). batch32_probe.cu's
// header describes the design, the modes and where their measurements are; its host code packs the weights
// into the cell order read here, launches, times and checks. Kept apart so that the kernel reads on its own.
//
// Roles of a CTA (NT threads): warps 0 … CW − 1 consume (mma.sync on the ring's slots, float2 atomic adds of
// their partial sums into y, grid barriers and converts; in modes 12 and 13 the state update); warp CW's lane 0
// streams the weights (and the states) into the ring; warp CW + 1's lane 0 copies x (or the state inputs) beside
// them once the barrier that published them has passed. The modes this kernel runs (the host accepts no other:
// the diagnostics 1, 4, 5, 7–10 and the --pf / --bulk-store variants were removed, their code is at 21af4dc):
//   0   products, adds, grid barriers and converts;   2  products and adds only (no barriers, x stale);
//   3   the ring alone (slots released unread);        6  mode 2 without the adds;
//   11  mode 0, the consumers only arrive at the barrier after a convert;
//   12  mode 11 with the state phase in place of in_proj's convert;   13  the state phases alone;
//   14, 15  in_proj (14) or out_proj (15) alone, ONE LAUNCH PER PROJECTION (layers = 1, the host steps the
//       weights): what a standalone GEMM of this design would take in the Engine's loop of separate kernels —
//       its ramp and tail included. y is zeroed by the consumers (after griddepcontrol.wait), who arrive on the
//       barrier counter and wait for every CTA's arrival only before their first add; the weight producer
//       streams from the start (under programmatic dependent launch, while the launch before finishes) and
//       lets the next launch begin once its last copy is issued; x is read after griddepcontrol.wait.
// Grid barrier episodes per layer l (counted over launches from base = epoch × 4 × layers): 4l + 1 in_proj's
// sums complete, 4l + 2 out_proj's x published, 4l + 3 out_proj's sums complete, 4l + 4 in_proj's next x.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels/ptx.cuh"

constexpr int CW = 8;                    // consumer warps
constexpr int NT = (CW + 2) * 32;        // + the weight producer's warp and the x producer's warp
constexpr int GU = 16;                   // column units of 8 per group: units w and w + 8 for warp w
constexpr int CELL_W = GU * 8 * 16 * 2;  // weight bytes of a cell (16 units × 8 columns × 16 k, bf16): 4 KB
constexpr int CELL_X = 2 * 16 * 16 * 2;  // x bytes of a k16 step (2 m16 tiles × 16 k, bf16): 1 KB
constexpr int MAX_STAGES = 16;
constexpr int HEAD = 1024;  // the mbarriers, then the ring

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
  unsigned long long* cycles;  // --clock 1: [CTA][8] cycles by role and cause, summed over launches
  const uint4* state;  // modes 12, 13: the SSM states, [layer][row][head][64 p][128 n] bf16: chunks of 16 p rows (4 KB)
  int heads;           // d_inner / 64
};

constexpr int CHUNKS_PER_HEAD = 4;  // modes 12, 13: a head's 64 × 128 state as 4 chunks of 16 rows, 4 KB each like a cell
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
// Modes 11–13: this CTA's consumers arrive (their stores before it) without waiting for the others.
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

// The weight producer's sequence of slots, phase by phase (0 in_proj, 1 the states in modes 12 and 13, 2
// out_proj): the order in which every role of the CTA takes the ring's slots (the consumers and the x producer
// follow the same phases with their own loops; Cursor below keeps the slot index in step).
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
  return p.mode == 13 ? ph == 1 : p.mode == 14 ? ph == 0 : p.mode == 15 ? ph == 2 : ph != 1 || p.mode == 12;
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

// Modes 12 and 13: the SSM state update of layer l between the projections, its states streamed through the same ring
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
    if (clk) cyc[2] += clock64() - t0;
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);
  }
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
    Walk w;  // the slot to load: never waits on data, only on a free slot
    walk_next(w, p, c, G, true);
    for (; !w.done; walk_next(w, p, c, G), cur.next(S)) {
      const int s = cur.s, n = (int)(w.b - w.i < p.cps ? w.b - w.i : p.cps);
      if (cur.wrapped) {
        const long long t0 = clk ? clock64() : 0;
        mbar_wait(&empty[s], cur.ph ^ 1u);
        if (clk) cyc[0] += clock64() - t0;
      }
      mbar_expect(&wfull[s], n * CELL_W);
      bulk_load(ring + (long)s * slot, phase_base(p, w.l, w.ph) + w.i * (CELL_W / 16), n * CELL_W, &wfull[s], pol);
    }
    if (p.mode >= 14) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");  // (no-op without PDL)
  } else if (warp == CW + 1 && lane == 0) {  // --------------------------------------- the x producer
    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
    for (int l = 0; l < p.layers; ++l)
      for (int ph = 0; ph < 3; ++ph) {
        if (ph == 1) {  // modes 12, 13: beside a slot's state chunks, their inputs from in_proj's sums
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
        if (!phase_on(p, ph)) continue;
        if (p.mode >= 14) asm volatile("griddepcontrol.wait;" ::: "memory");  // x: the launch before complete
        const int gi = ph >> 1;
        const Proj pr = proj(p, l, gi);
        const unsigned char* x = reinterpret_cast<const unsigned char*>(gi == 0 ? p.x_in : p.x_mid);
        if (p.mode == 0 || (p.mode >= 11 && p.mode <= 13)) {  // x published before this projection (else stale)
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
    const bool products = p.mode != 3;                  // mode 3: the ring alone, slots released unread
    const bool adds = p.mode != 3 && p.mode != 6;       // each group's partial sums into y by float2 atomic adds
    const bool barriers = p.mode == 0 || (p.mode >= 11 && p.mode <= 13);  // 2, 3, 6, 14, 15: no converts
    const bool arrive_only = p.mode >= 11 && p.mode <= 13;  // the barrier after a convert: arrive, do not wait (see the header)
    for (int l = 0; l < p.layers; ++l)
      for (int ph = 0; ph < 3; ++ph) {
        if (ph == 1) {
          if (p.mode == 12 || p.mode == 13) state_phase(p, l, c, G, tid, ring, slot, wfull, xfull, empty, cur, clk, cyc);
          continue;
        }
        if (p.mode == 13) {  // the state phases alone, with the barrier before each and 4 arrivals per layer
          if (ph == 0)
            grid_sync(p.bar, (unsigned)G * (base + 4u * l + 1u), tid);
          else
            grid_arrive(p.bar, tid), grid_arrive(p.bar, tid);
          continue;
        }
        if (!phase_on(p, ph)) continue;
        const int gi = ph >> 1;
        const Proj pr = proj(p, l, gi);
        float* y = gi == 0 ? ((l & 1) ? p.y_in[1] : p.y_in[0]) : ((l & 1) ? p.y_out[1] : p.y_out[0]);  // (no dynamic index into the parameters: that copies them to local memory)
        const int ystride = pr.groups * GU * 8;
        const long cells = (long)pr.groups * pr.ksteps;
        long a, b;
        run_of(cells, c, G, a, b);
        float acc[2][2][4] = {}, acc2[2][2][4] = {};
        int g = (int)(a / pr.ksteps);
        bool zeroed = p.mode < 14;  // modes 14, 15: every CTA's share of y zeroed (waited for before the first add)
        if (!zeroed) {
          asm volatile("griddepcontrol.wait;" ::: "memory");  // the launch before may still read y
          const long n4 = 32L * ystride / 4, gt = (long)c * CW * 32 + tid, gs = (long)G * CW * 32;
          for (long i = gt; i < n4; i += gs) reinterpret_cast<float4*>(y)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
          grid_arrive(p.bar, tid);
        }
        auto flush = [&]() {
          if (!zeroed) {
            if (lane == 0)
              while (ld_acquire(p.bar) < (unsigned)G * (unsigned)p.epoch) {
              }
            __syncwarp();
            zeroed = true;
          }
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              const int col = (g * GU + warp + 8 * u) * 8 + (lane % 4) * 2, r = mt * 16 + lane / 4;
              float2* y0 = reinterpret_cast<float2*>(y + (long)r * ystride + col);
              float2* y1 = reinterpret_cast<float2*>(y + (long)(r + 8) * ystride + col);
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[mt][u][e] += acc2[mt][u][e], acc2[mt][u][e] = 0.f;
              atomicAdd(y0, make_float2(acc[mt][u][0], acc[mt][u][1]));  // atom.global.add.v2.f32 in the PTX
              atomicAdd(y1, make_float2(acc[mt][u][2], acc[mt][u][3]));
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[mt][u][e] = 0.f;
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
        if (adds && a < b) {  // the run's last group (adds imply products: every group before it flushed above)
          g = (int)((b - 1) / pr.ksteps);
          flush();
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
          if (gi == 0)  // y_in's first out_ksteps × 16 columns → out_proj's x; zero next layer's y_in
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

