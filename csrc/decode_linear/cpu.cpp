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

#include <algorithm>
#include <vector>

#include "decode_linear/decode_linear.h"
#include "cpu/row_kernels.h"

namespace eefast {
namespace {

using at::Tensor;

constexpr int64_t kMaxRows = 8;  // above this, sgemm wins (crossover between 5 and 16 rows)
constexpr int64_t kOutBlock = 64;   // output features per parallel task

}  // namespace

bool linear_rows_into(const float* x, int64_t rows, const std::vector<RowsLinear>& linears) {
  if (rows == 0 || rows > kMaxRows || !cpu::has_avx2_kernels()) return false;
  int64_t total = 0;
  std::vector<int64_t> starts;  // where each linear's outputs begin in the joint range
  for (const RowsLinear& l : linears) {
    const Tensor& w = *l.weight;
    const bool ok_dtype = l.scales ? w.scalar_type() == at::kChar
                                   : (w.scalar_type() == at::kFloat ||
                                      w.scalar_type() == at::kBFloat16);
    if (!ok_dtype || !w.is_contiguous() || (l.scales && !l.scales->is_contiguous())) return false;
    starts.push_back(total);
    total += w.size(0);
  }
  // One parallel region over every linear's outputs: a decode step's linears are small, and
  // a fork/join per linear costs a noticeable share of streaming an int8 one.
  at::parallel_for(0, total, kOutBlock, [&](int64_t n0, int64_t n1) {
    for (size_t i = 0; i < linears.size(); ++i) {
      const RowsLinear& l = linears[i];
      const int64_t out_features = l.weight->size(0), in = l.weight->size(1);
      const int64_t a = std::max(n0, starts[i]) - starts[i];
      const int64_t b = std::min(n1, starts[i] + out_features) - starts[i];
      if (a >= b) continue;
      const char* w = static_cast<const char*>(l.weight->data_ptr()) +
                      a * in * l.weight->element_size();
      if (l.scales) {
        cpu::dot_logits_i8(x, rows, in, reinterpret_cast<const signed char*>(w),
                           l.scales->data_ptr<float>() + a, b - a, l.out + a, out_features);
      } else {
        cpu::dot_logits_avx2(x, rows, in, w, l.weight->scalar_type() == at::kBFloat16, b - a,
                             l.out + a, out_features);
      }
    }
  });
  for (const RowsLinear& l : linears) {
    if (!l.bias) continue;
    const Tensor b = l.bias->to(at::kFloat).contiguous();
    const float* bp = b.data_ptr<float>();
    const int64_t n = l.weight->size(0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < n; ++j) l.out[r * n + j] += bp[j];
    }
  }
  return true;
}

namespace {

// What both ops run for a few float32/bf16 rows: x as float32 rows through linear_rows_into,
// back in x's dtype and shape; an undefined tensor where that kernel does not run.
Tensor kernel_rows(const Tensor& x, const Tensor& weight, const Tensor* scales,
                   const std::optional<Tensor>& bias) {
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16) return {};
  const int64_t in = weight.size(1), out_features = weight.size(0);
  const int64_t rows = in ? x.numel() / in : 0;
  const Tensor h32 = x.reshape({rows, in}).to(at::kFloat).contiguous();
  const Tensor w = weight.contiguous();
  const Tensor s = scales ? scales->contiguous() : Tensor();
  Tensor y = at::empty({rows, out_features}, h32.options());
  const RowsLinear job{&w, scales ? &s : nullptr, bias, y.data_ptr<float>()};
  if (!linear_rows_into(h32.data_ptr<float>(), rows, {job})) return {};
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return y.to(x.scalar_type()).view(shape);
}

}  // namespace

Tensor decode_linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_decode_linear_args(x, weight, bias);
  Tensor y = kernel_rows(x, weight, nullptr, bias);
  return y.defined() ? y : at::linear(x, weight, bias);
}

// Up to kMaxRows rows stream the int8 weight once (a quarter of float32's bytes), converting
// weights in registers and applying each row's scale to its finished sum; more rows (the
// prefill) dequantise the weight and run sgemm.
Tensor decode_linear_q8_cpu(const Tensor& x, const Tensor& qweight, const Tensor& scales,
                            const std::optional<Tensor>& bias) {
  check_decode_linear_q8_args(x, qweight, scales, bias);
  Tensor y = kernel_rows(x, qweight, &scales, bias);
  return y.defined() ? y : at::linear(x, dequantize_rows(qweight, scales, x.scalar_type()), bias);
}

TORCH_LIBRARY_IMPL(eefast, CPU, m) {
  m.impl("decode_linear", &decode_linear_cpu);
  m.impl("decode_linear_q8", &decode_linear_q8_cpu);
}

}  // namespace eefast
