#define PK_ISA_NS avx512
#include "attention_kernel.h"

namespace pykernels { namespace cpu { namespace avx512 {
void attend_piece(const AttnParams& prm, const Piece& p, float* o, float* lse, float* work) {
  attend_piece_dispatch<Avx512V>(prm, p, o, lse, work);
}
}}}  // namespace pykernels::cpu::avx512
