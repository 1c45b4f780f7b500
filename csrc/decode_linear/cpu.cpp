// decode_linear on CPU: y = x W^T + b for the few rows of a decode or verify step.
//
// MKL's sgemm is fast at one row (its GEMV path) but three to five times slower at 2-16 rows
// on this class of CPU, which is exactly a speculative verify step or a small decode batch.
// Those shapes are bound by reading W, so the kernel streams W once with AVX2 dot products for
// all rows at a time (the exit_stats few-rows kernel), split over output features. Each output
// is summed in the same order whatever the number of rows, so a token's logits do not depend on
// how many tokens were verified with it. More rows, or no AVX2, go to at::linear.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include "decode_linear/decode_linear.h"
#include "cpu/row_kernels.h"

namespace eefast {
namespace {

using at::Tensor;

constexpr int64_t kMaxRows = 8;  // above this, sgemm wins (crossover between 5 and 16 rows)
constexpr int64_t kOutBlock = 64;   // output features per parallel task

}  // namespace

Tensor decode_linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_decode_linear_args(x, weight, bias);
  const bool supported = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  const int64_t in = weight.size(1), out_features = weight.size(0);
  const int64_t rows = in ? x.numel() / in : 0;
  if (!supported || rows == 0 || rows > kMaxRows || !cpu::has_avx2_kernels()) {
    return at::linear(x, weight, bias);
  }
  const Tensor h32 = x.reshape({rows, in}).to(at::kFloat).contiguous();
  const Tensor w = weight.contiguous();
  Tensor y = at::empty({rows, out_features}, h32.options());
  const bool w_bf16 = w.scalar_type() == at::kBFloat16;
  const char* w_base = static_cast<const char*>(w.data_ptr());
  const int64_t w_row_bytes = in * w.element_size();
  const float* h = h32.data_ptr<float>();
  float* y_ptr = y.data_ptr<float>();
  at::parallel_for(0, out_features, kOutBlock, [&](int64_t n0, int64_t n1) {
    cpu::dot_logits_avx2(h, rows, in, w_base + n0 * w_row_bytes, w_bf16, n1 - n0, y_ptr + n0,
                         out_features);
  });
  if (bias) y.add_(bias->to(at::kFloat));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return y.to(x.scalar_type()).view(shape);
}

// Up to kMaxRows rows stream the int8 weight once (a quarter of float32's bytes), converting
// eight weights at a time in registers and applying each row's scale to its finished sum; more
// rows (the prefill) dequantise the weight and run sgemm.
Tensor decode_linear_q8_cpu(const Tensor& x, const Tensor& qweight, const Tensor& scales,
                            const std::optional<Tensor>& bias) {
  check_decode_linear_q8_args(x, qweight, scales, bias);
  const int64_t in = qweight.size(1), out_features = qweight.size(0);
  const int64_t rows = in ? x.numel() / in : 0;
  const bool supported = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  if (!supported || rows == 0 || rows > kMaxRows || !cpu::has_avx2_kernels()) {
    return at::linear(x, dequantize_rows(qweight, scales, x.scalar_type()), bias);
  }
  const Tensor h32 = x.reshape({rows, in}).to(at::kFloat).contiguous();
  const Tensor w = qweight.contiguous();
  const Tensor s = scales.contiguous();
  Tensor y = at::empty({rows, out_features}, h32.options());
  const signed char* w_base = static_cast<const signed char*>(w.data_ptr());
  const float* s_base = s.data_ptr<float>();
  const float* h = h32.data_ptr<float>();
  float* y_ptr = y.data_ptr<float>();
  at::parallel_for(0, out_features, kOutBlock, [&](int64_t n0, int64_t n1) {
    cpu::dot_logits_i8_avx2(h, rows, in, w_base + n0 * in, s_base + n0, n1 - n0, y_ptr + n0,
                            out_features);
  });
  if (bias) y.add_(bias->to(at::kFloat));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return y.to(x.scalar_type()).view(shape);
}

TORCH_LIBRARY_IMPL(eefast, CPU, m) {
  m.impl("decode_linear", &decode_linear_cpu);
  m.impl("decode_linear_q8", &decode_linear_q8_cpu);
}

}  // namespace eefast
