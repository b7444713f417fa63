// qcompile CPU intx linear micro-kernels: y = x @ dequant(W)^T (+ bias) for 1-8 bit group-wise weights.
// Inductor pastes this file into its output code (qcompile/kernels/cpu/inductor_template.py); the tests in
// tests/kernels/cpu/arm compile it standalone. Self-contained on purpose: no torch headers, C++17, one ISA chosen at
// compile time (x86: AVX-512 VNNI, else AVX2; ARM: i8mm, dotprod, else NEON; else portable C++).
//
// Weight layout read: the bit-plane layout of qcompile/quant/packing.py.
// Row n is K*BITS/8 bytes; plane of width w (8, 4, 2, 1 where BITS has that bit) starts at byte
// K*col/8 (col = BITS & ~(2w-1), the wider planes' widths) and holds value bits [lo, lo+w) (lo = BITS & (w-1));
// value k sits in byte k/(8/w) at bit (k%(8/w))*w. Unsigned u in [0, 2^BITS); the kernel uses w = u - 2^(BITS-1).
// Where the rows lie (template argument ROWS, RowLayout below): ROWS = 1, row-major [N, K*BITS/8]; ROWS = 4 (4- and
// 8-bit weights, whose rows are one plane), blocks of 4 rows interleaved by 64-byte chunks
// (qcompile/kernels/cpu/layout.py writes it).
// Scales: [N, K/GROUP] (float or bfloat16), row-major. GROUP is a multiple of 32; K a multiple of GROUP.
//
// Two entry points, each a GEMV for M < QC_GEMM_MIN_M and a blocked GEMM (weights unpacked once per row block,
// reused by QC_MR tokens at a time) above:
//   intx_linear_dynamic_int8: activations quantized per token to asymmetric int8 in front (torchao numerics:
//     scale = max(max(x,0)-min(x,0), eps*255)/255, zero = clamp(-128 - round(min(x,0)/scale)), q = round(x/scale)+zero),
//     exact int32 dot per group, then y = scale_x * sum_g scale_w[g] * dot_g (+ bias).
//   intx_linear_float: float activations against weights dequantized to float (weight-only schemes).
#ifndef QCOMPILE_INTX_LINEAR_H
#define QCOMPILE_INTX_LINEAR_H

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QC_X86_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define QC_X86_VNNI 1
// vdpbf16ps for the 4-bit float GEMV: Inductor's AVX-512 VNNI flags lack -mavx512bf16, so those functions get the
// target by pragma and run only where CPUID has it (bf16_dot_enabled)
#if defined(__GNUC__) && !defined(__clang__)
#define QC_X86_BF16_DOT 1
#define QC_BF16_TARGET_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx512bf16\")")
#define QC_BF16_TARGET_END _Pragma("GCC pop_options")
#elif defined(__clang__)
#define QC_X86_BF16_DOT 1
#define QC_BF16_TARGET_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx512bf16\"))), apply_to = function)")
#define QC_BF16_TARGET_END _Pragma("clang attribute pop")
#endif
#include <cpuid.h>
#endif
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define QC_ARM_NEON 1
#if defined(__ARM_FEATURE_MATMUL_INT8)
#define QC_ARM_I8MM 1
#endif
#if defined(__ARM_FEATURE_DOTPROD)
#define QC_ARM_DOTPROD 1
#endif
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace qcompile_cpu {

constexpr int QC_MR = 4;          // tokens sharing one unpacked weight row in the GEMM
constexpr int QC_NB = 16;         // weight rows unpacked per block in the GEMM
constexpr int64_t QC_GEMM_MIN_M = 4;
// Below this much work a call runs on one thread: a decode-step GEMV is memory-bound and one core nearly
// saturates this machine's bandwidth, while an OpenMP fork/join costs microseconds (and, on a loaded machine
// where the second thread waits for a time slice, milliseconds).
constexpr int64_t QC_PARALLEL_MIN_MACS = int64_t(1) << 22;

// Which micro-kernels this translation unit was compiled with (the tests check it).
inline const char* isa_name() {
#if defined(QC_X86_VNNI)
  return "x86_avx512_vnni";
#elif defined(QC_X86_AVX2)
  return "x86_avx2";
#elif defined(QC_ARM_I8MM)
  return "arm_i8mm";
#elif defined(QC_ARM_DOTPROD)
  return "arm_dotprod";
#elif defined(QC_ARM_NEON)
  return "arm_neon";
#else
  return "portable";
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Unpacking: 32 consecutive values k0..k0+31 of one row, as signed w = u - 2^(BITS-1).
// ---------------------------------------------------------------------------------------------------------
template <int BITS, int W>
inline void unpack_plane32(const uint8_t* row, int64_t K, int64_t k0, uint8_t* u) {
  if constexpr ((BITS & W) != 0) {
    constexpr int per_byte = 8 / W, lo = BITS & (W - 1), col = BITS & ~(2 * W - 1);
    constexpr unsigned mask = (1u << W) - 1;
    const uint8_t* p = row + (int64_t)col * K / 8 + k0 / per_byte;
    for (int i = 0; i < 32; ++i) u[i] |= (uint8_t)(((p[i / per_byte] >> ((i % per_byte) * W)) & mask) << lo);
  }
}

template <int BITS>
inline void unpack32(const uint8_t* row, int64_t K, int64_t k0, int8_t* out) {
  uint8_t u[32] = {0};
  unpack_plane32<BITS, 8>(row, K, k0, u);
  unpack_plane32<BITS, 4>(row, K, k0, u);
  unpack_plane32<BITS, 2>(row, K, k0, u);
  unpack_plane32<BITS, 1>(row, K, k0, u);
  for (int i = 0; i < 32; ++i) out[i] = (int8_t)((int)u[i] - (1 << (BITS - 1)));
}

#if defined(QC_X86_AVX2)
// PLANE_ORDER (4-bit only): values come out as the nibbles lie, evens of the 32 then odds, which saves the
// interleave; the activations are then stored in the same order (see plane_order_x86).
template <int BITS, bool PLANE_ORDER = false>
inline void unpack32_x86(const uint8_t* row, int64_t K, int64_t k0, __m256i& w_lo, __m256i& w_hi) {
  if constexpr (BITS == 8) {
    const __m256i u = _mm256_loadu_si256((const __m256i*)(row + k0));
    const __m256i mid = _mm256_set1_epi16(128);
    w_lo = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(u)), mid);
    w_hi = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(u, 1)), mid);
  } else if constexpr (BITS == 4 && PLANE_ORDER) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(row + k0 / 2)));
    const __m256i mid = _mm256_set1_epi16(8);
    w_lo = _mm256_sub_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x0F)), mid);
    w_hi = _mm256_sub_epi16(_mm256_srli_epi16(v, 4), mid);
  } else if constexpr (BITS == 4) {
    const __m128i p = _mm_loadu_si128((const __m128i*)(row + k0 / 2));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i even = _mm_and_si128(p, m), odd = _mm_and_si128(_mm_srli_epi16(p, 4), m);
    const __m256i mid = _mm256_set1_epi16(8);
    w_lo = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(even, odd)), mid);
    w_hi = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_unpackhi_epi8(even, odd)), mid);
  } else {
    alignas(32) int8_t t[32];
    unpack32<BITS>(row, K, k0, t);
    w_lo = _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i*)t));
    w_hi = _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i*)(t + 16)));
  }
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#if defined(QC_ARM_NEON)
template <int BITS>
inline void unpack32_arm(const uint8_t* row, int64_t K, int64_t k0, int8x16_t& w_lo, int8x16_t& w_hi) {
  if constexpr (BITS == 8) {
    const int8x16_t mid = vdupq_n_s8((int8_t)-128);
    w_lo = veorq_s8(vreinterpretq_s8_u8(vld1q_u8(row + k0)), mid);  // u ^ 0x80 == u - 128 as int8
    w_hi = veorq_s8(vreinterpretq_s8_u8(vld1q_u8(row + k0 + 16)), mid);
  } else if constexpr (BITS == 4) {
    const uint8x16_t p = vld1q_u8(row + k0 / 2);
    const uint8x16_t even = vandq_u8(p, vdupq_n_u8(0x0F)), odd = vshrq_n_u8(p, 4);
    const int8x16_t mid = vdupq_n_s8(8);
    w_lo = vsubq_s8(vreinterpretq_s8_u8(vzip1q_u8(even, odd)), mid);
    w_hi = vsubq_s8(vreinterpretq_s8_u8(vzip2q_u8(even, odd)), mid);
  } else {
    int8_t t[32];
    unpack32<BITS>(row, K, k0, t);
    w_lo = vld1q_s8(t);
    w_hi = vld1q_s8(t + 16);
  }
}
#endif

// ---------------------------------------------------------------------------------------------------------
// Quantized activations. x86/portable keep a - zero as int16 (madd_epi16 then needs no zero-point term);
// ARM keeps int8 a (for sdot / smmla) and subtracts zero * sum(w) per group.
// ---------------------------------------------------------------------------------------------------------
#if defined(QC_ARM_NEON)
using act_t = int8_t;
constexpr bool ACT_HOLDS_ZERO = false;
#else
using act_t = int16_t;
constexpr bool ACT_HOLDS_ZERO = true;
#endif

#if defined(QC_X86_AVX2)
template <int BITS>
constexpr bool plane_order_x86 = BITS == 4;
#endif

// Reorders each 32-value chunk to evens then odds (the 4-bit plane order of unpack32_x86<4, true>).
template <typename T>
inline void to_plane_order(T* a, int64_t K) {
  T t[32];
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    for (int i = 0; i < 16; ++i) t[i] = a[k0 + 2 * i], t[16 + i] = a[k0 + 2 * i + 1];
    std::memcpy(a + k0, t, sizeof(t));
  }
}

// torchao's asymmetric int8 qparams of one token: scale = max(max(x,0)-min(x,0), eps*255)/255,
// zero = clamp(-128 - round(min(x,0)/scale), -128, 127), as float.
template <typename XT>
inline void token_qparams(const XT* x, int64_t K, float* scale_out, float* zero_out) {
  float mn = 0.f, mx = 0.f;
  bool has_nan = false;
  int64_t k = 0;
#if defined(QC_X86_AVX2)
  if constexpr (std::is_same_v<XT, float>) {
    __m256 vmn = _mm256_setzero_ps(), vmx = _mm256_setzero_ps(), vnan = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
      const __m256 v = _mm256_loadu_ps(x + k);
      vmn = _mm256_min_ps(vmn, v);
      vmx = _mm256_max_ps(vmx, v);
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float t0[8], t1[8];
    _mm256_store_ps(t0, vmn);
    _mm256_store_ps(t1, vmx);
    for (int i = 0; i < 8; ++i) mn = std::min(mn, t0[i]), mx = std::max(mx, t1[i]);
    has_nan = _mm256_movemask_ps(vnan) != 0;
  }
#endif
  for (; k < K; ++k) {
    const float v = static_cast<float>(x[k]);
    mn = std::min(mn, v);
    mx = std::max(mx, v);
    has_nan |= v != v;
  }
  // min/max skip NaN: a token holding one gets a NaN scale, so its outputs are NaN as in float (inf already
  // gives an infinite scale)
  const float scale = has_nan ? NAN : std::max((mx - mn) / 255.0f, FLT_EPSILON);
  const float zero_f = std::min(std::max(-128.0f - std::nearbyint(mn / scale), -128.0f), 127.0f);
  *scale_out = scale;
  // a NaN scale would give a NaN zero (casting that to int is undefined): the outputs are NaN through the scale
  *zero_out = zero_f == zero_f ? zero_f : 0.f;
}

template <typename XT>
inline void quantize_token_int8_asym(const XT* x, int64_t K, act_t* a, float* scale_out, int32_t* zero_out) {
  float scale, zero_f;
  token_qparams(x, K, &scale, &zero_f);
  const float inv = 1.0f / scale;
  const float lo = -128.0f - (ACT_HOLDS_ZERO ? zero_f : 0.f), hi = 127.0f - (ACT_HOLDS_ZERO ? zero_f : 0.f);
  const float add = ACT_HOLDS_ZERO ? 0.f : zero_f;
  int64_t k = 0;
#if defined(QC_X86_AVX2)
  if constexpr (std::is_same_v<XT, float>) {
    // stores round(x/scale) clamped to [-128-zero, 127-zero] == q - zero, as int16
    const __m256 vinv = _mm256_set1_ps(inv), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    for (; k + 16 <= K; k += 16) {
      __m256 r0 = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m256 r1 = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r0 = _mm256_min_ps(_mm256_max_ps(r0, vlo), vhi);
      r1 = _mm256_min_ps(_mm256_max_ps(r1, vlo), vhi);
      const __m256i i16 = _mm256_packs_epi32(_mm256_cvtps_epi32(r0), _mm256_cvtps_epi32(r1));
      _mm256_storeu_si256((__m256i*)(a + k), _mm256_permute4x64_epi64(i16, 0xD8));
    }
  }
#endif
  for (; k < K; ++k) {
    const float q = std::nearbyint(static_cast<float>(x[k]) * inv) + add;
    a[k] = (act_t)std::min(std::max(q, lo), hi);
  }
  *scale_out = scale;
  *zero_out = (int32_t)zero_f;
}

// ---------------------------------------------------------------------------------------------------------
// Integer dot of one weight row (packed, streamed: the GEMV) with one token, per group, scaled and summed.
// ---------------------------------------------------------------------------------------------------------
template <int BITS, int GROUP, typename ST>
inline float gemv_row(const uint8_t* row, const ST* srow, const act_t* a, int32_t a_zero, int64_t K) {
#if defined(QC_X86_AVX2)
  (void)a_zero;
  __m256 facc = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / GROUP; ++g) {
    __m256i isum = _mm256_setzero_si256();
    for (int c = 0; c < GROUP; c += 32) {
      const int64_t k0 = g * GROUP + c;
      __m256i wl, wh;
      unpack32_x86<BITS, plane_order_x86<BITS>>(row, K, k0, wl, wh);
      isum = _mm256_add_epi32(isum, _mm256_madd_epi16(wl, _mm256_loadu_si256((const __m256i*)(a + k0))));
      isum = _mm256_add_epi32(isum, _mm256_madd_epi16(wh, _mm256_loadu_si256((const __m256i*)(a + k0 + 16))));
    }
    facc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(static_cast<float>(srow[g])), facc);
  }
  return hsum_ps(facc);
