// Launchers of the CUDA kernels: plain C entry points on raw pointers and a cudaStream_t, no torch types, so
// that csrc/cuda/*.cu compile with nvcc alone (CI compiles them for sm_80 and sm_90 without a CUDA torch).
// csrc/cuda/bindings.cpp wraps them for torch, after csrc/module.cpp has checked every argument.
//
// Every launcher returns the cudaError_t of its launch (cudaSuccess, or why it failed). Kernels that can find bad
// values (NaN/inf weights, 4-bit values above 15) raise a flag in `bad` (a device int the caller zeroes and reads).
//
// dtype codes: 0 float32, 1 float16, 2 bfloat16. Formats: 8 = int8 per channel, 4 = int4 group-wise, 3 = fp8 e4m3.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { OFFSITE_F32 = 0, OFFSITE_F16 = 1, OFFSITE_BF16 = 2 };
enum { OFFSITE_FMT_FP8 = 3, OFFSITE_FMT_INT4 = 4, OFFSITE_FMT_INT8 = 8 };

// w [n, k] (dtype) -> q [n, k] int8, scales [n] float32. Bit-exact with quantize_int8 of the reference.
cudaError_t offsite_quantize_int8(const void* w, int dtype, int64_t n, int64_t k, int8_t* q, float* scales, int* bad,
                                  cudaStream_t stream);

// w [n, k] (dtype) -> packed [n, groups * group / 2] uint8, scales [n, groups] float32, zeros [n, groups] uint8.
cudaError_t offsite_quantize_int4(const void* w, int dtype, int64_t n, int64_t k, int64_t group, uint8_t* packed,
                                  float* scales, uint8_t* zeros, int* bad, cudaStream_t stream);

// q [n, k] uint8 in [0, 15] (k even) -> packed [n, k / 2]; values above 15 raise `bad`.
cudaError_t offsite_pack_int4(const uint8_t* q, int64_t n, int64_t k, uint8_t* packed, int* bad, cudaStream_t stream);

// packed [n, kb] -> out [n, 2 kb] uint8 in [0, 15].
cudaError_t offsite_unpack_int4(const uint8_t* packed, int64_t n, int64_t kb, uint8_t* out, cudaStream_t stream);

// Dense out [n, k] (out_dtype) from the stored fields; `row_bytes` = bytes per row of data, `groups` = scales per
// row (int4; 1 otherwise). Bit-exact with dequantize_fields of the reference.
cudaError_t offsite_dequantize(int fmt, const uint8_t* data, int64_t row_bytes, const float* scales, const uint8_t* zeros,
                               int64_t groups, int64_t group, int64_t n, int64_t k, void* out, int out_dtype,
                               cudaStream_t stream);

// Skinny GEMM, 1 <= m <= 16: y [m, n] = x [m, k] @ deq(W)[n, k]^T (+ bias [n]); x, bias and y in dtype; W int8
// (fmt 8: data [n, k]) or int4 (fmt 4: data [n, groups * group / 2], scales/zeros [n, groups]).
cudaError_t offsite_skinny_gemm(const void* x, int dtype, int fmt, const uint8_t* data, const float* scales,
                                const uint8_t* zeros, int64_t group, const void* bias, void* y, int64_t m, int64_t n,
                                int64_t k, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
