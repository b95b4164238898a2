// LUT-GEMV kernel (T-MAC tables, SAIL batching), written once and included by each per-ISA
// translation unit (PK_ISA_NS names the namespace; the -m flags pick the inner loops below).
//
//   y[m, n] = sum_k x[m, k] * w[n, k],   w from the bit planes (format: pykernels/lut_format.py)
//
// Per row m of x and activation group a of 4 k, lut_prepare builds the 16-entry sign-symmetric
// table T_a (lut_build_table) and the block sums S_b. lut_tile then walks a group of tiles of 32
// weight rows: for every block of <= 128 k it reads a tile's plane bytes once and looks them up
// in the tables of all M rows of x (the bytes stay in registers / L1 while the rows of x change),
// so the weight stream -- the only large one -- is read once however large M is (SAIL); the
// tiles of a group run K chunk by K chunk so a chunk's tables are reused from cache, and the
// plane and scale streams are prefetched ahead in software. Inner loops per ISA (int8 / exact):
//   AVX-512 + VBMI + VNNI: vpermb on 64-byte tables of 4 groups, vpdpbusd into int32 / vpermps
//   AVX-512BW:             vpshufb + vpmaddubsw into int16, flushed to int32       / vpermps
//   AVX2:                  vpshufb + vpmaddubsw (one plane per ymm)                 / 2x vpermps + blend
//   scalar:                plain C++ through pykernels/lut.h (the tests' in-kernel oracle)
// Per scale group
//   sum_k q_k x_k = c0 * S_g + 1/2 * sum_i 2^i L_i,   L_i = sum_a T_a[idx_{i,a}],  c0 = (2^bits-1)/2
// and the kernel accumulates A = sum_i 2^i L_i directly (plane i weighted by 2^i), then
//   y += scale * (0.5 * A) + scale * (c0 - zero) * S_b          (symmetric: zero = c0).
//
// mode "exact": fp32 tables, fp32 accumulation: the result equals the float64 value up to fp32
// rounding of the table entries, the sums and the scale products.
//
// mode "int8" (T-MAC): the tables of one (m, block) are quantised with one scale
// ts = max|T| / 127 to Tq = round(T / ts) in [-127, 127]; lookups are summed exactly in integers
// and A = ts * sum_i 2^i sum_a Tq_a[idx]. The block sum S_b stays fp32 (not quantised).
// Error bound: rounding gives |ts * Tq - T| <= ts / 2 per looked-up entry, so per block b of
// scale group g, with n_b = (k1 - k0) / 4 activation groups (<= 32),
//   |A_int8 - A| <= sum_i 2^i * n_b * ts_b / 2 = (2^bits - 1) * n_b * ts_b / 2
// and after the 0.5 * scale factor
//   |y_int8 - y_exact| <= sum_b |scale_{g(b)}| * (2^bits - 1) * n_b * ts_b / 4,
// ts_b = max over the block's groups of (|x0| + |x1| + |x2| + |x3|) / 127 (= max|T| / 127).
// tests/test_lut_cpu.py evaluates this bound per output and checks it (plus the fp32 term).
// Codebook weights are not linear in the bits: the kernel rebuilds the codes from the planes and
// looks the values up, in fp32 for both modes (mode is ignored).
//
// Integer overflow: the AVX-512 VBMI/VNNI kernel accumulates in int32 (|A / ts| <= 255 * 127 * 32
// per block). The AVX2 and AVX-512BW kernels sum byte lookups into int16 with vpmaddubsw, planes
// weighted by 2^(i mod 4) (planes 4q..4q+3 share a set of accumulators, set q is shifted by 4q when
// flushed); one 8-k step adds at most 254 * (sum of a set's weights in one lane) <= 254 * 15 in
// magnitude, so the int16 sums are flushed to int32 every floor(32767 / that) steps (8 for 4 bits,
// 12 for AVX-512 whose lanes hold alternate planes; never more than 16 steps = 32 activation groups).
#pragma once
// GCC 12 false positive: avx512fintrin.h's _mm512_undefined_* placeholders (as setup.py notes).
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <float.h>
#include <string.h>

#include "lut_gemv.h"
#include "pykernels/lut.h"
#include "simd.h"

