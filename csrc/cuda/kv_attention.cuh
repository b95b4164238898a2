// Decode attention over a quantized KV cache (pykernels/kv_format.py), CUDA kernel.
//
// The quantized bytes are read directly and dequantized in registers inside the attention
// loop: no dequantized copy of the cache is ever written. The schedule (split / lean pieces
// over L = n_sink + n_quant + n_res tokens per sequence), the online softmax, the cross-warp
// merge, the planning and the reduction of partial states are those of decode_attention.cuh
// (decode_attention_body, decode_attention_plan_kernel, decode_attention_reduce_kernel); this
// file only supplies the K / V values of a warp step (KvSrc), so both kernels share one
// definition of the attention math and of the work partition.
//
// Sequence b: tokens [0, ns) are fp rows 0.., tokens [ns, ns + nq) the quantized store (token
// u = t - ns in page block_table[b, u / S], slot u % S), the rest fp rows t - nq (kv_quant.h).
// The unpack / dequant rules come from kv_quant.h (the CPU kernels run the same functions).
//
// Per warp step (U consecutive tokens, decode_attention.cuh), lane l holds channels
// [l * EPL, (l + 1) * EPL) of every token (D is a multiple of 8, so a lane's chunk is all in D
// or all past it):
//   int:  one packed word of EPL * bits bits (1..8 bytes, one vector load), the K scale / zero
//         of the token's group (EPL fp16 each, reloaded only when the group changes: tokens of a
//         warp step are consecutive, groups are >= 32 tokens), one V scale / zero (a lane's
//         chunk never straddles a channel group: gs >= 32 is a multiple of EPL);
//   fp8:  EPL bytes and the per-(page, head, group) fp32 scales of K and V.
// The GB query heads of a pass share every loaded (and dequantized) K / V value (GQA).
//
// The sink / residual fp rows (fp_k, fp_v [B, F, Hkv, D]) have the cache dtype, passed as a
// runtime code (warp-uniform branch) so the instantiations are FMT x EPL x GB only.
//
// meta: int32 [3, B] written by the launcher from the validated host copies: L, n_sink,
// n_quant per sequence (the kernels never read the caller's length tensors, so what was
// checked is what runs). Every index is still range-checked here (a bad one drops the token).
#pragma once

#include "pykernels/common.h"
#include "pykernels/kv_quant.h"
#include "decode_attention.cuh"

namespace pykernels {
namespace cuda_kernels {

// vec flags (bit set by the launcher when the base pointers / strides allow vector loads)
constexpr int kKvVecFp = 1;      // fp rows: like `vec` of decode_attention_kernel
constexpr int kKvVecCodes = 2;   // code bytes: k_codes / v_codes base 8-byte aligned
constexpr int kKvVecKParam = 4;  // int K scale / zero: base aligned to 16 bytes

// `CB` bytes from p as a little-endian word (one load when `vec`: the launcher checked that the
// base is 8-byte aligned, and row bytes and lane offsets are multiples of CB).
template <int CB>
__device__ __forceinline__ unsigned long long kv_load_word(const unsigned char* __restrict__ p, bool vec) {
  static_assert(CB == 1 || CB == 2 || CB == 4 || CB == 8, "code word size");
  if (vec) {
    if constexpr (CB == 8) {
      const uint2 t = *reinterpret_cast<const uint2*>(p);
      return (unsigned long long)t.x | ((unsigned long long)t.y << 32);
    } else if constexpr (CB == 4) {
      return *reinterpret_cast<const unsigned int*>(p);
    } else if constexpr (CB == 2) {
      return *reinterpret_cast<const unsigned short*>(p);
    } else {
      return *p;
    }
  }
  unsigned long long w = 0;
#pragma unroll
  for (int i = 0; i < CB; ++i) w |= (unsigned long long)p[i] << (8 * i);
  return w;
}

// EPL elements of an fp row of runtime dtype (DType code).
template <int EPL>
__device__ __forceinline__ void kv_load_fp(const void* __restrict__ base, pk_i64 dtype, pk_i64 off, int d0, int D,
                                           bool vec, float (&x)[EPL]) {
  if (dtype == (pk_i64)DType::kFloat32) load_chunk<float, EPL>(static_cast<const float*>(base) + off, d0, D, vec, x);
  else if (dtype == (pk_i64)DType::kFloat16) load_chunk<fp16_t, EPL>(static_cast<const fp16_t*>(base) + off, d0, D, vec, x);
  else load_chunk<bf16_t, EPL>(static_cast<const bf16_t*>(base) + off, d0, D, vec, x);
}

// FMT: KvFormat code (8, 4, 2 int; 0 fp8). See decode_attention.cuh for the Src interface.
template <int FMT, int EPL>
struct KvSrc {
  static constexpr int kBits = FMT == (int)KvFormat::kFp8 ? 8 : FMT;
  static constexpr int kCB = (EPL * kBits + 7) / 8;  // bytes of a lane's packed chunk
  static constexpr bool kFp8 = FMT == (int)KvFormat::kFp8;

