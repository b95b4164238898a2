// CUDA launcher for decode attention over a quantized KV cache (pykernels/kv_format.py).
//
// Validates every argument (errors name it: ValueError / TypeError in Python), in the order
//   scalar options -> shapes, dtypes, layouts -> values (n_sink / n_quant / n_res, page ids;
//   read on the host) -> devices,
// so every rule but the last can be exercised with CPU tensors (the JIT path in
// pykernels/cuda/kv_attention.py follows the same order and messages). The validated lengths
// are uploaded (meta [3, B]: L, n_sink, n_quant) and the kernels read only those; then
// plan -> attention -> reduce are enqueued on the caller's stream with the GIL released (the
// plan and reduce kernels are those of plain decode attention).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_args.h"
#include "tensor_arg.h"

#include "cuda/kv_attention.cuh"
#include "cuda/launcher.h"

namespace pykernels {
namespace cuda {

namespace ck = ::pykernels::cuda_kernels;
using namespace launch_util;  // check, DeviceGuard, Workspace, copy_span_to_host

namespace {

bool has_dtype(const TensorArg& t, int code, int bits) {
  return t.t->dtype.code == code && t.t->dtype.bits == bits && t.t->dtype.lanes == 1;
}

std::string shape_of(std::initializer_list<int64_t> dims) {
  std::string s = "[";
  int i = 0;
  for (int64_t d : dims) s += (i++ ? ", " : "") + std::to_string(d);
  return s + "]";
}

// dtype (TypeError), then exact shape and contiguity (ValueError).
void require(const TensorArg& t, int code, int bits, const char* dtype_name, std::initializer_list<int64_t> shape) {
  if (!has_dtype(t, code, bits))
    throw py::type_error(t.name + ": expected " + dtype_name + ", got " + t.dtype_str());
  bool ok = t.ndim() == (int)shape.size();
  int i = 0;
  for (int64_t d : shape) ok = ok && t.size(i++) == d;
  if (!ok) throw py::value_error(t.name + ": expected shape " + shape_of(shape) + ", got " + t.shape_str());
  t.require_contiguous();
}

// Host copy of an int32 tensor's values (ndim <= 2), CPU or CUDA; index with the tensor's own
// strides from the returned base. A CUDA tensor on q's device is read in order on the caller's
// stream; one on another device (rejected by the device check that follows) on that device's
// default stream.
std::vector<int32_t> host_values(const TensorArg& t, const TensorArg& q, cudaStream_t stream, int64_t* base) {
  if (t.device_type() == kDLCPU) {
    int64_t lo = 0, hi = 0;
    for (int i = 0; i < t.ndim(); ++i) {
      if (t.size(i) == 0) { *base = 0; return {}; }
      const int64_t ext = (t.size(i) - 1) * t.stride(i);
      if (ext < 0) lo += ext; else hi += ext;
    }
    const int32_t* src = static_cast<const int32_t*>(t.data()) + lo;
    *base = -lo;
    return std::vector<int32_t>(src, src + (hi - lo + 1));
  }
  if (t.device_type() != kDLCUDA && t.device_type() != kDLCUDAManaged)
    throw py::value_error(t.name + ": the CUDA backend needs CUDA tensors, got DLPack device type " +
                          str(t.device_type()));
  const bool same = (q.device_type() == kDLCUDA || q.device_type() == kDLCUDAManaged) && q.device_id() == t.device_id();
  DeviceGuard guard(t.device_id());
  return copy_span_to_host(t, same ? stream : nullptr, base);
}

struct KvLaunch {
  const void* q; int64_t q_s[3]; int64_t q_dtype;
  const unsigned char* kc; const void* ks; const uint16_t* kz;
  const unsigned char* vc; const void* vs; const uint16_t* vz;
  const void* fk; const void* fv; int64_t fk_s[3], fv_s[3]; int64_t fp_dtype, F;
  const int32_t* bt; int64_t bt_stride, max_pages, P, S, gs_shift;
  const int32_t* meta; int64_t capacity;
  int64_t* cum; int64_t* split_base;
  void* out; int64_t out_dtype; float* lse;
  float* part_o; float* part_lse; int64_t num_slots;
  int64_t B, Hq, Hkv, D, tile, mode, num_splits;
  float scale; int64_t vec;
  unsigned grid;
  cudaStream_t stream;
};

template <int FMT, int EPL, int GB>
void launch_kv(const KvLaunch& a) {
  ck::decode_attention_kv_kernel<FMT, EPL, GB><<<a.grid, ck::kThreads, 0, a.stream>>>(
      a.q, a.q_s[0], a.q_s[1], a.q_s[2], a.q_dtype,
      a.kc, a.ks, reinterpret_cast<const pk_u16*>(a.kz), a.vc, a.vs, reinterpret_cast<const pk_u16*>(a.vz),
      a.fk, a.fv, a.fk_s[0], a.fk_s[1], a.fk_s[2], a.fv_s[0], a.fv_s[1], a.fv_s[2], a.fp_dtype, a.F,
      a.bt, a.bt_stride, a.max_pages, a.P, a.S, a.gs_shift, a.meta, a.capacity,
      a.cum, a.split_base, a.out, a.out_dtype, a.lse, a.part_o, a.part_lse, a.num_slots,
      a.B, a.Hq, a.Hkv, a.D, a.tile, a.mode, a.num_splits, a.scale, a.vec);
}

}  // namespace

void decode_attention_kv(py::object q_o, py::object kc_o, py::object ks_o, py::object kz_o, py::object vc_o,
                         py::object vs_o, py::object vz_o, py::object fk_o, py::object fv_o, py::object bt_o,
                         py::object ns_o, py::object nq_o, py::object nr_o, py::object out_o, py::object lse_o,
                         double scale, const std::string& fmt, int64_t group_size, const std::string& method,
                         int64_t num_splits, int64_t num_workers, int64_t tile, int64_t stream_handle) {
  // ---- scalar options
  check_schedule_options(method, num_splits, num_workers, tile, scale);
  const int fmt_code = (int)parse_kv_format(fmt, group_size);
  const bool fp8 = fmt_code == 0;
  const int64_t bits = fp8 ? 8 : fmt_code, gs = group_size;
  const int64_t gs_shift = gs == 32 ? 5 : (gs == 64 ? 6 : 7);

  // ---- shapes, dtypes, layouts
  TensorArg q("q", q_o), kc("k_codes", kc_o), ks("k_scale", ks_o), vc("v_codes", vc_o), vs("v_scale", vs_o);
  std::unique_ptr<TensorArg> kz, vz, bt;
  if (!kz_o.is_none()) kz.reset(new TensorArg("k_zero", kz_o));
  if (!vz_o.is_none()) vz.reset(new TensorArg("v_zero", vz_o));
  TensorArg fk("fp_k", fk_o), fv("fp_v", fv_o);
  if (!bt_o.is_none()) bt.reset(new TensorArg("block_table", bt_o));
  TensorArg ns("n_sink", ns_o), nq("n_quant", nq_o), nr("n_res", nr_o), out("out", out_o), lse("lse", lse_o);

  q.require_ndim(3);
  const DType qdt = q.float_dtype();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  if (D < 8 || D % 8 != 0 || D > ck::kMaxHeadDim)
    throw py::value_error("q: head_dim " + str(D) + " is not supported by the CUDA backend (a multiple of 8 in [8, " +
                          str(ck::kMaxHeadDim) + "])");
  kc.require_ndim(4);
  if (!has_dtype(kc, kDLUInt, 8)) throw py::type_error("k_codes: expected uint8, got " + kc.dtype_str());
  const int64_t P = kc.size(0), Hkv = kc.size(1), S = kc.size(2);
  const int64_t RB = fp8 ? D : D * bits / 8;
  if (Hkv < 1 || Hq % Hkv != 0)
    throw py::value_error("q: num_heads " + str(Hq) + " is not a multiple of k_codes num_kv_heads " + str(Hkv));
  if (S < 1 || S % gs != 0)
    throw py::value_error("k_codes: page_tokens " + str(S) + " is not a positive multiple of group_size " + str(gs));
  if (kc.size(3) != RB)
    throw py::value_error("k_codes: expected " + str(RB) + " bytes per row (" + fmt + ", head_dim " + str(D) +
                          "), got shape " + kc.shape_str());
  kc.require_contiguous();
  require(vc, kDLUInt, 8, "uint8", {P, Hkv, S, RB});
  const int64_t NG = (D + gs - 1) / gs;
  if (fp8) {
    require(ks, kDLFloat, 32, "float32", {P, Hkv, S / gs});
    require(vs, kDLFloat, 32, "float32", {P, Hkv, S / gs});
    if (kz) throw py::value_error("k_zero: must be None for fp8 (no zero points)");
    if (vz) throw py::value_error("v_zero: must be None for fp8 (no zero points)");
  } else {
    if (!kz) throw py::value_error("k_zero: required for the integer formats");
    if (!vz) throw py::value_error("v_zero: required for the integer formats");
    require(ks, kDLFloat, 16, "float16", {P, Hkv, S / gs, D});
    require(*kz, kDLFloat, 16, "float16", {P, Hkv, S / gs, D});
    require(vs, kDLFloat, 16, "float16", {P, Hkv, S, NG});
    require(*vz, kDLFloat, 16, "float16", {P, Hkv, S, NG});
  }
  fk.require_ndim(4);
  const DType fdt = fk.float_dtype();
  if (fk.size(0) != B || fk.size(2) != Hkv || fk.size(3) != D)
    throw py::value_error("fp_k: expected shape [B=" + str(B) + ", F, Hkv=" + str(Hkv) + ", D=" + str(D) + "], got " +
                          fk.shape_str());
  fk.require_last_contiguous();
  fv.require_ndim(4);
  if (fv.float_dtype() != fdt)
    throw py::type_error("fp_v: dtype " + fv.dtype_str() + " differs from fp_k dtype " + fk.dtype_str());
  for (int i = 0; i < 4; ++i)
    if (fv.size(i) != fk.size(i))
      throw py::value_error("fp_v: shape " + fv.shape_str() + " differs from fp_k shape " + fk.shape_str());
  fv.require_last_contiguous();
  const int64_t F = fk.size(1);
  int64_t max_pages = 1, bt_stride = 0;
  if (bt) {
    bt->require_ndim(2);
    if (!bt->is_int32() || bt->size(0) != B)
      throw py::value_error("block_table: expected int32 [" + str(B) + ", max_pages], got " + bt->dtype_str() + " " +
                            bt->shape_str());
    if (bt->size(1) > 1 && bt->stride(1) != 1) throw py::value_error("block_table: last dimension must have stride 1");
    max_pages = bt->size(1);
    bt_stride = bt->stride(0);
  } else if (P < B) {
    throw py::value_error("k_codes: without a block_table sequence b uses page b, so P >= B=" + str(B) +
                          " pages are needed, got shape " + kc.shape_str());
  }
  const int64_t store_capacity = max_pages * S;
  for (TensorArg* t : {&ns, &nq, &nr}) {
    t->require_ndim(1);
    if (!t->is_int32() || t->size(0) != B)
      throw py::value_error(t->name + ": expected int32 [" + str(B) + "], got " + t->dtype_str() + " " + t->shape_str());
  }
  out.require_ndim(3);
  const DType odt = out.float_dtype();
  if (out.size(0) != B || out.size(1) != Hq || out.size(2) != D)
    throw py::value_error("out: expected shape [B, Hq, D], got " + out.shape_str());
  out.require_contiguous();
  lse.require_ndim(2);
  if (!lse.is_float32() || lse.size(0) != B || lse.size(1) != Hq)
    throw py::value_error("lse: expected float32 [B, Hq], got " + lse.dtype_str() + " " + lse.shape_str());
  lse.require_contiguous();

  // ---- values (host copies; the kernels read only the uploaded copies)
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream_handle));
  std::vector<int32_t> meta(3 * B);
  int64_t capacity = 1;
  {
    std::vector<int32_t> hs, hq, hr, hb;
    int64_t bs = 0, bq = 0, br = 0, bb = 0;
    {
      py::gil_scoped_release nogil;
      hs = host_values(ns, q, stream, &bs);
      hq = host_values(nq, q, stream, &bq);
      hr = host_values(nr, q, stream, &br);
      if (bt) hb = host_values(*bt, q, stream, &bb);
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t s = hs[bs + b * ns.stride(0)], u = hq[bq + b * nq.stride(0)], r = hr[br + b * nr.stride(0)];
      const std::string at = "[" + str(b) + "] = ";
      if (s < 0) throw py::value_error("n_sink: n_sink" + at + str(s) + " is negative");
      if (u < 0) throw py::value_error("n_quant: n_quant" + at + str(u) + " is negative");
      if (r < 0) throw py::value_error("n_res: n_res" + at + str(r) + " is negative");
      if (u % gs != 0)
        throw py::value_error("n_quant: n_quant" + at + str(u) + " is not a multiple of group_size " + str(gs));
      if (u > store_capacity)
        throw py::value_error("n_quant: n_quant" + at + str(u) + " exceeds the store capacity " + str(max_pages) +
                              " pages x " + str(S) + " page_tokens");
      if (s + r > F)
        throw py::value_error("n_res: n_sink[" + str(b) + "] + n_res[" + str(b) + "] = " + str(s + r) +
                              " exceeds the " + str(F) + " fp rows of fp_k / fp_v");
      const int64_t L = s + u + r;
      if (L < 1)
        throw py::value_error("n_res: sequence " + str(b) + " has no tokens (n_sink + n_quant + n_res must be >= 1)");
      if (L > 0x7fffffffLL)
        throw py::value_error("n_quant: sequence " + str(b) + " has " + str(L) + " tokens (at most 2^31 - 1)");
      if (bt) {
        const int64_t npg = (u + S - 1) / S;
        for (int64_t j = 0; j < npg; ++j) {
          const int32_t id = hb[bb + b * bt_stride + j];
          if (id < 0 || id >= P)
            throw py::value_error("block_table: block_table[" + str(b) + ", " + str(j) + "] = " + str(id) +
                                  " is outside [0, " + str(P) + ")");
        }
      }
      meta[b] = (int32_t)L;
      meta[B + b] = (int32_t)s;
      meta[2 * B + b] = (int32_t)u;
      capacity = std::max(capacity, L);
    }
  }

