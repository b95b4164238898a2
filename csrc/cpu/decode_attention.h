#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
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

void decode_attention(py::object q, py::object k, py::object v, py::object seqlens, py::object block_table,
                      py::object out, py::object lse, double scale, const std::string& method,
                      int64_t num_splits, int64_t num_workers, int64_t tile);

}  // namespace cpu
}  // namespace pykernels