namespace pykernels {
namespace cpu {
namespace PK_ISA_NS {

#if defined(__AVX512F__) && defined(__AVX512BW__)
typedef Avx512V LutV;
#define PK_LUT_AVX512 1
constexpr int kMC = 8;  // rows of x per register block (2 zmm accumulators each)
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
typedef Avx2V LutV;
#define PK_LUT_AVX2 1
constexpr int kMC = 4;  // 16 ymm registers
#else
typedef ScalarV LutV;
constexpr int kMC = 8;
#endif
static_assert(kMC <= kLutMaxMC, "workspace holds kLutMaxMC accumulator rows");

#ifndef PK_LUT_PF
#define PK_LUT_PF 8192  // bytes ahead of the plane stream to prefetch (8-32 KB measured equal)
#endif

static inline const uint8_t* plane_col(const LutParams& p, int64_t t, int64_t kk, int i) {
  return p.planes + lut_plane_offset(t, kk, i, p.KK, p.bits);
}

// A tile's planes are one contiguous stream (byte columns kk, kk+1, ... follow each other):
// request the lines PK_LUT_PF bytes ahead of the ncols columns starting at kk.
static inline void prefetch_ahead(const LutParams& p, int64_t t, int64_t kk, int ncols) {
  const char* c = (const char*)plane_col(p, t, kk, 0) + PK_LUT_PF;
  for (int l = 0; l < ncols * p.bits * 32; l += 64) prefetch<3>(c + l);
}

// ------------------------------------------------------------------------------------------
// Tables: T of every activation group of block b (fp32, exact mode) or its int8 quantisation.
// Every variant computes the entries with the same operation order as lut_build_table
// (v = -+x3, then += +-x0, +-x1, +-x2), so the int8 tables are identical on every ISA.
// ------------------------------------------------------------------------------------------

// lut_quant_entry (round half away from zero); only called with finite t and inv (see finish_block_scale).
static inline int8_t quant_entry(float t, float inv) { return (int8_t)lut_quant_entry(t, inv); }

// T [n] with 0 < amax < 2^-100 (127 / amax could overflow to inf below ~3.7e-37): scaled by
// 2^100 in place, exactly (a power of two), amax with it; -> the factor (1 when not tiny).
// The caller divides the block scale by it, so ts * Tq still approximates the unscaled T.
static inline float prescale_tiny(float* T, int64_t n, float* amax) {
  const float kTiny = 0x1p-100f, kUp = 0x1p100f;
  if (!(*amax > 0.f && *amax < kTiny)) return 1.f;
  for (int64_t e = 0; e < n; ++e) T[e] *= kUp;
  *amax *= kUp;
  return kUp;
}

static inline void finish_block_scale(float amax, float* ts, float* inv, float pre = 1.f) {
  if (!(amax <= FLT_MAX)) {  // NaN or inf in x: no table is meaningful; NaN scale propagates
    *ts = __builtin_nanf("");
    *inv = 0.f;
  } else {
    *ts = amax / 127.f / pre;
    *inv = amax > 0.f ? 127.f / amax : 0.f;
  }
}

#if !defined(PK_LUT_AVX512) && !defined(PK_LUT_AVX2)
static void prepare_block(const LutParams& p, int64_t m, int64_t b) {
  const int64_t k0 = lut_block_k0(p, b), k1 = lut_block_k1(p, b);
  const float* x = p.x + m * p.K_pad;
  float s = 0.f;
  for (int64_t k = k0; k < k1; ++k) s += x[k];
  p.sb[m * p.nblk + b] = s;
  if (p.mode == LutMode::kExact) {
    for (int64_t a = k0 / 4; a < k1 / 4; ++a) lut_build_table(x + 4 * a, p.tf + m * p.tstride + a * 16);
    p.ts[m * p.nblk + b] = 1.f;
    return;
  }
  float T[kLutBlockK / 4 * 16];
  float amax = 0.f;
  bool nan = false;
  for (int64_t a = k0 / 4; a < k1 / 4; ++a) {
    float* Ta = T + (a - k0 / 4) * 16;
    lut_build_table(x + 4 * a, Ta);
    for (int e = 0; e < 16; ++e) {
      const float v = Ta[e] < 0.f ? -Ta[e] : Ta[e];
      if (v != v) nan = true;
      amax = v > amax ? v : amax;
    }
  }
  if (nan) amax = __builtin_nanf("");
  float ts, inv;
  const float pre = prescale_tiny(T, (k1 - k0) / 4 * 16, &amax);
  finish_block_scale(amax, &ts, &inv, pre);
  p.ts[m * p.nblk + b] = ts;
  int8_t* q = p.tq + m * p.tstride + k0 / 4 * 16;
  const int64_t n = (k1 - k0) / 4 * 16;
  if (inv == 0.f) { memset(q, 0, (size_t)n); return; }
  for (int64_t e = 0; e < n; ++e) q[e] = quant_entry(T[e], inv);
}
#elif defined(PK_LUT_AVX512)
static void prepare_block(const LutParams& p, int64_t m, int64_t b) {
  const int64_t k0 = lut_block_k0(p, b), k1 = lut_block_k1(p, b);
  const float* x = p.x + m * p.K_pad;
  // Entry e has sign +1 for x_j when bit j of e is set.
  const __m512i e = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 sg[4];
  for (int j = 0; j < 4; ++j) {
    const __mmask16 on = _mm512_test_epi32_mask(e, _mm512_set1_epi32(1 << j));
    sg[j] = _mm512_mask_blend_ps(on, _mm512_set1_ps(-1.f), _mm512_set1_ps(1.f));
  }
  __m512 s = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; k += 16) {
    const int n = k1 - k < 16 ? (int)(k1 - k) : 16;
    s = _mm512_add_ps(s, LutV::load_n(x + k, n));
  }
  p.sb[m * p.nblk + b] = _mm512_reduce_add_ps(s);
  auto table = [&](int64_t a) {
    __m512 v = _mm512_mul_ps(sg[3], _mm512_set1_ps(x[4 * a + 3]));
    v = _mm512_fmadd_ps(sg[0], _mm512_set1_ps(x[4 * a + 0]), v);
    v = _mm512_fmadd_ps(sg[1], _mm512_set1_ps(x[4 * a + 1]), v);
    return _mm512_fmadd_ps(sg[2], _mm512_set1_ps(x[4 * a + 2]), v);
  };
  if (p.mode == LutMode::kExact) {
    for (int64_t a = k0 / 4; a < k1 / 4; ++a) _mm512_storeu_ps(p.tf + m * p.tstride + a * 16, table(a));
    p.ts[m * p.nblk + b] = 1.f;
    return;
  }
  alignas(64) float T[kLutBlockK / 4 * 16];
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t a = k0 / 4; a < k1 / 4; ++a) {
    const __m512 v = table(a);
    _mm512_store_ps(T + (a - k0 / 4) * 16, v);
    const __m512 av = _mm512_and_ps(v, absmask);
    nan |= _mm512_cmp_ps_mask(av, av, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, av);
  }
  float ts, inv;
  float amax = nan ? __builtin_nanf("") : _mm512_reduce_max_ps(vmax);
  const float pre = prescale_tiny(T, (k1 - k0) / 4 * 16, &amax);
  finish_block_scale(amax, &ts, &inv, pre);
  p.ts[m * p.nblk + b] = ts;
  int8_t* q = p.tq + m * p.tstride + k0 / 4 * 16;
  const int64_t ng = (k1 - k0) / 4;
  if (inv == 0.f) { memset(q, 0, (size_t)ng * 16); return; }
  const __m512 vinv = _mm512_set1_ps(inv), lim = _mm512_set1_ps(127.f), half = _mm512_set1_ps(0.5f);
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32((int)0x80000000u));
  for (int64_t a = 0; a < ng; ++a) {
    __m512 v = _mm512_mul_ps(_mm512_load_ps(T + a * 16), vinv);
    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
    v = _mm512_add_ps(v, _mm512_or_ps(_mm512_and_ps(v, sign), half));  // + copysign(0.5, v), then truncate
    _mm_storeu_si128((__m128i*)(q + a * 16), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v)));
  }
}
#elif defined(PK_LUT_AVX2)
static void prepare_block(const LutParams& p, int64_t m, int64_t b) {
  const int64_t k0 = lut_block_k0(p, b), k1 = lut_block_k1(p, b);
  const float* x = p.x + m * p.K_pad;
  // Two halves: entries 0..7 (bit 3 clear: -x3) and 8..15 (+x3).
  __m256 sg[4][2];
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j) {
      float v[8];
      for (int e = 0; e < 8; ++e) v[e] = ((8 * h + e) >> j) & 1 ? 1.f : -1.f;
      sg[j][h] = _mm256_loadu_ps(v);
    }
  __m256 s = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; k += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + k));
  p.sb[m * p.nblk + b] = LutV::hsum(s);
  auto table = [&](int64_t a, int h) {
    __m256 v = _mm256_mul_ps(sg[3][h], _mm256_set1_ps(x[4 * a + 3]));
    v = _mm256_fmadd_ps(sg[0][h], _mm256_set1_ps(x[4 * a + 0]), v);
    v = _mm256_fmadd_ps(sg[1][h], _mm256_set1_ps(x[4 * a + 1]), v);
    return _mm256_fmadd_ps(sg[2][h], _mm256_set1_ps(x[4 * a + 2]), v);
  };
  if (p.mode == LutMode::kExact) {
    for (int64_t a = k0 / 4; a < k1 / 4; ++a)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(p.tf + m * p.tstride + a * 16 + 8 * h, table(a, h));
    p.ts[m * p.nblk + b] = 1.f;
    return;
  }
  alignas(32) float T[kLutBlockK / 4 * 16];
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps(), unord = _mm256_setzero_ps();
  for (int64_t a = k0 / 4; a < k1 / 4; ++a)
    for (int h = 0; h < 2; ++h) {
      const __m256 v = table(a, h);
      _mm256_store_ps(T + (a - k0 / 4) * 16 + 8 * h, v);
      const __m256 av = _mm256_and_ps(v, absmask);
      unord = _mm256_or_ps(unord, _mm256_cmp_ps(av, av, _CMP_UNORD_Q));
      vmax = _mm256_max_ps(vmax, av);
    }
  float ts, inv;
  float amax = _mm256_movemask_ps(unord) ? __builtin_nanf("") : LutV::hmax(vmax);
  const float pre = prescale_tiny(T, (k1 - k0) / 4 * 16, &amax);
  finish_block_scale(amax, &ts, &inv, pre);
  p.ts[m * p.nblk + b] = ts;
  int8_t* q = p.tq + m * p.tstride + k0 / 4 * 16;
  const int64_t ng = (k1 - k0) / 4;
  if (inv == 0.f) { memset(q, 0, (size_t)ng * 16); return; }
  const __m256 vinv = _mm256_set1_ps(inv), lim = _mm256_set1_ps(127.f), half = _mm256_set1_ps(0.5f);
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
  for (int64_t a = 0; a < ng; ++a) {
    __m256i r[2];
    for (int h = 0; h < 2; ++h) {
      __m256 v = _mm256_mul_ps(_mm256_load_ps(T + a * 16 + 8 * h), vinv);
      v = _mm256_min_ps(_mm256_max_ps(v, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
      v = _mm256_add_ps(v, _mm256_or_ps(_mm256_and_ps(v, sign), half));
      r[h] = _mm256_cvttps_epi32(v);
    }
    // int32 -> int8 with saturation (values are in range); packs work per 128-bit lane.
    __m256i w = _mm256_packs_epi32(r[0], r[1]);        // [r0 0-3, r1 0-3 | r0 4-7, r1 4-7]
    w = _mm256_permute4x64_epi64(w, 0xD8);             // [r0 0-3, r0 4-7 | r1 0-3, r1 4-7]
    const __m128i bytes = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storeu_si128((__m128i*)(q + a * 16), bytes);
  }
}
#endif

// ------------------------------------------------------------------------------------------
// Scales of one tile for scale groups g0 .. g0 + ng - 1 (ng <= 16), transposed so the 32 rows
// are contiguous: sc[gl][r] = scale, sz[gl][r] = scale * (c0 - zero) (affine; 0 otherwise).
// Rows past N get 0 (their outputs are dropped; the tensors have only N rows).
// ------------------------------------------------------------------------------------------
// In-register transpose of a W x W block of floats (rows in, columns out).
#if defined(PK_LUT_AVX512)
static inline void transpose_block(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4a + c], lane l: column 4l + c of rows 4a .. 4a + 3
  for (int a = 0; a < 4; ++a) {
    u[4 * a + 0] = _mm512_shuffle_ps(t[4 * a], t[4 * a + 2], 0x44);
    u[4 * a + 1] = _mm512_shuffle_ps(t[4 * a], t[4 * a + 2], 0xEE);
    u[4 * a + 2] = _mm512_shuffle_ps(t[4 * a + 1], t[4 * a + 3], 0x44);
    u[4 * a + 3] = _mm512_shuffle_ps(t[4 * a + 1], t[4 * a + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 xl = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), xh = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 yl = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88), yh = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(xl, yl, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(xl, yl, 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(xh, yh, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(xh, yh, 0xDD);
  }
}
#elif defined(PK_LUT_AVX2)
static inline void transpose_block(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int a = 0; a < 2; ++a) {
    u[4 * a + 0] = _mm256_shuffle_ps(t[4 * a], t[4 * a + 2], 0x44);
    u[4 * a + 1] = _mm256_shuffle_ps(t[4 * a], t[4 * a + 2], 0xEE);
    u[4 * a + 2] = _mm256_shuffle_ps(t[4 * a + 1], t[4 * a + 3], 0x44);
    u[4 * a + 3] = _mm256_shuffle_ps(t[4 * a + 1], t[4 * a + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}
#else
static inline void transpose_block(float*) {}
#endif

static void load_scales(const LutParams& p, int64_t t, int64_t g0, int ng, float* sc, float* sz) {
  typedef LutV V;
  constexpr int W = V::W;
  const typename V::F c0 = V::set1(0.5f * (float)((1 << p.bits) - 1)), one = V::set1(1.f);
  const int64_t n0 = t * kLutTileN;
  const int nr = p.N - n0 < kLutTileN ? (int)(p.N - n0) : kLutTileN;
  const fp16_t* scales = reinterpret_cast<const fp16_t*>(p.scales);
  const fp16_t* zeros = reinterpret_cast<const fp16_t*>(p.zeros);
  for (int rb = 0; rb < kLutTileN; rb += W)
    for (int cb = 0; cb < ng; cb += W) {
      const int nc = ng - cb < W ? ng - cb : W;
      typename V::F S[W], Z[W];
      for (int rr = 0; rr < W; ++rr) {
        const int64_t off = (n0 + rb + rr) * p.G + g0 + cb;
        S[rr] = Z[rr] = V::zero();
        if (rb + rr >= nr) continue;  // rows past N: scale 0
        S[rr] = scales ? (nc == W ? V::load(scales + off) : V::load_n(scales + off, nc)) : one;
        if (zeros) Z[rr] = V::mul(S[rr], V::add(c0, V::mul(V::set1(-1.f), nc == W ? V::load(zeros + off) : V::load_n(zeros + off, nc))));
      }
      transpose_block(S);
      if (zeros) transpose_block(Z);
      for (int c = 0; c < nc; ++c) {
        V::store(sc + (cb + c) * 32 + rb, S[c]);
        V::store(sz + (cb + c) * 32 + rb, Z[c]);
      }
    }
}

// ------------------------------------------------------------------------------------------
// Block cores: acc[mm][r] for rows m0 .. m0 + MC - 1 of x and the 32 rows of tile t over
// k in [k0, k1):  int8 / exact: sum_i 2^i sum_a T_a[idx_{i,a}] (int8: in table units);
// codebook: sum_k codebook[q] x_k.
// ------------------------------------------------------------------------------------------

template <int MC>
static void core_int8_scalar(const LutParams& p, int64_t t, int m0, int64_t k0, int64_t k1, float* acc) {
  int32_t a[MC][32];
  memset(a, 0, sizeof(a));
  for (int64_t kk = k0 / 8; kk < k1 / 8; ++kk) {
    const int8_t* T[MC];
    for (int mm = 0; mm < MC; ++mm) T[mm] = p.tq + (m0 + mm) * p.tstride + 2 * kk * 16;
    for (int i = 0; i < p.bits; ++i) {
      const uint8_t* col = plane_col(p, t, kk, i);
      for (int r = 0; r < 32; ++r) {
        const int lo = col[r] & 15, hi = col[r] >> 4;
        for (int mm = 0; mm < MC; ++mm) a[mm][r] += (T[mm][lo] + T[mm][16 + hi]) << i;
      }
    }
  }
  for (int mm = 0; mm < MC; ++mm)
    for (int r = 0; r < 32; ++r) acc[mm * 32 + r] = (float)a[mm][r];
}

template <int MC>
static void core_exact_scalar(const LutParams& p, int64_t t, int m0, int64_t k0, int64_t k1, float* acc) {
  float a[MC][32];
  memset(a, 0, sizeof(a));
  for (int64_t kk = k0 / 8; kk < k1 / 8; ++kk) {
    const float* T[MC];
    for (int mm = 0; mm < MC; ++mm) T[mm] = p.tf + (m0 + mm) * p.tstride + 2 * kk * 16;
    for (int i = 0; i < p.bits; ++i) {
      const uint8_t* col = plane_col(p, t, kk, i);
      const float w = (float)(1 << i);
      for (int r = 0; r < 32; ++r) {
        const int lo = col[r] & 15, hi = col[r] >> 4;
        for (int mm = 0; mm < MC; ++mm) a[mm][r] += (T[mm][lo] + T[mm][16 + hi]) * w;
      }
    }
  }
  memcpy(acc, a, sizeof(a));
}

// Codebook value of code q for tile row r (0 for rows past N: their per-channel table does not exist).
static inline float cb_value(const LutParams& p, int64_t n, int q) {
  if (p.cb_rows == 1) return p.codebook[q];
  return n < p.N ? p.codebook[n * (1 << p.bits) + q] : 0.f;
}

template <int MC>
static void core_codebook_scalar(const LutParams& p, int64_t t, int m0, int64_t k0, int64_t k1, float* acc) {
  float a[MC][32];
  memset(a, 0, sizeof(a));
  for (int64_t kk = k0 / 8; kk < k1 / 8; ++kk) {
    const uint8_t* col = plane_col(p, t, kk, 0);
    for (int r = 0; r < 32; ++r)
      for (int j = 0; j < 8; ++j) {
        const float v = cb_value(p, t * 32 + r, lut_code(col, p.bits, r, j));
        for (int mm = 0; mm < MC; ++mm) a[mm][r] += v * p.x[(m0 + mm) * p.K_pad + 8 * kk + j];
      }
  }
  memcpy(acc, a, sizeof(a));
}

#if defined(PK_LUT_AVX512)
#if defined(__AVX512VBMI__) && defined(__AVX512VNNI__)
// vpermb looks 64-byte tables up: one zmm holds the tables of 4 activation groups (two byte
// columns kk, kk + 1). Each row's dword of indices [lo(kk), hi(kk) + 16, lo(kk+1) + 32,
// hi(kk+1) + 48] is built with vpermb (gather the row's two bytes) + vpmultishiftqb (nibbles to
// byte boundaries) + vpternlogd (mask, add the table offset); vpdpbusd then adds the 4 looked-up
// bytes of each row into its int32 accumulator with weight 2^i for plane i.
// Small MC gets several accumulators per row (planes round-robin) to cover the vpdpbusd latency.
template <int MC, bool TWO>
static inline void vbmi_step(const LutParams& p, int64_t t, int m0, int64_t kk, __m512i (*a)[2][4]) {
  constexpr int NA = MC == 1 ? 4 : MC == 2 ? 2 : 1;
  // vpermb pattern: qword q of half h gathers bytes [B0, B1, B0', B1'] of rows 16h + 2q and
  // 16h + 2q + 1 (B0 = byte column kk at offset row, B1 = column kk + 1 at 32 + row).
  const __m512i q2 = _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(0x0202020202020202LL));
  const __m512i P0 = _mm512_add_epi8(q2, _mm512_set1_epi64(0x0000000021012000LL));
  const __m512i P1 = _mm512_add_epi8(P0, _mm512_set1_epi8(16));
  const __m512i shifts = _mm512_set1_epi64(0x1C1814100C080400LL);  // bit offsets 0, 4, ..., 28
  const __m512i nib = _mm512_set1_epi8(0x0F), offs = _mm512_set1_epi32(0x30201000);
  // Last group pair of a block with an odd number of byte columns: only the first two tables count.
  const __mmask64 tmask = TWO ? ~(__mmask64)0 : (__mmask64)0x3333333333333333ULL;
  __m512i T[MC];
  for (int mm = 0; mm < MC; ++mm) T[mm] = _mm512_loadu_si512(p.tq + (m0 + mm) * p.tstride + 2 * kk * 16);
  const uint8_t* col = plane_col(p, t, kk, 0);
  prefetch_ahead(p, t, kk, 2);
  for (int i0 = 0; i0 < p.bits; i0 += NA)
    for (int u = 0; u < NA; ++u) {
      const int i = i0 + u;
      if (NA > 1 && i >= p.bits) break;
      const __m256i b0 = _mm256_loadu_si256((const __m256i*)(col + i * 32));
      const __m256i b1 = TWO ? _mm256_loadu_si256((const __m256i*)(col + (p.bits + i) * 32)) : b0;
      const __m512i C = _mm512_inserti64x4(_mm512_castsi256_si512(b0), b1, 1);
      const __m512i x0 = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(P0, C)), nib, offs, 0xEA);
      const __m512i x1 = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(P1, C)), nib, offs, 0xEA);
      const __m512i w = _mm512_set1_epi8((char)(1 << i));
      for (int mm = 0; mm < MC; ++mm) {
        a[mm][0][u] = _mm512_dpbusd_epi32(a[mm][0][u], w, _mm512_maskz_permutexvar_epi8(tmask, x0, T[mm]));
        a[mm][1][u] = _mm512_dpbusd_epi32(a[mm][1][u], w, _mm512_maskz_permutexvar_epi8(tmask, x1, T[mm]));
      }
    }
}

