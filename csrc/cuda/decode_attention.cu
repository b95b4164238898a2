// CUDA launcher for decode attention: validates exactly like the CPU launcher
// (csrc/cpu/decode_attention.cpp; errors name the argument), copies seqlens and block_table to
// the host to range-check them (no bad index ever reaches a kernel), picks the instantiation,
// and enqueues plan -> attention -> reduce on the caller's stream with the GIL released.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_args.h"
#include "tensor_arg.h"

#include "pykernels/softmax.h"

#include "cuda/decode_attention.cuh"
#include "cuda/launcher.h"

namespace pykernels {
namespace cuda {

namespace ck = ::pykernels::cuda_kernels;
using namespace launch_util;  // check, DeviceGuard, Workspace, copy_span_to_host (launcher.h)

namespace {

// Everything a kernel launch needs besides the template parameters.
struct Launch {
  const void* q; int64_t q_s[3]; int64_t q_dtype;
  const void* k; const void* v; int64_t k_s[3], v_s[3];
  const int32_t* seqlens; int64_t sl_stride;
  const int32_t* block_table; int64_t bt_stride, block_size, num_blocks, capacity;
  int64_t* cum; int64_t* split_base;
  void* out; int64_t out_dtype; float* lse;
  float* part_o; float* part_lse; int64_t num_slots;
  int64_t B, Hq, Hkv, D, tile, mode, num_splits, num_workers;
  float scale; int64_t vec;
  unsigned grid;
  cudaStream_t stream;
};

template <typename T, int EPL, int GB>
void launch_attention(const Launch& a) {
  ck::decode_attention_kernel<T, EPL, GB><<<a.grid, ck::kThreads, 0, a.stream>>>(
      a.q, a.q_s[0], a.q_s[1], a.q_s[2], a.q_dtype,
      static_cast<const T*>(a.k), static_cast<const T*>(a.v),
      a.k_s[0], a.k_s[1], a.k_s[2], a.v_s[0], a.v_s[1], a.v_s[2],
      a.seqlens, a.sl_stride, a.block_table, a.bt_stride, a.block_size, a.num_blocks, a.capacity,
      a.cum, a.split_base, a.out, a.out_dtype, a.lse, a.part_o, a.part_lse, a.num_slots,
      a.B, a.Hq, a.Hkv, a.D, a.tile, a.mode, a.num_splits, a.scale, a.vec);
}

}  // namespace

KernelConfig pick_config(int64_t D, int64_t G) {
  KernelConfig c;
  c.epl = D <= 64 ? 2 : (D <= 128 ? 4 : 8);
  const int64_t g = std::min<int64_t>(G, 8);
  c.gb = g <= 1 ? 1 : (g <= 2 ? 2 : (g <= 4 ? 4 : 8));
  return c;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

void decode_attention(py::object q_o, py::object k_o, py::object v_o, py::object seqlens_o,
                      py::object block_table_o, py::object out_o, py::object lse_o, double scale,
                      const std::string& method, int64_t num_splits, int64_t num_workers, int64_t tile,
                      int64_t stream_handle) {
  TensorArg q("q", q_o), k("k_cache", k_o), v("v_cache", v_o), sl("seqlens", seqlens_o);
  TensorArg out("out", out_o), lse("lse", lse_o);
  const bool paged = !block_table_o.is_none();
  std::unique_ptr<TensorArg> bt;
  if (paged) bt.reset(new TensorArg("block_table", block_table_o));

  std::vector<TensorArg*> all = {&q, &k, &v, &sl, &out, &lse};
  if (bt) all.push_back(bt.get());
  for (TensorArg* t : all) {
    if (t->device_type() != kDLCUDA && t->device_type() != kDLCUDAManaged)
      throw py::value_error(t->name + ": the CUDA backend needs CUDA tensors, got DLPack device type " +
                            str(t->device_type()) + (t->device_type() == kDLCPU ? " (CPU)" : ""));
    if (t->device_id() != q.device_id())
      throw py::value_error(t->name + ": on cuda:" + str(t->device_id()) + " but q is on cuda:" + str(q.device_id()));
  }
  const AttnShape shape = check_attention_args(q, k, v, sl, out, lse, bt.get(), method, num_splits, num_workers, tile, scale);
  const int64_t B = shape.B, Hq = shape.Hq, D = shape.D, Hkv = shape.Hkv;
  const DType qdt = shape.q_dtype, kdt = shape.kv_dtype, odt = shape.out_dtype;
  const int64_t capacity = shape.capacity, block_size = shape.block_size, bt_stride = shape.bt_stride;
  if (D > ck::kMaxHeadDim)
    throw py::value_error("q: head_dim " + str(D) + " is not supported by the CUDA backend (at most " +
                          str(ck::kMaxHeadDim) + ")");
  if (B == 0 || Hq == 0) return;

  DeviceGuard guard(q.device_id());
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream_handle));

