// pykernels._C: declarations only; launchers live in csrc/cpu/.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/cpu_features.h"
#include "cpu/decode_attention.h"
#include "cpu/gemv.h"
#include "cpu/lut_gemv.h"
#include "cpu/thread_pool.h"

namespace py = pybind11;
using namespace pykernels::cpu;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pykernels C++ CPU kernels (SIMD variants chosen at run time)";
  m.def("detected_isa", [] { return std::string(isa_name(detected_isa())); });
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); });
  m.def("set_isa", [](const std::string& s) {
    try { set_isa(parse_isa(s)); } catch (const std::invalid_argument& e) { throw py::value_error(e.what()); }
  }, py::arg("isa"));
  m.def("set_num_threads", &ThreadPool::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &ThreadPool::num_threads);
  m.def("threading_runtime", [] { return std::string(parallel_runtime()); },
        "'openmp' (the process's GNU OpenMP team, e.g. torch's) or 'pool' (pykernels' own threads)");
  m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("seqlens"), py::arg("block_table"), py::arg("out"), py::arg("lse"), py::arg("scale"),
        py::arg("method"), py::arg("num_splits"), py::arg("num_workers"), py::arg("tile"));
  m.def("decode_attention_kv", &decode_attention_kv, py::arg("q"), py::arg("k_codes"), py::arg("k_scale"),
        py::arg("k_zero"), py::arg("v_codes"), py::arg("v_scale"), py::arg("v_zero"), py::arg("fp_k"),
        py::arg("fp_v"), py::arg("block_table"), py::arg("n_sink"), py::arg("n_quant"), py::arg("n_res"),
        py::arg("out"), py::arg("lse"), py::arg("scale"), py::arg("fmt"), py::arg("group_size"), py::arg("method"),
        py::arg("num_splits"), py::arg("num_workers"), py::arg("tile"),
        "Decode attention over a quantized KV cache (pykernels.kv_format), dequantizing in registers");
  m.def("lut_gemv", &lut_gemv, py::arg("x"), py::arg("planes"), py::arg("scales"), py::arg("zeros"),
        py::arg("codebook"), py::arg("out"), py::arg("N"), py::arg("K_pad"), py::arg("bits"), py::arg("gs"),
        py::arg("mode"),
        "out[M, N] = x[M, K_pad] @ W^T for bit-plane weights (pykernels.lut_format); scales/zeros/codebook may be None");
  m.def("gemv", &gemv, py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"),
        "out[M, N] = x[M <= 8, K] @ w[N, K]^T (+ bias[N]) for bf16 w (row stride >= K), fp32 accumulation");
  // The schedule the kernel runs, for tests to compare with pykernels.plan_decode.
  m.def("decode_schedule", [](std::vector<int32_t> seqlens, int64_t Hkv, const std::string& method,
                              int64_t num_splits, int64_t num_workers, int64_t tile) {
    for (int32_t L : seqlens) if (L < 1) throw py::value_error("seqlens: every entry must be >= 1");
    if (Hkv < 1 || tile < 1 || num_workers < 1 || num_splits < 1) throw py::value_error("num_kv_heads, tile, num_workers and num_splits must be >= 1");
    Schedule sc = build_schedule(seqlens.data(), (int64_t)seqlens.size(), Hkv, method, num_splits, num_workers, tile);
    py::list tasks;
    for (size_t t = 0; t + 1 < sc.task_begin.size(); ++t) {
      py::list pieces;
      for (int64_t i = sc.task_begin[t]; i < sc.task_begin[t + 1]; ++i) {
        const Piece& p = sc.pieces[i];
        pieces.append(py::make_tuple(p.b, p.h, p.t0, p.t1, p.slot));
      }
      tasks.append(pieces);
    }
    py::list reds;
    for (const Reduction& r : sc.reductions) reds.append(py::make_tuple(r.b, r.h, r.slots));
    return py::make_tuple(tasks, reds);
  });
}
