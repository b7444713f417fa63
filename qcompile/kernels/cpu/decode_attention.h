// qcompile CPU decode attention: out = softmax(scale * q k^T + mask) v for a few query rows against a KV cache.
// Inductor pastes this file into its output code (qcompile/kernels/cpu/inductor_template.py) in place of ATen's CPU
// flash attention where the query has at most a handful of rows (a decode step, or its grouped-query form): there
// ATen's op costs ~30 us a call in setup and dispatch for ~2 us of arithmetic (SmolLM2: 30 calls a step), and in
// place of a prefill's (many query rows, an additive mask: transformers' static-cache mask under torch.compile),
// where ATen's kernel computes every masked key (half of a causal square) and this one only keys that a block of
// query rows has unmasked. Self-contained C++17, float32; decode on one thread (decode graphs run on one intra-op
// thread), prefill on an OpenMP team.
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

#include "simd.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
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
          const __m512 kv = qc_in_register(_mm512_loadu_ps(k + (j + c) * D + d));
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
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 vtop = _mm512_set1_ps(-INFINITY);
  __mmask16 unordered = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 x = _mm512_loadu_ps(p + j);
    vtop = _mm512_max_ps(vtop, x);
    unordered |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  }
  top = _mm512_reduce_max_ps(vtop);
  nan = unordered != 0;
#endif
  for (; j < n; ++j) {
    top = p[j] > top ? p[j] : top;
    nan |= p[j] != p[j];
  }
  if (nan) top = NAN;
  j = 0;
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
      for (int c = 0; c < C; ++c) vj[c] = qc_in_register(_mm512_loadu_ps(v + j * D + d + 16 * c));
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
      const __m512 vj = qc_in_register(_mm512_loadu_ps(v + j * D + d));
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

inline void few_rows_attention(const float* q, const float* k, const float* v, const float* mask, float* out,
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

// ---------------------------------------------------------------------------------------------------------
// Prefill (many query rows): QC_PREFILL_ROWS consecutive query rows of one head per task, over the keys below the
// last one any of them leaves unmasked (a masked score is -inf: e^-inf adds exactly 0, so the skipped keys change
// nothing); scores from K transposed once per call (16 keys per FMA, no horizontal sums), then the same two-pass
// softmax and weighted sum as a decode step. Tasks are spread over the team dynamically (a causal mask makes late
// rows longer). SmolLM2's 512-token prefill (9 query / 3 kv heads of 64, causal): 2.2-2.4x ATen's flash attention
// with that mask, on 1 and 2 threads.
// ---------------------------------------------------------------------------------------------------------
constexpr int QC_PREFILL_ROWS = 4;  // 6 measured no faster

// One past the last key that any of the `rows` mask rows leaves unmasked (not -inf); Lk without a mask, or where a
// row masks every key (its softmax is NaN, as softmax over the whole row makes it).
inline int64_t unmasked_keys(const float* const* m, int rows, int64_t Lk) {
  if (!m[0]) return Lk;
  int64_t keys = 0;
  for (int r = rows - 1; r >= 0; --r) {  // with a causal mask the last row reaches furthest
    int64_t j = Lk;
#if defined(__AVX512F__)
    for (; j - 16 >= keys; j -= 16)
      if (_mm512_cmp_ps_mask(_mm512_loadu_ps(m[r] + j - 16), _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ)) break;
#endif
    while (j > keys && m[r][j - 1] == -INFINITY) --j;
    if (j == keys) {  // nothing unmasked at or above `keys`: is the row masked throughout?
      bool any = false;
      for (int64_t i = 0; i < keys && !any; ++i) any = m[r][i] != -INFINITY;
      if (!any) return Lk;
    }
    keys = std::max(keys, j);
  }
  return keys;
}

#if defined(__AVX512F__)
// One 64-key tile's scores for its first 16 * C keys (C < 4: the causal edge's tile, whose keys past n would be
// computed only to be dropped)
template <int R, int C>
inline void prefill_tile_scores(const float* const* q, const float* tile, int64_t j, int64_t n, int64_t D, float scale,
                                const float* const* m, float* s, int64_t stride) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 kv[C];
    for (int c = 0; c < C; ++c) kv[c] = qc_in_register(_mm512_loadu_ps(tile + d * 64 + 16 * c));
    for (int r = 0; r < R; ++r) {
      const __m512 qd = _mm512_set1_ps(q[r][d]);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(qd, kv[c], acc[r][c]);
    }
  }
  for (int c = 0; c < C; ++c) {
    const int64_t j0 = j + 16 * c;
    const __mmask16 live = n - j0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j0)) - 1);
    for (int r = 0; r < R; ++r) {
      __m512 v = _mm512_mul_ps(acc[r][c], _mm512_set1_ps(scale));
      if (m[r]) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, m[r] + j0));
      _mm512_mask_storeu_ps(s + r * stride + j0, live, v);
    }
  }
}
#endif

