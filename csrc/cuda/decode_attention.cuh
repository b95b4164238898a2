// Decode-attention CUDA kernels: split-KV (flash-decoding) and lean (stream-K), plus the
// per-segment reduction of partial states and the tiny planning (prefix-sum) kernel.
//
// NVRTC-clean: only the framework-free pykernels headers are included, no host-only standard
// headers, so the same text is compiled by nvcc (pykernels._cuda) and by NVRTC (cupy JIT path,
// and the CPU-only CI check). Kernel arguments are flat scalars and pointers (8-byte integers,
// one fp32 scale) so cupy can pass them without a struct layout contract.
//
// Work decomposition (identical to the CPU kernels; lean_plan.h is the shared partition):
//   segment s = b * Hkv + h, cum[s] = exclusive prefix sum of ceil(seqlen_b / tile) tiles.
//   split: CTA x = s * num_splits + c attends chunk c of segment s; one chunk -> final output,
//          several -> partial slot split_base[s] + c (the CPU numbering: segments in order).
//   lean:  CTA w of W attends global tiles [lean_begin(w), lean_begin(w + 1)); a segment it
//          covers completely is written as final output, a cut one into partial slot
//          lean_partial_slot(w, begin, cum[s]) (2w or 2w + 1).
//   reduce: one CTA per cut segment merges its partials with merge_lse (a separate launch: no
//          inter-CTA waiting, so any grid size is safe).
//
// Inside a CTA: 4 warps take turns over tokens (U consecutive tokens per warp step), the 32
// lanes of a warp hold EPL consecutive elements of D each, and the GB query heads of one kv-head
// share every K/V row loaded (GQA: each KV byte is read once for all its query heads). With
// G > 8 the heads are taken in passes of 8 and each pass re-reads the piece's K/V.
// Per warp step: U tokens' K and V slices are loaded together (memory-level parallelism), the
// U * GB partial dot products are summed across lanes by a reduce-scatter (lane j ends up with
// score j), each lane does the online-softmax update for its own (token, head) score, and the
// probabilities go through shared memory to all lanes for the P.V accumulation.
#pragma once

#include "pykernels/common.h"
#include "pykernels/lean_plan.h"
#include "pykernels/softmax.h"