  // ---- devices
  {
    std::vector<TensorArg*> all = {&q, &kc, &ks, &vc, &vs, &fk, &fv, &ns, &nq, &nr, &out, &lse};
    if (kz) all.push_back(kz.get());
    if (vz) all.push_back(vz.get());
    if (bt) all.push_back(bt.get());
    for (TensorArg* t : all) {
      if (t->device_type() != kDLCUDA && t->device_type() != kDLCUDAManaged)
        throw py::value_error(t->name + ": the CUDA backend needs CUDA tensors, got DLPack device type " +
                              str(t->device_type()) + (t->device_type() == kDLCPU ? " (CPU)" : ""));
      if (t->device_id() != q.device_id())
        throw py::value_error(t->name + ": on cuda:" + str(t->device_id()) + " but q is on cuda:" + str(q.device_id()));
    }
  }
  if (B == 0 || Hq == 0) return;
  DeviceGuard guard(q.device_id());

  // ---- schedule sizes (the plan kernel recomputes the same partition from meta)
  const ScheduleSizes ss = schedule_sizes(meta.data(), B, Hkv, tile, method == "lean", num_splits, num_workers);
  const int64_t nseg = ss.nseg, G = Hq / Hkv, W = ss.workers, num_slots = ss.num_slots, grid = ss.grid;
  const bool lean_mode = ss.lean;