// s[r * stride + j] = scale * q_r . k_j + m_r[j] for j < n, from kt: K transposed in tiles of 64 keys ([Lk / 64][D]
// [64], zero past Lk), so a tile's 16-key rows are one contiguous stream
template <int R>
inline void prefill_scores(const float* const* q, const float* kt, int64_t n, int64_t D, float scale,
                           const float* const* m, float* s, int64_t stride) {
#if defined(__AVX512F__)
  for (int64_t j = 0; j < n; j += 64) {
    const float* tile = kt + j * D;
    switch (std::min<int64_t>(4, (n - j + 15) / 16)) {  // 16-key columns of this tile below n
      case 1: prefill_tile_scores<R, 1>(q, tile, j, n, D, scale, m, s, stride); break;
      case 2: prefill_tile_scores<R, 2>(q, tile, j, n, D, scale, m, s, stride); break;
      case 3: prefill_tile_scores<R, 3>(q, tile, j, n, D, scale, m, s, stride); break;
      default: prefill_tile_scores<R, 4>(q, tile, j, n, D, scale, m, s, stride); break;
    }
  }
#else
  for (int64_t j = 0; j < n; ++j)
    for (int r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += q[r][d] * kt[(j / 64 * D + d) * 64 + j % 64];
      s[r * stride + j] = acc * scale + (m[r] ? m[r][j] : 0.f);
    }
#endif
}

inline void prefill_attention(const float* q, const float* k, const float* v, const float* mask, float* out,
                              int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t MB,
                              int64_t MH, float scale, int num_threads) {
  const int64_t ldk = (Lk + 63) / 64 * 64, rep = Hq / Hkv, blocks = (Lq + QC_PREFILL_ROWS - 1) / QC_PREFILL_ROWS;
  static thread_local std::vector<float> kt_storage;  // K^T of every (batch, kv head), shared by the team
  if ((int64_t)kt_storage.size() < B * Hkv * D * ldk) kt_storage.resize(B * Hkv * D * ldk);
  float* kt = kt_storage.data();
  (void)num_threads;
#pragma omp parallel num_threads(num_threads)
  {
#pragma omp for schedule(static)
    for (int64_t bg = 0; bg < B * Hkv; ++bg)
      for (int64_t j0 = 0; j0 < ldk; j0 += 64)
        for (int64_t d = 0; d < D; ++d) {
          float* row = kt + bg * D * ldk + (j0 * D + d * 64);
          for (int64_t j = j0; j < j0 + 64; ++j) row[j - j0] = j < Lk ? k[(bg * Lk + j) * D + d] : 0.f;
        }
    static thread_local std::vector<float> weights_storage;
    if ((int64_t)weights_storage.size() < QC_PREFILL_ROWS * ldk) weights_storage.resize(QC_PREFILL_ROWS * ldk);
    float* p = weights_storage.data();
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < B * Hq * blocks; ++task) {
      const int64_t b = task / (Hq * blocks), h = task / blocks % Hq, i0 = task % blocks * QC_PREFILL_ROWS;
      const int rows = (int)std::min<int64_t>(QC_PREFILL_ROWS, Lq - i0);
      const int64_t g = h / rep;
      const float* qr[QC_PREFILL_ROWS];
      const float* mr[QC_PREFILL_ROWS];
      float* orow[QC_PREFILL_ROWS];
      float total[QC_PREFILL_ROWS];
      for (int r = 0; r < QC_PREFILL_ROWS; ++r) {  // a short tail repeats its last row (the same output, written twice)
        const int64_t i = i0 + std::min(r, rows - 1);
        qr[r] = q + ((b * Hq + h) * Lq + i) * D;
        mr[r] = mask ? mask + (((MB > 1 ? b : 0) * MH + (MH > 1 ? h : 0)) * Lq + i) * Lk : nullptr;
        orow[r] = out + ((b * Lq + i) * Hq + h) * D;
      }
      const int64_t n = unmasked_keys(mr, rows, Lk);
      prefill_scores<QC_PREFILL_ROWS>(qr, kt + (b * Hkv + g) * D * ldk, n, D, scale, mr, p, ldk);
      for (int r = 0; r < QC_PREFILL_ROWS; ++r) total[r] = exp_shifted(p + r * ldk, n);
      weighted_values<QC_PREFILL_ROWS>(p, ldk, v + (b * Hkv + g) * Lk * D, n, D, total, orow);
    }
  }
}

// Prefill-sized calls (more query rows than a decode step's FEW_QUERY_ROWS, passes/attention.py) take the blocked
// path; decode steps the one-thread path above.
constexpr int64_t QC_PREFILL_MIN_ROWS = 17;

inline void decode_attention(const float* q, const float* k, const float* v, const float* mask, float* out,
                             int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t MB,
                             int64_t MH, float scale, int num_threads = 1) {
  if (Lq >= QC_PREFILL_MIN_ROWS)
    prefill_attention(q, k, v, mask, out, B, Hq, Hkv, Lq, Lk, D, MB, MH, scale, num_threads);
  else
    few_rows_attention(q, k, v, mask, out, B, Hq, Hkv, Lq, Lk, D, MB, MH, scale);
}

}  // namespace qcompile_cpu

#endif  // QCOMPILE_DECODE_ATTENTION_H
