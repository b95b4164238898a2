#define PK_ISA_NS scalar
#include "attention_kernel.h"

namespace pykernels { namespace cpu { namespace scalar {
void attend_piece(const AttnParams& prm, const Piece& p, float* o, float* lse, float* work) {
  attend_piece_dispatch<ScalarV>(prm, p, o, lse, work);
}
}}}  // namespace pykernels::cpu::scalar
