// Interface between the LUT-GEMV launcher (lut_gemv.cpp, no ISA flags) and the per-ISA kernels
// (lut_{scalar,avx2,avx512,avx512vbmi}.cpp, all built from lut_kernel.h).
//
// The per-ISA translation units see only the plain structs and function pointers below (no
// pybind11, no std::string: an inline function instantiated there would be compiled with that
// ISA's flags and could be picked by the linker for a caller on another path).
#pragma once
#include <stdint.h>

#include "pykernels/common.h"

#ifndef PK_ISA_NS
#include <pybind11/pybind11.h>

#include <string>
#endif
#include "pykernels/lut.h"

namespace pykernels {
namespace cpu {

enum class LutScheme : int { kAffine = 0, kSymmetric = 1, kCodebook = 2 };
enum class LutMode : int { kInt8 = 0, kExact = 1 };

constexpr int kLutMaxM = 16;      // rows of x per call (the Python side splits larger M)
constexpr int64_t kLutBlockK = 128;  // most k per table block (one int8 table scale per (m, block))
constexpr int kLutMaxMC = 8;      // rows of x a kernel keeps in registers at once
// Row m of the tables starts at m * tstride elements, tstride = K_pad / 4 * 16 + kLutTablePad:
// the pad keeps the rows of x out of the same L1 sets (K_pad * 4 or 16 bytes is often a multiple
// of 4 KiB) and covers the 64-byte int8 load at a block's last byte column (32 bytes past the row).
constexpr int64_t kLutTablePad = 64;

// Everything a kernel needs; the launcher checked every size against the tensors.
// Table blocks: a scale group g (gs k) is cut into bpg = cdiv(gs, 128) blocks of <= 128 k (the
// last one shorter), so a block never crosses a scale group and one int8 table scale and one
// weight scale apply to the whole block. Block b = g * bpg + c covers
// k in [g * gs + 128 c, min(g * gs + 128 (c + 1), (g + 1) * gs)); every block is a multiple of 8 k.
struct LutParams {
  const uint8_t* planes;   // [N_pad/32, KK, bits, 32]
  const pk_u16* scales;    // fp16 [N, G] or nullptr (codebook without scales)
  const pk_u16* zeros;     // fp16 [N, G] (affine) or nullptr
  const float* codebook;   // [cb_rows, 2^bits] or nullptr
  int64_t cb_rows = 0;     // 1 (per-tensor) or N (per-channel)
  int64_t N = 0, N_pad = 0, K_pad = 0, KK = 0, G = 0, gs = 0;
  int bits = 0, M = 0;
  LutScheme scheme = LutScheme::kAffine;
  LutMode mode = LutMode::kInt8;
  int64_t bpg = 0, nblk = 0;
  const float* x = nullptr;  // [M, K_pad] fp32
  // Written by lut_prepare (per row m of x), read by lut_tile:
  int64_t tstride = 0;       // elements per row of x in tq / tf (see kLutTablePad)
  int8_t* tq = nullptr;      // int8 mode: [M, tstride] quantised tables, 16 per activation group
  float* tf = nullptr;       // exact mode: [M, tstride] fp32 tables
  float* ts = nullptr;       // [M, nblk] int8 table scale (max|T| / 127 over the block)
  float* sb = nullptr;       // [M, nblk] sum of x over the block (the zero-point term)
  float* out = nullptr;      // [M, N] fp32
};

inline int64_t lut_block_k0(const LutParams& p, int64_t b) { return (b / p.bpg) * p.gs + (b % p.bpg) * kLutBlockK; }
inline int64_t lut_block_k1(const LutParams& p, int64_t b) {
  const int64_t g = b / p.bpg, k0 = lut_block_k0(p, b);
  const int64_t end = (g + 1) * p.gs;
  return k0 + kLutBlockK < end ? k0 + kLutBlockK : end;
}

constexpr int64_t kLutTileGroup = 8;  // most tiles one lut_tile call walks together

// Scratch floats lut_tile needs per thread.
inline int64_t lut_workspace_floats(int M) { return kLutTileGroup * M * 32 + 2 * 16 * 32 + kLutMaxMC * 32 + 64; }

// Per ISA: build the tables, table scales and block sums of row m of x for blocks [b0, b1).
typedef void (*LutPrepareFn)(const LutParams& p, int64_t m, int64_t b0, int64_t b1);
// Per ISA: out rows of tiles [t0, t1) (32 rows each, t1 - t0 <= kLutTileGroup) for every row of x.
typedef void (*LutTileFn)(const LutParams& p, int64_t t0, int64_t t1, float* work);

#define PK_LUT_DECLARE(ns)                                                      \
  namespace ns {                                                                \
  void lut_prepare(const LutParams& p, int64_t m, int64_t b0, int64_t b1);      \
  void lut_tile(const LutParams& p, int64_t t0, int64_t t1, float* work);      \
  }
PK_LUT_DECLARE(scalar)
PK_LUT_DECLARE(avx2)
PK_LUT_DECLARE(avx512)
PK_LUT_DECLARE(avx512vbmi)
#undef PK_LUT_DECLARE

#ifndef PK_ISA_NS
namespace py = pybind11;

// pykernels._C.lut_gemv (contract: pykernels/lut.py). The kernel variant follows the active ISA
// (PYKERNELS_ISA / set_isa): scalar, avx2, avx512, or on AVX-512 CPUs with VBMI and VNNI the
// vpermb/vpdpbusd kernel unless PYKERNELS_LUT_VBMI=0 (read on every call).
void lut_gemv(py::object x, py::object planes, py::object scales, py::object zeros, py::object codebook,
              py::object out, int64_t N, int64_t K_pad, int64_t bits, int64_t gs, const std::string& mode);
#endif

}  // namespace cpu
}  // namespace pykernels
