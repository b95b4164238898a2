// pykernels._cuda: declarations only; the launchers live in csrc/cuda/decode_attention.cu,
// csrc/cuda/lut_gemv.cu and csrc/cuda/kv_attention.cu.
// Importing this module never touches the GPU: it must import on machines without one.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

#include "cuda/launcher.h"

using namespace pykernels::cuda;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pykernels CUDA kernels (nvcc build; the cupy JIT path compiles the same sources)";
  m.def("device_count", &device_count, "Number of visible CUDA devices; 0 when there is no usable driver or GPU.");
  m.def("kernel_config", [](int64_t D, int64_t G) {
    const KernelConfig c = pick_config(D, G);
    return py::make_tuple(c.epl, c.gb);
  }, py::arg("head_dim"), py::arg("group_size"),
     "(elements of D per lane, query heads per pass) of the instantiation used for a call.");
  m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("seqlens"), py::arg("block_table"), py::arg("out"), py::arg("lse"), py::arg("scale"),
        py::arg("method"), py::arg("num_splits"), py::arg("num_workers"), py::arg("tile"),
        py::arg("stream") = 0,
        "Decode attention on CUDA tensors (DLPack), enqueued on `stream` (a cudaStream_t as int).");
  m.def("decode_attention_kv", &decode_attention_kv, py::arg("q"), py::arg("k_codes"), py::arg("k_scale"),
        py::arg("k_zero"), py::arg("v_codes"), py::arg("v_scale"), py::arg("v_zero"), py::arg("fp_k"), py::arg("fp_v"),
        py::arg("block_table"), py::arg("n_sink"), py::arg("n_quant"), py::arg("n_res"), py::arg("out"), py::arg("lse"),
        py::arg("scale"), py::arg("fmt"), py::arg("group_size"), py::arg("method"), py::arg("num_splits"),
        py::arg("num_workers"), py::arg("tile"), py::arg("stream") = 0,
        "Decode attention over a quantized KV cache (pykernels.kv_format) on CUDA tensors (DLPack), "
        "enqueued on `stream` (a cudaStream_t as int). k_zero / v_zero are None for fp8; "
        "block_table None means page b for sequence b.");
  m.def("lut_rows", &pick_lut_rows, py::arg("M"),
        "Rows of x a LUT-GEMV kernel processes together for M rows (the next power of two).");
  m.def("lut_gemv", &lut_gemv, py::arg("x"), py::arg("planes"), py::arg("scales"), py::arg("zeros"),
        py::arg("codebook"), py::arg("out"), py::arg("N"), py::arg("K_pad"), py::arg("bits"), py::arg("gs"),
        py::arg("mode") = "int8", py::arg("stream") = 0,
        "LUT-GEMV on CUDA tensors (DLPack): out[M, N] = x[M, K_pad] @ W^T for bit-plane weights "
        "(pykernels.lut_format), enqueued on `stream` (a cudaStream_t as int).");
}
