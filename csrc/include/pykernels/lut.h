// LUT-GEMV math shared by the CPU and CUDA kernels (NVRTC-clean: no host standard headers).
// The storage format is defined in pykernels/lut_format.py; this file is its C++ twin.
//
// planes: uint8 [N_pad/32, K_pad/8, bits, 32]; byte (t, kk, i, r) holds bit i of the codes of
// row 32 t + r at k = 8 kk + j: j = 0..3 in the low nibble (bit j), j = 4..7 in the high nibble.
#pragma once
#include "common.h"

namespace pykernels {

constexpr int kLutTileN = 32;   // rows per plane run
constexpr int kLutKSlice = 8;   // k per byte column (two activation groups of 4)

// Byte offset of plane i of byte column kk of row tile t.
PK_HOST_DEVICE PK_INLINE pk_i64 lut_plane_offset(pk_i64 t, pk_i64 kk, int i, pk_i64 KK, int bits) {
  return ((t * KK + kk) * bits + i) * kLutTileN;
}

// Sign-symmetric table of one activation group x[0..3]:
// T[idx] = sum_j (bit j of idx ? +x_j : -x_j).  T[15 - idx] = -T[idx]: 8 entries are summed,
// 8 negated. Returns S = x0 + x1 + x2 + x3 (= T[15]).
PK_HOST_DEVICE PK_INLINE float lut_build_table(const float* x, float* T) {
  // idx in 0..7 has bit 3 clear: T[idx] = -x3 + (bits 0..2 of idx)
  for (int idx = 0; idx < 8; ++idx) {
    float v = -x[3];
    v += (idx & 1) ? x[0] : -x[0];
    v += (idx & 2) ? x[1] : -x[1];
    v += (idx & 4) ? x[2] : -x[2];
    T[idx] = v;
    T[15 - idx] = -v;
  }
  return T[15];
}

// Code (0 .. 2^bits - 1) of row r at k = 8 kk + j from the column's planes (col points at
// plane 0 of byte column kk of the row's tile: planes + lut_plane_offset(t, kk, 0, ...)).
PK_HOST_DEVICE PK_INLINE int lut_code(const unsigned char* col, int bits, int r, int j) {
  const int shift = j;  // j < 4: low nibble bit j; j >= 4: high nibble bit j - 4 (= bit j of the byte)
  int q = 0;
  for (int i = 0; i < bits; ++i) q |= ((col[i * kLutTileN + r] >> shift) & 1) << i;
  return q;
}

// Dequantised weight for the three schemes (scale/zero already converted to fp32).
PK_HOST_DEVICE PK_INLINE float lut_dequant_affine(int q, float scale, float zero) { return scale * ((float)q - zero); }
PK_HOST_DEVICE PK_INLINE float lut_dequant_symmetric(int q, float scale, int bits) {
  return scale * ((float)q - 0.5f * (float)((1 << bits) - 1));
}

// The zero-point term of one scale group: sum_k q_k x_k = c0 * S_g + 1/2 * sum_i 2^i L_i, where
// L_i = sum over the group's activation groups of T[idx_i] and c0 = (2^bits - 1) / 2. So
//   y += scale * (0.5 * sum_i 2^i L_i + (c0 - zero) * S_g)        (affine)
//   y += scale * (0.5 * sum_i 2^i L_i)                            (symmetric: zero = c0)
PK_HOST_DEVICE PK_INLINE float lut_group_result(float weighted_lookups, float S_g, float scale, float zero, int bits) {
  const float c0 = 0.5f * (float)((1 << bits) - 1);
  return scale * (0.5f * weighted_lookups + (c0 - zero) * S_g);
}

// int8 table quantisation: q = round(T * inv_scale), |q| <= 127 when inv_scale = 127 / max|T|.
PK_HOST_DEVICE PK_INLINE signed char lut_quant_entry(float t, float inv_scale) {
  float v = t * inv_scale;
  v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
  return (signed char)(v >= 0.f ? (int)(v + 0.5f) : -(int)(-v + 0.5f));
}

}  // namespace pykernels
