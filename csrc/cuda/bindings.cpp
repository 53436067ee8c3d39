// torch bindings of the CUDA kernels: tensors -> raw pointers, the current stream, the launch status and the
// kernels' bad-value flags -> Python exceptions. Kept apart from csrc/cuda/*.cu so that those compile with nvcc
// alone; this file needs a CUDA build of torch (c10/cuda headers).
#include "bindings.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cpu/cpu_ops.h"
#include "launchers.h"

namespace offsite::cuda {
namespace {

int dtype_code(at::ScalarType s) {
  switch (s) {
    case at::kFloat:
      return OFFSITE_F32;
    case at::kHalf:
      return OFFSITE_F16;
    case at::kBFloat16:
      return OFFSITE_BF16;
    default:
      TORCH_CHECK_TYPE(false, "expected float32, float16 or bfloat16, got ", s);
  }
  return -1;
}

int fmt_code(int fmt) {
  switch (static_cast<offsite::cpu::Format>(fmt)) {
    case offsite::cpu::Format::kInt8:
      return OFFSITE_FMT_INT8;
    case offsite::cpu::Format::kInt4:
      return OFFSITE_FMT_INT4;
    case offsite::cpu::Format::kFp8:
      return OFFSITE_FMT_FP8;
  }
  TORCH_CHECK_VALUE(false, "unknown format code ", fmt);
  return -1;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// A zeroed device flag the kernels raise on bad values; reading it back synchronises with the stream.
struct BadFlag {
  at::Tensor t;
  explicit BadFlag(const at::Device& device) : t(at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device))) {}
  int* ptr() { return t.data_ptr<int>(); }
  bool raised() const { return t.item<int>() != 0; }
};

const uint8_t* bytes(const at::Tensor& t) { return static_cast<const uint8_t*>(t.data_ptr()); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& w) {
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor q = at::empty({n, k}, w.options().dtype(at::kChar));
  at::Tensor scales = at::empty({n}, w.options().dtype(at::kFloat));
  BadFlag bad(w.device());
  check_launch(offsite_quantize_int8(w.data_ptr(), dtype_code(w.scalar_type()), n, k, q.data_ptr<int8_t>(), scales.data_ptr<float>(),
                                     bad.ptr(), stream()),
               "quantize_int8");
  TORCH_CHECK_VALUE(!bad.raised(), "the weight holds NaN or infinite values; it cannot be quantized");
  return {q, scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4(const at::Tensor& w, int64_t group) {
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t n = w.size(0), k = w.size(1), groups = (k + group - 1) / group;
  at::Tensor data = at::empty({n, groups * group / 2}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({n, groups}, w.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({n, groups}, w.options().dtype(at::kByte));
  BadFlag bad(w.device());
  check_launch(offsite_quantize_int4(w.data_ptr(), dtype_code(w.scalar_type()), n, k, group, data.data_ptr<uint8_t>(),
                                     scales.data_ptr<float>(), zeros.data_ptr<uint8_t>(), bad.ptr(), stream()),
               "quantize_int4");
  TORCH_CHECK_VALUE(!bad.raised(), "the weight holds NaN or infinite values; it cannot be quantized");
  return {data, scales, zeros};
}

at::Tensor pack_int4(const at::Tensor& q) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor packed = at::empty({q.size(0), q.size(1) / 2}, q.options());
  BadFlag bad(q.device());
  check_launch(offsite_pack_int4(bytes(q), q.size(0), q.size(1), packed.data_ptr<uint8_t>(), bad.ptr(), stream()), "pack_int4");
  TORCH_CHECK(!bad.raised(), "pack_int4: every value must be in [0, 15] (4 bits); got a larger one");
  return packed;
}

void unpack_int4(const at::Tensor& packed, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(packed.device());
  check_launch(offsite_unpack_int4(bytes(packed), packed.size(0), packed.size(1), out.data_ptr<uint8_t>(), stream()), "unpack_int4");
}

void dequantize(int fmt, const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& zeros, int64_t group,
                at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(data.device());
  const int64_t groups = scales.dim() == 2 ? scales.size(1) : 1;
  check_launch(offsite_dequantize(fmt_code(fmt), bytes(data), data.size(1) * data.element_size(), scales.data_ptr<float>(),
                                  zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr, groups, group, out.size(0), out.size(1),
                                  out.data_ptr(), dtype_code(out.scalar_type()), stream()),
               "dequantize");
}

void skinny_gemm(const at::Tensor& x, int fmt, const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                 const std::optional<at::Tensor>& bias, int64_t group, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(offsite_skinny_gemm(x.data_ptr(), dtype_code(x.scalar_type()), fmt_code(fmt), bytes(data), scales.data_ptr<float>(),
                                   zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr, group,
                                   bias.has_value() ? bias->data_ptr() : nullptr, out.data_ptr(), x.size(0), out.size(1), x.size(1),
                                   stream()),
               "skinny_gemm");
}

}  // namespace offsite::cuda
