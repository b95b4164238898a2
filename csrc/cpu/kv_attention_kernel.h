// Decode attention fused with the quantized KV cache (issue 4), written once against the SIMD
// traits V (simd.h) and included by each per-ISA translation unit (kv_attention_*.cpp).
//
// The quantized bytes are read in place and dequantized in registers; no copy of the cache.
//   keys   (int): per key group (gs tokens, per-channel scale s_d / zero z_d)
//                 score_t = sum_d (q_d s_d) c_td + sum_d q_d z_d: q*s and q.z are computed once
//                 per group and query head, so the inner loop is code -> float and one FMA.
//   values (int): acc_d += p_t (s_tc c_td + z_tc): p_t s_tc is folded into the FMA (one broadcast
//                 per channel group), the zero term sum_t p_t z_tc is accumulated per channel
//                 group (vectors over tokens) and added once at the end.
//   fp8:          e4m3 -> binary16 bits (kv_quant.h rule) -> F16C convert; the factor 256 and the
//                 group scale are folded into q (keys) and into p (values).
//   int4 / int2 keys, AVX512-BF16 variant (PK_KV_DPBF16, kv_attention_avx512bf16.cpp): q*s is
//                 rounded to bf16 once per group and head, the codes become exact bf16 (B + c,
//                 by OR-ing exponent bits), and vdpbf16ps does 2 MACs per fp32 lane; B * sum qs~
//                 (same rounded values) is folded into q.z. Not exact fp32: each key term carries
//                 the bf16 rounding of q*s (|rel. error| <= 2^-9); tests/test_kv_cpu.py checks it
//                 against an oracle with the same rounding. About 40% fewer key-loop instructions
//                 (int4, D = 128, G = 4: 8 unpack + 16 dpbf16 per token vs 20 + 32 FMA).
// Unpacking works on "units" of bytes: one load, a zero-extension to 32-bit lanes, shifts and
// masks give VPU vectors of codes. The lanes of those vectors are a permutation of the channels
// (e.g. int4: the even channels of 32, then the odd ones); q and the value accumulators are kept
// in that permuted order (key and value layouts may differ) and the result is un-permuted at the
// end. Every vector of a value unit lies inside one channel group (unit channels <= gs).
// The G query heads of a kv-head share every byte read: a unit is unpacked once per token and
// used by up to 8 heads.
//
// Sink and residual rows (full precision) are attended in natural channel order as a second
// online-softmax state; the two states are merged at the end (softmax.h algebra).
//
// Cost per token and kv-head (AVX-512, int4, D = 128, G = 4): keys 4 units x (1 vpmovzxbd,
// 1 and, 1 shift, 2 cvt) + 32 FMA + 8 loads of q*s (shared by 4 tokens) + 1/4 of a 16-score
// transposing reduction; values 4 units x the same unpacking + 32 FMA + 16 broadcasts of p*s
// (gs = 32; 8 for gs >= 64). About 140 instructions, 64 of them FMAs: compute-bound on this
// path, so the per-block work (group setup, value scales, softmax) is vectorised too.
#pragma once
#include <string.h>

#include "kv_attention.h"
#include "pykernels/softmax.h"
#include "simd.h"

// Tuning switches (measured on the 2-core AVX-512 dev box, 2 threads, B=1 Hq=32 Hkv=8 D=128
// L=16384): embedded-broadcast FMAs in the value loop (3-5% faster than a shared broadcast),
// software prefetch 4 blocks ahead (5-8% faster than none; 0 turns it off).
#ifndef PK_KV_EMBED_BCAST
#define PK_KV_EMBED_BCAST 1
#endif
#ifndef PK_KV_PF_DIST
#define PK_KV_PF_DIST 4
#endif