template <int MC>
static void core_int8(const LutParams& p, int64_t t, int m0, int64_t k0, int64_t k1, float* acc) {
  __m512i a[MC][2][4];
  for (int mm = 0; mm < MC; ++mm)
    for (int h = 0; h < 2; ++h)
      for (int u = 0; u < 4; ++u) a[mm][h][u] = _mm512_setzero_si512();
  int64_t kk = k0 / 8;
  const int64_t kk1 = k1 / 8;
  for (; kk + 1 < kk1; kk += 2) vbmi_step<MC, true>(p, t, m0, kk, a);
  if (kk < kk1) vbmi_step<MC, false>(p, t, m0, kk, a);
  for (int mm = 0; mm < MC; ++mm)
    for (int h = 0; h < 2; ++h) {
      const __m512i s = _mm512_add_epi32(_mm512_add_epi32(a[mm][h][0], a[mm][h][1]), _mm512_add_epi32(a[mm][h][2], a[mm][h][3]));
      _mm512_storeu_ps(acc + mm * 32 + 16 * h, _mm512_cvtepi32_ps(s));
    }
}
#else
// vpshufb looks each byte's nibble up in the 16-byte table broadcast to the four 128-bit lanes.
// One zmm = planes i and i+1 of a byte column (32 rows each). Low and high nibble lookups of a
// row are interleaved (vpunpck{l,h}bw) and summed in pairs by vpmaddubsw, which also weights the
// plane (2^(i mod 4), per lane); int16 sums are flushed to int32 before they can overflow.
template <int MC>
static void core_int8(const LutParams& p, int64_t t, int m0, int64_t k0, int64_t k1, float* acc) {
  alignas(64) int32_t a32[MC][32];
  memset(a32, 0, sizeof(a32));
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const int64_t kk0 = k0 / 8, kk1 = k1 / 8;
  for (int q0 = 0; q0 < p.bits; q0 += 4) {
    const int q1 = q0 + 4 < p.bits ? q0 + 4 : p.bits;
    // Largest per-lane weight sum: lanes 0-1 hold planes q0, q0+2; lanes 2-3 hold q0+1, q0+3.
    int wl[2] = {0, 0};
    for (int i = q0; i < q1; ++i) wl[(i - q0) & 1] += 1 << (i - q0);
    const int wmax = wl[0] > wl[1] ? wl[0] : wl[1];
    const int64_t F = 32767 / (254 * wmax);
    for (int64_t kc = kk0; kc < kk1; kc += F) {
      const int64_t kce = kc + F < kk1 ? kc + F : kk1;
      __m512i lo[MC], hi[MC];
      for (int mm = 0; mm < MC; ++mm) lo[mm] = hi[mm] = _mm512_setzero_si512();
      for (int64_t kk = kc; kk < kce; ++kk) {
        prefetch_ahead(p, t, kk, 1);
        for (int i = q0; i < q1; i += 2) {
          const bool pair = i + 1 < q1;
          const uint8_t* col = plane_col(p, t, kk, i);
          const __m512i xb = pair ? _mm512_loadu_si512(col) : _mm512_maskz_loadu_epi8((__mmask64)0xFFFFFFFFULL, col);
          const __m512i il = _mm512_and_si512(xb, nib);
          const __m512i ih = _mm512_and_si512(_mm512_srli_epi16(xb, 4), nib);
          const __m512i w = _mm512_mask_blend_epi64((__mmask8)0xF0, _mm512_set1_epi8((char)(1 << (i - q0))),
                                                    _mm512_set1_epi8(pair ? (char)(2 << (i - q0)) : 0));
          for (int mm = 0; mm < MC; ++mm) {
            const int8_t* T = p.tq + (m0 + mm) * p.tstride + 2 * kk * 16;
            const __m512i vl = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)T)), il);
            const __m512i vh = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(T + 16))), ih);
            lo[mm] = _mm512_add_epi16(lo[mm], _mm512_maddubs_epi16(w, _mm512_unpacklo_epi8(vl, vh)));
            hi[mm] = _mm512_add_epi16(hi[mm], _mm512_maddubs_epi16(w, _mm512_unpackhi_epi8(vl, vh)));
          }
        }
      }
      // lo lanes: [rows 0-7, 16-23] of plane q0 (+2), then the same rows of plane q0+1 (+3); hi: rows 8-15, 24-31.
      for (int mm = 0; mm < MC; ++mm) {
        const __m512i l = _mm512_add_epi32(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(lo[mm])),
                                           _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(lo[mm], 1)));
        const __m512i h = _mm512_add_epi32(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(hi[mm])),
                                           _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(hi[mm], 1)));
        const __m512i r0 = _mm512_slli_epi32(_mm512_shuffle_i64x2(l, h, 0x44), q0);  // rows 0-7, 8-15
        const __m512i r1 = _mm512_slli_epi32(_mm512_shuffle_i64x2(l, h, 0xEE), q0);  // rows 16-23, 24-31
        _mm512_store_si512(a32[mm], _mm512_add_epi32(_mm512_load_si512(a32[mm]), r0));
        _mm512_store_si512(a32[mm] + 16, _mm512_add_epi32(_mm512_load_si512(a32[mm] + 16), r1));
      }
    }
  }
  for (int mm = 0; mm < MC; ++mm)
    for (int h = 0; h < 2; ++h)
      _mm512_storeu_ps(acc + mm * 32 + 16 * h, _mm512_cvtepi32_ps(_mm512_load_si512(a32[mm] + 16 * h)));
}
#endif

