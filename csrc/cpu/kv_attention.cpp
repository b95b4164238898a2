// CPU launcher for decode attention over a quantized KV cache (pykernels/kv_format.py).
// Validates every shape, stride, dtype, count and block id (Python checks too, but no input may
// make the kernel read out of bounds; errors name the argument), builds the lean / split
// schedule over L = n_sink + n_quant + n_res tokens per sequence (decode_attention.cpp), runs the
// per-ISA kernel (kv_attention_kernel.h) on the thread pool with the GIL released and merges
// the partial states (run_schedule).
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "attention_args.h"
#include "cpu_features.h"
#include "decode_attention.h"
#include "kv_attention.h"
#include "tensor_arg.h"

namespace pykernels {
namespace cpu {

namespace {

KvAttendFn kv_attend_fn(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return kv_avx512bf16::kv_attend_piece;
    case Isa::kAvx512: return kv_avx512::kv_attend_piece;
    case Isa::kAvx2: return kv_avx2::kv_attend_piece;
    default: return kv_scalar::kv_attend_piece;
  }
}

bool is_uint8(const TensorArg& t) { return t.t->dtype.code == kDLUInt && t.t->dtype.bits == 8 && t.t->dtype.lanes == 1; }
bool is_float16(const TensorArg& t) { return t.t->dtype.code == kDLFloat && t.t->dtype.bits == 16 && t.t->dtype.lanes == 1; }

void require_cpu(const TensorArg& t) {
  if (t.device_type() != kDLCPU && t.device_type() != kDLCUDAHost)
    throw py::value_error(t.name + ": the CPU backend needs CPU tensors");
}

// Exact shape, and the last `inner` dims compact (rows of a page contiguous).
void require_shape(const TensorArg& t, const std::vector<int64_t>& shape, int inner, const char* what) {
  bool ok = t.ndim() == (int)shape.size();
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = t.size((int)i) == shape[i];
  if (!ok) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + pk_str(shape[i]);
    throw py::value_error(t.name + ": expected shape " + s + "] (" + what + "), got " + t.shape_str());
  }
  int64_t st = 1;
  for (int i = t.ndim() - 1; i >= t.ndim() - inner; --i) {
    if (t.size(i) > 1 && t.stride(i) != st)
      throw py::value_error(t.name + ": the last " + pk_str(inner) + " dimensions must be contiguous, got strides of " +
                            t.shape_str());
    st *= t.size(i);
  }
}

}  // namespace

