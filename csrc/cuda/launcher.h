// Host entry points of the CUDA launcher (csrc/cuda/decode_attention.cu), declared once for the
// launcher and the pybind11 bindings (csrc/bindings_cuda.cpp).
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

}  // namespace cuda
}  // namespace pykernels