namespace pykernels {
namespace cpu {
namespace PK_ISA_NS {

// Unpacking schemes.
enum : int {
  kZ8 = 0,   // int8: W bytes -> 1 vector, natural order
  kZ4 = 1,   // int4: W bytes -> 2 vectors (low nibbles = even channels, high = odd)
  kZ2 = 2,   // int2: W bytes -> 4 vectors (vector k: channels 4i + k)
  kZ2h = 3,  // int2: W/2 bytes, duplicated -> 2 vectors, each inside 2W channels (for gs = 32)
  kF8 = 4,   // fp8 e4m3: W bytes -> 1 vector, natural order
  // Keys only, AVX512-BF16 (PK_KV_DPBF16): a unit is 128 channels as 4 vectors of 32 bf16 lanes,
  // 16-bit lane j of vector k = channel 4j + k, holding the bf16 of B + code (B = 16 / 8: the
  // code shifted into the mantissa, OR the exponent bits). Adjacent lanes (one dpbf16 pair)
  // hold channels 8i + k, 8i + 4 + k; q * scale is kept in the same order. In fp32 position
  // terms (VPU = 8 vectors of 16 floats, used for the permutation and padding only).
  kB4 = 5,   // int4: 64 bytes (16-bit word j = bytes 2j, 2j+1 = channels 4j .. 4j+3)
  kB2 = 6,   // int2: 32 bytes zero-extended to words (word j = byte j = channels 4j .. 4j+3)
};
template <int SCH> constexpr bool sch_bf16() { return SCH == kB4 || SCH == kB2; }

template <int SCH> constexpr int sch_vpu() { return SCH == kZ4 ? 2 : SCH == kZ2 ? 4 : SCH == kZ2h ? 2 : sch_bf16<SCH>() ? 8 : 1; }
template <int SCH, int W> constexpr int sch_unit_bytes() { return SCH == kZ2h ? W / 2 : SCH == kB4 ? 64 : SCH == kB2 ? 32 : W; }

// Channel of lane i of vector k of unit u (SCH, W lanes).
template <int SCH>
static inline int64_t sch_channel(int W, int64_t u, int k, int i) {
  switch (SCH) {
    case kZ4: return u * 2 * W + 2 * i + k;
    case kZ2: return u * 4 * W + 4 * i + k;
    case kZ2h: return u * 2 * W + 4 * (i % (W / 2)) + 2 * k + i / (W / 2);
    case kB4:
    case kB2: return u * 128 + 4 * ((k % 2) * 16 + i) + k / 2;  // fp32 position (8 x 16 per unit)
    default: return u * W + i;
  }
}

template <typename V, int SCH> struct Unpack;

template <int SCH>
struct Unpack<ScalarV, SCH> {
  typedef unsigned int U;
  static inline U load(const unsigned char* p) { return p[0]; }
  static inline U load_part(const unsigned char* p, int) { return p[0]; }
  static inline void run(U b, float* out) {
    if constexpr (SCH == kZ8) out[0] = (float)b;
    else if constexpr (SCH == kZ4) { out[0] = (float)(b & 15u); out[1] = (float)(b >> 4); }
    else if constexpr (SCH == kZ2) { for (int k = 0; k < 4; ++k) out[k] = (float)((b >> (2 * k)) & 3u); }
    else out[0] = fp16_to_float(kv_fp8_to_fp16_bits(b));  // value / 256
  }
};

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
template <int SCH>
struct Unpack<Avx2V, SCH> {
  typedef __m128i U;
  static inline U load(const unsigned char* p) {
    if constexpr (SCH == kZ2h) {
      int32_t x; memcpy(&x, p, 4);
      return _mm_set1_epi32(x);
    } else {
      return _mm_loadl_epi64((const __m128i*)p);
    }
  }
  static inline U load_part(const unsigned char* p, int n) {
    unsigned char tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(tmp, p, n);
    if constexpr (SCH == kZ2h) {
      int32_t x; memcpy(&x, tmp, 4);
      return _mm_set1_epi32(x);
    } else {
      return _mm_loadl_epi64((const __m128i*)tmp);
    }
  }
  static inline void run(U x, __m256* out) {
    if constexpr (SCH == kF8) {
      __m128i w = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(x), 7), _mm_set1_epi16((short)0xBFFF));
      out[0] = _mm256_cvtph_ps(w);
    } else {
      const __m256i d = _mm256_cvtepu8_epi32(x);
      if constexpr (SCH == kZ8) {
        out[0] = _mm256_cvtepi32_ps(d);
      } else if constexpr (SCH == kZ4) {
        out[0] = _mm256_cvtepi32_ps(_mm256_and_si256(d, _mm256_set1_epi32(15)));
        out[1] = _mm256_cvtepi32_ps(_mm256_srli_epi32(d, 4));
      } else if constexpr (SCH == kZ2) {
        const __m256i m = _mm256_set1_epi32(3);
        out[0] = _mm256_cvtepi32_ps(_mm256_and_si256(d, m));
        out[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d, 2), m));
        out[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d, 4), m));
        out[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(d, 6));
      } else {  // kZ2h: bytes 0..3 twice; lanes 0-3 shifts 0 / 4, lanes 4-7 shifts 2 / 6
        const __m256i m = _mm256_set1_epi32(3);
        out[0] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(d, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), m));
        out[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(d, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), m));
      }
    }
  }
};
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
template <int SCH>
struct Unpack<Avx512V, SCH> {
  typedef __m128i U;
  static inline U load(const unsigned char* p) {
    if constexpr (SCH == kZ2h) {
      __m128i x = _mm_loadl_epi64((const __m128i*)p);
      return _mm_unpacklo_epi64(x, x);
    } else {
      return _mm_loadu_si128((const __m128i*)p);
    }
  }
  static inline U load_part(const unsigned char* p, int n) {
    __m128i x = _mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1), p);
    if constexpr (SCH == kZ2h) x = _mm_unpacklo_epi64(x, x);
    return x;
  }
  static inline void run(U x, __m512* out) {
    if constexpr (SCH == kF8) {
      __m256i w = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(x), 7), _mm256_set1_epi16((short)0xBFFF));
      out[0] = _mm512_cvtph_ps(w);
    } else {
      const __m512i d = _mm512_cvtepu8_epi32(x);
      if constexpr (SCH == kZ8) {
        out[0] = _mm512_cvtepi32_ps(d);
      } else if constexpr (SCH == kZ4) {
        out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(d, _mm512_set1_epi32(15)));
        out[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(d, 4));
      } else if constexpr (SCH == kZ2) {
        const __m512i m = _mm512_set1_epi32(3);
        out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(d, m));
        out[1] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(d, 2), m));
        out[2] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(d, 4), m));
        out[3] = _mm512_cvtepi32_ps(_mm512_srli_epi32(d, 6));
      } else {  // kZ2h: bytes 0..7 twice; lanes 0-7 shifts 0 / 4, lanes 8-15 shifts 2 / 6
        const __m512i m = _mm512_set1_epi32(3);
        const __m512i s0 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
        const __m512i s1 = _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6);
        out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(d, s0), m));
        out[1] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(d, s1), m));
      }
    }
  }
};
#endif

// Layout of one unpacked code row: nfull whole units, then (tail_bytes > 0) one partial unit.
struct RowLayout {
  int64_t nfull, nunits, Dp;  // Dp: padded positions (nunits * unit channels)
  int tail_bytes;
};
template <typename V, int SCH>
static inline RowLayout row_layout(int64_t RB) {
  constexpr int UB = sch_unit_bytes<SCH, V::W>(), VPU = sch_vpu<SCH>();
  RowLayout r;
  r.nfull = RB / UB;
  r.tail_bytes = (int)(RB % UB);
  r.nunits = r.nfull + (r.tail_bytes ? 1 : 0);
  r.Dp = r.nunits * VPU * V::W;
  return r;
}
// perm[pos] = channel at position pos, or -1 (padding).
template <typename V, int SCH>
static inline void fill_perm(const RowLayout& rl, int64_t D, int32_t* perm) {
  constexpr int VPU = sch_vpu<SCH>(), W = V::W;
  for (int64_t u = 0; u < rl.nunits; ++u)
    for (int k = 0; k < VPU; ++k)
      for (int i = 0; i < W; ++i) {
        const int64_t c = sch_channel<SCH>(W, u, k, i);
        perm[(u * VPU + k) * W + i] = c < D ? (int32_t)c : -1;
      }
}

// fp16 [n] -> float [n].
template <typename V>
static inline void cvt_f16(const pk_u16* src, float* dst, int64_t n) {
  const fp16_t* s = reinterpret_cast<const fp16_t*>(src);
  int64_t i = 0;
  if constexpr (V::W > 1) {
    for (; i + V::W <= n; i += V::W) V::store(dst + i, V::load(s + i));
    if (i < n) { V::store_n(dst + i, V::load_n(s + i, (int)(n - i)), (int)(n - i)); i = n; }
  }
  for (; i < n; ++i) dst[i] = fp16_to_float(src[i]);
}

// ------------------------------------------------------------------ permutations and transposes

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Lane i = src[off_i] for off_i in [0, 64), 0 where off_i < 0. src: 64 readable floats.
static inline __m512 gather64(const float* src, __m512i off) {
  const __mmask16 valid = _mm512_cmpge_epi32_mask(off, _mm512_setzero_si512());
  const __mmask16 hi = _mm512_cmpge_epi32_mask(off, _mm512_set1_epi32(32));
  __m512 r = _mm512_maskz_permutex2var_ps(valid & (__mmask16)~hi, _mm512_loadu_ps(src), off, _mm512_loadu_ps(src + 16));
  if (hi) r = _mm512_mask_mov_ps(r, hi, _mm512_permutex2var_ps(_mm512_loadu_ps(src + 32), off, _mm512_loadu_ps(src + 48)));
  return r;
}
#endif

