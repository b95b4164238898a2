// Host entry points of the CUDA launchers (csrc/cuda/decode_attention.cu, csrc/cuda/lut_gemv.cu),
// declared once for the launchers and the pybind11 bindings (csrc/bindings_cuda.cpp).
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace pykernels {
namespace cuda {
namespace py = pybind11;

// Elements of D per lane and query heads per pass for a call.
struct KernelConfig { int epl, gb; };
KernelConfig pick_config(int64_t D, int64_t G);
int device_count();
void decode_attention(py::object q, py::object k, py::object v, py::object seqlens, py::object block_table,
                      py::object out, py::object lse, double scale, const std::string& method,
                      int64_t num_splits, int64_t num_workers, int64_t tile, int64_t stream);

// LUT-GEMV (csrc/cuda/lut_gemv.cu): rows of x processed together for M rows (next power of two).
int pick_lut_rows(int64_t M);
void lut_gemv(py::object x, py::object planes, py::object scales, py::object zeros, py::object codebook,
              py::object out, int64_t N, int64_t K_pad, int64_t bits, int64_t gs, const std::string& mode,
              int64_t stream);

}  // namespace cuda
}  // namespace pykernels
