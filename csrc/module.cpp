// Python bindings of the native extension (offsite_kernels._C): argument checks, then the CPU kernels
// (csrc/cpu/) or, in a build with CUDA, the CUDA kernels (csrc/cuda/, through csrc/cuda/bindings.cpp).
//
// Every entry point checks device, dtype, contiguity and shapes first and raises a Python exception naming the
// argument: TypeError for a wrong dtype, ValueError for a wrong shape or value, RuntimeError otherwise. Outputs
// are written into caller-provided tensors (`out`), checked the same way.
#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

#include "cpu/cpu_ops.h"
#ifdef OFFSITE_WITH_CUDA
#include "cuda/bindings.h"
#endif

namespace {

using offsite::cpu::Format;

constexpr int64_t kGroupSizes[] = {32, 64, 128};
constexpr int64_t kMaxDim = int64_t{1} << 40;  // no weight dimension comes near it; keeps size arithmetic in range
constexpr int64_t kMaxTile = int64_t{1} << 31;

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

Format parse_format(const std::string& fmt) {
  if (fmt == "int8") return Format::kInt8;
  if (fmt == "int4") return Format::kInt4;
  if (fmt == "fp8") return Format::kFp8;
  TORCH_CHECK_VALUE(false, "fmt must be 'int8', 'int4' or 'fp8', got '", fmt, "'");
  return Format::kInt8;  // unreachable
}

void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the op runs on ", device,
              "; move every argument to one device");
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.layout() == at::kStrided, name, " must be a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (strides ", t.strides(), " for shape ", t.sizes(),
              "); call .contiguous() first");
}

// An output must not share memory with an input (the kernels read inputs while they write outputs).
void check_no_overlap(const at::Tensor& out, const at::Tensor& input, const char* input_name) {
  const auto overlap = at::get_overlap_status(out, input);
  TORCH_CHECK(overlap == at::MemOverlapStatus::No, "out shares memory with ", input_name,
              "; give a separate output tensor");
}

// ... nor with any field of the stored weight.
void check_apart_from_weight(const at::Tensor& out, const at::Tensor& data, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros) {
  check_no_overlap(out, data, "data");
  check_no_overlap(out, scales, "scales");
  if (zeros.has_value()) check_no_overlap(out, *zeros, "zeros");
}

void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got shape ", shape_str(t));
}

void check_floating(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", s);
}

void check_group(int64_t group) {
  bool ok = false;
  for (int64_t g : kGroupSizes) ok |= g == group;
  TORCH_CHECK_VALUE(ok, "int4 group_size must be 32, 64 or 128, got ", group);
}

bool on_cuda(const at::Tensor& t) { return t.device().is_cuda(); }

[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, op, ": this build of offsite_kernels._C has no CUDA kernels (it was built without a CUDA torch or "
              "without nvcc); rebuild on a machine with both (pip install --no-build-isolation -e .)");
}

void check_supported_device(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), op, ": tensors on ", t.device(), " are not supported (CPU or CUDA)");
#ifndef OFFSITE_WITH_CUDA
  if (on_cuda(t)) no_cuda(op);
#endif
}

