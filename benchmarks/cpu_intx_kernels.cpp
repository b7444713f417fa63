// The CPU intx kernels (qcompile/kernels/cpu/intx_linear.h) alone on SmolLM2-135M's linear shapes: one decode token
// (M = 1, the 211 linears of a step, lm_head included, weights streamed from DRAM: 84 MB at 4 bits) or one 512-token
// prefill (M = 512, lm_head excluded as the model computes it for the last token only). `fused` = 1 takes the shapes
// qcompile runs (sibling fusion: q/k/v one linear, gate/up one). For 4- and 8-bit weights, sweeps over the row-major
// layout (ROWS = 1) and the interleaved one the lowering picks (ROWS = 4, kernels/cpu/layout.py) alternate; prints
// the best of `reps` sweeps of each and the median of the per-round ratios. Build once per ISA with the flags
// Inductor passes (torch._inductor.cpu_vec_isa), e.g. (Inductor also passes -march=native and its fast-math set:
// on this Zen 4 that tunes for znver3, and kernel variants compared faster under the flags below but slower under
// Inductor's: compare variants with experiments/cpu_float_gemv_ab.cpp's full flag list)
//   g++ -O3 -std=c++17 -fopenmp -mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma -mavx512vnni \
//       -DWEIGHT_BITS=4 -DENTRY_POINT=intx_linear_dynamic_int8 -Iqcompile/kernels/cpu benchmarks/cpu_intx_kernels.cpp -o vnni4
//   g++ -O3 -std=c++17 -fopenmp -mavx2 -mfma -mf16c ... -o avx2_4
//   OMP_WAIT_POLICY=PASSIVE ./vnni4 <M> <threads> <reps> <fused>
#include "intx_linear.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

#ifndef WEIGHT_BITS
#define WEIGHT_BITS 4
#endif
#ifndef ENTRY_POINT
#define ENTRY_POINT intx_linear_dynamic_int8
#endif

constexpr int INTERLEAVED = WEIGHT_BITS == 4 || WEIGHT_BITS == 8 ? 4 : 1;

struct Linear {
  int64_t N, K;
  std::vector<uint8_t> packed, interleaved;
  std::vector<float> scale;
};

// kernels/cpu/layout.py's interleave_rows: blocks of 4 rows (the last: what is left), 64-byte chunks of each in turn
std::vector<uint8_t> interleave_rows(const std::vector<uint8_t>& rows, int64_t N, int64_t row_bytes) {
  std::vector<uint8_t> out;
  out.reserve(rows.size());
  for (int64_t first = 0; first < N; first += 4)
    for (int64_t c = 0; c < row_bytes; c += 64)
      for (int64_t n = first; n < std::min<int64_t>(first + 4, N); ++n)
        out.insert(out.end(), rows.begin() + n * row_bytes + c, rows.begin() + n * row_bytes + std::min(c + 64, row_bytes));
  return out;
}

template <int ROWS>
void sweep(std::vector<Linear>& linears, const float* x, float* y, int M, int threads) {
  for (auto& l : linears)
    qcompile_cpu::ENTRY_POINT<WEIGHT_BITS, 32, float, float, float, float, ROWS>(
        x, (ROWS == 1 ? l.packed : l.interleaved).data(), l.scale.data(), static_cast<const float*>(nullptr), y, M,
        l.N, l.K, threads);
}

int main(int argc, char** argv) {
  const int M = argc > 1 ? std::atoi(argv[1]) : 1, threads = argc > 2 ? std::atoi(argv[2]) : 1;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 20;
  const bool fused = argc > 4 && std::atoi(argv[4]);
  std::vector<std::pair<int64_t, int64_t>> layer = {{576, 576}, {192, 576}, {192, 576}, {576, 576}, {1536, 576},
                                                    {1536, 576}, {576, 1536}};
  if (fused) layer = {{960, 576}, {576, 576}, {3072, 576}, {576, 1536}};
  std::vector<Linear> linears;
  for (int l = 0; l < 30; ++l)
    for (auto& s : layer) linears.push_back({s.first, s.second, {}, {}, {}});
  if (M == 1) linears.push_back({49152, 576, {}, {}, {}});  // lm_head
  std::mt19937 rng(0);
  double macs = 0, bytes = 0;
  for (auto& l : linears) {
    l.packed.resize(l.N * l.K * WEIGHT_BITS / 8);
    for (auto& b : l.packed) b = (uint8_t)rng();
    l.interleaved = interleave_rows(l.packed, l.N, l.K * WEIGHT_BITS / 8);
    l.scale.resize(l.N * l.K / 32);
    for (auto& s : l.scale) s = 0.01f + (rng() % 100) * 1e-4f;
    macs += (double)M * l.N * l.K;
    bytes += l.packed.size() + l.scale.size() * sizeof(float);
  }
  std::vector<float> x((size_t)M * 1536), y((size_t)M * 49152);
  for (auto& v : x) v = (rng() % 1000) * 1e-3f - 0.4f;
  double best[2] = {1e30, 1e30};
  std::vector<double> ratios;
  for (int r = 0; r < reps; ++r) {
    double t[2];
    for (int v = 0; v < (INTERLEAVED > 1 ? 2 : 1); ++v) {
      const auto start = std::chrono::steady_clock::now();
      if (v == 0) sweep<1>(linears, x.data(), y.data(), M, threads);
      else sweep<INTERLEAVED>(linears, x.data(), y.data(), M, threads);
      t[v] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      best[v] = std::min(best[v], t[v]);
    }
    ratios.push_back(t[0] / t[1]);
  }
  std::sort(ratios.begin(), ratios.end());
  for (int v = 0; v < (INTERLEAVED > 1 ? 2 : 1); ++v)
    std::printf("%s %d-bit %s M=%d threads=%d rows=%d: %.2f ms per sweep, %.1f GMAC/s, weights at %.1f GB/s\n",
                qcompile_cpu::isa_name(), WEIGHT_BITS, fused ? "fused" : "separate", M, threads,
                v == 0 ? 1 : INTERLEAVED, best[v] * 1e3, macs / best[v] / 1e9, bytes / best[v] / 1e9);
  if (INTERLEAVED > 1)
    std::printf("  row-major / interleaved time, per round: median %.3f (min %.3f, max %.3f, %d rounds)\n",
                ratios[ratios.size() / 2], ratios.front(), ratios.back(), reps);
}
