// Standalone check of qcompile/kernels/cpu/intx_linear.h against a float64 reference, for every bit width,
// GEMV and GEMM shapes. Built natively and cross-compiled for aarch64 (run under qemu) by test_arm_qemu.py.
// Prints "isa <name>" then "<passed> passed, <failed> failed"; exits non-zero on any failure.
#include "intx_linear.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

namespace {

// The bit-plane packing of qcompile/quant/packing.py, written independently of the kernel's unpacker.
std::vector<uint8_t> pack_rows(const std::vector<int>& u, int64_t N, int64_t K, int bits) {
  std::vector<uint8_t> out(N * K * bits / 8, 0);
  for (int64_t n = 0; n < N; ++n) {
    int64_t col = 0;  // bytes before this plane, per row
    for (int w : {8, 4, 2, 1}) {
      if (!(bits & w)) continue;
      const int lo = bits & (w - 1), per_byte = 8 / w;
      for (int64_t k = 0; k < K; ++k) {
        const int v = (u[n * K + k] >> lo) & ((1 << w) - 1);
        out[n * K * bits / 8 + col + k / per_byte] |= (uint8_t)(v << ((k % per_byte) * w));
      }
      col += K * w / 8;
    }
  }
  return out;
}

// The 4-row interleaved layout (qcompile/kernels/cpu/layout.py), written independently of the kernel's RowLayout:
// rows in blocks of 4 (the last one: what is left), each block's rows interleaved by 64-byte chunks.
std::vector<uint8_t> interleave_rows(const std::vector<uint8_t>& rows, int64_t N, int64_t row_bytes) {
  std::vector<uint8_t> out;
  out.reserve(rows.size());
  for (int64_t first = 0; first < N; first += 4)
    for (int64_t c = 0; c < row_bytes; c += 64)
      for (int64_t n = first; n < std::min<int64_t>(first + 4, N); ++n)
        for (int64_t b = c; b < std::min<int64_t>(c + 64, row_bytes); ++b) out.push_back(rows[n * row_bytes + b]);
  return out;
}

struct Case {
  int64_t M, N, K;
};

int passed = 0, failed = 0;

void report(const char* what, int bits, int group, const Case& c, double err, double tol, int rows = 1) {
  if (err <= tol) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAIL %s bits=%d group=%d rows=%d M=%lld N=%lld K=%lld rel_err=%.3g (tol %.3g)\n", what, bits, group,
                rows, (long long)c.M, (long long)c.N, (long long)c.K, err, tol);
  }
}

// ROWS: the rows' layout the kernel reads (1: row-major, 4: interleave_rows)
template <int BITS, int GROUP, int ROWS>
void check(const Case& c, std::mt19937& rng) {
  const int64_t M = c.M, N = c.N, K = (c.K + GROUP - 1) / GROUP * GROUP, G = K / GROUP;
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_int_distribution<int> uval(0, (1 << BITS) - 1);
  std::uniform_real_distribution<float> uscale(0.01f, 0.1f);
  std::vector<float> x(M * K), scale(N * G), bias(N), y(M * N);
  std::vector<int> u(N * K);
  for (auto& v : x) v = normal(rng) + 0.3f;  // skewed so the zero point is not trivial
  for (auto& v : u) v = uval(rng);
  for (auto& v : scale) v = uscale(rng);
  for (auto& v : bias) v = normal(rng);
  const std::vector<uint8_t> row_major = pack_rows(u, N, K, BITS);
  const std::vector<uint8_t> packed = ROWS == 1 ? row_major : interleave_rows(row_major, N, K * BITS / 8);
  const int mid = 1 << (BITS - 1);

  // dynamic int8: the reference quantizes the same way in float, then sums exactly in 64-bit / double
  qcompile_cpu::intx_linear_dynamic_int8<BITS, GROUP, float, float, float, float, ROWS>(
      x.data(), packed.data(), scale.data(), bias.data(), y.data(), M, N, K, 2);
  double max_err = 0, max_ref = 0;
  for (int64_t m = 0; m < M; ++m) {
    float mn = 0.f, mx = 0.f;
    for (int64_t k = 0; k < K; ++k) mn = std::min(mn, x[m * K + k]), mx = std::max(mx, x[m * K + k]);
    const float s = std::max((mx - mn) / 255.0f, FLT_EPSILON);
    const float z = std::min(std::max(-128.0f - std::nearbyint(mn / s), -128.0f), 127.0f);
    const float inv = 1.0f / s;
    std::vector<int> q(K);
    for (int64_t k = 0; k < K; ++k) q[k] = (int)std::min(std::max(std::nearbyint(x[m * K + k] * inv) + z, -128.f), 127.f);
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t g = 0; g < G; ++g) {
        int64_t dot = 0;
        for (int64_t k = g * GROUP; k < (g + 1) * GROUP; ++k) dot += (int64_t)(q[k] - (int)z) * (u[n * K + k] - mid);
        acc += (double)scale[n * G + g] * (double)dot;
      }
      const double ref = acc * s + bias[n];
      max_err = std::max(max_err, std::fabs(ref - y[m * N + n]));
      max_ref = std::max(max_ref, std::fabs(ref));
    }
  }
  report("dynamic_int8", BITS, GROUP, c, max_err / max_ref, 2e-6, ROWS);

  qcompile_cpu::intx_linear_float<BITS, GROUP, float, float, float, float, ROWS>(
      x.data(), packed.data(), scale.data(), bias.data(), y.data(), M, N, K, 2);
  max_err = 0, max_ref = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = bias[n];
      for (int64_t k = 0; k < K; ++k) acc += (double)x[m * K + k] * (u[n * K + k] - mid) * scale[n * G + k / GROUP];
      max_err = std::max(max_err, std::fabs(acc - y[m * N + n]));
      max_ref = std::max(max_ref, std::fabs(acc));
    }
  // the 4-bit GEMV on AVX512_BF16 carries a float token as two bf16 terms: each product within 2^-17 of float's (the
  // digits GEMV's token is within 2^-22 of its lane class's largest value: the float bound holds)
  bool bf16_pair = false;
