// Interface between the decode-attention launcher (decode_attention.cpp, no ISA flags) and the
// per-ISA kernels (attention_{scalar,avx2,avx512}.cpp).
#pragma once
#include <stdint.h>

#include "pykernels/common.h"

namespace pykernels {
namespace cpu {

struct AttnParams {
  const float* q;        // [B, Hq, D] fp32, contiguous, already multiplied by the softmax scale
  const bf16_t* q_bf16;  // [B, Hq, D] contiguous unscaled copy when q is bf16 (AVX512-BF16 path), else nullptr
  float scale;
  const void* k;         // dense [B, Lmax, Hkv, D] or paged [num_blocks, block_size, Hkv, D]
  const void* v;
  DType kv_dtype;
  int64_t k_stride[3];   // element strides of dims 0..2 (dim 3 is contiguous)
  int64_t v_stride[3];
  const int32_t* block_table;  // [B, max_blocks] or nullptr for a dense cache
  int64_t bt_stride;
  int64_t block_size;          // paged only
  int64_t Hq, Hkv, D, G;       // G = Hq / Hkv query heads per kv-head
};

// One contiguous token range [t0, t1) of one (sequence b, kv-head h).
struct Piece {
  int64_t b, h, t0, t1;
  int64_t slot;  // -1: the piece is the whole segment; else the partial slot it writes
};

// Most kv-heads one kernel call walks together (see attend_group in attention_kernel.h).
constexpr int64_t kMaxGroupHeads = 8;

// Attend the G query heads of each kv-head p.h .. p.h + nh - 1 over the piece's tokens. Writes
// the normalised output o [nh * G, D] and lse [nh * G] (natural log of the sum of exp(score)).
// `work` is scratch of attend_workspace_floats(nh * G) floats.
typedef void (*AttendFn)(const AttnParams& prm, const Piece& p, int64_t nh, float* o, float* lse, float* work);

#ifndef PK_TOK_BLOCK
#define PK_TOK_BLOCK 32
#endif
// Tokens per online-softmax step of the CPU kernel.
constexpr int kTokBlock = PK_TOK_BLOCK;

// Scratch: scores [8, kTokBlock], m and l [rows], a permuted copy of q [rows, D].
inline int64_t attend_workspace_floats(int64_t rows, int64_t D) { return 8 * kTokBlock + 2 * rows + rows * D; }

namespace scalar { void attend_piece(const AttnParams&, const Piece&, int64_t, float*, float*, float*); }
namespace avx2 { void attend_piece(const AttnParams&, const Piece&, int64_t, float*, float*, float*); }
namespace avx512 { void attend_piece(const AttnParams&, const Piece&, int64_t, float*, float*, float*); }
namespace avx512bf16 { void attend_piece(const AttnParams&, const Piece&, int64_t, float*, float*, float*); }

}  // namespace cpu
}  // namespace pykernels