#elif defined(QC_ARM_NEON)
  float32x4_t facc = vdupq_n_f32(0.f);
  for (int64_t g = 0; g < K / GROUP; ++g) {
    int32x4_t isum = vdupq_n_s32(0), wsum = vdupq_n_s32(0);
    for (int c = 0; c < GROUP; c += 32) {
      const int64_t k0 = g * GROUP + c;
      int8x16_t wl, wh;
      unpack32_arm<BITS>(row, K, k0, wl, wh);
      const int8x16_t al = vld1q_s8(a + k0), ah = vld1q_s8(a + k0 + 16);
#if defined(QC_ARM_DOTPROD)
      const int8x16_t ones = vdupq_n_s8(1);
      isum = vdotq_s32(vdotq_s32(isum, wl, al), wh, ah);
      wsum = vdotq_s32(vdotq_s32(wsum, wl, ones), wh, ones);
#else
      // no dotprod: widening multiplies (each |w*a| <= 2^14 fits int16), pairwise-accumulated into int32
      isum = vpadalq_s16(isum, vmull_s8(vget_low_s8(wl), vget_low_s8(al)));
      isum = vpadalq_s16(isum, vmull_high_s8(wl, al));
      isum = vpadalq_s16(isum, vmull_s8(vget_low_s8(wh), vget_low_s8(ah)));
      isum = vpadalq_s16(isum, vmull_high_s8(wh, ah));
      wsum = vpadalq_s16(wsum, vaddq_s16(vpaddlq_s8(wl), vpaddlq_s8(wh)));
#endif
    }
    isum = vmlsq_n_s32(isum, wsum, a_zero);
    facc = vfmaq_n_f32(facc, vcvtq_f32_s32(isum), static_cast<float>(srow[g]));
  }
  return vaddvq_f32(facc);
#else
  float acc = 0.f;
  for (int64_t g = 0; g < K / GROUP; ++g) {
    int32_t isum = 0;
    for (int c = 0; c < GROUP; c += 32) {
      const int64_t k0 = g * GROUP + c;
      int8_t w[32];
      unpack32<BITS>(row, K, k0, w);
      for (int i = 0; i < 32; ++i) isum += (int32_t)w[i] * (int32_t)a[k0 + i];
    }
    acc += static_cast<float>(srow[g]) * (float)isum;
  }
  (void)a_zero;
  return acc;
#endif
}

// ---------------------------------------------------------------------------------------------------------
// GEMM: a block of rows is unpacked once into `wbuf` (w_t per value, row-major [rows][K], plus the per-group
// sums of w that ARM's zero-point term needs), then QC_MR tokens at a time read it from cache.
// ---------------------------------------------------------------------------------------------------------
#if defined(QC_X86_AVX2)
using w_t = int16_t;
#elif defined(QC_ARM_NEON)
using w_t = int8_t;
#else
using w_t = int16_t;
#endif

// PLANE_ORDER: as the dynamic-int8 activations are stored (x86 4-bit); false for float activations
template <int BITS, int GROUP, bool PLANE_ORDER>
inline void unpack_row(const uint8_t* row, int64_t K, w_t* w, int32_t* wsum) {
  for (int64_t g = 0; g < K / GROUP; ++g) {
    int32_t s = 0;
    for (int c = 0; c < GROUP; c += 32) {
      const int64_t k0 = g * GROUP + c;
#if defined(QC_X86_AVX2)
      __m256i wl, wh;
      unpack32_x86<BITS, PLANE_ORDER>(row, K, k0, wl, wh);
      _mm256_storeu_si256((__m256i*)(w + k0), wl);
      _mm256_storeu_si256((__m256i*)(w + k0 + 16), wh);
#elif defined(QC_ARM_NEON)
      int8x16_t wl, wh;
      unpack32_arm<BITS>(row, K, k0, wl, wh);
      vst1q_s8(w + k0, wl);
      vst1q_s8(w + k0 + 16, wh);
      s += vaddlvq_s8(wl) + vaddlvq_s8(wh);
#else
      int8_t t[32];
      unpack32<BITS>(row, K, k0, t);
      for (int i = 0; i < 32; ++i) w[k0 + i] = t[i];
#endif
    }
    wsum[g] = s;
  }
}

// out[t] = sum_g scale[g] * dot_g(w, a_t) for `mr` <= QC_MR tokens a_t = a + t * K
template <int GROUP, typename ST>
inline void gemm_row_tokens(const w_t* w, const int32_t* wsum, const ST* srow, const act_t* a, const int32_t* a_zero,
                            int mr, int64_t K, float* out) {
#if defined(QC_X86_AVX2)
  (void)wsum; (void)a_zero;
  __m256 facc[QC_MR];
  for (int t = 0; t < QC_MR; ++t) facc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / GROUP; ++g) {
    __m256i isum[QC_MR];
    for (int t = 0; t < QC_MR; ++t) isum[t] = _mm256_setzero_si256();
    for (int c = 0; c < GROUP; c += 16) {
      const int64_t k0 = g * GROUP + c;
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + k0));
      for (int t = 0; t < QC_MR; ++t)
        if (t < mr)
          isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(wv, _mm256_loadu_si256((const __m256i*)(a + t * K + k0))));
    }
    const __m256 s = _mm256_set1_ps(static_cast<float>(srow[g]));
    for (int t = 0; t < QC_MR; ++t)
      if (t < mr) facc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), s, facc[t]);
  }
  for (int t = 0; t < mr; ++t) out[t] = hsum_ps(facc[t]);
#elif defined(QC_ARM_NEON)
  float32x4_t facc[QC_MR];
  for (int t = 0; t < QC_MR; ++t) facc[t] = vdupq_n_f32(0.f);
  for (int64_t g = 0; g < K / GROUP; ++g) {
    int32x4_t isum[QC_MR];
    for (int t = 0; t < QC_MR; ++t) isum[t] = vdupq_n_s32(0);
    for (int c = 0; c < GROUP; c += 16) {
      const int64_t k0 = g * GROUP + c;
      const int8x16_t wv = vld1q_s8(w + k0);
      for (int t = 0; t < QC_MR; ++t) {
        if (t >= mr) break;
        const int8x16_t av = vld1q_s8(a + t * K + k0);
#if defined(QC_ARM_DOTPROD)
        isum[t] = vdotq_s32(isum[t], wv, av);
#else
        isum[t] = vpadalq_s16(isum[t], vmull_s8(vget_low_s8(wv), vget_low_s8(av)));
        isum[t] = vpadalq_s16(isum[t], vmull_high_s8(wv, av));
#endif
      }
    }
    const float s = static_cast<float>(srow[g]);
    for (int t = 0; t < QC_MR; ++t) {
      if (t >= mr) break;
      const int32_t dot = vaddvq_s32(isum[t]) - a_zero[t] * wsum[g];
      facc[t] = vsetq_lane_f32(vgetq_lane_f32(facc[t], 0) + s * (float)dot, facc[t], 0);
    }
  }
  for (int t = 0; t < mr; ++t) out[t] = vgetq_lane_f32(facc[t], 0);
#else
  (void)wsum; (void)a_zero;
  for (int t = 0; t < mr; ++t) {
    float acc = 0.f;
    for (int64_t g = 0; g < K / GROUP; ++g) {
      int32_t isum = 0;
      for (int i = 0; i < GROUP; ++i) isum += (int32_t)w[g * GROUP + i] * (int32_t)a[t * K + g * GROUP + i];
      acc += static_cast<float>(srow[g]) * (float)isum;
    }
    out[t] = acc;
  }
#endif
}

#if defined(QC_ARM_I8MM)
// smmla multiplies (2 tokens x 8 k) by (2 rows x 8 k)^T into [t0.r0, t0.r1, t1.r0, t1.r1]: two weight rows and two
// tokens per instruction. out0/out1[t] as gemm_row_tokens for rows w0/w1 (w1 may repeat w0 for an odd tail).
template <int GROUP, typename ST>
inline void gemm_2rows_tokens_i8mm(const int8_t* w0, const int8_t* w1, const int32_t* wsum0, const int32_t* wsum1,
                                   const ST* srow0, const ST* srow1, const act_t* a, const int32_t* a_zero, int mr,
                                   int64_t K, float* out0, float* out1) {
  constexpr int P = QC_MR / 2;  // token pairs
  float32x4_t facc[P];
  for (int p = 0; p < P; ++p) facc[p] = vdupq_n_f32(0.f);
  for (int64_t g = 0; g < K / GROUP; ++g) {
    int32x4_t isum[P];
    for (int p = 0; p < P; ++p) isum[p] = vdupq_n_s32(0);
    for (int c = 0; c < GROUP; c += 16) {
      const int64_t k0 = g * GROUP + c;
      const int8x16_t wlo = vcombine_s8(vld1_s8(w0 + k0), vld1_s8(w1 + k0));
      const int8x16_t whi = vcombine_s8(vld1_s8(w0 + k0 + 8), vld1_s8(w1 + k0 + 8));
      for (int p = 0; p < P; ++p) {
        if (2 * p >= mr) break;
        const act_t* a0 = a + (2 * p) * K;
        const act_t* a1 = (2 * p + 1 < mr) ? a0 + K : a0;
        isum[p] = vmmlaq_s32(isum[p], vcombine_s8(vld1_s8(a0 + k0), vld1_s8(a1 + k0)), wlo);
        isum[p] = vmmlaq_s32(isum[p], vcombine_s8(vld1_s8(a0 + k0 + 8), vld1_s8(a1 + k0 + 8)), whi);
      }
    }
    const float s0 = static_cast<float>(srow0[g]), s1 = static_cast<float>(srow1[g]);
    const float sc[4] = {s0, s1, s0, s1};
    const float32x4_t scales = vld1q_f32(sc);
    for (int p = 0; p < P; ++p) {
      if (2 * p >= mr) break;
      const int32_t z0 = a_zero[2 * p], z1 = (2 * p + 1 < mr) ? a_zero[2 * p + 1] : z0;
      const int32_t zc[4] = {z0 * wsum0[g], z0 * wsum1[g], z1 * wsum0[g], z1 * wsum1[g]};
      facc[p] = vfmaq_f32(facc[p], vcvtq_f32_s32(vsubq_s32(isum[p], vld1q_s32(zc))), scales);
    }
  }
  for (int t = 0; t < mr; ++t) {
    const float32x4_t v = facc[t / 2];
    out0[t] = (t % 2) ? vgetq_lane_f32(v, 2) : vgetq_lane_f32(v, 0);
    out1[t] = (t % 2) ? vgetq_lane_f32(v, 3) : vgetq_lane_f32(v, 1);
  }
}
#endif

template <typename T>
inline T* thread_scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// ---------------------------------------------------------------------------------------------------------
// Where row n's packed bytes lie. ROWS = 1: row-major. ROWS = 4: rows in blocks of 4 (the last block holds what is
// left), each block's rows interleaved by 64-byte chunks: chunk c of each of the block's rows in turn, then chunk
// c + 1 (a row's last, shorter chunk likewise). The AVX-512 GEMVs read a block's rows together, so they read one
// linear stream instead of 4 (SmolLM2's decode sweep, benchmarks/cpu_intx_kernels.cpp, 1 thread, alternating:
// 4-bit 1.1-1.6x, 8-bit 1.5-1.8x the row-major layout's speed); the AVX-512 GEMMs read a chunk in place (`origin`),
// the other ISAs' paths a row in order from a per-thread copy (`row`).
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t QC_CHUNK_BYTES = 64;

template <int ROWS>
struct RowLayout {
  static_assert(ROWS == 1 || ROWS == 4, "rows are row-major (1) or interleaved in blocks of 4");
  const uint8_t* packed;
  int64_t N, row_bytes;
  // byte b of row n; the rest of b's 64-byte chunk of the row follows it
  const uint8_t* at(int64_t n, int64_t b) const {
    if constexpr (ROWS == 1) {
      return packed + n * row_bytes + b;
    } else {
      const int64_t first = n / ROWS * ROWS, rows = std::min<int64_t>(ROWS, N - first);
      const int64_t c = b / QC_CHUNK_BYTES * QC_CHUNK_BYTES;
      return packed + first * row_bytes + c * rows + (n - first) * std::min(QC_CHUNK_BYTES, row_bytes - c) + (b - c);
    }
  }
  // o with o + b = at(n, b) for b in one 64-byte chunk: a one-plane row's loads of k0's chunk read
  // o + k0 * BITS / 8 (ROWS = 1: the row's start, for any plane)
  const uint8_t* origin(int64_t n, int64_t b) const { return at(n, b) - b; }
  // row n's bytes in order: in place (ROWS = 1), else gathered into this thread's copy (valid until its next call)
  const uint8_t* row(int64_t n) const {
    if constexpr (ROWS == 1) {
      return at(n, 0);
    } else {
      static thread_local std::vector<uint8_t> storage;
      uint8_t* copy = thread_scratch(storage, (size_t)row_bytes);
      for (int64_t c = 0; c < row_bytes; c += QC_CHUNK_BYTES)
        std::memcpy(copy + c, at(n, c), (size_t)std::min(QC_CHUNK_BYTES, row_bytes - c));
      return copy;
    }
  }
};

// The calling thread's scratch for M quantized tokens of K values each, with a float scale and one int32 (zero
// point or correction term) per token; the vectors only grow, so steady-state calls allocate nothing.
template <typename A>
struct TokenScratch {
  A* act;
  float* scale;
  int32_t* aux;
};

