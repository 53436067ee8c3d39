// Skinny low-bit GEMM for 1 <= M <= 16 tokens: y[M, N] = x[M, K] @ deq(W)[N, K]^T (+ bias), W int4 (group-wise,
// packed) or int8 (per channel); x, bias, y in float32, float16 or bfloat16; fp32 accumulation on CUDA cores.
//
// At M <= 16 the GEMM is bound by reading the packed weight once, so the kernel is organised around the weight
// stream: a block of kThreads threads owns kRows consecutive output rows (n) and walks K in 16-byte chunks of each
// row (32 int4 or 16 int8 values); thread t takes chunks t, t + kThreads, ...: a warp reads 512 contiguous bytes
// of each of its rows per step with 128-bit loads, kRows loads in flight per thread. Each chunk is dequantized in
// registers ((q - zero) * scale in float32, exactly the reference's values) and multiplied with the matching 8
// activations of every token, loaded as one 128-bit vector per token and reused across the kRows rows. Partial
// sums are reduced across the warp with shuffles and across warps in shared memory; the first threads add the
// bias and store. The token count is a template parameter rounded up to 1, 2, 4, 8 or 16 (rows past M are masked),
// so the accumulators live in registers.
//
// Shapes the vector path cannot take (K not a multiple of 8, int8 rows not a multiple of 16 bytes, or unaligned
// pointers) run a scalar path (one value per thread per step; correct, slower).
//
// Expected limits, to be measured (bench/native_gpu.py): the fp32 FMA work grows with M while the bytes do not,
// so from M ~ 4 on (int4) the kernel turns compute-bound on CUDA cores; the Triton kernel (tensor cores) should
// win there, and the dispatcher (offsite_kernels/native/dispatch.py) picks per M bucket from measurements.
#include "common.cuh"
#include "launchers.h"

namespace offsite_cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kRows = 4;       // output rows per block
constexpr int kWarps = kThreads / 32;

// 8 consecutive activations as float (16-byte aligned; float32 reads two 16-byte vectors).
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) {
  const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 -> fp32 is a shift
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// 8 activations of row `m` at column k0, zero past k (K tail, the int4 padding) or past the valid rows.
template <typename T>
__device__ __forceinline__ void load8_masked(const T* x, int64_t k, int m, int m_valid, int64_t k0, float (&v)[8]) {
  if (m < m_valid && k0 + 8 <= k) {
    load8(x + m * k + k0, v);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = (m < m_valid && k0 + i < k) ? to_float(x[m * k + k0 + i]) : 0.0f;
  }
}

// Reduce acc[kRows][MB] over the block and write y (+ bias).
template <int MB, typename T>
__device__ __forceinline__ void reduce_and_store(float (&acc)[kRows][MB], const T* __restrict__ bias, T* __restrict__ y, int64_t n0,
                                                 int64_t n, int m_valid) {
  __shared__ float partial[kWarps][kRows * MB];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) partial[warp][r * MB + m] = v;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < kRows * MB; i += blockDim.x) {
    const int r = i / MB, m = i % MB;
    const int64_t row = n0 + r;
    if (row >= n || m >= m_valid) continue;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += partial[w][i];
    if (bias != nullptr) v += to_float(bias[row]);
    y[m * n + row] = from_float<T>(v);
  }
}

// Vector path. FMT 4: data [n, kp / 2] (kp = groups * group, a multiple of 32), a 16-byte chunk = 32 values of one
// group. FMT 8: data [n, k] with k a multiple of 16, a chunk = 16 values.
template <int MB, int FMT, typename T>
__global__ void __launch_bounds__(kThreads) skinny_gemm_kernel(const T* __restrict__ x, const uint8_t* __restrict__ data,
                                                               const float* __restrict__ scales, const uint8_t* __restrict__ zeros,
                                                               int64_t group, int64_t groups, const T* __restrict__ bias,
                                                               T* __restrict__ y, int m_valid, int64_t n, int64_t k) {
  constexpr int kValues = FMT == 4 ? 32 : 16;  // values per 16-byte chunk
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t row_bytes = FMT == 4 ? groups * group / 2 : k;
  const int64_t chunks = row_bytes / 16;
  float acc[kRows][MB];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < MB; ++m) acc[r][m] = 0.0f;

  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    const int64_t k0 = c * kValues;
    uint4 wv[kRows];
    float scale[kRows], zero[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = min(n0 + r, n - 1);  // rows past n repeat the last one; never stored
      wv[r] = __ldg(reinterpret_cast<const uint4*>(data + row * row_bytes) + c);
      if (FMT == 4) {
        const int64_t g = row * groups + k0 / group;
        scale[r] = __ldg(scales + g);
        zero[r] = static_cast<float>(__ldg(zeros + g));
      } else {
        scale[r] = __ldg(scales + row);
        zero[r] = 0.0f;
      }
    }
#pragma unroll
    for (int sub = 0; sub < kValues / 8; ++sub) {  // 8 values per step
      const int64_t kk = k0 + sub * 8;
      if (kk >= k) continue;  // the int4 padding (continue, not break: the loop stays fully unrolled)
      float w[kRows][8];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const uint32_t words[4] = {wv[r].x, wv[r].y, wv[r].z, wv[r].w};
        if (FMT == 4) {
          const uint32_t word = words[sub];  // 8 nibbles, low first = k ascending
#pragma unroll
          for (int i = 0; i < 8; ++i) w[r][i] = (static_cast<float>((word >> (4 * i)) & 0xFu) - zero[r]) * scale[r];
        } else {
          const uint32_t lo = words[2 * sub], hi = words[2 * sub + 1];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            w[r][i] = static_cast<float>(static_cast<int8_t>((lo >> (8 * i)) & 0xFFu)) * scale[r];
            w[r][4 + i] = static_cast<float>(static_cast<int8_t>((hi >> (8 * i)) & 0xFFu)) * scale[r];
          }
        }
      }
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        float xv[8];
        load8_masked(x, k, m, m_valid, kk, xv);
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[r][m] = __fmaf_rn(xv[i], w[r][i], acc[r][m]);
      }
    }
  }
  reduce_and_store<MB>(acc, bias, y, n0, n, m_valid);
}

