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

template <typename V, typename T, int GB>
static inline void scores_block(const float* q, int64_t D, const T* const* kp, int nt, float* s) {
  // q: [GB, D] (rows of the G heads), s: [GB, kTokBlock]; two tokens at a time for ILP.
  const int64_t nv = D / V::W, tail = D % V::W;
  int t = 0;
  for (; t + 2 <= nt; t += 2) {
    typename V::F a0[GB], a1[GB];
    for (int g = 0; g < GB; ++g) { a0[g] = V::zero(); a1[g] = V::zero(); }
    for (int64_t i = 0; i < nv; ++i) {
      typename V::F k0 = V::load(kp[t] + i * V::W), k1 = V::load(kp[t + 1] + i * V::W);
      for (int g = 0; g < GB; ++g) {
        typename V::F qg = V::load(q + g * D + i * V::W);
        a0[g] = V::fma(qg, k0, a0[g]);
        a1[g] = V::fma(qg, k1, a1[g]);
      }
    }
    if (tail) {
      typename V::F k0 = V::load_n(kp[t] + nv * V::W, (int)tail), k1 = V::load_n(kp[t + 1] + nv * V::W, (int)tail);
      for (int g = 0; g < GB; ++g) {
        typename V::F qg = V::load_n(q + g * D + nv * V::W, (int)tail);
        a0[g] = V::fma(qg, k0, a0[g]);
        a1[g] = V::fma(qg, k1, a1[g]);
      }
    }
    for (int g = 0; g < GB; ++g) { s[g * kTokBlock + t] = V::hsum(a0[g]); s[g * kTokBlock + t + 1] = V::hsum(a1[g]); }
  }
  for (; t < nt; ++t) {
    typename V::F a0[GB];
    for (int g = 0; g < GB; ++g) a0[g] = V::zero();
    for (int64_t i = 0; i < nv; ++i) {
      typename V::F k0 = V::load(kp[t] + i * V::W);
      for (int g = 0; g < GB; ++g) a0[g] = V::fma(V::load(q + g * D + i * V::W), k0, a0[g]);
    }
    if (tail) {
      typename V::F k0 = V::load_n(kp[t] + nv * V::W, (int)tail);
      for (int g = 0; g < GB; ++g) a0[g] = V::fma(V::load_n(q + g * D + nv * V::W, (int)tail), k0, a0[g]);
    }
    for (int g = 0; g < GB; ++g) s[g * kTokBlock + t] = V::hsum(a0[g]);
  }
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

// GB query heads (a chunk of the G heads of one kv-head) over tokens [t0, t1).
template <typename V, typename T, int GB>
static void attend_heads(const AttnParams& prm, const Piece& pc, int64_t g0, float* o, float* lse, float* work) {
  const int64_t D = prm.D;
  const T* kbase = static_cast<const T*>(prm.k);
  const T* vbase = static_cast<const T*>(prm.v);
  const float* q = prm.q + (pc.b * prm.Hq + pc.h * prm.G + g0) * D;  // [GB, D]
  float* acc = o;                                                    // [GB, D], normalised at the end
  float* s = work;                                                   // [GB, kTokBlock]
  const T* kp[kTokBlock];
  const T* vp[kTokBlock];
  float m[GB], l[GB], alpha[GB];
  for (int g = 0; g < GB; ++g) { m[g] = PK_NEG_INF; l[g] = 0.f; }
  for (int64_t i = 0; i < GB * D; ++i) acc[i] = 0.f;

  for (int64_t tb = pc.t0; tb < pc.t1; tb += kTokBlock) {
    const int nt = (int)((pc.t1 - tb) < kTokBlock ? (pc.t1 - tb) : kTokBlock);
    // Row pointers: one code path for dense and paged caches.
    for (int t = 0; t < nt; ++t) row_ptrs(prm, pc, kbase, vbase, tb + t, &kp[t], &vp[t]);
    // Software prefetch of a later block: the rows of one kv-head are 256-512 B out of every
    // Hkv*D*elt bytes, so few fall in one 4 KiB page and the hardware prefetchers lose the stream.
    {
      const int64_t pb = tb + kPrefetchTokens, pe = pb + kTokBlock < pc.t1 ? pb + kTokBlock : pc.t1;
      const int64_t row_bytes = D * (int64_t)sizeof(T);
      for (int64_t tok = pb; tok < pe; ++tok) {
        const T *kr, *vr;
        row_ptrs(prm, pc, kbase, vbase, tok, &kr, &vr);
        for (int64_t off = 0; off < row_bytes; off += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(kr) + off, 0, 0);
          __builtin_prefetch(reinterpret_cast<const char*>(vr) + off, 0, 0);
        }
      }
    }
    scores_block<V, T, GB>(q, D, kp, nt, s);
    for (int g = 0; g < GB; ++g) {
      float* sg = s + g * kTokBlock;
      float mb = PK_NEG_INF;
      for (int t = 0; t < nt; ++t) mb = sg[t] > mb ? sg[t] : mb;
      alpha[g] = softmax_rescale(m[g], mb, &m[g]);
      const typename V::F mv = V::set1(m[g]);
      typename V::F sum = V::zero();
      int t = 0;
      for (; t + V::W <= nt; t += V::W) {
        typename V::F e = V::exp(V::add(V::load(sg + t), V::mul(mv, V::set1(-1.f))));
        V::store(sg + t, e);
        sum = V::add(sum, e);
      }
      float ssum = V::hsum(sum);
      for (; t < nt; ++t) { sg[t] = pk_exp(sg[t] - m[g]); ssum += sg[t]; }
      l[g] = l[g] * alpha[g] + ssum;
    }
    pv_block<V, T, GB>(acc, D, alpha, s, vp, nt);
  }
  for (int g = 0; g < GB; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int64_t d = 0; d < D; ++d) acc[g * D + d] *= inv;
    lse[g] = softmax_lse(m[g], l[g]);
  }
}

template <typename V, typename T>
static void attend_piece_t(const AttnParams& prm, const Piece& pc, float* o, float* lse, float* work) {
  // Chunks of 8/4/2/1 heads; every chunk re-reads the piece's K/V rows, so the common G <= 8
  // reads each byte from memory once (larger G re-reads from cache, not DRAM, per block).
  int64_t g0 = 0;
  while (g0 < prm.G) {
    const int64_t left = prm.G - g0;
    float* og = o + g0 * prm.D;
    if (left >= 8) { attend_heads<V, T, 8>(prm, pc, g0, og, lse + g0, work); g0 += 8; }
    else if (left >= 4) { attend_heads<V, T, 4>(prm, pc, g0, og, lse + g0, work); g0 += 4; }
    else if (left >= 2) { attend_heads<V, T, 2>(prm, pc, g0, og, lse + g0, work); g0 += 2; }
    else { attend_heads<V, T, 1>(prm, pc, g0, og, lse + g0, work); g0 += 1; }
  }
}

template <typename V>
static void attend_piece_dispatch(const AttnParams& prm, const Piece& pc, float* o, float* lse, float* work) {
  switch (prm.kv_dtype) {
    case DType::kFloat32: attend_piece_t<V, float>(prm, pc, o, lse, work); break;
    case DType::kFloat16: attend_piece_t<V, fp16_t>(prm, pc, o, lse, work); break;
    case DType::kBFloat16: attend_piece_t<V, bf16_t>(prm, pc, o, lse, work); break;
  }
}

}  // namespace PK_ISA_NS
}  // namespace cpu
}  // namespace pykernels
