// Probe: Mamba2-2.7B's decode layer at batch 32 in ONE persistent launch per token — its two projections, and
// in modes 12 and 13 the SSM state update between them — to measure whether a weight stream that never stops
// at kernel boundaries reaches the ≈ 2.5 TB/s that issue 5's batch-32 target asks of them (benchmarks/README.md,
// "Batch 32: what 2× mamba_ssm asks of the bytes": 2× mamba_ssm is ≈ 66 µs per layer; the state update already
// runs at ≈ 3.1 TB/s, 27.2 µs, so in_proj + out_proj + the small kernels must fit in ≈ 39 µs, where XLA's
// cuBLAS GEMMs take 25.7 + 15.0 on 83 and 40 CTAs).
//
// Files: this one is the host side (inputs, launches, timing, the float64 checks, the JSON lines);
// batch32_probe_kernel.cuh holds the device code (constants, Params, helpers and the kernel `probe`).
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
//     or ends, add their 32 × 16 partial sums to y (float32, two float2 atomic adds per lane and tile), so
//     K splits between CTAs cost nothing but the adds.
// Per layer: in_proj (2560 → 10,576, padded to 10,624) | grid barrier | convert (y's first 5120 columns → bf16
// A fragments of out_proj's x; zero the other y buffer) | barrier | out_proj (5120 → 2560) | barrier |
// convert (→ in_proj's x of the next layer) | barrier. In modes 0 and 11 the converts stand in for the SSM
// step and the residual + norm; mode 12 runs the state update in place of the first convert (the residual
// and norm are never computed).
// The consumers walk a slot's cells in runs within one group, four cells' fragments loaded before their 16
// products, even and odd cells in two sets of accumulators (the first version, at 0841341, loaded and
// multiplied one cell at a time after a 64-bit division for the cell's group: 4 HMMA in the whole kernel).
//
// Modes (--modes; numbered as in the measurements of results/, hence the gaps):
//   0  the above (checked);
//   2  the products and adds without barriers or converts (the projections' stream alone; x is stale, not
//      checked);
//   3  the ring alone (slots released unread);
//   6  mode 2 without the adds;
//   11 mode 0 whose consumers only arrive at the barrier after a convert (the x producer of the next projection
//      waits for every CTA's arrival; the consumers go on to the weights already in the ring) (checked);
//   12 mode 11 with a state phase in place of in_proj's convert — the SSM state update of the layer at batch 32
//      (state_phase: 42 MB of bf16 states read through the same ring and written back, y into out_proj's x),
//      i.e. a whole layer's bytes (checked: the output and every state written back, elementwise);
//   13 mode 12's state phases alone (a grid barrier before each, as after in_proj; no projections);
//   14 / 15 in_proj / out_proj alone, one plain launch per projection and layer (--pdl 1, the default:
//      programmatic dependent launches, the weights streaming while the launch before finishes): this design
//      as a standalone GEMM in the Engine's loop of separate kernels, ramp and tail included, against XLA's
//      cuBLAS GEMMs (25.7 / 15.0 µs per layer at batch 32); y zeroed in the kernel (mode 14 checked).
// Removed after their measurements (the code is at commit 21af4dc; asking for one now is an error): the
// diagnostic modes 1 (mode 0 without the products), 4 (the ring and the adds alone), 5 (plain stores instead
// of the adds), 7 and 8 (modes 2 and 0 with one float4 atomic add per lane and tile), 9 (no atomics: partial
// slots summed by the convert), 10 (mode 9 without grid barriers: per-group dataflow flags); --pf N (the
// weight producer prefetching slots beyond the ring into L2: slower in every mode) and --bulk-store 1 (mode
// 12's new states written back by one bulk copy per slot, the TMA: slower than the per-lane stores).
// --clock 1: one thread per role adds up where its cycles go (waiting for a free slot, for x, for the weights,
// in products and adds, in barriers and converts) and a "cycles" line gives the means over CTAs per layer.
// Correctness (--check 1): mode 14's product (float32, against float64: its zeroing and adds), and one layer
// of each checked mode named in --modes (0, 11, 12) against a float64
// host product of the same bf16 inputs, the intermediate rounded to bf16 as the kernel rounds it.
//
// Measured on H100 80GB HBM3 (benchmarks/README.md gives the numbers and what follows from them):
//   gpu_session s at e03e77e, modes 0–3, the first consumer loop: results/batch32_probe_h100.jsonl;
//   t at 0841341, modes 0–10, the first loop: results/batch32_probe_modes_h100.jsonl;
//   u at e88e7ca, the unrolled consumers (modes 0, 2, 3, 6, 8–10, cycles): results/batch32_probe_unrolled_h100.jsonl;
//   v at 31be137, modes 11, 12 and --pf: results/batch32_probe_state_h100.jsonl;
//   v at a56573b, mode 12 with its inputs copied into the slot: results/batch32_probe_state2_h100.jsonl;
//   w at 1428718, --bulk-store: results/batch32_probe_bulk_store_h100.jsonl;
//   x at 21af4dc, mode 13 and mode 12's elementwise state check: results/batch32_probe_state_alone_h100.jsonl.
// In short: mode 11 (both projections) 40.6–41.7 µs per layer, as XLA's two GEMMs (40.7); mode 12 (a whole
// layer) 77.8–80.5 against 73.6 for the Engine's separate kernels; mode 13 37.7 against XLA's state kernel's 27.2.
//
// Build and run (an H100; nvcc 12.4+):
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/b32 benchmarks/batch32_probe.cu
//   /tmp/b32 --layers 64 --tokens 10 --cps 8 --modes 0,11,12,13,2,6,3 --check 1 [--clock 1]
// One JSON line per mode (µs per layer, weight TB/s) and one per check, after a "run" line (device, CUDA
// versions, GIT_REVISION from the environment, the command line).
// Defaults: --modes 0,2,3 --layers 64 (even: the y buffers alternate by layer) --tokens 10 (timed launches,
// after one warm-up) --cps 8 (cells per slot) --check 1 --clock 0 --dims 2560,10576,5120 (d_model, in_proj's
// width, d_inner).
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