// fp32 tables: one zmm holds all 16 entries; vpermps indexes it with the low 4 bits of each
// dword (the byte's low nibble as is, the high nibble after a shift).
// Small MC: several accumulators per row (planes round-robin) to cover the fma latency.
template <int MC>
static void core_exact(const LutParams& p, int64_t t, int m0, int64_t k0, int64_t k1, float* acc) {
  constexpr int NA = MC == 1 ? 4 : MC == 2 ? 2 : 1;
  __m512 a[MC][2][NA];
  for (int mm = 0; mm < MC; ++mm)
    for (int h = 0; h < 2; ++h)
      for (int u = 0; u < NA; ++u) a[mm][h][u] = _mm512_setzero_ps();
  for (int64_t kk = k0 / 8; kk < k1 / 8; ++kk) {
    prefetch_ahead(p, t, kk, 1);
    for (int i0 = 0; i0 < p.bits; i0 += NA)
      for (int u = 0; u < NA; ++u) {
        const int i = i0 + u;
        if (NA > 1 && i >= p.bits) break;
        const uint8_t* col = plane_col(p, t, kk, i);
        __m512i il[2], ih[2];
        for (int h = 0; h < 2; ++h) {
          il[h] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(col + 16 * h)));
          ih[h] = _mm512_srli_epi32(il[h], 4);
        }
        const __m512 w = _mm512_set1_ps((float)(1 << i));
        for (int mm = 0; mm < MC; ++mm) {
          const float* T = p.tf + (m0 + mm) * p.tstride + 2 * kk * 16;
          const __m512 t0 = _mm512_loadu_ps(T), t1 = _mm512_loadu_ps(T + 16);
          for (int h = 0; h < 2; ++h)
            a[mm][h][u] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_permutexvar_ps(il[h], t0), _mm512_permutexvar_ps(ih[h], t1)),
                                          w, a[mm][h][u]);
        }
      }
  }
  for (int mm = 0; mm < MC; ++mm)
    for (int h = 0; h < 2; ++h) {
      __m512 v = a[mm][h][0];
      for (int u = 1; u < NA; ++u) v = _mm512_add_ps(v, a[mm][h][u]);
      _mm512_storeu_ps(acc + mm * 32 + 16 * h, v);
    }
}

