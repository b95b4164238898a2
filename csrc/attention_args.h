// Argument checks shared by the CPU and CUDA decode-attention launchers (host code only).
// Every shape, stride, dtype and index is checked here so no input can make a kernel read out
// of bounds; errors name the argument (ValueError / TypeError in Python).
#pragma once
#include <cmath>
#include <cstdint>
#include <string>

#include "pykernels/kv_quant.h"
#include "tensor_arg.h"

namespace pykernels {

struct AttnShape {
  int64_t B = 0, Hq = 0, D = 0, Hkv = 0;
  DType q_dtype = DType::kFloat32, kv_dtype = DType::kFloat32, out_dtype = DType::kFloat32;
  bool paged = false;
  int64_t capacity = 0, block_size = 0, bt_stride = 0, num_blocks = 0;
};

inline std::string pk_str(int64_t v) { return std::to_string(v); }

// Scalar options of a lean / split launch (decode attention on a tensor or a quantized cache).
inline void check_schedule_options(const std::string& method, int64_t num_splits, int64_t num_workers, int64_t tile,
                                   double scale) {
  if (method != "lean" && method != "split")
    throw py::value_error("method: expected 'lean' or 'split', got '" + method + "'");
  if (tile < 1) throw py::value_error("tile: expected >= 1, got " + pk_str(tile));
  if (num_workers < 1) throw py::value_error("num_workers: expected >= 1, got " + pk_str(num_workers));
  if (num_splits < 1) throw py::value_error("num_splits: expected >= 1, got " + pk_str(num_splits));
  if (!std::isfinite(scale)) throw py::value_error("scale: must be finite");
}

// fmt and group_size of a quantized-KV launch (pykernels/kv_format.py).
inline KvFormat parse_kv_format(const std::string& fmt, int64_t group_size) {
  KvFormat f;
  if (fmt == "int8") f = KvFormat::kInt8;
  else if (fmt == "int4") f = KvFormat::kInt4;
  else if (fmt == "int2") f = KvFormat::kInt2;
  else if (fmt == "fp8") f = KvFormat::kFp8;
  else throw py::value_error("fmt: expected 'int8', 'int4', 'int2' or 'fp8', got '" + fmt + "'");
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw py::value_error("group_size: expected one of (32, 64, 128), got " + pk_str(group_size));
  return f;
}

// Shapes, dtypes, strides and scalar options. `bt` is null for a dense cache.
inline AttnShape check_attention_args(const TensorArg& q, const TensorArg& k, const TensorArg& v, const TensorArg& sl,
                                      const TensorArg& out, const TensorArg& lse, const TensorArg* bt,
                                      const std::string& method, int64_t num_splits, int64_t num_workers,
                                      int64_t tile, double scale) {
  check_schedule_options(method, num_splits, num_workers, tile, scale);

  q.require_ndim(3);
  k.require_ndim(4);
  v.require_ndim(4);
  sl.require_ndim(1);
  AttnShape a;
  a.B = q.size(0); a.Hq = q.size(1); a.D = q.size(2); a.Hkv = k.size(2);
  a.q_dtype = q.float_dtype();
  a.kv_dtype = k.float_dtype();
  if (v.float_dtype() != a.kv_dtype)
    throw py::type_error("v_cache: dtype " + v.dtype_str() + " differs from k_cache dtype " + k.dtype_str());
  for (int i = 0; i < 4; ++i)
    if (k.size(i) != v.size(i))
      throw py::value_error("v_cache: shape " + v.shape_str() + " differs from k_cache shape " + k.shape_str());
  if (k.size(3) != a.D) throw py::value_error("k_cache: head_dim " + pk_str(k.size(3)) + " differs from q head_dim " + pk_str(a.D));
  if (a.Hkv < 1 || a.Hq % a.Hkv != 0)
    throw py::value_error("q: num_heads " + pk_str(a.Hq) + " is not a multiple of k_cache num_kv_heads " + pk_str(a.Hkv));
  if (a.D < 1) throw py::value_error("q: head_dim must be >= 1");
  k.require_last_contiguous();
  v.require_last_contiguous();
  if (!sl.is_int32() || sl.size(0) != a.B)
    throw py::value_error("seqlens: expected int32 [" + pk_str(a.B) + "], got " + sl.dtype_str() + " " + sl.shape_str());
  out.require_ndim(3);
  out.require_contiguous();
  if (out.size(0) != a.B || out.size(1) != a.Hq || out.size(2) != a.D)
    throw py::value_error("out: expected shape [B, Hq, D], got " + out.shape_str());
  a.out_dtype = out.float_dtype();
  lse.require_ndim(2);
  lse.require_contiguous();
  if (!lse.is_float32() || lse.size(0) != a.B || lse.size(1) != a.Hq)
    throw py::value_error("lse: expected float32 [B, Hq], got " + lse.dtype_str() + " " + lse.shape_str());

  a.paged = bt != nullptr;
  a.num_blocks = k.size(0);
  if (a.paged) {
    bt->require_ndim(2);
    if (!bt->is_int32() || bt->size(0) != a.B)
      throw py::value_error("block_table: expected int32 [" + pk_str(a.B) + ", max_blocks], got " + bt->dtype_str() + " " + bt->shape_str());
    a.block_size = k.size(1);
    if (a.block_size < 1) throw py::value_error("k_cache: block_size must be >= 1");
    a.capacity = bt->size(1) * a.block_size;
    a.bt_stride = bt->stride(0);
    if (bt->size(1) > 1 && bt->stride(1) != 1) throw py::value_error("block_table: last dimension must have stride 1");
  } else {
    if (k.size(0) != a.B) throw py::value_error("k_cache: batch " + pk_str(k.size(0)) + " differs from q batch " + pk_str(a.B));
    a.capacity = k.size(1);
  }
  return a;
}

// Range checks of the values (host memory): seqlens[b] in [1, capacity] and, for a paged cache,
// every block id a sequence uses in [0, num_blocks). Fills lens [B].
inline void check_lengths_and_blocks(const AttnShape& a, const int32_t* sl, int64_t sl_stride, const int32_t* bt,
                                     int32_t* lens) {
  for (int64_t b = 0; b < a.B; ++b) {
    lens[b] = sl[b * sl_stride];
    if (lens[b] < 1 || lens[b] > a.capacity)
      throw py::value_error("seqlens: seqlens[" + pk_str(b) + "] = " + pk_str(lens[b]) + " is outside [1, " +
                            pk_str(a.capacity) + "] (cache capacity)");
    if (a.paged) {
      const int64_t nblk = pk_cdiv(lens[b], a.block_size);
      for (int64_t j = 0; j < nblk; ++j) {
        const int32_t id = bt[b * a.bt_stride + j];
        if (id < 0 || id >= a.num_blocks)
          throw py::value_error("block_table: block_table[" + pk_str(b) + ", " + pk_str(j) + "] = " + pk_str(id) +
                                " is outside [0, " + pk_str(a.num_blocks) + ")");
      }
    }
  }
}

}  // namespace pykernels
