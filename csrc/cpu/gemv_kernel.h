// Dense bf16 GEMV kernel, written once and included by each per-ISA translation unit
// (PK_ISA_NS names the namespace; the -m flags pick the inner loops below).
//
//   y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]),   w bf16 [N, K] (row stride ldw), M <= 8
//
// Memory bound: w (2 N K bytes) is the only large stream and is read exactly once for all M
// rows of x; x (M K values) stays in L1/L2. For M <= 2 (AVX-512) rows run one after another
// with 8 k-steps in flight, so a chunk of w is one linear stream; otherwise R weight rows run at
// a time (R * M accumulators in registers). Every stream is prefetched PK_GEMV_PF bytes ahead in
// software (one cache line per 32-k step).
// Inner loops per ISA:
//   avx512bf16 (bf16 x):  vdpbf16ps on 32 k (pairs of bf16 from w and from x, fp32 sums;
//                         the instruction flushes denormal inputs/outputs to zero, rounds RNE)
//   avx512 / fp32 x:      zmm of 32 bf16 -> even k: lane << 16, odd k: lane & 0xffff0000 (exact
//                         widening, no shuffles), two FMAs against x in the split layout
//                         (gemv.h: GemvParams::xs)
//   avx2:                 the same on ymm (16 k per load)
//   scalar:               plain loops (the in-kernel oracle the tests also run)
// K tails: masked loads (AVX-512) or a zero-padded copy (AVX2); x is zero past K, and nothing
// past K or past row N - 1 of w is ever loaded.
#pragma once
// GCC 12 false positive: avx512fintrin.h's _mm512_undefined_* placeholders (as setup.py notes).
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <string.h>

#include "gemv.h"
#include "simd.h"

