// The CPU intx kernels (qcompile/kernels/cpu/intx_linear.h) alone on SmolLM2-135M's linear shapes: one decode token
// (M = 1, the 211 linears of a step, lm_head included, weights streamed from DRAM: 84 MB at 4 bits) or one 512-token
// prefill (M = 512, lm_head excluded as the model computes it for the last token only). Prints the best of `reps`
// sweeps. Build once per ISA with the flags Inductor passes (torch._inductor.cpu_vec_isa), e.g.
//   g++ -O3 -std=c++17 -fopenmp -mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma -mavx512vnni \
//       -DWEIGHT_BITS=4 -DENTRY_POINT=intx_linear_dynamic_int8 -Iqcompile/kernels/cpu benchmarks/cpu_intx_kernels.cpp -o vnni4
//   g++ -O3 -std=c++17 -fopenmp -mavx2 -mfma -mf16c ... -o avx2_4
//   OMP_WAIT_POLICY=PASSIVE ./vnni4 <M> <threads> <reps>
#include "intx_linear.h"

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

struct Linear {
  int64_t N, K;
  std::vector<uint8_t> packed;
  std::vector<float> scale;
};

int main(int argc, char** argv) {
  const int M = argc > 1 ? std::atoi(argv[1]) : 1, threads = argc > 2 ? std::atoi(argv[2]) : 1;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 20;
  const int64_t layer[7][2] = {{576, 576}, {192, 576}, {192, 576}, {576, 576}, {1536, 576}, {1536, 576}, {576, 1536}};
  std::vector<Linear> linears;
  for (int l = 0; l < 30; ++l)
    for (auto& s : layer) linears.push_back({s[0], s[1], {}, {}});
  if (M == 1) linears.push_back({49152, 576, {}, {}});  // lm_head
  std::mt19937 rng(0);
  double macs = 0, bytes = 0;
  for (auto& l : linears) {
    l.packed.resize(l.N * l.K * WEIGHT_BITS / 8);
    for (auto& b : l.packed) b = (uint8_t)rng();
    l.scale.resize(l.N * l.K / 32);
    for (auto& s : l.scale) s = 0.01f + (rng() % 100) * 1e-4f;
    macs += (double)M * l.N * l.K;
    bytes += l.packed.size() + l.scale.size() * sizeof(float);
  }
  std::vector<float> x((size_t)M * 1536), y((size_t)M * 49152);
  for (auto& v : x) v = (rng() % 1000) * 1e-3f - 0.4f;
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    for (auto& l : linears)
      qcompile_cpu::ENTRY_POINT<WEIGHT_BITS, 32, float, float, float, float>(x.data(), l.packed.data(), l.scale.data(),
                                                               static_cast<const float*>(nullptr), y.data(), M,
                                                               l.N, l.K, threads);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::printf("%s %d-bit M=%d threads=%d: %.2f ms per sweep, %.1f GMAC/s, weights at %.1f GB/s\n",
              qcompile_cpu::isa_name(), WEIGHT_BITS, M, threads, best * 1e3, macs / best / 1e9, bytes / best / 1e9);
}