namespace pykernels {
namespace cuda_kernels {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kPlanThreads = 256;
constexpr int kMaxHeadDim = 256;
constexpr int kModeSplit = 0;
constexpr int kModeLean = 1;
constexpr unsigned kFullMask = 0xffffffffu;

// The plan and reduce kernels are not templates: in an nvcc build each launcher translation
// unit that includes this header (decode_attention.cu, kv_attention.cu) gets its own copy
// (internal linkage) instead of a duplicate symbol; NVRTC sees ordinary kernels.
#if defined(__CUDACC_RTC__)
#define PK_SHARED_KERNEL __global__
#else
#define PK_SHARED_KERNEL static __global__
#endif

// Tokens per warp step: U * GB <= 32 scores (one per lane after the reduction) and at most 32
// K plus 32 V values per lane held in registers.
template <int EPL, int GB>
struct StepShape {
  static constexpr int U0 = 32 / GB < 8 ? 32 / GB : 8;
  static constexpr int U = U0 < 32 / EPL ? U0 : 32 / EPL;
  static constexpr int J = U * GB;  // live values per warp step, J <= 32 and a power of two
};

// ---- element loads (device) ---------------------------------------------------------------
// Same values as Cvt<T>::load in common.h; fp16 uses the exact hardware conversion on device.
__device__ __forceinline__ float dev_f16_to_float(pk_u32 h) {
#if defined(__CUDA_ARCH__)
  float f;
  unsigned short hs = (unsigned short)h;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(hs));
  return f;
#else
  return fp16_to_float((pk_u16)h);
#endif
}

template <typename T> struct Elem;
template <> struct Elem<float> {
  static constexpr int kPerWord = 1;
  __device__ __forceinline__ static void unpack(pk_u32 w, float* x) { x[0] = __uint_as_float(w); }
  __device__ __forceinline__ static float scalar(const float* p) { return *p; }
};
template <> struct Elem<bf16_t> {
  static constexpr int kPerWord = 2;
  __device__ __forceinline__ static void unpack(pk_u32 w, float* x) {
    x[0] = __uint_as_float(w << 16);
    x[1] = __uint_as_float(w & 0xffff0000u);
  }
  __device__ __forceinline__ static float scalar(const bf16_t* p) { return __uint_as_float(((pk_u32)p->bits) << 16); }
};
template <> struct Elem<fp16_t> {
  static constexpr int kPerWord = 2;
  __device__ __forceinline__ static void unpack(pk_u32 w, float* x) {
    x[0] = dev_f16_to_float(w & 0xffffu);
    x[1] = dev_f16_to_float(w >> 16);
  }
  __device__ __forceinline__ static float scalar(const fp16_t* p) { return dev_f16_to_float(p->bits); }
};

// x = row[d0 : d0 + EPL] as fp32, zeros past D. `vec`: the host checked that every row start
// is aligned to EPL elements (and the base to min(16, EPL * sizeof(T)) bytes) and D % EPL == 0,
// so one 4/8/16-byte load per word group is legal; otherwise element loads with bounds checks.
template <typename T, int EPL>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int d0, int D, bool vec, float (&x)[EPL]) {
  if (vec) {
    constexpr int kWords = EPL / Elem<T>::kPerWord;
    if (d0 < D) {
      const pk_u32* p = reinterpret_cast<const pk_u32*>(row + d0);
      pk_u32 w[kWords];
      if constexpr (kWords % 4 == 0) {
#pragma unroll
        for (int i = 0; i < kWords / 4; ++i) {
          const uint4 t = reinterpret_cast<const uint4*>(p)[i];
          w[4 * i] = t.x; w[4 * i + 1] = t.y; w[4 * i + 2] = t.z; w[4 * i + 3] = t.w;
        }
      } else if constexpr (kWords == 2) {
        const uint2 t = *reinterpret_cast<const uint2*>(p);
        w[0] = t.x; w[1] = t.y;
      } else {
        w[0] = *p;
      }
#pragma unroll
      for (int i = 0; i < kWords; ++i) Elem<T>::unpack(w[i], &x[i * Elem<T>::kPerWord]);
    } else {
#pragma unroll
      for (int i = 0; i < EPL; ++i) x[i] = 0.f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < EPL; ++i) x[i] = (d0 + i < D) ? Elem<T>::scalar(row + d0 + i) : 0.f;
  }
}

// q and out may have another dtype than the cache: a runtime code (DType in common.h).
__device__ __forceinline__ float load_any(const void* p, pk_i64 dtype, pk_i64 i) {
  if (dtype == (pk_i64)DType::kFloat32) return static_cast<const float*>(p)[i];
  if (dtype == (pk_i64)DType::kFloat16) return dev_f16_to_float(static_cast<const pk_u16*>(p)[i]);
  return __uint_as_float(((pk_u32) static_cast<const pk_u16*>(p)[i]) << 16);
}
__device__ __forceinline__ void store_any(void* p, pk_i64 dtype, pk_i64 i, float x) {
  if (dtype == (pk_i64)DType::kFloat32) static_cast<float*>(p)[i] = x;
  else if (dtype == (pk_i64)DType::kFloat16) static_cast<pk_u16*>(p)[i] = float_to_fp16(x);
  else static_cast<pk_u16*>(p)[i] = float_to_bf16(x);
}

// Valid length of sequence b: seqlens clamped to [0, capacity] so that no input, however bad,
// makes a kernel read past the cache (the launchers reject such inputs before launching).
__device__ __forceinline__ pk_i64 seq_len(const pk_i32* seqlens, pk_i64 sl_stride, pk_i64 b, pk_i64 capacity) {
  pk_i64 L = seqlens[b * sl_stride];
  return L < 0 ? 0 : (L > capacity ? capacity : L);
}