template <typename A>
TokenScratch<A> token_scratch(int64_t M, int64_t K) {
  static thread_local std::vector<A> act_storage;
  static thread_local std::vector<float> scale_storage;
  static thread_local std::vector<int32_t> aux_storage;
  return {thread_scratch(act_storage, (size_t)(M * K)), thread_scratch(scale_storage, (size_t)M),
          thread_scratch(aux_storage, (size_t)M)};
}

// ---------------------------------------------------------------------------------------------------------
// x86 AVX-512 VNNI (vpdpbusd: 4 u8 x s8 products summed into each int32 lane, 64 MACs per instruction). The
// activation is the u8 operand: a = q + 128 in [0, 255]; c = 128 + zero, so a - c = q - zero. Weights are the s8
// operand v, either signed w (GEMM; GEMV for widths other than 4) or, in the 4-bit GEMV, the raw nibble u with
// w = u - 8. Per group g (G values, exact in int32):
//   sum_k w_k (q_k - zero) = sum_k a_k v_k - c * sum_k v_k - o * sum_k a_k + o * c * G      (o = 8 for nibbles, else 0)
// and y = x_scale * sum_g scale_g * that + bias, as the reference sums it.
// ---------------------------------------------------------------------------------------------------------
#if defined(QC_X86_VNNI)
// The GEMV walks a row in chunks of 16 int32 lanes: 4-bit, 128 values from 64 packed bytes (lane l holds
// k0+8l..k0+8l+7: its 4 even k from the low nibbles, its 4 odd k from the high ones, so the activations of a
// chunk are stored evens then odds); other widths, 64 values in order (lane l holds k0+4l..k0+4l+3). Every lane
// lies in one group when chunks and groups nest; other group sizes take the AVX2 kernels.
template <int BITS>
constexpr int vnni_chunk = BITS == 4 ? 128 : 64;
template <int BITS, int GROUP>
constexpr bool vnni_fits = vnni_chunk<BITS> % GROUP == 0 || GROUP % vnni_chunk<BITS> == 0;
constexpr int QC_VNNI_MR = 4;  // GEMM: tokens per micro-tile
constexpr int QC_VNNI_NR = 2;  // GEMM: 16-row panels per micro-tile

// The first `bytes` (a multiple of 16, <= 64) bytes at p, zero above. Not a masked load: on this AMD CPU those
// cost ~4x more once the data is out of L2.
inline __m512i load_bytes(const uint8_t* p, int bytes) {
  if (bytes >= 64) return _mm512_loadu_si512(p);
  __m512i v = _mm512_zextsi128_si512(_mm_loadu_si128((const __m128i*)p));
  if (bytes > 16) v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(p + 16)), 1);
  if (bytes > 32) v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(p + 32)), 2);
  return v;
}

// a = clamp(round(x * inv) + c, 0, 255) for 16 floats (NaN -> 0: the token's outputs are NaN through its scale)
inline __m128i quantize16_u8(__m512 x, __m512 inv, __m512 c) {
  __m512 r = _mm512_add_ps(_mm512_roundscale_ps(_mm512_mul_ps(x, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), c);
  r = _mm512_min_ps(_mm512_max_ps(r, _mm512_setzero_ps()), _mm512_set1_ps(255.f));
  return _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r));
}

// One token as u8 activations into `a` (length K rounded up to the GEMV chunk, zero padded); returns scale, c.
// CHUNK_ORDER: the 4-bit GEMV order (evens then odds per 128 values); else natural order.
template <typename XT, bool CHUNK_ORDER>
inline void quantize_token_u8(const XT* x, int64_t K, int64_t K_pad, uint8_t* a, float* scale_out, int32_t* c_out) {
  float scale, zero_f;
  token_qparams(x, K, &scale, &zero_f);
  const float inv = 1.0f / scale, c = zero_f + 128.f;
  std::memset(a + K, 0, (size_t)(K_pad - K));
  int64_t k = 0;
  if constexpr (std::is_same_v<XT, float>) {
    const __m512 vinv = _mm512_set1_ps(inv), vc = _mm512_set1_ps(c);
    if constexpr (CHUNK_ORDER) {
      const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
      for (; k + 32 <= K; k += 32) {  // 32 values: 16 evens to the chunk's first half, 16 odds to its second
        const __m512 lo = _mm512_loadu_ps(x + k), hi = _mm512_loadu_ps(x + k + 16);
        uint8_t* dst = a + (k & ~int64_t(127)) + (k & 127) / 2;
        _mm_storeu_si128((__m128i*)dst, quantize16_u8(_mm512_permutex2var_ps(lo, even, hi), vinv, vc));
        _mm_storeu_si128((__m128i*)(dst + 64), quantize16_u8(_mm512_permutex2var_ps(lo, odd, hi), vinv, vc));
      }
    } else {
      for (; k + 16 <= K; k += 16)
        _mm_storeu_si128((__m128i*)(a + k), quantize16_u8(_mm512_loadu_ps(x + k), vinv, vc));
    }
  }
  for (; k < K; ++k) {
    float q = std::nearbyint(static_cast<float>(x[k]) * inv) + c;
    q = q == q ? std::min(std::max(q, 0.f), 255.f) : 0.f;
    const int64_t at = CHUNK_ORDER ? (k & ~int64_t(127)) + (k & 127) / 2 + (k & 1) * 64 : k;
    a[at] = (uint8_t)q;
  }
  *scale_out = scale;
  *c_out = (int32_t)c;
}

// The 4-bit GEMV's per-lane start values o * c * n_l - o * sum_lane(a) (n_l = values in lane l: 8, or 0 in the
// padding), one vector per chunk.
inline void nibble_lane_offsets(const uint8_t* a, int64_t K, int64_t chunks, int32_t c, int32_t* out) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t ch = 0; ch < chunks; ++ch) {
    __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(a + ch * 128), ones);
    sum = _mm512_dpbusd_epi32(sum, _mm512_loadu_si512(a + ch * 128 + 64), ones);
    const int64_t real_lanes = std::min<int64_t>(16, (K - ch * 128) / 8);
    const __m512i n = _mm512_maskz_set1_epi32((__mmask16)((1u << real_lanes) - 1), 8 * 8 * c);
    _mm512_storeu_si512(out + ch * 16, _mm512_sub_epi32(n, _mm512_slli_epi32(sum, 3)));
  }
}

template <typename ST>
inline float scale_at(const ST* s, int64_t i) { return static_cast<float>(s[i]); }

// The scale of each lane's group for the chunk of CHUNK values at k0, lane l holding values k0 + l * CHUNK/16 up to
// the next lane's (0 for groups past the row's end).
// WHOLE: the chunk lies within the row (all its groups exist).
template <int CHUNK, int GROUP, typename ST, bool WHOLE = false>
inline __m512 chunk_scales(const ST* srow, int64_t k0, int64_t groups) {
  const int64_t base = k0 / GROUP;
  if constexpr (GROUP >= CHUNK) {
    return _mm512_set1_ps(scale_at(srow, base));
  } else {
    constexpr int per_chunk = CHUNK / GROUP, lanes_per_group = 16 / per_chunk;
    const int count = WHOLE ? per_chunk : (int)std::min<int64_t>(per_chunk, groups - base);
    __m128 s;
    if (std::is_same_v<ST, float> && per_chunk == 4 && count == 4) {
      s = _mm_loadu_ps((const float*)srow + base);
    } else if (std::is_same_v<ST, float> && count == 2) {  // the upper two lanes zero
      s = _mm_castpd_ps(_mm_load_sd((const double*)(srow + base)));
    } else if (std::is_same_v<ST, float> && count == 1) {
      s = _mm_load_ss((const float*)srow + base);
    } else {  // from registers: four scalar stores read back as one vector would stall store forwarding
      auto at = [&](int i) { return i < count ? scale_at(srow, base + i) : 0.f; };
      s = _mm_setr_ps(at(0), at(1), at(2), at(3));
    }
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i idx = _mm512_srli_epi32(lane, __builtin_ctz(lanes_per_group));
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s));
  }
}

// 64 values of a row from k0 (`count` <= 64 of them, the rest 0) as signed int8 w, any width.
template <int BITS>
inline __m512i load_w64(const uint8_t* row, int64_t K, int64_t k0, int count) {
  if constexpr (BITS == 8) {
    const __m512i u = load_bytes(row + k0, count);
    const __mmask64 mask = count >= 64 ? ~__mmask64(0) : (__mmask64(1) << count) - 1;
    return _mm512_maskz_sub_epi8(mask, u, _mm512_set1_epi8((char)0x80));
  } else {
    alignas(64) int8_t t[64] = {0};
    for (int i = 0; i < count; i += 32) unpack32<BITS>(row, K, k0 + i, t + i);
    return _mm512_load_si512(t);
  }
}

// GEMV: out[r * MT + t] = sum_g scale_g * sum_k w_k (q_k - zero_t) for QC_VNNI_ROWS packed rows and MT tokens;
// the rows share each activation load and the loop overhead.
constexpr int QC_VNNI_ROWS = 4;

// The QC_VNNI_ROWS rows of one GEMV call (a tail block repeats its last row) and how far ahead it prefetches:
// `ahead` bytes along each row's stream (prefetches past the weights are harmless: they never fault), the scales
// `ahead_rows` rows on.
template <int ROWS>
struct GemvRows {
  int64_t ahead, ahead_rows;
  // ROWS = 1: each row's start. ROWS = 4: the block's start (row[0]), its rows, row_bytes, each row's place in it.
  const uint8_t* row[QC_VNNI_ROWS];
  int64_t rows, row_bytes;
  int64_t lead[QC_VNNI_ROWS];
  GemvRows(const RowLayout<ROWS>& layout, int64_t n0, int64_t ahead, int64_t ahead_rows)
      : ahead(ahead), ahead_rows(ahead_rows), rows(std::min<int64_t>(QC_VNNI_ROWS, layout.N - n0)),
        row_bytes(layout.row_bytes) {
    for (int r = 0; r < QC_VNNI_ROWS; ++r) {
      lead[r] = std::min<int64_t>(r, rows - 1);  // a tail block repeats its last row
      row[r] = ROWS == 1 ? layout.at(n0 + lead[r], 0) : layout.at(n0, 0);
    }
  }
  // o with o + b = row r's byte b for b in one 64-byte chunk (RowLayout::at): a row's chunk loads read
  // o + k0 * BITS / 8 (one plane), or its planes at o + col * K / 8 + k0 * w / 8 (ROWS = 1: o is the row's start)
  const uint8_t* origin(int r, int64_t b) const {
    if constexpr (ROWS == 1) {
      return row[r];
    } else {
      const int64_t c = b & ~(QC_CHUNK_BYTES - 1);
      return row[0] + c * (rows - 1) + lead[r] * std::min(QC_CHUNK_BYTES, row_bytes - c);
    }
  }
};

// For each block of QC_VNNI_ROWS rows this thread owns (an orphaned omp for: call it inside a parallel region):
// gemv(std::integral_constant<int, M>, rows, srows, out) fills out[r * M + m] (rows: GemvRows), then store(m, n,
// value) takes each result. A tail of rows repeats the last one (its results are not stored).
template <int ROWS, typename ST, typename Gemv, typename Store>
inline void vnni_row_blocks(const RowLayout<ROWS>& layout, const ST* scale, int64_t M, int64_t groups, Gemv&& gemv,
                            Store&& store) {
  static_assert(ROWS == 1 || ROWS == QC_VNNI_ROWS, "interleaved blocks are the GEMV's blocks");
  const int64_t N = layout.N, ahead_rows = 4096 / layout.row_bytes + 1;
  // row-major: the rows ~4 KB on; interleaved: 4 KB on in the block's one stream
  const int64_t ahead = ROWS == 1 ? ahead_rows * layout.row_bytes : 4096;
#pragma omp for schedule(static) nowait
  for (int64_t n0 = 0; n0 < N; n0 += QC_VNNI_ROWS) {
    const GemvRows<ROWS> rows(layout, n0, ahead, ahead_rows);
    const ST* srows[QC_VNNI_ROWS];
    for (int r = 0; r < QC_VNNI_ROWS; ++r) srows[r] = scale + (n0 + rows.lead[r]) * groups;
    float out[QC_VNNI_ROWS * QC_GEMM_MIN_M];
    if (M == 1) gemv(std::integral_constant<int, 1>{}, rows, srows, out);
    else if (M == 2) gemv(std::integral_constant<int, 2>{}, rows, srows, out);
    else gemv(std::integral_constant<int, 3>{}, rows, srows, out);
    for (int r = 0; r < QC_VNNI_ROWS && n0 + r < N; ++r)
      for (int64_t m = 0; m < M; ++m) store(m, n0 + r, out[r * M + m]);
  }
}