  // sink / residual rows [B, F, Hkv, D] (element strides)
  const void* __restrict__ fk;
  const void* __restrict__ fv;
  pk_i64 fk_s0, fk_s1, fk_s2, fv_s0, fv_s1, fv_s2, fp_dtype, F;
  // quantized store
  const unsigned char* __restrict__ kc;
  const unsigned char* __restrict__ vc;
  const void* __restrict__ ks;  // int: fp16 [P, Hkv, S/gs, D]; fp8: fp32 [P, Hkv, S/gs]
  const pk_u16* __restrict__ kz;
  const void* __restrict__ vs;  // int: fp16 [P, Hkv, S, NG]; fp8: fp32 [P, Hkv, S/gs]
  const pk_u16* __restrict__ vz;
  const pk_i32* __restrict__ bt;  // null: dense (page b)
  pk_i64 bt_stride, max_pages, P, S, gs_shift, Hkv, RB, NG;
  const pk_i32* __restrict__ meta;
  pk_i64 B;
  int Di;
  bool vec_fp, vec_codes, vec_kparam;
  // per piece
  pk_i64 ns, nq;
  // K parameters of the last group seen by this warp (int: scale / zero chunk; fp8: K and V
  // scales times 256, the e4m3 -> binary16 exponent offset)
  pk_i64 kgrp;
  float ksc[EPL], kzp[EPL];
  float kfs, vfs;

  __device__ __forceinline__ void begin(pk_i64 b, pk_i64) {
    const pk_i64 a = meta[B + b], c = meta[2 * B + b];
    ns = a < 0 ? 0 : a;
    nq = c < 0 ? 0 : c;
    kgrp = -1;
  }

