// Element conversions done on the device after a copy (bf16 <-> fp16,
// fp32 -> bf16/fp16, bf16/fp16 -> fp32). One definition serves the CUDA
// kernel (lib/cuda/convert.cu) and the host (the test double and the
// tests), so both give identical bits: round to nearest even, NaN kept NaN
// (quiet, sign kept), overflow to infinity, subnormals exact.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CKPT_HD __host__ __device__ inline
#else
#define CKPT_HD inline
#endif

namespace ckpt::convert {

/// Conversion pair codes (ckpt::DType codes of source and target).
enum Code : int {
  kBF16ToF16 = 1,
  kF16ToBF16 = 2,
  kF32ToBF16 = 3,
  kF32ToF16 = 4,
  kBF16ToF32 = 5,
  kF16ToF32 = 6,
};

CKPT_HD float BitsToFloat(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
CKPT_HD uint32_t FloatToBits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

CKPT_HD float BF16ToF32(uint16_t h) {
  return BitsToFloat(static_cast<uint32_t>(h) << 16);
}

CKPT_HD uint16_t F32ToBF16(float f) {
  uint32_t u = FloatToBits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u)
    return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);                   // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

CKPT_HD float F16ToF32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t u;
  if (exp == 0x1F) {
    u = sign | 0x7F800000u | (man << 13) | (man ? 0x400000u : 0u);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while ((man & 0x400u) == 0);
    u = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3FFu) << 13);
  }
  return BitsToFloat(u);
}

CKPT_HD uint16_t F32ToF16(float f) {
  uint32_t u = FloatToBits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u)
    return static_cast<uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));
  if (abs >= 0x477FF000u)
    return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to inf
  if (abs < 0x38800000u) {                         // subnormal or zero in half
    if (abs < 0x33000000u)
      return static_cast<uint16_t>(sign);  // below half of min subnormal
    uint32_t man = (abs & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 113u - (abs >> 23) + 13u;
    uint32_t half = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t mid = 1u << (shift - 1u);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t v = abs - 0x38000000u;  // rebias exponent 127 -> 15
  uint32_t half = v >> 13;
  uint32_t rem = v & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;
  return static_cast<uint16_t>(sign | half);
}

/// Bytes per element of the source and target of `code`.
CKPT_HD int SourceSize(int code) {
  return code == kF32ToBF16 || code == kF32ToF16 ? 4 : 2;
}
CKPT_HD int TargetSize(int code) {
  return code == kBF16ToF32 || code == kF16ToF32 ? 4 : 2;
}

/// Converts element i of `src` into `dst`.
CKPT_HD void ConvertOne(int code, const void* src, void* dst, uint64_t i) {
  const auto* s16 = static_cast<const uint16_t*>(src);
  const auto* s32 = static_cast<const float*>(src);
  auto* d16 = static_cast<uint16_t*>(dst);
  auto* d32 = static_cast<float*>(dst);
  switch (code) {
    case kBF16ToF16:
      d16[i] = F32ToF16(BF16ToF32(s16[i]));
      break;
    case kF16ToBF16:
      d16[i] = F32ToBF16(F16ToF32(s16[i]));
      break;
    case kF32ToBF16:
      d16[i] = F32ToBF16(s32[i]);
      break;
    case kF32ToF16:
      d16[i] = F32ToF16(s32[i]);
      break;
    case kBF16ToF32:
      d32[i] = BF16ToF32(s16[i]);
      break;
    case kF16ToF32:
      d32[i] = F16ToF32(s16[i]);
      break;
    default:
      break;
  }
}

}  // namespace ckpt::convert

/// Launches the conversion of `n` elements from device `src` to device
/// `dst` on `stream` (a cudaStream_t). Defined by lib/cuda/convert.cu for the
/// real runtime and by the test double for tests.
extern "C" int ckpt_convert_launch(int code, const void* src, void* dst,
                                   uint64_t n, void* stream);
