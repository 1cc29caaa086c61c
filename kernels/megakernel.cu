// The Mamba2 decode megakernel (kernels/megakernel.cuh, modes 5 and 10 of benchmarks/megakernel_probe.cu: phases
// chained by tagged data, the step's inputs streamed through the ring, L2 prefetch 2 slots ahead; mode 10 with
// the steps inside in_proj's stream and out_proj by chunks of heads; the `mode` attribute) as an XLA FFI call:
// one cooperative launch decodes one token through every layer of a pure Mamba2 model at batch 1, built once
// per model size (-DMK_D=d_model -DMK_H=heads; Mamba2-2.7B's by default). mamba_jax/inference/megakernel.py
// packs the arguments and checks the dimensions; built with nvcc on first use (kernels/cuda_build.py).
//
// Arguments: the packed layers (win, wout, conv_w, conv_b, a_log, d_skip, dt_bias; with -DMK_FP8=1 win and wout
// float8 e4m3 and their row scales win_scale (L, NIN), wout_scale (L, D) float32 after dt_bias), the token's position
// (int32 scalar), then the conv ring, the SSM states, the residual h (float32, D: the token's embedding in,
// the residual after the last layer out) and the workspace (uint32 words: the tagged buffers and the epoch
// counter; zeros before the first call, then carried from call to call), each updated in place (the results
// alias them).
//
// MambaJaxMegakernel is not marked command-buffer compatible: each token is one host launch, and XLA drives a
// decode loop around it from the host. MambaJaxMegakernelGraph (experimental, not yet run on a GPU) is: its
// launch is a cooperative kernel launch attribute, which CUDA graphs can hold, and every value that changes
// from token to token (position, epoch) is read from device memory, so a captured launch replays.

#include <string>

#include "megakernel.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int MK_SLOT = 40960, MK_STAGES = 5, MK_PF = 2;
// The workspace: zx_ll [NIN], g_ll [DI / 2], gss_ll [H], h_ll [D] (8-byte tagged words), then the epoch and
// the finished-CTA counter (two 4-byte words).
constexpr size_t WORK_WORDS32 = 2 * ((size_t)NIN + DI / 2 + H + D) + 2;

ffi::Error check(ffi::AnyBuffer b, std::initializer_list<int64_t> dims, ffi::DataType t, const char* name,
                 int64_t layers) {
  auto d = b.dimensions();
  bool ok = b.element_type() == t && d.size() == dims.size();
  size_t i = 0;
  for (int64_t v : dims) {
    ok = ok && d[i] == (v < 0 ? layers : v);
    ++i;
  }
  if (!ok) return ffi::Error::InvalidArgument(std::string("megakernel: ") + name + " has the wrong shape or type");
  return ffi::Error::Success();
}

}  // namespace