// ---- warp reduce-scatter ------------------------------------------------------------------
// v[j], j < J, hold per-lane partial dot products. After the call, lane L returns the sum over
// all 32 lanes of value j = L % J. Costs J * log2(32 / J) + J - 1 shuffles (31 for J = 32),
// against 5 * J for a butterfly all-reduce of every value.
template <int J, int O>
struct ReduceScatter {
  __device__ __forceinline__ static void run(float (&v)[J], int lane) {
    if constexpr (O >= J) {
      // upper halves are empty: plain all-reduce across lane bit O
#pragma unroll
      for (int k = 0; k < J; ++k) v[k] += __shfl_xor_sync(kFullMask, v[k], O);
    } else {
      // recursive halving: keep the half selected by lane bit O, send the other half
      const bool upper = (lane & O) != 0;
#pragma unroll
      for (int k = 0; k < O; ++k) {
        const float send = upper ? v[k] : v[k + O];
        const float keep = upper ? v[k + O] : v[k];
        v[k] = keep + __shfl_xor_sync(kFullMask, send, O);
      }
    }
    if constexpr (O > 1) ReduceScatter<J, O / 2>::run(v, lane);
  }
};

// ---- planning kernel ----------------------------------------------------------------------
// One CTA: cum[s] = exclusive prefix of tiles per segment (cum[nseg] = total), and
// split_base[s] = first partial slot of segment s for the split method (-1 when the segment is
// a single chunk), numbered like the CPU schedule.
PK_SHARED_KERNEL void __launch_bounds__(kPlanThreads)
decode_attention_plan_kernel(const pk_i32* __restrict__ seqlens, pk_i64 sl_stride, pk_i64 B, pk_i64 Hkv,
                             pk_i64 tile, pk_i64 capacity, pk_i64 num_splits,
                             pk_i64* __restrict__ cum, pk_i64* __restrict__ split_base) {
  __shared__ pk_i64 tiles_s[kPlanThreads];
  __shared__ pk_i64 slots_s[kPlanThreads];
  const int t = threadIdx.x;
  const pk_i64 nseg = B * Hkv;
  const pk_i64 per = pk_cdiv(nseg, kPlanThreads);
  const pk_i64 s0 = t * per, s1 = (s0 + per < nseg) ? s0 + per : nseg;
  pk_i64 tiles = 0, slots = 0;
  for (pk_i64 s = s0; s < s1; ++s) {
    const pk_i64 n = pk_cdiv(seq_len(seqlens, sl_stride, s / Hkv, capacity), tile);
    const pk_i64 se = n < num_splits ? n : num_splits;
    tiles += n;
    slots += se > 1 ? se : 0;
  }
  tiles_s[t] = tiles;
  slots_s[t] = slots;
  __syncthreads();
  if (t == 0) {  // 256 entries: a serial scan is cheaper than anything clever
    pk_i64 a = 0, c = 0;
    for (int i = 0; i < kPlanThreads; ++i) {
      const pk_i64 ta = tiles_s[i], sc = slots_s[i];
      tiles_s[i] = a;
      slots_s[i] = c;
      a += ta;
      c += sc;
    }
    cum[nseg] = a;
  }
  __syncthreads();
  pk_i64 run = tiles_s[t], srun = slots_s[t];
  for (pk_i64 s = s0; s < s1; ++s) {
    const pk_i64 n = pk_cdiv(seq_len(seqlens, sl_stride, s / Hkv, capacity), tile);
    const pk_i64 se = n < num_splits ? n : num_splits;
    cum[s] = run;
    split_base[s] = se > 1 ? srun : -1;
    run += n;
    srun += se > 1 ? se : 0;
  }
}

// ---- attention kernel ---------------------------------------------------------------------
// The kernel body (decode_attention_body) is shared with the quantized-KV kernel
// (kv_attention.cuh): it owns the schedule (split / lean pieces), the online softmax, the
// cross-warp merge and the output / partial writes; a source type `Src` supplies the K and V
// values of one warp step:
//   void begin(pk_i64 b, pk_i64 h)            called at the start of each piece (segment b, h);
//   unsigned load<U>(b, h, base, t1, lane, kx, vx)
//                                             fills kx[u], vx[u] (this lane's EPL elements of
//                                             token base + u as fp32, zeros when invalid) and
//                                             returns the mask of valid tokens (bit u).
//
// DenseOrPagedSrc: T cache element type (float, fp16_t, bf16_t); dense k/v [B, Lmax, Hkv, D],
// paged k/v [num_blocks, block_size, Hkv, D] with block_table [B, max_blocks] (strides k_s*,
// v_s*; D contiguous).
template <typename T, int EPL>
struct DenseOrPagedSrc {
  const T* __restrict__ k;
  const T* __restrict__ v;
  pk_i64 k_s0, k_s1, k_s2, v_s0, v_s1, v_s2;
  const pk_i32* __restrict__ block_table;
  pk_i64 bt_stride, block_size, num_blocks;
  int Di;
  bool use_vec;

