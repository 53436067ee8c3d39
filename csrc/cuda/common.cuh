// Device helpers shared by the CUDA kernels (plain CUDA C++: no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace offsite_cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);  // round to nearest even, as torch's .to(float16)
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// float8 e4m3fn bits -> float32, exactly (no e4m3 type on sm_80; NaN for 0x7f / 0xff).
__device__ __forceinline__ float fp8_e4m3fn_to_float(uint8_t b) {
  const uint32_t sign = (b & 0x80u) << 24, exp = (b >> 3) & 0xFu, mant = b & 0x7u;
  float v;
  if (exp == 0) {
    v = (float)mant * 0.001953125f;  // subnormal (or zero): mant * 2^-9
    if (sign) v = -v;
  } else if (exp == 0xF && mant == 0x7) {
    v = __uint_as_float(0x7fc00000u);
  } else {
    v = __uint_as_float(sign | ((exp + 120u) << 23) | (mant << 20));  // (1 + mant / 8) * 2^(exp - 7)
  }
  return v;
}

// IEEE round-to-nearest-even division, whatever -prec-div says (bit-exact with the CPU reference).
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }

__device__ __forceinline__ float clampf(float v, float lo, float hi) { return fminf(fmaxf(v, lo), hi); }

inline int grid_for(int64_t items, int threads, int max_blocks = 65535 * 4) {
  int64_t blocks = (items + threads - 1) / threads;
  if (blocks > max_blocks) blocks = max_blocks;
  return static_cast<int>(blocks < 1 ? 1 : blocks);
}

}  // namespace offsite_cuda
