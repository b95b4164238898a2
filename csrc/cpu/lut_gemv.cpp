// CPU launcher for LUT-GEMV: validates every argument (again: Python checks too, but no input may
// make the kernel read out of bounds), converts x to fp32, then with the GIL released builds the
// tables of every row of x (parallel over rows and K blocks) and runs the 32-row weight tiles on
// the thread pool (parallel over N).
#include "lut_gemv.h"

#include <cstdlib>
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

bool has_vbmi_vnni() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni");
  }();
  return ok;
}

// PYKERNELS_LUT_VBMI=0 turns the VBMI/VNNI kernel off (tests cover the AVX-512BW one with it).
bool vbmi_enabled() {
  const char* e = std::getenv("PYKERNELS_LUT_VBMI");
  return has_vbmi_vnni() && !(e && std::strcmp(e, "0") == 0);
}

struct LutFns {
  LutPrepareFn prepare;
  LutTileFn tile;
};

LutFns lut_fns(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16:
    case Isa::kAvx512:
      if (vbmi_enabled()) return {avx512vbmi::lut_prepare, avx512vbmi::lut_tile};
      return {avx512::lut_prepare, avx512::lut_tile};
    case Isa::kAvx2: return {avx2::lut_prepare, avx2::lut_tile};
    default: return {scalar::lut_prepare, scalar::lut_tile};
  }
}

void require_cpu(const TensorArg& t) {
  if (t.device_type() != kDLCPU && t.device_type() != kDLCUDAHost)
    throw py::value_error(t.name + ": the CPU backend needs CPU tensors");
}

void require_dtype(const TensorArg& t, uint8_t code, uint8_t bits, const char* want) {
  const DLDataType& d = t.t->dtype;
  if (d.code != code || d.bits != bits || d.lanes != 1)
    throw py::type_error(t.name + ": expected " + want + ", got " + t.dtype_str());
}

void require_shape(const TensorArg& t, std::initializer_list<int64_t> shape, const std::string& what) {
  bool ok = t.ndim() == (int)shape.size();
  int i = 0;
  for (int64_t s : shape) {
    if (!ok) break;
    ok = t.size(i++) == s;
  }
  if (!ok) {
    std::string want = "[";
    i = 0;
    for (int64_t s : shape) want += (i++ ? ", " : "") + str(s);
    throw py::value_error(t.name + ": expected shape " + want + "] (" + what + "), got " + t.shape_str());
  }
  t.require_contiguous();
}

// Scratch of the calling thread, kept between calls: tables of large M * K_pad are megabytes,
// and fresh allocations of that size are fresh pages (page faults on every call). Only grows;
// every call writes what it reads.
template <typename T>
T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

struct Scratch {
  std::vector<float> x32, tf, ts, sb, work;
  std::vector<int8_t> tq;
};

}  // namespace