#elif defined(PK_LUT_AVX2)
// vpshufb on one plane of a byte column (32 rows); the 16-byte table is broadcast to both lanes.
// Low/high nibble lookups are interleaved and summed in pairs by vpmaddubsw (weight 2^(i mod 4)).
template <int MC>
static void core_int8(const LutParams& p, int64_t t, int m0, int64_t k0, int64_t k1, float* acc) {
  alignas(32) int32_t a32[MC][32];
  memset(a32, 0, sizeof(a32));
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const int64_t kk0 = k0 / 8, kk1 = k1 / 8;
  for (int q0 = 0; q0 < p.bits; q0 += 4) {
    const int q1 = q0 + 4 < p.bits ? q0 + 4 : p.bits;
    const int64_t F = 32767 / (254 * ((1 << (q1 - q0)) - 1));
    for (int64_t kc = kk0; kc < kk1; kc += F) {
      const int64_t kce = kc + F < kk1 ? kc + F : kk1;
      __m256i lo[MC], hi[MC];
      for (int mm = 0; mm < MC; ++mm) lo[mm] = hi[mm] = _mm256_setzero_si256();
      for (int64_t kk = kc; kk < kce; ++kk) {
        prefetch_ahead(p, t, kk, 1);
        for (int i = q0; i < q1; ++i) {
          const __m256i xb = _mm256_loadu_si256((const __m256i*)plane_col(p, t, kk, i));
          const __m256i il = _mm256_and_si256(xb, nib);
          const __m256i ih = _mm256_and_si256(_mm256_srli_epi16(xb, 4), nib);
          const __m256i w = _mm256_set1_epi8((char)(1 << (i - q0)));
          for (int mm = 0; mm < MC; ++mm) {
            const int8_t* T = p.tq + (m0 + mm) * p.tstride + 2 * kk * 16;
            const __m256i vl = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)T)), il);
            const __m256i vh = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(T + 16))), ih);
            lo[mm] = _mm256_add_epi16(lo[mm], _mm256_maddubs_epi16(w, _mm256_unpacklo_epi8(vl, vh)));
            hi[mm] = _mm256_add_epi16(hi[mm], _mm256_maddubs_epi16(w, _mm256_unpackhi_epi8(vl, vh)));
          }
        }
      }
      // lo: [rows 0-7 | rows 16-23], hi: [rows 8-15 | rows 24-31]
      for (int mm = 0; mm < MC; ++mm) {
        const __m256i parts[4] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo[mm])),
                                  _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi[mm])),
                                  _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo[mm], 1)),
                                  _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi[mm], 1))};
        for (int c = 0; c < 4; ++c) {
          __m256i* d = (__m256i*)(a32[mm] + 8 * c);
          _mm256_store_si256(d, _mm256_add_epi32(_mm256_load_si256(d), _mm256_slli_epi32(parts[c], q0)));
        }
      }
    }
  }
  for (int mm = 0; mm < MC; ++mm)
    for (int c = 0; c < 4; ++c)
      _mm256_storeu_ps(acc + mm * 32 + 8 * c, _mm256_cvtepi32_ps(_mm256_load_si256((const __m256i*)(a32[mm] + 8 * c))));
}

