// Skinny GEMM for decoding: y (M, N) = x (M, K) · w (K, N), M ≤ 32 rows, bf16 in, float32 sums; an XLA FFI
// custom call (kernels/skinny_gemm.py builds this file with nvcc on first use and registers it).
//
// Why: at decode the projections are weight streams. XLA's GEMMs of a 2.7B layer at batch 32 run in_proj on
// 83 cuBLAS CTAs (128 × 32 tiles) at ≈ 2.1 TB/s and out_proj at ≈ 1.75 TB/s (benchmarks/README.md), against
// ≈ 3.1 TB/s that a ring of bulk copies per SM reaches (benchmarks/megakernel_probe.cu, mode 3). Here every SM
// streams an equal share of the weight's columns through such a ring and the rows are few enough that the
// tensor-core work hides under the stream.
//
// Layout follows the megakernel probe: one producer warp per CTA issues cp.async.bulk copies of the CTA's
// columns (one copy per weight row of the slot: nu · 16 bytes, nu units of 8 columns) and of x's K-slice into
// a ring of STAGES slots; CW consumer warps each take one k16 step of every slot (mma.sync m16n8k16, bf16 →
// float32), release the slot through an mbarrier, and at the end sum their partial tiles through shared
// memory. Grid (Pn, S): CTA (p, s) owns units [p·U/Pn, (p+1)·U/Pn) of the U = N/8 column units and the s-th
// of S equal K slices; S > 1 writes float32 partials (S, M, N) that the consumer kernel sums (the residual
// kernel of kernels/decode.py), S = 1 the product rounded to y's dtype.
//
// Requirements (checked by skinny_gemm.py before it calls here): sm_90+, x and w bf16 and row-major, N % 8 == 0,
// (K / S) % 16 == 0, 1 ≤ M ≤ 32.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int BK = 128;             // k per ring slot: 8 k16 steps, one per consumer warp
constexpr int CW = 8;               // consumer warps
constexpr int NT = (CW + 1) * 32;   // + the producer warp
constexpr int XS = BK + 8;          // x rows in shared memory 272 B apart: ldmatrix's 8 rows hit distinct banks
constexpr int SMEM_MAX = 220 * 1024;
constexpr int MAX_STAGES = 8;

template <int MT, int UMAX>
struct Shape {
  static constexpr int US = UMAX | 1;  // weight row stride in 16-byte units, odd: ldmatrix.trans conflict-free
  static constexpr int XB = MT * 16 * XS * 2;
  static constexpr int WB = BK * US * 16;
  static constexpr int SLOT = XB + WB;
  static constexpr int STAGES = std::min(MAX_STAGES, (SMEM_MAX - 1024) / SLOT);
  static constexpr int RED = CW * MT * 16 * UMAX * 8 * 4;  // the consumers' partial tiles at the end
  static constexpr int SMEM = 1024 + std::max(STAGES * SLOT, RED);
  static_assert(STAGES >= 3, "ring too shallow");
};

__device__ __forceinline__ uint32_t sa(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(uint64_t* b, unsigned n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(sa(b)), "r"(n) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, unsigned parity) {
  uint32_t ok = 0;
  while (!ok) {
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(ok)
        : "r"(sa(b)), "r"(parity)
        : "memory");
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
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::
          "r"(sa(dst)),
      "l"(src), "r"(bytes), "r"(sa(bar)), "l"(pol)
      : "memory");
}
__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(sa(p)));
}
__device__ __forceinline__ void ldsm_x2_t(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(sa(p)));
}
__device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// Named barrier 1: the consumer warps alone (the producer may have left).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(CW * 32) : "memory"); }

