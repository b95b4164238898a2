// Decode attention over a quantized KV cache (pykernels/kv_format.py): the interface between
// the launcher (kv_attention.cpp, no ISA flags) and the per-ISA kernels
// (kv_attention_{scalar,avx2,avx512}.cpp, written once in kv_attention_kernel.h).
#pragma once
#include <stdint.h>

#include "attention_cpu.h"
#include "pykernels/common.h"
#include "pykernels/kv_quant.h"

namespace pykernels {
namespace cpu {

// Tokens per online-softmax step of the quantized kernel (a step never crosses a key group).
constexpr int kKvBlock = 32;
// Query heads walked together over one block's bytes (larger G: several chunks of heads).
constexpr int kKvMaxHeads = 8;
// Most channels one unpacking unit covers (int2: 4 codes per byte, 16 lanes: 64; the
// AVX512-BF16 key units: 128): padding bound.
constexpr int64_t kKvMaxUnitChannels = 128;

struct KvParams {
  const float* q;                 // [B, Hq, D] fp32, contiguous, already multiplied by the softmax scale
  int64_t Hq, Hkv, D, G;
  KvFormat fmt;
  int bits;
  int64_t gs, S, NG, RB;          // group size, page tokens, value channel groups, bytes per code row
  // Quantized store. Codes: [P, Hkv, S, RB] uint8 with rows of a page contiguous (stride RB).
  const unsigned char* kc;
  const unsigned char* vc;
  int64_t kc_st[2], vc_st[2];     // element strides of dims 0 (page), 1 (head)
  // int: k_scale/k_zero fp16 [P, Hkv, S/gs, D], v_scale/v_zero fp16 [P, Hkv, S, NG];
  // fp8: k_scale/v_scale fp32 [P, Hkv, S/gs], zeros null. Inner dims compact.
  const void* ks; const void* kz; const void* vs; const void* vz;
  int64_t ks_st[2], kz_st[2], vs_st[2], vz_st[2];
  // Full-precision rows [B, F, Hkv, D] (sink then residual), head_dim contiguous.
  const void* fk; const void* fv;
  DType fp_dtype;
  int64_t fk_st[3], fv_st[3];
  const int32_t* block_table;     // [B, max_pages] (host copy, validated)
  int64_t bt_stride;
  const int32_t* n_sink;          // [B] host copies, validated
  const int32_t* n_quant;
};

// Scratch floats the kernel needs for one piece (G query heads).
inline int64_t kv_workspace_floats(int64_t G, int64_t D, int64_t NG) {
  const int64_t DP = D + kKvMaxUnitChannels;
  return 4 * DP                       // kperm, vperm, vgroup (int32 slots), permuted key scale
         + 2 * DP + 64                // natural key scale / zero of the current group
         + 3 * G * DP                 // permuted q, q * key scale, permuted value accumulators
         + 2 * D                      // un-permuting buffer
         + 8 * G + G                  // m, l of both states, q . zero
         + kKvMaxHeads * kKvBlock     // scores / probabilities
         + NG * kKvMaxHeads * kKvBlock  // p * value scale
         + 4 * NG * kKvBlock + 128    // value scale / zero rows, converted and transposed
         + G * NG * 16                // zero-term accumulators
         + 64;                        // alignment slack
}

// Attend the G query heads of kv-head p.h of sequence p.b over tokens [p.t0, p.t1) (all three
// regions). Writes the normalised o [G, D] and lse [G].
typedef void (*KvAttendFn)(const KvParams& prm, const Piece& p, float* o, float* lse, float* work);

namespace kv_scalar { void kv_attend_piece(const KvParams&, const Piece&, float*, float*, float*); }
namespace kv_avx2 { void kv_attend_piece(const KvParams&, const Piece&, float*, float*, float*); }
namespace kv_avx512 { void kv_attend_piece(const KvParams&, const Piece&, float*, float*, float*); }
namespace kv_avx512bf16 { void kv_attend_piece(const KvParams&, const Piece&, float*, float*, float*); }

}  // namespace cpu
}  // namespace pykernels
