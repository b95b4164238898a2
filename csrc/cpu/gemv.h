// Interface between the dense bf16 GEMV launcher (gemv.cpp, no ISA flags) and the per-ISA
// kernels (gemv_{scalar,avx2,avx512,avx512bf16}.cpp, all built from gemv_kernel.h).
//
// The per-ISA translation units see only the plain struct and function declarations below (no
// pybind11, no std::string: an inline function instantiated there would be compiled with that
// ISA's flags and could be picked by the linker for a caller on another path).
#pragma once
#include <stdint.h>

#include "pykernels/common.h"

#ifndef PK_ISA_NS
#include <pybind11/pybind11.h>
#endif

namespace pykernels {
namespace cpu {

constexpr int kGemvMaxM = 8;         // rows of x per call (the Python side splits larger M)
constexpr int64_t kGemvBlockK = 32;  // k per step of the split-x layout below (one zmm of bf16)

// Everything a kernel needs; the launcher checked every size and stride against the tensors.
//   y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]),  fp32 accumulation
struct GemvParams {
  const pk_u16* w = nullptr;  // bf16 [N, K], row n at w + n * ldw, unit stride in k
  int64_t N = 0, K = 0, ldw = 0;
  int64_t K32 = 0;            // K rounded up to a multiple of kGemvBlockK
  int M = 0;
  // x, in the layout the chosen kernel reads (the launcher fills only that one):
  const float* xf = nullptr;   // scalar: fp32 [M, K] contiguous
  // avx2 / avx512 (fp32 FMA): fp32 [M, K32], zero past K, each block of 32 k stored as its 16
  // even-indexed values then its 16 odd-indexed ones. A 32-bit lane of a bf16 load holds the pair
  // (w[2i], w[2i+1]); `lane << 16` is w[2i] as fp32 and `lane & 0xffff0000` is w[2i+1], so the
  // kernel widens W with one shift and one and, no shuffles, and multiplies by contiguous x.
  const float* xs = nullptr;
  const pk_u16* xb = nullptr;  // avx512bf16 (vdpbf16ps): bf16 [M, K32], zero past K
  const void* bias = nullptr;  // [N] contiguous, fp32 or bf16 (bias_bf16), or nullptr
  bool bias_bf16 = false;
  void* out = nullptr;         // [M, N] contiguous, fp32 or bf16 (out_bf16)
  bool out_bf16 = false;
};

// Per ISA: out rows [n0, n1) for every row of x (bias added, converted to the output dtype).
typedef void (*GemvRowsFn)(const GemvParams& p, int64_t n0, int64_t n1);

#define PK_GEMV_DECLARE(ns)                                      \
  namespace ns {                                                 \
  void gemv_rows(const GemvParams& p, int64_t n0, int64_t n1);   \
  }
PK_GEMV_DECLARE(scalar)
PK_GEMV_DECLARE(avx2)
PK_GEMV_DECLARE(avx512)
PK_GEMV_DECLARE(avx512bf16)
#undef PK_GEMV_DECLARE

#ifndef PK_ISA_NS
namespace py = pybind11;

// pykernels._C.gemv (contract: pykernels/gemv.py): out[M, N] = x[M, K] @ w[N, K]^T (+ bias).
// x bf16 or fp32 [M <= 8, K] contiguous; w bf16 [N, K] with stride (ldw >= K, 1); bias [N]
// fp32/bf16 or None; out [M, N] contiguous in x's dtype. The kernel follows the active ISA
// (PYKERNELS_ISA / set_isa); on avx512_bf16 a bf16 x runs the vdpbf16ps kernel and an fp32 x the
// fp32-FMA AVX-512 kernel (x is never rounded to bf16).
void gemv(py::object x, py::object w, py::object bias, py::object out);
#endif

}  // namespace cpu
}  // namespace pykernels