// Scalar path: any K, any alignment; one value per thread per step, up to 16 tokens.
template <int FMT, typename T>
__global__ void __launch_bounds__(kThreads) skinny_gemm_scalar_kernel(const T* __restrict__ x, const uint8_t* __restrict__ data,
                                                                      const float* __restrict__ scales,
                                                                      const uint8_t* __restrict__ zeros, int64_t group, int64_t groups,
                                                                      const T* __restrict__ bias, T* __restrict__ y, int m_valid,
                                                                      int64_t n, int64_t k) {
  constexpr int MB = 16;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t row_bytes = FMT == 4 ? groups * group / 2 : k;
  float acc[kRows][MB];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < MB; ++m) acc[r][m] = 0.0f;
  for (int64_t kk = threadIdx.x; kk < k; kk += kThreads) {
    float w[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = min(n0 + r, n - 1);
      if (FMT == 4) {
        const uint8_t b = __ldg(data + row * row_bytes + kk / 2);
        const int64_t g = row * groups + kk / group;
        w[r] = (static_cast<float>((kk & 1) ? (b >> 4) : (b & 0x0F)) - static_cast<float>(__ldg(zeros + g))) * __ldg(scales + g);
      } else {
        w[r] = static_cast<float>(static_cast<int8_t>(__ldg(data + row * row_bytes + kk))) * __ldg(scales + row);
      }
    }
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (m >= m_valid) break;
      const float xv = to_float(x[m * k + kk]);
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r][m] = __fmaf_rn(xv, w[r], acc[r][m]);
    }
  }
  reduce_and_store<MB>(acc, bias, y, n0, n, m_valid);
}

template <int FMT, typename T>
cudaError_t launch(const T* x, const uint8_t* data, const float* scales, const uint8_t* zeros, int64_t group, const T* bias, T* y,
                   int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  const int64_t groups = FMT == 4 ? (k + group - 1) / group : 1;
  const int64_t blocks = (n + kRows - 1) / kRows;
  if (blocks > 2147483647LL) return cudaErrorInvalidValue;
  const int mv = static_cast<int>(m);
  const auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; };
  const bool vec = k % 8 == 0 && (FMT == 4 || k % 16 == 0) && aligned(x) && aligned(data);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kThreads);
  if (!vec) {
    skinny_gemm_scalar_kernel<FMT, T><<<grid, block, 0, stream>>>(x, data, scales, zeros, group, groups, bias, y, mv, n, k);
  } else if (m <= 1) {
    skinny_gemm_kernel<1, FMT, T><<<grid, block, 0, stream>>>(x, data, scales, zeros, group, groups, bias, y, mv, n, k);
  } else if (m <= 2) {
    skinny_gemm_kernel<2, FMT, T><<<grid, block, 0, stream>>>(x, data, scales, zeros, group, groups, bias, y, mv, n, k);
  } else if (m <= 4) {
    skinny_gemm_kernel<4, FMT, T><<<grid, block, 0, stream>>>(x, data, scales, zeros, group, groups, bias, y, mv, n, k);
  } else if (m <= 8) {
    skinny_gemm_kernel<8, FMT, T><<<grid, block, 0, stream>>>(x, data, scales, zeros, group, groups, bias, y, mv, n, k);
  } else {
    skinny_gemm_kernel<16, FMT, T><<<grid, block, 0, stream>>>(x, data, scales, zeros, group, groups, bias, y, mv, n, k);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fmt(int fmt, const void* x, const uint8_t* data, const float* scales, const uint8_t* zeros, int64_t group,
                       const void* bias, void* y, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  const T* bt = static_cast<const T*>(bias);
  T* yt = static_cast<T*>(y);
  if (fmt == OFFSITE_FMT_INT4) return launch<4, T>(xt, data, scales, zeros, group, bt, yt, m, n, k, stream);
  if (fmt == OFFSITE_FMT_INT8) return launch<8, T>(xt, data, scales, zeros, group, bt, yt, m, n, k, stream);
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace offsite_cuda

extern "C" cudaError_t offsite_skinny_gemm(const void* x, int dtype, int fmt, const uint8_t* data, const float* scales,
                                           const uint8_t* zeros, int64_t group, const void* bias, void* y, int64_t m, int64_t n,
                                           int64_t k, cudaStream_t stream) {
  using namespace offsite_cuda;
  if (m < 1 || m > 16 || n < 0 || k < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (fmt == OFFSITE_FMT_INT4 && group != 32 && group != 64 && group != 128) return cudaErrorInvalidValue;
  switch (dtype) {
    case OFFSITE_F32:
      return launch_fmt<float>(fmt, x, data, scales, zeros, group, bias, y, m, n, k, stream);
    case OFFSITE_F16:
      return launch_fmt<__half>(fmt, x, data, scales, zeros, group, bias, y, m, n, k, stream);
    case OFFSITE_BF16:
      return launch_fmt<__nv_bfloat16>(fmt, x, data, scales, zeros, group, bias, y, m, n, k, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