// fp32 tables: vpermps covers 8 entries, so each lookup permutes both halves of the table and
// blends on bit 3 of the index (moved to the sign bit). 8 rows per ymm, the tile in 4 quarters.
template <int MC>
static void core_exact(const LutParams& p, int64_t t, int m0, int64_t k0, int64_t k1, float* acc) {
  constexpr int NA = MC == 1 ? 4 : MC == 2 ? 2 : 1;
  for (int qr = 0; qr < 4; ++qr) {
    __m256 a[MC][NA];
    for (int mm = 0; mm < MC; ++mm)
      for (int u = 0; u < NA; ++u) a[mm][u] = _mm256_setzero_ps();
    for (int64_t kk = k0 / 8; kk < k1 / 8; ++kk) {
      if (qr == 0) prefetch_ahead(p, t, kk, 1);
      for (int i0 = 0; i0 < p.bits; i0 += NA)
        for (int u = 0; u < NA; ++u) {
          const int i = i0 + u;
          if (NA > 1 && i >= p.bits) break;
          const __m256i il = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(plane_col(p, t, kk, i) + 8 * qr)));
          const __m256i ih = _mm256_srli_epi32(il, 4);
          const __m256 bl = _mm256_castsi256_ps(_mm256_slli_epi32(il, 28)), bh = _mm256_castsi256_ps(_mm256_slli_epi32(il, 24));
          const __m256 w = _mm256_set1_ps((float)(1 << i));
          for (int mm = 0; mm < MC; ++mm) {
            const float* T = p.tf + (m0 + mm) * p.tstride + 2 * kk * 16;
            const __m256 v0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(T), il),
                                               _mm256_permutevar8x32_ps(_mm256_loadu_ps(T + 8), il), bl);
            const __m256 v1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(T + 16), ih),
                                               _mm256_permutevar8x32_ps(_mm256_loadu_ps(T + 24), ih), bh);
            a[mm][u] = _mm256_fmadd_ps(_mm256_add_ps(v0, v1), w, a[mm][u]);
          }
        }
    }
    for (int mm = 0; mm < MC; ++mm) {
      __m256 v = a[mm][0];
      for (int u = 1; u < NA; ++u) v = _mm256_add_ps(v, a[mm][u]);
      _mm256_storeu_ps(acc + mm * 32 + 8 * qr, v);
    }
  }
}
#else
template <int MC>
static void core_int8(const LutParams& p, int64_t t, int m0, int64_t k0, int64_t k1, float* acc) {
  core_int8_scalar<MC>(p, t, m0, k0, k1, acc);
}
template <int MC>
static void core_exact(const LutParams& p, int64_t t, int m0, int64_t k0, int64_t k1, float* acc) {
  core_exact_scalar<MC>(p, t, m0, k0, k1, acc);
}
#endif

