// Quantized-KV decode attention, scalar variant (flags from setup.py by file-name suffix).
#define PK_ISA_NS kv_scalar
#include "kv_attention_kernel.h"

namespace pykernels { namespace cpu { namespace kv_scalar {
void kv_attend_piece(const KvParams& prm, const Piece& p, float* o, float* lse, float* work) {
  kv_attend_dispatch<ScalarV>(prm, p, o, lse, work);
}
}}}  // namespace pykernels::cpu::kv_scalar
