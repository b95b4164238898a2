// SIMD traits for the CPU kernels. Each ISA translation unit includes this header with its own
// -m flags and uses the matching traits; kernels are written once against the trait interface.
//   V::W                 lanes
//   V::load(T* p)        W elements of T (float / bf16_t / fp16_t) -> fp32 vector
//   V::load_n(T* p, n)   first n < W elements, rest zero
//   V::store(float*, v), V::store_n(float*, v, n)
//   V::fma(a, b, c) = a*b + c,  V::set1, V::zero, V::add, V::mul, V::max, V::hsum, V::hmax
//   V::exp(x)            e^x for x <= 0 (softmax weights), relative error ~2e-7
#pragma once
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "pykernels/common.h"
#include "pykernels/softmax.h"

#ifndef PK_ISA_NS
#error "define PK_ISA_NS (the per-ISA namespace) before including simd.h"
#endif

namespace pykernels {
namespace cpu {
// Everything compiled with ISA flags lives in a per-ISA namespace so no inline function
// compiled for AVX-512 can be merged by the linker into a caller on another path.
namespace PK_ISA_NS {

// Software prefetch that the compiler must keep. HINT as in __builtin_prefetch: 3 = all cache
// levels (prefetcht0), 2 = L2 and out (prefetcht1), 1 = prefetcht2, 0 = non-temporal.
// Not __builtin_prefetch: GCC treats it as free of side effects, so a helper whose only work is
// prefetching is found "pure" and every call to it is deleted as dead code (GCC 12 emitted no
// prefetch at all for the bf16 attention kernel's row prefetcher, which cost it a third of its
// cold-cache speed). A volatile asm is an effect the optimiser cannot drop. Prefetches never
// fault, so addresses past the end of a buffer are harmless.
template <int HINT>
static inline void prefetch(const void* p) {
  static_assert(HINT >= 0 && HINT <= 3, "prefetch hint is 0..3");
  const char& b = *static_cast<const char*>(p);
  if constexpr (HINT == 3) __asm__ volatile("prefetcht0 %0" : : "m"(b));
  else if constexpr (HINT == 2) __asm__ volatile("prefetcht1 %0" : : "m"(b));
  else if constexpr (HINT == 1) __asm__ volatile("prefetcht2 %0" : : "m"(b));
  else __asm__ volatile("prefetchnta %0" : : "m"(b));
}

struct ScalarV {
  static constexpr int W = 1;
  typedef float F;
  template <typename T> static inline F load(const T* p) { return Cvt<T>::load(p); }
  template <typename T> static inline F load_n(const T* p, int n) { return n > 0 ? Cvt<T>::load(p) : 0.f; }
  static inline void store(float* p, F v) { *p = v; }
  static inline void store_n(float* p, F v, int n) { if (n > 0) *p = v; }
  static inline F fma(F a, F b, F c) { return a * b + c; }
  static inline F set1(float x) { return x; }
  static inline F zero() { return 0.f; }
  static inline F add(F a, F b) { return a + b; }
  static inline F mul(F a, F b) { return a * b; }
  static inline F max(F a, F b) { return a > b ? a : b; }
  static inline float hsum(F a) { return a; }
  static inline float hmax(F a) { return a; }
  static inline F exp(F x) { return expf(x); }
  // Horizontal sums of kRed accumulators at once: out[i] = hsum(acc[i]).
  static constexpr int kRed = 1;
  static inline void reduce_many(const F* acc, float* out) { out[0] = acc[0]; }
  static constexpr bool kPermBf16 = false;  // no load_bf16_pair: Rows<.., PERM=false> never calls it
};

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct Avx2V {
  static constexpr int W = 8;
  typedef __m256 F;
  static inline F load(const float* p) { return _mm256_loadu_ps(p); }
  static inline F load(const bf16_t* p) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline F load(const fp16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  template <typename T> static inline F load_n(const T* p, int n) {
    T tmp[W];
    memset(tmp, 0, sizeof(tmp));
    memcpy(tmp, p, sizeof(T) * n);
    return load(tmp);
  }
  static inline void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static inline void store_n(float* p, F v, int n) {
    float tmp[W];
    _mm256_storeu_ps(tmp, v);
    memcpy(p, tmp, sizeof(float) * n);
  }
  static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static inline F set1(float x) { return _mm256_set1_ps(x); }
  static inline F zero() { return _mm256_setzero_ps(); }
  static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
  static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static inline F max(F a, F b) { return _mm256_max_ps(a, b); }
  static inline float hsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline float hmax(F a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // e^x = 2^n * e^r, n = round(x / ln2), |r| <= ln2/2, degree-6 polynomial for e^r.
  static inline F exp(F x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    F n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    F r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    F p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static constexpr int kRed = 8;
  static inline void reduce_many(const F* a, float* out) {
    // hadd tree: after two levels each 128-bit half holds 4 partial sums of a0..a3 / a4..a7.
    F ab = _mm256_hadd_ps(a[0], a[1]), cd = _mm256_hadd_ps(a[2], a[3]);
    F ef = _mm256_hadd_ps(a[4], a[5]), gh = _mm256_hadd_ps(a[6], a[7]);
    F abcd = _mm256_hadd_ps(ab, cd), efgh = _mm256_hadd_ps(ef, gh);
    F lo = _mm256_permute2f128_ps(abcd, efgh, 0x20), hi = _mm256_permute2f128_ps(abcd, efgh, 0x31);
    _mm256_storeu_ps(out, _mm256_add_ps(lo, hi));
  }
  // 2W bf16 -> two fp32 vectors with one in-lane unpack each (instead of widen + shift), in the
  // order perm_index() gives; kernels keep q and the accumulators in that order.
  static constexpr bool kPermBf16 = true;
  static inline void load_bf16_pair(const bf16_t* p, F& lo, F& hi) {
    __m256i x = _mm256_loadu_si256((const __m256i*)p);
    lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), x));
    hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), x));
  }
};
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
struct Avx512V {
  static constexpr int W = 16;
  typedef __m512 F;
  static inline F load(const float* p) { return _mm512_loadu_ps(p); }
  static inline F load(const bf16_t* p) {
    __m256i h = _mm256_loadu_si256((const __m256i*)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline F load(const fp16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static inline F load_n(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
  static inline F load_n(const bf16_t* p, int n) {
    __m256i h = _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline F load_n(const fp16_t* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p));
  }
  static inline void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static inline void store_n(float* p, F v, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), v); }
  static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static inline F set1(float x) { return _mm512_set1_ps(x); }
  static inline F zero() { return _mm512_setzero_ps(); }
  static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
  static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static inline F max(F a, F b) { return _mm512_max_ps(a, b); }
  static inline float hsum(F a) { return _mm512_reduce_add_ps(a); }
  static inline float hmax(F a) { return _mm512_reduce_max_ps(a); }
  static inline F exp(F x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    F n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    F r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    F p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
  }
  // 16 horizontal sums for ~45 instructions instead of 16 x 8: a transposing reduction tree.
  static constexpr int kRed = 16;
  static inline void reduce_many(const F* a, float* out) {
    // Level 1 (pairs): 256-bit halves of x and y interleaved and added -> 8 partial sums each.
    F p[8];
    for (int i = 0; i < 8; ++i) {
      F lo = _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44);  // x.q0 x.q1 y.q0 y.q1
      F hi = _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE);  // x.q2 x.q3 y.q2 y.q3
      p[i] = _mm512_add_ps(lo, hi);                               // [x.h0 x.h1 y.h0 y.h1]
    }
    // Level 2: 128-bit lane j of r[i] = 4 partial sums of input 4i + j.
    F r[4];
    for (int i = 0; i < 4; ++i) {
      F lo = _mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0x88);
      F hi = _mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0xDD);
      r[i] = _mm512_add_ps(lo, hi);
    }
    // Level 3: 4x4 transposes inside each 128-bit lane.
    F s1 = _mm512_add_ps(_mm512_unpacklo_ps(r[0], r[1]), _mm512_unpackhi_ps(r[0], r[1]));
    F s2 = _mm512_add_ps(_mm512_unpacklo_ps(r[2], r[3]), _mm512_unpackhi_ps(r[2], r[3]));
    F t = _mm512_add_ps(_mm512_shuffle_ps(s1, s2, 0x44), _mm512_shuffle_ps(s1, s2, 0xEE));
    // Lane j of t holds [in(j), in(4+j), in(8+j), in(12+j)]: permute to natural order.
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(idx, t));
  }
  static constexpr bool kPermBf16 = true;
  static inline void load_bf16_pair(const bf16_t* p, F& lo, F& hi) {
    __m512i x = _mm512_loadu_si512(p);
    lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), x));
    hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), x));
  }
};
#endif