void lut_gemv(py::object x_o, py::object planes_o, py::object scales_o, py::object zeros_o, py::object codebook_o,
              py::object out_o, int64_t N, int64_t K_pad, int64_t bits, int64_t gs, const std::string& mode) {
  // Scalars first: the tensor shapes are checked against them.
  if (mode != "int8" && mode != "exact") throw py::value_error("mode: expected 'int8' or 'exact', got '" + mode + "'");
  if (bits < 1 || bits > 8) throw py::value_error("bits: expected 1..8, got " + str(bits));
  if (N < 1) throw py::value_error("N: expected >= 1, got " + str(N));
  if (K_pad < kLutKSlice || K_pad % kLutKSlice)
    throw py::value_error("K_pad: expected a positive multiple of 8, got " + str(K_pad));
  if (gs < kLutKSlice || gs % kLutKSlice || K_pad % gs)
    throw py::value_error("gs: expected a multiple of 8 that divides K_pad=" + str(K_pad) + ", got " + str(gs));

  TensorArg x("x", x_o), planes("planes", planes_o), out("out", out_o);
  std::unique_ptr<TensorArg> scales, zeros, codebook;
  if (!scales_o.is_none()) scales.reset(new TensorArg("scales", scales_o));
  if (!zeros_o.is_none()) zeros.reset(new TensorArg("zeros", zeros_o));
  if (!codebook_o.is_none()) codebook.reset(new TensorArg("codebook", codebook_o));
  for (const TensorArg* t : {&x, &planes, &out, scales.get(), zeros.get(), codebook.get()})
    if (t) require_cpu(*t);

  const DType xdt = x.float_dtype();
  if (x.ndim() != 2) throw py::value_error("x: expected 2 dimensions [M, K_pad], got shape " + x.shape_str());
  const int64_t M = x.size(0);
  if (M < 1 || M > kLutMaxM)
    throw py::value_error("x: expected 1 <= M <= " + str(kLutMaxM) + " rows, got M=" + str(M));
  require_shape(x, {M, K_pad}, "M, K_pad");
  const int64_t N_pad = pk_cdiv(N, kLutTileN) * kLutTileN, KK = K_pad / kLutKSlice, G = K_pad / gs;
  require_dtype(planes, kDLUInt, 8, "uint8");
  require_shape(planes, {N_pad / kLutTileN, KK, bits, kLutTileN}, "N_pad/32, K_pad/8, bits, 32");
  LutScheme scheme;
  if (codebook) {
    scheme = LutScheme::kCodebook;
    require_dtype(*codebook, kDLFloat, 32, "float32");
    if (codebook->ndim() != 2 || (codebook->size(0) != 1 && codebook->size(0) != N))
      throw py::value_error("codebook: expected shape [1 or N=" + str(N) + ", " + str(1 << bits) + "], got " +
                            codebook->shape_str());
    require_shape(*codebook, {codebook->size(0), (int64_t)1 << bits}, "1 or N, 2**bits");
    if (zeros) throw py::value_error("zeros: must be None for a codebook (the codebook holds the levels)");
    if (codebook->size(0) * ((int64_t)1 << bits) >= ((int64_t)1 << 31))  // the kernels gather with int32 indices
      throw py::value_error("codebook: per-channel tables of N=" + str(N) + " rows x 2**" + str(bits) +
                            " entries exceed 2**31 entries");
  } else {
    if (!scales) throw py::value_error("scales: required unless a codebook is given");
    scheme = zeros ? LutScheme::kAffine : LutScheme::kSymmetric;
  }
  for (TensorArg* t : {scales.get(), zeros.get()})
    if (t) {
      require_dtype(*t, kDLFloat, 16, "float16");
      require_shape(*t, {N, G}, "N, K_pad/gs");
    }
  if (!out.is_float32()) throw py::type_error("out: expected float32, got " + out.dtype_str());
  require_shape(out, {M, N}, "M, N");

  LutParams p;
  p.planes = static_cast<const uint8_t*>(planes.data());
  p.scales = scales ? static_cast<const pk_u16*>(scales->data()) : nullptr;
  p.zeros = zeros ? static_cast<const pk_u16*>(zeros->data()) : nullptr;
  p.codebook = codebook ? static_cast<const float*>(codebook->data()) : nullptr;
  p.cb_rows = codebook ? codebook->size(0) : 0;
  p.N = N; p.N_pad = N_pad; p.K_pad = K_pad; p.KK = KK; p.G = G; p.gs = gs;
  p.bits = (int)bits; p.M = (int)M;
  p.scheme = scheme;
  p.mode = mode == "exact" ? LutMode::kExact : LutMode::kInt8;
  p.bpg = pk_cdiv(gs, kLutBlockK);
  p.nblk = G * p.bpg;
  p.out = static_cast<float*>(out.data());
  const void* xdata = x.data();
  const LutFns fns = lut_fns(active_isa());  // read once: tables and tiles from the same variant

  py::gil_scoped_release nogil;
  thread_local Scratch S;
  // x -> fp32 [M, K_pad] (M * K_pad values: small next to the weights).
  if (xdt == DType::kFloat32) {
    p.x = static_cast<const float*>(xdata);
  } else {
    float* x32 = scratch(S.x32, (size_t)(M * K_pad));
    const pk_u16* src = static_cast<const pk_u16*>(xdata);
    for (int64_t i = 0; i < M * K_pad; ++i)
      x32[i] = xdt == DType::kFloat16 ? fp16_to_float(src[i]) : bf16_to_float(src[i]);
    p.x = x32;
  }
  p.tstride = K_pad / 4 * 16 + kLutTablePad;
  // Read once: thread indices below must stay under the count the scratch was sized for.
  const int nthr = parallel_threads();
  if (scheme != LutScheme::kCodebook) {
    if (p.mode == LutMode::kInt8) p.tq = scratch(S.tq, (size_t)(M * p.tstride));
    else p.tf = scratch(S.tf, (size_t)(M * p.tstride));
    p.ts = scratch(S.ts, (size_t)(M * p.nblk));
    p.sb = scratch(S.sb, (size_t)(M * p.nblk));
    // Tables: M * K_pad * 4 (int8) or 16 (fp32) bytes written, x read once.
    constexpr int64_t kChunk = 32;  // blocks per task
    const int64_t nchunk = pk_cdiv(p.nblk, kChunk);
    parallel_run(M * nchunk, nthr, [&](int64_t task, int) {
      const int64_t m = task / nchunk, b0 = (task % nchunk) * kChunk;
      fns.prepare(p, m, b0, b0 + kChunk < p.nblk ? b0 + kChunk : p.nblk);
    });
  }
  // Tiles: each reads its planes (32 * K_pad * bits / 8 bytes) and scales once for all M rows.
  // Groups of up to kLutTileGroup tiles share the tables of a K chunk; at least 4 groups per
  // thread keep the dynamic claiming balanced.
  const int64_t ntiles = N_pad / kLutTileN;
  int64_t tg = ntiles / (4 * nthr);
  tg = tg < 1 ? 1 : (tg > kLutTileGroup ? kLutTileGroup : tg);
  const int64_t per_thr = lut_workspace_floats((int)M);
  float* work = scratch(S.work, (size_t)(nthr * per_thr));
  parallel_run(pk_cdiv(ntiles, tg), nthr, [&](int64_t task, int thr) {
    const int64_t t0 = task * tg, t1 = t0 + tg < ntiles ? t0 + tg : ntiles;
    fns.tile(p, t0, t1, work + thr * per_thr);
  });
}

}  // namespace cpu
}  // namespace pykernels
