#define PK_ISA_NS scalar
#include "attention_kernel.h"

namespace pykernels { namespace cpu { namespace scalar {
void attend_piece(const AttnParams& prm, const Piece& p, int64_t nh, float* o, float* lse, float* work) {
  attend_dispatch<ScalarV>(prm, p, nh, o, lse, work);
}
}}}  // namespace pykernels::cpu::scalar