template <int BITS, int GROUP, int MT, typename ST, int ROWS>
inline void vnni_gemv_rows(const GemvRows<ROWS>& row, const ST* const* srow, const uint8_t* act,
                           const int32_t* lane_offsets, const int32_t* c, int64_t K, int64_t K_pad, float* out) {
  constexpr int CHUNK = vnni_chunk<BITS>, R = QC_VNNI_ROWS;
  const int64_t chunks = K_pad / CHUNK, groups = K / GROUP;
  // software prefetch ~4 KB ahead: with the hardware prefetcher alone the decode sweep of
  // benchmarks/cpu_intx_kernels.cpp took 1.1x (4-bit) to 1.6x (8-bit) as long on this VM
  const int64_t pf_w = row.ahead, pf_s = row.ahead_rows * groups;
  __m512 facc[R][MT];
  __m512i cb[MT];
  for (int t = 0; t < MT; ++t) cb[t] = _mm512_set1_epi8((char)c[t]);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) facc[r][t] = _mm512_setzero_ps();
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t k0 = ch * CHUNK;
    const int count = (int)std::min<int64_t>(CHUNK, K - k0);
    if constexpr (BITS == 4) {
      const __m512i m4 = _mm512_set1_epi8(0x0F);
      __m512i a_lo[MT], a_hi[MT], start[MT];
      for (int t = 0; t < MT; ++t) {
        a_lo[t] = _mm512_loadu_si512(act + t * K_pad + k0);
        a_hi[t] = _mm512_loadu_si512(act + t * K_pad + k0 + 64);
        start[t] = _mm512_loadu_si512(lane_offsets + (t * chunks + ch) * 16);
      }
      for (int r = 0; r < R; ++r) {
        const uint8_t* w = row.origin(r, k0 / 2) + k0 / 2;
        _mm_prefetch((const char*)(w + pf_w), _MM_HINT_T0);
        _mm_prefetch((const char*)(srow[r] + k0 / GROUP + pf_s), _MM_HINT_T0);
        const __m512 s = chunk_scales<CHUNK, GROUP, ST>(srow[r], k0, groups);
        const __m512i p = load_bytes(w, count / 2);
        const __m512i lo = _mm512_and_si512(p, m4), hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);
        const __m512i both = _mm512_add_epi8(lo, hi);
        for (int t = 0; t < MT; ++t) {
          __m512i acc = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start[t], a_lo[t], lo), a_hi[t], hi);
          acc = _mm512_sub_epi32(acc, _mm512_dpbusd_epi32(_mm512_setzero_si512(), cb[t], both));
          facc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s, facc[r][t]);
        }
      }
    } else {
      __m512i a[MT];
      for (int t = 0; t < MT; ++t) a[t] = _mm512_loadu_si512(act + t * K_pad + k0);
      for (int r = 0; r < R; ++r) {
        const uint8_t* origin = row.origin(r, k0 * BITS / 8);
        _mm_prefetch((const char*)(origin + k0 * BITS / 8 + pf_w), _MM_HINT_T0);
        _mm_prefetch((const char*)(srow[r] + k0 / GROUP + pf_s), _MM_HINT_T0);
        const __m512 s = chunk_scales<CHUNK, GROUP, ST>(srow[r], k0, groups);
        const __m512i w = load_w64<BITS>(origin, K, k0, count);
        for (int t = 0; t < MT; ++t) {
          __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), a[t], w);
          acc = _mm512_sub_epi32(acc, _mm512_dpbusd_epi32(_mm512_setzero_si512(), cb[t], w));
          facc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s, facc[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) out[r * MT + t] = _mm512_reduce_add_ps(facc[r][t]);
}

// 64 values of a row from k0 in k order as signed int8 w (4-bit: the nibbles interleaved back), 0 past `count`.
template <int BITS>
inline __m512i load_w64_in_order(const uint8_t* row, int64_t K, int64_t k0, int count) {
  if constexpr (BITS == 4) {
    const __m256i b = _mm512_castsi512_si256(load_bytes(row + k0 / 2, count / 2));
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(b, m4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
    const __m256i first = _mm256_unpacklo_epi8(lo, hi), second = _mm256_unpackhi_epi8(lo, hi);
    // unpack works within 128-bit halves: [0-15 | 32-47] and [16-31 | 48-63] of the 64 values
    const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_permute2x128_si256(first, second, 0x20)),
                                         _mm256_permute2x128_si256(first, second, 0x31), 1);
    const __mmask64 mask = count >= 64 ? ~__mmask64(0) : (__mmask64(1) << count) - 1;
    return _mm512_maskz_sub_epi8(mask, w, _mm512_set1_epi8(8));
  } else {
    return load_w64<BITS>(row, K, k0, count);
  }
}

// GEMM panel: 16 rows unpacked to signed int8 and interleaved by 4 values, [K/4][16 rows][4], so one vpdpbusd
// multiplies 4 values of one token (broadcast) with 4 values of each of the 16 rows; then the rows' scales as
// float [groups][16] and their weight sums per group [groups][16] (int32). Rows past `rows` are zero.
struct VnniPanel {
  int8_t* w;
  float* scale;
  int32_t* wsum;
};

inline size_t vnni_panel_bytes(int64_t K, int64_t groups) { return (size_t)(16 * K + 16 * groups * 8); }

// out[q] = dword q of each of the 16 rows r[0..15] (a 16 x 16 transpose of int32: unpacks within 128-bit lanes,
// then the 4 x 4 lanes by shuffle_i32x4)
inline void transpose_16x16_epi32(const __m512i (&r)[16], __m512i (&out)[16]) {
  __m512i pair[16], quad[16];
  for (int i = 0; i < 8; ++i) {  // lane L: r[2i][4L + {0,1}] r[2i+1][...] / {2,3}
    pair[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    pair[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g)  // quad[4g + j], lane L: dword 4L + j of rows 4g..4g+3
    for (int h = 0; h < 2; ++h) {
      quad[4 * g + 2 * h] = _mm512_unpacklo_epi64(pair[4 * g + h], pair[4 * g + 2 + h]);
      quad[4 * g + 2 * h + 1] = _mm512_unpackhi_epi64(pair[4 * g + h], pair[4 * g + 2 + h]);
    }
  for (int j = 0; j < 4; ++j) {  // out[4L + j], lane g = quad[4g + j]'s lane L
    const __m512i c0 = _mm512_shuffle_i32x4(quad[j], quad[4 + j], 0x44);
    const __m512i c1 = _mm512_shuffle_i32x4(quad[j], quad[4 + j], 0xEE);
    const __m512i c2 = _mm512_shuffle_i32x4(quad[8 + j], quad[12 + j], 0x44);
    const __m512i c3 = _mm512_shuffle_i32x4(quad[8 + j], quad[12 + j], 0xEE);
    out[j] = _mm512_shuffle_i32x4(c0, c2, 0x88), out[4 + j] = _mm512_shuffle_i32x4(c0, c2, 0xDD);
    out[8 + j] = _mm512_shuffle_i32x4(c1, c3, 0x88), out[12 + j] = _mm512_shuffle_i32x4(c1, c3, 0xDD);
  }
}

// The panel of rows n0..n0+rows-1 in `storage`: 64 values of each row at a time, transposed by 4-value dwords into
// the panel's [K/4][16][4]; the group sums by vpdpbusd with ones (exact: <= 128 * GROUP in int32). Vectorized: the
// value-by-value copy and byte sums took ~10% of a prefill GEMM's time.
template <int BITS, int GROUP, typename ST, int ROWS>
inline VnniPanel unpack_vnni_panel(const RowLayout<ROWS>& layout, const ST* scale, int64_t n0, int64_t rows, int64_t K,
                                   uint8_t* storage) {
  const int64_t groups = K / GROUP;
  VnniPanel p{(int8_t*)storage, (float*)(storage + 16 * K), (int32_t*)(storage + 16 * K + 16 * groups * 4)};
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i group_sum = _mm512_setzero_si512();
  for (int64_t k0 = 0; k0 < K; k0 += 64) {
    const int count = (int)std::min<int64_t>(64, K - k0);
    __m512i w[16], quads[16];
    for (int r = 0; r < 16; ++r)
      w[r] = r < rows ? load_w64_in_order<BITS>(layout.origin(n0 + r, k0 * BITS / 8), K, k0, count)
                      : _mm512_setzero_si512();
    transpose_16x16_epi32(w, quads);
    for (int q = 0; q < count / 4; ++q) {
      _mm512_store_si512(p.w + (k0 / 4 + q) * 64, quads[q]);
      group_sum = _mm512_dpbusd_epi32(group_sum, ones, quads[q]);
      if ((k0 + 4 * q + 4) % GROUP == 0) {
        _mm512_store_si512(p.wsum + (k0 + 4 * q) / GROUP * 16, group_sum);
        group_sum = _mm512_setzero_si512();
      }
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int64_t g = 0; g < groups; ++g) p.scale[g * 16 + r] = r < rows ? scale_at(scale + (n0 + r) * groups, g) : 0.f;
  return p;
}

// One token's 16 outputs from a GEMM tile register: y[l] = v[l] * a_scale (+ bias[l]) for l < count, rounded to OT,
// as the scalar store does (value by value these stores took ~20% of a prefill GEMM's time)
template <typename BT, typename OT>
inline void store_tile_row(OT* y, __m512 v, float a_scale, const BT* bias, int64_t count) {
  if constexpr (std::is_same_v<OT, float> && std::is_same_v<BT, float>) {
    v = _mm512_mul_ps(v, _mm512_set1_ps(a_scale));
    if (count >= 16) {  // plain loads and stores: masked ones cost more on this AMD CPU
      if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
      _mm512_storeu_ps(y, v);
    } else {
      const __mmask16 mask = __mmask16((1u << count) - 1);
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias));
      _mm512_mask_storeu_ps(y, mask, v);
    }
  } else {
    alignas(64) float values[16];
    _mm512_store_ps(values, v);
    for (int64_t l = 0; l < count; ++l) {
      float value = values[l] * a_scale;
      if (bias) value += static_cast<float>(bias[l]);
      y[l] = static_cast<OT>(value);
    }
  }
}

// GEMM micro-tile: QC_VNNI_MR tokens (a[t], natural order, u8) x QC_VNNI_NR panels; returns, per token and panel,
// 16 lanes of sum_g scale_g * sum_k w_k (q_k - zero) in f.
template <int GROUP>
inline void vnni_gemm_tile(const VnniPanel* panels, const uint8_t* const* a, const int32_t* c, int64_t K,
                           __m512 f[QC_VNNI_MR][QC_VNNI_NR]) {
  constexpr int MR = QC_VNNI_MR, NR = QC_VNNI_NR;
  for (int t = 0; t < MR; ++t)
    for (int p = 0; p < NR; ++p) f[t][p] = _mm512_setzero_ps();
  __m512i neg_c[MR];
  for (int t = 0; t < MR; ++t) neg_c[t] = _mm512_set1_epi32(-c[t]);
  for (int64_t g = 0; g < K / GROUP; ++g) {
    __m512i acc[MR][NR];
    for (int p = 0; p < NR; ++p) {
      const __m512i wsum = _mm512_loadu_si512(panels[p].wsum + g * 16);
      for (int t = 0; t < MR; ++t) acc[t][p] = _mm512_mullo_epi32(neg_c[t], wsum);
    }
    for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k += 4) {
      __m512i w[NR];
      for (int p = 0; p < NR; ++p) w[p] = qc_in_register(_mm512_loadu_si512(panels[p].w + k * 16));
      for (int t = 0; t < MR; ++t) {
        int32_t quad;
        std::memcpy(&quad, a[t] + k, 4);
        const __m512i av = _mm512_set1_epi32(quad);
        for (int p = 0; p < NR; ++p) acc[t][p] = _mm512_dpbusd_epi32(acc[t][p], av, w[p]);
      }
    }
    for (int p = 0; p < NR; ++p) {
      const __m512 s = _mm512_loadu_ps(panels[p].scale + g * 16);
      for (int t = 0; t < MR; ++t) f[t][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][p]), s, f[t][p]);
    }
  }
}

template <int BITS, int GROUP, typename XT, typename ST, typename BT, typename OT, int ROWS>
void intx_linear_dynamic_int8_vnni(const XT* x, const uint8_t* packed, const ST* scale, const BT* bias, OT* y,
                                   int64_t M, int64_t N, int64_t K, int num_threads) {
  constexpr int CHUNK = vnni_chunk<BITS>;
  const int64_t row_bytes = K * BITS / 8, groups = K / GROUP;
  const RowLayout<ROWS> layout{packed, N, row_bytes};
  const int64_t K_pad = (K + CHUNK - 1) / CHUNK * CHUNK, chunks = K_pad / CHUNK;
  const bool parallel = M * N * K >= QC_PARALLEL_MIN_MACS;
  (void)num_threads; (void)parallel;
  auto store = [&](int64_t m, int64_t n, float v, float a_scale) {
    v *= a_scale;
    if (bias) v += static_cast<float>(bias[n]);
    y[m * N + n] = static_cast<OT>(v);
  };
  if (M < QC_GEMM_MIN_M) {
    // GEMV: every thread quantizes the few tokens itself (no barrier between quantizing and the dot products)
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
      static thread_local std::vector<uint8_t> act_storage;
      static thread_local std::vector<int32_t> offset_storage;
      uint8_t* act = thread_scratch(act_storage, (size_t)(M * K_pad));
      int32_t* lane_offsets = thread_scratch(offset_storage, (size_t)(M * chunks * 16));
      float a_scale[QC_GEMM_MIN_M];
      int32_t c[QC_GEMM_MIN_M];
      for (int64_t m = 0; m < M; ++m) {
        quantize_token_u8<XT, BITS == 4>(x + m * K, K, K_pad, act + m * K_pad, a_scale + m, c + m);
        if constexpr (BITS == 4) nibble_lane_offsets(act + m * K_pad, K, chunks, c[m], lane_offsets + m * chunks * 16);
      }
      vnni_row_blocks(
          layout, scale, M, groups,
          [&](auto mt, const GemvRows<ROWS>& rows, const ST* const* srows, float* out) {
            vnni_gemv_rows<BITS, GROUP, decltype(mt)::value, ST, ROWS>(rows, srows, act, lane_offsets, c, K, K_pad,
                                                                       out);
          },
          [&](int64_t m, int64_t n, float value) { store(m, n, value, a_scale[m]); });
    }
    return;
  }
  const TokenScratch<uint8_t> tokens = token_scratch<uint8_t>(M, K);  // shared by the team below
  uint8_t* act = tokens.act;
  float* a_scale = tokens.scale;
  int32_t* c = tokens.aux;
  constexpr int64_t BLOCK = 16 * QC_VNNI_NR;
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) quantize_token_u8<XT, false>(x + m * K, K, K, act + m * K, a_scale + m, c + m);
    static thread_local std::vector<uint8_t> panel_storage;
    const size_t panel_bytes = (vnni_panel_bytes(K, groups) + 63) / 64 * 64;
    uint8_t* storage = thread_scratch(panel_storage, QC_VNNI_NR * panel_bytes + 64);
    storage += (64 - (uintptr_t)storage % 64) % 64;
