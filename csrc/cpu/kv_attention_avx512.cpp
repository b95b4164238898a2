// Quantized-KV decode attention, avx512 variant (flags from setup.py by file-name suffix).
#define PK_ISA_NS kv_avx512
#include "kv_attention_kernel.h"

namespace pykernels { namespace cpu { namespace kv_avx512 {
void kv_attend_piece(const KvParams& prm, const Piece& p, float* o, float* lse, float* work) {
  kv_attend_dispatch<Avx512V>(prm, p, o, lse, work);
}
}}}  // namespace pykernels::cpu::kv_avx512
