// CUDA quantize / pack / unpack / dequantize, bit-exact with offsite_kernels/quant/formats.py: the same float32
// operations in the same order (IEEE division via __fdiv_rn, round half to even via rintf, no FMA contraction:
// built with --fmad=false). Plain CUDA C++: no torch headers (see launchers.h).
#include "common.cuh"
#include "launchers.h"

#include <float.h>

namespace offsite_cuda {
namespace {

constexpr int kThreads = 256;

// int8, one block per row: amax of |w| (block reduction), scale = max(amax / 127, FLT_MIN),
// q = clamp(round(w / scale), -127, 127).
template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_int8_kernel(const T* __restrict__ w, int64_t k, int8_t* __restrict__ q,
                                                                 float* __restrict__ scales, int* __restrict__ bad) {
  const int64_t row = blockIdx.x;
  const T* wr = w + row * k;
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const float v = to_float(wr[i]);
    finite &= isfinite(v);
    amax = fmaxf(amax, fabsf(v));
  }
  __shared__ float red[kThreads / 32];
  __shared__ int any_bad;
  if (threadIdx.x == 0) any_bad = 0;
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  __syncthreads();
  if (!finite) any_bad = 1;
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
  __syncthreads();
  float m = 0.0f;
  for (int j = 0; j < (int)(blockDim.x >> 5); ++j) m = fmaxf(m, red[j]);
  if (any_bad) {
    if (threadIdx.x == 0) atomicOr(bad, 1);
    return;
  }
  float s = div_rn(m, 127.0f);
  s = s < FLT_MIN ? FLT_MIN : s;
  if (threadIdx.x == 0) scales[row] = s;
  int8_t* qr = q + row * k;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x)
    qr[i] = static_cast<int8_t>(clampf(rintf(div_rn(to_float(wr[i]), s)), -127.0f, 127.0f));
}

// int4, one thread per (row, group): lo/hi over the group (the last group padded by repeating the row's last
// value), scale = max((hi - lo) / 15, FLT_MIN), zero = clamp(round(-lo / scale), 0, 15),
// q = clamp(round(w / scale + zero), 0, 15), packed two per byte, low nibble first.
template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_int4_kernel(const T* __restrict__ w, int64_t n, int64_t k, int64_t group,
                                                                 int64_t groups, uint8_t* __restrict__ packed,
                                                                 float* __restrict__ scales, uint8_t* __restrict__ zeros,
                                                                 int* __restrict__ bad) {
  for (int64_t item = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; item < n * groups; item += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = item / groups, g = item % groups;
    const T* wr = w + row * k;
    const int64_t k0 = g * group, k1 = min(k0 + group, k);
    float lo = to_float(wr[k0]), hi = lo;
    bool finite = true;
    for (int64_t i = k0; i < k1; ++i) {
      const float v = to_float(wr[i]);
      finite &= isfinite(v);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    if (!finite) {
      atomicOr(bad, 1);
      continue;
    }
    float s = div_rn(hi - lo, 15.0f);
    s = s < FLT_MIN ? FLT_MIN : s;
    const float z = clampf(rintf(div_rn(-lo, s)), 0.0f, 15.0f);
    scales[item] = s;
    zeros[item] = static_cast<uint8_t>(z);
    const float last = to_float(wr[k - 1]);
    uint8_t* out = packed + row * (groups * group / 2) + g * group / 2;
    for (int64_t j = 0; j < group / 2; ++j) {
      const int64_t i0 = k0 + 2 * j, i1 = i0 + 1;
      const float v0 = i0 < k ? to_float(wr[i0]) : last, v1 = i1 < k ? to_float(wr[i1]) : last;
      const uint32_t q0 = static_cast<uint32_t>(clampf(rintf(div_rn(v0, s) + z), 0.0f, 15.0f));
      const uint32_t q1 = static_cast<uint32_t>(clampf(rintf(div_rn(v1, s) + z), 0.0f, 15.0f));
      out[j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
  }
}

__global__ void pack_int4_kernel(const uint8_t* __restrict__ q, int64_t total_bytes, uint8_t* __restrict__ packed,
                                 int* __restrict__ bad) {
  bool ok = true;
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < total_bytes; j += (int64_t)gridDim.x * blockDim.x) {
    const uint8_t a = q[2 * j], b = q[2 * j + 1];  // rows are contiguous and k is even: byte j holds q[2j], q[2j+1]
    ok &= (a | b) < 16;
    packed[j] = static_cast<uint8_t>(a | (b << 4));
  }
  if (!ok) atomicOr(bad, 1);
}

__global__ void unpack_int4_kernel(const uint8_t* __restrict__ packed, int64_t total_bytes, uint8_t* __restrict__ out) {
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < total_bytes; j += (int64_t)gridDim.x * blockDim.x) {
    const uint8_t b = packed[j];
    out[2 * j] = b & 0x0F;
    out[2 * j + 1] = b >> 4;
  }
}

template <typename T>
__global__ void dequantize_kernel(int fmt, const uint8_t* __restrict__ data, int64_t row_bytes, const float* __restrict__ scales,
                                  const uint8_t* __restrict__ zeros, int64_t groups, int64_t group, int64_t n, int64_t k,
                                  T* __restrict__ out) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n * k; idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = idx / k, col = idx % k;
    const uint8_t* dr = data + row * row_bytes;
    float v;
    if (fmt == OFFSITE_FMT_INT4) {
      const uint8_t b = dr[col / 2];
      const float q = static_cast<float>((col & 1) ? (b >> 4) : (b & 0x0F));
      const int64_t g = row * groups + col / group;
      v = (q - static_cast<float>(zeros[g])) * scales[g];
    } else if (fmt == OFFSITE_FMT_INT8) {
      v = static_cast<float>(static_cast<int8_t>(dr[col])) * scales[row];
    } else {
      v = fp8_e4m3fn_to_float(dr[col]) * scales[row];
    }
    out[idx] = from_float<T>(v);
  }
}

}  // namespace
}  // namespace offsite_cuda