#pragma omp for schedule(dynamic)
    for (int64_t n0 = 0; n0 < N; n0 += BLOCK) {
      VnniPanel panels[QC_VNNI_NR];
      for (int p = 0; p < QC_VNNI_NR; ++p)
        panels[p] = unpack_vnni_panel<BITS, GROUP, ST, ROWS>(layout, scale, n0 + 16 * p,
                                                       std::max<int64_t>(0, std::min<int64_t>(16, N - n0 - 16 * p)), K,
                                                       storage + p * panel_bytes);
      for (int64_t m0 = 0; m0 < M; m0 += QC_VNNI_MR) {
        const int mr = (int)std::min<int64_t>(QC_VNNI_MR, M - m0);
        const uint8_t* a[QC_VNNI_MR];
        int32_t ct[QC_VNNI_MR];
        for (int t = 0; t < QC_VNNI_MR; ++t) {  // a short tail repeats its last token (results not stored)
          const int64_t m = m0 + std::min(t, mr - 1);
          a[t] = act + m * K, ct[t] = c[m];
        }
        __m512 f[QC_VNNI_MR][QC_VNNI_NR];
        vnni_gemm_tile<GROUP>(panels, a, ct, K, f);
        for (int t = 0; t < mr; ++t)
          for (int p = 0; p < QC_VNNI_NR; ++p) {
            const int64_t n = n0 + 16 * p;
            if (n < N) store_tile_row(y + (m0 + t) * N + n, f[t][p], a_scale[m0 + t], bias ? bias + n : bias, N - n);
          }
      }
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------------------------
// Entry point 1: int8 dynamic activations x intx weights. x [M, K], packed [N, K*BITS/8] (rows laid out as ROWS
// says: RowLayout), scale [N, K/GROUP], bias [N] or nullptr, y [M, N].
// ---------------------------------------------------------------------------------------------------------
template <int BITS, int GROUP, typename XT, typename ST, typename BT, typename OT, int ROWS = 1>
void intx_linear_dynamic_int8(const XT* x, const uint8_t* packed, const ST* scale, const BT* bias, OT* y,
                              int64_t M, int64_t N, int64_t K, int num_threads) {
  static_assert(BITS >= 1 && BITS <= 8, "BITS must be 1..8");
  static_assert(GROUP % 32 == 0, "GROUP must be a multiple of 32");
  static_assert(ROWS == 1 || BITS == 4 || BITS == 8, "interleaved rows are for one-plane (4- and 8-bit) weights");
#if defined(QC_X86_VNNI)
  if constexpr (vnni_fits<BITS, GROUP>) {
    intx_linear_dynamic_int8_vnni<BITS, GROUP, XT, ST, BT, OT, ROWS>(x, packed, scale, bias, y, M, N, K, num_threads);
    return;
  }
#endif
  const int64_t row_bytes = K * BITS / 8, groups = K / GROUP;
  const RowLayout<ROWS> layout{packed, N, row_bytes};
  const bool parallel = M * N * K >= QC_PARALLEL_MIN_MACS;
  (void)num_threads; (void)parallel;
  auto quantize_tokens = [&](int64_t m, act_t* act, float* a_scale, int32_t* a_zero) {
    quantize_token_int8_asym<XT>(x + m * K, K, act + m * K, a_scale + m, a_zero + m);
#if defined(QC_X86_AVX2)
    if constexpr (plane_order_x86<BITS>) to_plane_order(act + m * K, K);
#endif
  };
  if (M < QC_GEMM_MIN_M) {
    // GEMV: every thread quantizes the few tokens itself (no barrier between quantizing and the dot products)
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
      const TokenScratch<act_t> tokens = token_scratch<act_t>(M, K);  // this thread's own
      act_t* act = tokens.act;
      float* a_scale = tokens.scale;
      int32_t* a_zero = tokens.aux;
      for (int64_t m = 0; m < M; ++m) quantize_tokens(m, act, a_scale, a_zero);
#pragma omp for schedule(static) nowait
      for (int64_t n = 0; n < N; ++n) {
        const uint8_t* row = layout.row(n);
        for (int64_t m = 0; m < M; ++m) {
          float v = gemv_row<BITS, GROUP, ST>(row, scale + n * groups, act + m * K, a_zero[m], K) * a_scale[m];
          if (bias) v += static_cast<float>(bias[n]);
          y[m * N + n] = static_cast<OT>(v);
        }
      }
    }
    return;
  }
  const TokenScratch<act_t> tokens = token_scratch<act_t>(M, K);  // shared by the team below
  act_t* act = tokens.act;
  float* a_scale = tokens.scale;
  int32_t* a_zero = tokens.aux;
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) quantize_tokens(m, act, a_scale, a_zero);
    {
      static thread_local std::vector<w_t> wbuf_storage;
      static thread_local std::vector<int32_t> wsum_storage;
      w_t* wbuf = thread_scratch(wbuf_storage, (size_t)(QC_NB * K));
      int32_t* wsum = thread_scratch(wsum_storage, (size_t)(QC_NB * groups));
#pragma omp for schedule(static)
      for (int64_t n0 = 0; n0 < N; n0 += QC_NB) {
        const int64_t nb = std::min<int64_t>(QC_NB, N - n0);
        for (int64_t r = 0; r < nb; ++r)
          unpack_row<BITS, GROUP, true>(layout.row(n0 + r), K, wbuf + r * K, wsum + r * groups);
        for (int64_t m0 = 0; m0 < M; m0 += QC_MR) {
          const int mr = (int)std::min<int64_t>(QC_MR, M - m0);
          auto store_row = [&](int64_t r, const float* out) {
            const int64_t n = n0 + r;
            const float b = bias ? static_cast<float>(bias[n]) : 0.f;
            for (int t = 0; t < mr; ++t) y[(m0 + t) * N + n] = static_cast<OT>(out[t] * a_scale[m0 + t] + b);
          };
#if defined(QC_ARM_I8MM)
          for (int64_t r = 0; r < nb; r += 2) {
            const int64_t r1 = std::min<int64_t>(r + 1, nb - 1);
            float out0[QC_MR], out1[QC_MR];
            gemm_2rows_tokens_i8mm<GROUP, ST>(wbuf + r * K, wbuf + r1 * K, wsum + r * groups, wsum + r1 * groups,
                                              scale + (n0 + r) * groups, scale + (n0 + r1) * groups, act + m0 * K,
                                              a_zero + m0, mr, K, out0, out1);
            store_row(r, out0);
            if (r1 != r) store_row(r1, out1);
          }
#else
          for (int64_t r = 0; r < nb; ++r) {
            float out[QC_MR];
            gemm_row_tokens<GROUP, ST>(wbuf + r * K, wsum + r * groups, scale + (n0 + r) * groups, act + m0 * K,
                                       a_zero + m0, mr, K, out);
            store_row(r, out);
          }
#endif
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Entry point 2: float activations x intx weights (weight-only): each row is dequantized to float once into a
// per-thread buffer, then dotted with every token.
// ---------------------------------------------------------------------------------------------------------
inline float dot_f32(const float* a, const float* b, int64_t K) {
  int64_t k = 0;
  float acc = 0.f;
#if defined(QC_X86_AVX2)
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), s1);
  }
  acc = hsum_ps(_mm256_add_ps(s0, s1));
#elif defined(QC_ARM_NEON)
  float32x4_t s0 = vdupq_n_f32(0.f), s1 = vdupq_n_f32(0.f);
  for (; k + 8 <= K; k += 8) {
    s0 = vfmaq_f32(s0, vld1q_f32(a + k), vld1q_f32(b + k));
    s1 = vfmaq_f32(s1, vld1q_f32(a + k + 4), vld1q_f32(b + k + 4));
  }
  acc = vaddvq_f32(vaddq_f32(s0, s1));
#endif
  for (; k < K; ++k) acc += a[k] * b[k];
  return acc;
}

// dot products of up to QC_MR rows a_t = a + t * K with one vector b
inline void dot_f32_tokens(const float* a, const float* b, int mr, int64_t K, float* out) {
#if defined(QC_X86_AVX2)
  __m256 acc[QC_MR];
  for (int t = 0; t < QC_MR; ++t) acc[t] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 bv = _mm256_loadu_ps(b + k);
    for (int t = 0; t < QC_MR; ++t)
      if (t < mr) acc[t] = _mm256_fmadd_ps(_mm256_loadu_ps(a + t * K + k), bv, acc[t]);
  }
  for (int t = 0; t < mr; ++t) {
    out[t] = hsum_ps(acc[t]);
    for (int64_t j = k; j < K; ++j) out[t] += a[t * K + j] * b[j];
  }
#else
  for (int t = 0; t < mr; ++t) out[t] = dot_f32(a + t * K, b, K);
#endif
}

#if defined(QC_X86_AVX2)
// GEMV for float activations: weights unpacked and converted in registers, no float copy of the row.
template <int BITS, int GROUP, typename ST>
inline void gemv_row_float_x86(const uint8_t* row, const ST* srow, const float* x, int64_t M, int64_t K, float* out) {
  __m256 facc[QC_GEMM_MIN_M];
  for (int t = 0; t < QC_GEMM_MIN_M; ++t) facc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / GROUP; ++g) {
    __m256 gacc[QC_GEMM_MIN_M];
    for (int t = 0; t < QC_GEMM_MIN_M; ++t) gacc[t] = _mm256_setzero_ps();
    for (int c = 0; c < GROUP; c += 32) {
      const int64_t k0 = g * GROUP + c;
      __m256i wl, wh;
      unpack32_x86<BITS, false>(row, K, k0, wl, wh);
      const __m256 w[4] = {_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(wl))),
                           _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(wl, 1))),
                           _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(wh))),
                           _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(wh, 1)))};
      for (int t = 0; t < QC_GEMM_MIN_M; ++t) {
        if (t >= M) break;
        for (int q = 0; q < 4; ++q) gacc[t] = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(x + t * K + k0 + 8 * q), gacc[t]);
      }
    }
    const __m256 sv = _mm256_set1_ps(static_cast<float>(srow[g]));
    for (int t = 0; t < QC_GEMM_MIN_M; ++t)
      if (t < M) facc[t] = _mm256_fmadd_ps(gacc[t], sv, facc[t]);
  }
  for (int t = 0; t < M; ++t) out[t] = hsum_ps(facc[t]);
}
#endif

#if defined(QC_ARM_NEON)
// GEMV for float activations on NEON: weights unpacked to int8 and converted in registers, no float copy of the row.
template <int BITS, int GROUP, typename ST>
inline void gemv_row_float_arm(const uint8_t* row, const ST* srow, const float* x, int64_t M, int64_t K, float* out) {
  float32x4_t facc[QC_GEMM_MIN_M];
  for (int t = 0; t < QC_GEMM_MIN_M; ++t) facc[t] = vdupq_n_f32(0.f);
  for (int64_t g = 0; g < K / GROUP; ++g) {
    float32x4_t gacc[QC_GEMM_MIN_M][2];  // two FMA chains per token
    for (int t = 0; t < QC_GEMM_MIN_M; ++t) gacc[t][0] = gacc[t][1] = vdupq_n_f32(0.f);
    for (int c = 0; c < GROUP; c += 32) {
      const int64_t k0 = g * GROUP + c;
      int8x16_t wl, wh;
      unpack32_arm<BITS>(row, K, k0, wl, wh);
      const int16x8_t h[4] = {vmovl_s8(vget_low_s8(wl)), vmovl_high_s8(wl), vmovl_s8(vget_low_s8(wh)), vmovl_high_s8(wh)};
      float32x4_t w[8];
      for (int q = 0; q < 4; ++q) {
        w[2 * q] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[q])));
        w[2 * q + 1] = vcvtq_f32_s32(vmovl_high_s16(h[q]));
      }
      for (int t = 0; t < QC_GEMM_MIN_M; ++t) {
        if (t >= M) break;
        for (int q = 0; q < 8; ++q) gacc[t][q % 2] = vfmaq_f32(gacc[t][q % 2], w[q], vld1q_f32(x + t * K + k0 + 4 * q));
      }
    }
    const float s = static_cast<float>(srow[g]);
    for (int t = 0; t < QC_GEMM_MIN_M; ++t)
      if (t < M) facc[t] = vfmaq_n_f32(facc[t], vaddq_f32(gacc[t][0], gacc[t][1]), s);
  }
  for (int t = 0; t < M; ++t) out[t] = vaddvq_f32(facc[t]);
}
#endif

#if defined(QC_X86_VNNI)
// Float GEMV (AVX-512F/BW; built where the header's AVX-512 kernels are): the weights never leave registers and
// are converted by one table lookup per 16 values (AVX2's GEMV: ~0.7 instructions per weight to convert). A chunk of
// 128 values is read as 16 lanes: lane l holds the bit fields of values k0 + 8l .. k0 + 8l + 7, W bits each for a
// plane of width W (a 32-bit word of 4-bit nibbles, 16 bits of 2-bit fields, a byte of bits), so shifting every
// lane by W gives the next of its values: vector j holds values k0 + 8l + j. The token is stored in that order
// once per call (`float_chunk_order`). Each chunk's products are summed per lane and multiplied by the lane's group
// scale: y = sum_g scale_g * sum_k w_k x_k, as the AVX2 GEMV sums. 8-bit weights keep the AVX2 GEMV (a byte per
// lane needs more instructions than it converts; measured slower).
constexpr int QC_FLOAT_GEMV_CHUNK = 128;
template <int BITS, int GROUP>
constexpr bool float_gemv_fits = BITS < 8 && (QC_FLOAT_GEMV_CHUNK % GROUP == 0 || GROUP % QC_FLOAT_GEMV_CHUNK == 0);

