// CPU launcher for the dense bf16 GEMV: validates every argument (again: Python checks too, but
// no input may make the kernel read out of bounds), lays x out for the chosen kernel variant,
// then with the GIL released splits the N rows of w into chunks run on the thread pool.
#include "gemv.h"

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "tensor_arg.h"
#include "thread_pool.h"

namespace pykernels {
namespace cpu {

namespace {

std::string str(int64_t v) { return std::to_string(v); }

void require_cpu(const TensorArg& t) {
  if (t.device_type() != kDLCPU && t.device_type() != kDLCUDAHost)
    throw py::value_error(t.name + ": the CPU backend needs CPU tensors");
}

bool is_bf16(const TensorArg& t) {
  const DLDataType& d = t.t->dtype;
  return d.code == kDLBfloat && d.bits == 16 && d.lanes == 1;
}

// float32 or bfloat16, else a TypeError naming the argument; returns true for bfloat16.
bool f32_or_bf16(const TensorArg& t) {
  if (t.is_float32()) return false;
  if (is_bf16(t)) return true;
  throw py::type_error(t.name + ": expected float32 or bfloat16, got " + t.dtype_str());
}

template <typename T>
T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Scratch of the calling thread, kept between calls (only grows; every call writes what it reads).
struct Scratch {
  std::vector<float> xf;
  std::vector<pk_u16> xb;
};

GemvRowsFn rows_fn(Isa isa, bool x_bf16) {
  switch (isa) {
    // fp32 x keeps the fp32-FMA kernel: vdpbf16ps would round x to bf16.
    case Isa::kAvx512Bf16: return x_bf16 ? avx512bf16::gemv_rows : avx512::gemv_rows;
    case Isa::kAvx512: return avx512::gemv_rows;
    case Isa::kAvx2: return avx2::gemv_rows;
    default: return scalar::gemv_rows;
  }
}

}  // namespace

void gemv(py::object x_o, py::object w_o, py::object bias_o, py::object out_o) {
  TensorArg x("x", x_o), w("w", w_o), out("out", out_o);
  std::unique_ptr<TensorArg> bias;
  if (!bias_o.is_none()) bias.reset(new TensorArg("bias", bias_o));
  for (const TensorArg* t : {&x, &w, &out, bias.get()})
    if (t) require_cpu(*t);

  const bool x_bf16 = f32_or_bf16(x);
  if (x.ndim() != 2) throw py::value_error("x: expected 2 dimensions [M, K], got shape " + x.shape_str());
  const int64_t M = x.size(0), K = x.size(1);
  if (M < 1 || M > kGemvMaxM)
    throw py::value_error("x: expected 1 <= M <= " + str(kGemvMaxM) + " rows, got M=" + str(M));
  if (K < 1) throw py::value_error("x: expected K >= 1, got shape " + x.shape_str());
  x.require_contiguous();

  if (!is_bf16(w)) throw py::type_error("w: expected bfloat16, got " + w.dtype_str());
  if (w.ndim() != 2 || w.size(1) != K)
    throw py::value_error("w: expected shape [N, K=" + str(K) + "], got " + w.shape_str());
  const int64_t N = w.size(0);
  if (N < 1) throw py::value_error("w: expected N >= 1 rows, got shape " + w.shape_str());
  if (K > 1 && w.stride(1) != 1)
    throw py::value_error("w: expected unit stride along K, got strides [" + str(w.stride(0)) + ", " +
                          str(w.stride(1)) + "]");
  // One row needs no row stride; otherwise rows must not overlap or run backwards.
  const int64_t ldw = N > 1 ? w.stride(0) : K;
  if (ldw < K)
    throw py::value_error("w: expected a row stride >= K=" + str(K) + ", got " + str(ldw));

  if (bias) {
    f32_or_bf16(*bias);
    if (bias->ndim() != 1 || bias->size(0) != N)
      throw py::value_error("bias: expected shape [N=" + str(N) + "], got " + bias->shape_str());
    bias->require_contiguous();
  }
  if (f32_or_bf16(out) != x_bf16)
    throw py::type_error("out: expected x's dtype " + std::string(x_bf16 ? "bfloat16" : "float32") + ", got " +
                         out.dtype_str());
  if (out.ndim() != 2 || out.size(0) != M || out.size(1) != N)
    throw py::value_error("out: expected shape [" + str(M) + ", " + str(N) + "], got " + out.shape_str());
  out.require_contiguous();

  GemvParams p;
  p.w = static_cast<const pk_u16*>(w.data());
  p.N = N; p.K = K; p.ldw = ldw; p.M = (int)M;
  p.K32 = pk_cdiv(K, kGemvBlockK) * kGemvBlockK;
  p.bias = bias ? bias->data() : nullptr;
  p.bias_bf16 = bias && is_bf16(*bias);
  p.out = out.data();
  p.out_bf16 = x_bf16;
  const Isa isa = active_isa();  // read once: the kernel and its x layout must agree
  const GemvRowsFn fn = rows_fn(isa, x_bf16);
  const void* xdata = x.data();

  py::gil_scoped_release nogil;
  thread_local Scratch S;
  // x in the kernel's layout (M * K32 values: small next to the 2 N K bytes of w).
  auto xval = [&](int64_t i) {
    return x_bf16 ? bf16_to_float(static_cast<const pk_u16*>(xdata)[i]) : static_cast<const float*>(xdata)[i];
  };
  if (fn == scalar::gemv_rows) {
    // always a copy: an `out` that aliases x must not change x while rows are being computed
    float* xf = scratch(S.xf, (size_t)(M * K));
    for (int64_t i = 0; i < M * K; ++i) xf[i] = xval(i);
    p.xf = xf;
  } else if (fn == avx512bf16::gemv_rows) {
    pk_u16* xb = scratch(S.xb, (size_t)(M * p.K32));
    for (int64_t m = 0; m < M; ++m) {
      memcpy(xb + m * p.K32, static_cast<const pk_u16*>(xdata) + m * K, sizeof(pk_u16) * K);
      memset(xb + m * p.K32 + K, 0, sizeof(pk_u16) * (p.K32 - K));
    }
    p.xb = xb;
  } else {  // split layout: per 32-k block, 16 even k then 16 odd k (gemv.h), zero past K
    float* xs = scratch(S.xf, (size_t)(M * p.K32));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < p.K32; ++k) {
        const int64_t b = k & ~(kGemvBlockK - 1), j = k - b;
        const int64_t dst = b + (j & 1) * (kGemvBlockK / 2) + (j >> 1);
        xs[m * p.K32 + dst] = k < K ? xval(m * K + k) : 0.f;
      }
    p.xs = xs;
  }

  // Chunks of rows claimed dynamically: >= 4 per thread for balance, >= 16 rows (a few R-row
  // groups) so a claim is cheap next to the 32 K bytes of w it streams.
  const int nthr = parallel_threads();
  if (nthr <= 1 || N < 32) {
    fn(p, 0, N);
    return;
  }
  int64_t chunk = pk_cdiv(N, 4 * (int64_t)nthr);
  chunk = chunk < 16 ? 16 : (chunk > 512 ? 512 : chunk);
  chunk = pk_cdiv(chunk, 8) * 8;
  parallel_run(pk_cdiv(N, chunk), nthr, [&](int64_t task, int) {
    const int64_t n0 = task * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
    fn(p, n0, n1);
  });
}

}  // namespace cpu
}  // namespace pykernels