  __device__ __forceinline__ void begin(pk_i64, pk_i64) {}

  template <int U>
  __device__ __forceinline__ unsigned load(pk_i64 b, pk_i64 h, pk_i64 base, pk_i64 t1, int lane,
                                           float (&kx)[U][EPL], float (&vx)[U][EPL]) const {
    const bool paged = block_table != nullptr;
    unsigned valid = 0u;
    pk_i64 blk = 0, off = 0;
    if (paged) { blk = base / block_size; off = base - blk * block_size; }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const pk_i64 tok = base + u;
      bool ok = tok < t1;
      pk_i64 r0 = b, r1 = tok;
      if (paged) {
        if (ok) {
          const pk_i64 id = block_table[b * bt_stride + blk];
          ok = id >= 0 && id < num_blocks;  // the launcher rejects bad ids; never read them
          r0 = id;
          r1 = off;
        }
        if (++off == block_size) { off = 0; ++blk; }
      }
      if (ok) {
        load_chunk<T, EPL>(k + r0 * k_s0 + r1 * k_s1 + h * k_s2, lane * EPL, Di, use_vec, kx[u]);
        load_chunk<T, EPL>(v + r0 * v_s0 + r1 * v_s1 + h * v_s2, lane * EPL, Di, use_vec, vx[u]);
        valid |= 1u << u;
      } else {
#pragma unroll
        for (int i = 0; i < EPL; ++i) { kx[u][i] = 0.f; vx[u][i] = 0.f; }
      }
    }
    return valid;
  }
};

