// Skinny GEMM for decoding: y (M, N) = x (M, K) · w (K, N), M ≤ 32 rows, bf16 in, float32 sums; an XLA FFI
// custom call (kernels/skinny_gemm.py builds this file with nvcc on first use and registers it).
//
// Why: at decode the projections are weight streams. XLA's GEMMs of a 2.7B layer at batch 32 run in_proj on
// 83 cuBLAS CTAs (128 × 32 tiles) at ≈ 2.1 TB/s and out_proj at ≈ 1.75 TB/s (benchmarks/README.md), against
// ≈ 3.1 TB/s that a ring of bulk copies per SM reaches (benchmarks/megakernel_probe.cu, mode 3). Here every SM
// streams an equal share of the weight's columns through such a ring and the rows are few enough that the
// tensor-core work hides under the stream.
//
// Layout follows the megakernel probe: one producer thread per CTA issues TMA tensor copies (one 2-D box of
// BK weight rows × the CTA's nu units of 8 columns, one box of x's K-slice) into a ring of STAGES slots; CW
// consumer warps each take one k16 step of every slot (mma.sync m16n8k16, bf16 → float32), release the slot
// through an mbarrier, and at the end sum their partial tiles through shared memory. (A first version issued
// one cp.async.bulk per weight row of a slot: the copy engine then spends ≈ 25 ns per copy and a CTA ran at
// ≈ 4 µs per slot whatever its bytes — 0.15–0.6 TB/s on an H100, benchmarks/results/gemv_probe_skinny_*.) Grid (Pn, S): CTA (p, s) owns units [p·U/Pn, (p+1)·U/Pn) of the U = N/8 column units and the s-th
// of S equal K slices; S > 1 writes float32 partials (S, M, N) that the consumer kernel sums (the residual
// kernel of kernels/decode.py), S = 1 the product rounded to y's dtype.
//
// Status (H100, benchmarks/README.md "A CUDA skinny GEMM"): correct, but slower than XLA's GEMV / GEMM on
// the 2.7B projections (in_proj 24.5 µs at 1 row, 34.8 at 32, against 21.7 / 25.7 in the decode loop), so
// the decode path uses it only when asked (MAMBA_JAX_DECODE_GEMM). Its FFI / nvcc machinery is what a
// megakernel in the engine would use.
//
// Requirements (checked by skinny_gemm.py before it calls here): sm_90+, x and w bf16 and row-major, N % 8 == 0,
// (K / S) % 16 == 0, 1 ≤ M ≤ 32.

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "ptx.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int BK = 128;             // k per ring slot: 8 k16 steps, one per consumer warp
constexpr int CW = 8;               // consumer warps
constexpr int NT = (CW + 1) * 32;   // + the producer warp
constexpr int SMEM_MAX = 226 * 1024;  // of the 227 KB a block may have on Hopper
constexpr int MAX_STAGES = 16;
constexpr int HEAD = 1024;  // the barriers, then the ring from the next 1024-byte boundary

// A slot: x's box (xr rows × BK: 8 rows for M ≤ 8, else MT·16; rows past M zero-filled by the TMA) then the
// weight (BK rows of nu units of 8 columns: a TMA box of rows nu · 16 bytes apart, or with the packed weight
// nu runs of BK · 16 bytes). The ring takes as many slots as fit: a CTA streams at about its bytes in flight
// over the loaded memory latency (≈ 7 µs on an H100 at full bandwidth), so the depth sets the speed.
struct Ring {
  int xr, xb, slot, stages, smem;
  Ring(int M, int MT, int umax, int ucap) {
    xr = M <= 8 ? 8 : MT * 16;  // (an A tile reads 16 rows: past xr it reads garbage rows it never stores)
    xb = xr * BK * 2;
    slot = xb + BK * umax * 16;
    stages = std::min(MAX_STAGES, (SMEM_MAX - 2 * HEAD) / slot);
    const int red = CW * MT * 16 * ucap * 8 * 4;  // the consumers' partial tiles at the end (UMAX columns)
    smem = 2 * HEAD + std::max(stages * slot, red);
  }
};

