// LUT-GEMV CUDA kernels: out[m, n] = sum_k x[m, k] * W[n, k] for bit-plane weights
// (format: pykernels/lut_format.py; per-element math: pykernels/lut.h, shared with the CPU).
//
// NVRTC-clean like decode_attention.cuh: only the framework-free pykernels headers, flat scalar
// and pointer arguments (8-byte integers), so nvcc (pykernels._cuda), NVRTC (cupy JIT path) and
// the CPU-only CI check compile the same text.
//
// Work decomposition:
//   CTA t owns the 32 rows n = 32 t + r of plane tile t; lane r of every warp owns row r, so the
//   32-byte plane run of a byte column is one coalesced 32-byte load per plane (planes are
//   [N_pad/32, K_pad/8, bits, 32]: a tile's bytes are contiguous, byte column after byte column).
//   The W warps of a CTA split the tile's K_pad/8 byte columns into W contiguous ranges; each
//   warp walks its range U byte columns (8 U activations) per step.
//   Per step the warp builds, in its private shared-memory slice, the sign-symmetric 16-entry
//   table (lut_build_table) of each of the 2 U activation groups for each of the MT rows of x
//   (lanes share the 2 U * MT tables), loads its U * bits plane bytes (all loads in flight at
//   once), and looks up T[nibble] per plane: L += 2^i T_a[idx_i]. The sum S_a = T_a[15] of
//   each activation group rides along. At every scale-group boundary the lane folds (L, S) into
//   its output with lut_group_result (affine: zero from `zeros`; symmetric: zero = c0, so the
//   S term vanishes). lut_group_result is linear in (L, S), so a warp range that starts or ends
//   inside a group simply contributes a partial group: any split of K is exact.
//   Codebook weights are not linear in the bits: the lane rebuilds each code q from its plane
//   bytes and multiplies codebook[q] (the tile's codebook rows staged in shared memory) by the
//   activation (staged per step in shared memory instead of tables); scales, when present, are
//   applied per group.
//   The W partial outputs of each (m, n) are summed in a fixed order through shared memory
//   (deterministic), and row n < N of out is written (not accumulated).
//
// Weights are read once for all M <= 16 rows of x: MT (the next power of two >= M) rows are
// processed together; rows m >= M see zero tables and are never stored.
//
// The lookups run on fp32 tables; mode="int8" (int8 tables, a CPU SIMD optimisation for pshufb
// lookups) is served exactly here: on a GPU a table lookup is a shared-memory load either way.
#pragma once

#include "pykernels/common.h"

#include "pykernels/lut.h"