// head / logits: the LM head phase (MambaJaxMegakernelHead), or null.
ffi::Error Launch(cudaStream_t stream, ffi::AnyBuffer win, ffi::AnyBuffer wout, ffi::AnyBuffer conv_w,
                  ffi::AnyBuffer conv_b, ffi::AnyBuffer a_log, ffi::AnyBuffer d_skip, ffi::AnyBuffer dt_bias,
                  const ffi::AnyBuffer* win_scale, const ffi::AnyBuffer* wout_scale, ffi::AnyBuffer pos,
                  ffi::Result<ffi::AnyBuffer> ring, ffi::Result<ffi::AnyBuffer> state,
                  ffi::Result<ffi::AnyBuffer> h, ffi::Result<ffi::AnyBuffer> work, int32_t mode, int32_t slack,
                  const ffi::AnyBuffer* head, ffi::Result<ffi::AnyBuffer>* logits, bool graph) {
  if (mode != 5 && mode != 10) return ffi::Error::InvalidArgument("megakernel: mode must be 5 or 10");
  if (head && mode != 5) return ffi::Error::InvalidArgument("megakernel: the LM head phase needs mode 5");
  if (mode == 10 && !kMeasuredBuild)
    return ffi::Error::InvalidArgument("megakernel: mode 10 is built for Mamba2-2.7B's dimensions and bf16 only");
  if (win.dimensions().size() != 3) return ffi::Error::InvalidArgument("megakernel: win must be (L, NIN, D)");
  const int64_t L = win.dimensions()[0];
  const ffi::DataType B = ffi::DataType::BF16, F = ffi::DataType::F32;
  const ffi::DataType WT = MK_FP8 ? ffi::DataType::F8E4M3FN : B;  // the projections' weights
  if (MK_FP8 && !(win_scale && wout_scale))
    return ffi::Error::InvalidArgument("megakernel: the float8 build needs the row scales");
  if (MK_FP8)
    for (auto e : {check(*win_scale, {-1, NIN}, F, "win_scale", L), check(*wout_scale, {-1, D}, F, "wout_scale", L)})
      if (e.failure()) return e;
  for (auto e : {check(win, {-1, NIN, D}, WT, "win", L), check(wout, {-1, D, DI}, WT, "wout", L),
                 check(conv_w, {-1, CX, KW}, F, "conv_w", L), check(conv_b, {-1, CX}, F, "conv_b", L),
                 check(a_log, {-1, H}, F, "a_log", L), check(d_skip, {-1, H}, F, "d_skip", L),
                 check(dt_bias, {-1, H}, F, "dt_bias", L), check(pos, {}, ffi::DataType::S32, "pos", L),
                 check(*ring, {-1, CX, KW}, B, "ring", L), check(*state, {-1, H, P, NS}, B, "state", L),
                 check(*h, {D}, F, "h", L), check(*work, {(int64_t)WORK_WORDS32}, ffi::DataType::U32, "work", L)})
    if (e.failure()) return e;
  // The device's properties and the kernels' shared-memory attribute, once per device: this runs on the host
  // before every token's launch, and in a decode loop the GPU may be waiting for it.
  constexpr int MAX_DEV = 64;
  static int sms[MAX_DEV], optins[MAX_DEV];
  static bool ready[MAX_DEV][2];
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= MAX_DEV) return ffi::Error::Internal("megakernel: device ordinal out of range");
  if (!sms[dev]) {
    cudaDeviceGetAttribute(&optins[dev], cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaDeviceGetAttribute(&sms[dev], cudaDevAttrMultiProcessorCount, dev);
  }
  const int G = sms[dev], optin = optins[dev];
  const size_t smem = megakernel_smem_bytes(MK_SLOT, MK_STAGES);
  if (G < H || (D + G - 1) / G > MAX_OWN || (size_t)optin < smem)
    return ffi::Error::Internal("megakernel: needs >= " + std::to_string(H) + " SMs of <= " +
                                std::to_string(MAX_OWN) + " residual rows each and " + std::to_string(smem) +
                                " bytes of shared memory per block");

  Params p{};
  p.win = static_cast<const wt*>(win.untyped_data());
  p.wout = static_cast<const wt*>(wout.untyped_data());
#if MK_FP8
  p.win_scale = static_cast<const float*>(win_scale->untyped_data());
  p.wout_scale = static_cast<const float*>(wout_scale->untyped_data());
#endif
  p.conv_w = static_cast<const float*>(conv_w.untyped_data());
  p.conv_b = static_cast<const float*>(conv_b.untyped_data());
  p.a_log = static_cast<const float*>(a_log.untyped_data());
  p.dskip = static_cast<const float*>(d_skip.untyped_data());
  p.dt_bias = static_cast<const float*>(dt_bias.untyped_data());
  p.ring = static_cast<bf16*>(ring->untyped_data());
  p.state = static_cast<bf16*>(state->untyped_data());
  p.h = static_cast<float*>(h->untyped_data());
  auto* w = static_cast<unsigned long long*>(work->untyped_data());
  p.zx_ll = w;
  p.g_ll = p.zx_ll + NIN;
  p.gss_ll = p.g_ll + DI / 2;
  p.h_ll = p.gss_ll + H;
  p.epoch_dev = reinterpret_cast<unsigned*>(p.h_ll + D);
  p.done_dev = p.epoch_dev + 1;
  p.pos_dev = static_cast<const int*>(pos.untyped_data());
  if (head) {
    const auto hd = head->dimensions();
    if (head->element_type() != B || hd.size() != 2 || hd[1] != D || (*logits)->element_type() != F ||
        (*logits)->dimensions().size() != 1 || (*logits)->dimensions()[0] != hd[0])
      return ffi::Error::InvalidArgument("megakernel: head must be (V, D) bf16 and logits (V,) float32");
    p.head = static_cast<const bf16*>(head->untyped_data());
    p.logits = static_cast<float*>((*logits)->untyped_data());
    p.vocab = (int)hd[0];
  }
  p.layers = (int)L;
  p.mode = mode;
  p.slack = slack;
  p.slot = MK_SLOT;
  p.stages = MK_STAGES;
  p.pf = MK_PF;
#if MK_FP8
  const void* fn = (const void*)megakernel<5>;
#else
  const void* fn = mode == 10 ? (const void*)megakernel<10> : (const void*)megakernel<5>;
#endif
  cudaError_t e = cudaSuccess;
  if (!ready[dev][mode == 10]) {
    e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    ready[dev][mode == 10] = e == cudaSuccess;
  }
  if (e == cudaSuccess) {
    void* args[] = {&p};
    if (graph) {  // capturable into XLA's command buffers: the cooperative launch as a launch attribute
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(G);
      cfg.blockDim = dim3(THREADS);
      cfg.dynamicSmemBytes = smem;
      cfg.stream = stream;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeCooperative;
      attr[0].val.cooperative = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      e = cudaLaunchKernelExC(&cfg, fn, args);
    } else {
      e = cudaLaunchCooperativeKernel(fn, G, THREADS, args, smem, stream);
    }
  }
  if (e != cudaSuccess) return ffi::Error::Internal(std::string("megakernel: ") + cudaGetErrorString(e));
  return ffi::Error::Success();
}