namespace pykernels {
namespace cpu {
namespace PK_ISA_NS {

#ifndef PK_GEMV_PF
// Bytes ahead of each row stream to prefetch (0 = off). Measured cold (12 rotating 5632x2048
// weights, 2 threads): 1024 ~ 2048 > 4096 > 512 > off.
#define PK_GEMV_PF 1024
#endif

static inline float bias_at(const GemvParams& p, int64_t n) {
  if (!p.bias) return 0.f;
  return p.bias_bf16 ? bf16_to_float(static_cast<const pk_u16*>(p.bias)[n]) : static_cast<const float*>(p.bias)[n];
}

static inline void store_out(const GemvParams& p, int m, int64_t n, float v) {
  v += bias_at(p, n);
  if (p.out_bf16) static_cast<pk_u16*>(p.out)[m * p.N + n] = float_to_bf16(v);
  else static_cast<float*>(p.out)[m * p.N + n] = v;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// ------------------------------------------------------------------------------------------
// AVX-512: R rows x M rows of x, one zmm accumulator each.
// ------------------------------------------------------------------------------------------
#define PK_GEMV_AVX512 1

template <int M, int R>
static void rows_fma(const GemvParams& p, int64_t n0) {
  const pk_u16* w[R];
  for (int r = 0; r < R; ++r) w[r] = p.w + (n0 + r) * p.ldw;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
  const int64_t Km = p.K / kGemvBlockK * kGemvBlockK;
  auto step = [&](int r, __m512i v, int64_t k) {
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
    for (int m = 0; m < M; ++m) {
      const float* x = p.xs + m * p.K32 + k;
      acc[r][m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(x), acc[r][m]);
      acc[r][m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x + 16), acc[r][m]);
    }
  };
  for (int64_t k = 0; k < Km; k += kGemvBlockK)
    for (int r = 0; r < R; ++r) {
      if (PK_GEMV_PF) prefetch<3>(w[r] + k + PK_GEMV_PF / 2);
      step(r, _mm512_loadu_si512(w[r] + k), k);
    }
  if (Km < p.K) {
    const __mmask32 mask = (__mmask32)((1ull << (p.K - Km)) - 1);
    for (int r = 0; r < R; ++r) step(r, _mm512_maskz_loadu_epi16(mask, w[r] + Km), Km);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) store_out(p, m, n0 + r, _mm512_reduce_add_ps(acc[r][m]));
}

#if defined(__AVX512BF16__)
template <int M, int R>
static void rows_dpbf16(const GemvParams& p, int64_t n0) {
  const pk_u16* w[R];
  for (int r = 0; r < R; ++r) w[r] = p.w + (n0 + r) * p.ldw;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const int64_t Km = p.K / kGemvBlockK * kGemvBlockK;
  auto step = [&](int r, __m512i v, int64_t k) {
    for (int m = 0; m < M; ++m)
      acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)v, (__m512bh)_mm512_loadu_si512(p.xb + m * p.K32 + k));
  };
  for (int64_t k = 0; k < Km; k += kGemvBlockK)
    for (int r = 0; r < R; ++r) {
      if (PK_GEMV_PF) prefetch<3>(w[r] + k + PK_GEMV_PF / 2);
      step(r, _mm512_loadu_si512(w[r] + k), k);
    }
  if (Km < p.K) {
    const __mmask32 mask = (__mmask32)((1ull << (p.K - Km)) - 1);
    for (int r = 0; r < R; ++r) step(r, _mm512_maskz_loadu_epi16(mask, w[r] + Km), Km);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) store_out(p, m, n0 + r, _mm512_reduce_add_ps(acc[r][m]));
}
#endif

// One row at a time, U 32-k steps in flight (U * M accumulators): the chunk of w is read as one
// linear stream (rows follow each other when ldw == K), prefetched PF bytes ahead across rows.
template <int M, int U, bool DP>
static void row_seq(const GemvParams& p, int64_t n) {
  const pk_u16* w = p.w + n * p.ldw;
  const pk_u16* wn = w + p.ldw;  // next row (prefetch target past this row's end)
  __m512 acc[U][M];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = _mm512_setzero_ps();
  const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
  auto step = [&](int u, __m512i v, int64_t k) {
#if defined(__AVX512BF16__)
    if (DP) {
      for (int m = 0; m < M; ++m)
        acc[u][m] = _mm512_dpbf16_ps(acc[u][m], (__m512bh)v, (__m512bh)_mm512_loadu_si512(p.xb + m * p.K32 + k));
      return;
    }
#endif
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
    for (int m = 0; m < M; ++m) {
      const float* x = p.xs + m * p.K32 + k;
      acc[u][m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(x), acc[u][m]);
      acc[u][m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x + 16), acc[u][m]);
    }
  };
  constexpr int64_t pf = PK_GEMV_PF / 2;
  auto pref = [&](int64_t k) {
    if (!pf) return;
    const int64_t a = k + pf;
    if (a < p.K) prefetch<3>(w + a); else prefetch<3>(wn + (a - p.K));
  };
  constexpr int64_t S = U * kGemvBlockK;
  const int64_t Ku = p.K / S * S, Km = p.K / kGemvBlockK * kGemvBlockK;
  int64_t k = 0;
  for (; k < Ku; k += S)
    for (int u = 0; u < U; ++u) {
      pref(k + u * kGemvBlockK);
      step(u, _mm512_loadu_si512(w + k + u * kGemvBlockK), k + u * kGemvBlockK);
    }
  for (; k < Km; k += kGemvBlockK) {
    pref(k);
    step(0, _mm512_loadu_si512(w + k), k);
  }
  if (Km < p.K) step(1 % U, _mm512_maskz_loadu_epi16((__mmask32)((1ull << (p.K - Km)) - 1), w + Km), Km);
  for (int m = 0; m < M; ++m) {
    __m512 v = acc[0][m];
    for (int u = 1; u < U; ++u) v = _mm512_add_ps(v, acc[u][m]);
    store_out(p, m, n, _mm512_reduce_add_ps(v));
  }
}

// M <= 2: rows one after another (row_seq; measured ~30% faster cold than 8 interleaved row
// streams for M = 1). M > 2: R rows at a time (measured faster than row_seq there: x is reused
// from registers' worth of loads across the R rows).
template <int M>
static void run_m(const GemvParams& p, int64_t n0, int64_t n1) {
  constexpr int R = M <= 4 ? 4 : 2;
  int64_t n = n0;
  if (M <= 2) {
#if defined(__AVX512BF16__)
    if (p.xb) {
      for (; n < n1; ++n) row_seq<M, 8, true>(p, n);
      return;
    }
#endif
    for (; n < n1; ++n) row_seq<M, 8, false>(p, n);
    return;
  }
#if defined(__AVX512BF16__)
  if (p.xb) {
    for (; n + R <= n1; n += R) rows_dpbf16<M, R>(p, n);
    for (; n < n1; ++n) rows_dpbf16<M, 1>(p, n);
    return;
  }
#endif
  for (; n + R <= n1; n += R) rows_fma<M, R>(p, n);
  for (; n < n1; ++n) rows_fma<M, 1>(p, n);
}