// The stored weight of format `fmt` for an [n, k] matrix: dtypes, shapes, device, contiguity.
void check_weight(Format fmt, const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                  int64_t group, int64_t n, int64_t k, const at::Device& device) {
  TORCH_CHECK_VALUE(n >= 0 && k >= 0 && n <= kMaxDim && k <= kMaxDim, "the weight shape [", n, ", ", k,
                    "] is out of range (each dimension at most 2^40)");
  check_2d(data, "data");
  check_device(data, "data", device);
  check_contiguous(data, "data");
  check_device(scales, "scales", device);
  check_contiguous(scales, "scales");
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, "scales must be float32, got ", scales.scalar_type());
  if (fmt == Format::kInt4) {
    check_group(group);
    const int64_t groups = (k + group - 1) / group;
    TORCH_CHECK_TYPE(data.scalar_type() == at::kByte, "int4 data must be uint8 (two values per byte), got ", data.scalar_type());
    TORCH_CHECK_VALUE(data.size(0) == n && data.size(1) == groups * group / 2, "int4 data must have shape [", n, ", ",
                      groups * group / 2, "] for a [", n, ", ", k, "] weight with group_size ", group, ", got ",
                      shape_str(data));
    TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == groups, "int4 scales must have shape [",
                      n, ", ", groups, "], got ", shape_str(scales));
    TORCH_CHECK_VALUE(zeros.has_value(), "int4 needs zeros (zero points), got None");
    check_device(*zeros, "zeros", device);
    check_contiguous(*zeros, "zeros");
    TORCH_CHECK_TYPE(zeros->scalar_type() == at::kByte, "int4 zeros must be uint8, got ", zeros->scalar_type());
    TORCH_CHECK_VALUE(zeros->sizes() == scales.sizes(), "int4 zeros must have the shape of scales ", shape_str(scales),
                      ", got ", shape_str(*zeros));
  } else {
    const auto s = data.scalar_type();
    if (fmt == Format::kInt8) {
      TORCH_CHECK_TYPE(s == at::kChar, "int8 data must be int8, got ", s);
    } else {
      TORCH_CHECK_TYPE(s == at::kByte || s == at::kFloat8_e4m3fn, "fp8 data must be float8_e4m3fn (or its uint8 view), got ", s);
    }
    TORCH_CHECK_VALUE(data.size(0) == n && data.size(1) == k, "data must have shape [", n, ", ", k, "], got ", shape_str(data));
    TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == n, "scales must have shape [", n, "] (one per output channel), got ",
                      shape_str(scales));
    TORCH_CHECK_VALUE(!zeros.has_value(), "zeros must be None for ", fmt == Format::kInt8 ? "int8" : "fp8");
  }
}

void check_out(const at::Tensor& out, const char* name, at::IntArrayRef shape, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK_VALUE(out.sizes() == shape, name, " must have shape ", shape, ", got ", shape_str(out));
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, name, " must be ", dtype, ", got ", out.scalar_type());
  check_device(out, name, device);
  check_contiguous(out, name);
}

at::Tensor u8(const at::Tensor& t) { return t.scalar_type() == at::kFloat8_e4m3fn ? t.view(at::kByte) : t; }

// --- quantize / pack --------------------------------------------------------------------------------------------

void check_weight_input(const at::Tensor& w, const char* op) {
  check_supported_device(w, op);
  check_2d(w, "w");
  check_floating(w, "w");
  check_contiguous(w, "w");
  TORCH_CHECK_VALUE(w.size(0) > 0 && w.size(1) > 0, op, ": the weight is empty (shape ", shape_str(w), ")");
}

std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& w) {
  check_weight_input(w, "quantize_int8");
#ifdef OFFSITE_WITH_CUDA
  if (on_cuda(w)) return offsite::cuda::quantize_int8(w);
#endif
  return offsite::cpu::quantize_int8(w);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4(const at::Tensor& w, int64_t group_size) {
  check_weight_input(w, "quantize_int4");
  check_group(group_size);
#ifdef OFFSITE_WITH_CUDA
  if (on_cuda(w)) return offsite::cuda::quantize_int4(w, group_size);
#endif
  return offsite::cpu::quantize_int4(w, group_size);
}

at::Tensor pack_int4(const at::Tensor& q) {
  check_supported_device(q, "pack_int4");
  check_2d(q, "q");
  check_contiguous(q, "q");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kByte, "q must be uint8 (values in [0, 15]), got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.size(1) % 2 == 0, "pack_int4 needs an even number of columns, got ", q.size(1));
#ifdef OFFSITE_WITH_CUDA
  if (on_cuda(q)) return offsite::cuda::pack_int4(q);
#endif
  return offsite::cpu::pack_int4(q);
}

at::Tensor unpack_int4(const at::Tensor& packed, at::Tensor out) {
  check_supported_device(packed, "unpack_int4");
  check_2d(packed, "packed");
  check_contiguous(packed, "packed");
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.size(1) <= kMaxDim, "packed has ", packed.size(1), " columns; at most 2^40");
  check_out(out, "out", {packed.size(0), 2 * packed.size(1)}, at::kByte, packed.device());
  check_no_overlap(out, packed, "packed");
#ifdef OFFSITE_WITH_CUDA
  if (on_cuda(packed)) {
    offsite::cuda::unpack_int4(packed, out);
    return out;
  }
#endif
  offsite::cpu::unpack_int4(packed, out);
  return out;
}