// EPL: elements of D per lane (D <= 32 * EPL); GB: query heads processed together (G is
// covered in ceil(G / GB) passes). q: [B, Hq, D] (strides q_s*); seqlens (stride sl_stride,
// clamped to [0, capacity]) give the tokens per sequence the schedule covers.
// out: [B, Hq, D] contiguous (out_dtype), lse: [B, Hq] fp32 contiguous.
// part_o: [num_slots, G, D] fp32, part_lse: [num_slots, G].
template <int EPL, int GB, class Src>
__device__ __forceinline__ void
decode_attention_body(Src src, const void* __restrict__ q, pk_i64 q_s0, pk_i64 q_s1, pk_i64 q_s2, pk_i64 q_dtype,
                      const pk_i32* __restrict__ seqlens, pk_i64 sl_stride, pk_i64 capacity,
                      const pk_i64* __restrict__ cum, const pk_i64* __restrict__ split_base,
                      void* __restrict__ out, pk_i64 out_dtype, float* __restrict__ lse,
                      float* __restrict__ part_o, float* __restrict__ part_lse, pk_i64 num_slots,
                      pk_i64 B, pk_i64 Hq, pk_i64 Hkv, pk_i64 D, pk_i64 tile,
                      pk_i64 mode, pk_i64 num_splits, float scale) {
  constexpr int DP = 32 * EPL;  // padded head dim held by one warp
  constexpr int U = StepShape<EPL, GB>::U;
  constexpr int J = StepShape<EPL, GB>::J;
  constexpr int PS = 64;        // per-warp row of p_s: J probabilities then GB rescale factors
  static_assert(J <= 32 && J + GB <= PS, "step shape");

  __shared__ __align__(16) float q_s[GB * DP];            // scaled q of the current head group
  __shared__ __align__(16) float o_s[kWarps * GB * DP];   // per-warp unnormalised accumulators
  __shared__ float p_s[kWarps][PS];
  __shared__ float m_s[kWarps][GB], l_s[kWarps][GB], c_s[kWarps][GB], lse_s[GB];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const pk_i64 nseg = B * Hkv, G = Hq / Hkv;
  const int Di = (int)D;
  // This lane's score after the reduce-scatter: token my_u, head my_g of the step.
  const int my_j = lane % J, my_u = my_j / GB;

  // Pieces of this CTA: split -> one chunk of one segment; lean -> the segments met while
  // walking the global tile range [gb, ge). Each piece attends the G heads of segment (b, h)
  // over tokens [t0, t1) and writes final output (slot < 0) or partial slot `slot`.
  const bool split = mode == kModeSplit;
  pk_i64 total = 0, gb = 0, ge = 0;
  if (split) {
    const pk_i64 s = blockIdx.x / num_splits;
    if (s >= nseg) return;
    const pk_i64 n = cum[s + 1] - cum[s];
    if ((pk_i64)(blockIdx.x % num_splits) >= (n < num_splits ? n : num_splits)) return;  // uniform
  } else {
    total = cum[nseg];
    gb = lean_begin(total, blockIdx.x, gridDim.x);
    ge = lean_begin(total, (pk_i64)blockIdx.x + 1, gridDim.x);
  }
  pk_i64 gcur = gb;
  bool done = false;
  while (!done) {
    pk_i64 b, h, t0, t1, slot;
    if (split) {
      const pk_i64 s = blockIdx.x / num_splits, c = blockIdx.x % num_splits;
      const pk_i64 n = cum[s + 1] - cum[s];
      const pk_i64 se = n < num_splits ? n : num_splits;
      const pk_i64 L = seq_len(seqlens, sl_stride, s / Hkv, capacity);
      const pk_i64 tb = split_chunk_begin(n, c, se), te = split_chunk_begin(n, c + 1, se);
      b = s / Hkv;
      h = s % Hkv;
      t0 = tb * tile;
      t1 = te * tile < L ? te * tile : L;
      slot = se == 1 ? (pk_i64)-1 : split_base[s] + c;
      done = true;
    } else {
      if (gcur >= ge) break;
      const pk_i64 s = lean_segment(cum, nseg, gcur);
      const pk_i64 se = ge < cum[s + 1] ? ge : cum[s + 1];
      const pk_i64 L = seq_len(seqlens, sl_stride, s / Hkv, capacity);
      const bool whole = (gcur == cum[s] && se == cum[s + 1]);
      b = s / Hkv;
      h = s % Hkv;
      t0 = (gcur - cum[s]) * tile;
      t1 = (se - cum[s]) * tile < L ? (se - cum[s]) * tile : L;
      slot = whole ? (pk_i64)-1 : lean_partial_slot(blockIdx.x, gb, cum[s]);
      gcur = se;
    }
    src.begin(b, h);
    const bool drop = slot >= num_slots;  // inconsistent plan: never write out of bounds
    for (pk_i64 g0 = 0; g0 < G; g0 += GB) {
      __syncthreads();  // smem of the previous piece / head group is no longer read
      for (int idx = tid; idx < GB * DP; idx += kThreads) {
        const int g = idx / DP, d = idx % DP;
        float x = 0.f;
        if (g0 + g < G && d < Di)
          x = scale * load_any(q, q_dtype, b * q_s0 + (h * G + g0 + g) * q_s1 + d * q_s2);
        q_s[idx] = x;
      }
      __syncthreads();

      float acc[GB][EPL];
#pragma unroll
      for (int g = 0; g < GB; ++g)
#pragma unroll
        for (int i = 0; i < EPL; ++i) acc[g][i] = 0.f;
      float m_run = PK_NEG_INF, l_run = 0.f;  // for head my_j % GB (same in lanes sharing it)

      for (pk_i64 base = t0 + (pk_i64)warp * U; base < t1; base += (pk_i64)kWarps * U) {
        float kx[U][EPL], vx[U][EPL];
        const unsigned valid = src.template load<U>(b, h, base, t1, lane, kx, vx);
        // Partial dot products of this lane's D slice, value j = u * GB + g.
        float sv[J];
#pragma unroll
        for (int g = 0; g < GB; ++g) {
          float qc[EPL];
#pragma unroll
          for (int i = 0; i < EPL; ++i) qc[i] = q_s[g * DP + lane * EPL + i];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            float a = 0.f;
#pragma unroll
            for (int i = 0; i < EPL; ++i) a = fmaf(qc[i], kx[u][i], a);
            sv[u * GB + g] = a;
          }
        }
        ReduceScatter<J, 16>::run(sv, lane);
        const float s = ((valid >> my_u) & 1u) ? sv[0] : PK_NEG_INF;
        // Online softmax for head my_g over the U tokens of the step (lanes j = u*GB + g with
        // the same g differ only in the bits GB .. J/2).
        float mb = s;
#pragma unroll
        for (int o = GB; o < J; o <<= 1) mb = pk_fmaxf(mb, __shfl_xor_sync(kFullMask, mb, o));
        float m_new;
        const float alpha = softmax_rescale(m_run, mb, &m_new);
        const float p = (s == PK_NEG_INF) ? 0.f : pk_exp(s - m_new);
        float ps = p;
#pragma unroll
        for (int o = GB; o < J; o <<= 1) ps += __shfl_xor_sync(kFullMask, ps, o);
        l_run = l_run * alpha + ps;
        m_run = m_new;
        __syncwarp();  // the previous step's p_s reads are done
        if (lane < J) p_s[warp][lane] = p;
        if (lane < GB) p_s[warp][J + lane] = alpha;  // lane < GB holds u = 0, g = lane
        __syncwarp();
#pragma unroll
        for (int g = 0; g < GB; ++g) {
          const float a = p_s[warp][J + g];
#pragma unroll
          for (int i = 0; i < EPL; ++i) acc[g][i] *= a;
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int g = 0; g < GB; ++g) {
            const float pg = p_s[warp][u * GB + g];
#pragma unroll
            for (int i = 0; i < EPL; ++i) acc[g][i] = fmaf(pg, vx[u][i], acc[g][i]);
          }
      }

      // Merge the kWarps partial states with the shared merge rule.
      if (lane < GB) { m_s[warp][lane] = m_run; l_s[warp][lane] = l_run; }
#pragma unroll
      for (int g = 0; g < GB; ++g)
#pragma unroll
        for (int i = 0; i < EPL; ++i) o_s[(warp * GB + g) * DP + lane * EPL + i] = acc[g][i];
      __syncthreads();
      if (tid < GB) {
        float c[kWarps];
        float acc_lse = PK_NEG_INF;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          float wa, wb;
          acc_lse = merge_lse(acc_lse, softmax_lse(m_s[w][tid], l_s[w][tid]), &wa, &wb);
#pragma unroll
          for (int x = 0; x < w; ++x) c[x] *= wa;
          c[w] = wb;
        }
        // o_s holds acc = l * o (unnormalised): fold 1 / l into the weight.
#pragma unroll
        for (int w = 0; w < kWarps; ++w) c_s[w][tid] = l_s[w][tid] > 0.f ? c[w] / l_s[w][tid] : 0.f;
        lse_s[tid] = acc_lse;
      }
      __syncthreads();
      if (!drop) {
        for (int idx = tid; idx < GB * Di; idx += kThreads) {
          const int g = idx / Di, d = idx - g * Di;
          if (g0 + g >= G) continue;
          float o = 0.f;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) o = fmaf(c_s[w][g], o_s[(w * GB + g) * DP + d], o);
          if (slot < 0) store_any(out, out_dtype, (b * Hq + h * G + g0 + g) * D + d, o);
          else part_o[(slot * G + g0 + g) * D + d] = o;
        }
        if (tid < GB && g0 + tid < G) {
          if (slot < 0) lse[b * Hq + h * G + g0 + tid] = lse_s[tid];
          else part_lse[slot * G + g0 + tid] = lse_s[tid];
        }
      }
    }
  }
}