#elif defined(__AVX2__) && defined(__FMA__)
// ------------------------------------------------------------------------------------------
// AVX2: 16 k per ymm load of w, the two halves of a 32-k block of the split x layout.
// ------------------------------------------------------------------------------------------
template <int M, int R>
static void rows_fma(const GemvParams& p, int64_t n0) {
  const pk_u16* w[R];
  for (int r = 0; r < R; ++r) w[r] = p.w + (n0 + r) * p.ldw;
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
  const int64_t Km = p.K / kGemvBlockK * kGemvBlockK;
  // 16 bf16 of row r at w + k + 16 h: lane i holds k + 16 h + 2i (even, xs[k + 8 h + i]) and
  // k + 16 h + 2i + 1 (odd, xs[k + 16 + 8 h + i]).
  auto step = [&](int r, const pk_u16* src, int64_t k) {
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(src + 16 * h));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
      for (int m = 0; m < M; ++m) {
        const float* x = p.xs + m * p.K32 + k + 8 * h;
        acc[r][m] = _mm256_fmadd_ps(we, _mm256_loadu_ps(x), acc[r][m]);
        acc[r][m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + 16), acc[r][m]);
      }
    }
  };
  for (int64_t k = 0; k < Km; k += kGemvBlockK)
    for (int r = 0; r < R; ++r) {
      if (PK_GEMV_PF) prefetch<3>(w[r] + k + PK_GEMV_PF / 2);
      step(r, w[r] + k, k);
    }
  if (Km < p.K) {
    pk_u16 tmp[kGemvBlockK];
    for (int r = 0; r < R; ++r) {
      memset(tmp, 0, sizeof(tmp));
      memcpy(tmp, w[r] + Km, sizeof(pk_u16) * (p.K - Km));
      step(r, tmp, Km);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r][m]), _mm256_extractf128_ps(acc[r][m], 1));
      const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
      store_out(p, m, n0 + r, _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t))));
    }
}

// R * M <= 8 accumulators (of 16 ymm).
template <int M>
static void run_m(const GemvParams& p, int64_t n0, int64_t n1) {
  constexpr int R = M <= 2 ? 4 : M <= 4 ? 2 : 1;
  int64_t n = n0;
  for (; n + R <= n1; n += R) rows_fma<M, R>(p, n);
  for (; n < n1; ++n) rows_fma<M, 1>(p, n);
}

#else
// ------------------------------------------------------------------------------------------
// Scalar: plain loops over fp32 x [M, K].
// ------------------------------------------------------------------------------------------
template <int M>
static void run_m(const GemvParams& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const pk_u16* w = p.w + n * p.ldw;
    float acc[M];
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    for (int64_t k = 0; k < p.K; ++k) {
      const float wk = bf16_to_float(w[k]);
      for (int m = 0; m < M; ++m) acc[m] += p.xf[m * p.K + k] * wk;
    }
    for (int m = 0; m < M; ++m) store_out(p, m, n, acc[m]);
  }
}
#endif

void gemv_rows(const GemvParams& p, int64_t n0, int64_t n1) {
  switch (p.M) {
    case 1: run_m<1>(p, n0, n1); break;
    case 2: run_m<2>(p, n0, n1); break;
    case 3: run_m<3>(p, n0, n1); break;
    case 4: run_m<4>(p, n0, n1); break;
    case 5: run_m<5>(p, n0, n1); break;
    case 6: run_m<6>(p, n0, n1); break;
    case 7: run_m<7>(p, n0, n1); break;
    case 8: run_m<8>(p, n0, n1); break;
    default: break;  // the launcher checked 1 <= M <= kGemvMaxM
  }
}

}  // namespace PK_ISA_NS
}  // namespace cpu
}  // namespace pykernels
