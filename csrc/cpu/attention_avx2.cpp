#define PK_ISA_NS avx2
#include "attention_kernel.h"

namespace pykernels { namespace cpu { namespace avx2 {
void attend_piece(const AttnParams& prm, const Piece& p, float* o, float* lse, float* work) {
  attend_piece_dispatch<Avx2V>(prm, p, o, lse, work);
}
}}}  // namespace pykernels::cpu::avx2
