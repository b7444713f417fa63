// Lab (not a product benchmark): the 4-bit float-activation GEMV (intx_weight_only's decode kernel) of two copies of
// intx_linear.h in one process, with the int8-activation GEMV beside them, one thread, alternating every round:
//   hot    SmolLM2's 576x576 and 576x1536 linears, 200 times each (weights in L2: the compute rate)
//   sweep  SmolLM2's decode linears as qcompile runs them (siblings fused: 121 GEMVs, lm_head included; 84 MB
//          from DRAM)
// Prints each kernel's best time and the median (and quartiles) of the per-round ratio base / kernel, and each float
// GEMV's largest error against float64 relative to the largest output. Weights are 64-byte aligned, as torch's are.
//
// Build with the flags Inductor compiles the header with (torch 2.13: cpp_builder's optimization, fast-math and
// -march=native flags plus the ISA's): on this Zen 4, -march=native tunes for znver3, and kernel variants that ran
// faster under plain -O3 ran slower under these (BENCHMARKS.md, issue 24 session 16). The base is the header of a
// git revision; the variant is the working tree's (or an edited copy), renamed so both link:
//   mkdir -p /tmp/gemv_ab/base && git show HEAD:qcompile/kernels/cpu/intx_linear.h > /tmp/gemv_ab/base/intx_linear.h
//   sed 's/namespace qcompile_cpu/namespace qc_variant/; s/QCOMPILE_INTX_LINEAR_H/QC_VARIANT_H/' \
//       qcompile/kernels/cpu/intx_linear.h > /tmp/gemv_ab/variant.h
//   g++ -O3 -DNDEBUG -fno-trapping-math -funsafe-math-optimizations -ffinite-math-only -fno-signed-zeros \
//       -fno-finite-math-only -fno-unsafe-math-optimizations -fmath-errno -ffp-contract=off -fexcess-precision=fast \
//       -fno-tree-loop-vectorize -march=native -mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma -mavx512vnni \
//       -fopenmp -std=c++17 -I/tmp/gemv_ab/base -I/tmp/gemv_ab benchmarks/experiments/cpu_float_gemv_ab.cpp -o /tmp/gemv_ab/ab
//   /tmp/gemv_ab/ab [rounds=21]
#include "intx_linear.h"
#include "variant.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

struct Buffer {  // 64-byte aligned bytes
  uint8_t* p;
  explicit Buffer(size_t n) : p(static_cast<uint8_t*>(std::aligned_alloc(64, (n + 63) / 64 * 64))) {}
  ~Buffer() { std::free(p); }
};

struct Linear {
  int64_t N, K;
  Buffer packed, scale;  // packed rows interleaved in blocks of 4 (kernels/cpu/layout.py); float scales
  Linear(int64_t n, int64_t k) : N(n), K(k), packed(n * k / 2), scale(n * k / 32 * sizeof(float)) {}
  const float* scales() const { return reinterpret_cast<const float*>(scale.p); }
  int nibble(int64_t n, int64_t k) const {  // RowLayout<4>::at, read back
    const int64_t row_bytes = K / 2, first = n / 4 * 4, rows = std::min<int64_t>(4, N - first), b = k / 2;
    const int64_t c = b / 64 * 64;
    const uint8_t byte = packed.p[first * row_bytes + c * rows + (n - first) * std::min<int64_t>(64, row_bytes - c) + b - c];
    return k % 2 ? byte >> 4 : byte & 15;
  }
};

using Gemv = void (*)(const float*, const uint8_t*, const float*, const float*, float*, int64_t, int64_t, int64_t, int);

double seconds(Gemv f, const std::vector<Linear*>& linears, const float* x, float* y, int reps) {
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i)
    for (const Linear* l : linears) f(x, l->packed.p, l->scales(), nullptr, y, 1, l->N, l->K, 1);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double error_vs_float64(Gemv f, const Linear& l, const float* x, float* y) {
  f(x, l.packed.p, l.scales(), nullptr, y, 1, l.N, l.K, 1);
  double err = 0, top = 0;
  for (int64_t n = 0; n < l.N; ++n) {
    double acc = 0;
    for (int64_t k = 0; k < l.K; ++k) acc += (double)(l.nibble(n, k) - 8) * l.scales()[n * (l.K / 32) + k / 32] * x[k];
    err = std::max(err, std::fabs(acc - y[n])), top = std::max(top, std::fabs(acc));
  }
  return err / top;
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 21;
  const std::pair<const char*, Gemv> kernels[] = {
      {"float GEMV (base)", &qcompile_cpu::intx_linear_float<4, 32, float, float, float, float, 4>},
      {"float GEMV (variant)", &qc_variant::intx_linear_float<4, 32, float, float, float, float, 4>},
      {"int8 GEMV (base)", &qcompile_cpu::intx_linear_dynamic_int8<4, 32, float, float, float, float, 4>}};
  constexpr int V = 3;
  std::mt19937 rng(0);
  std::vector<Linear*> sweep, hot;
  for (int layer = 0; layer < 30; ++layer)
    for (auto [n, k] : {std::pair<int64_t, int64_t>{960, 576}, {576, 576}, {3072, 576}, {576, 1536}})
      sweep.push_back(new Linear(n, k));
  sweep.push_back(new Linear(49152, 576));
  hot = {new Linear(576, 576), new Linear(576, 1536)};
  for (auto* set : {&sweep, &hot})
    for (Linear* l : *set) {
      for (int64_t i = 0; i < l->N * l->K / 2; ++i) l->packed.p[i] = (uint8_t)rng();
      float* s = reinterpret_cast<float*>(l->scale.p);
      for (int64_t i = 0; i < l->N * l->K / 32; ++i) s[i] = 0.01f + (rng() % 100) * 1e-4f;
    }
  Buffer xb(1536 * sizeof(float)), yb(49152 * sizeof(float));
  float* x = reinterpret_cast<float*>(xb.p);
  float* y = reinterpret_cast<float*>(yb.p);
  for (int k = 0; k < 1536; ++k) x[k] = (rng() % 100000) * 1e-5f - 0.4f, x[k] *= rng() % 7 ? 1.f : 37.3f;  // outliers
  for (int v = 0; v < 2; ++v)
    std::printf("%s: error vs float64 %.2g (576x576), %.2g (576x1536)\n", kernels[v].first,
                error_vs_float64(kernels[v].second, *hot[0], x, y), error_vs_float64(kernels[v].second, *hot[1], x, y));
  std::vector<double> ratio[2][V], best[2];
  best[0].assign(V, 1e9), best[1].assign(V, 1e9);
  for (int r = 0; r < rounds; ++r) {
    double t[2][V];
    for (int i = 0; i < V; ++i) {
      const int v = r % 2 ? V - 1 - i : i;
      t[0][v] = seconds(kernels[v].second, hot, x, y, 200);
      t[1][v] = seconds(kernels[v].second, sweep, x, y, 1);
    }
    for (int h = 0; h < 2; ++h)
      for (int v = 0; v < V; ++v) ratio[h][v].push_back(t[h][0] / t[h][v]), best[h][v] = std::min(best[h][v], t[h][v]);
  }
  for (int v = 0; v < V; ++v) {
    std::printf("%-22s", kernels[v].first);
    for (int h = 0; h < 2; ++h) {
      auto& q = ratio[h][v];
      std::sort(q.begin(), q.end());
      std::printf(" | %s best %.2f ms, base/it %.3f (%.3f-%.3f)", h ? "sweep" : "hot", best[h][v] * 1e3,
                  q[q.size() / 2], q[q.size() / 4], q[3 * q.size() / 4]);
    }
    std::printf("\n");
  }
}
