// Decode-attention inner kernel, written once against the SIMD traits V (simd.h) and included
// by each per-ISA translation unit. Memory-bound: every K and V byte of the piece is read once
// and used by all G query heads of the kv-head (GQA/MQA sharing).
#pragma once
#include "attention_cpu.h"
#include "pykernels/softmax.h"
#include "simd.h"

namespace pykernels {
namespace cpu {
namespace PK_ISA_NS {

constexpr int kTokBlock = 32;  // tokens per online-softmax step; K/V rows of a block stay in L1

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
template <typename V, typename T, int GB>
static inline void scores_block(const float* q, int64_t D, const T* const* kp, int nt, float* s) {
  int t = 0;
  if constexpr (V::kRed > 1 && V::kRed >= GB) {
    constexpr int TOK = V::kRed / GB;
    const int64_t nv = D / V::W, tail = D % V::W;
    for (; t + TOK <= nt; t += TOK) {
      typename V::F a[TOK * GB];
      for (int i = 0; i < TOK * GB; ++i) a[i] = V::zero();
      for (int64_t i = 0; i < nv; ++i) {
        typename V::F qv[GB];
        for (int g = 0; g < GB; ++g) qv[g] = V::load(q + g * D + i * V::W);
        for (int u = 0; u < TOK; ++u) {
          typename V::F kv = V::load(kp[t + u] + i * V::W);
          for (int g = 0; g < GB; ++g) a[u * GB + g] = V::fma(qv[g], kv, a[u * GB + g]);
        }
      }
      if (tail) {
        typename V::F qv[GB];
        for (int g = 0; g < GB; ++g) qv[g] = V::load_n(q + g * D + nv * V::W, (int)tail);
        for (int u = 0; u < TOK; ++u) {
          typename V::F kv = V::load_n(kp[t + u] + nv * V::W, (int)tail);
          for (int g = 0; g < GB; ++g) a[u * GB + g] = V::fma(qv[g], kv, a[u * GB + g]);
        }
      }
      float r[V::kRed];
      V::reduce_many(a, r);
      for (int u = 0; u < TOK; ++u)
        for (int g = 0; g < GB; ++g) s[g * kTokBlock + t + u] = r[u * GB + g];
    }
  }
  for (; t < nt; ++t) score_token<V, T, GB>(q, D, kp[t], s, t);
}

// acc[g] = alpha[g] * acc[g] + sum_t p[g][t] * v_t   for a chunk of CH vectors of D.
template <typename V, typename T, int GB, int CH>
static inline void pv_chunk(float* acc, int64_t D, int64_t off, const float* alpha, const float* p,
                            const T* const* vp, int nt) {
  typename V::F a[GB][CH];
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < CH; ++c) a[g][c] = V::mul(V::load(acc + g * D + off + c * V::W), V::set1(alpha[g]));
  for (int t = 0; t < nt; ++t) {
    typename V::F vv[CH];
    for (int c = 0; c < CH; ++c) vv[c] = V::load(vp[t] + off + c * V::W);
    for (int g = 0; g < GB; ++g) {
      typename V::F pg = V::set1(p[g * kTokBlock + t]);
      for (int c = 0; c < CH; ++c) a[g][c] = V::fma(pg, vv[c], a[g][c]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < CH; ++c) V::store(acc + g * D + off + c * V::W, a[g][c]);
}

template <typename V, typename T, int GB>
static inline void pv_block(float* acc, int64_t D, const float* alpha, const float* p, const T* const* vp, int nt) {
  // Accumulators in registers: GB * CH vectors (16 of the 32 zmm / 16 ymm registers).
  constexpr int CH = (V::W == 1) ? 4 : (GB >= 8 ? 1 : (GB >= 4 ? (V::W == 16 ? 4 : 2) : (V::W == 16 ? 8 : 4)));
  const int64_t nv = D / V::W, tail = D % V::W;
  int64_t i = 0;
  for (; i + CH <= nv; i += CH) pv_chunk<V, T, GB, CH>(acc, D, i * V::W, alpha, p, vp, nt);
  for (; i < nv; ++i) pv_chunk<V, T, GB, 1>(acc, D, i * V::W, alpha, p, vp, nt);
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

constexpr int64_t kPrefetchTokens = 2 * kTokBlock;

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
template <typename V, typename T, int GB>
static inline void block_step(const float* q, int64_t D, const T* const* kp, const T* const* vp, int nt,
                              float* m, float* l, float* acc, float* s) {
  float alpha[GB];
  scores_block<V, T, GB>(q, D, kp, nt, s);
  for (int g = 0; g < GB; ++g) {
    float* sg = s + g * kTokBlock;
    float mb = PK_NEG_INF;
    for (int t = 0; t < nt; ++t) mb = sg[t] > mb ? sg[t] : mb;
    alpha[g] = softmax_rescale(m[g], mb, &m[g]);
    const typename V::F neg_m = V::set1(-m[g]);
    typename V::F sum = V::zero();
    int t = 0;
    for (; t + V::W <= nt; t += V::W) {
      typename V::F e = V::exp(V::add(V::load(sg + t), neg_m));
      V::store(sg + t, e);
      sum = V::add(sum, e);
    }
    float ssum = V::hsum(sum);
    for (; t < nt; ++t) { sg[t] = pk_exp(sg[t] - m[g]); ssum += sg[t]; }
    l[g] = l[g] * alpha[g] + ssum;
  }
  pv_block<V, T, GB>(acc, D, alpha, s, vp, nt);
}

// The G query heads of each of the nh consecutive kv-heads h0.. h0+nh-1 of sequence b over
// tokens [t0, t1). Several kv-heads are walked together, token block by token block, so each
// token's rows of those heads (contiguous in a [.., L, Hkv, D] cache) are read in one sweep:
// one pass per 4 KiB page instead of one per head keeps TLB misses and prefetch restarts low.
template <typename V, typename T>
static void attend_group(const AttnParams& prm, const Piece& pc, int64_t nh, float* o, float* lse, float* work) {
  const int64_t D = prm.D, G = prm.G, R = nh * G;  // R output rows, [R, D] in o
  const T* kbase = static_cast<const T*>(prm.k);
  const T* vbase = static_cast<const T*>(prm.v);
  const float* q = prm.q + (pc.b * prm.Hq + pc.h * G) * D;  // [R, D]
  float* s = work;                                          // [8, kTokBlock]
  float* m = s + 8 * kTokBlock;                             // [R]
  float* l = m + R;                                         // [R]
  const T* kp0[kTokBlock];
  const T* vp0[kTokBlock];
  const T* kp[kTokBlock];
  const T* vp[kTokBlock];
  for (int64_t r = 0; r < R; ++r) { m[r] = PK_NEG_INF; l[r] = 0.f; }
  for (int64_t i = 0; i < R * D; ++i) o[i] = 0.f;
  const int64_t row_bytes = D * (int64_t)sizeof(T);
  const int64_t span_k = ((nh - 1) * prm.k_stride[2]) * (int64_t)sizeof(T) + row_bytes;
  const int64_t span_v = ((nh - 1) * prm.v_stride[2]) * (int64_t)sizeof(T) + row_bytes;

  for (int64_t tb = pc.t0; tb < pc.t1; tb += kTokBlock) {
    const int nt = (int)((pc.t1 - tb) < kTokBlock ? (pc.t1 - tb) : kTokBlock);
    for (int t = 0; t < nt; ++t) row_ptrs(prm, pc, kbase, vbase, tb + t, &kp0[t], &vp0[t]);
    // Software prefetch of a later block (the hardware prefetchers lose strided streams).
    {
      const int64_t pb = tb + kPrefetchTokens, pe = pb + kTokBlock < pc.t1 ? pb + kTokBlock : pc.t1;
      for (int64_t tok = pb; tok < pe; ++tok) {
        const T *kr, *vr;
        row_ptrs(prm, pc, kbase, vbase, tok, &kr, &vr);
        for (int64_t off = 0; off < span_k; off += 64) __builtin_prefetch(reinterpret_cast<const char*>(kr) + off, 0, 0);
        for (int64_t off = 0; off < span_v; off += 64) __builtin_prefetch(reinterpret_cast<const char*>(vr) + off, 0, 0);
      }
    }
    for (int64_t j = 0; j < nh; ++j) {
      for (int t = 0; t < nt; ++t) { kp[t] = kp0[t] + j * prm.k_stride[2]; vp[t] = vp0[t] + j * prm.v_stride[2]; }
      // Chunks of 8/4/2/1 query heads; the block's K/V rows stay in L1 between chunks.
      for (int64_t g0 = 0; g0 < G;) {
        const int64_t r = j * G + g0, left = G - g0;
        const float* qr = q + r * D;
        float* ar = o + r * D;
        if (left >= 8) { block_step<V, T, 8>(qr, D, kp, vp, nt, m + r, l + r, ar, s); g0 += 8; }
        else if (left >= 4) { block_step<V, T, 4>(qr, D, kp, vp, nt, m + r, l + r, ar, s); g0 += 4; }
        else if (left >= 2) { block_step<V, T, 2>(qr, D, kp, vp, nt, m + r, l + r, ar, s); g0 += 2; }
        else { block_step<V, T, 1>(qr, D, kp, vp, nt, m + r, l + r, ar, s); g0 += 1; }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    for (int64_t d = 0; d < D; ++d) o[r * D + d] *= inv;
    lse[r] = softmax_lse(m[r], l[r]);
  }
}

template <typename V>
static void attend_dispatch(const AttnParams& prm, const Piece& pc, int64_t nh, float* o, float* lse, float* work) {
  switch (prm.kv_dtype) {
    case DType::kFloat32: attend_group<V, float>(prm, pc, nh, o, lse, work); break;
    case DType::kFloat16: attend_group<V, fp16_t>(prm, pc, nh, o, lse, work); break;
    case DType::kBFloat16: attend_group<V, bf16_t>(prm, pc, nh, o, lse, work); break;
  }
}

}  // namespace PK_ISA_NS
}  // namespace cpu
}  // namespace pykernels