// The float8 build takes the two row-scale arguments after dt_bias (MK_SCALES / MK_SCALE_PTRS); the bf16
// build's signature is unchanged.
#if MK_FP8
#define MK_SCALES ffi::AnyBuffer win_scale, ffi::AnyBuffer wout_scale,
#define MK_SCALE_PTRS &win_scale, &wout_scale
#define MK_SCALE_ARGS .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
#else
#define MK_SCALES
#define MK_SCALE_PTRS nullptr, nullptr
#define MK_SCALE_ARGS
#endif

template <bool GRAPH>
ffi::Error MegakernelImpl(cudaStream_t stream, ffi::AnyBuffer win, ffi::AnyBuffer wout, ffi::AnyBuffer conv_w,
                          ffi::AnyBuffer conv_b, ffi::AnyBuffer a_log, ffi::AnyBuffer d_skip, ffi::AnyBuffer dt_bias,
                          MK_SCALES ffi::AnyBuffer pos, ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer,
                          ffi::Result<ffi::AnyBuffer> ring, ffi::Result<ffi::AnyBuffer> state,
                          ffi::Result<ffi::AnyBuffer> h, ffi::Result<ffi::AnyBuffer> work, int32_t mode,
                          int32_t slack) {
  return Launch(stream, win, wout, conv_w, conv_b, a_log, d_skip, dt_bias, MK_SCALE_PTRS, pos, ring, state, h, work,
                mode, slack, nullptr, nullptr, GRAPH);
}

template <bool GRAPH>
ffi::Error MegakernelHeadImpl(cudaStream_t stream, ffi::AnyBuffer win, ffi::AnyBuffer wout, ffi::AnyBuffer conv_w,
                              ffi::AnyBuffer conv_b, ffi::AnyBuffer a_log, ffi::AnyBuffer d_skip,
                              ffi::AnyBuffer dt_bias, MK_SCALES ffi::AnyBuffer pos, ffi::AnyBuffer, ffi::AnyBuffer,
                              ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer head, ffi::Result<ffi::AnyBuffer> ring,
                              ffi::Result<ffi::AnyBuffer> state, ffi::Result<ffi::AnyBuffer> h,
                              ffi::Result<ffi::AnyBuffer> work, ffi::Result<ffi::AnyBuffer> logits, int32_t mode,
                              int32_t slack) {
  return Launch(stream, win, wout, conv_w, conv_b, a_log, d_skip, dt_bias, MK_SCALE_PTRS, pos, ring, state, h, work,
                mode, slack, &head, &logits, GRAPH);
}

// The inputs ring, state, h and work alias the results of the same names (updated in place). The *Graph
// symbols are the same handlers marked command-buffer compatible (the launch captured once and replayed: the
// kernel reads the position and the epoch from device memory); the others keep XLA's loop on the host.
#define MK_BIND                                                                                       \
  ffi::Ffi::Bind()                                                                                    \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                                                       \
      .Arg<ffi::AnyBuffer>() /* win */                                                                \
      .Arg<ffi::AnyBuffer>() /* wout */                                                               \
      .Arg<ffi::AnyBuffer>() /* conv_w */                                                             \
      .Arg<ffi::AnyBuffer>() /* conv_b */                                                             \
      .Arg<ffi::AnyBuffer>() /* a_log */                                                              \
      .Arg<ffi::AnyBuffer>() /* d_skip */                                                             \
      .Arg<ffi::AnyBuffer>() /* dt_bias */ MK_SCALE_ARGS                                              \
      .Arg<ffi::AnyBuffer>() /* pos */                                                                \
      .Arg<ffi::AnyBuffer>() /* ring */                                                               \
      .Arg<ffi::AnyBuffer>() /* state */                                                              \
      .Arg<ffi::AnyBuffer>() /* h */                                                                  \
      .Arg<ffi::AnyBuffer>() /* work */
#define MK_RETS                                                                                       \
  .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
#define MK_ATTRS .Attr<int32_t>("mode").Attr<int32_t>("slack")

XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaJaxMegakernel, MegakernelImpl<false>, MK_BIND MK_RETS MK_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaJaxMegakernelGraph, MegakernelImpl<true>, MK_BIND MK_RETS MK_ATTRS,
                              {ffi::Traits::kCmdBufferCompatible});
// With the LM head as the kernel's last phase: one more argument (head, after work) and result (logits).
XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaJaxMegakernelHead, MegakernelHeadImpl<false>,
                              MK_BIND.Arg<ffi::AnyBuffer>() MK_RETS.Ret<ffi::AnyBuffer>() MK_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaJaxMegakernelHeadGraph, MegakernelHeadImpl<true>,
                              MK_BIND.Arg<ffi::AnyBuffer>() MK_RETS.Ret<ffi::AnyBuffer>() MK_ATTRS,
                              {ffi::Traits::kCmdBufferCompatible});