// Element order produced by load_bf16_pair over a chunk of 2W values: position p holds element
// perm_index(p). Unpacks work per 128-bit lane of 8 bf16: the low half of every lane goes to
// `lo`, the high half to `hi`.
template <int W>
static inline int perm_index(int p) {
  const int half = p / W, q = p % W;
  return 8 * (q / 4) + 4 * half + (q % 4);
}

// Softmax numerators of one row of scores: s[t] = exp(s[t] - m) in place for t < nt; returns
// their sum (the online-softmax update of both attention kernels).
// max(s[0..nt)), -inf for nt == 0.
template <typename V>
static inline float block_max(const float* s, int nt) {
  float mb = PK_NEG_INF;
  int t = 0;
  if (nt >= V::W) {
    typename V::F mv = V::load(s);
    for (t = V::W; t + V::W <= nt; t += V::W) mv = V::max(mv, V::load(s + t));
    mb = V::hmax(mv);
  }
  for (; t < nt; ++t) mb = s[t] > mb ? s[t] : mb;
  return mb;
}

template <typename V>
static inline float exp_shift_sum(float* s, int nt, float m) {
  const typename V::F neg_m = V::set1(-m);
  typename V::F sum = V::zero();
  int t = 0;
  for (; t + V::W <= nt; t += V::W) {
    typename V::F e = V::exp(V::add(V::load(s + t), neg_m));
    V::store(s + t, e);
    sum = V::add(sum, e);
  }
  float ssum = V::hsum(sum);
  for (; t < nt; ++t) { s[t] = pk_exp(s[t] - m); ssum += s[t]; }
  return ssum;
}

}  // namespace PK_ISA_NS
}  // namespace cpu
}  // namespace pykernels