template <int MT, int UMAX, typename Out>
__global__ void __launch_bounds__(NT, 1)
    skinny_gemm_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                       Out* __restrict__ y, int M, int K, int N, int Pn) {
  using S = Shape<MT, UMAX>;
  extern __shared__ __align__(1024) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = full + MAX_STAGES;
  unsigned char* ring = smem + 1024;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int U = N / 8, p = blockIdx.x, s = blockIdx.y, splits = gridDim.y;
  const int u0 = (int)((long long)p * U / Pn), nu = (int)((long long)(p + 1) * U / Pn) - u0;
  const int ks = K / splits, k0 = s * ks, nslots = (ks + BK - 1) / BK;

  if (threadIdx.x == 0) {
    for (int i = 0; i < S::STAGES; ++i) {
      mbar_init(full + i, 1);
      mbar_init(empty + i, CW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == CW) {  // the producer
    uint64_t stream, keep;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(stream));
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(keep));
    for (int i = 0; i < nslots; ++i) {
      const int st = i % S::STAGES, kk = k0 + i * BK, kv = min(BK, k0 + ks - kk);
      if (i >= S::STAGES) mbar_wait(empty + st, (i / S::STAGES - 1) & 1);
      unsigned char* xs = ring + st * S::SLOT;
      unsigned char* ws = xs + S::XB;
      if (lane == 0) mbar_expect(full + st, (unsigned)(M * kv * 2 + kv * nu * 16));
      __syncwarp();
      for (int m = lane; m < M; m += 32)  // x's K-slice, shared by every CTA: kept in L2
        bulk_load(xs + m * XS * 2, x + (size_t)m * K + kk, kv * 2, full + st, keep);
      for (int r = lane; r < kv; r += 32)  // this CTA's columns of kv weight rows: read once, streamed
        bulk_load(ws + r * S::US * 16, w + (size_t)(kk + r) * N + u0 * 8, nu * 16, full + st, stream);
    }
    return;
  }

  // The consumers: warp `warp` takes k16 step `warp` of every slot.
  float acc[MT][UMAX][4];
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int u = 0; u < UMAX; ++u)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][u][e] = 0.f;

  for (int i = 0; i < nslots; ++i) {
    const int st = i % S::STAGES, kv = min(BK, ks - i * BK);
    mbar_wait(full + st, (i / S::STAGES) & 1);
    if (warp * 16 < kv) {
      const unsigned char* xs = ring + st * S::SLOT;
      const unsigned char* ws = xs + S::XB;
      uint32_t a[MT][4];
#pragma unroll
      for (int t = 0; t < MT; ++t)  // A tile rows t·16 + lane % 16, k halves by lane / 16
        ldsm_x4(a[t], xs + ((t * 16 + lane % 16) * XS + warp * 16 + (lane / 16) * 8) * 2);
      const unsigned char* wrow = ws + (warp * 16 + lane % 16) * S::US * 16;
#pragma unroll
      for (int u = 0; u < UMAX; ++u) {
        if (u < nu) {
          uint32_t b[2];
          ldsm_x2_t(b, wrow + u * 16);
#pragma unroll
          for (int t = 0; t < MT; ++t) mma(acc[t][u], a[t], b);
        }
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + st);
  }

  // Sum the CW warps' partial tiles through shared memory (the ring is free once every consumer is here).
  consumers_sync();
  float* red = reinterpret_cast<float*>(ring);
  constexpr int RC = UMAX * 8;  // columns of a partial tile
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int u = 0; u < UMAX; ++u) {
      if (u < nu) {
        const int r = t * 16 + lane / 4, c = u * 8 + (lane % 4) * 2;
        float* base = red + (warp * MT * 16) * RC;
        base[r * RC + c] = acc[t][u][0];
        base[r * RC + c + 1] = acc[t][u][1];
        base[(r + 8) * RC + c] = acc[t][u][2];
        base[(r + 8) * RC + c + 1] = acc[t][u][3];
      }
    }
  consumers_sync();
  const int cols = nu * 8;
  for (int idx = threadIdx.x; idx < M * cols; idx += CW * 32) {
    const int m = idx / cols, c = idx % cols;
    float v = 0.f;
#pragma unroll
    for (int q = 0; q < CW; ++q) v += red[(q * MT * 16 + m) * RC + c];
    const size_t o = ((size_t)s * M + m) * N + u0 * 8 + c;
    if constexpr (sizeof(Out) == 4) {
      y[o] = v;
    } else {
      y[o] = __float2bfloat16_rn(v);
    }
  }
}