// Codebook: rebuild the codes of W rows at once, look the values up, fma with x. Plane bytes
// of the rows are packed into a dword d = b0 | b1 << 8 | b2 << 16 | b3 << 24 (planes 0..3; a
// second dword for planes 4..7); code j (bit j of every byte) is then
//   ((d >> j) & 0x01010101) * 0x01020408 >> 24
// (the multiply moves bit j of byte i to bit 24 + i without carries).
#if defined(PK_LUT_AVX512) || defined(PK_LUT_AVX2)
#if defined(PK_LUT_AVX512)
typedef __m512i LutI;
static inline LutI cb_i_set1(int v) { return _mm512_set1_epi32(v); }
static inline LutI cb_i_bytes(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
static inline LutI cb_i_or(LutI a, LutI b) { return _mm512_or_si512(a, b); }
static inline LutI cb_i_and(LutI a, LutI b) { return _mm512_and_si512(a, b); }
static inline LutI cb_i_sll(LutI a, int n) { return _mm512_slli_epi32(a, n); }
static inline LutI cb_i_srl(LutI a, int n) { return _mm512_srli_epi32(a, n); }
static inline LutI cb_i_mul(LutI a, LutI b) { return _mm512_mullo_epi32(a, b); }
static inline LutI cb_i_add(LutI a, LutI b) { return _mm512_add_epi32(a, b); }
static inline LutI cb_i_iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
// v[l] = cb[idx[l]] where lane l is valid (mask bit), else 0.
static inline __m512 cb_gather(const float* cb, LutI idx, int nvalid) {
  const __mmask16 m = nvalid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nvalid) - 1);
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, cb, 4);
}
static inline __m512 cb_perm16(const __m512& tab, LutI idx, const __m512&) { return _mm512_permutexvar_ps(idx, tab); }
#else
typedef __m256i LutI;
static inline LutI cb_i_set1(int v) { return _mm256_set1_epi32(v); }
static inline LutI cb_i_bytes(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
static inline LutI cb_i_or(LutI a, LutI b) { return _mm256_or_si256(a, b); }
static inline LutI cb_i_and(LutI a, LutI b) { return _mm256_and_si256(a, b); }
static inline LutI cb_i_sll(LutI a, int n) { return _mm256_slli_epi32(a, n); }
static inline LutI cb_i_srl(LutI a, int n) { return _mm256_srli_epi32(a, n); }
static inline LutI cb_i_mul(LutI a, LutI b) { return _mm256_mullo_epi32(a, b); }
static inline LutI cb_i_add(LutI a, LutI b) { return _mm256_add_epi32(a, b); }
static inline LutI cb_i_iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
static inline __m256 cb_gather(const float* cb, LutI idx, int nvalid) {
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(nvalid), cb_i_iota());
  return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), cb, idx, _mm256_castsi256_ps(m), 4);
}
// 16-entry table in two halves (tab = entries 0-7, hi = 8-15), chosen by bit 3 of the code.
static inline __m256 cb_perm16(const __m256& tab, LutI idx, const __m256& hi) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(tab, idx), _mm256_permutevar8x32_ps(hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
#endif

template <int MC>
static void core_codebook(const LutParams& p, int64_t t, int m0, int64_t k0, int64_t k1, float* acc) {
  typedef LutV V;
  constexpr int W = V::W;
  const int L = 1 << p.bits;
  const bool shared = p.cb_rows == 1, perm = shared && p.bits <= 4;
  float tab[16] = {0.f};
  if (perm) memcpy(tab, p.codebook, sizeof(float) * L);
  const typename V::F t_lo = V::load(tab), t_hi = W == 16 ? t_lo : V::load(tab + 8);
  const LutI bit = cb_i_set1(0x01010101), magic = cb_i_set1(0x01020408);
  const float* x = p.x + (int64_t)m0 * p.K_pad;
  for (int rb = 0; rb < 32; rb += W) {
    const int64_t n0 = t * 32 + rb;
    const int nvalid = p.N - n0 >= W ? W : (p.N - n0 > 0 ? (int)(p.N - n0) : 0);
    // per-channel: row n's table starts at n * L (rows past N are masked out of the gather)
    const LutI rowbase = shared ? cb_i_set1(0) : cb_i_add(cb_i_set1((int)(n0 * L)), cb_i_mul(cb_i_iota(), cb_i_set1(L)));
    typename V::F a[MC];
    for (int mm = 0; mm < MC; ++mm) a[mm] = V::zero();
    for (int64_t kk = k0 / 8; kk < k1 / 8; ++kk) {
      const uint8_t* col = plane_col(p, t, kk, 0) + rb;
      LutI d[2] = {cb_i_set1(0), cb_i_set1(0)};
      for (int i = 0; i < p.bits; ++i) d[i >> 2] = cb_i_or(d[i >> 2], cb_i_sll(cb_i_bytes(col + i * 32), 8 * (i & 3)));
      for (int j = 0; j < 8; ++j) {
        LutI q = cb_i_srl(cb_i_mul(cb_i_and(cb_i_srl(d[0], j), bit), magic), 24);
        if (p.bits > 4) q = cb_i_or(q, cb_i_sll(cb_i_srl(cb_i_mul(cb_i_and(cb_i_srl(d[1], j), bit), magic), 24), 4));
        const typename V::F v = perm ? cb_perm16(t_lo, q, t_hi) : cb_gather(p.codebook, cb_i_add(rowbase, q), shared ? W : nvalid);
        const float* xk = x + 8 * kk + j;
        for (int mm = 0; mm < MC; ++mm) a[mm] = V::fma(v, V::set1(xk[mm * p.K_pad]), a[mm]);
      }
    }
    for (int mm = 0; mm < MC; ++mm) V::store(acc + mm * 32 + rb, a[mm]);
  }
}
#else
template <int MC>
static void core_codebook(const LutParams& p, int64_t t, int m0, int64_t k0, int64_t k1, float* acc) {
  core_codebook_scalar<MC>(p, t, m0, k0, k1, acc);
}
#endif

// ------------------------------------------------------------------------------------------
// Driver
// ------------------------------------------------------------------------------------------

template <int MC>
static void run_block(const LutParams& p, int64_t t, int m0, int64_t b, int64_t k0, int64_t k1, const float* sc,
                      const float* sz, float* acc, float* y) {
  typedef LutV V;
  if (p.scheme == LutScheme::kCodebook) {
    core_codebook<MC>(p, t, m0, k0, k1, acc);
    for (int mm = 0; mm < MC; ++mm)
      for (int r = 0; r < 32; r += V::W) {
        float* yr = y + (m0 + mm) * 32 + r;
        V::store(yr, V::fma(V::load(sc + r), V::load(acc + mm * 32 + r), V::load(yr)));
      }
    return;
  }
  if (p.mode == LutMode::kExact) core_exact<MC>(p, t, m0, k0, k1, acc);
  else core_int8<MC>(p, t, m0, k0, k1, acc);
  const bool affine = p.scheme == LutScheme::kAffine;
  for (int mm = 0; mm < MC; ++mm) {
    const int64_t mb = (m0 + mm) * p.nblk + b;
    const typename V::F h = V::set1(0.5f * p.ts[mb]), s = V::set1(p.sb[mb]);
    for (int r = 0; r < 32; r += V::W) {
      float* yr = y + (m0 + mm) * 32 + r;
      typename V::F v = V::fma(V::load(sc + r), V::mul(V::load(acc + mm * 32 + r), h), V::load(yr));
      if (affine) v = V::fma(V::load(sz + r), s, v);
      V::store(yr, v);
    }
  }
}

// Tiles [t0, t1) (<= kLutTileGroup): K is walked in chunks of <= 16 table blocks (<= 2048 k),
// and every tile of the group runs the chunk before the next one starts, so the chunk's tables
// (M * 2048 * 4 bytes int8, * 16 fp32) stay in L1/L2 instead of being re-read for every tile.
void lut_tile(const LutParams& p, int64_t t0, int64_t t1, float* work) {
  const int M = p.M;
  float* y = work;                                // [t1 - t0, M, 32]
  float* sc = y + kLutTileGroup * M * 32;         // [16, 32]
  float* sz = sc + 16 * 32;                       // [16, 32]
  float* acc = sz + 16 * 32;                      // [kMC, 32]
  memset(y, 0, sizeof(float) * (t1 - t0) * M * 32);
  for (int64_t b0 = 0; b0 < p.nblk; b0 += 16) {
    const int64_t b1 = b0 + 16 < p.nblk ? b0 + 16 : p.nblk;
    const int64_t g0 = b0 / p.bpg;
    const int ng = (int)((b1 - 1) / p.bpg + 1 - g0);  // <= 16 scale groups
    const int64_t kc0 = lut_block_k0(p, b0) / 8, kc1 = lut_block_k1(p, b1 - 1) / 8;
    for (int64_t t = t0; t < t1; ++t) {
      float* yt = y + (t - t0) * M * 32;
      // The cores prefetch ahead within a tile's stream; start the next tile's chunk here.
      // Scales are 32 short row pieces per tile, a pattern no hardware prefetcher follows.
      if (t + 1 < t1) {
        const char* nx = (const char*)plane_col(p, t + 1, kc0, 0);
        const int64_t n = (kc1 - kc0) * p.bits * 32 < PK_LUT_PF ? (kc1 - kc0) * p.bits * 32 : PK_LUT_PF;
        for (int64_t l = 0; l < n; l += 64) prefetch<3>(nx + l);
      }
      {  // scales of the next (tile, chunk): the next tile, or the group's first tile in the next chunk
        const int64_t tn = t + 1 < t1 ? t + 1 : t0, gn = t + 1 < t1 ? g0 : b1 / p.bpg;
        const int64_t r1 = (tn + 1) * kLutTileN < p.N ? (tn + 1) * kLutTileN : p.N;
        if (gn < p.G)
          for (int64_t r = tn * kLutTileN; r < r1; ++r) {
            if (p.scales) prefetch<3>(p.scales + r * p.G + gn);
            if (p.zeros) prefetch<3>(p.zeros + r * p.G + gn);
          }
      }
      load_scales(p, t, g0, ng, sc, sz);
      int64_t g = g0, c = b0 - g0 * p.bpg;  // block b = g * bpg + c, walked without divisions
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t k0 = g * p.gs + c * kLutBlockK, k1 = k0 + kLutBlockK < (g + 1) * p.gs ? k0 + kLutBlockK : (g + 1) * p.gs;
        const float* s = sc + (g - g0) * 32;
        const float* z = sz + (g - g0) * 32;
        for (int m0 = 0; m0 < M; m0 += kMC) {
          switch (M - m0 < kMC ? M - m0 : kMC) {
            case 1: run_block<1>(p, t, m0, b, k0, k1, s, z, acc, yt); break;
            case 2: run_block<2>(p, t, m0, b, k0, k1, s, z, acc, yt); break;
            case 3: run_block<3>(p, t, m0, b, k0, k1, s, z, acc, yt); break;
            case 4: run_block<4>(p, t, m0, b, k0, k1, s, z, acc, yt); break;
            case 5: if constexpr (kMC >= 5) run_block<5>(p, t, m0, b, k0, k1, s, z, acc, yt); break;
            case 6: if constexpr (kMC >= 6) run_block<6>(p, t, m0, b, k0, k1, s, z, acc, yt); break;
            case 7: if constexpr (kMC >= 7) run_block<7>(p, t, m0, b, k0, k1, s, z, acc, yt); break;
            case 8: if constexpr (kMC >= 8) run_block<8>(p, t, m0, b, k0, k1, s, z, acc, yt); break;
          }
        }
        if (++c == p.bpg) { c = 0; ++g; }
      }
    }
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kLutTileN;
    const int nr = p.N - n0 < kLutTileN ? (int)(p.N - n0) : kLutTileN;
    for (int m = 0; m < M; ++m) memcpy(p.out + m * p.N + n0, y + ((t - t0) * M + m) * 32, sizeof(float) * nr);
  }
}

void lut_prepare(const LutParams& p, int64_t m, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) prepare_block(p, m, b);
}

}  // namespace PK_ISA_NS
}  // namespace cpu
}  // namespace pykernels