  // Token at (page row prow = id * Hkv + h, slot off) of the store.
  __device__ __forceinline__ void load_quant(pk_i64 prow, pk_i64 off, int d0, float (&kx)[EPL], float (&vx)[EPL]) {
    const pk_i64 row = prow * S + off;
    const pk_i64 grp = prow * (S >> gs_shift) + (off >> gs_shift);
    if constexpr (kFp8) {
      if (grp != kgrp) {
        kgrp = grp;
        kfs = static_cast<const float*>(ks)[grp] * 256.0f;
        vfs = static_cast<const float*>(vs)[grp] * 256.0f;
      }
      if (d0 < Di) {
        const unsigned long long wk = kv_load_word<kCB>(kc + row * RB + d0, vec_codes);
        const unsigned long long wv = kv_load_word<kCB>(vc + row * RB + d0, vec_codes);
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
          kx[i] = dev_f16_to_float(kv_fp8_to_fp16_bits((unsigned)(wk >> (8 * i)) & 0xffu)) * kfs;
          vx[i] = dev_f16_to_float(kv_fp8_to_fp16_bits((unsigned)(wv >> (8 * i)) & 0xffu)) * vfs;
        }
      } else {
#pragma unroll
        for (int i = 0; i < EPL; ++i) { kx[i] = 0.f; vx[i] = 0.f; }
      }
    } else {
      if (grp != kgrp) {
        kgrp = grp;
        load_chunk<fp16_t, EPL>(static_cast<const fp16_t*>(ks) + grp * Di, d0, Di, vec_kparam, ksc);
        load_chunk<fp16_t, EPL>(reinterpret_cast<const fp16_t*>(kz) + grp * Di, d0, Di, vec_kparam, kzp);
      }
      if (d0 < Di) {
        const int bit = d0 * kBits;
        const unsigned long long wk = kv_load_word<kCB>(kc + row * RB + (bit >> 3), vec_codes) >> (bit & 7);
        const unsigned long long wv = kv_load_word<kCB>(vc + row * RB + (bit >> 3), vec_codes) >> (bit & 7);
        const pk_i64 vgi = row * NG + (d0 >> gs_shift);
        const float vsc = dev_f16_to_float(static_cast<const pk_u16*>(vs)[vgi]);
        const float vzp = dev_f16_to_float(vz[vgi]);
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
          kx[i] = kv_dequant(kv_code_in_word(wk, i, kBits), ksc[i], kzp[i]);
          vx[i] = kv_dequant(kv_code_in_word(wv, i, kBits), vsc, vzp);
        }
      } else {
#pragma unroll
        for (int i = 0; i < EPL; ++i) { kx[i] = 0.f; vx[i] = 0.f; }
      }
    }
  }

  template <int U>
  __device__ __forceinline__ unsigned load(pk_i64 b, pk_i64 h, pk_i64 base, pk_i64 t1, int lane,
                                           float (&kx)[U][EPL], float (&vx)[U][EPL]) {
    const int d0 = lane * EPL;
    unsigned valid = 0u;
    // store position of token `base`: page index blk, slot off (off < 0 before the store
    // starts: it reaches 0, page 0, at the first quantized token)
    const pk_i64 u0 = base - ns;
    pk_i64 blk = 0, off = u0;
    if (u0 > 0) { blk = u0 / S; off = u0 - blk * S; }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const pk_i64 tok = base + u;
      const pk_i64 uq = tok - ns;
      bool ok = tok < t1;
      if (ok && uq >= 0 && uq < nq) {
        pk_i64 id = b;
        if (bt != nullptr) id = blk < max_pages ? (pk_i64)bt[b * bt_stride + blk] : -1;
        ok = id >= 0 && id < P;  // the launcher rejects bad ids; never read them
        if (ok) load_quant(id * Hkv + h, off, d0, kx[u], vx[u]);
      } else if (ok) {
        const pk_i64 r = uq < 0 ? tok : tok - nq;
        ok = r >= 0 && r < F;
        if (ok) {
          kv_load_fp<EPL>(fk, fp_dtype, b * fk_s0 + r * fk_s1 + h * fk_s2, d0, Di, vec_fp, kx[u]);
          kv_load_fp<EPL>(fv, fp_dtype, b * fv_s0 + r * fv_s1 + h * fv_s2, d0, Di, vec_fp, vx[u]);
        }
      }
      if (ok) {
        valid |= 1u << u;
      } else {
#pragma unroll
        for (int i = 0; i < EPL; ++i) { kx[u][i] = 0.f; vx[u][i] = 0.f; }
      }
      if (++off == S) { off = 0; ++blk; }
    }
    return valid;
  }
};