  const KernelConfig cfg = pick_config(D, G);
  const int64_t fsize = fdt == DType::kFloat32 ? 4 : 2;
  const int64_t falign = std::min<int64_t>(16, cfg.epl * fsize);
  bool vec_fp = D % cfg.epl == 0 && reinterpret_cast<uintptr_t>(fk.data()) % falign == 0 &&
                reinterpret_cast<uintptr_t>(fv.data()) % falign == 0;
  for (int i = 0; i < 3; ++i) vec_fp = vec_fp && fk.stride(i) % cfg.epl == 0 && fv.stride(i) % cfg.epl == 0;
  const bool vec_codes = reinterpret_cast<uintptr_t>(kc.data()) % 8 == 0 && reinterpret_cast<uintptr_t>(vc.data()) % 8 == 0;
  const int64_t palign = std::min<int64_t>(16, 2 * cfg.epl);
  const bool vec_kparam = !fp8 && reinterpret_cast<uintptr_t>(ks.data()) % palign == 0 &&
                          reinterpret_cast<uintptr_t>(kz->data()) % palign == 0;
  const int64_t vec = (vec_fp ? ck::kKvVecFp : 0) | (vec_codes ? ck::kKvVecCodes : 0) |
                      (vec_kparam ? ck::kKvVecKParam : 0);