void decode_attention_kv(py::object q_o, py::object kc_o, py::object ks_o, py::object kz_o, py::object vc_o,
                         py::object vs_o, py::object vz_o, py::object fk_o, py::object fv_o, py::object bt_o,
                         py::object ns_o, py::object nq_o, py::object nr_o, py::object out_o, py::object lse_o,
                         double scale, const std::string& fmt_s, int64_t gs, const std::string& method,
                         int64_t num_splits, int64_t num_workers, int64_t tile) {
  // Scalar options first.
  const KvFormat fmt = parse_kv_format(fmt_s, gs);
  const bool fp8 = fmt == KvFormat::kFp8;
  check_schedule_options(method, num_splits, num_workers, tile, scale);
  if (fp8) {
    if (!kz_o.is_none()) throw py::value_error("k_zero: must be None for fmt 'fp8'");
    if (!vz_o.is_none()) throw py::value_error("v_zero: must be None for fmt 'fp8'");
  } else {
    if (kz_o.is_none()) throw py::value_error("k_zero: required for fmt '" + fmt_s + "', got None");
    if (vz_o.is_none()) throw py::value_error("v_zero: required for fmt '" + fmt_s + "', got None");
  }
  if (bt_o.is_none()) throw py::value_error("block_table: required (int32 [B, max_pages]), got None");

  TensorArg q("q", q_o), kc("k_codes", kc_o), ks("k_scale", ks_o), vc("v_codes", vc_o), vs("v_scale", vs_o);
  TensorArg fk("fp_k", fk_o), fv("fp_v", fv_o), bt("block_table", bt_o);
  TensorArg nsa("n_sink", ns_o), nqa("n_quant", nq_o), nra("n_res", nr_o), out("out", out_o), lse("lse", lse_o);
  std::unique_ptr<TensorArg> kz, vz;
  if (!fp8) { kz.reset(new TensorArg("k_zero", kz_o)); vz.reset(new TensorArg("v_zero", vz_o)); }
  for (const TensorArg* t : {&q, &kc, &ks, &vc, &vs, &fk, &fv, &bt, &nsa, &nqa, &nra, &out, &lse}) require_cpu(*t);
  if (kz) { require_cpu(*kz); require_cpu(*vz); }

  // q, out, lse.
  q.require_ndim(3);
  const DType qdt = q.float_dtype();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  if (D < 8 || D % 8 != 0 || D > 512)
    throw py::value_error("q: head_dim must be a multiple of 8 in [8, 512], got " + pk_str(D));
  if (B < 1 || Hq < 1) throw py::value_error("q: batch and num_heads must be >= 1, got shape " + q.shape_str());
  out.require_ndim(3);
  out.require_contiguous();
  if (out.size(0) != B || out.size(1) != Hq || out.size(2) != D)
    throw py::value_error("out: expected shape [B, Hq, D] = [" + pk_str(B) + ", " + pk_str(Hq) + ", " + pk_str(D) +
                          "], got " + out.shape_str());
  const DType odt = out.float_dtype();
  lse.require_ndim(2);
  lse.require_contiguous();
  if (!lse.is_float32() || lse.size(0) != B || lse.size(1) != Hq)
    throw py::value_error("lse: expected float32 [B, Hq], got " + lse.dtype_str() + " " + lse.shape_str());

  // Quantized store.
  const int bits = kv_bits(fmt);
  const int64_t RB = kv_row_bytes(fmt, D), NG = pk_cdiv(D, gs);
  kc.require_ndim(4);
  if (!is_uint8(kc)) throw py::type_error("k_codes: expected uint8, got " + kc.dtype_str());
  const int64_t P = kc.size(0), Hkv = kc.size(1), S = kc.size(2);
  if (Hkv < 1 || Hq % Hkv != 0)
    throw py::value_error("k_codes: num_kv_heads " + pk_str(Hkv) + " does not divide q num_heads " + pk_str(Hq));
  if (S < 1 || S % gs != 0)
    throw py::value_error("k_codes: page_tokens (dim 2) must be a positive multiple of group_size " + pk_str(gs) +
                          ", got " + pk_str(S));
  require_shape(kc, {P, Hkv, S, RB}, 2, "[P, Hkv, S, D * bits / 8]");
  if (!is_uint8(vc)) throw py::type_error("v_codes: expected uint8, got " + vc.dtype_str());
  require_shape(vc, {P, Hkv, S, RB}, 2, "the shape of k_codes");
  if (fp8) {
    if (!ks.is_float32()) throw py::type_error("k_scale: expected float32 for fmt 'fp8', got " + ks.dtype_str());
    if (!vs.is_float32()) throw py::type_error("v_scale: expected float32 for fmt 'fp8', got " + vs.dtype_str());
    require_shape(ks, {P, Hkv, S / gs}, 1, "[P, Hkv, S / group_size]");
    require_shape(vs, {P, Hkv, S / gs}, 1, "[P, Hkv, S / group_size]");
  } else {
    for (const TensorArg* t : {&ks, kz.get(), &vs, vz.get()})
      if (!is_float16(*t)) throw py::type_error(t->name + ": expected float16, got " + t->dtype_str());
    require_shape(ks, {P, Hkv, S / gs, D}, 2, "[P, Hkv, S / group_size, D]");
    require_shape(*kz, {P, Hkv, S / gs, D}, 2, "[P, Hkv, S / group_size, D]");
    require_shape(vs, {P, Hkv, S, NG}, 2, "[P, Hkv, S, ceil(D / group_size)]");
    require_shape(*vz, {P, Hkv, S, NG}, 2, "[P, Hkv, S, ceil(D / group_size)]");
  }

  // Full-precision rows.
  fk.require_ndim(4);
  const DType fdt = fk.float_dtype();
  const int64_t F = fk.size(1);
  if (fk.size(0) != B || fk.size(2) != Hkv || fk.size(3) != D)
    throw py::value_error("fp_k: expected shape [B, F, Hkv, D] = [" + pk_str(B) + ", F, " + pk_str(Hkv) + ", " +
                          pk_str(D) + "], got " + fk.shape_str());
  fv.require_ndim(4);
  if (fv.float_dtype() != fdt) throw py::type_error("fp_v: dtype " + fv.dtype_str() + " differs from fp_k dtype " + fk.dtype_str());
  for (int i = 0; i < 4; ++i)
    if (fv.size(i) != fk.size(i)) throw py::value_error("fp_v: shape " + fv.shape_str() + " differs from fp_k shape " + fk.shape_str());
  fk.require_last_contiguous();
  fv.require_last_contiguous();

  // Block table and counts.
  bt.require_ndim(2);
  if (!bt.is_int32() || bt.size(0) != B)
    throw py::value_error("block_table: expected int32 [" + pk_str(B) + ", max_pages], got " + bt.dtype_str() + " " +
                          bt.shape_str());
  if (bt.size(1) > 1 && bt.stride(1) != 1) throw py::value_error("block_table: last dimension must have stride 1");
  const int64_t max_pages = bt.size(1);
  const int32_t* btp = static_cast<const int32_t*>(bt.data());
  std::vector<int32_t> v_ns(B), v_nq(B), v_nr(B), lens(B);
  struct Count { TensorArg* t; int32_t* dst; };
  const Count counts[3] = {{&nsa, v_ns.data()}, {&nqa, v_nq.data()}, {&nra, v_nr.data()}};
  for (const Count& c : counts) {
    c.t->require_ndim(1);
    if (!c.t->is_int32() || c.t->size(0) != B)
      throw py::value_error(c.t->name + ": expected int32 [" + pk_str(B) + "], got " + c.t->dtype_str() + " " +
                            c.t->shape_str());
    const int32_t* p = static_cast<const int32_t*>(c.t->data());
    for (int64_t b = 0; b < B; ++b) {
      c.dst[b] = p[b * c.t->stride(0)];
      if (c.dst[b] < 0)
        throw py::value_error(c.t->name + ": " + c.t->name + "[" + pk_str(b) + "] = " + pk_str(c.dst[b]) + " is negative");
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    const std::string at = "[" + pk_str(b) + "] = ";
    if (v_nq[b] % gs != 0)
      throw py::value_error("n_quant: n_quant" + at + pk_str(v_nq[b]) + " is not a multiple of group_size " + pk_str(gs));
    if (v_nq[b] > max_pages * S)
      throw py::value_error("n_quant: n_quant" + at + pk_str(v_nq[b]) + " exceeds the store capacity max_pages * S = " +
                            pk_str(max_pages * S));
    if ((int64_t)v_ns[b] + v_nr[b] > F)
      throw py::value_error("n_res: n_sink + n_res = " + pk_str((int64_t)v_ns[b] + v_nr[b]) + " for sequence " +
                            pk_str(b) + " exceeds the fp rows F = " + pk_str(F));
    const int64_t L = (int64_t)v_ns[b] + v_nq[b] + v_nr[b];
    if (L < 1) throw py::value_error("n_quant: sequence " + pk_str(b) + " has no tokens (n_sink + n_quant + n_res = 0)");
    if (L > std::numeric_limits<int32_t>::max()) throw py::value_error("n_quant: sequence " + pk_str(b) + " is too long");
    lens[b] = (int32_t)L;
    for (int64_t j = 0; j < v_nq[b] / S + (v_nq[b] % S ? 1 : 0); ++j) {
      const int32_t id = btp[b * bt.stride(0) + j];
      if (id < 0 || id >= P)
        throw py::value_error("block_table: block_table[" + pk_str(b) + ", " + pk_str(j) + "] = " + pk_str(id) +
                              " is outside [0, " + pk_str(P) + ")");
    }
  }

  KvParams prm;
  prm.Hq = Hq; prm.Hkv = Hkv; prm.D = D; prm.G = Hq / Hkv;
  prm.fmt = fmt; prm.bits = bits; prm.gs = gs; prm.S = S; prm.NG = NG; prm.RB = RB;
  prm.kc = static_cast<const unsigned char*>(kc.data());
  prm.vc = static_cast<const unsigned char*>(vc.data());
  for (int i = 0; i < 2; ++i) { prm.kc_st[i] = kc.stride(i); prm.vc_st[i] = vc.stride(i); }
  prm.ks = ks.data(); prm.vs = vs.data();
  prm.kz = kz ? kz->data() : nullptr; prm.vz = vz ? vz->data() : nullptr;
  for (int i = 0; i < 2; ++i) {
    prm.ks_st[i] = ks.stride(i); prm.vs_st[i] = vs.stride(i);
    prm.kz_st[i] = kz ? kz->stride(i) : 0; prm.vz_st[i] = vz ? vz->stride(i) : 0;
  }
  prm.fk = fk.data(); prm.fv = fv.data(); prm.fp_dtype = fdt;
  for (int i = 0; i < 3; ++i) { prm.fk_st[i] = fk.stride(i); prm.fv_st[i] = fv.stride(i); }
  prm.block_table = btp;
  prm.bt_stride = bt.stride(0);
  prm.n_sink = v_ns.data();
  prm.n_quant = v_nq.data();
  const int64_t G = prm.G;

  py::gil_scoped_release nogil;
  const std::vector<float> q32 = scaled_q_fp32(q, qdt, scale, B, Hq, D);
  prm.q = q32.data();

  const KvAttendFn attend = kv_attend_fn(active_isa());
  Schedule sc = build_schedule(lens.data(), B, Hkv, method, num_splits, num_workers, tile);
  run_schedule(sc, Hq, G, D, 1, kv_workspace_floats(G, D, fp8 ? 1 : NG), out.data(), odt, static_cast<float*>(lse.data()),
               [&](const Piece& p, int64_t, float* o, float* l, float* w) { attend(prm, p, o, l, w); });
}

}  // namespace cpu
}  // namespace pykernels
