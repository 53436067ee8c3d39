// CPU kernels: quantize / pack / unpack / dequantize (bit-exact with offsite_kernels/quant/formats.py) and the
// tiled frozen linear (forward and input gradient). Multi-threaded with at::parallel_for (torch's OpenMP pool,
// so torch.set_num_threads applies); the GEMMs of the frozen linear go through at::native::cpublas::gemm (MKL or
// torch's own BLAS), called single-threaded inside each task.
//
// Bit-exactness: every value is computed with the same float32 operations, in the same order, as the reference
// (division, not multiplication by a reciprocal; round half to even; no fused multiply-add: built with
// -ffp-contract=off). Hot loops are plain C++ that the compiler vectorizes; on x86-64 Linux with GCC they are
// cloned for AVX2 and AVX-512 and the best clone is picked at load time (no -march flag: one build runs anywhere).
#include "cpu_ops.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstring>
#include <vector>

#include <dlfcn.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && !defined(OFFSITE_NO_CLONES)
#define OFFSITE_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define OFFSITE_CLONES
#endif

namespace offsite::cpu {
namespace {

// Round half to even for |v| < 2^22; larger magnitudes (and infinities) come out beyond every clamp bound used
// below, so the clamped result equals that of nearbyint. Vectorizes, unlike std::nearbyint without -ffast-math.
inline float round_half_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
}

inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// ---------------------------------------------------------------------------------------------------------------
// quantize

// Float reductions without -ffast-math do not vectorize; integer ones do. For finite floats, the bits with the
// sign cleared order like |x|, and `sortable` orders like x (NaN and infinities sort beyond every finite value).
inline uint32_t abs_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b & 0x7fffffffu;
}
inline int32_t sortable(float v) {
  int32_t b;
  std::memcpy(&b, &v, 4);
  return b ^ ((b >> 31) & 0x7fffffff);
}
inline float from_sortable(int32_t b) {
  b ^= (b >> 31) & 0x7fffffff;
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}
constexpr uint32_t kInfBits = 0x7f800000u;

// int8: amax of |row|, scale = max(amax / 127, FLT_MIN), q = clamp(round(w / scale), -127, 127).
// Returns false (and writes nothing) if the row holds NaN or an infinity.
OFFSITE_CLONES bool quantize_int8_row(const float* w, int64_t k, int8_t* q, float* scale) {
  uint32_t mb = 0;
  for (int64_t i = 0; i < k; ++i) {
    const uint32_t b = abs_bits(w[i]);
    mb = b > mb ? b : mb;
  }
  if (mb >= kInfBits) return false;
  float m;
  std::memcpy(&m, &mb, 4);
  float s = m / 127.0f;
  s = s < FLT_MIN ? FLT_MIN : s;
  *scale = s;
  for (int64_t i = 0; i < k; ++i)  // through int32: float -> int8 directly does not vectorize
    q[i] = static_cast<int8_t>(static_cast<int32_t>(clampf(round_half_even(w[i] / s), -127.0f, 127.0f)));
  return true;
}

// int4, one group: lo/hi over the group, scale = max((hi - lo) / 15, FLT_MIN), zero = clamp(round(-lo / scale), 0, 15),
// q = clamp(round(w / scale + zero), 0, 15). `w` holds `group` values (the caller pads the last group).
// Returns false if the group holds NaN or an infinity.
OFFSITE_CLONES bool quantize_int4_group(const float* w, int64_t group, uint8_t* packed, float* scale, uint8_t* zero) {
  int32_t lo = INT32_MAX, hi = INT32_MIN;
  for (int64_t i = 0; i < group; ++i) {
    const int32_t b = sortable(w[i]);
    lo = b < lo ? b : lo;
    hi = b > hi ? b : hi;
  }
  const float l = from_sortable(lo), h = from_sortable(hi);
  if (abs_bits(l) >= kInfBits || abs_bits(h) >= kInfBits) return false;
  float s = (h - l) / 15.0f;
  s = s < FLT_MIN ? FLT_MIN : s;
  const float z = clampf(round_half_even(-l / s), 0.0f, 15.0f);
  *scale = s;
  *zero = static_cast<uint8_t>(z);
  uint8_t q[128];
  for (int64_t i = 0; i < group; ++i)
    q[i] = static_cast<uint8_t>(static_cast<int32_t>(clampf(round_half_even(w[i] / s + z), 0.0f, 15.0f)));
  for (int64_t j = 0; j < group / 2; ++j) packed[j] = static_cast<uint8_t>(q[2 * j] | (q[2 * j + 1] << 4));
  return true;
}