// One token in chunk order: xc[k0 + 16 j + l] = x[k0 + V l + j], zero past K (K_pad: K rounded up to the chunk).
template <int V, typename XT>
inline void float_chunk_order(const XT* x, int64_t K, int64_t K_pad, float* xc) {
  int64_t k0 = 0;
  if constexpr (std::is_same_v<XT, float>) {
    const __m512i lane = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(V));
    for (; k0 + 16 * V <= K; k0 += 16 * V)
      for (int j = 0; j < V; ++j)
        _mm512_storeu_ps(xc + k0 + 16 * j, _mm512_i32gather_ps(_mm512_add_epi32(lane, _mm512_set1_epi32(j)), x + k0, 4));
  }
  for (; k0 < K_pad; k0 += 16 * V)
    for (int j = 0; j < V; ++j)
      for (int l = 0; l < 16; ++l) {
        const int64_t k = k0 + V * l + j;
        xc[k0 + 16 * j + l] = k < K ? static_cast<float>(x[k]) : 0.f;
      }
}

// The 16 lanes of the W-bit plane's chunk starting at p (`values` <= 128 of them, a multiple of 32; 0 past them).
template <int W>
inline __m512i plane_lanes(const uint8_t* p, int values) {
  const int bytes = values * W / 8;
  if constexpr (W == 4) {  // 4-byte lanes: 64 bytes, a partial chunk a multiple of 16 bytes
    return load_bytes(p, bytes);
  } else if constexpr (W == 2) {  // 2-byte lanes
    const __m256i v = bytes >= 32 ? _mm256_loadu_si256((const __m256i*)p)
                                  : _mm256_maskz_loadu_epi8((__mmask32)((1u << bytes) - 1), p);
    return _mm512_cvtepu16_epi32(v);
  } else {  // 1-byte lanes
    static_assert(W == 1, "planes of 4, 2, 1 bits");
    const __m128i v = bytes >= 16 ? _mm_loadu_si128((const __m128i*)p)
                                  : _mm_maskz_loadu_epi8((__mmask16)((1u << bytes) - 1), p);
    return _mm512_cvtepu8_epi32(v);
  }
}

// The lanes of row's W-bit plane (if BITS has one) for the chunk at k0, prefetching `ahead` bytes further on.
template <int BITS, int W>
inline void load_plane_lanes(const uint8_t* row, int64_t K, int64_t k0, int count, int64_t ahead, __m512i& lanes) {
  if constexpr ((BITS & W) != 0) {
    const uint8_t* p = row + (int64_t)(BITS & ~(2 * W - 1)) * K / 8 + k0 * W / 8;
    _mm_prefetch((const char*)(p + ahead), _MM_HINT_T0);
    lanes = plane_lanes<W>(p, count);
  }
}

// The float weights w = u - 2^(BITS-1) of vector j from the planes' lanes, which each call shifts on to vector j+1.
// One plane of <= 4 bits: a 16-entry table lookup (vpermps reads an index's low 4 bits; the table ignores the bits
// above the field); 3, 5-7 bits: fields joined in int (lanes[p]: the plane of width 8 >> p).
template <int BITS>
inline __m512 next_weights(__m512i (&lanes)[4], __m512 table) {
  if constexpr (BITS == 4 || BITS == 2 || BITS == 1) {
    constexpr int p = BITS == 4 ? 1 : BITS == 2 ? 2 : 3;
    const __m512 w = _mm512_permutexvar_ps(lanes[p], table);
    lanes[p] = _mm512_srli_epi32(lanes[p], BITS);
    return w;
  } else {
    __m512i u = _mm512_setzero_si512();
    for (int p = 1; p < 4; ++p) {
      const int W = 8 >> p;
      if ((BITS & W) == 0) continue;
      u = _mm512_or_si512(u, _mm512_slli_epi32(_mm512_and_si512(lanes[p], _mm512_set1_epi32((1 << W) - 1)), BITS & (W - 1)));
      lanes[p] = _mm512_srli_epi32(lanes[p], W);
    }
    if constexpr (BITS < 4) return _mm512_permutexvar_ps(u, table);
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(u, _mm512_set1_epi32(1 << (BITS - 1))));
  }
}

// How float_gemv_rows multiplies a chunk's weights with the tokens; both give sum_k w_k x_k per lane.
// FloatTableDot: 8 steps of 16 values, each weight looked up as a float (next_weights), one FMA per 16 products; the
// token in float, chunk order (float_chunk_order). Any width below 8.
template <int BITS>
struct FloatTableDot {
  static constexpr int bits = BITS;
  static constexpr int STEPS = QC_FLOAT_GEMV_CHUNK / 16;
  static constexpr int parts(int MT) { return MT == 1 ? 2 : 1; }  // FMA chains per (row, token): two at one token
  using Word = float;
  static constexpr int64_t token_words(int64_t K_pad) { return K_pad; }
  struct Row { __m512i lanes[4]; };  // [p]: the plane of width 8 >> p (p = 0, 8-bit, never here)
  __m512 table;
  FloatTableDot() {
    alignas(64) float values[16];  // value of each 4-bit index (its bits above BITS ignored); unused above 4 bits
    for (int i = 0; i < 16; ++i) values[i] = (float)((i & ((1 << std::min(BITS, 4)) - 1)) - (1 << (BITS - 1)));
    table = _mm512_load_ps(values);
  }
  template <typename XT>
  static void store_token(const XT* x, int64_t K, int64_t K_pad, float* xc, float*) {
    float_chunk_order<STEPS, XT>(x, K, K_pad, xc);
  }
  void load(const uint8_t* row, int64_t K, int64_t k0, int count, int64_t ahead, Row& r) const {
    load_plane_lanes<BITS, 4>(row, K, k0, count, ahead, r.lanes[1]);
    load_plane_lanes<BITS, 2>(row, K, k0, count, ahead, r.lanes[2]);
    load_plane_lanes<BITS, 1>(row, K, k0, count, ahead, r.lanes[3]);
  }
  template <int MT, int R, int NP>
  void step(int j, const float* xc, int64_t stride, int64_t k0, Row (&rows)[R], __m512 (&part)[R][MT][NP]) const {
    __m512 x[MT];
    for (int t = 0; t < MT; ++t) x[t] = _mm512_loadu_ps(xc + t * stride + k0 + 16 * j);
    for (int r = 0; r < R; ++r) {
      const __m512 w = next_weights<BITS>(rows[r].lanes, table);
      for (int t = 0; t < MT; ++t) part[r][t][j % NP] = _mm512_fmadd_ps(w, x[t], part[r][t][j % NP]);
    }
  }
};

// Bf16PairDot (4-bit, CPUs with AVX512_BF16): vdpbf16ps multiplies 32 bf16 pairs into 16 float lanes, exactly (the
// products of 8-bit significands fit a float), so one instruction does two FMAs' work and a weight is one vpermw
// lookup per 32. A lane's 32-bit word holds 8 nibbles, values 8l..8l+7: its low half 8l..8l+3, its high half
// 8l+4..8l+7, so step j pairs value 8l+j (low bf16) with 8l+4+j (high bf16) after one 16-bit shift. The token is
// stored in that pair order as SPLIT bf16 terms x = x_1 + ... + x_SPLIT (each the bf16 rounding of what is left):
// bf16 activations are one term (exact), float and half two: 16 significant bits, so each product is within
// 2^-17 of the float one (measured on SmolLM2's decode sweep, benchmarks/cpu_intx_kernels.cpp: three terms, exact
// for float, ran no faster than FloatTableDot; two ran 1.1-1.3x faster, at the int8 VNNI GEMV's speed).
#if defined(QC_X86_BF16_DOT)
QC_BF16_TARGET_BEGIN
template <int SPLIT>
struct Bf16PairDot {
  static constexpr int bits = 4;
  static constexpr int STEPS = 4;
  static constexpr int parts(int MT) { return SPLIT == 1 && MT == 1 ? 2 : SPLIT; }
  using Word = uint32_t;
  static constexpr int64_t token_words(int64_t K_pad) { return K_pad / 2 * SPLIT; }
  struct Row { __m512i u; };
  __m512i table;  // the bf16 of (i & 15) - 8 for each 5-bit index i (vpermw's index: bit 4 is the next nibble's)
  Bf16PairDot() {
    alignas(64) uint16_t values[32];
    for (int i = 0; i < 32; ++i) {
      const float f = (float)((i & 15) - 8);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      values[i] = (uint16_t)(bits >> 16);  // exact: small integers need no rounding
    }
    table = _mm512_load_si512(values);
  }
  // xb[(chunk * 4 + j) * 16 * SPLIT + 16 * s + l] = term s of (x[k0 + 8l + j], x[k0 + 8l + 4 + j]) as two bf16
  template <typename XT>
  static void store_token(const XT* x, int64_t K, int64_t K_pad, uint32_t* xb, float* xc) {
    float_chunk_order<8, XT>(x, K, K_pad, xc);  // xc[k0 + 16 j + l] = x[k0 + 8 l + j]
    for (int64_t k0 = 0; k0 < K_pad; k0 += QC_FLOAT_GEMV_CHUNK)
      for (int j = 0; j < 4; ++j) {
        __m512 lo = _mm512_loadu_ps(xc + k0 + 16 * j), hi = _mm512_loadu_ps(xc + k0 + 16 * (j + 4));
        // a term past an inf or NaN is 0, not inf - inf: those products stay what the float ones are
        const __mmask16 lo_finite = ~_mm512_fpclass_ps_mask(lo, 0x99), hi_finite = ~_mm512_fpclass_ps_mask(hi, 0x99);
        for (int s = 0; s < SPLIT; ++s) {
          const __m512i lo16 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
          const __m512i hi16 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
          _mm512_storeu_si512(xb + (k0 / QC_FLOAT_GEMV_CHUNK * 4 + j) * 16 * SPLIT + 16 * s,
                              _mm512_or_si512(lo16, _mm512_slli_epi32(hi16, 16)));
          lo = _mm512_maskz_sub_ps(lo_finite, lo, _mm512_castsi512_ps(_mm512_slli_epi32(lo16, 16)));
          hi = _mm512_maskz_sub_ps(hi_finite, hi, _mm512_castsi512_ps(_mm512_slli_epi32(hi16, 16)));
        }
      }
  }
  void load(const uint8_t* row, int64_t, int64_t k0, int count, int64_t ahead, Row& r) const {
    const uint8_t* p = row + k0 / 2;
    _mm_prefetch((const char*)(p + ahead), _MM_HINT_T0);
    r.u = load_bytes(p, count / 2);
  }
  template <int MT, int R, int NP>
  void step(int j, const uint32_t* xb, int64_t stride, int64_t k0, Row (&rows)[R], __m512 (&part)[R][MT][NP]) const {
    __m512bh x[MT][SPLIT];
    for (int t = 0; t < MT; ++t)
      for (int s = 0; s < SPLIT; ++s)
        x[t][s] = (__m512bh)_mm512_loadu_si512(xb + t * stride + (k0 / QC_FLOAT_GEMV_CHUNK * 4 + j) * 16 * SPLIT + 16 * s);
    for (int r = 0; r < R; ++r) {
      const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(j == 0 ? rows[r].u : _mm512_srli_epi16(rows[r].u, 4 * j), table);
      for (int t = 0; t < MT; ++t)
        for (int s = 0; s < SPLIT; ++s) {
          const int p = NP > SPLIT ? j % NP : s;
          part[r][t][p] = _mm512_dpbf16_ps(part[r][t][p], w, x[t][s]);
        }
    }
  }
};
#endif

