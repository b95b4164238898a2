// Interface between the decode-attention launcher (decode_attention.cpp, no ISA flags) and the
// per-ISA kernels (attention_{scalar,avx2,avx512}.cpp).
#pragma once
#include <stdint.h>

#include "pykernels/common.h"

namespace pykernels {
namespace cpu {

struct AttnParams {
  const float* q;        // [B, Hq, D] fp32, contiguous, already multiplied by the softmax scale
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

// Attend the G query heads of kv-head p.h over the piece's tokens. Writes the normalised
// output o [G, D] and lse [G] (natural log of the sum of exp(score)).
// `work` is scratch of at least attend_workspace_floats(G, D) floats.
typedef void (*AttendFn)(const AttnParams& prm, const Piece& p, float* o, float* lse, float* work);

int64_t attend_workspace_floats(int64_t G, int64_t D);

namespace scalar { void attend_piece(const AttnParams&, const Piece&, float*, float*, float*); }
namespace avx2 { void attend_piece(const AttnParams&, const Piece&, float*, float*, float*); }
namespace avx512 { void attend_piece(const AttnParams&, const Piece&, float*, float*, float*); }

}  // namespace cpu
}  // namespace pykernels
