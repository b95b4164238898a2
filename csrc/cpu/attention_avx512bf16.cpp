// AVX-512 plus the AVX512-BF16 dot-product instruction for bf16 q x bf16 K scores.
#define PK_ISA_NS avx512bf16
#define PK_USE_DPBF16 1
#include "attention_kernel.h"

namespace pykernels { namespace cpu { namespace avx512bf16 {
void attend_piece(const AttnParams& prm, const Piece& p, int64_t nh, float* o, float* lse, float* work) {
  attend_dispatch<Avx512V>(prm, p, nh, o, lse, work);
}
}}}  // namespace pykernels::cpu::avx512bf16
