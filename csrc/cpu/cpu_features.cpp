#include "cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace pykernels {
namespace cpu {

namespace {
std::atomic<int> g_isa{-1};
}

Isa detected_isa() {
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wider register state (XGETBV).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
  return Isa::kScalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx512_bf16") return Isa::kAvx512Bf16;
  throw std::invalid_argument("PYKERNELS_ISA / isa: expected one of scalar, avx2, avx512, avx512_bf16, got '" + name + "'");
}

void set_isa(Isa isa) {
  if ((int)isa > (int)detected_isa())
    throw std::invalid_argument(std::string("isa '") + isa_name(isa) + "' is not supported by this CPU (best: " +
                                isa_name(detected_isa()) + ")");
  g_isa.store((int)isa);
}

Isa active_isa() {
  int v = g_isa.load();
  if (v >= 0) return (Isa)v;
  Isa isa = detected_isa();
  if (const char* e = std::getenv("PYKERNELS_ISA")) {
    if (*e) isa = parse_isa(e);
    set_isa(isa);  // validates against the CPU
  }
  g_isa.store((int)isa);
  return isa;
}

}  // namespace cpu
}  // namespace pykernels
