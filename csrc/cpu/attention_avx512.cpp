#define PK_ISA_NS avx512
#include "attention_kernel.h"

namespace pykernels { namespace cpu { namespace avx512 {
void attend_piece(const AttnParams& prm, const Piece& p, int64_t nh, float* o, float* lse, float* work) {
  attend_dispatch<Avx512V>(prm, p, nh, o, lse, work);
}
}}}  // namespace pykernels::cpu::avx512