// Rows of `w` (any floating dtype) as float32: the row itself for contiguous float32, else converted into `buf`.
template <typename T>
const float* row_as_float(const T* row, int64_t k, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    buf.resize(k);
    for (int64_t i = 0; i < k; ++i) buf[i] = static_cast<float>(row[i]);
    return buf.data();
  }
}

// Rows per parallel task so that one task handles at least ~64K elements.
int64_t row_grain(int64_t k) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(k, 1)); }

// ---------------------------------------------------------------------------------------------------------------
// dequantize a row segment [k0, k1) into float32 (the reference's float math: (q - zero) * scale, q * scale)

OFFSITE_CLONES void dequant_int4_segment(const uint8_t* row, const float* scales, const uint8_t* zeros, int64_t group,
                                         int64_t k0, int64_t k1, float* out) {
  int64_t k = k0;
  while (k < k1) {
    const int64_t g = k / group;
    const int64_t end = std::min(k1, (g + 1) * group);
    const float s = scales[g], z = static_cast<float>(zeros[g]);
    if (k & 1) {  // odd start: the high nibble of byte k / 2
      out[k - k0] = (static_cast<float>(row[k / 2] >> 4) - z) * s;
      ++k;
    }
    const int64_t pairs = (end - k) / 2;
    const uint8_t* b = row + k / 2;
    float* o = out + (k - k0);
    for (int64_t j = 0; j < pairs; ++j) {
      o[2 * j] = (static_cast<float>(b[j] & 0x0F) - z) * s;
      o[2 * j + 1] = (static_cast<float>(b[j] >> 4) - z) * s;
    }
    k += 2 * pairs;
    if (k < end) {  // odd end: the low nibble
      out[k - k0] = (static_cast<float>(row[k / 2] & 0x0F) - z) * s;
      ++k;
    }
  }
}

OFFSITE_CLONES void dequant_int8_segment(const int8_t* row, float s, int64_t k0, int64_t k1, float* out) {
  for (int64_t k = k0; k < k1; ++k) out[k - k0] = static_cast<float>(row[k]) * s;
}

struct Fp8Table {
  std::array<float, 256> v;
  Fp8Table() {
    for (int i = 0; i < 256; ++i) v[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
  }
};
const Fp8Table& fp8_table() {
  static const Fp8Table table;
  return table;
}

void dequant_fp8_segment(const uint8_t* row, float s, int64_t k0, int64_t k1, float* out) {
  const float* lut = fp8_table().v.data();
  for (int64_t k = k0; k < k1; ++k) out[k - k0] = lut[row[k]] * s;
}

// The stored weight, as raw pointers.
struct Weight {
  Format fmt;
  const uint8_t* data;
  int64_t row_bytes;  // bytes per row of data
  const float* scales;
  int64_t scale_stride;  // scales (and zeros) per row
  const uint8_t* zeros;
  int64_t group;