at::Tensor dequantize(const std::string& fmt_name, const at::Tensor& data, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, int64_t group_size, at::Tensor out) {
  const Format fmt = parse_format(fmt_name);
  check_supported_device(data, "dequantize");
  check_2d(out, "out");
  check_floating(out, "out");
  check_weight(fmt, data, scales, zeros, group_size, out.size(0), out.size(1), data.device());
  check_out(out, "out", out.sizes(), out.scalar_type(), data.device());
  check_apart_from_weight(out, data, scales, zeros);
#ifdef OFFSITE_WITH_CUDA
  if (on_cuda(data)) {
    offsite::cuda::dequantize(static_cast<int>(fmt), u8(data), scales, zeros, group_size, out);
    return out;
  }
#endif
  offsite::cpu::dequantize(fmt, u8(data), scales, zeros, group_size, out);
  return out;
}

// --- frozen linear ----------------------------------------------------------------------------------------------

at::Tensor frozen_linear_fwd(const at::Tensor& x, const std::string& fmt_name, const at::Tensor& data, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                             int64_t group_size, at::Tensor out) {
  const Format fmt = parse_format(fmt_name);
  check_2d(x, "x");
  check_floating(x, "x");
  check_contiguous(x, "x");
  TORCH_CHECK(x.device().is_cpu(), "frozen_linear_fwd (native) runs on the CPU; x is on ", x.device(),
              " (on a GPU use skinny_gemm for M <= 16, or the triton backend)");
  check_2d(out, "out");
  const int64_t n = out.size(1), k = x.size(1);
  check_out(out, "out", {x.size(0), n}, x.scalar_type(), x.device());
  check_weight(fmt, data, scales, zeros, group_size, n, k, x.device());
  if (bias.has_value()) {
    check_device(*bias, "bias", x.device());
    check_contiguous(*bias, "bias");
    check_floating(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "bias must have shape [", n, "], got ", shape_str(*bias));
    check_no_overlap(out, *bias, "bias");
  }
  check_no_overlap(out, x, "x");
  check_apart_from_weight(out, data, scales, zeros);
  offsite::cpu::frozen_linear_fwd(x, fmt, u8(data), scales, zeros, bias, group_size, out);
  return out;
}

at::Tensor frozen_linear_bwd(const at::Tensor& dy, const std::string& fmt_name, const at::Tensor& data, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, int64_t group_size, at::Tensor out) {
  const Format fmt = parse_format(fmt_name);
  check_2d(dy, "grad_y");
  check_floating(dy, "grad_y");
  check_contiguous(dy, "grad_y");
  TORCH_CHECK(dy.device().is_cpu(), "frozen_linear_bwd (native) runs on the CPU; grad_y is on ", dy.device());
  check_2d(out, "out");
  const int64_t n = dy.size(1), k = out.size(1);
  check_out(out, "out", {dy.size(0), k}, dy.scalar_type(), dy.device());
  check_weight(fmt, data, scales, zeros, group_size, n, k, dy.device());
  check_no_overlap(out, dy, "grad_y");
  check_apart_from_weight(out, data, scales, zeros);
  offsite::cpu::frozen_linear_bwd(dy, fmt, u8(data), scales, zeros, group_size, out);
  return out;
}

// --- skinny GEMM (CUDA) -----------------------------------------------------------------------------------------

at::Tensor skinny_gemm(const at::Tensor& x, const std::string& fmt_name, const at::Tensor& data, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t group_size,
                       at::Tensor out) {
  const Format fmt = parse_format(fmt_name);
  TORCH_CHECK_VALUE(fmt != Format::kFp8, "skinny_gemm supports int8 and int4 weights, got fp8");
  check_2d(x, "x");
  check_contiguous(x, "x");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
                   "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cuda(), "skinny_gemm runs on a CUDA GPU; x is on ", x.device());
  TORCH_CHECK_VALUE(x.size(0) >= 1 && x.size(0) <= 16, "skinny_gemm handles 1 to 16 rows of x (M <= 16), got M = ", x.size(0));
  check_2d(out, "out");
  const int64_t n = out.size(1), k = x.size(1);
  check_out(out, "out", {x.size(0), n}, x.scalar_type(), x.device());
  check_weight(fmt, data, scales, zeros, group_size, n, k, x.device());
  if (bias.has_value()) {
    check_device(*bias, "bias", x.device());
    check_contiguous(*bias, "bias");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype ", x.scalar_type(), ", got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "bias must have shape [", n, "], got ", shape_str(*bias));
    check_no_overlap(out, *bias, "bias");
  }
  check_no_overlap(out, x, "x");
  check_apart_from_weight(out, data, scales, zeros);