// The plain-cache kernel. q: [B, Hq, D] (strides q_s*), dense k/v: [B, Lmax, Hkv, D], paged k/v: [num_blocks,
// block_size, Hkv, D] with block_table [B, max_blocks] (strides k_s*, v_s*; D contiguous).
// out: [B, Hq, D] contiguous (out_dtype), lse: [B, Hq] fp32 contiguous.
// part_o: [num_slots, G, D] fp32, part_lse: [num_slots, G].
template <typename T, int EPL, int GB>
__global__ void __launch_bounds__(kThreads)
decode_attention_kernel(const void* __restrict__ q, pk_i64 q_s0, pk_i64 q_s1, pk_i64 q_s2, pk_i64 q_dtype,
                        const T* __restrict__ k, const T* __restrict__ v,
                        pk_i64 k_s0, pk_i64 k_s1, pk_i64 k_s2, pk_i64 v_s0, pk_i64 v_s1, pk_i64 v_s2,
                        const pk_i32* __restrict__ seqlens, pk_i64 sl_stride,
                        const pk_i32* __restrict__ block_table, pk_i64 bt_stride, pk_i64 block_size,
                        pk_i64 num_blocks, pk_i64 capacity,
                        const pk_i64* __restrict__ cum, const pk_i64* __restrict__ split_base,
                        void* __restrict__ out, pk_i64 out_dtype, float* __restrict__ lse,
                        float* __restrict__ part_o, float* __restrict__ part_lse, pk_i64 num_slots,
                        pk_i64 B, pk_i64 Hq, pk_i64 Hkv, pk_i64 D, pk_i64 tile,
                        pk_i64 mode, pk_i64 num_splits, float scale, pk_i64 vec) {
  DenseOrPagedSrc<T, EPL> src;
  src.k = k; src.v = v;
  src.k_s0 = k_s0; src.k_s1 = k_s1; src.k_s2 = k_s2; src.v_s0 = v_s0; src.v_s1 = v_s1; src.v_s2 = v_s2;
  src.block_table = block_table; src.bt_stride = bt_stride; src.block_size = block_size;
  src.num_blocks = num_blocks; src.Di = (int)D; src.use_vec = vec != 0;
  decode_attention_body<EPL, GB>(src, q, q_s0, q_s1, q_s2, q_dtype, seqlens, sl_stride, capacity, cum, split_base,
                                 out, out_dtype, lse, part_o, part_lse, num_slots, B, Hq, Hkv, D, tile, mode,
                                 num_splits, scale);
}