  // W[n, k0:k1) as float32 into out.
  void row_segment(int64_t n, int64_t k0, int64_t k1, float* out) const {
    const uint8_t* row = data + n * row_bytes;
    switch (fmt) {
      case Format::kInt4:
        dequant_int4_segment(row, scales + n * scale_stride, zeros + n * scale_stride, group, k0, k1, out);
        break;
      case Format::kInt8:
        dequant_int8_segment(reinterpret_cast<const int8_t*>(row), scales[n], k0, k1, out);
        break;
      case Format::kFp8:
        dequant_fp8_segment(row, scales[n], k0, k1, out);
        break;
    }
  }
};

Weight weight_view(Format fmt, const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                   int64_t group) {
  Weight w;
  w.fmt = fmt;
  w.data = static_cast<const uint8_t*>(data.data_ptr());
  w.row_bytes = data.size(1) * data.element_size();
  w.scales = scales.data_ptr<float>();
  w.scale_stride = scales.dim() == 2 ? scales.size(1) : 1;
  w.zeros = zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr;
  w.group = group;
  return w;
}

// Round float32 values to bfloat16 / float16 and back in place (the weight in the activation dtype, as the
// reference's dequantize(..., dtype) followed by a matmul in that dtype sees it).
void round_through(at::ScalarType dtype, float* v, int64_t n) {
  if (dtype == at::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(c10::BFloat16(v[i]));
  } else if (dtype == at::kHalf) {
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(c10::Half(v[i]));
  }
}

// --- GEMM ---------------------------------------------------------------------------------------------------------
// Column-major, BLAS conventions: C[m, n] = op(A)[m, k] . op(B)[k, n] + beta * C (beta 0: C is not read).

using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
                         const float*, const int*, const float*, float*, const int*);

SgemmFn find_sgemm() {
  for (const char* lib : {"libtorch_cpu.so", "libtorch_cpu.dylib"}) {
    if (void* handle = dlopen(lib, RTLD_NOW | RTLD_NOLOAD)) {
      if (void* fn = dlsym(handle, "sgemm_")) return reinterpret_cast<SgemmFn>(fn);
    }
  }
  return nullptr;
}

struct Blas {
  SgemmFn sgemm = find_sgemm();
  bool enabled = true;
};
Blas& blas() {
  static Blas b;
  return b;
}

// A column-major r x c matrix with leading dimension ld, as a tensor view (no copy).
at::Tensor col_major(const float* p, int64_t r, int64_t c, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {r, c}, {1, ld}, at::TensorOptions().dtype(at::kFloat));
}

void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
           int64_t ldb, float beta, float* c, int64_t ldc) {
  const Blas& bl = blas();
  const bool fits_int = std::max({m, n, k, lda, ldb, ldc}) < (int64_t{1} << 31);
  if (bl.enabled && bl.sgemm != nullptr && fits_int) {
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
    const float one = 1.0f;
    bl.sgemm(trans_a ? "T" : "N", trans_b ? "T" : "N", &im, &in, &ik, &one, a, &ilda, b, &ildb, &beta, c, &ildc);
    return;
  }
  const at::Tensor op_a = trans_a ? col_major(a, k, m, lda).t() : col_major(a, m, k, lda);
  const at::Tensor op_b = trans_b ? col_major(b, n, k, ldb).t() : col_major(b, k, n, ldb);
  at::Tensor out = col_major(c, m, n, ldc);
  if (beta == 0.0f) {
    at::mm_out(out, op_a, op_b);
  } else {
    out.addmm_(op_a, op_b);
  }
}

}  // namespace

bool set_external_blas(bool enabled) {
  const bool before = blas().enabled;
  blas().enabled = enabled;
  return before;
}

bool external_blas_found() { return blas().sgemm != nullptr; }

constexpr const char* kNotFinite = "the weight holds NaN or infinite values; it cannot be quantized";

TileConfig& tile_config() {
  static TileConfig config;
  return config;
}