#if defined(QC_X86_VNNI)
  bf16_pair = M < qcompile_cpu::QC_GEMM_MIN_M && std::strcmp(qcompile_cpu::float_gemv_name(BITS), "bf16_pair") == 0;
#endif
  report("float", BITS, GROUP, c, max_err / max_ref, bf16_pair ? 1.5e-5 : 2e-6, ROWS);
}

// An infinite activation gives the float products: +-inf where the weight is non-zero, NaN where it is 0 (inf * 0),
// finite outputs nowhere; a NaN activation gives NaN everywhere. (Splitting x into terms must not make inf - inf.)
void check_nonfinite(std::mt19937& rng) {
  constexpr int BITS = 4, GROUP = 32;
  const int64_t N = 37, K = 256;
  std::uniform_int_distribution<int> uval(0, 15);
  std::vector<int> u(N * K);
  for (auto& v : u) v = uval(rng);
  for (int64_t n = 0; n < N; n += 3) u[n * K + 5] = 8;  // w = 0 at the infinite activation: NaN
  const std::vector<uint8_t> packed = pack_rows(u, N, K, BITS);
  std::vector<float> x(K, 0.25f), scale(N * K / GROUP, 0.05f), y(N);
  x[5] = INFINITY;
  qcompile_cpu::intx_linear_float<BITS, GROUP, float, float, float, float>(x.data(), packed.data(), scale.data(),
                                                                           nullptr, y.data(), 1, N, K, 1);
  bool ok = true;
  for (int64_t n = 0; n < N; ++n) {
    const int w = u[n * K + 5] - 8;
    ok &= w == 0 ? std::isnan(y[n]) : (std::isinf(y[n]) && (y[n] > 0) == (w > 0));
  }
  x[7] = NAN;
  qcompile_cpu::intx_linear_float<BITS, GROUP, float, float, float, float>(x.data(), packed.data(), scale.data(),
                                                                           nullptr, y.data(), 1, N, K, 1);
  for (int64_t n = 0; n < N; ++n) ok &= std::isnan(y[n]);
  report("float_nonfinite", BITS, GROUP, Case{1, N, K}, ok ? 0.0 : 1.0, 0.0);
}

template <int BITS>
void check_bits(std::mt19937& rng) {
  // M = 1 and 3 take the GEMV, 4 and 9 the GEMM (9: a token tail); N = 37 leaves a row-block tail (and an
  // interleaved block of 1 row), 39 one of 3 rows; K = 352 (384 with groups of 128) leaves a partial 128-value chunk
  // (and a partial 64-byte chunk of an interleaved row), 320 and 288 (groups of 32) a last chunk of 64 and 32
  // values (the digits GEMV takes those on 256-bit vectors); the 16400 and 401 rows are big enough
  // (>= QC_PARALLEL_MIN_MACS) to run multi-threaded where OpenMP is on
  for (Case c : {Case{1, 37, 256}, Case{3, 37, 256}, Case{4, 37, 256}, Case{9, 37, 256}, Case{2, 37, 352},
                 Case{6, 37, 352}, Case{1, 39, 352}, Case{5, 39, 352}, Case{1, 33, 320}, Case{3, 37, 288},
                 Case{1, 16400, 256}, Case{41, 401, 256}}) {
    check<BITS, 32, 1>(c, rng);
    check<BITS, 128, 1>(c, rng);
    if constexpr (BITS == 4 || BITS == 8) {  // the interleaved rows too
      check<BITS, 32, 4>(c, rng);
      check<BITS, 128, 4>(c, rng);
    }
  }
}

}  // namespace

int main() {
  std::printf("isa %s\n", qcompile_cpu::isa_name());
#if defined(QC_X86_VNNI)
  std::printf("float_gemv %s\n", qcompile_cpu::float_gemv_name(4));
#endif
  std::mt19937 rng(0);
  check_bits<1>(rng);
  check_bits<2>(rng);
  check_bits<3>(rng);
  check_bits<4>(rng);
  check_bits<5>(rng);
  check_bits<6>(rng);
  check_bits<7>(rng);
  check_bits<8>(rng);
  check_nonfinite(rng);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