  py::gil_scoped_release nogil;
  const size_t cum_bytes = align_up((nseg + 1) * sizeof(int64_t));
  const size_t base_bytes = align_up(nseg * sizeof(int64_t));
  const size_t meta_bytes = align_up(meta.size() * sizeof(int32_t));
  const size_t po_bytes = align_up((size_t)num_slots * G * D * sizeof(float));
  const size_t pl_bytes = align_up((size_t)num_slots * G * sizeof(float));
  Workspace ws(cum_bytes + base_bytes + meta_bytes + po_bytes + pl_bytes, stream, q.device_id());
  char* wp = static_cast<char*>(ws.ptr);

  KvLaunch a;
  a.q = q.data();
  for (int i = 0; i < 3; ++i) { a.q_s[i] = q.stride(i); a.fk_s[i] = fk.stride(i); a.fv_s[i] = fv.stride(i); }
  a.q_dtype = (int64_t)qdt;
  a.kc = static_cast<const unsigned char*>(kc.data());
  a.ks = ks.data();
  a.kz = kz ? static_cast<const uint16_t*>(kz->data()) : nullptr;
  a.vc = static_cast<const unsigned char*>(vc.data());
  a.vs = vs.data();
  a.vz = vz ? static_cast<const uint16_t*>(vz->data()) : nullptr;
  a.fk = fk.data();
  a.fv = fv.data();
  a.fp_dtype = (int64_t)fdt;
  a.F = F;
  a.bt = bt ? static_cast<const int32_t*>(bt->data()) : nullptr;
  a.bt_stride = bt_stride;
  a.max_pages = max_pages;
  a.P = P; a.S = S; a.gs_shift = gs_shift;
  a.cum = reinterpret_cast<int64_t*>(wp);
  a.split_base = reinterpret_cast<int64_t*>(wp + cum_bytes);
  int32_t* meta_dev = reinterpret_cast<int32_t*>(wp + cum_bytes + base_bytes);
  a.meta = meta_dev;
  a.capacity = capacity;
  a.part_o = reinterpret_cast<float*>(wp + cum_bytes + base_bytes + meta_bytes);
  a.part_lse = reinterpret_cast<float*>(wp + cum_bytes + base_bytes + meta_bytes + po_bytes);
  a.num_slots = num_slots;
  a.out = out.data();
  a.out_dtype = (int64_t)odt;
  a.lse = static_cast<float*>(lse.data());
  a.B = B; a.Hq = Hq; a.Hkv = Hkv; a.D = D; a.tile = tile;
  a.mode = lean_mode ? ck::kModeLean : ck::kModeSplit;
  a.num_splits = num_splits;
  a.scale = (float)scale;
  a.vec = vec;
  a.grid = (unsigned)grid;
  a.stream = stream;

  // pageable source: the call returns once `meta` is staged, so the vector may go afterwards
  PK_CUDA_CHECK(cudaMemcpyAsync(meta_dev, meta.data(), meta.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
  ck::decode_attention_plan_kernel<<<1, ck::kPlanThreads, 0, stream>>>(
      a.meta, 1, B, Hkv, tile, capacity, num_splits, a.cum, a.split_base);
  PK_CUDA_CHECK(cudaGetLastError());
  switch (fmt_code) {
    case 8: dispatch_epl_gb(cfg.epl, cfg.gb, [&](auto e, auto g) {
      launch_kv<8, decltype(e)::value, decltype(g)::value>(a);
    }); break;
    case 4: dispatch_epl_gb(cfg.epl, cfg.gb, [&](auto e, auto g) {
      launch_kv<4, decltype(e)::value, decltype(g)::value>(a);
    }); break;
    case 2: dispatch_epl_gb(cfg.epl, cfg.gb, [&](auto e, auto g) {
      launch_kv<2, decltype(e)::value, decltype(g)::value>(a);
    }); break;
    default: dispatch_epl_gb(cfg.epl, cfg.gb, [&](auto e, auto g) {
      launch_kv<0, decltype(e)::value, decltype(g)::value>(a);
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