namespace pykernels {
namespace cuda_kernels {

constexpr int kLutLinear = 0;    // affine (zeros given) or symmetric (zeros == nullptr)
constexpr int kLutCodebook = 1;  // w = scale * codebook[c, q]; scale optional
constexpr int kLutMaxM = 16;
constexpr int kLutMaxBits = 8;

// MT: rows of x per pass (1, 2, 4, 8, 16). U: byte columns per warp step (U * BITS <= 32 plane
// bytes in flight per lane). W: warps per CTA. Shared memory per CTA <= 41 KB in every case.
// kMinBlocks: CTAs per SM the register budget must allow; for MT <= 4 (memory-bound) that is
// 32 resident warps per SM (<= 64 registers per thread); MT >= 8 does 8-16x more lookups per
// plane byte and may use more registers.
template <int BITS, int MT>
struct LutShape {
  static constexpr int U0 = MT <= 2 ? 8 : 4;
  static constexpr int U = U0 < 32 / BITS ? U0 : 32 / BITS;
  static constexpr int W = MT <= 2 ? 16 : (MT == 4 ? 8 : 4);
  static constexpr int kThreads = 32 * W;
  static constexpr int kMinBlocks = MT <= 4 ? 1024 / kThreads : 1;
};

// x and the fp16 scales: exact conversions (same values as Cvt<T>::load in common.h).
__device__ __forceinline__ float lut_f16_to_float(pk_u16 h) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  return fp16_to_float(h);
#endif
}
__device__ __forceinline__ float lut_load_x(const void* p, pk_i64 dtype, pk_i64 i) {
  if (dtype == (pk_i64)DType::kFloat32) return static_cast<const float*>(p)[i];
  const pk_u16 h = static_cast<const pk_u16*>(p)[i];
  if (dtype == (pk_i64)DType::kFloat16) return lut_f16_to_float(h);
  return bf16_to_float(h);
}

// x: [M, K_pad] (dtype code x_dtype: DType in common.h), contiguous.
// planes: uint8 [N_pad/32, K_pad/8, BITS, 32]. scales, zeros: fp16 [N, K_pad/gs] or nullptr.
// codebook: fp32 [N or 1, 2^BITS] (cb_per_row != 0: row n uses codebook row n).
// out: fp32 [M, N] contiguous. Grid: N_pad/32 CTAs of LutShape<BITS, MT>::kThreads threads.
template <int BITS, int KIND, int MT>
__global__ void __launch_bounds__(LutShape<BITS, MT>::kThreads, LutShape<BITS, MT>::kMinBlocks)
lut_gemv_kernel(const void* __restrict__ x, pk_i64 x_dtype, pk_i64 M,
                const unsigned char* __restrict__ planes,
                const pk_u16* __restrict__ scales, const pk_u16* __restrict__ zeros,
                const float* __restrict__ codebook, pk_i64 cb_per_row,
                float* __restrict__ out, pk_i64 N, pk_i64 K_pad, pk_i64 gs) {
  static_assert(BITS >= 1 && BITS <= kLutMaxBits && MT >= 1 && MT <= kLutMaxM, "instantiation");
  constexpr int U = LutShape<BITS, MT>::U;
  constexpr int W = LutShape<BITS, MT>::W;
  constexpr int kThreads = LutShape<BITS, MT>::kThreads;
  constexpr int kQ = 1 << BITS;
  constexpr int kCbStride = kQ + 1;  // odd row stride: lanes looking up the same q hit distinct banks
  // Per-warp slice: 2U tables of 16 entries per row of x (linear), or the step's 8U activations
  // per row (codebook). Both hold the final W x MT x 32 partial outputs (U >= 4).
  constexpr int kWork = KIND == kLutLinear ? 2 * U * MT * 16 : 8 * U * MT;
  static_assert(W * kWork >= W * MT * 32, "the reduction buffer aliases the work slices");
  __shared__ __align__(16) float work_s[W * kWork];
  __shared__ float cb_s[KIND == kLutCodebook ? 32 * kCbStride : 1];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const pk_i64 t = blockIdx.x;
  const pk_i64 n = t * kLutTileN + lane;
  const bool row_ok = n < N;  // rows of the last tile past N: padding (code 0), never stored
  const pk_i64 KK = K_pad / kLutKSlice, G = K_pad / gs, kk_per_g = gs / kLutKSlice;

  if constexpr (KIND == kLutCodebook) {
    // codebook rows of this tile's 32 rows (per-tensor: the same row 32 times)
    for (int idx = threadIdx.x; idx < 32 * kQ; idx += kThreads) {
      const int r = idx / kQ, q = idx % kQ;
      const pk_i64 nr = t * kLutTileN + r;
      float v = 0.f;
      if (!cb_per_row) v = codebook[q];
      else if (nr < N) v = codebook[nr * kQ + q];
      cb_s[r * kCbStride + q] = v;
    }
    __syncthreads();
  }

  float* wk = work_s + warp * kWork;
  float y[MT], L[MT], S[MT];  // output, this group's weighted lookups (or sum w x), sum of x
#pragma unroll
  for (int m = 0; m < MT; ++m) y[m] = L[m] = S[m] = 0.f;

  const pk_i64 kb = KK * warp / W, ke = KK * (warp + 1) / W;  // this warp's byte columns
  pk_i64 g = kb / kk_per_g;                                     // current scale group
  pk_i64 g_end = (g + 1) * kk_per_g;                            // its first byte column past the end

  // Fold the current group's (L, S) into y with the row's scale (and zero) and reset them.
  auto flush = [&]() {
    if (row_ok) {
      const float scale = scales != nullptr ? lut_f16_to_float(__ldg(scales + n * G + g)) : 1.f;
      if constexpr (KIND == kLutLinear) {
        const float zero = zeros != nullptr ? lut_f16_to_float(__ldg(zeros + n * G + g))
                                            : 0.5f * (float)(kQ - 1);  // symmetric: zero = c0
#pragma unroll
        for (int m = 0; m < MT; ++m) y[m] += lut_group_result(L[m], S[m], scale, zero, BITS);
      } else {
#pragma unroll
        for (int m = 0; m < MT; ++m) y[m] += scale * L[m];
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) L[m] = S[m] = 0.f;
  };

  for (pk_i64 kk0 = kb; kk0 < ke; kk0 += U) {
    const int nu = ke - kk0 < U ? (int)(ke - kk0) : U;  // byte columns in this step
    // Plane bytes of the step first (U * BITS independent loads in flight), then the tables.
    // planes[t, kk0 + u, i, lane]: the step's bytes are one contiguous run of U * BITS * 32.
    const unsigned char* col = planes + lut_plane_offset(t, kk0, 0, KK, BITS) + lane;
    unsigned b[U][BITS];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < BITS; ++i) b[u][i] = u < nu ? (unsigned)__ldg(col + (u * BITS + i) * kLutTileN) : 0u;

    const pk_i64 xk0 = kk0 * kLutKSlice;  // first activation of the step
    if constexpr (KIND == kLutLinear) {
      // table (a, m) at wk[(a * MT + m) * 16]: activation group 2 kk0 + a of row m of x
      for (int idx = lane; idx < 2 * U * MT; idx += 32) {
        const int a = idx / MT, m = idx % MT;
        float xs[4] = {0.f, 0.f, 0.f, 0.f};
        if (m < M && a < 2 * nu) {
#pragma unroll
          for (int j = 0; j < 4; ++j) xs[j] = lut_load_x(x, x_dtype, m * K_pad + xk0 + 4 * a + j);
        }
        lut_build_table(xs, wk + idx * 16);
      }
    } else {
      // activations xs[m][j] at wk[m * 8U + j], j < 8U
      for (int idx = lane; idx < 8 * U * MT; idx += 32) {
        const int m = idx / (8 * U), j = idx % (8 * U);
        wk[idx] = (m < M && j < 8 * nu) ? lut_load_x(x, x_dtype, m * K_pad + xk0 + j) : 0.f;
      }
    }
    __syncwarp();

#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < nu) {
        if (kk0 + u == g_end) {  // entering the next scale group
          flush();
          ++g;
          g_end += kk_per_g;
        }
        if constexpr (KIND == kLutLinear) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {  // low nibble: group 2u, high nibble: group 2u + 1
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              const float* T = wk + ((2 * u + h) * MT + m) * 16;
              float acc = 0.f;
#pragma unroll
              for (int i = 0; i < BITS; ++i) acc = fmaf((float)(1 << i), T[(b[u][i] >> (4 * h)) & 15u], acc);
              L[m] += acc;
              S[m] += T[15];
            }
          }
        } else {
          const float* cb = cb_s + lane * kCbStride;
#pragma unroll
          for (int j = 0; j < kLutKSlice; ++j) {
            int q = 0;
#pragma unroll
            for (int i = 0; i < BITS; ++i) q |= (int)((b[u][i] >> j) & 1u) << i;
            const float w = cb[q];
#pragma unroll
            for (int m = 0; m < MT; ++m) L[m] = fmaf(w, wk[m * 8 * U + 8 * u + j], L[m]);
          }
        }
      }
    }
    __syncwarp();  // the slice is rewritten by the next step
  }
  if (kb < ke) flush();

  // Sum the W partial outputs of each (m, n) in warp order and write rows n < N.
  __syncthreads();  // every warp is done with its work slice
  float* part = work_s;  // [W][MT][32]
#pragma unroll
  for (int m = 0; m < MT; ++m) part[(warp * MT + m) * 32 + lane] = y[m];
  __syncthreads();
  for (int idx = threadIdx.x; idx < MT * 32; idx += kThreads) {
    const int m = idx / 32, r = idx % 32;
    const pk_i64 nr = t * kLutTileN + r;
    if (m < M && nr < N) {
      float s = 0.f;
      for (int w = 0; w < W; ++w) s += part[(w * MT + m) * 32 + r];
      out[m * N + nr] = s;
    }
  }
}

}  // namespace cuda_kernels
}  // namespace pykernels
