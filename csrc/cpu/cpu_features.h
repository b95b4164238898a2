#pragma once
#include <string>

namespace pykernels {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// Best ISA this CPU (and OS) supports, by CPUID.
Isa detected_isa();
// The ISA kernels run with: PYKERNELS_ISA=scalar|avx2|avx512|avx512_bf16 if set (error if unsupported),
// else the detected one. `set_isa` overrides both (used by tests to cover every path).
Isa active_isa();
void set_isa(Isa isa);  // throws std::invalid_argument when the CPU cannot run it
const char* isa_name(Isa isa);
Isa parse_isa(const std::string& name);  // throws std::invalid_argument

}  // namespace cpu
}  // namespace pykernels