// dst[p] = src[perm[p]] (0 where perm[p] < 0) for the Dp positions of a layout whose units
// cover UC <= 64 consecutive channels. src: natural order, readable up to channel Dp + 64.
template <typename V, int UC>
static inline void permute_row(const float* src, const int32_t* perm, int64_t Dp, float* dst) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if constexpr (V::W == 16 && UC <= 32) {  // every vector inside a 32-channel window: one permute
    for (int64_t p = 0; p < Dp; p += 16) {
      const int64_t base = (p / UC) * UC;
      const __m512i pr = _mm512_loadu_si512(perm + p);
      const __mmask16 valid = _mm512_cmpge_epi32_mask(pr, _mm512_setzero_si512());
      const __m512i off = _mm512_sub_epi32(pr, _mm512_set1_epi32((int)base));
      _mm512_storeu_ps(dst + p, _mm512_maskz_permutex2var_ps(valid, _mm512_loadu_ps(src + base), off, _mm512_loadu_ps(src + base + 16)));
    }
    return;
  } else if constexpr (V::W == 16) {
    for (int64_t p = 0; p < Dp; p += 16) {
      const int64_t base = (p / UC) * UC;  // first channel of the unit
      const __m512i off = _mm512_sub_epi32(_mm512_loadu_si512(perm + p), _mm512_set1_epi32((int)base));
      // padding lanes (perm -1) become negative offsets -> 0
      _mm512_storeu_ps(dst + p, gather64(src + base, _mm512_mask_mov_epi32(off, _mm512_cmplt_epi32_mask(_mm512_loadu_si512(perm + p), _mm512_setzero_si512()), _mm512_set1_epi32(-1))));
    }
    return;
  }
#endif
  for (int64_t p = 0; p < Dp; ++p) dst[p] = perm[p] >= 0 ? src[perm[p]] : 0.f;
}

// dstT[c * kKvBlock + t] = src[t * NG + c] for t < nt, 0 for nt <= t < kKvBlock.
// src: readable up to kKvBlock * NG + 64 floats.
template <typename V>
static inline void transpose_groups(const float* src, int64_t NG, int nt, float* dstT) {
  if (NG == 1) {
    int t = 0;
    for (; t < nt; ++t) dstT[t] = src[t];
    for (; t < kKvBlock; ++t) dstT[t] = 0.f;
    return;
  }
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if constexpr (V::W == 16) {
    if (NG <= 4) {
      const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      for (int64_t c = 0; c < NG; ++c) {
        const __m512i off = _mm512_add_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32((int)NG)), _mm512_set1_epi32((int)c));
        for (int t0 = 0; t0 < kKvBlock; t0 += 16) {
          // tokens >= nt -> 0
          const int nv = nt - t0 <= 0 ? 0 : (nt - t0 >= 16 ? 16 : nt - t0);
          const __mmask16 live = (__mmask16)((1u << nv) - 1);
          const __m512i o = _mm512_mask_mov_epi32(_mm512_set1_epi32(-1), live, off);
          _mm512_storeu_ps(dstT + c * kKvBlock + t0, gather64(src + t0 * NG, o));
        }
      }
      return;
    }
  }
#endif
  for (int64_t c = 0; c < NG; ++c) {
    int t = 0;
    for (; t < nt; ++t) dstT[c * kKvBlock + t] = src[t * NG + c];
    for (; t < kKvBlock; ++t) dstT[c * kKvBlock + t] = 0.f;
  }
}

// ------------------------------------------------------------------ keys: scores of a block

// a[tt * GB + g] += qs[g] . code(row[tt]) over the whole row, for TOK tokens.
template <typename V, int SCH, int GB, int TOK>
static inline void score_rows(const float* qs, int64_t Dp, const unsigned char* const* rows, const RowLayout& rl,
                              typename V::F* a) {
  typedef Unpack<V, SCH> P;
  typedef typename V::F F;
#if defined(__AVX512BF16__)
  if constexpr (sch_bf16<SCH>()) {
    // qs: head g's Dp bf16 in the first half of its Dp floats (the float layout, so the
    // launcher's head-chunk offsets stay in floats); a: fp32 pair sums.
    const unsigned short* qb = reinterpret_cast<const unsigned short*>(qs);
    constexpr int UB = sch_unit_bytes<SCH, 16>();
    // Per unit: load the TOK code rows, then per vector k: the GB q vectors once (shared by the
    // TOK tokens: 1 + 4 GB / TOK loads per token instead of 1 + 4 GB), unpack k of each token, dot.
    auto unit = [&](int64_t u, bool part) __attribute__((always_inline)) {
      __m512i x[TOK];
#pragma GCC unroll 16
      for (int tt = 0; tt < TOK; ++tt) {
        const unsigned char* p = rows[tt] + u * UB;
        if constexpr (SCH == kB4)
          x[tt] = part ? _mm512_maskz_loadu_epi8(((__mmask64)1 << rl.tail_bytes) - 1, p) : _mm512_loadu_si512(p);
        else
          x[tt] = _mm512_cvtepu8_epi16(part ? _mm256_maskz_loadu_epi8(((__mmask32)1 << rl.tail_bytes) - 1, p)
                                            : _mm256_loadu_si256((const __m256i*)p));
      }
      // bf16 of B + c: B = 16 (int4; exponent of [16, 32), ulp 1/8: mantissa 8c) or 8 (int2;
      // [8, 16), ulp 1/16: mantissa 16c). A small base keeps the offset removed afterwards
      // (B * sum qs~) close to the size of the scores: little cancellation in fp32.
      const __m512i m = _mm512_set1_epi16(SCH == kB4 ? 0x0078 : 0x0030);
      const __m512i off = _mm512_set1_epi16(SCH == kB4 ? 0x4180 : 0x4100);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        __m512bh qv[GB];
#pragma GCC unroll 8
        for (int g = 0; g < GB; ++g) qv[g] = (__m512bh)_mm512_loadu_si512(qb + 2 * g * Dp + u * 128 + k * 32);
#pragma GCC unroll 16
        for (int tt = 0; tt < TOK; ++tt) {
          __m512i sh;
          if constexpr (SCH == kB4) sh = k == 0 ? _mm512_slli_epi16(x[tt], 3) : _mm512_srli_epi16(x[tt], 4 * k - 3);
          else sh = k == 0 ? _mm512_slli_epi16(x[tt], 4) : k == 1 ? _mm512_slli_epi16(x[tt], 2) : k == 2 ? x[tt] : _mm512_srli_epi16(x[tt], 2);
          const __m512bh cv = (__m512bh)_mm512_ternarylogic_epi32(sh, m, off, 0xEA);  // (sh & m) | off
#pragma GCC unroll 8
          for (int g = 0; g < GB; ++g) a[tt * GB + g] = _mm512_dpbf16_ps(a[tt * GB + g], cv, qv[g]);
        }
      }
    };
    for (int64_t u = 0; u < rl.nfull; ++u) unit(u, false);
    if (rl.tail_bytes) unit(rl.nfull, true);
    return;
  }
