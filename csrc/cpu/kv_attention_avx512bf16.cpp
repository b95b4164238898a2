// Quantized-KV decode attention, AVX-512 plus AVX512-BF16: int4 / int2 key scores with bf16
// dot products (q * key scale rounded to bf16 once per group; see kB4 / kB2 in
// kv_attention_kernel.h). Values, int8 and fp8 as in the avx512 variant.
#define PK_ISA_NS kv_avx512bf16
#define PK_KV_DPBF16 1
#include "kv_attention_kernel.h"

namespace pykernels { namespace cpu { namespace kv_avx512bf16 {
void kv_attend_piece(const KvParams& prm, const Piece& p, float* o, float* lse, float* work) {
  kv_attend_dispatch<Avx512V>(prm, p, o, lse, work);
}
}}}  // namespace pykernels::cpu::kv_avx512bf16