__device__ __forceinline__ void mbar_expect_more(uint64_t* b, unsigned bytes) {  // no arrival
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(sa(b)), "r"(bytes) : "memory");
}
// The box of `map` at (column c, row r) into shared memory at dst, completing on `bar`.
__device__ __forceinline__ void tma_box(void* dst, const CUtensorMap* map, int c, int r, uint64_t* bar, uint64_t pol) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(sa(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c), "r"(r), "r"(sa(bar)), "l"(pol)
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
    skinny_gemm_kernel(const __grid_constant__ CUtensorMap tx, const __grid_constant__ CUtensorMap tw_wide,
                       const __grid_constant__ CUtensorMap tw_narrow, const __nv_bfloat16* __restrict__ wp,
                       int umax, Out* __restrict__ y, int M, int K, int N, int Pn, int XB, int SLOT, int STAGES) {
  extern __shared__ __align__(128) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = full + MAX_STAGES;
  unsigned char* ring = smem + HEAD + ((HEAD - (sa(smem) % HEAD)) % HEAD);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int U = N / 8, p = blockIdx.x, s = blockIdx.y, splits = gridDim.y;
  const int u0 = (int)((long long)p * U / Pn), nu = (int)((long long)(p + 1) * U / Pn) - u0;
  const int ks = K / splits, k0 = s * ks, nslots = (ks + BK - 1) / BK;

  if (threadIdx.x == 0) {
    for (int i = 0; i < STAGES; ++i) {
      mbar_init(full + i, 1);
      mbar_init(empty + i, CW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == CW) {  // the producer: one thread
    if (lane == 0) {
      // Two weight maps, boxes of umax and umax − 1 units: every CTA owns one of those two counts.
      const CUtensorMap* tw = nu == umax ? &tw_wide : &tw_narrow;
      uint64_t stream, keep;
      asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(stream));
      asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(keep));
      // The weight of slot i: one TMA box of the row-major weight (whole boxes always land: rows past K or M
      // zero-filled, a short last slot's extra rows unused), or with the packed weight (wp: every CTA's
      // columns as a (K, nu · 8) row-major block, the blocks in CTA order) one contiguous bulk copy.
      auto load_w = [&](unsigned char* dst, int i, uint64_t* bar) {
        const int kk = k0 + i * BK, kv = min(BK, ks - i * BK);
        if (wp) {
          mbar_expect_more(bar, kv * nu * 16);
          bulk_load(dst, wp + (size_t)u0 * 8 * K + (size_t)kk * nu * 8, kv * nu * 16, bar, stream);
        } else {
          mbar_expect_more(bar, BK * nu * 16);
          tma_box(dst, tw, u0 * 8, kk, bar, stream);  // this CTA's columns: read once
        }
      };
      // The weight boxes of the first slots go out before x's: the weights are no earlier kernel's output, so
      // under programmatic dependent launch they stream while the kernel before this one finishes, and only
      // x waits for it (griddepcontrol.wait: that kernel complete and its writes visible; a no-op otherwise).
      const int early = min(STAGES, nslots);
      for (int i = 0; i < early; ++i) load_w(ring + i * SLOT + XB, i, full + i);
      asm volatile("griddepcontrol.wait;" ::: "memory");
      for (int i = 0; i < nslots; ++i) {
        const int st = i % STAGES, kk = k0 + i * BK;
        unsigned char* xs = ring + st * SLOT;
        if (i >= early) {
          mbar_wait(empty + st, (i / STAGES - 1) & 1);
          load_w(xs + XB, i, full + st);
        }
        mbar_expect(full + st, (unsigned)XB);
        tma_box(xs, &tx, kk, 0, full + st, keep);  // x's K-slice, shared by every CTA: kept in L2
      }
      // Every copy is issued: a kernel launched behind this one with PDL (the next projection) may start
      // streaming its own weights into SMs as this one's CTAs leave.
      asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
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
    const int st = i % STAGES, kv = min(BK, ks - i * BK);
    mbar_wait(full + st, (i / STAGES) & 1);
    if (warp * 16 < kv) {
      const unsigned char* xs = ring + st * SLOT;
      const unsigned char* ws = xs + XB;
      uint32_t a[MT][4];
#pragma unroll
      for (int t = 0; t < MT; ++t)  // A tile rows t·16 + lane % 16, k halves by lane / 16
        ldsm_x4(a[t], xs + ((t * 16 + lane % 16) * BK + warp * 16 + (lane / 16) * 8) * 2);
      // k row r of unit u (rows of nu units, nu · 16 bytes apart)
      const unsigned char* wrow = ws + (warp * 16 + lane % 16) * nu * 16;
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

struct Maps {
  CUtensorMap x, wide, narrow;
};

// A row-major bf16 matrix (rows × cols) as a TMA map of boxes of box_rows × box_cols.
bool encode(CUtensorMap* map, const void* base, int rows, int cols, int box_rows, int box_cols) {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q);
    return q == cudaDriverEntryPointSuccess ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f) : nullptr;
  }();
  if (!fn) return false;
  cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows}, strides[1] = {(cuuint64_t)cols * 2};
  cuuint32_t box[2] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows}, elem[2] = {1, 1};
  return fn(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box, elem,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int MT, int UMAX, typename Out>
cudaError_t launch(cudaStream_t stream, const void* x, const void* w, void* y, int M, int K, int N, int Pn,
                   int splits, int umax, bool pdl, bool packed) {
  const Ring r(M, MT, umax, UMAX);
  if (r.stages < 3) return cudaErrorInvalidValue;
  Maps m = {};
  if (!encode(&m.x, x, M, K, r.xr, BK)) return cudaErrorInvalidValue;
  if (!packed && (!encode(&m.wide, w, K, N, BK, umax * 8) || !encode(&m.narrow, w, K, N, BK, std::max(umax - 1, 1) * 8)))
    return cudaErrorInvalidValue;
  auto* fn = skinny_gemm_kernel<MT, UMAX, Out>;
  cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, r.smem);
  if (e != cudaSuccess) return e;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(Pn, splits);
  config.blockDim = dim3(NT);
  config.dynamicSmemBytes = r.smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = pdl ? 1 : 0;
  const auto* wp = packed ? static_cast<const __nv_bfloat16*>(w) : nullptr;
  return cudaLaunchKernelEx(&config, fn, m.x, m.wide, m.narrow, wp, umax, static_cast<Out*>(y), M, K, N, Pn, r.xb,
                            r.slot, r.stages);
}

template <typename Out>
cudaError_t dispatch(cudaStream_t stream, const void* x, const void* w, void* y, int M, int K, int N, int Pn,
                     int splits, int umax, bool pdl, bool packed) {
  const bool two = M > 16;
#define MJ_CASE(U)                                                                             \
  if (umax <= U)                                                                               \
    return two ? launch<2, U, Out>(stream, x, w, y, M, K, N, Pn, splits, umax, pdl, packed)    \
               : launch<1, U, Out>(stream, x, w, y, M, K, N, Pn, splits, umax, pdl, packed);
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
                          int64_t splits, int64_t ctas, bool pdl) {
  auto xd = x.dimensions(), wd = w.dimensions();
  // w: (K, N) row-major, or packed by CTA (N / 8, K, 8): skinny_gemm.py's pack, for this CTA count and split
  const bool packed = wd.size() == 3;
  if (xd.size() != 2 || (wd.size() != 2 && !(packed && wd[2] == 8)) || x.element_type() != ffi::BF16 ||
      w.element_type() != ffi::BF16)
    return ffi::Error::InvalidArgument("skinny_gemm: x (M, K) and w (K, N) or (N / 8, K, 8) must be bfloat16");
  const int M = (int)xd[0], K = (int)xd[1], N = packed ? (int)wd[0] * 8 : (int)wd[1];
  if ((packed ? wd[1] : wd[0]) != K || M < 1 || M > 32 || N % 8 || splits < 1 || K % splits || (K / splits) % 16)
    return ffi::Error::InvalidArgument("skinny_gemm: needs 1 ≤ M ≤ 32, N % 8 == 0 and (K / splits) % 16 == 0");
  const int U = N / 8;
  // Pn CTAs along N per K slice: one CTA per SM over all slices (the caller may ask for another count),
  // more where a CTA would own over 16 units (16 · 8 columns of accumulators per thread).
  const int total = ctas > 0 ? (int)ctas : sm_count();
  const int Pn = std::min(U, std::max(std::max(1, total / (int)splits), (U + 15) / 16));
  const int umax = (U + Pn - 1) / Pn;
  cudaError_t e;
  if (y->element_type() == ffi::F32) {
    e = dispatch<float>(stream, x.untyped_data(), w.untyped_data(), y->untyped_data(), M, K, N, Pn, (int)splits, umax, pdl, packed);
  } else if (y->element_type() == ffi::BF16 && splits == 1) {
    e = dispatch<__nv_bfloat16>(stream, x.untyped_data(), w.untyped_data(), y->untyped_data(), M, K, N, Pn, 1, umax, pdl, packed);
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
                                  .Attr<int64_t>("ctas")
                                  .Attr<bool>("pdl"),
                              {ffi::Traits::kCmdBufferCompatible});
