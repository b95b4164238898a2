// CUDA launcher for LUT-GEMV (kernels: lut_gemv.cuh): validates every tensor against the
// format of pykernels/lut_format.py (errors name the argument, same rules and messages as the
// cupy JIT path in pykernels/cuda/lut_gemv.py), picks the (bits, scheme, rows) instantiation and
// enqueues one kernel on the caller's stream with the GIL released.
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "tensor_arg.h"

#include "cuda/launcher.h"
#include "cuda/lut_gemv.cuh"

namespace pykernels {
namespace cuda {

namespace ck = ::pykernels::cuda_kernels;

namespace {

std::string lstr(int64_t v) { return std::to_string(v); }

void lut_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so later calls are not blamed for it
    throw std::runtime_error(std::string("pykernels._cuda: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

// Makes `dev` current for the call and restores the caller's device afterwards.
struct LutDeviceGuard {
  int prev = -1;
  explicit LutDeviceGuard(int dev) {
    lut_check(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev != dev) lut_check(cudaSetDevice(dev), "cudaSetDevice");
  }
  ~LutDeviceGuard() {
    int cur = -1;
    if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

bool is_dtype(const TensorArg& t, int code, int bits) {
  return t.t->dtype.code == code && t.t->dtype.bits == bits && t.t->dtype.lanes == 1;
}

void require(const TensorArg& t, int code, int bits, const char* dtype_name, std::initializer_list<int64_t> shape) {
  if (!is_dtype(t, code, bits))
    throw py::type_error(t.name + ": expected " + dtype_name + ", got " + t.dtype_str());
  std::string want = "[";
  bool ok = t.ndim() == (int)shape.size();
  int i = 0;
  for (int64_t s : shape) {
    want += (i ? ", " : "") + lstr(s);
    if (ok && t.size(i) != s) ok = false;
    ++i;
  }
  if (!ok) throw py::value_error(t.name + ": expected shape " + want + "], got " + t.shape_str());
}

struct LutLaunch {
  const void* x; int64_t x_dtype, M;
  const unsigned char* planes;
  const uint16_t* scales; const uint16_t* zeros;
  const float* codebook; int64_t cb_per_row;
  float* out; int64_t N, K_pad, gs;
  unsigned grid;
  cudaStream_t stream;
};

template <int BITS, int KIND, int MT>
void launch_lut(const LutLaunch& a) {
  ck::lut_gemv_kernel<BITS, KIND, MT><<<a.grid, ck::LutShape<BITS, MT>::kThreads, 0, a.stream>>>(
      a.x, a.x_dtype, a.M, a.planes, a.scales, a.zeros, a.codebook, a.cb_per_row, a.out, a.N, a.K_pad, a.gs);
}

template <int BITS, int KIND>
void dispatch_rows(const LutLaunch& a, int mt) {
  switch (mt) {
    case 1: launch_lut<BITS, KIND, 1>(a); break;
    case 2: launch_lut<BITS, KIND, 2>(a); break;
    case 4: launch_lut<BITS, KIND, 4>(a); break;
    case 8: launch_lut<BITS, KIND, 8>(a); break;
    default: launch_lut<BITS, KIND, 16>(a); break;
  }
}

template <int BITS>
void dispatch_kind(const LutLaunch& a, int kind, int mt) {
  if (kind == ck::kLutCodebook) dispatch_rows<BITS, ck::kLutCodebook>(a, mt);
  else dispatch_rows<BITS, ck::kLutLinear>(a, mt);
}

void dispatch_bits(const LutLaunch& a, int bits, int kind, int mt) {
  switch (bits) {
    case 1: dispatch_kind<1>(a, kind, mt); break;
    case 2: dispatch_kind<2>(a, kind, mt); break;
    case 3: dispatch_kind<3>(a, kind, mt); break;
    case 4: dispatch_kind<4>(a, kind, mt); break;
    case 5: dispatch_kind<5>(a, kind, mt); break;
    case 6: dispatch_kind<6>(a, kind, mt); break;
    case 7: dispatch_kind<7>(a, kind, mt); break;
    default: dispatch_kind<8>(a, kind, mt); break;
  }
}

}  // namespace

int pick_lut_rows(int64_t M) {
  int mt = 1;
  while (mt < M) mt *= 2;
  return mt;
}

void lut_gemv(py::object x_o, py::object planes_o, py::object scales_o, py::object zeros_o, py::object codebook_o,
              py::object out_o, int64_t N, int64_t K_pad, int64_t bits, int64_t gs, const std::string& mode,
              int64_t stream_handle) {
  if (bits < 1 || bits > ck::kLutMaxBits)
    throw py::value_error("bits: expected 1.." + lstr(ck::kLutMaxBits) + ", got " + lstr(bits));
  if (mode != "int8" && mode != "exact")
    throw py::value_error("mode: expected 'int8' or 'exact', got '" + mode + "'");
  if (N < 1) throw py::value_error("N: expected >= 1, got " + lstr(N));
  if (K_pad < 8 || K_pad % 8) throw py::value_error("K_pad: expected a positive multiple of 8, got " + lstr(K_pad));
  if (gs < 8 || gs % 8 || K_pad % gs)
    throw py::value_error("gs: expected a multiple of 8 dividing K_pad=" + lstr(K_pad) + ", got " + lstr(gs));

  TensorArg x("x", x_o), planes("planes", planes_o), out("out", out_o);
  std::unique_ptr<TensorArg> scales, zeros, codebook;
  if (!scales_o.is_none()) scales.reset(new TensorArg("scales", scales_o));
  if (!zeros_o.is_none()) zeros.reset(new TensorArg("zeros", zeros_o));
  if (!codebook_o.is_none()) codebook.reset(new TensorArg("codebook", codebook_o));
  const int kind = codebook ? ck::kLutCodebook : ck::kLutLinear;
  if (kind == ck::kLutCodebook && zeros)
    throw py::value_error("zeros: must be None for a codebook (the codebook holds the levels)");

  std::vector<TensorArg*> all = {&x, &planes, &out};
  for (TensorArg* t : {scales.get(), zeros.get(), codebook.get()})
    if (t) all.push_back(t);
  const DType xdt = x.float_dtype();
  x.require_ndim(2);
  const int64_t M = x.size(0);
  if (x.size(1) != K_pad || M < 1 || M > ck::kLutMaxM)
    throw py::value_error("x: expected [M, K_pad=" + lstr(K_pad) + "] with 1 <= M <= " + lstr(ck::kLutMaxM) +
                          ", got " + x.shape_str());
  const int64_t N_pad = (N + 31) / 32 * 32, G = K_pad / gs;
  require(planes, kDLUInt, 8, "uint8", {N_pad / 32, K_pad / 8, bits, 32});
  require(out, kDLFloat, 32, "float32", {M, N});
  if (scales) require(*scales, kDLFloat, 16, "float16", {N, G});
  if (zeros) require(*zeros, kDLFloat, 16, "float16", {N, G});
  int64_t cb_rows = 0;
  if (codebook) {
    if (codebook->ndim() != 2 || (codebook->size(0) != 1 && codebook->size(0) != N) || codebook->size(1) != (1 << bits))
      throw py::value_error("codebook: expected shape [1 or N=" + lstr(N) + ", " + lstr(1 << bits) + "], got " +
                            codebook->shape_str());
    cb_rows = codebook->size(0);
    require(*codebook, kDLFloat, 32, "float32", {cb_rows, (int64_t)1 << bits});
  }
  for (TensorArg* t : all) t->require_contiguous();
  if (kind == ck::kLutLinear && !scales)
    throw py::value_error("scales: required for the affine and symmetric schemes (only a codebook may omit them)");
  if (N_pad / 32 > 0x7fffffffLL) throw py::value_error("N: " + lstr(N) + " rows exceed the CUDA grid limit");
  // Devices last, so that every shape and dtype rule above is checkable without a GPU.
  for (TensorArg* t : all) {
    if (t->device_type() != kDLCUDA && t->device_type() != kDLCUDAManaged)
      throw py::value_error(t->name + ": the CUDA backend needs CUDA tensors, got DLPack device type " +
                            lstr(t->device_type()) + (t->device_type() == kDLCPU ? " (CPU)" : ""));
    if (t->device_id() != x.device_id())
      throw py::value_error(t->name + ": on cuda:" + lstr(t->device_id()) + " but x is on cuda:" + lstr(x.device_id()));
  }

  LutDeviceGuard guard(x.device_id());
  LutLaunch a;
  a.x = x.data();
  a.x_dtype = (int64_t)xdt;
  a.M = M;
  a.planes = static_cast<const unsigned char*>(planes.data());
  a.scales = scales ? static_cast<const uint16_t*>(scales->data()) : nullptr;
  a.zeros = zeros ? static_cast<const uint16_t*>(zeros->data()) : nullptr;
  a.codebook = codebook ? static_cast<const float*>(codebook->data()) : nullptr;
  a.cb_per_row = cb_rows > 1 ? 1 : 0;
  a.out = static_cast<float*>(out.data());
  a.N = N;
  a.K_pad = K_pad;
  a.gs = gs;
  a.grid = (unsigned)(N_pad / 32);
  a.stream = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream_handle));

  py::gil_scoped_release nogil;
  dispatch_bits(a, (int)bits, kind, pick_lut_rows(M));
  lut_check(cudaGetLastError(), "lut_gemv kernel launch");
}

}  // namespace cuda
}  // namespace pykernels
