// CPU launcher for decode attention: validates every shape, stride, dtype and index (again:
// Python checks too, but no input may make the kernel read out of bounds), builds the piece
// list from the shared partition (lean_plan.h), runs the pieces on the thread pool with the GIL
// released, then merges partial states with the shared merge rule (softmax.h).
#include "decode_attention.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "attention_args.h"
#include "attention_cpu.h"
#include "cpu_features.h"
#include "pykernels/lean_plan.h"
#include "pykernels/softmax.h"
#include "thread_pool.h"

namespace pykernels {
namespace cpu {

namespace {

AttendFn attend_fn(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return avx512bf16::attend_piece;
    case Isa::kAvx512: return avx512::attend_piece;
    case Isa::kAvx2: return avx2::attend_piece;
    default: return scalar::attend_piece;
  }
}


void store_vec(void* dst, DType dt, int64_t offset, const float* src, int64_t n) {
  switch (dt) {
    case DType::kFloat32: {
      float* d = static_cast<float*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) d[i] = src[i];
      break;
    }
    case DType::kFloat16: {
      pk_u16* d = static_cast<pk_u16*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) d[i] = float_to_fp16(src[i]);
      break;
    }
    case DType::kBFloat16: {
      pk_u16* d = static_cast<pk_u16*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
      break;
    }
  }
}

float load_elem(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat16: return fp16_to_float(static_cast<const pk_u16*>(p)[i]);
    default: return bf16_to_float(static_cast<const pk_u16*>(p)[i]);
  }
}

}  // namespace

std::vector<float> scaled_q_fp32(const TensorArg& q, DType qdt, double scale, int64_t B, int64_t Hq, int64_t D) {
  std::vector<float> q32(B * Hq * D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t d = 0; d < D; ++d)
        q32[(b * Hq + h) * D + d] = (float)scale * load_elem(q.data(), qdt, b * q.stride(0) + h * q.stride(1) + d * q.stride(2));
  return q32;
}

Schedule build_schedule(const int32_t* seqlens, int64_t B, int64_t Hkv, const std::string& method,
                        int64_t num_splits, int64_t num_workers, int64_t tile) {
  Schedule sc;
  const int64_t nseg = B * Hkv;
  sc.cum.assign(nseg + 1, 0);
  for (int64_t s = 0; s < nseg; ++s) sc.cum[s + 1] = sc.cum[s] + pk_cdiv(seqlens[s / Hkv], tile);
  const int64_t total = sc.cum[nseg];
  sc.tile = tile;
  if (method == "lean") {
    const int64_t W = std::max<int64_t>(1, std::min(num_workers, total));
    sc.num_workers = W;
    sc.num_slots = 2 * W;
    sc.worker_begin.resize(W + 1);
    for (int64_t w = 0; w <= W; ++w) sc.worker_begin[w] = lean_begin(total, w, W);
    for (int64_t w = 0; w < W; ++w) {
      const int64_t gb = sc.worker_begin[w], ge = sc.worker_begin[w + 1];
      sc.task_begin.push_back((int64_t)sc.pieces.size());
      for (int64_t g = gb; g < ge;) {
        const int64_t s = lean_segment(sc.cum.data(), nseg, g);
        const int64_t se = std::min(ge, sc.cum[s + 1]);
        const int64_t b = s / Hkv, L = seqlens[b];
        const bool whole = (g == sc.cum[s] && se == sc.cum[s + 1]);
        Piece p{b, s % Hkv, (g - sc.cum[s]) * tile, std::min(L, (se - sc.cum[s]) * tile),
                whole ? -1 : lean_partial_slot(w, gb, sc.cum[s])};
        sc.pieces.push_back(p);
        g = se;
      }
    }
    sc.task_begin.push_back((int64_t)sc.pieces.size());
    for (int64_t s = 0; s < nseg; ++s) {
      if (sc.cum[s + 1] == sc.cum[s]) continue;
      const int64_t w0 = lean_owner(total, sc.cum[s], W), w1 = lean_owner(total, sc.cum[s + 1] - 1, W);
      if (w0 == w1) continue;  // whole in one worker
      Reduction r{s / Hkv, s % Hkv, {}};
      for (int64_t w = w0; w <= w1; ++w) r.slots.push_back(lean_partial_slot(w, sc.worker_begin[w], sc.cum[s]));
      sc.reductions.push_back(std::move(r));
    }
  } else {  // split
    const int64_t S = std::max<int64_t>(1, num_splits);
    sc.num_workers = num_workers;
    for (int64_t s = 0; s < nseg; ++s) {
      const int64_t n = sc.cum[s + 1] - sc.cum[s];
      const int64_t Se = std::min(S, n);
      const int64_t b = s / Hkv, L = seqlens[b];
      Reduction r{b, s % Hkv, {}};
      for (int64_t c = 0; c < Se; ++c) {
        const int64_t tb = split_chunk_begin(n, c, Se), te = split_chunk_begin(n, c + 1, Se);
        const int64_t slot = Se == 1 ? -1 : sc.num_slots++;
        sc.pieces.push_back(Piece{b, s % Hkv, tb * tile, std::min(L, te * tile), slot});
        if (slot >= 0) r.slots.push_back(slot);
      }
      if (Se > 1) sc.reductions.push_back(std::move(r));
    }
    // One task per piece, claimed dynamically by the pool's threads.
    for (int64_t i = 0; i <= (int64_t)sc.pieces.size(); ++i) sc.task_begin.push_back(i);
  }
  return sc;
}

