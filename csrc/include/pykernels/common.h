// Framework-free helpers shared by the CPU (g++) and CUDA (nvcc / NVRTC) kernels.
// No Python, no torch, and no host-only standard headers: NVRTC must accept this file.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define PK_HOST_DEVICE __host__ __device__
#define PK_INLINE __forceinline__
#else
#define PK_HOST_DEVICE
// always_inline: these functions are also included by the per-ISA CPU translation units
// (compiled with -mavx2 / -mavx512f); forcing inlining keeps an AVX-512 copy from being
// picked by the linker for a caller in the scalar translation unit.
#define PK_INLINE inline __attribute__((always_inline))
#endif

#if defined(__CUDACC_RTC__)
typedef unsigned short pk_u16;
typedef unsigned int pk_u32;
typedef long long pk_i64;
typedef int pk_i32;
#else
#include <stdint.h>
typedef uint16_t pk_u16;
typedef uint32_t pk_u32;
typedef int64_t pk_i64;
typedef int32_t pk_i32;
#endif

namespace pykernels {

// Scalar dtype codes used across the C++/CUDA boundary (match DLPack code/bits pairs).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

PK_HOST_DEVICE PK_INLINE float pk_bits_to_float(pk_u32 u) {
  union { pk_u32 u; float f; } c; c.u = u; return c.f;
}
PK_HOST_DEVICE PK_INLINE pk_u32 pk_float_to_bits(float f) {
  union { pk_u32 u; float f; } c; c.f = f; return c.u;
}

// bfloat16 <-> float32. bf16 is the top half of an fp32.
PK_HOST_DEVICE PK_INLINE float bf16_to_float(pk_u16 h) { return pk_bits_to_float(((pk_u32)h) << 16); }
PK_HOST_DEVICE PK_INLINE pk_u16 float_to_bf16(float f) {
  pk_u32 u = pk_float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (pk_u16)((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return (pk_u16)(u >> 16);
}

// IEEE binary16 <-> float32, exact bit manipulation (denormals, inf, NaN handled).
PK_HOST_DEVICE PK_INLINE float fp16_to_float(pk_u16 h) {
  pk_u32 sign = ((pk_u32)h & 0x8000u) << 16;
  pk_u32 exp = ((pk_u32)h >> 10) & 0x1fu;
  pk_u32 man = (pk_u32)h & 0x3ffu;
  if (exp == 0x1fu) return pk_bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return pk_bits_to_float(sign);
    // subnormal: value = man * 2^-24
    float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return pk_bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}
PK_HOST_DEVICE PK_INLINE pk_u16 float_to_fp16(float f) {
  pk_u32 u = pk_float_to_bits(f);
  pk_u32 sign = (u >> 16) & 0x8000u;
  pk_u32 au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return (pk_u16)(sign | 0x7e00u);   // NaN
  if (au >= 0x477ff000u) return (pk_u16)(sign | 0x7c00u);  // rounds to inf
  if (au < 0x38800000u) {                                  // subnormal half or zero
    // value / 2^-24, rounded to nearest even
    float a = pk_bits_to_float(au) * 16777216.0f;
    pk_u32 m = (pk_u32)a;
    float r = a - (float)m;
    if (r > 0.5f || (r == 0.5f && (m & 1u))) m += 1u;
    return (pk_u16)(sign | m);
  }
  pk_u32 e = ((au >> 23) - 112u) << 10;
  pk_u32 m = (au >> 13) & 0x3ffu;
  pk_u32 rest = au & 0x1fffu;
  pk_u32 h = e | m;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1u;  // carry may bump exponent: correct
  return (pk_u16)(sign | h);
}

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  PK_HOST_DEVICE PK_INLINE static float load(const float* p) { return *p; }
  PK_HOST_DEVICE PK_INLINE static void store(float* p, float v) { *p = v; }
};
// 16-bit types are carried as raw bits; the tag picks the format.
struct bf16_t { pk_u16 bits; };
struct fp16_t { pk_u16 bits; };
template <> struct Cvt<bf16_t> {
  PK_HOST_DEVICE PK_INLINE static float load(const bf16_t* p) { return bf16_to_float(p->bits); }
  PK_HOST_DEVICE PK_INLINE static void store(bf16_t* p, float v) { p->bits = float_to_bf16(v); }
};
template <> struct Cvt<fp16_t> {
  PK_HOST_DEVICE PK_INLINE static float load(const fp16_t* p) { return fp16_to_float(p->bits); }
  PK_HOST_DEVICE PK_INLINE static void store(fp16_t* p, float v) { p->bits = float_to_fp16(v); }
};

PK_HOST_DEVICE PK_INLINE pk_i64 pk_cdiv(pk_i64 a, pk_i64 b) { return (a + b - 1) / b; }

}  // namespace pykernels
