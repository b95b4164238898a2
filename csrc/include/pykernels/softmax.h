// Online-softmax update and merge (flash-attention / flash-decoding algebra).
// A partial attention result over a key set S is kept either as
//   unnormalised (m, l, acc):  m = max_s score, l = sum exp(score - m), acc = sum exp(score - m) v
// or normalised (o, lse):      o = acc / l,  lse = m + log(l)  (natural log)
// Both CPU and CUDA kernels call these; they are the single definition of the merge rule.
#pragma once
#include "common.h"

#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

namespace pykernels {

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
PK_HOST_DEVICE PK_INLINE float pk_exp(float x) { return expf(x); }
PK_HOST_DEVICE PK_INLINE float pk_log(float x) { return logf(x); }
#else
PK_INLINE float pk_exp(float x) { return expf(x); }
PK_INLINE float pk_log(float x) { return logf(x); }
#endif
// -inf usable in host and device code (NVRTC has no math.h INFINITY).
#if defined(__CUDACC_RTC__)
#define PK_NEG_INF (-__int_as_float(0x7f800000))
#else
#define PK_NEG_INF (-INFINITY)
#endif

PK_HOST_DEVICE PK_INLINE float pk_fmaxf(float a, float b) { return a > b ? a : b; }

// New running max after seeing a block whose max is m_blk, and the factor that rescales the
// old (l, acc). m_old may be -inf (nothing seen yet); then alpha = 0.
PK_HOST_DEVICE PK_INLINE float softmax_rescale(float m_old, float m_blk, float* m_new) {
  float m = pk_fmaxf(m_old, m_blk);
  *m_new = m;
  return (m_old == PK_NEG_INF) ? 0.0f : pk_exp(m_old - m);
}

// lse of a finished partial state. l == 0 means an empty key set: lse = -inf.
PK_HOST_DEVICE PK_INLINE float softmax_lse(float m, float l) {
  return (l > 0.0f) ? m + pk_log(l) : PK_NEG_INF;
}

// Weights for merging two normalised partial results: o = wa*o_a + wb*o_b, lse = out.
// Exact (associative and commutative); an empty side (lse = -inf) gets weight 0.
PK_HOST_DEVICE PK_INLINE float merge_lse(float lse_a, float lse_b, float* wa, float* wb) {
  if (lse_a == PK_NEG_INF && lse_b == PK_NEG_INF) { *wa = 0.0f; *wb = 0.0f; return PK_NEG_INF; }
  float m = pk_fmaxf(lse_a, lse_b);
  float ea = pk_exp(lse_a - m), eb = pk_exp(lse_b - m);
  float s = ea + eb;
  *wa = ea / s;
  *wb = eb / s;
  return m + pk_log(s);
}

}  // namespace pykernels