// out[r * MT + t] for QC_VNNI_ROWS rows and MT tokens (xs: the tokens as Dot stores them, `stride` words apart).
template <class Dot, int GROUP, int MT, typename ST, int ROWS>
inline void float_gemv_rows(const Dot& dot, const GemvRows<ROWS>& row, const ST* const* srow,
                            const typename Dot::Word* xs, int64_t stride, int64_t K, int64_t K_pad, float* out) {
  constexpr int CHUNK = QC_FLOAT_GEMV_CHUNK, R = QC_VNNI_ROWS, NP = Dot::parts(MT);
  const int64_t groups = K / GROUP;
  __m512 facc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) facc[r][t] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K_pad; k0 += CHUNK) {
    const int count = (int)std::min<int64_t>(CHUNK, K - k0);
    typename Dot::Row rows[R];
    __m512 part[R][MT][NP];
    for (int r = 0; r < R; ++r) {
      dot.load(row.origin(r, k0 * Dot::bits / 8), K, k0, count, row.ahead, rows[r]);
      _mm_prefetch((const char*)(srow[r] + k0 / GROUP + row.ahead_rows * groups), _MM_HINT_T0);
      for (int t = 0; t < MT; ++t)
        for (int i = 0; i < NP; ++i) part[r][t][i] = _mm512_setzero_ps();
    }
    for (int j = 0; j < Dot::STEPS; ++j) dot.template step<MT>(j, xs, stride, k0, rows, part);
    for (int r = 0; r < R; ++r) {
      const __m512 s = chunk_scales<CHUNK, GROUP, ST>(srow[r], k0, groups);
      for (int t = 0; t < MT; ++t) {
        __m512 sum = part[r][t][0];
        for (int i = 1; i < NP; ++i) sum = _mm512_add_ps(sum, part[r][t][i]);
        facc[r][t] = _mm512_fmadd_ps(sum, s, facc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) out[r * MT + t] = _mm512_reduce_add_ps(facc[r][t]);
}

template <class Dot, int GROUP, int ROWS, typename XT, typename ST, typename BT, typename OT>
void float_gemv_with(const XT* x, const uint8_t* packed, const ST* scale, const BT* bias, OT* y, int64_t M,
                     int64_t N, int64_t K, int64_t row_bytes, int num_threads) {
  const RowLayout<ROWS> layout{packed, N, row_bytes};
  const int64_t groups = K / GROUP, K_pad = (K + QC_FLOAT_GEMV_CHUNK - 1) / QC_FLOAT_GEMV_CHUNK * QC_FLOAT_GEMV_CHUNK;
  const int64_t stride = Dot::token_words(K_pad);
  const bool parallel = M * N * K >= QC_PARALLEL_MIN_MACS;
  (void)num_threads; (void)parallel;
  const Dot dot;
  // every thread stores the few tokens itself (no barrier between that and the dot products)
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
    static thread_local std::vector<typename Dot::Word> xs_storage;
    static thread_local std::vector<float> xc_storage;
    typename Dot::Word* xs = thread_scratch(xs_storage, (size_t)(M * stride));
    float* xc = thread_scratch(xc_storage, (size_t)K_pad);
    for (int64_t m = 0; m < M; ++m) Dot::store_token(x + m * K, K, K_pad, xs + m * stride, xc);
    vnni_row_blocks(
        layout, scale, M, groups,
        [&](auto mt, const GemvRows<ROWS>& rows, const ST* const* srows, float* out) {
          float_gemv_rows<Dot, GROUP, decltype(mt)::value, ST, ROWS>(dot, rows, srows, xs, stride, K, K_pad, out);
        },
        [&](int64_t m, int64_t n, float value) {
          y[m * N + n] = static_cast<OT>(value + (bias ? static_cast<float>(bias[n]) : 0.f));
        });
  }
}
#if defined(QC_X86_BF16_DOT)
QC_BF16_TARGET_END
#endif

// Digits GEMV (4-bit, float32 tokens): vpdpbusd, as the int8 GEMV, on the nibbles it reads (an and, a shift, an and
// per 64 bytes), against the token written as exact integers. Lane l of a 128-value chunk holds values k0 + 8l ..
// k0 + 8l + 7 (the int8 GEMV's lane); all chunks' lane l form lane class l, with one power of two per class and
// token: m = round(x * 2^(21 - e_l)), e_l the exponent of the class's largest |x| (at least -100), so |m| <= 2^22
// and x is within 2^(e_l - 22) of m * 2^(e_l - 21): 2^-22 of the class's largest value (the bf16 pairs' products:
// 2^-17 of each). m = d2 * 2^16 + d1 * 2^8 + d0 in signed 8-bit digits; per lane and digit, two vpdpbusd (even and
// odd values) sum u * d exactly. The top digit's chain, shifted by 8, starts the middle one's; the low one's starts
// from -8 * sum(m) (w = u - 8), so v = c0 + (c1 << 8) is the lane's exact sum of w * m (|v| <= 2^28; int32 wraps
// on the way, exactly). Per 128 weights and row: 6 vpdpbusd and 1 FMA on the pipe that also runs vdpbf16ps (the
// bf16 pairs: 8 + 1). The class's power of two multiplies each row's float accumulator once, after the last chunk.
// A row's last chunk of 64 values or fewer (K = 576: half of one) runs on 256-bit vectors. Inf and NaN have no
// digits: a call whose tokens hold one takes the bf16 pairs or the float table.
constexpr int QC_DIGITS = 3;

// Token m's digits, per-lane start values and lane-class powers of two, `chunks` chunks per token:
// digits[(m * chunks + c) * 384 + 64 * v + b]: vector v = 2 i + odd holds digit i of the chunk's even (odd) values,
// byte b of the int8 GEMV's order; starts[(m * chunks + c) * 16 + l]: -8 * sum of m over lane l;
// powers[m * 16 + l] = 2^(e_l - 21).
struct TokenDigits {
  int8_t* digits;
  int32_t* starts;
  float* powers;
};

inline bool all_finite(const float* x, int64_t n) {
  const __m512i exponent = _mm512_set1_epi32(0x7F800000);  // all ones: +-inf, NaN
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_loadu_si512(x + i), exponent), exponent);
  for (; i < n; ++i) bad |= !std::isfinite(x[i]);
  return bad == 0;
}

// One token's digits (x: K floats; the chunks past K read as zeros).
inline void float_token_digits(const float* x, int64_t K, int64_t K_pad, int8_t* digits, int32_t* starts,
                               float* powers) {
  const int64_t chunks = K_pad / 128;
  auto chunk_vector = [&](int64_t c, int i) {  // values c * 128 + 16 i .. + 15
    const int64_t k = c * 128 + 16 * i;
    if (k + 16 <= K) return _mm512_loadu_ps(x + k);
    if (k >= K) return _mm512_setzero_ps();
    return _mm512_maskz_loadu_ps((__mmask16)((1u << (K - k)) - 1), x + k);
  };
  // each lane class's largest |x|: vector i of a chunk holds classes 2i (its lanes 0-7) and 2i + 1 (8-15)
  __m512 big[8];
  for (int i = 0; i < 8; ++i) big[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c)
    for (int i = 0; i < 8; ++i) big[i] = _mm512_max_ps(big[i], _mm512_abs_ps(chunk_vector(c, i)));
  __m512 up[8];  // 2^(21 - e) per value of vector i
  alignas(64) float class_power[16];
  for (int i = 0; i < 8; ++i) {
    __m512 b = big[i];  // the largest of each half, in all 8 of its lanes
    b = _mm512_max_ps(b, _mm512_permute_ps(b, 0x4E));
    b = _mm512_max_ps(b, _mm512_permute_ps(b, 0xB1));
    b = _mm512_max_ps(b, _mm512_shuffle_f32x4(b, b, 0xB1));
    const __m512 e = _mm512_max_ps(_mm512_getexp_ps(b), _mm512_set1_ps(-100.f));  // zeros: e = -100, m = 0
    up[i] = _mm512_scalef_ps(_mm512_set1_ps(1.f), _mm512_sub_ps(_mm512_set1_ps(21.f), e));
    const __m512 down = _mm512_scalef_ps(_mm512_set1_ps(1.f), _mm512_sub_ps(e, _mm512_set1_ps(21.f)));
    class_power[2 * i] = _mm512_cvtss_f32(down);
    class_power[2 * i + 1] = _mm512_cvtss_f32(_mm512_castps256_ps512(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(down), 1))));
  }
  std::memcpy(powers, class_power, sizeof(class_power));
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i ones = _mm512_set1_epi8(1), bias = _mm512_set1_epi8((char)0x80);
  for (int64_t c = 0; c < chunks; ++c) {
    int8_t* d = digits + c * QC_DIGITS * 128;
    for (int q = 0; q < 4; ++q) {  // 32 values: 16 evens to the chunk's first half, 16 odds to its second
      const __m512i lo = _mm512_cvtps_epi32(_mm512_mul_ps(chunk_vector(c, 2 * q), up[2 * q]));
      const __m512i hi = _mm512_cvtps_epi32(_mm512_mul_ps(chunk_vector(c, 2 * q + 1), up[2 * q + 1]));
      for (int half = 0; half < 2; ++half) {
        __m512i m = _mm512_permutex2var_epi32(lo, half ? odd : even, hi);
        for (int i = 0; i < QC_DIGITS; ++i) {  // d_i = m's low byte as signed; m = (m - d_i) / 256
          const __m512i digit = _mm512_srai_epi32(_mm512_slli_epi32(m, 24), 24);
          _mm_storeu_si128((__m128i*)(d + 128 * i + 64 * half + 16 * q), _mm512_cvtepi32_epi8(digit));
          m = _mm512_srai_epi32(_mm512_sub_epi32(m, digit), 8);
        }
      }
    }
    // per lane: sum of m = sum_i 256^i sum(d_i), each sum(d_i) = sum(d_i + 128) - 8 * 128
    __m512i sum_m = _mm512_setzero_si512();
    for (int i = QC_DIGITS - 1; i >= 0; --i) {
      __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(_mm512_loadu_si512(d + 128 * i), bias), ones);
      sum = _mm512_dpbusd_epi32(sum, _mm512_xor_si512(_mm512_loadu_si512(d + 128 * i + 64), bias), ones);
      sum_m = _mm512_add_epi32(_mm512_slli_epi32(sum_m, 8), _mm512_sub_epi32(sum, _mm512_set1_epi32(8 * 128)));
    }
    _mm512_storeu_si512(starts + c * 16, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum_m, 3)));
  }
}

// A lane's exact sum of (u - 8) * m from the nibbles lo (even values) and hi (odd) and the chunk's digit vectors d
// (DigitsDot's order) and start: 512-bit, or 256-bit for the first 8 lanes.
inline __m512i digit_lane_sums(__m512i lo, __m512i hi, const __m512i* d, __m512i start) {
  const __m512i c2 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, d[4]), hi, d[5]);
  const __m512i c1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(c2, 8), lo, d[2]), hi, d[3]);
  const __m512i c0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, lo, d[0]), hi, d[1]);
  return _mm512_add_epi32(c0, _mm512_slli_epi32(c1, 8));
}
inline __m256i digit_lane_sums(__m256i lo, __m256i hi, const __m256i* d, __m256i start) {
  const __m256i c2 = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, d[4]), hi, d[5]);
  const __m256i c1 = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_slli_epi32(c2, 8), lo, d[2]), hi, d[3]);
  const __m256i c0 = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(start, lo, d[0]), hi, d[1]);
  return _mm256_add_epi32(c0, _mm256_slli_epi32(c1, 8));
}

// The sums of 4 vectors' lanes, in one vector (one combined reduction instead of four)
inline __m128 reduce_add_4(const __m512 (&f)[4]) {
  __m256 h[4];
  for (int r = 0; r < 4; ++r)
    h[r] = _mm256_add_ps(_mm512_castps512_ps256(f[r]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f[r]), 1)));
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(h[0], h[1]), _mm256_unpackhi_ps(h[0], h[1]));  // a0+a2 b0+b2 a1+a3 b1+b3
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(h[2], h[3]), _mm256_unpackhi_ps(h[2], h[3]));
  const __m256 abcd = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// out[r * MT + t] for the QC_VNNI_ROWS rows: the whole chunks, then the last, partial one. (Each row's pointer stepped
// one chunk on, interleaved rows 64 bytes apart, with one scale prefetch per chunk for the block, ran 1.2x faster in
// L2 but 0.95x from DRAM; this loop's per-row addresses and prefetches keep both: benchmarks/experiments/
// cpu_float_gemv_ab.cpp, BENCHMARKS.md "Issue 24: session 17".)
template <int GROUP, int MT, typename ST, int ROWS>
inline void digits_gemv_rows(const GemvRows<ROWS>& row, const ST* const* srow, const TokenDigits& t, int64_t K,
                             int64_t chunks, float* out) {
  constexpr int CHUNK = 128, R = QC_VNNI_ROWS, V = 2 * QC_DIGITS;
  static_assert(R == 4, "reduce_add_4");
  const int64_t whole = K / CHUNK, groups = K / GROUP;
  const int tail = (int)(K - whole * CHUNK);
  const int64_t pf_s = row.ahead_rows * groups;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 facc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) facc[m][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < whole; ++c) {
    const int64_t k0 = c * CHUNK;
    __m512i d[MT][V], start[MT];
    for (int m = 0; m < MT; ++m) {
      const int8_t* dm = t.digits + (m * chunks + c) * V * 64;
      for (int v = 0; v < V; ++v) d[m][v] = qc_in_register(_mm512_loadu_si512(dm + 64 * v));
      start[m] = _mm512_loadu_si512(t.starts + (m * chunks + c) * 16);
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = row.origin(r, k0 / 2) + k0 / 2;
      _mm_prefetch((const char*)(wr + row.ahead), _MM_HINT_T0);
      _mm_prefetch((const char*)(srow[r] + k0 / GROUP + pf_s), _MM_HINT_T0);
      const __m512 s = chunk_scales<CHUNK, GROUP, ST, true>(srow[r], k0, groups);
      const __m512i p = qc_in_register(_mm512_loadu_si512(wr));
      const __m512i lo = _mm512_and_si512(p, m4), hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);
      for (int m = 0; m < MT; ++m)
        facc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(digit_lane_sums(lo, hi, d[m], start[m])), s, facc[m][r]);
    }
  }
  if (tail != 0) {
    const int64_t c = whole, k0 = whole * CHUNK;
    if (tail <= 64) {  // lanes 0-7 (values 0-63): 256-bit
      const __m256i m4h = _mm256_set1_epi8(0x0F);
      __m256i d[MT][V], start[MT];
      for (int m = 0; m < MT; ++m) {
        const int8_t* dm = t.digits + (m * chunks + c) * V * 64;
        for (int v = 0; v < V; ++v) d[m][v] = qc_in_register(_mm256_loadu_si256((const __m256i*)(dm + 64 * v)));
        start[m] = _mm256_loadu_si256((const __m256i*)(t.starts + (m * chunks + c) * 16));
      }
      for (int r = 0; r < R; ++r) {
        const uint8_t* wr = row.origin(r, k0 / 2) + k0 / 2;
        _mm_prefetch((const char*)(wr + row.ahead), _MM_HINT_T0);
        _mm_prefetch((const char*)(srow[r] + k0 / GROUP + pf_s), _MM_HINT_T0);
        const __m256 s = _mm512_castps512_ps256(chunk_scales<CHUNK, GROUP, ST>(srow[r], k0, groups));
        const __m256i p = tail == 64 ? _mm256_loadu_si256((const __m256i*)wr)
                                     : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)wr));
        const __m256i lo = _mm256_and_si256(p, m4h), hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), m4h);
        for (int m = 0; m < MT; ++m) {
          const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(digit_lane_sums(lo, hi, d[m], start[m])), s);
          facc[m][r] = _mm512_add_ps(facc[m][r], _mm512_zextps256_ps512(f));
        }
      }
    } else {  // the whole chunks' body with the bytes masked in, written out again: the two as one generic lambda
      // (std::true_type / false_type) compiled to other register choices and ran 0.94x hot, 0.95x the sweep
      // (cpu_float_gemv_ab.cpp, 31 rounds, session 17)
      __m512i d[MT][V], start[MT];
      for (int m = 0; m < MT; ++m) {
        const int8_t* dm = t.digits + (m * chunks + c) * V * 64;
        for (int v = 0; v < V; ++v) d[m][v] = qc_in_register(_mm512_loadu_si512(dm + 64 * v));
        start[m] = _mm512_loadu_si512(t.starts + (m * chunks + c) * 16);
      }
      for (int r = 0; r < R; ++r) {
        const uint8_t* wr = row.origin(r, k0 / 2) + k0 / 2;
        _mm_prefetch((const char*)(wr + row.ahead), _MM_HINT_T0);
        _mm_prefetch((const char*)(srow[r] + k0 / GROUP + pf_s), _MM_HINT_T0);
        const __m512 s = chunk_scales<CHUNK, GROUP, ST>(srow[r], k0, groups);
        const __m512i p = load_bytes(wr, tail / 2);
        const __m512i lo = _mm512_and_si512(p, m4), hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);
        for (int m = 0; m < MT; ++m)
          facc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(digit_lane_sums(lo, hi, d[m], start[m])), s, facc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    const __m512 power = _mm512_loadu_ps(t.powers + m * 16);
    for (int r = 0; r < R; ++r) facc[m][r] = _mm512_mul_ps(facc[m][r], power);
    alignas(16) float sums[R];
    _mm_store_ps(sums, reduce_add_4(facc[m]));
    for (int r = 0; r < R; ++r) out[r * MT + m] = sums[r];
  }
}

