// CPU kernels of the native extension (no input checks here: csrc/module.cpp checks every argument first).
//
// Weight formats (offsite_kernels/quant/weight.py is the reference):
//   int8: symmetric per output channel, w[n, k] ~= q[n, k] * scale[n], q in [-127, 127].
//   int4: asymmetric group-wise along K, w[n, k] ~= (q[n, k] - zero[n, g]) * scale[n, g], g = k / group,
//         two values per byte (low nibble = even k); K padded to whole groups by repeating the row's last value.
//   fp8:  e4m3fn bytes with one fp32 scale per output channel.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace offsite::cpu {

enum class Format { kInt8, kInt4, kFp8 };

// Quantize a [N, K] float/half/bfloat16 weight, bit-exact with quantize_int8 / quantize_int4 of the reference.
std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& w);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4(const at::Tensor& w, int64_t group_size);

// [N, K] uint8 values in [0, 15] (K even) <-> [N, K / 2] packed bytes, low nibble first.
at::Tensor pack_int4(const at::Tensor& q);
void unpack_int4(const at::Tensor& packed, at::Tensor& out);

// Dense [N, K] weight in out's dtype (float32, float16 or bfloat16), bit-exact with dequantize_fields.
void dequantize(Format fmt, const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                int64_t group_size, at::Tensor& out);

// y[M, N] = x[M, K] @ deq(W)[N, K]^T (+ bias); dx[M, K] = dy[M, N] @ deq(W)[N, K]. The weight is dequantized tile
// by tile into a per-thread buffer of a few hundred KiB and multiplied there (never the whole dense weight).
void frozen_linear_fwd(const at::Tensor& x, Format fmt, const at::Tensor& data, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t group_size,
                       at::Tensor& y);
void frozen_linear_bwd(const at::Tensor& dy, Format fmt, const at::Tensor& data, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, int64_t group_size, at::Tensor& dx);

// Tile sizes of the frozen linear (elements), exposed for tests and benchmarks. A forward task dequantizes up to
// fwd_n x fwd_k weights into its fp32 buffer (2 MiB: this machine's L2 per core) and runs one sgemm on it; wide
// tiles matter because each sgemm call re-packs its slice of x (cost ~ 1 / (2 * tile width) per flop).
struct TileConfig {
  int64_t fwd_n = 512;    // output columns per forward task (upper bound; at least one task per thread)
  int64_t fwd_k = 1024;   // reduction chunk of the forward
  int64_t bwd_k = 512;    // output columns (of dx) per backward task (upper bound)
  int64_t bwd_n = 1024;   // reduction chunk of the backward
};
TileConfig& tile_config();

// Whether the frozen linear calls torch's BLAS sgemm_ directly (true, the default, where found) or at::mm_out;
// returns the previous setting. For tests and benchmarks.
bool set_external_blas(bool enabled);
bool external_blas_found();

}  // namespace offsite::cpu