#endif
  constexpr int VPU = sch_vpu<SCH>(), UB = sch_unit_bytes<SCH, V::W>(), W = V::W;
  constexpr int TS0 = 8 / VPU, TS = TOK < TS0 ? TOK : TS0;  // tokens unpacked at once (<= 8 vectors)
  static_assert(TOK % TS == 0, "token sub-chunks");
  auto unit = [&](int64_t u, bool part) __attribute__((always_inline)) {
#pragma GCC unroll 16
    for (int t0 = 0; t0 < TOK; t0 += TS) {
      F cv[TS][VPU];
#pragma GCC unroll 16
      for (int tt = 0; tt < TS; ++tt)
        P::run(part ? P::load_part(rows[t0 + tt] + u * UB, rl.tail_bytes) : P::load(rows[t0 + tt] + u * UB), cv[tt]);
#pragma GCC unroll 4
      for (int k = 0; k < VPU; ++k) {
#pragma GCC unroll 8
        for (int g = 0; g < GB; ++g) {
          const F qv = V::load(qs + g * Dp + (u * VPU + k) * W);
#pragma GCC unroll 16
          for (int tt = 0; tt < TS; ++tt) a[(t0 + tt) * GB + g] = V::fma(qv, cv[tt][k], a[(t0 + tt) * GB + g]);
        }
      }
    }
  };
  for (int64_t u = 0; u < rl.nfull; ++u) unit(u, false);
  if (rl.tail_bytes) unit(rl.nfull, true);
}

// s[g * kKvBlock + t] = qs[g] . code(t) + qz[g] for the nt tokens of a block (rows row0 + t * RB).
template <typename V, int SCH, int GB>
static inline void scores_block_q(const float* qs, int64_t Dp, const float* qz, const unsigned char* row0, int64_t RB,
                                  int nt, const RowLayout& rl, float* s) {
  typedef typename V::F F;
  constexpr int TOK = (V::kRed > 1 && V::kRed >= GB) ? V::kRed / GB : 1;
  constexpr bool RED = V::kRed > 1 && TOK * GB == V::kRed;
  int t = 0;
  if constexpr (RED) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    // lane g * TOK + tt <- tt * GB + g (reduce_many's order), and qz[g] on lanes g * TOK + tt.
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i gl = _mm512_srli_epi32(lane, __builtin_ctz(TOK)), tl = _mm512_and_si512(lane, _mm512_set1_epi32(TOK - 1));
    const __m512i idx = _mm512_add_epi32(_mm512_slli_epi32(tl, __builtin_ctz(GB)), gl);
    const __m512 qzv = _mm512_maskz_permutexvar_ps((__mmask16)0xFFFF, gl, _mm512_maskz_loadu_ps((__mmask16)((1u << GB) - 1), qz));
#endif
    for (; t + TOK <= nt; t += TOK) {
      const unsigned char* rows[TOK];
      for (int tt = 0; tt < TOK; ++tt) rows[tt] = row0 + (t + tt) * RB;
      F a[TOK * GB];
      for (int i = 0; i < TOK * GB; ++i) a[i] = V::zero();
      score_rows<V, SCH, GB, TOK>(qs, Dp, rows, rl, a);
      float r[V::kRed];
      V::reduce_many(a, r);
#if defined(__AVX512F__) && defined(__AVX512BW__)
      if constexpr (V::W == 16) {
        // r[tt * GB + g] -> lanes g * TOK + tt, plus q . zero, then one masked store per head.
        const __m512 v = _mm512_add_ps(_mm512_permutexvar_ps(idx, _mm512_loadu_ps(r)), qzv);
#pragma GCC unroll 8
        for (int g = 0; g < GB; ++g)
          _mm512_mask_storeu_ps(s + g * kKvBlock + t - g * TOK, (__mmask16)(((1u << TOK) - 1) << (g * TOK)), v);
        continue;
      }
#endif
      for (int tt = 0; tt < TOK; ++tt)
        for (int g = 0; g < GB; ++g) s[g * kKvBlock + t + tt] = r[tt * GB + g] + qz[g];
    }
  }
  for (; t < nt; ++t) {
    const unsigned char* rows[1] = {row0 + t * RB};
    F a[GB];
    for (int g = 0; g < GB; ++g) a[g] = V::zero();
    score_rows<V, SCH, GB, 1>(qs, Dp, rows, rl, a);
    for (int g = 0; g < GB; ++g) s[g * kKvBlock + t] = V::hsum(a[g]) + qz[g];
  }
}

// Online-softmax update of GB heads from the scores of nt tokens: s becomes p (zero-padded to
// kKvBlock), alpha the factor that rescales the old state.
template <typename V, int GB>
static inline void softmax_block(float* s, int nt, float* m, float* l, float* alpha) {
  for (int g = 0; g < GB; ++g) {
    float* sg = s + g * kKvBlock;
    float mb = PK_NEG_INF;
    int t = 0;
    if constexpr (V::W > 1) {
      if (nt >= V::W) {
        typename V::F mv = V::load(sg);
        for (t = V::W; t + V::W <= nt; t += V::W) mv = V::max(mv, V::load(sg + t));
        mb = V::hmax(mv);
      }
    }
    for (; t < nt; ++t) mb = sg[t] > mb ? sg[t] : mb;
    alpha[g] = softmax_rescale(m[g], mb, &m[g]);
    l[g] = l[g] * alpha[g] + exp_shift_sum<V>(sg, nt, m[g]);
    for (t = nt; t < kKvBlock; ++t) sg[t] = 0.f;
  }
}

// ------------------------------------------------------------------ values