template <int GROUP, int ROWS, typename ST, typename BT, typename OT>
void digits_gemv(const float* x, const uint8_t* packed, const ST* scale, const BT* bias, OT* y, int64_t M, int64_t N,
                 int64_t K, int num_threads) {
  const RowLayout<ROWS> layout{packed, N, K / 2};
  const int64_t groups = K / GROUP, K_pad = (K + 127) / 128 * 128, chunks = K_pad / 128;
  const bool parallel = M * N * K >= QC_PARALLEL_MIN_MACS;
  (void)num_threads; (void)parallel;
  // every thread writes the few tokens' digits itself (no barrier between that and the dot products)
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
    static thread_local std::vector<int8_t> digit_storage;
    static thread_local std::vector<int32_t> start_storage;
    static thread_local std::vector<float> power_storage;
    const TokenDigits t{thread_scratch(digit_storage, (size_t)(M * chunks * QC_DIGITS * 128)),
                        thread_scratch(start_storage, (size_t)(M * chunks * 16)),
                        thread_scratch(power_storage, (size_t)(M * 16))};
    for (int64_t m = 0; m < M; ++m)
      float_token_digits(x + m * K, K, K_pad, t.digits + m * chunks * QC_DIGITS * 128, t.starts + m * chunks * 16,
                         t.powers + m * 16);
    vnni_row_blocks(
        layout, scale, M, groups,
        [&](auto mt, const GemvRows<ROWS>& rows, const ST* const* srows, float* out) {
          digits_gemv_rows<GROUP, decltype(mt)::value, ST, ROWS>(rows, srows, t, K, chunks, out);
        },
        [&](int64_t m, int64_t n, float value) {
          y[m * N + n] = static_cast<OT>(value + (bias ? static_cast<float>(bias[n]) : 0.f));
        });
  }
}

// The 4-bit float GEMV on digits unless QCOMPILE_CPU_DIGITS_DOT=0 (A/B, and the tests check both)
inline bool digits_dot_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("QCOMPILE_CPU_DIGITS_DOT");
    return !(env && env[0] == '0');
  }();
  return enabled;
}

// Whether the 4-bit float GEMV may multiply bf16 pairs (CPUs with AVX512_BF16, unless QCOMPILE_CPU_BF16_DOT=0)
inline bool bf16_dot_enabled() {
#if defined(QC_X86_BF16_DOT)
  static const bool enabled = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    const char* env = std::getenv("QCOMPILE_CPU_BF16_DOT");
    const bool allowed = !(env && env[0] == '0');
    return allowed && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1);  // CPUID.(7,1):EAX[5] AVX512_BF16
  }();
  return enabled;
#else
  return false;
#endif
}

// Which float GEMV a float32 token takes: "digits" (4-bit, unless QCOMPILE_CPU_DIGITS_DOT=0 or the token holds an inf
// or NaN), "bf16_pair" (4-bit where bf16_dot_enabled; bf16 and half tokens too) or "fp32_table".
inline const char* float_gemv_name(int bits) {
  return bits != 4 ? "fp32_table" : digits_dot_enabled() ? "digits" : bf16_dot_enabled() ? "bf16_pair" : "fp32_table";
}

template <int BITS, int GROUP, typename XT, typename ST, typename BT, typename OT, int ROWS>
void intx_linear_float_gemv_avx512(const XT* x, const uint8_t* packed, const ST* scale, const BT* bias, OT* y,
                                   int64_t M, int64_t N, int64_t K, int num_threads) {
  const int64_t row_bytes = K * BITS / 8;
  if constexpr (BITS == 4 && std::is_same_v<XT, float>) {
    if (digits_dot_enabled() && all_finite(x, M * K)) {
      digits_gemv<GROUP, ROWS>(x, packed, scale, bias, y, M, N, K, num_threads);
      return;
    }
  }
#if defined(QC_X86_BF16_DOT)
  if constexpr (BITS == 4) {
    if (bf16_dot_enabled()) {
      // bf16 activations are one bf16 term; float and half need two (this header names no torch types: a 16-bit
      // type that rounds 1 + 2^-8 to 1 has bf16's 8-bit significand)
      static const bool is_bf16 = sizeof(XT) == 2 && static_cast<float>(XT(1.0f + 1.0f / 256)) == 1.0f;
      if (is_bf16)
        float_gemv_with<Bf16PairDot<1>, GROUP, ROWS>(x, packed, scale, bias, y, M, N, K, row_bytes, num_threads);
      else
        float_gemv_with<Bf16PairDot<2>, GROUP, ROWS>(x, packed, scale, bias, y, M, N, K, row_bytes, num_threads);
      return;
    }
  }
#endif
  float_gemv_with<FloatTableDot<BITS>, GROUP, ROWS>(x, packed, scale, bias, y, M, N, K, row_bytes, num_threads);
}
#endif

#if defined(QC_X86_VNNI)
// Float GEMM (AVX-512): 16 rows dequantized (w * scale, the reference's float weights) into a panel [K][16], so one
// FMA multiplies a broadcast activation with the same k of 16 rows; QC_VNNI_MR tokens x QC_VNNI_NR panels per tile.
template <int BITS, int GROUP, typename ST, int ROWS>
inline void dequantize_float_panel(const RowLayout<ROWS>& layout, const ST* scale, int64_t n0, int64_t rows,
                                   int64_t K, float* panel) {
  const int64_t groups = K / GROUP;
  alignas(64) float wrow[64];
  for (int r = 0; r < 16; ++r) {
    for (int64_t k0 = 0; k0 < K; k0 += 64) {
      const int count = (int)std::min<int64_t>(64, K - k0);
      if (r < rows) {
        const __m512i w = load_w64_in_order<BITS>(layout.origin(n0 + r, k0 * BITS / 8), K, k0, count);
        alignas(64) int8_t wi[64];
        _mm512_store_si512(wi, w);
        for (int q = 0; q < 4; ++q) {
          const int64_t k = k0 + 16 * q;
          const float s = k < K ? scale_at(scale + (n0 + r) * groups, k / GROUP) : 0.f;
          const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i*)(wi + 16 * q))));
          _mm512_store_ps(wrow + 16 * q, _mm512_mul_ps(wf, _mm512_set1_ps(s)));
        }
      } else {
        std::memset(wrow, 0, sizeof(wrow));
      }
      for (int i = 0; i < count; ++i) panel[(k0 + i) * 16 + r] = wrow[i];
    }
  }
}

template <int BITS, int GROUP, typename ST, typename BT, typename OT, int ROWS>
void intx_linear_float_gemm_avx512(const float* x, const uint8_t* packed, const ST* scale, const BT* bias, OT* y,
                                   int64_t M, int64_t N, int64_t K, int num_threads) {
  const RowLayout<ROWS> layout{packed, N, K * BITS / 8};
  constexpr int MR = QC_VNNI_MR, NR = QC_VNNI_NR;
  constexpr int64_t BLOCK = 16 * NR;
  const bool parallel = M * N * K >= QC_PARALLEL_MIN_MACS;
  (void)num_threads; (void)parallel;
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
    static thread_local std::vector<float> panel_storage;
    float* panels = thread_scratch(panel_storage, (size_t)(NR * 16 * K + 16));
    panels += (64 - (uintptr_t)panels % 64) % 64 / sizeof(float);
#pragma omp for schedule(dynamic)
    for (int64_t n0 = 0; n0 < N; n0 += BLOCK) {
      for (int p = 0; p < NR; ++p)
        dequantize_float_panel<BITS, GROUP, ST, ROWS>(layout, scale, n0 + 16 * p,
                                                std::max<int64_t>(0, std::min<int64_t>(16, N - n0 - 16 * p)), K,
                                                panels + p * 16 * K);
      for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int mr = (int)std::min<int64_t>(MR, M - m0);
        const float* a[MR];
        for (int t = 0; t < MR; ++t) a[t] = x + (m0 + std::min(t, mr - 1)) * K;  // a short tail repeats its last token
        __m512 acc[MR][NR];
        for (int t = 0; t < MR; ++t)
          for (int p = 0; p < NR; ++p) acc[t][p] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; ++k) {
          __m512 w[NR];
          for (int p = 0; p < NR; ++p) w[p] = qc_in_register(_mm512_load_ps(panels + p * 16 * K + k * 16));
          for (int t = 0; t < MR; ++t) {
            const __m512 xb = _mm512_set1_ps(a[t][k]);
            for (int p = 0; p < NR; ++p) acc[t][p] = _mm512_fmadd_ps(xb, w[p], acc[t][p]);
          }
        }
        for (int t = 0; t < mr; ++t)
          for (int p = 0; p < NR; ++p) {
            const int64_t n = n0 + 16 * p;
            if (n < N) store_tile_row(y + (m0 + t) * N + n, acc[t][p], 1.f, bias ? bias + n : bias, N - n);
          }
      }
    }
  }
}
#endif

template <int BITS, int GROUP, typename XT, typename ST, typename BT, typename OT, int ROWS = 1>
void intx_linear_float(const XT* x, const uint8_t* packed, const ST* scale, const BT* bias, OT* y, int64_t M,
                       int64_t N, int64_t K, int num_threads) {
  static_assert(BITS >= 1 && BITS <= 8, "BITS must be 1..8");
  static_assert(GROUP % 32 == 0, "GROUP must be a multiple of 32");
  static_assert(ROWS == 1 || BITS == 4 || BITS == 8, "interleaved rows are for one-plane (4- and 8-bit) weights");
#if defined(QC_X86_VNNI)
  if constexpr (float_gemv_fits<BITS, GROUP>) {
    if (M < QC_GEMM_MIN_M) {
      intx_linear_float_gemv_avx512<BITS, GROUP, XT, ST, BT, OT, ROWS>(x, packed, scale, bias, y, M, N, K, num_threads);
      return;
    }
  }
#endif
  const int64_t row_bytes = K * BITS / 8, groups = K / GROUP;
  const RowLayout<ROWS> layout{packed, N, row_bytes};
  const float* xf;
  static thread_local std::vector<float> xf_storage;
  if constexpr (std::is_same_v<XT, float>) {
    xf = x;
  } else {
    float* buf = thread_scratch(xf_storage, (size_t)(M * K));
    for (int64_t i = 0; i < M * K; ++i) buf[i] = static_cast<float>(x[i]);
    xf = buf;
  }
#if defined(QC_X86_VNNI)
  if (M >= QC_GEMM_MIN_M) {
    intx_linear_float_gemm_avx512<BITS, GROUP, ST, BT, OT, ROWS>(xf, packed, scale, bias, y, M, N, K, num_threads);
    return;
  }
#endif
  (void)num_threads;
  const bool parallel = M * N * K >= QC_PARALLEL_MIN_MACS;
  (void)parallel;
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
    static thread_local std::vector<float> wf_storage;
    static thread_local std::vector<w_t> wq_storage;
    static thread_local std::vector<int32_t> wsum_storage;
    float* wf = thread_scratch(wf_storage, (size_t)K);
    w_t* wq = thread_scratch(wq_storage, (size_t)K);
    int32_t* wsum = thread_scratch(wsum_storage, (size_t)groups);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float b = bias ? static_cast<float>(bias[n]) : 0.f;
#if defined(QC_X86_AVX2) || defined(QC_ARM_NEON)
      if (M < QC_GEMM_MIN_M) {
        float out[QC_GEMM_MIN_M];
#if defined(QC_X86_AVX2)
        gemv_row_float_x86<BITS, GROUP, ST>(layout.row(n), scale + n * groups, xf, M, K, out);
#else
        gemv_row_float_arm<BITS, GROUP, ST>(layout.row(n), scale + n * groups, xf, M, K, out);
#endif
        for (int64_t m = 0; m < M; ++m) y[m * N + n] = static_cast<OT>(out[m] + b);
        continue;
      }
#endif
      unpack_row<BITS, GROUP, false>(layout.row(n), K, wq, wsum);
      for (int64_t g = 0; g < groups; ++g) {
        const float s = static_cast<float>(scale[n * groups + g]);
        for (int i = 0; i < GROUP; ++i) wf[g * GROUP + i] = (float)wq[g * GROUP + i] * s;
      }
      for (int64_t m0 = 0; m0 < M; m0 += QC_MR) {
        const int mr = (int)std::min<int64_t>(QC_MR, M - m0);
        float out[QC_MR];
        dot_f32_tokens(xf + m0 * K, wf, mr, K, out);
        for (int t = 0; t < mr; ++t) y[(m0 + t) * N + n] = static_cast<OT>(out[t] + b);
      }
    }
  }
}

}  // namespace qcompile_cpu

#endif  // QCOMPILE_INTX_LINEAR_H