void decode_attention(py::object q_o, py::object k_o, py::object v_o, py::object seqlens_o,
                      py::object block_table_o, py::object out_o, py::object lse_o, double scale,
                      const std::string& method, int64_t num_splits, int64_t num_workers, int64_t tile) {
  TensorArg q("q", q_o), k("k_cache", k_o), v("v_cache", v_o), sl("seqlens", seqlens_o);
  TensorArg out("out", out_o), lse("lse", lse_o);
  const bool paged = !block_table_o.is_none();
  std::unique_ptr<TensorArg> bt;
  if (paged) bt.reset(new TensorArg("block_table", block_table_o));

  for (TensorArg* t : {&q, &k, &v, &sl, &out, &lse})
    if (t->device_type() != kDLCPU && t->device_type() != kDLCUDAHost)
      throw py::value_error(t->name + ": the CPU backend needs CPU tensors");
  if (bt && bt->device_type() != kDLCPU && bt->device_type() != kDLCUDAHost)
    throw py::value_error("block_table: the CPU backend needs CPU tensors");
  const AttnShape a = check_attention_args(q, k, v, sl, out, lse, bt.get(), method, num_splits, num_workers, tile, scale);
  const int64_t B = a.B, Hq = a.Hq, D = a.D, Hkv = a.Hkv;
  const DType qdt = a.q_dtype, kdt = a.kv_dtype, odt = a.out_dtype;
  const int32_t* bt_ptr = paged ? static_cast<const int32_t*>(bt->data()) : nullptr;
  std::vector<int32_t> lens(B);
  check_lengths_and_blocks(a, static_cast<const int32_t*>(sl.data()), sl.stride(0), bt_ptr, lens.data());

  AttnParams prm;
  prm.k = k.data();
  prm.v = v.data();
  prm.kv_dtype = kdt;
  for (int i = 0; i < 3; ++i) { prm.k_stride[i] = k.stride(i); prm.v_stride[i] = v.stride(i); }
  prm.block_table = bt_ptr;
  prm.bt_stride = a.bt_stride;
  prm.block_size = a.block_size;
  prm.Hq = Hq; prm.Hkv = Hkv; prm.D = D; prm.G = Hq / Hkv;
  const int64_t G = prm.G;

  py::gil_scoped_release nogil;
  const std::vector<float> q32 = scaled_q_fp32(q, qdt, scale, B, Hq, D);
  prm.q = q32.data();
  prm.scale = (float)scale;
  const Isa isa = active_isa();  // read once: the kernel and its q layout must agree
  // bf16 q is exact in bf16: the AVX512-BF16 kernels take it as is (dot products, then scale).
  std::vector<bf16_t> qb;
  prm.q_bf16 = nullptr;
  if (qdt == DType::kBFloat16 && isa == Isa::kAvx512Bf16) {
    qb.resize(B * Hq * D);
    const pk_u16* src = static_cast<const pk_u16*>(q.data());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t d = 0; d < D; ++d) qb[(b * Hq + h) * D + d].bits = src[b * q.stride(0) + h * q.stride(1) + d * q.stride(2)];
    prm.q_bf16 = qb.data();
  }

  Schedule sc = build_schedule(lens.data(), B, Hkv, method, num_splits, num_workers, tile);
  const AttendFn attend = attend_fn(isa);
  run_schedule(sc, Hq, G, D, kMaxGroupHeads, attend_workspace_floats(kMaxGroupHeads * G, D), out.data(), odt,
               static_cast<float*>(lse.data()),
               [&](const Piece& p, int64_t nh, float* o, float* l, float* w) { attend(prm, p, nh, o, l, w); });
}

