// Decode-attention inner kernel, written once against the SIMD traits V (simd.h) and included
// by each per-ISA translation unit. Memory-bound: every K and V byte of the piece is read once
// and used by all G query heads of the kv-head (GQA/MQA sharing).
#pragma once
#include "attention_cpu.h"
#include "pykernels/softmax.h"
#include "simd.h"

#include <type_traits>

namespace pykernels {
namespace cpu {
namespace PK_ISA_NS {


#ifndef PK_PF_BLOCKS
#define PK_PF_BLOCKS 1
#endif
#ifndef PK_PF_HINT
#define PK_PF_HINT 2
#endif
constexpr int64_t kPrefetchTokens = PK_PF_BLOCKS * kTokBlock;

// Rows of a later block (kPrefetchTokens ahead) requested at the pace they are consumed: while
// row t of this block is scored, K row t of the later block is requested, and while row t's
// values are accumulated, its V row. Issuing K and V requests together in the score phase
// (twice the rate at which lines are used, then none for the value phase) overflows the miss
// queues: in a synthetic walk of this pattern (256-byte rows 2 KiB apart, head by head within
// blocks of 32 tokens, light compute; one core of the 2-core Zen dev machine) that reads about
// 18 GB/s, and at the consumption rate about 27 GB/s, as fast as a purely sequential sweep.
struct Prefetch {
  const char* k[PK_TOK_BLOCK] = {};
  const char* v[PK_TOK_BLOCK] = {};
  int n = 0;  // rows to prefetch (0: none)
  int64_t span = 0;              // bytes per row (one head)
  int64_t off_k = 0, off_v = 0;  // byte offset of the head being walked
  inline void row_k(int t) const {
    if (t < n)
      for (int64_t off = 0; off < span; off += 64) prefetch<PK_PF_HINT>(k[t] + off_k + off);
  }
  inline void row_v(int t) const {
    if (t < n)
      for (int64_t off = 0; off < span; off += 64) prefetch<PK_PF_HINT>(v[t] + off_v + off);
  }
  // Into L1, the whole row (already in L2 from row_v a block earlier): the value loop reads each
  // row in chunks, one chunk per pass over the block's tokens, and the later chunks' lines would
  // otherwise come from L2 one demand miss at a time (+8-10% on the 2-thread case at L=16k).
  bool l1 = false;
  inline void row_l1(const void* row) const {
    if (l1)
      for (int64_t off = 0; off < span; off += 64) prefetch<3>(static_cast<const char*>(row) + off);
  }
};
// No requests: passed where a pass must not repeat the block's prefetches (later query-head
// chunks, later value chunks).
static const Prefetch kNoPrefetch{};

// PERM: bf16 rows are loaded two vectors at a time in the permuted order of load_bf16_pair
// (q and the accumulators are kept in that order); else one vector at a time, natural order.
template <typename V, typename T, bool PERM>
struct Rows {
  static constexpr int U = PERM ? 2 : 1;  // vectors per load unit
  static inline void load(const T* p, typename V::F* out) {
    if constexpr (PERM) V::load_bf16_pair(reinterpret_cast<const bf16_t*>(p), out[0], out[1]);
    else out[0] = V::load(p);
  }
};

// Scores of one token against GB query heads, one horizontal sum per head.
template <typename V, typename T, int GB>
static inline void score_token(const float* q, int64_t D, const T* k, float* s, int t) {
  const int64_t nv = D / V::W, tail = D % V::W;
  typename V::F a[GB];
  for (int g = 0; g < GB; ++g) a[g] = V::zero();
  for (int64_t i = 0; i < nv; ++i) {
    typename V::F kv = V::load(k + i * V::W);
    for (int g = 0; g < GB; ++g) a[g] = V::fma(V::load(q + g * D + i * V::W), kv, a[g]);
  }
  if (tail) {
    typename V::F kv = V::load_n(k + nv * V::W, (int)tail);
    for (int g = 0; g < GB; ++g) a[g] = V::fma(V::load_n(q + g * D + nv * V::W, (int)tail), kv, a[g]);
  }
  for (int g = 0; g < GB; ++g) s[g * kTokBlock + t] = V::hsum(a[g]);
}

// s[g][t] = q_g . k_t for the nt tokens of a block. q: [GB, D], s: [GB, kTokBlock].
// TOK = kRed / GB tokens at a time give kRed independent accumulators (FMA latency hidden) and
// one transposing reduction (V::reduce_many) instead of kRed separate horizontal sums.
template <typename V, typename T, int GB, bool PERM>
static inline void scores_block(const float* q, int64_t D, const T* const* kp, int nt, float* s, const Prefetch& pf) {
  int t = 0;
  if constexpr (V::kRed > 1 && V::kRed >= GB) {
    constexpr int TOK = V::kRed / GB, U = Rows<V, T, PERM>::U;
    const int64_t nv = D / V::W, tail = D % V::W;  // PERM: D % (2W) == 0, so no tail
    for (; t + TOK <= nt; t += TOK) {
      for (int tt = 0; tt < TOK; ++tt) pf.row_k(t + tt);
      typename V::F a[TOK * GB];
      for (int i = 0; i < TOK * GB; ++i) a[i] = V::zero();
      for (int64_t i = 0; i < nv; i += U) {
        typename V::F qv[U][GB];
        for (int u = 0; u < U; ++u)
          for (int g = 0; g < GB; ++g) qv[u][g] = V::load(q + g * D + (i + u) * V::W);
        for (int tt = 0; tt < TOK; ++tt) {
          typename V::F kv[U];
          Rows<V, T, PERM>::load(kp[t + tt] + i * V::W, kv);
          for (int u = 0; u < U; ++u)
            for (int g = 0; g < GB; ++g) a[g * TOK + tt] = V::fma(qv[u][g], kv[u], a[g * TOK + tt]);
        }
      }
      if (tail) {
        typename V::F qv[GB];
        for (int g = 0; g < GB; ++g) qv[g] = V::load_n(q + g * D + nv * V::W, (int)tail);
        for (int tt = 0; tt < TOK; ++tt) {
          typename V::F kv = V::load_n(kp[t + tt] + nv * V::W, (int)tail);
          for (int g = 0; g < GB; ++g) a[g * TOK + tt] = V::fma(qv[g], kv, a[g * TOK + tt]);
        }
      }
      float r[V::kRed];  // head-major: r[g * TOK + tt], one contiguous run of TOK per head
      V::reduce_many(a, r);
      for (int g = 0; g < GB; ++g) memcpy(s + g * kTokBlock + t, r + g * TOK, TOK * sizeof(float));
    }
  }
  // Leftover tokens: the natural-order path would disagree with a permuted q, so PERM loads here too.
  for (; t < nt; ++t) {
    pf.row_k(t);
    if constexpr (PERM) {
      typename V::F a[GB];
      for (int g = 0; g < GB; ++g) a[g] = V::zero();
      for (int64_t i = 0; i < D / V::W; i += 2) {
        typename V::F kv[2];
        Rows<V, T, PERM>::load(kp[t] + i * V::W, kv);
        for (int g = 0; g < GB; ++g)
          a[g] = V::fma(V::load(q + g * D + (i + 1) * V::W), kv[1], V::fma(V::load(q + g * D + i * V::W), kv[0], a[g]));
      }
      for (int g = 0; g < GB; ++g) s[g * kTokBlock + t] = V::hsum(a[g]);
    } else {
      score_token<V, T, GB>(q, D, kp[t], s, t);
    }
  }
}

#if defined(PK_USE_DPBF16)
// Scores from bf16 q and bf16 K with AVX512-BF16 dot products: vdpbf16ps multiplies bf16 pairs
// exactly into fp32 and accumulates in fp32, so the result equals the fp32 path on the same
// (bf16) inputs up to summation order, with half the multiply-adds and no widening of K.
// qb: [GB, D] bf16 (unscaled), s: [GB, kTokBlock] = scale * q . k.
template <int GB>
static inline void scores_block_dp(const bf16_t* qb, int64_t D, const bf16_t* const* kp, int nt, float scale, float* s,
                                   const Prefetch& pf) {
  constexpr int TOK = 16 / GB;
  const int64_t nv = D / 32, tail = D % 32;
  const __mmask32 tmask = (__mmask32)((1ull << tail) - 1);
  auto ld = [](const bf16_t* p) { return (__m512bh)_mm512_loadu_si512(p); };
  auto ldn = [tmask](const bf16_t* p) { return (__m512bh)_mm512_maskz_loadu_epi16(tmask, p); };
  int t = 0;
  for (; t + TOK <= nt; t += TOK) {
    for (int tt = 0; tt < TOK; ++tt) pf.row_k(t + tt);
    __m512 a[16];
    for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nv; ++i) {
      __m512bh qv[GB];
      for (int g = 0; g < GB; ++g) qv[g] = ld(qb + g * D + i * 32);
      for (int tt = 0; tt < TOK; ++tt) {
        __m512bh kv = ld(kp[t + tt] + i * 32);
        for (int g = 0; g < GB; ++g) a[g * TOK + tt] = _mm512_dpbf16_ps(a[g * TOK + tt], qv[g], kv);
      }
    }
    if (tail) {
      __m512bh qv[GB];
      for (int g = 0; g < GB; ++g) qv[g] = ldn(qb + g * D + nv * 32);
      for (int tt = 0; tt < TOK; ++tt) {
        __m512bh kv = ldn(kp[t + tt] + nv * 32);
        for (int g = 0; g < GB; ++g) a[g * TOK + tt] = _mm512_dpbf16_ps(a[g * TOK + tt], qv[g], kv);
      }
    }
    alignas(64) float r[16];  // head-major: r[g * TOK + tt]
    Avx512V::reduce_many(a, r);
    _mm512_store_ps(r, _mm512_mul_ps(_mm512_load_ps(r), _mm512_set1_ps(scale)));
    for (int g = 0; g < GB; ++g) memcpy(s + g * kTokBlock + t, r + g * TOK, TOK * sizeof(float));
  }
  for (; t < nt; ++t) {
    pf.row_k(t);
    __m512 a[GB];
    for (int g = 0; g < GB; ++g) a[g] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nv; ++i) {
      __m512bh kv = ld(kp[t] + i * 32);
      for (int g = 0; g < GB; ++g) a[g] = _mm512_dpbf16_ps(a[g], ld(qb + g * D + i * 32), kv);
    }
    if (tail) {
      __m512bh kv = ldn(kp[t] + nv * 32);
      for (int g = 0; g < GB; ++g) a[g] = _mm512_dpbf16_ps(a[g], ldn(qb + g * D + nv * 32), kv);
    }
    for (int g = 0; g < GB; ++g) s[g * kTokBlock + t] = scale * _mm512_reduce_add_ps(a[g]);
  }
}
#endif

// acc[g] = alpha[g] * acc[g] + sum_t p[g][t] * v_t   for a chunk of CH vectors of D.
template <typename V, typename T, int GB, int CH, bool PERM>
static inline void pv_chunk(float* acc, int64_t D, int64_t off, const float* alpha, const float* p,
                            const T* const* vp, int nt, const Prefetch& pf) {
  constexpr int U = Rows<V, T, PERM>::U;
  static_assert(CH % U == 0, "chunk must hold whole load units");
  typename V::F a[GB][CH];
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < CH; ++c) a[g][c] = V::mul(V::load(acc + g * D + off + c * V::W), V::set1(alpha[g]));
  for (int t = 0; t < nt; ++t) {
    pf.row_v(t);
    if (t + 1 < nt) pf.row_l1(vp[t + 1]);
    typename V::F vv[CH];
    for (int c = 0; c < CH; c += U) Rows<V, T, PERM>::load(vp[t] + off + c * V::W, vv + c);
    for (int g = 0; g < GB; ++g) {
      typename V::F pg = V::set1(p[g * kTokBlock + t]);
      for (int c = 0; c < CH; ++c) a[g][c] = V::fma(pg, vv[c], a[g][c]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < CH; ++c) V::store(acc + g * D + off + c * V::W, a[g][c]);
}

template <typename V, typename T, int GB, bool PERM>
static inline void pv_block(float* acc, int64_t D, const float* alpha, const float* p, const T* const* vp, int nt,
                            const Prefetch& pf) {
  // Accumulators in registers: GB * CH vectors (16 of the 32 zmm / 16 ymm registers).
  constexpr int CH0 = (V::W == 1) ? 4 : (GB >= 8 ? 1 : (GB >= 4 ? (V::W == 16 ? 4 : 2) : (V::W == 16 ? 8 : 4)));
  constexpr int CH = (PERM && CH0 < 2) ? 2 : CH0;
  const int64_t nv = D / V::W, tail = D % V::W;
  int64_t i = 0;
  // The first chunk's token loop requests the later block's V rows (one pass per block).
  for (; i + CH <= nv; i += CH) pv_chunk<V, T, GB, CH, PERM>(acc, D, i * V::W, alpha, p, vp, nt, i == 0 ? pf : kNoPrefetch);
  if constexpr (PERM) {
    for (; i < nv; i += 2) pv_chunk<V, T, GB, 2, PERM>(acc, D, i * V::W, alpha, p, vp, nt, i == 0 ? pf : kNoPrefetch);
  } else {
    for (; i < nv; ++i) pv_chunk<V, T, GB, 1, PERM>(acc, D, i * V::W, alpha, p, vp, nt, i == 0 ? pf : kNoPrefetch);
  }
  if (nv == 0)  // D < W: only the scalar tail below; request the rows here
    for (int t = 0; t < nt; ++t) pf.row_v(t);
  if (tail) {
    const int64_t off = nv * V::W;
    for (int g = 0; g < GB; ++g) {
      for (int64_t d = off; d < D; ++d) {
        float x = acc[g * D + d] * alpha[g];
        for (int t = 0; t < nt; ++t) x += p[g * kTokBlock + t] * Cvt<T>::load(vp[t] + d);
        acc[g * D + d] = x;
      }
    }
  }
}


template <typename T>
static inline void row_ptrs(const AttnParams& prm, const Piece& pc, const T* kbase, const T* vbase, int64_t tok,
                            const T** kr, const T** vr) {
  int64_t r0, r1;
  if (prm.block_table) {
    r0 = prm.block_table[pc.b * prm.bt_stride + tok / prm.block_size];
    r1 = tok % prm.block_size;
  } else {
    r0 = pc.b;
    r1 = tok;
  }
  *kr = kbase + r0 * prm.k_stride[0] + r1 * prm.k_stride[1] + pc.h * prm.k_stride[2];
  *vr = vbase + r0 * prm.v_stride[0] + r1 * prm.v_stride[1] + pc.h * prm.v_stride[2];
}

// One online-softmax step of GB query heads over a block of nt <= kTokBlock tokens.
// q: [GB, D] (pre-scaled), acc: [GB, D] unnormalised, m/l: [GB] running max and sum.
// qb, scale: bf16 q rows for the AVX512-BF16 score path (nullptr: use q, pre-scaled fp32).
template <typename V, typename T, int GB, bool PERM>
static inline void block_step(const float* q, const bf16_t* qb, float scale, int64_t D, const T* const* kp,
                              const T* const* vp, int nt, float* m, float* l, float* acc, float* s,
                              const Prefetch& pf) {
  float alpha[GB];
#if defined(PK_USE_DPBF16)
  if constexpr (std::is_same<T, bf16_t>::value) {
    if (qb) scores_block_dp<GB>(qb, D, kp, nt, scale, s, pf);
    else scores_block<V, T, GB, PERM>(q, D, kp, nt, s, pf);
  } else {
    scores_block<V, T, GB, PERM>(q, D, kp, nt, s, pf);
  }
#else
  (void)qb; (void)scale;
  scores_block<V, T, GB, PERM>(q, D, kp, nt, s, pf);
#endif
  for (int g = 0; g < GB; ++g) {
    float* sg = s + g * kTokBlock;
    alpha[g] = softmax_rescale(m[g], block_max<V>(sg, nt), &m[g]);
    l[g] = l[g] * alpha[g] + exp_shift_sum<V>(sg, nt, m[g]);
  }
  pv_block<V, T, GB, PERM>(acc, D, alpha, s, vp, nt, pf);
}

// The G query heads of each of the nh consecutive kv-heads h0.. h0+nh-1 of sequence b over
// tokens [t0, t1). Several kv-heads are walked together, token block by token block, so each
// token's rows of those heads (contiguous in a [.., L, Hkv, D] cache) are read in one sweep:
// one pass per 4 KiB page instead of one per head keeps TLB misses and prefetch restarts low.
// flatten: everything below is inlined into this loop nest whatever GCC's inlining budget for
// the translation unit says. Without it, adding a second kernel variant to this file once pushed
// the unit over the budget and the helpers were called out of line: 2x slower (0.28 -> 0.52 ms
// at L=2048, warm), with no warning.
template <typename V, typename T, bool PERM>
__attribute__((flatten)) static void attend_group(const AttnParams& prm, const Piece& pc, int64_t nh, float* o,
                                                  float* lse, float* work) {
  const int64_t D = prm.D, G = prm.G, R = nh * G;  // R output rows, [R, D] in o
  const T* kbase = static_cast<const T*>(prm.k);
  const T* vbase = static_cast<const T*>(prm.v);
  const float* q = prm.q + (pc.b * prm.Hq + pc.h * G) * D;  // [R, D]
  float* s = work;                                          // [8, kTokBlock]
  float* m = s + 8 * kTokBlock;                             // [R]
  float* l = m + R;                                         // [R]
  constexpr int C = 2 * V::W;                               // PERM chunk
  if constexpr (PERM) {                                     // q rows in the permuted order
    float* qp = l + R;                                      // [R, D]
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c0 = 0; c0 < D; c0 += C)
        for (int p = 0; p < C; ++p) qp[r * D + c0 + p] = q[r * D + c0 + perm_index<V::W>(p)];
    q = qp;
  }
  const T* kp0[kTokBlock];
  const T* vp0[kTokBlock];
  const T* kp[kTokBlock];
  const T* vp[kTokBlock];
  for (int64_t r = 0; r < R; ++r) { m[r] = PK_NEG_INF; l[r] = 0.f; }
  for (int64_t i = 0; i < R * D; ++i) o[i] = 0.f;
  const int64_t row_bytes = D * (int64_t)sizeof(T);

  for (int64_t tb = pc.t0; tb < pc.t1; tb += kTokBlock) {
    const int nt = (int)((pc.t1 - tb) < kTokBlock ? (pc.t1 - tb) : kTokBlock);
    for (int t = 0; t < nt; ++t) row_ptrs(prm, pc, kbase, vbase, tb + t, &kp0[t], &vp0[t]);
    // Rows of the next block: K requested during the score pass, V during the value pass.
    Prefetch pf;
    {
      const int64_t pb = tb + kPrefetchTokens, pe = pb + kTokBlock < pc.t1 ? pb + kTokBlock : pc.t1;
      pf.n = pe > pb ? (int)(pe - pb) : 0;
      pf.span = row_bytes;
      pf.l1 = true;
      for (int t = 0; t < pf.n; ++t) {
        const T *kr, *vr;
        row_ptrs(prm, pc, kbase, vbase, pb + t, &kr, &vr);
        pf.k[t] = reinterpret_cast<const char*>(kr);
        pf.v[t] = reinterpret_cast<const char*>(vr);
      }
    }
    for (int64_t j = 0; j < nh; ++j) {
      for (int t = 0; t < nt; ++t) { kp[t] = kp0[t] + j * prm.k_stride[2]; vp[t] = vp0[t] + j * prm.v_stride[2]; }
      // Head j of the later block is prefetched while head j of this one is scored: the
      // requests are spread evenly over the block instead of arriving in one burst.
      pf.off_k = j * prm.k_stride[2] * (int64_t)sizeof(T);
      pf.off_v = j * prm.v_stride[2] * (int64_t)sizeof(T);
      // Chunks of 8/4/2/1 query heads; the block's K/V rows stay in L1 between chunks.
      for (int64_t g0 = 0; g0 < G;) {
        const int64_t r = j * G + g0, left = G - g0;
        const float* qr = q + r * D;
        const bf16_t* qbr = prm.q_bf16 ? prm.q_bf16 + (pc.b * prm.Hq + pc.h * G + r) * D : nullptr;
        float* ar = o + r * D;
        if (left >= 8) { block_step<V, T, 8, PERM>(qr, qbr, prm.scale, D, kp, vp, nt, m + r, l + r, ar, s, g0 == 0 ? pf : kNoPrefetch); g0 += 8; }
        else if (left >= 4) { block_step<V, T, 4, PERM>(qr, qbr, prm.scale, D, kp, vp, nt, m + r, l + r, ar, s, g0 == 0 ? pf : kNoPrefetch); g0 += 4; }
        else if (left >= 2) { block_step<V, T, 2, PERM>(qr, qbr, prm.scale, D, kp, vp, nt, m + r, l + r, ar, s, g0 == 0 ? pf : kNoPrefetch); g0 += 2; }
        else { block_step<V, T, 1, PERM>(qr, qbr, prm.scale, D, kp, vp, nt, m + r, l + r, ar, s, g0 == 0 ? pf : kNoPrefetch); g0 += 1; }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    float* orow = o + r * D;
    if constexpr (PERM) {  // back to natural order
      float tmp[C];
      for (int64_t c0 = 0; c0 < D; c0 += C) {
        for (int p = 0; p < C; ++p) tmp[perm_index<V::W>(p)] = orow[c0 + p];
        for (int p = 0; p < C; ++p) orow[c0 + p] = tmp[p] * inv;
      }
    } else {
      for (int64_t d = 0; d < D; ++d) orow[d] *= inv;
    }
    lse[r] = softmax_lse(m[r], l[r]);
  }
}

template <typename V>
static void attend_dispatch(const AttnParams& prm, const Piece& pc, int64_t nh, float* o, float* lse, float* work) {
  switch (prm.kv_dtype) {
    case DType::kFloat32: attend_group<V, float, false>(prm, pc, nh, o, lse, work); break;
    case DType::kFloat16: attend_group<V, fp16_t, false>(prm, pc, nh, o, lse, work); break;
    case DType::kBFloat16:
      if (V::kPermBf16 && prm.D % (2 * V::W) == 0) attend_group<V, bf16_t, V::kPermBf16>(prm, pc, nh, o, lse, work);
      else attend_group<V, bf16_t, false>(prm, pc, nh, o, lse, work);
      break;
  }
}

}  // namespace PK_ISA_NS
}  // namespace cpu
}  // namespace pykernels