// acc[g][v0 .. v0 + CH) = alpha[g] * acc + sum_t ps(g, group, t) * code_t  (CH vectors from unit u0).
// ps: [group][kKvMaxHeads][kKvBlock] already offset to the chunk's first group; CPG vectors per
// group (broadcast once per group and head).
template <typename V, int SCH, int GB, int CH, int CPG>
static inline void pv_chunk_q(float* acc, int64_t Dp, int64_t u0, const float* alpha, const float* ps,
                              const unsigned char* row0, int64_t RB, int nt, int part_bytes) {
  typedef Unpack<V, SCH> P;
  typedef typename V::F F;
  constexpr int VPU = sch_vpu<SCH>(), UB = sch_unit_bytes<SCH, V::W>(), W = V::W, NU = CH / VPU;
  static_assert(CH % VPU == 0 && CH % CPG == 0, "chunk shape");
  const int64_t v0 = u0 * VPU;
  F a[GB][CH];
#pragma GCC unroll 8
  for (int g = 0; g < GB; ++g) {
    const F al = V::set1(alpha[g]);
#pragma GCC unroll 8
    for (int c = 0; c < CH; ++c) a[g][c] = V::mul(V::load(acc + g * Dp + (v0 + c) * W), al);
  }
  const unsigned char* r = row0 + u0 * UB;
  const float* pst = ps;
  for (int t = 0; t < nt; ++t, r += RB, ++pst) {
    F cv[CH];
#pragma GCC unroll 8
    for (int u = 0; u < NU; ++u)
      P::run((part_bytes && u == NU - 1) ? P::load_part(r + u * UB, part_bytes) : P::load(r + u * UB), cv + u * VPU);
#pragma GCC unroll 8
    for (int g = 0; g < GB; ++g) {
#pragma GCC unroll 8
      for (int c0 = 0; c0 < CH; c0 += CPG) {
        const float* pb = pst + ((c0 / CPG) * kKvMaxHeads + g) * kKvBlock;
#if defined(__AVX512F__) && defined(__AVX512BW__) && PK_KV_EMBED_BCAST
        if constexpr (V::W == 16) {
          // FMA with an embedded {1to16} broadcast operand: one instruction per FMA instead of
          // a separate broadcast shared by CPG FMAs (the compiler always hoists the broadcast).
#pragma GCC unroll 8
          for (int c = c0; c < c0 + CPG; ++c)
            __asm__("vfmadd231ps %2%{1to16%}, %1, %0" : "+v"(a[g][c]) : "v"(cv[c]), "m"(*pb));
          continue;
        }
#endif
        const F b = V::set1(*pb);
#pragma GCC unroll 8
        for (int c = c0; c < c0 + CPG; ++c) a[g][c] = V::fma(b, cv[c], a[g][c]);
      }
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < GB; ++g)
#pragma GCC unroll 8
    for (int c = 0; c < CH; ++c) V::store(acc + g * Dp + (v0 + c) * W, a[g][c]);
}

template <int GB, int W>
constexpr int pv_chunk_vectors() {
  return W == 16 ? (GB >= 8 ? 2 : GB >= 4 ? 4 : 8) : W == 8 ? (GB >= 8 ? 1 : GB >= 4 ? 2 : 4) : 4;
}

// CPG dispatch: vectors per channel group inside a chunk (min(CH, vectors per group)).
template <typename V, int SCH, int GB, int CH>
static inline void pv_chunk_any(int cpg, float* acc, int64_t Dp, int64_t u0, const float* alpha, const float* ps,
                                const unsigned char* row0, int64_t RB, int nt, int part_bytes) {
  if constexpr (CH >= 8) { if (cpg >= 8) return pv_chunk_q<V, SCH, GB, CH, 8>(acc, Dp, u0, alpha, ps, row0, RB, nt, part_bytes); }
  if constexpr (CH >= 4) { if (cpg >= 4) return pv_chunk_q<V, SCH, GB, CH, 4>(acc, Dp, u0, alpha, ps, row0, RB, nt, part_bytes); }
  if constexpr (CH >= 2) { if (cpg >= 2) return pv_chunk_q<V, SCH, GB, CH, 2>(acc, Dp, u0, alpha, ps, row0, RB, nt, part_bytes); }
  pv_chunk_q<V, SCH, GB, CH, 1>(acc, Dp, u0, alpha, ps, row0, RB, nt, part_bytes);
}

// acc [GB][Dp] (permuted) = alpha * acc + sum_t p_t (s_t * code_t) over the block's value rows.
// vpg: vectors per channel group (gs / W; for fp8 the whole row).
template <typename V, int SCH, int GB>
static inline void pv_block_q(float* acc, int64_t Dp, const float* alpha, const float* ps, const unsigned char* row0,
                              int64_t RB, int nt, const RowLayout& rl, int64_t vpg) {
  constexpr int VPU = sch_vpu<SCH>(), W = V::W;
  constexpr int CH0 = pv_chunk_vectors<GB, W>(), CH = CH0 > VPU ? CH0 : VPU, NU = CH / VPU;
  const int cpg_full = (int)(vpg < CH ? vpg : CH), cpg_unit = (int)(vpg < VPU ? vpg : VPU);
  int64_t u = 0;
  // Whole chunks of whole units.
  for (; u + NU <= rl.nfull; u += NU) {
    const float* pc = ps + ((u * VPU) / vpg) * kKvMaxHeads * kKvBlock;
    pv_chunk_any<V, SCH, GB, CH>(cpg_full, acc, Dp, u, alpha, pc, row0, RB, nt, 0);
  }
  // Remaining units one at a time, the last one possibly partial.
  for (; u < rl.nunits; ++u) {
    const float* pc = ps + ((u * VPU) / vpg) * kKvMaxHeads * kKvBlock;
    const int part = (u == rl.nfull) ? rl.tail_bytes : 0;
    pv_chunk_any<V, SCH, GB, VPU>(cpg_unit, acc, Dp, u, alpha, pc, row0, RB, nt, part);
  }
}

// ------------------------------------------------------------------ full-precision rows

template <typename V, typename T>
static inline float dot_row(const float* q, const T* k, int64_t D) {
  const int64_t nv = D / V::W, tail = D % V::W;
  typename V::F a = V::zero(), b = V::zero();
  int64_t i = 0;
  for (; i + 2 <= nv; i += 2) {
    a = V::fma(V::load(q + i * V::W), V::load(k + i * V::W), a);
    b = V::fma(V::load(q + (i + 1) * V::W), V::load(k + (i + 1) * V::W), b);
  }
  for (; i < nv; ++i) a = V::fma(V::load(q + i * V::W), V::load(k + i * V::W), a);
  if (tail) a = V::fma(V::load_n(q + nv * V::W, (int)tail), V::load_n(k + nv * V::W, (int)tail), a);
  return V::hsum(V::add(a, b));
}

// State A (natural order): fp rows [r0, r1) of sequence b, kv-head h, for the G heads.
template <typename V, typename T>
static void fp_rows(const KvParams& prm, const Piece& pc, int64_t r0, int64_t r1, float* mA, float* lA, float* accA,
                    float* s) {
  const int64_t D = prm.D, G = prm.G, nv = D / V::W, tail = D % V::W;
  const T* kb = static_cast<const T*>(prm.fk) + pc.b * prm.fk_st[0] + pc.h * prm.fk_st[2];
  const T* vb = static_cast<const T*>(prm.fv) + pc.b * prm.fv_st[0] + pc.h * prm.fv_st[2];
  const float* q = prm.q + (pc.b * prm.Hq + pc.h * G) * D;
  for (int64_t rb = r0; rb < r1; rb += kKvBlock) {
    const int nt = (int)(r1 - rb < kKvBlock ? r1 - rb : kKvBlock);
    for (int64_t g = 0; g < G; ++g) {
      for (int t = 0; t < nt; ++t) s[t] = dot_row<V, T>(q + g * D, kb + (rb + t) * prm.fk_st[1], D);
      float alpha;
      softmax_block<V, 1>(s, nt, mA + g, lA + g, &alpha);
      float* acc = accA + g * D;
      const typename V::F al = V::set1(alpha);
      for (int64_t i = 0; i < nv; ++i) {
        typename V::F x = V::mul(V::load(acc + i * V::W), al);
        for (int t = 0; t < nt; ++t) x = V::fma(V::set1(s[t]), V::load(vb + (rb + t) * prm.fv_st[1] + i * V::W), x);
        V::store(acc + i * V::W, x);
      }
      if (tail) {
        const int64_t off = nv * V::W;
        typename V::F x = V::mul(V::load_n(acc + off, (int)tail), al);
        for (int t = 0; t < nt; ++t) x = V::fma(V::set1(s[t]), V::load_n(vb + (rb + t) * prm.fv_st[1] + off, (int)tail), x);
        V::store_n(acc + off, x, (int)tail);
      }
    }
  }
}

template <typename V>
static void fp_rows_any(const KvParams& prm, const Piece& pc, int64_t r0, int64_t r1, float* mA, float* lA,
                        float* accA, float* s) {
  if (r1 <= r0) return;
  switch (prm.fp_dtype) {
    case DType::kFloat32: fp_rows<V, float>(prm, pc, r0, r1, mA, lA, accA, s); break;
    case DType::kFloat16: fp_rows<V, fp16_t>(prm, pc, r0, r1, mA, lA, accA, s); break;
    default: fp_rows<V, bf16_t>(prm, pc, r0, r1, mA, lA, accA, s); break;
  }
}

// ------------------------------------------------------------------ one piece

static inline float* kv_align(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~(uintptr_t)63);
}

