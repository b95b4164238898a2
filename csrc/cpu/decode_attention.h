#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "attention_cpu.h"
#include "tensor_arg.h"

namespace pykernels {
namespace cpu {

struct Reduction {
  int64_t b, h;
  std::vector<int64_t> slots;  // partial slots of this (b, h), in token order
};

// The work of one call: pieces grouped into tasks (a lean worker's range, or one split chunk).
struct Schedule {
  std::vector<int64_t> cum;           // tile prefix sum over segments (b * Hkv + h)
  std::vector<int64_t> worker_begin;  // lean only: W + 1 global tile boundaries
  std::vector<Piece> pieces;
  std::vector<int64_t> task_begin;    // pieces of task i: [task_begin[i], task_begin[i+1])
  std::vector<Reduction> reductions;
  int64_t num_slots = 0, num_workers = 0, tile = 0;
};

Schedule build_schedule(const int32_t* seqlens, int64_t B, int64_t Hkv, const std::string& method,
                        int64_t num_splits, int64_t num_workers, int64_t tile);

// attend(piece, nh, o, lse, work): the kernel for one piece (nh consecutive whole kv-heads when
// nh > 1), writing the normalised o [nh * G, D] and lse [nh * G]; `work` holds work_floats floats.
typedef std::function<void(const Piece&, int64_t, float*, float*, float*)> PieceFn;

// Runs a schedule on the thread pool (the caller has released the GIL): whole segments (up to
// max_heads consecutive kv-heads of a sequence at once) are written to out / lse directly, cut
// segments to partial slots that are then merged (softmax.h). out: [B, Hq, D] contiguous, odt.
void run_schedule(const Schedule& sc, int64_t Hq, int64_t G, int64_t D, int64_t max_heads, int64_t work_floats,
                  void* out, DType odt, float* lse, const PieceFn& attend);

// q [B, Hq, D] (any strides, fp32/fp16/bf16) -> contiguous fp32 multiplied by the softmax scale,
// as the kernels take it (one pass over B*Hq*D values).
std::vector<float> scaled_q_fp32(const TensorArg& q, DType qdt, double scale, int64_t B, int64_t Hq, int64_t D);

void decode_attention(py::object q, py::object k, py::object v, py::object seqlens, py::object block_table,
                      py::object out, py::object lse, double scale, const std::string& method,
                      int64_t num_splits, int64_t num_workers, int64_t tile);

// Decode attention over a quantized KV cache (kv_attention.cpp; format: pykernels/kv_format.py).
void decode_attention_kv(py::object q, py::object k_codes, py::object k_scale, py::object k_zero,
                         py::object v_codes, py::object v_scale, py::object v_zero, py::object fp_k,
                         py::object fp_v, py::object block_table, py::object n_sink, py::object n_quant,
                         py::object n_res, py::object out, py::object lse, double scale, const std::string& fmt,
                         int64_t group_size, const std::string& method, int64_t num_splits, int64_t num_workers,
                         int64_t tile);

}  // namespace cpu
}  // namespace pykernels
