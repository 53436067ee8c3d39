// torch-facing wrappers of the CUDA launchers (csrc/cuda/launchers.h). Compiled only in a build with a CUDA torch
// (setup.py defines OFFSITE_WITH_CUDA); csrc/module.cpp has checked every argument before calling these.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace offsite::cuda {

std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& w);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4(const at::Tensor& w, int64_t group_size);
at::Tensor pack_int4(const at::Tensor& q);
void unpack_int4(const at::Tensor& packed, at::Tensor& out);
// fmt: offsite::cpu::Format as int (0 int8, 1 int4, 2 fp8)
void dequantize(int fmt, const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                int64_t group_size, at::Tensor& out);
void skinny_gemm(const at::Tensor& x, int fmt, const at::Tensor& data, const at::Tensor& scales,
                 const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t group_size,
                 at::Tensor& out);

}  // namespace offsite::cuda