template <typename V, int KS, int VS>
static void kv_attend(const KvParams& prm, const Piece& pc, float* o, float* lse, float* work) {
  constexpr int W = V::W;
  const int64_t D = prm.D, G = prm.G, gs = prm.gs, S = prm.S, RB = prm.RB;
  const bool fp8 = prm.fmt == KvFormat::kFp8;
  const int64_t NG = fp8 ? 1 : prm.NG;
  const RowLayout kl = row_layout<V, KS>(RB), vl = row_layout<V, VS>(RB);
  const int64_t Dk = kl.Dp, Dv = vl.Dp;
  const int64_t vpg = fp8 ? (Dv / W) : (gs / W);  // value vectors per channel group

  // Workspace (see kv_workspace_floats).
  const int64_t DP = D + kKvMaxUnitChannels;
  float* w = kv_align(work);
  int32_t* kperm = reinterpret_cast<int32_t*>(w); w += DP;
  int32_t* vperm = reinterpret_cast<int32_t*>(w); w += DP;
  float* sp = w; w += DP;                      // permuted key scale
  w += DP;                                     // (spare)
  float* sf = w; w += DP + 64;                 // natural key scale (+ read slack)
  float* zf = w; w += DP;                      // natural key zero
  float* qp = w; w += G * DP;                  // [G][Dk] permuted q
  float* qs = w; w += G * DP;                  // [G][Dk] q * key scale
  float* accB = w; w += G * DP;                // [G][Dv] permuted value accumulators
  float* nat = w; w += 2 * D;                  // un-permuting buffer
  float* mA = w; float* lA = mA + G; float* mB = lA + G; float* lB = mB + G; float* qz = lB + G;
  w += 8 * G + G;
  float* s = w; w += kKvMaxHeads * kKvBlock;   // [GB][kKvBlock] scores -> p
  float* ps = w; w += NG * kKvMaxHeads * kKvBlock;
  float* vsf = w; w += NG * kKvBlock + 64;     // converted value scale rows [t][c] (+ read slack)
  float* vzf = w; w += NG * kKvBlock + 64;
  float* vsT = w; w += NG * kKvBlock;          // transposed [c][t]
  float* vzT = w; w += NG * kKvBlock;
  float* zacc = w;                             // [G][NG][W]

  const float* q = prm.q + (pc.b * prm.Hq + pc.h * G) * D;  // [G][D] natural
  for (int64_t g = 0; g < G; ++g) { mA[g] = mB[g] = PK_NEG_INF; lA[g] = lB[g] = 0.f; }
  for (int64_t i = 0; i < G * D; ++i) o[i] = 0.f;  // state A accumulators (natural order)

  const int64_t ns = prm.n_sink[pc.b], nq = prm.n_quant[pc.b];
  // Sink and residual rows.
  {
    const int64_t a0 = pc.t0, a1 = pc.t1 < ns ? pc.t1 : ns;
    fp_rows_any<V>(prm, pc, a0, a1, mA, lA, o, s);
    const int64_t r0 = pc.t0 > ns + nq ? pc.t0 : ns + nq, r1 = pc.t1;
    fp_rows_any<V>(prm, pc, r0 - nq, r1 - nq, mA, lA, o, s);
  }
  // Quantized store: tokens u in [u0, u1).
  const int64_t u0 = (pc.t0 > ns ? pc.t0 : ns) - ns, u1 = (pc.t1 < ns + nq ? pc.t1 : ns + nq) - ns;
  if (u1 > u0) {
    fill_perm<V, KS>(kl, D, kperm);
    fill_perm<V, VS>(vl, D, vperm);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t p = 0; p < Dk; ++p) qp[g * Dk + p] = kperm[p] >= 0 ? q[g * D + kperm[p]] : 0.f;
    for (int64_t i = 0; i < G * Dv; ++i) accB[i] = 0.f;
    for (int64_t i = 0; i < G * NG * W; ++i) zacc[i] = 0.f;
    for (int64_t i = D; i < DP + 64; ++i) sf[i] = 0.f;
    for (int64_t i = D; i < DP; ++i) zf[i] = 0.f;

    int64_t cur_page = -1, cur_grp = -1;
    float vscale = 0.f;  // fp8: 256 * value scale of the current group
    for (int64_t u = u0; u < u1;) {
      const int64_t pi = u / S, slot = u % S, j = slot / gs;
      const int64_t gend = (j + 1) * gs;
      int64_t n = u1 - u;
      if (n > gend - slot) n = gend - slot;
      if (n > kKvBlock) n = kKvBlock;
      const int nt = (int)n;
      const int64_t page = prm.block_table[pc.b * prm.bt_stride + pi];
      const unsigned char* krow0 = prm.kc + page * prm.kc_st[0] + pc.h * prm.kc_st[1] + slot * RB;
      const unsigned char* vrow0 = prm.vc + page * prm.vc_st[0] + pc.h * prm.vc_st[1] + slot * RB;
#if PK_KV_PF_DIST > 0
      {
        // Software prefetch of the block PK_KV_PF_DIST blocks ahead (same page): code rows,
        // key scale / zero of its group, value scale / zero rows. The scale streams are small
        // and strided, so the hardware prefetchers do not run ahead of them.
        const int64_t ps_slot = slot + PK_KV_PF_DIST * kKvBlock;
        if (ps_slot < S && u + PK_KV_PF_DIST * kKvBlock < u1) {
          const int64_t bytes = kKvBlock * RB;
          const char* kp = reinterpret_cast<const char*>(krow0) + PK_KV_PF_DIST * bytes;
          const char* vp = reinterpret_cast<const char*>(vrow0) + PK_KV_PF_DIST * bytes;
          for (int64_t off = 0; off < bytes; off += 64) { prefetch<3>(kp + off); prefetch<3>(vp + off); }
          if (!fp8) {
            const int64_t jp = ps_slot / gs;
            const char* a = reinterpret_cast<const char*>(static_cast<const pk_u16*>(prm.ks) + page * prm.ks_st[0] + pc.h * prm.ks_st[1] + jp * D);
            const char* b = reinterpret_cast<const char*>(static_cast<const pk_u16*>(prm.kz) + page * prm.kz_st[0] + pc.h * prm.kz_st[1] + jp * D);
            for (int64_t off = 0; off < 2 * D; off += 64) { prefetch<3>(a + off); prefetch<3>(b + off); }
            const char* c = reinterpret_cast<const char*>(static_cast<const pk_u16*>(prm.vs) + page * prm.vs_st[0] + pc.h * prm.vs_st[1] + ps_slot * NG);
            const char* d = reinterpret_cast<const char*>(static_cast<const pk_u16*>(prm.vz) + page * prm.vz_st[0] + pc.h * prm.vz_st[1] + ps_slot * NG);
            for (int64_t off = 0; off < 2 * kKvBlock * NG; off += 64) { prefetch<3>(c + off); prefetch<3>(d + off); }
          }
        }
      }
#endif
      if (page != cur_page || j != cur_grp) {  // new key group: q * scale, q . zero
        cur_page = page; cur_grp = j;
        if (fp8) {
          const float ksc = 256.f * static_cast<const float*>(prm.ks)[page * prm.ks_st[0] + pc.h * prm.ks_st[1] + j];
          vscale = 256.f * static_cast<const float*>(prm.vs)[page * prm.vs_st[0] + pc.h * prm.vs_st[1] + j];
          for (int64_t i = 0; i < G * Dk; ++i) qs[i] = qp[i] * ksc;
          for (int64_t g = 0; g < G; ++g) qz[g] = 0.f;
        } else {
          cvt_f16<V>(static_cast<const pk_u16*>(prm.ks) + page * prm.ks_st[0] + pc.h * prm.ks_st[1] + j * D, sf, D);
          cvt_f16<V>(static_cast<const pk_u16*>(prm.kz) + page * prm.kz_st[0] + pc.h * prm.kz_st[1] + j * D, zf, D);
#if defined(__AVX512BF16__)
          if constexpr (sch_bf16<KS>()) {
            // qs~ = bf16(q * s) in the kB order (head g at bf16 offset 2 g Dk of the qs buffer); the
            // offset B of the codes is removed with -B * sum qs~ (same rounded values: cancels
            // exactly up to fp32 accumulation), folded into qz. 16 positions lie in one 64-channel window.
            for (int64_t p = 0; p < Dk; p += 16) {
              const int64_t base = (p / 128) * 128 + ((p % 32) / 16) * 64;
              const __m512i pr = _mm512_loadu_si512(kperm + p);
              const __m512i off = _mm512_mask_mov_epi32(_mm512_sub_epi32(pr, _mm512_set1_epi32((int)base)),
                                                        _mm512_cmplt_epi32_mask(pr, _mm512_setzero_si512()), _mm512_set1_epi32(-1));
              _mm512_storeu_ps(sp + p, gather64(sf + base, off));
            }
            unsigned short* qb = reinterpret_cast<unsigned short*>(qs);
            const __m512bh mB = (__m512bh)_mm512_set1_epi16((short)(KS == kB4 ? 0xC180 : 0xC100));  // -16 / -8
            for (int64_t g = 0; g < G; ++g) {
              __m512 acc = _mm512_setzero_ps();
              for (int64_t p = 0; p < Dk; p += 32) {
                const __m512 x0 = _mm512_mul_ps(_mm512_loadu_ps(qp + g * Dk + p), _mm512_loadu_ps(sp + p));
                const __m512 x1 = _mm512_mul_ps(_mm512_loadu_ps(qp + g * Dk + p + 16), _mm512_loadu_ps(sp + p + 16));
                const __m512bh b = _mm512_cvtne2ps_pbh(x1, x0);  // lanes 0-15 from x0
                _mm512_storeu_si512(qb + 2 * g * Dk + p, (__m512i)b);
                acc = _mm512_dpbf16_ps(acc, b, mB);
              }
              qz[g] = dot_row<V, float>(q + g * D, zf, D) + _mm512_reduce_add_ps(acc);
            }
          } else
#endif
          {
          permute_row<V, sch_vpu<KS>() * W>(sf, kperm, Dk, sp);
          for (int64_t g = 0; g < G; ++g) {
            int64_t p = 0;
            for (; p + W <= Dk; p += W) V::store(qs + g * Dk + p, V::mul(V::load(qp + g * Dk + p), V::load(sp + p)));
            for (; p < Dk; ++p) qs[g * Dk + p] = qp[g * Dk + p] * sp[p];
            qz[g] = dot_row<V, float>(q + g * D, zf, D);
          }
          }
        }
      }
      // Value scales (and zeros) of the block's tokens, transposed to [group][token].
      if (!fp8) {
        const pk_u16* vsr = static_cast<const pk_u16*>(prm.vs) + page * prm.vs_st[0] + pc.h * prm.vs_st[1] + slot * NG;
        const pk_u16* vzr = static_cast<const pk_u16*>(prm.vz) + page * prm.vz_st[0] + pc.h * prm.vz_st[1] + slot * NG;
        cvt_f16<V>(vsr, vsf, nt * NG);
        cvt_f16<V>(vzr, vzf, nt * NG);
        transpose_groups<V>(vsf, NG, nt, vsT);
        transpose_groups<V>(vzf, NG, nt, vzT);
      }
      for (int64_t g0 = 0; g0 < G;) {
        const int64_t left = G - g0;
        const int GB = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        float alpha[kKvMaxHeads];
        const float* qsg = qs + g0 * Dk;
        switch (GB) {
          case 8: scores_block_q<V, KS, 8>(qsg, Dk, qz + g0, krow0, RB, nt, kl, s); softmax_block<V, 8>(s, nt, mB + g0, lB + g0, alpha); break;
          case 4: scores_block_q<V, KS, 4>(qsg, Dk, qz + g0, krow0, RB, nt, kl, s); softmax_block<V, 4>(s, nt, mB + g0, lB + g0, alpha); break;
          case 2: scores_block_q<V, KS, 2>(qsg, Dk, qz + g0, krow0, RB, nt, kl, s); softmax_block<V, 2>(s, nt, mB + g0, lB + g0, alpha); break;
          default: scores_block_q<V, KS, 1>(qsg, Dk, qz + g0, krow0, RB, nt, kl, s); softmax_block<V, 1>(s, nt, mB + g0, lB + g0, alpha); break;
        }
        // ps[c][g][t] = p[g][t] * value scale; zero term per group.
        for (int gi = 0; gi < GB; ++gi) {
          const float* pg = s + gi * kKvBlock;
          if (fp8) {
            const typename V::F vsc = V::set1(vscale);
            for (int t = 0; t < kKvBlock; t += W) V::store(ps + gi * kKvBlock + t, V::mul(V::load(pg + t), vsc));
          } else {
            float* za = zacc + (g0 + gi) * NG * W;
            const typename V::F al = V::set1(alpha[gi]);
            for (int64_t c = 0; c < NG; ++c) {
              typename V::F z = V::mul(V::load(za + c * W), al);
              for (int t = 0; t < kKvBlock; t += W) {
                const typename V::F pv = V::load(pg + t);
                V::store(ps + (c * kKvMaxHeads + gi) * kKvBlock + t, V::mul(pv, V::load(vsT + c * kKvBlock + t)));
                z = V::fma(pv, V::load(vzT + c * kKvBlock + t), z);
              }
              V::store(za + c * W, z);
            }
          }
        }
        float* ag = accB + g0 * Dv;
        switch (GB) {
          case 8: pv_block_q<V, VS, 8>(ag, Dv, alpha, ps, vrow0, RB, nt, vl, vpg); break;
          case 4: pv_block_q<V, VS, 4>(ag, Dv, alpha, ps, vrow0, RB, nt, vl, vpg); break;
          case 2: pv_block_q<V, VS, 2>(ag, Dv, alpha, ps, vrow0, RB, nt, vl, vpg); break;
          default: pv_block_q<V, VS, 1>(ag, Dv, alpha, ps, vrow0, RB, nt, vl, vpg); break;
        }
        g0 += GB;
      }
      u += n;
    }
  }

  // Merge state B (permuted, plus the zero term) into state A and normalise.
  for (int64_t g = 0; g < G; ++g) {
    float* og = o + g * D;
    const float m = mA[g] > mB[g] ? mA[g] : mB[g];
    const float ea = lA[g] > 0.f ? pk_exp(mA[g] - m) : 0.f;
    const float eb = lB[g] > 0.f ? pk_exp(mB[g] - m) : 0.f;
    const float l = lA[g] * ea + lB[g] * eb;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    if (lB[g] > 0.f) {
      for (int64_t p = 0; p < Dv; ++p)
        if (vperm[p] >= 0) nat[vperm[p]] = accB[g * Dv + p];
      if (!fp8) {
        for (int64_t c = 0; c < NG; ++c) {
          float z = 0.f;
          for (int i = 0; i < W; ++i) z += zacc[(g * NG + c) * W + i];
          const int64_t d1 = (c + 1) * gs < D ? (c + 1) * gs : D;
          for (int64_t d = c * gs; d < d1; ++d) nat[d] += z;
        }
      }
      for (int64_t d = 0; d < D; ++d) og[d] = (og[d] * ea + nat[d] * eb) * inv;
    } else {
      for (int64_t d = 0; d < D; ++d) og[d] = og[d] * ea * inv;
    }
    lse[g] = softmax_lse(m, l);
  }
}