using namespace offsite_cuda;

extern "C" cudaError_t offsite_quantize_int8(const void* w, int dtype, int64_t n, int64_t k, int8_t* q, float* scales, int* bad,
                                             cudaStream_t stream) {
  if (n <= 0 || k <= 0) return cudaSuccess;
  if (n > 2147483647LL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(n)), block(kThreads);
  switch (dtype) {
    case OFFSITE_F32:
      quantize_int8_kernel<<<grid, block, 0, stream>>>(static_cast<const float*>(w), k, q, scales, bad);
      break;
    case OFFSITE_F16:
      quantize_int8_kernel<<<grid, block, 0, stream>>>(static_cast<const __half*>(w), k, q, scales, bad);
      break;
    case OFFSITE_BF16:
      quantize_int8_kernel<<<grid, block, 0, stream>>>(static_cast<const __nv_bfloat16*>(w), k, q, scales, bad);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t offsite_quantize_int4(const void* w, int dtype, int64_t n, int64_t k, int64_t group, uint8_t* packed,
                                             float* scales, uint8_t* zeros, int* bad, cudaStream_t stream) {
  if (n <= 0 || k <= 0) return cudaSuccess;
  if (group != 32 && group != 64 && group != 128) return cudaErrorInvalidValue;
  const int64_t groups = (k + group - 1) / group;
  const int grid = grid_for(n * groups, kThreads);
  switch (dtype) {
    case OFFSITE_F32:
      quantize_int4_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const float*>(w), n, k, group, groups, packed, scales, zeros, bad);
      break;
    case OFFSITE_F16:
      quantize_int4_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(w), n, k, group, groups, packed, scales, zeros, bad);
      break;
    case OFFSITE_BF16:
      quantize_int4_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(w), n, k, group, groups, packed, scales,
                                                          zeros, bad);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t offsite_pack_int4(const uint8_t* q, int64_t n, int64_t k, uint8_t* packed, int* bad, cudaStream_t stream) {
  if (n <= 0 || k <= 0) return cudaSuccess;
  if (k % 2) return cudaErrorInvalidValue;
  const int64_t total = n * (k / 2);
  pack_int4_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(q, total, packed, bad);
  return cudaGetLastError();
}

extern "C" cudaError_t offsite_unpack_int4(const uint8_t* packed, int64_t n, int64_t kb, uint8_t* out, cudaStream_t stream) {
  if (n <= 0 || kb <= 0) return cudaSuccess;
  const int64_t total = n * kb;
  unpack_int4_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(packed, total, out);
  return cudaGetLastError();
}

extern "C" cudaError_t offsite_dequantize(int fmt, const uint8_t* data, int64_t row_bytes, const float* scales, const uint8_t* zeros,
                                          int64_t groups, int64_t group, int64_t n, int64_t k, void* out, int out_dtype,
                                          cudaStream_t stream) {
  if (n <= 0 || k <= 0) return cudaSuccess;
  if (fmt != OFFSITE_FMT_INT4 && fmt != OFFSITE_FMT_INT8 && fmt != OFFSITE_FMT_FP8) return cudaErrorInvalidValue;
  const int grid = grid_for(n * k, kThreads);
  switch (out_dtype) {
    case OFFSITE_F32:
      dequantize_kernel<<<grid, kThreads, 0, stream>>>(fmt, data, row_bytes, scales, zeros, groups, group, n, k, static_cast<float*>(out));
      break;
    case OFFSITE_F16:
      dequantize_kernel<<<grid, kThreads, 0, stream>>>(fmt, data, row_bytes, scales, zeros, groups, group, n, k, static_cast<__half*>(out));
      break;
    case OFFSITE_BF16:
      dequantize_kernel<<<grid, kThreads, 0, stream>>>(fmt, data, row_bytes, scales, zeros, groups, group, n, k,
                                                       static_cast<__nv_bfloat16*>(out));
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