// q: [B, Hq, D] (strides q_s*, q_dtype); k_codes, v_codes: uint8 [P, Hkv, S, RB] contiguous;
// k_scale, k_zero, v_scale, v_zero as in kv_format.py (contiguous; zeros null for fp8);
// fp_k, fp_v: [B, F, Hkv, D] (element strides f*_s*, D contiguous, dtype fp_dtype);
// block_table: int32 [B, max_pages] (row stride bt_stride) or null (dense: page b);
// gs_shift = log2(group size); meta: int32 [3, B] (L, n_sink, n_quant); capacity: max L.
// out / lse / part_o / part_lse / cum / split_base: as decode_attention_kernel.
template <int FMT, int EPL, int GB>
__global__ void __launch_bounds__(kThreads)
decode_attention_kv_kernel(const void* __restrict__ q, pk_i64 q_s0, pk_i64 q_s1, pk_i64 q_s2, pk_i64 q_dtype,
                           const unsigned char* __restrict__ k_codes, const void* __restrict__ k_scale,
                           const pk_u16* __restrict__ k_zero,
                           const unsigned char* __restrict__ v_codes, const void* __restrict__ v_scale,
                           const pk_u16* __restrict__ v_zero,
                           const void* __restrict__ fp_k, const void* __restrict__ fp_v,
                           pk_i64 fk_s0, pk_i64 fk_s1, pk_i64 fk_s2, pk_i64 fv_s0, pk_i64 fv_s1, pk_i64 fv_s2,
                           pk_i64 fp_dtype, pk_i64 F,
                           const pk_i32* __restrict__ block_table, pk_i64 bt_stride, pk_i64 max_pages,
                           pk_i64 P, pk_i64 S, pk_i64 gs_shift,
                           const pk_i32* __restrict__ meta, pk_i64 capacity,
                           const pk_i64* __restrict__ cum, const pk_i64* __restrict__ split_base,
                           void* __restrict__ out, pk_i64 out_dtype, float* __restrict__ lse,
                           float* __restrict__ part_o, float* __restrict__ part_lse, pk_i64 num_slots,
                           pk_i64 B, pk_i64 Hq, pk_i64 Hkv, pk_i64 D, pk_i64 tile,
                           pk_i64 mode, pk_i64 num_splits, float scale, pk_i64 vec) {
  KvSrc<FMT, EPL> src;
  src.fk = fp_k; src.fv = fp_v;
  src.fk_s0 = fk_s0; src.fk_s1 = fk_s1; src.fk_s2 = fk_s2;
  src.fv_s0 = fv_s0; src.fv_s1 = fv_s1; src.fv_s2 = fv_s2;
  src.fp_dtype = fp_dtype; src.F = F;
  src.kc = k_codes; src.vc = v_codes; src.ks = k_scale; src.kz = k_zero; src.vs = v_scale; src.vz = v_zero;
  src.bt = block_table; src.bt_stride = bt_stride; src.max_pages = max_pages;
  src.P = P; src.S = S; src.gs_shift = gs_shift; src.Hkv = Hkv;
  src.RB = kv_row_bytes((KvFormat)FMT, D);
  src.NG = (D + ((pk_i64)1 << gs_shift) - 1) >> gs_shift;
  src.meta = meta; src.B = B; src.Di = (int)D;
  src.vec_fp = (vec & kKvVecFp) != 0;
  src.vec_codes = (vec & kKvVecCodes) != 0;
  src.vec_kparam = (vec & kKvVecKParam) != 0;
  src.ns = 0; src.nq = 0; src.kgrp = -1; src.kfs = 0.f; src.vfs = 0.f;
#pragma unroll
  for (int i = 0; i < EPL; ++i) { src.ksc[i] = 0.f; src.kzp[i] = 0.f; }
  decode_attention_body<EPL, GB>(src, q, q_s0, q_s1, q_s2, q_dtype, meta, 1, capacity, cum, split_base,
                                 out, out_dtype, lse, part_o, part_lse, num_slots, B, Hq, Hkv, D, tile, mode,
                                 num_splits, scale);
}

}  // namespace cuda_kernels
}  // namespace pykernels
