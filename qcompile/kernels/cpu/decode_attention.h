// qcompile CPU decode attention: out = softmax(scale * q k^T + mask) v for a few query rows against a KV cache.
// Inductor pastes this file into its output code (qcompile/kernels/cpu/inductor_template.py) in place of ATen's CPU
// flash attention where the query has at most a handful of rows (a decode step, or its grouped-query form): there
// ATen's op costs ~30 us a call in setup and dispatch for ~2 us of arithmetic (SmolLM2: 30 calls a step).
// Self-contained C++17, float32, one thread (decode graphs run on one intra-op thread).
// Layouts (contiguous): q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D] (query head h reads kv head h / (Hq / Hkv), as
// grouped-query flash attention does); mask [MB, MH, Lq, Lk] additive (MB in {1, B}, MH in {1, Hq}) or null;
// out [B, Lq, Hq, D] (flash attention's output layout, seen as [B, Hq, Lq, D]).
// Numerics: scores and the softmax in float32 as the reference (qcompile/kernels/cpu/ops.py) computes them: two
// passes (max, then exp and sum), a fully masked row gives NaN as softmax does.
#ifndef QCOMPILE_DECODE_ATTENTION_H
#define QCOMPILE_DECODE_ATTENTION_H

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace qcompile_cpu {

#if defined(__AVX512F__)
// e^x, 16 lanes: Cephes' expf polynomial on x - n ln2 (|error| ~1 ulp), times 2^n by vscalefps; e^x below
// FLT_MIN (and e^-inf) is 0, NaN stays NaN.
inline __m512 exp16(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_set1_ps(88.7f), x);  // (vminps returns its second operand, x, when x is NaN)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(y, n));
}
#endif

constexpr int QC_ATTN_ROWS = 4;  // query rows sharing each key / value row load (the rows of one kv head)

#if defined(__AVX512F__)
// {sum(a), sum(b), sum(c), sum(d)}: four horizontal sums sharing their last shuffles (one vector sum each costs
// about as much as the four FMAs of a 64-wide dot)
inline __m128 fold128(__m512 a) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  return _mm_hadd_ps(_mm_hadd_ps(fold128(a), fold128(b)), _mm_hadd_ps(fold128(c), fold128(d)));
}
#endif

// s[r * stride + j] = scale * q_r . k_j + m_r[j] for `rows` query rows (q_r: q[r]) and keys j < n
template <int rows>  // a constant, so the accumulators stay in registers
inline void attention_scores(const float* const* q, const float* k, int64_t n, int64_t D, float scale,
                             const float* const* m, float* s, int64_t stride) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    for (; j + 4 <= n; j += 4) {  // four keys at a time: their sums share shuffles
      __m512 acc[rows][4];
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16)
        for (int c = 0; c < 4; ++c) {
          const __m512 kv = _mm512_loadu_ps(k + (j + c) * D + d);
          for (int r = 0; r < rows; ++r) acc[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(q[r] + d), kv, acc[r][c]);
        }
      for (int r = 0; r < rows; ++r) {
        __m128 v = _mm_mul_ps(sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]), _mm_set1_ps(scale));
        if (m[r]) v = _mm_add_ps(v, _mm_loadu_ps(m[r] + j));
        _mm_storeu_ps(s + r * stride + j, v);
      }
    }
  }
#endif
  for (; j < n; ++j)
    for (int r = 0; r < rows; ++r) {
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += q[r][d] * k[j * D + d];
      s[r * stride + j] = acc * scale + (m[r] ? m[r][j] : 0.f);
    }
}

// p[0, n) = e^(p - top) where top is p's maximum (NaN if p holds one: softmax is NaN throughout then); returns the sum
inline float exp_shifted(float* p, int64_t n) {
  float top = -INFINITY;
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    top = p[j] > top ? p[j] : top;
    nan |= p[j] != p[j];
  }
  if (nan) top = NAN;
  int64_t j = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 sum = _mm512_setzero_ps();
  for (; j < n; j += 16) {
    const __mmask16 live = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, p + j), _mm512_set1_ps(top))));
    _mm512_mask_storeu_ps(p + j, live, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; j < n; ++j) total += (p[j] = std::exp(p[j] - top));
  return total;
}

