// Host entry points of the CUDA launchers (csrc/cuda/decode_attention.cu, csrc/cuda/lut_gemv.cu,
// csrc/cuda/kv_attention.cu), declared once for the launchers and the pybind11 bindings
// (csrc/bindings_cuda.cpp). The launch helpers at the end (CUDA runtime calls) are seen only by
// the .cu launchers (nvcc), not by the bindings.
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

// Decode attention over a quantized KV cache (csrc/cuda/kv_attention.cu); the arguments of
// pykernels.kv_format's kernel entry point (k_zero, v_zero, block_table may be None).
void decode_attention_kv(py::object q, py::object k_codes, py::object k_scale, py::object k_zero,
                         py::object v_codes, py::object v_scale, py::object v_zero, py::object fp_k,
                         py::object fp_v, py::object block_table, py::object n_sink, py::object n_quant,
                         py::object n_res, py::object out, py::object lse, double scale, const std::string& fmt,
                         int64_t group_size, const std::string& method, int64_t num_splits, int64_t num_workers,
                         int64_t tile, int64_t stream);

}  // namespace cuda
}  // namespace pykernels

#if defined(__CUDACC__)
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "tensor_arg.h"

namespace pykernels {
namespace cuda {
namespace launch_util {

inline std::string str(int64_t v) { return std::to_string(v); }

// Runs fn(EPL, GB) with std::integral_constant arguments for a kernel instantiation: EPL
// elements of D per lane in {2, 4, 8}, GB query heads per pass in {1, 2, 4, 8} (pick_config's
// values; anything else takes the largest).
template <typename Fn>
void dispatch_epl_gb(int epl, int gb, Fn&& fn) {
  auto with_gb = [&](auto e) {
    switch (gb) {
      case 1: fn(e, std::integral_constant<int, 1>{}); break;
      case 2: fn(e, std::integral_constant<int, 2>{}); break;
      case 4: fn(e, std::integral_constant<int, 4>{}); break;
      default: fn(e, std::integral_constant<int, 8>{}); break;
    }
  };
  switch (epl) {
    case 2: with_gb(std::integral_constant<int, 2>{}); break;
    case 4: with_gb(std::integral_constant<int, 4>{}); break;
    default: with_gb(std::integral_constant<int, 8>{}); break;
  }
}

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a sticky-free error so later calls are not blamed for it
    throw std::runtime_error(std::string("pykernels._cuda: ") + what + " failed: " + cudaGetErrorString(err));
  }
}
#define PK_CUDA_CHECK(expr) check((expr), #expr)

// Makes `dev` current for the call and restores the caller's device afterwards.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int dev) {
    PK_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != dev) PK_CUDA_CHECK(cudaSetDevice(dev));
  }
  ~DeviceGuard() {
    int cur = -1;
    if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

// Stream-ordered scratch memory (cudaMallocAsync); cudaMalloc + stream sync on devices
// without memory pools. Freed in the destructor when an error unwinds the launcher.
struct Workspace {
  void* ptr = nullptr;
  cudaStream_t stream = nullptr;
  bool async = false;
  Workspace(size_t bytes, cudaStream_t s, int dev) : stream(s) {
    int pools = 0;
    cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, dev);
    async = pools != 0;
    if (async) PK_CUDA_CHECK(cudaMallocAsync(&ptr, bytes, stream));
    else PK_CUDA_CHECK(cudaMalloc(&ptr, bytes));
  }
  void release() {
    void* p = ptr;
    ptr = nullptr;
    if (!p) return;
    if (async) {
      PK_CUDA_CHECK(cudaFreeAsync(p, stream));
    } else {
      PK_CUDA_CHECK(cudaStreamSynchronize(stream));
      PK_CUDA_CHECK(cudaFree(p));
    }
  }
  ~Workspace() {
    if (!ptr) return;
    if (async) cudaFreeAsync(ptr, stream);
    else { cudaStreamSynchronize(stream); cudaFree(ptr); }
  }
};

// Copy the elements of a strided int32 tensor (ndim <= 2) to the host, preserving the strides
// (index with the tensor's own strides relative to the returned base). One D2H copy of the
// span the tensor covers, ordered on `stream` after whatever produced it.
inline std::vector<int32_t> copy_span_to_host(const TensorArg& t, cudaStream_t stream, int64_t* base) {
  int64_t lo = 0, hi = 0;
  for (int i = 0; i < t.ndim(); ++i) {
    if (t.size(i) == 0) { *base = 0; return {}; }
    const int64_t ext = (t.size(i) - 1) * t.stride(i);
    if (ext < 0) lo += ext; else hi += ext;
  }
  std::vector<int32_t> host((size_t)(hi - lo + 1));
  const int32_t* src = static_cast<const int32_t*>(t.data()) + lo;
  PK_CUDA_CHECK(cudaMemcpyAsync(host.data(), src, host.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
  PK_CUDA_CHECK(cudaStreamSynchronize(stream));
  *base = -lo;
  return host;
}

inline size_t align_up(size_t n) { return (n + 255) & ~size_t(255); }

// Host-side sizes of a decode schedule over the B * Hkv (sequence, kv-head) segments, lens[b]
// tokens each, cut into tiles of `tile` tokens: the device-side plan recomputes the same
// partition. Lean: W = min(num_workers, tiles) workers, 2 W partial slots; split: num_splits
// chunks per segment, a partial slot per chunk of every segment that is actually split.
struct ScheduleSizes {
  int64_t nseg, workers, num_slots, grid;
  bool lean;
};

inline ScheduleSizes schedule_sizes(const int32_t* lens, int64_t B, int64_t Hkv, int64_t tile, bool lean,
                                    int64_t num_splits, int64_t num_workers) {
  ScheduleSizes z;
  z.nseg = B * Hkv;
  z.lean = lean;
  int64_t total = 0, split_slots = 0;
  for (int64_t s = 0; s < z.nseg; ++s) {
    const int64_t n = pk_cdiv(lens[s / Hkv], tile);
    const int64_t se = std::min(num_splits, n);
    total += n;
    if (se > 1) split_slots += se;
  }
  z.workers = std::max<int64_t>(1, std::min(num_workers, total));
  z.num_slots = lean ? 2 * z.workers : split_slots;
  z.grid = lean ? z.workers : z.nseg * num_splits;
  if (z.nseg > 0x7fffffffLL)
    throw py::value_error("q: batch x num_kv_heads = " + str(z.nseg) + " exceeds the CUDA grid limit");
  if (z.grid > 0x7fffffffLL)
    throw py::value_error("num_splits: " + str(num_splits) + " splits x " + str(z.nseg) +
                          " (sequence, kv-head) pairs exceeds the CUDA grid limit");
  return z;
}

}  // namespace launch_util
}  // namespace cuda
}  // namespace pykernels
#endif  // __CUDACC__