template <int MT, int UMAX, typename Out>
cudaError_t launch(cudaStream_t stream, const void* x, const void* w, void* y, int M, int K, int N, int Pn,
                   int splits) {
  using S = Shape<MT, UMAX>;
  auto* fn = skinny_gemm_kernel<MT, UMAX, Out>;
  cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, S::SMEM);
  if (e != cudaSuccess) return e;
  fn<<<dim3(Pn, splits), NT, S::SMEM, stream>>>(static_cast<const __nv_bfloat16*>(x),
                                                static_cast<const __nv_bfloat16*>(w), static_cast<Out*>(y), M, K,
                                                N, Pn);
  return cudaGetLastError();
}

template <typename Out>
cudaError_t dispatch(cudaStream_t stream, const void* x, const void* w, void* y, int M, int K, int N, int Pn,
                     int splits, int umax) {
  const bool two = M > 16;
#define MJ_CASE(U)                                                                             \
  if (umax <= U)                                                                               \
    return two ? launch<2, U, Out>(stream, x, w, y, M, K, N, Pn, splits)                       \
               : launch<1, U, Out>(stream, x, w, y, M, K, N, Pn, splits);
  MJ_CASE(2)
  MJ_CASE(4)
  MJ_CASE(6)
  MJ_CASE(8)
  MJ_CASE(12)
  MJ_CASE(16)
#undef MJ_CASE
  return cudaErrorInvalidValue;
}

int sm_count() {
  int dev = 0, n = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  return n > 0 ? n : 1;
}

}  // namespace

ffi::Error SkinnyGemmImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                          int64_t splits, int64_t ctas) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || x.element_type() != ffi::BF16 || w.element_type() != ffi::BF16)
    return ffi::Error::InvalidArgument("skinny_gemm: x (M, K) and w (K, N) must be 2-D bfloat16");
  const int M = (int)xd[0], K = (int)xd[1], N = (int)wd[1];
  if (wd[0] != K || M < 1 || M > 32 || N % 8 || splits < 1 || K % splits || (K / splits) % 16)
    return ffi::Error::InvalidArgument("skinny_gemm: needs 1 ≤ M ≤ 32, N % 8 == 0 and (K / splits) % 16 == 0");
  const int U = N / 8;
  // Pn CTAs along N per K slice: one CTA per SM over all slices (the caller may ask for another count),
  // more where a CTA would own over 16 units (16 · 8 columns of accumulators per thread).
  const int total = ctas > 0 ? (int)ctas : sm_count();
  const int Pn = std::min(U, std::max(std::max(1, total / (int)splits), (U + 15) / 16));
  const int umax = (U + Pn - 1) / Pn;
  cudaError_t e;
  if (y->element_type() == ffi::F32) {
    e = dispatch<float>(stream, x.untyped_data(), w.untyped_data(), y->untyped_data(), M, K, N, Pn, (int)splits, umax);
  } else if (y->element_type() == ffi::BF16 && splits == 1) {
    e = dispatch<__nv_bfloat16>(stream, x.untyped_data(), w.untyped_data(), y->untyped_data(), M, K, N, Pn, 1, umax);
  } else {
    return ffi::Error::InvalidArgument("skinny_gemm: y must be float32, or bfloat16 with splits == 1");
  }
  if (e != cudaSuccess) return ffi::Error::Internal(std::string("skinny_gemm: ") + cudaGetErrorString(e));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaJaxSkinnyGemm, SkinnyGemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("splits")
                                  .Attr<int64_t>("ctas"),
                              {ffi::Traits::kCmdBufferCompatible});