#ifdef OFFSITE_WITH_CUDA
  offsite::cuda::skinny_gemm(x, static_cast<int>(fmt), data, scales, zeros, bias, group_size, out);
  return out;
#else
  no_cuda("skinny_gemm");
#endif
}

// --- introspection ----------------------------------------------------------------------------------------------

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef OFFSITE_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch"] = TORCH_VERSION;
  info["external_blas"] = offsite::cpu::external_blas_found();
  return info;
}

std::tuple<int64_t, int64_t, int64_t, int64_t> get_tiles() {
  const auto& c = offsite::cpu::tile_config();
  return {c.fwd_n, c.fwd_k, c.bwd_k, c.bwd_n};
}

void set_tiles(int64_t fwd_n, int64_t fwd_k, int64_t bwd_k, int64_t bwd_n) {
  TORCH_CHECK_VALUE(fwd_n > 0 && fwd_k > 0 && bwd_k > 0 && bwd_n > 0, "tile sizes must be positive");
  TORCH_CHECK_VALUE(fwd_n <= kMaxTile && fwd_k <= kMaxTile && bwd_k <= kMaxTile && bwd_n <= kMaxTile,
                    "tile sizes must be at most 2^31");
  auto& c = offsite::cpu::tile_config();
  c.fwd_n = fwd_n;
  c.fwd_k = fwd_k;
  c.bwd_k = bwd_k;
  c.bwd_n = bwd_n;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "offsite_kernels native extension: C++ (CPU) and CUDA kernels for the low-bit weight formats";
  m.def("quantize_int8", &quantize_int8, py::arg("w"), "[N, K] float -> (int8 q [N, K], float32 scales [N])");
  m.def("quantize_int4", &quantize_int4, py::arg("w"), py::arg("group_size"),
        "[N, K] float -> (uint8 packed [N, Kp/2], float32 scales [N, G], uint8 zeros [N, G])");
  m.def("pack_int4", &pack_int4, py::arg("q"), "[N, K] uint8 in [0, 15] -> [N, K/2] uint8, low nibble first");
  m.def("unpack_int4", &unpack_int4, py::arg("packed"), py::arg("out"), "[N, B] uint8 -> out [N, 2B] uint8");
  m.def("dequantize", &dequantize, py::arg("fmt"), py::arg("data"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"),
        py::arg("out"), "dense weight into out [N, K] (float32, float16 or bfloat16)");
  m.def("frozen_linear_fwd", &frozen_linear_fwd, py::arg("x"), py::arg("fmt"), py::arg("data"), py::arg("scales"),
        py::arg("zeros"), py::arg("bias"), py::arg("group_size"), py::arg("out"),
        "CPU: out[M, N] = x[M, K] @ deq(W)^T (+ bias), tile by tile");
  m.def("frozen_linear_bwd", &frozen_linear_bwd, py::arg("grad_y"), py::arg("fmt"), py::arg("data"), py::arg("scales"),
        py::arg("zeros"), py::arg("group_size"), py::arg("out"), "CPU: out[M, K] = grad_y[M, N] @ deq(W), tile by tile");
  m.def("skinny_gemm", &skinny_gemm, py::arg("x"), py::arg("fmt"), py::arg("data"), py::arg("scales"), py::arg("zeros"),
        py::arg("bias"), py::arg("group_size"), py::arg("out"), "CUDA, M <= 16: out = x @ deq(W)^T (+ bias)");
  m.def("build_info", &build_info, "how this extension was built");
  m.def("get_tiles", &get_tiles, "CPU frozen linear tile sizes (fwd_n, fwd_k, bwd_k, bwd_n)");
  m.def("set_tiles", &set_tiles, py::arg("fwd_n"), py::arg("fwd_k"), py::arg("bwd_k"), py::arg("bwd_n"));
  m.def("set_external_blas", &offsite::cpu::set_external_blas, py::arg("enabled"),
        "CPU frozen linear: call torch's sgemm_ directly (True) or at::mm_out (False); returns the previous setting");
}