  // seqlens (and block ids) are read on the host to range-check them: correctness first.
  std::vector<int32_t> lens(B), sl_host, bt_host;
  int64_t sl_base = 0, bt_base = 0;
  {
    py::gil_scoped_release nogil;
    sl_host = copy_span_to_host(sl, stream, &sl_base);
    if (paged) bt_host = copy_span_to_host(*bt, stream, &bt_base);
  }
  check_lengths_and_blocks(shape, sl_host.data() + sl_base, sl.stride(0), paged ? bt_host.data() + bt_base : nullptr,
                           lens.data());

  // Schedule sizes (the kernels recompute the same partition on the device from seqlens).
  const ScheduleSizes ss = schedule_sizes(lens.data(), B, Hkv, tile, method == "lean", num_splits, num_workers);
  const int64_t nseg = ss.nseg, G = Hq / Hkv, W = ss.workers, num_slots = ss.num_slots, grid = ss.grid;
  const bool lean_mode = ss.lean;

  const KernelConfig cfg = pick_config(D, G);
  const int64_t esize = kdt == DType::kFloat32 ? 4 : 2;
  const int64_t align = std::min<int64_t>(16, cfg.epl * esize);
  bool vec = D % cfg.epl == 0 && reinterpret_cast<uintptr_t>(k.data()) % align == 0 &&
             reinterpret_cast<uintptr_t>(v.data()) % align == 0;
  for (int i = 0; i < 3; ++i) vec = vec && k.stride(i) % cfg.epl == 0 && v.stride(i) % cfg.epl == 0;

  py::gil_scoped_release nogil;
  const size_t cum_bytes = align_up((nseg + 1) * sizeof(int64_t));
  const size_t base_bytes = align_up(nseg * sizeof(int64_t));
  const size_t po_bytes = align_up((size_t)num_slots * G * D * sizeof(float));
  const size_t pl_bytes = align_up((size_t)num_slots * G * sizeof(float));
  Workspace ws(cum_bytes + base_bytes + po_bytes + pl_bytes, stream, q.device_id());
  char* wp = static_cast<char*>(ws.ptr);

  Launch a;
  a.q = q.data();
  for (int i = 0; i < 3; ++i) { a.q_s[i] = q.stride(i); a.k_s[i] = k.stride(i); a.v_s[i] = v.stride(i); }
  a.q_dtype = (int64_t)qdt;
  a.k = k.data();
  a.v = v.data();
  a.seqlens = static_cast<const int32_t*>(sl.data());
  a.sl_stride = sl.stride(0);
  a.block_table = paged ? static_cast<const int32_t*>(bt->data()) : nullptr;
  a.bt_stride = bt_stride;
  a.block_size = block_size;
  a.num_blocks = k.size(0);
  a.capacity = capacity;
  a.cum = reinterpret_cast<int64_t*>(wp);
  a.split_base = reinterpret_cast<int64_t*>(wp + cum_bytes);
  a.part_o = reinterpret_cast<float*>(wp + cum_bytes + base_bytes);
  a.part_lse = reinterpret_cast<float*>(wp + cum_bytes + base_bytes + po_bytes);
  a.num_slots = num_slots;
  a.out = out.data();
  a.out_dtype = (int64_t)odt;
  a.lse = static_cast<float*>(lse.data());
  a.B = B; a.Hq = Hq; a.Hkv = Hkv; a.D = D; a.tile = tile;
  a.mode = lean_mode ? ck::kModeLean : ck::kModeSplit;
  a.num_splits = num_splits;
  a.num_workers = W;
  a.scale = (float)scale;
  a.vec = vec ? 1 : 0;
  a.grid = (unsigned)grid;
  a.stream = stream;

  ck::decode_attention_plan_kernel<<<1, ck::kPlanThreads, 0, stream>>>(
      a.seqlens, a.sl_stride, B, Hkv, tile, capacity, num_splits, a.cum, a.split_base);
  PK_CUDA_CHECK(cudaGetLastError());
  switch (kdt) {
    case DType::kFloat32: dispatch_epl_gb(cfg.epl, cfg.gb, [&](auto e, auto g) {
      launch_attention<float, decltype(e)::value, decltype(g)::value>(a);
    }); break;
    case DType::kFloat16: dispatch_epl_gb(cfg.epl, cfg.gb, [&](auto e, auto g) {
      launch_attention<fp16_t, decltype(e)::value, decltype(g)::value>(a);
    }); break;
    case DType::kBFloat16: dispatch_epl_gb(cfg.epl, cfg.gb, [&](auto e, auto g) {
      launch_attention<bf16_t, decltype(e)::value, decltype(g)::value>(a);
    }); break;
  }
  PK_CUDA_CHECK(cudaGetLastError());
  if (num_slots > 0) {
    ck::decode_attention_reduce_kernel<<<(unsigned)nseg, ck::kThreads, 0, stream>>>(
        a.cum, a.split_base, a.part_o, a.part_lse, num_slots, a.out, a.out_dtype, a.lse, B, Hq, Hkv, D,
        a.mode, num_splits, W);
    PK_CUDA_CHECK(cudaGetLastError());
  }
  ws.release();
}

}  // namespace cuda
}  // namespace pykernels