// ---------------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& w) {
  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor q = at::empty({n, k}, w.options().dtype(at::kChar));
  at::Tensor scales = at::empty({n}, w.options().dtype(at::kFloat));
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  std::atomic<bool> not_finite{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "quantize_int8", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(k), [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      for (int64_t r = begin; r < end; ++r)
        if (!quantize_int8_row(row_as_float(wp + r * k, k, buf), k, qp + r * k, sp + r)) not_finite = true;
    });
  });
  TORCH_CHECK_VALUE(!not_finite, kNotFinite);
  return {q, scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4(const at::Tensor& w, int64_t group) {
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t groups = (k + group - 1) / group;
  at::Tensor data = at::empty({n, groups * group / 2}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({n, groups}, w.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({n, groups}, w.options().dtype(at::kByte));
  uint8_t* dp = data.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  uint8_t* zp = zeros.data_ptr<uint8_t>();
  std::atomic<bool> not_finite{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "quantize_int4", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(k), [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      float tail[128];
      for (int64_t r = begin; r < end; ++r) {
        const float* row = row_as_float(wp + r * k, k, buf);
        for (int64_t g = 0; g < groups; ++g) {
          const float* src = row + g * group;
          if ((g + 1) * group > k) {  // the last group, padded by repeating the row's last value
            const int64_t have = k - g * group;
            std::copy(src, src + have, tail);
            std::fill(tail + have, tail + group, row[k - 1]);
            src = tail;
          }
          if (!quantize_int4_group(src, group, dp + r * (groups * group / 2) + g * group / 2, sp + r * groups + g,
                                   zp + r * groups + g))
            not_finite = true;
        }
      }
    });
  });
  TORCH_CHECK_VALUE(!not_finite, kNotFinite);
  return {data, scales, zeros};
}

at::Tensor pack_int4(const at::Tensor& q) {
  const int64_t n = q.size(0), k = q.size(1);
  at::Tensor packed = at::empty({n, k / 2}, q.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, n, row_grain(k), [&](int64_t begin, int64_t end) {
    uint8_t bad = 0;
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* src = qp + r * k;
      uint8_t* dst = pp + r * (k / 2);
      for (int64_t j = 0; j < k / 2; ++j) {
        bad |= static_cast<uint8_t>(src[2 * j] | src[2 * j + 1]);
        dst[j] = static_cast<uint8_t>(src[2 * j] | (src[2 * j + 1] << 4));
      }
    }
    if (bad > 15) out_of_range = true;
  });
  TORCH_CHECK(!out_of_range, "pack_int4: every value must be in [0, 15] (4 bits); got a larger one");
  return packed;
}

void unpack_int4(const at::Tensor& packed, at::Tensor& out) {
  const int64_t n = packed.size(0), kb = packed.size(1);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, n, row_grain(2 * kb), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* src = pp + r * kb;
      uint8_t* dst = op + r * 2 * kb;
      for (int64_t j = 0; j < kb; ++j) {
        dst[2 * j] = src[j] & 0x0F;
        dst[2 * j + 1] = src[j] >> 4;
      }
    }
  });
}

namespace {
template <typename T>
void dequantize_rows(const Weight& w, int64_t n, int64_t k, T* op) {
  at::parallel_for(0, n, row_grain(k), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : k);
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (std::is_same_v<T, float>) {
        w.row_segment(r, 0, k, op + r * k);
      } else {
        w.row_segment(r, 0, k, buf.data());
        for (int64_t i = 0; i < k; ++i) op[r * k + i] = static_cast<T>(buf[i]);  // round to nearest even, as .to(dtype)
      }
    }
  });
}
}  // namespace

void dequantize(Format fmt, const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                int64_t group, at::Tensor& out) {
  const int64_t n = out.size(0), k = out.size(1);
  const Weight w = weight_view(fmt, data, scales, zeros, group);
  switch (out.scalar_type()) {
    case at::kFloat:
      dequantize_rows(w, n, k, out.data_ptr<float>());
      break;
    case at::kBFloat16:
      dequantize_rows(w, n, k, out.data_ptr<at::BFloat16>());
      break;
    case at::kHalf:
      dequantize_rows(w, n, k, out.data_ptr<at::Half>());
      break;
    default:
      TORCH_CHECK_TYPE(false, "dequantize: out must be float32, float16 or bfloat16, got ", out.scalar_type());
  }
}

// ---------------------------------------------------------------------------------------------------------------
// frozen linear
//
// Forward: the output columns are split into tasks of `nb` columns (about `fwd_n`, as many tasks as threads or a
// multiple); a task walks the reduction in chunks of `fwd_k`, dequantizes W[n0:n0+nb, k0:k0+kc] into its buffer
// (nb * kc floats, at most 2 MiB with the default tiles) and accumulates y[:, n0:n0+nb] += x[:, k0:k0+kc] @ buffer^T with one
// single-threaded sgemm. Backward: the same with the roles of N and K exchanged:
// dx[:, k0:k0+kb] += dy[:, n0:n0+nc] @ W[n0:n0+nc, k0:k0+kb].

