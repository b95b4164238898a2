#define PK_ISA_NS avx2
#include "attention_kernel.h"

namespace pykernels { namespace cpu { namespace avx2 {
void attend_piece(const AttnParams& prm, const Piece& p, int64_t nh, float* o, float* lse, float* work) {
  attend_dispatch<Avx2V>(prm, p, nh, o, lse, work);
}
}}}  // namespace pykernels::cpu::avx2