// ---- reduction kernel ---------------------------------------------------------------------
// CTA s merges the partial states of segment s if it was cut (lean: written by workers
// lean_owner(cum[s]) .. lean_owner(cum[s+1] - 1); split: its chunks), in token order, with
// merge_lse. Warps over heads, lanes over D.
PK_SHARED_KERNEL void __launch_bounds__(kThreads)
decode_attention_reduce_kernel(const pk_i64* __restrict__ cum, const pk_i64* __restrict__ split_base,
                               const float* __restrict__ part_o, const float* __restrict__ part_lse,
                               pk_i64 num_slots, void* __restrict__ out, pk_i64 out_dtype,
                               float* __restrict__ lse, pk_i64 B, pk_i64 Hq, pk_i64 Hkv, pk_i64 D,
                               pk_i64 mode, pk_i64 num_splits, pk_i64 num_workers) {
  constexpr int R = kMaxHeadDim / 32;
  const pk_i64 nseg = B * Hkv, s = blockIdx.x;
  if (s >= nseg) return;
  const pk_i64 n = cum[s + 1] - cum[s];
  if (n <= 0) return;
  const pk_i64 total = cum[nseg], W = num_workers;
  pk_i64 first = 0, count = 0;  // lean: first worker; split: first slot
  if (mode == kModeLean) {
    first = lean_owner(total, cum[s], W);
    count = lean_owner(total, cum[s + 1] - 1, W) - first + 1;
  } else {
    first = split_base[s];
    count = n < num_splits ? n : num_splits;
  }
  if (count <= 1) return;  // written directly by the attention kernel
  const pk_i64 b = s / Hkv, h = s % Hkv, G = Hq / Hkv;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (pk_i64 g = warp; g < G; g += kWarps) {
    float o[R];
#pragma unroll
    for (int r = 0; r < R; ++r) o[r] = 0.f;
    float acc_lse = PK_NEG_INF;
    for (pk_i64 i = 0; i < count; ++i) {
      const pk_i64 slot = mode == kModeLean
          ? lean_partial_slot(first + i, lean_begin(total, first + i, W), cum[s]) : first + i;
      if (slot < 0 || slot >= num_slots) continue;
      float wa, wb;
      acc_lse = merge_lse(acc_lse, part_lse[slot * G + g], &wa, &wb);
      const float* src = part_o + (slot * G + g) * D;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const pk_i64 d = lane + 32 * r;
        if (d < D) o[r] = wa * o[r] + wb * src[d];
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const pk_i64 d = lane + 32 * r;
      if (d < D) store_any(out, out_dtype, (b * Hq + h * G + g) * D + d, o[r]);
    }
    if (lane == 0) lse[b * Hq + h * G + g] = acc_lse;
  }
}

}  // namespace cuda_kernels
}  // namespace pykernels