namespace {

// Split `total` into about total / target tasks, at least one per thread; returns the task width.
int64_t task_width(int64_t total, int64_t target, int64_t multiple_of) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t tasks = std::max<int64_t>(1, (total + target - 1) / target);
  tasks = ((tasks + threads - 1) / threads) * threads;
  int64_t width = (total + tasks - 1) / tasks;
  width = ((width + multiple_of - 1) / multiple_of) * multiple_of;
  return std::max<int64_t>(width, 1);
}

// out = in as float32 [rows, cols] contiguous (a view when it already is).
at::Tensor as_float_contiguous(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

}  // namespace

void frozen_linear_fwd(const at::Tensor& x_in, Format fmt, const at::Tensor& data, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias_in, int64_t group,
                       at::Tensor& y_out) {
  const int64_t m = x_in.size(0), k = x_in.size(1), n = y_out.size(1);
  if (m == 0 || n == 0) return;
  const at::ScalarType dtype = x_in.scalar_type();
  const at::Tensor x = as_float_contiguous(x_in);
  const bool direct = dtype == at::kFloat;
  at::Tensor y = direct ? y_out : at::empty({m, n}, x.options());
  if (k == 0) {
    y.zero_();
  } else {
    const Weight w = weight_view(fmt, data, scales, zeros, group);
    const TileConfig& cfg = tile_config();
    const int64_t nb = task_width(n, cfg.fwd_n, 1);
    const int64_t kc = std::min(k, cfg.fwd_k);
    const int64_t tasks = (n + nb - 1) / nb;
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(nb * kc);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * nb, nn = std::min(nb, n - n0);
        for (int64_t k0 = 0; k0 < k; k0 += kc) {
          const int64_t kk = std::min(kc, k - k0);
          for (int64_t r = 0; r < nn; ++r) w.row_segment(n0 + r, k0, k0 + kk, buf.data() + r * kk);
          round_through(dtype, buf.data(), nn * kk);
          // column-major view: y^T[nn, m] (+)= buf[nn, kk] . x^T[kk, m]
          sgemm(true, false, nn, m, kk, buf.data(), kk, xp + k0, k, k0 == 0 ? 0.0f : 1.0f, yp + n0, n);
        }
      }
    });
  }
  if (bias_in.has_value()) y.add_(bias_in->to(dtype).to(at::kFloat));  // the bias in x's dtype, as the reference
  if (!direct) y_out.copy_(y);
}

void frozen_linear_bwd(const at::Tensor& dy_in, Format fmt, const at::Tensor& data, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, int64_t group, at::Tensor& dx_out) {
  const int64_t m = dy_in.size(0), n = dy_in.size(1), k = dx_out.size(1);
  if (m == 0 || k == 0) return;
  const at::ScalarType dtype = dy_in.scalar_type();
  const at::Tensor dy = as_float_contiguous(dy_in);
  const bool direct = dtype == at::kFloat;
  at::Tensor dx = direct ? dx_out : at::empty({m, k}, dy.options());
  if (n == 0) {
    dx.zero_();
  } else {
    const Weight w = weight_view(fmt, data, scales, zeros, group);
    const TileConfig& cfg = tile_config();
    const int64_t kb = task_width(k, cfg.bwd_k, 16);
    const int64_t nc = std::min(n, cfg.bwd_n);
    const int64_t tasks = (k + kb - 1) / kb;
    const float* dyp = dy.data_ptr<float>();
    float* dxp = dx.data_ptr<float>();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(nc * kb);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t k0 = t * kb, kk = std::min(kb, k - k0);
        for (int64_t n0 = 0; n0 < n; n0 += nc) {
          const int64_t nn = std::min(nc, n - n0);
          for (int64_t r = 0; r < nn; ++r) w.row_segment(n0 + r, k0, k0 + kk, buf.data() + r * kk);
          round_through(dtype, buf.data(), nn * kk);
          // column-major view: dx^T[kk, m] (+)= buf^T[kk, nn] . dy^T[nn, m]
          sgemm(false, false, kk, m, nn, buf.data(), kk, dyp + n0, n, n0 == 0 ? 0.0f : 1.0f, dxp + k0, k);
        }
      }
    });
  }
  if (!direct) dx_out.copy_(dx);
}

}  // namespace offsite::cpu