// o_r[0, D) = sum_j w_r[j] v[j, 0, D) / total_r for `rows` rows (w_r: w + r * stride)
template <int rows>
inline void weighted_values(const float* w, int64_t stride, const float* v, int64_t n, int64_t D,
                            const float* total, float* const* o) {
  int64_t d = 0;
#if defined(__AVX512F__)
  constexpr int C = 4;  // 64 columns of every row in registers across all value rows (one pass over V at D = 64)
  for (; d + 16 * C <= D; d += 16 * C) {
    __m512 acc[rows][C];
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      __m512 vj[C];
      for (int c = 0; c < C; ++c) vj[c] = _mm512_loadu_ps(v + j * D + d + 16 * c);
      for (int r = 0; r < rows; ++r) {
        const __m512 wr = _mm512_set1_ps(w[r * stride + j]);
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(wr, vj[c], acc[r][c]);
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < C; ++c)
        _mm512_storeu_ps(o[r] + d + 16 * c, _mm512_div_ps(acc[r][c], _mm512_set1_ps(total[r])));
  }
  for (; d + 16 <= D; d += 16) {
    __m512 acc[rows];
    for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m512 vj = _mm512_loadu_ps(v + j * D + d);
      for (int r = 0; r < rows; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(w[r * stride + j]), vj, acc[r]);
    }
    for (int r = 0; r < rows; ++r) _mm512_storeu_ps(o[r] + d, _mm512_div_ps(acc[r], _mm512_set1_ps(total[r])));
  }
#endif
  for (; d < D; ++d)
    for (int r = 0; r < rows; ++r) {
      float acc = 0.f;
      for (int64_t j = 0; j < n; ++j) acc += w[r * stride + j] * v[j * D + d];
      o[r][d] = acc / total[r];
    }
}

inline void decode_attention(const float* q, const float* k, const float* v, const float* mask, float* out,
                             int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t MB,
                             int64_t MH, float scale) {
  static thread_local std::vector<float> weights_storage;
  if ((int64_t)weights_storage.size() < QC_ATTN_ROWS * Lk) weights_storage.resize(QC_ATTN_ROWS * Lk);
  float* p = weights_storage.data();
  const int64_t rep = Hq / Hkv, group_rows = rep * Lq;  // query rows reading one kv head: (h, i) for its heads h
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Hkv; ++g) {
      const float* kg = k + (b * Hkv + g) * Lk * D;
      const float* vg = v + (b * Hkv + g) * Lk * D;
      for (int64_t r0 = 0; r0 < group_rows; r0 += QC_ATTN_ROWS) {
        const int rows = (int)std::min<int64_t>(QC_ATTN_ROWS, group_rows - r0);
        const float* qr[QC_ATTN_ROWS];
        const float* mr[QC_ATTN_ROWS];
        float* orow[QC_ATTN_ROWS];
        float total[QC_ATTN_ROWS];
        for (int r = 0; r < rows; ++r) {
          const int64_t h = g * rep + (r0 + r) / Lq, i = (r0 + r) % Lq;
          qr[r] = q + ((b * Hq + h) * Lq + i) * D;
          mr[r] = mask ? mask + (((MB > 1 ? b : 0) * MH + (MH > 1 ? h : 0)) * Lq + i) * Lk : nullptr;
          orow[r] = out + ((b * Lq + i) * Hq + h) * D;
        }
        auto run = [&](auto n) {
          attention_scores<decltype(n)::value>(qr, kg, Lk, D, scale, mr, p, Lk);
          for (int r = 0; r < rows; ++r) total[r] = exp_shifted(p + r * Lk, Lk);
          weighted_values<decltype(n)::value>(p, Lk, vg, Lk, D, total, orow);
        };
        if (rows == 4) run(std::integral_constant<int, 4>{});
        else if (rows == 3) run(std::integral_constant<int, 3>{});
        else if (rows == 2) run(std::integral_constant<int, 2>{});
        else run(std::integral_constant<int, 1>{});
      }
    }
}

}  // namespace qcompile_cpu

#endif  // QCOMPILE_DECODE_ATTENTION_H