#include "batch32_probe_kernel.cuh"

#include "cuda_check.h"

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
  int L = 64, tokens = 10, cps = 8, check = 1, clock = 0, pdl = 1, D = 2560, NIN = 10576, DI = 5120;
  std::string modes = "0,2,3";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--layers")) L = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--tokens")) tokens = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--cps")) cps = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--modes")) modes = argv[i + 1];
    else if (!strcmp(argv[i], "--check")) check = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--clock")) clock = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--pdl")) pdl = atoi(argv[i + 1]);
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
  if (D % 128 || DI % 128 || DI > NIN || cps < 1) {
    fprintf(stderr, "want d_model and d_inner multiples of 128, d_inner <= in_proj's width, cps >= 1\n");
    return 2;
  }
  for (size_t a = 0; a <= modes.size();) {  // the kernel knows only these: a removed mode would run as another
    size_t b = modes.find(',', a);
    if (b == std::string::npos) b = modes.size();
    const std::string m = modes.substr(a, b - a);
    if (m != "0" && m != "2" && m != "3" && m != "6" && m != "11" && m != "12" && m != "13" && m != "14" &&
        m != "15") {
      fprintf(stderr, "--modes %s: mode '%s' is not one of 0, 2, 3, 6, 11-15 (modes 1, 4, 5, 7-10 were removed "
              "after their measurements: commit 21af4dc)\n", modes.c_str(), m.c_str());
      return 2;
    }
    a = b + 1;
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
    fflush(stdout);  // (piped: a run that hangs still says what it was)
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
  // modes 12, 13: every layer's states (32 rows × heads × 64 × 128, bf16), each a copy of layer 0's ~ U(-1, 1)
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
  p.state = sbuf;
  p.heads = heads;
  p.stages = stages;
  p.x_in = x_in;
  p.x_mid = x_mid;
  p.y_in[0] = ybuf;
  p.y_in[1] = ybuf + yin_n;
  p.y_out[0] = ybuf + 2 * yin_n;
  p.y_out[1] = ybuf + 2 * yin_n + yout_n;
  p.bar = bar;
  auto reset = [&]() {
    CK(cudaMemcpy(x_in, xf.data(), xf.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemset(ybuf, 0, (2 * yin_n + 2 * yout_n) * 4));
    CK(cudaMemset(bar, 0, 4));
    if (states) CK(cudaMemcpy(sbuf, S0.data(), st_n * 2, cudaMemcpyHostToDevice));  // (updated in place)
  };
  auto launch = [&](int layers, int mode, int epoch) {
    p.layers = layers;
    p.mode = mode;
    p.epoch = epoch;
    void* args[] = {&p};
    CK(cudaLaunchCooperativeKernel((const void*)probe, G, NT, args, smem, 0));
  };
  // Modes 14, 15: one projection of layer l per launch (a plain launch, with --pdl 1 programmatic dependent:
  // the kernel's CTAs begin as the launch before leaves its SMs); `count`: launches since reset, the barrier
  // counter's target (G arrivals each).
  unsigned count = 0;
  auto launch_proj = [&](int l, int mode) {
    Params q = p;
    q.w_in = p.w_in + (size_t)l * in_cells * (CELL_W / 16);
    q.w_out = p.w_out + (size_t)l * out_cells * (CELL_W / 16);
    q.layers = 1;
    q.mode = mode;
    q.epoch = (int)++count;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(G);
    cfg.blockDim = dim3(NT);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = pdl ? 1 : 0;
    CK(cudaLaunchKernelEx(&cfg, probe, q));
  };
  const double wbytes_all = (double)(in_b + out_b);
  // mode 14: layer 0's in_proj in one launch (y = x0 · W_in, float32, garbage in y first: the zeroing is checked)
  if (check && ("," + modes + ",").find(",14,") != std::string::npos) {
    reset();
    count = 0;
    CK(cudaMemset(ybuf, 0x7f, yin_n * 4));  // large finite floats: a missed zero shows
    launch_proj(0, 14);
    CK(cudaDeviceSynchronize());
    std::vector<float> y(yin_n);
    CK(cudaMemcpy(y.data(), ybuf, yin_n * 4, cudaMemcpyDeviceToHost));
    double err = 0, ss = 0;
    for (int r = 0; r < 32; ++r) {
      std::vector<double> acc(NIN, 0.0);
      for (int kk = 0; kk < D; ++kk) {
        const double xv = bf16_val(x0[(size_t)r * D + kk]);
        for (int n = 0; n < NIN; ++n) acc[n] += xv * bf16_val(Win[(size_t)kk * NIN + n]);
      }
      for (int n = 0; n < NIN; ++n) {
        err = std::max(err, std::fabs(y[(size_t)r * in_groups * 128 + n] - acc[n]));
        ss += acc[n] * acc[n];
      }
    }
    const double rel = err / std::sqrt(ss / (32.0 * NIN));
    const bool ok = rel < 1e-3 && std::isfinite(rel);  // float32 sums of the same bf16 products
    printf("{\"kind\": \"check\", \"mode\": 14, \"ok\": %s, \"max_abs_err\": %.4g, \"max_err_over_rms\": %.4g}\n",
           ok ? "true" : "false", err, rel);
    fflush(stdout);
  }
  // one layer of each checked mode in --modes against float64 products of the same bf16 inputs
  for (int cm : {0, 11, 12}) {
    if (!check || ("," + modes + ",").find("," + std::to_string(cm) + ",") == std::string::npos) continue;
    reset();
    launch(1, cm, 0);
    CK(cudaDeviceSynchronize());
    std::vector<uint16_t> got(xf.size());
    CK(cudaMemcpy(got.data(), x_in, got.size() * 2, cudaMemcpyDeviceToHost));  // layer 1's x, out_proj's output
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
           "\"max_err_over_rms\": %.4g, \"state_max_rel_err\": %.4g}\n", cm,
           ok ? "true" : "false", err, rms, rel, st_rel);
    fflush(stdout);
  }
  for (size_t a = 0; a < modes.size();) {
    size_t b = modes.find(',', a);
    const int mode = atoi(modes.substr(a, b == std::string::npos ? std::string::npos : b - a).c_str());
    reset();
    count = 0;
    const bool per_proj = mode >= 14;
    if (per_proj)
      for (int l = 0; l < L; ++l) launch_proj(l, mode);
    else
      launch(L, mode, 0);  // warm-up
    CK(cudaDeviceSynchronize());
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    if (clock) CK(cudaMemset(cycles, 0, (size_t)G * 8 * 8));
    CK(cudaEventRecord(e0));
    p.cycles = cycles;  // (the warm-up and the checks run without the clock reads)
    for (int t = 1; t <= tokens; ++t)
      if (per_proj)
        for (int l = 0; l < L; ++l) launch_proj(l, mode);
      else
        launch(L, mode, t);
    p.cycles = nullptr;
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    const double us = ms * 1e3 / ((double)tokens * L);
    const double sbytes = mode == 12 || mode == 13 ? 4.0 * st_n : 0.0;  // the states read and written
    const double wbytes = mode == 13 ? 0.0 : mode == 14 ? (double)in_b : mode == 15 ? (double)out_b : wbytes_all;
    printf("{\"kind\": \"batch32\", \"mode\": %d, \"layers\": %d, \"tokens\": %d, \"cps\": %d, \"stages\": %d, "
           "\"ctas\": %d, \"dims\": [%d, %d, %d], \"weight_mb_per_layer\": %.2f, \"us_per_layer\": %.3f, "
           "\"weight_tb_s\": %.3f, \"state_mb_per_layer\": %.2f, \"bytes_tb_s\": %.3f, \"clock\": %d, \"pdl\": %d}\n",
           mode, L, tokens, cps, stages, G, D, NIN, DI, wbytes / 1e6, us, wbytes / us / 1e6, sbytes / 1e6,
           (wbytes + sbytes) / us / 1e6, clock, mode >= 14 ? pdl : -1);
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