template <typename V>
static void kv_attend_dispatch(const KvParams& prm, const Piece& pc, float* o, float* lse, float* work) {
  switch (prm.fmt) {
    case KvFormat::kInt8: kv_attend<V, kZ8, kZ8>(prm, pc, o, lse, work); break;
#if defined(PK_KV_DPBF16) && defined(__AVX512BF16__)
    case KvFormat::kInt4: kv_attend<V, kB4, kZ4>(prm, pc, o, lse, work); break;
#else
    case KvFormat::kInt4: kv_attend<V, kZ4, kZ4>(prm, pc, o, lse, work); break;
#endif
    case KvFormat::kInt2: {
      // Value units must lie inside one channel group (4W channels <= gs) and keep the
      // accumulators in registers (4 vectors per unit x heads per chunk).
      const bool z2 = V::W == 1 || (4 * V::W <= prm.gs && ((V::W == 16 && prm.G < 8) || (V::W == 8 && prm.G < 4)));
      if constexpr (V::W == 1) {
        kv_attend<V, kZ2, kZ2>(prm, pc, o, lse, work);
      } else {
#if defined(PK_KV_DPBF16) && defined(__AVX512BF16__)
        if (z2) kv_attend<V, kB2, kZ2>(prm, pc, o, lse, work);
        else kv_attend<V, kB2, kZ2h>(prm, pc, o, lse, work);
#else
        if (z2) kv_attend<V, kZ2, kZ2>(prm, pc, o, lse, work);
        else kv_attend<V, kZ2, kZ2h>(prm, pc, o, lse, work);
#endif
      }
      break;
    }
    default: kv_attend<V, kF8, kF8>(prm, pc, o, lse, work); break;
  }
}

}  // namespace PK_ISA_NS
}  // namespace cpu
}  // namespace pykernels
