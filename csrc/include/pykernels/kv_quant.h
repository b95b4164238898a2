// Quantized KV-cache math shared by the CPU and CUDA kernels (NVRTC-clean: no host standard
// headers). The storage format is defined in pykernels/kv_format.py; this file is its C++ twin.
//
// Sequence b: tokens [0, n_sink) are fp rows 0.., tokens [n_sink, n_sink + n_quant) are the
// quantized store (token u = t - n_sink in page block_table[b, u / S], slot u % S), the rest are
// fp rows n_sink + (t - n_sink - n_quant). Per page p and kv-head h:
//   int: codes [P, Hkv, S, D*bits/8]; keys: scale/zero fp16 [P, Hkv, S/gs, D] (per channel,
//        groups of gs tokens); values: scale/zero fp16 [P, Hkv, S, ceil(D/gs)] (per token,
//        groups of gs channels). x = scale * code + zero.
//   fp8: codes e4m3fn [P, Hkv, S, D]; scale fp32 [P, Hkv, S/gs] for keys and values.
//        x = scale * e4m3(code).
#pragma once
#include "common.h"

namespace pykernels {

enum class KvFormat : int { kInt8 = 8, kInt4 = 4, kInt2 = 2, kFp8 = 0 };

PK_HOST_DEVICE PK_INLINE int kv_bits(KvFormat f) { return f == KvFormat::kFp8 ? 8 : (int)f; }

// Bytes of one quantized row (one token, one kv-head).
PK_HOST_DEVICE PK_INLINE pk_i64 kv_row_bytes(KvFormat f, pk_i64 D) { return D * kv_bits(f) / 8; }

// Code of channel d of a packed row: byte d*bits/8, bit offset (d*bits)%8, little-endian.
PK_HOST_DEVICE PK_INLINE int kv_code(const unsigned char* row, pk_i64 d, int bits) {
  const pk_i64 bit = d * bits;
  return (row[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}

// Code i of a packed word: `w` holds a row's bytes from byte d0*bits/8 on (little-endian),
// shifted right by (d0*bits)%8, so code i is channel d0 + i (the vectorised form of kv_code).
PK_HOST_DEVICE PK_INLINE int kv_code_in_word(unsigned long long w, int i, int bits) {
  return (int)((w >> (i * bits)) & ((1ull << bits) - 1ull));
}

// Affine dequantization of an integer code (scale and zero already converted to float).
PK_HOST_DEVICE PK_INLINE float kv_dequant(int code, float scale, float zero) { return scale * (float)code + zero; }

// float8 e4m3fn -> float: the 7 magnitude bits shifted into a binary16 (exponent bias 15 vs 7)
// give value / 256, subnormals included. 0x7f / 0xff (NaN in e4m3fn) decode to +-480; the
// quantizer never writes them.
PK_HOST_DEVICE PK_INLINE pk_u16 kv_fp8_to_fp16_bits(unsigned int b) {
  return (pk_u16)(((b & 0x80u) << 8) | ((b & 0x7fu) << 7));
}
PK_HOST_DEVICE PK_INLINE float kv_fp8_to_float(unsigned int b) { return fp16_to_float(kv_fp8_to_fp16_bits(b)) * 256.0f; }

}  // namespace pykernels