void run_schedule(const Schedule& sc, int64_t Hq, int64_t G, int64_t D, int64_t max_heads, int64_t work_floats,
                  void* outp, DType odt, float* lsep, const PieceFn& attend) {
  const int nthr = parallel_threads();
  // Per thread: o [max_heads * G, D], lse [max_heads * G], kernel scratch.
  const int64_t rows = max_heads * G;
  const int64_t per_thr = rows * D + rows + work_floats;
  std::vector<float> work((size_t)nthr * per_thr);
  std::vector<float> part_o((size_t)sc.num_slots * G * D), part_lse((size_t)sc.num_slots * G);

  parallel_run((int64_t)sc.task_begin.size() - 1, nthr, [&](int64_t task, int thr) {
    float* o = work.data() + (size_t)thr * per_thr;
    float* l = o + rows * D;
    float* w = l + rows;
    const int64_t end = sc.task_begin[task + 1];
    for (int64_t i = sc.task_begin[task]; i < end;) {
      const Piece& p = sc.pieces[i];
      if (p.slot >= 0) {
        attend(p, 1, part_o.data() + p.slot * G * D, part_lse.data() + p.slot * G, w);
        ++i;
        continue;
      }
      // Whole segments of consecutive kv-heads of one sequence run as one group.
      int64_t nh = 1;
      while (nh < max_heads && i + nh < end) {
        const Piece& n = sc.pieces[i + nh];
        if (n.slot >= 0 || n.b != p.b || n.h != p.h + nh || n.t0 != p.t0 || n.t1 != p.t1) break;
        ++nh;
      }
      attend(p, nh, o, l, w);
      const int64_t row = p.b * Hq + p.h * G;
      store_vec(outp, odt, row * D, o, nh * G * D);
      for (int64_t r = 0; r < nh * G; ++r) lsep[row + r] = l[r];
      i += nh;
    }
  });
  // Merge the partial states of segments that were cut (few: at most 2W for lean).
  parallel_run((int64_t)sc.reductions.size(), nthr, [&](int64_t ri, int thr) {
    const Reduction& r = sc.reductions[ri];
    float* o = work.data() + (size_t)thr * per_thr;
    const int64_t row = r.b * Hq + r.h * G;
    for (int64_t g = 0; g < G; ++g) {
      float acc_lse = PK_NEG_INF;
      float* og = o + g * D;
      for (int64_t d = 0; d < D; ++d) og[d] = 0.f;
      for (int64_t slot : r.slots) {
        float wa, wb;
        const float* src = part_o.data() + (slot * G + g) * D;
        acc_lse = merge_lse(acc_lse, part_lse[slot * G + g], &wa, &wb);
        for (int64_t d = 0; d < D; ++d) og[d] = wa * og[d] + wb * src[d];
      }
      lsep[row + g] = acc_lse;
    }
    store_vec(outp, odt, row * D, o, G * D);
  });
}

}  // namespace cpu
}  // namespace pykernels
