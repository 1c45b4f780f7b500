// decode_linear on CPU: y = x W^T + b for the few rows of a decode or verify step.
//
// MKL's sgemm is fast at one row (its GEMV path) but three to five times slower at 2-16 rows
// on this class of CPU, which is exactly a speculative verify step or a small decode batch.
// Those shapes are bound by reading W, so the kernel streams W once with AVX2 dot products for
// all rows at a time (the exit_stats few-rows kernel), split over output features; from 5 rows,
// where the multiply-adds start to set the time, AVX-512 register tiles where the CPU has them.
// Each output is summed in the same order whatever the number of rows or kernel, so a token's
// logits do not depend on how many tokens were verified with it. More than 64 rows, or no
// AVX2, go to one GEMM (oneDNN through common/gemm.h for float32, else at::linear).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "decode_linear/decode_linear.h"
#include "cpu/row_kernels.h"
#include "common/gemm.h"

namespace eefast {
namespace {

using at::Tensor;

// Float rows stay on the kernel up to here too, so that every verify step and small batch
// sums each row as a lone decoded row does (sgemm's sums depend on the row count). With
// AVX-512 the kernel also beats sgemm there (SmolLM2 verify, 32 rows: 102 against 117 ms).
constexpr int64_t kMaxRows = 64;
// GGUF blocks keep the kernel up to 64 rows: its weight tiles stay in L1 across the rows, it
// costs about what dequantising and sgemm do there, and every verify step and small decode
// batch then rounds its activations like a single decoded token.
constexpr int64_t kMaxGgufRows = 64;
constexpr int64_t kOutBlock = 64;   // output features per parallel task
constexpr int64_t kTile = cpu::kGgufTile;

}  // namespace

bool linear_rows_into(const float* x, int64_t rows, const std::vector<RowsLinear>& linears) {
  if (rows == 0 || rows > kMaxGgufRows || !cpu::has_avx2_kernels()) return false;
  int64_t total = 0, in = 0;
  std::vector<int64_t> starts;  // where each linear's tiles of 8 outputs begin in the joint range
  std::vector<int> gguf;        // each linear's GgufType, or -1
  for (const RowsLinear& l : linears) {
    const Tensor& w = *l.weight;
    cpu::GgufType type{};
    const bool blocks = w.scalar_type() == at::kByte && w.dim() == 3 &&
                        cpu::gguf_type_of_block_bytes(w.size(2), &type);
    const bool ok_dtype = blocks || (l.scales ? w.scalar_type() == at::kChar
                                              : (w.scalar_type() == at::kFloat ||
                                                 w.scalar_type() == at::kBFloat16));
    if (!ok_dtype || !w.is_contiguous() || (l.scales && !l.scales->is_contiguous())) return false;
    gguf.push_back(blocks ? static_cast<int>(type) : -1);
    in = blocks ? w.size(1) * cpu::kGgufGroup : w.size(1);
    starts.push_back(total);
    total += (w.size(0) + kTile - 1) / kTile;
  }
  const bool all_gguf = std::all_of(gguf.begin(), gguf.end(), [](int t) { return t >= 0; });
  if (rows > (all_gguf ? kMaxGgufRows : kMaxRows)) return false;
  // GGUF blocks multiply int8 activations: x is quantised once for all the linears.
  std::vector<int8_t> xq;
  std::vector<float> xd, xs;
  if (std::any_of(gguf.begin(), gguf.end(), [](int t) { return t >= 0; })) {
    const int64_t groups = rows * (in / cpu::kGgufGroup);
    xq.resize(rows * in);
    xd.resize(groups);
    xs.resize(groups);
    cpu::quantize_activations_avx2(x, rows, in, xq.data(), xd.data(), xs.data());
  }
  // One parallel region over every linear's outputs, in tiles of 8 (packed GGUF blocks come
  // in tiles of 8 rows): a decode step's linears are small, and a fork/join per linear costs
  // a noticeable share of streaming a low-bit one.
  at::parallel_for(0, total, kOutBlock / kTile, [&](int64_t t0, int64_t t1) {
    for (size_t i = 0; i < linears.size(); ++i) {
      const RowsLinear& l = linears[i];
      const Tensor& weight = *l.weight;
      const int64_t out_features = weight.size(0);
      const int64_t a = (std::max(t0, starts[i]) - starts[i]) * kTile;
      const int64_t b = std::min((t1 - starts[i]) * kTile, out_features);
      if (a >= b) continue;
      if (gguf[i] >= 0) {
        cpu::dot_gguf(static_cast<cpu::GgufType>(gguf[i]), xq.data(), xd.data(), xs.data(),
                      rows, in, weight.data_ptr<uint8_t>(), out_features, a, b, l.out,
                      out_features);
        continue;
      }
      const int64_t row_bytes = weight.size(1) * weight.element_size();
      const char* w = static_cast<const char*>(weight.data_ptr()) + a * row_bytes;
      if (l.scales) {
        cpu::dot_logits_i8(x, rows, in, reinterpret_cast<const signed char*>(w),
                           l.scales->data_ptr<float>() + a, b - a, l.out + a, out_features);
      } else {
        cpu::dot_logits_f(x, rows, in, w, weight.scalar_type() == at::kBFloat16, b - a,
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
  const int64_t in = weight.dim() == 3 ? weight.size(1) * cpu::kGgufGroup : weight.size(1);
  const int64_t out_features = weight.size(0);
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

// Many float32 rows (a prefill): one GEMM through common/gemm.h (oneDNN), else at::linear.
Tensor linear_many_rows(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat || x.numel() == 0) {
    return at::linear(x, weight, bias);
  }
  const int64_t in = weight.size(1), out_features = weight.size(0);
  const Tensor x2 = x.reshape({-1, in});
  Tensor y = at::empty({x2.size(0), out_features}, x.options());
  gemm_plus(bias ? *bias : Tensor(), x2, weight.t(), y);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return y.view(shape);
}

Tensor decode_linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_decode_linear_args(x, weight, bias);
  Tensor y = kernel_rows(x, weight, nullptr, bias);
  return y.defined() ? y : linear_many_rows(x, weight, bias);
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

Tensor dequantize_gguf_cpu(const Tensor& qweight) {
  const cpu::GgufType type = check_gguf_weight("dequantize_gguf", "qweight", qweight);
  const Tensor w = qweight.contiguous();
  const int64_t n = w.size(0), in = w.size(1) * cpu::kGgufGroup;
  Tensor out = at::empty({n, in}, w.options().dtype(at::kFloat));
  at::parallel_for(0, (n + kTile - 1) / kTile, 16, [&](int64_t t0, int64_t t1) {
    cpu::dequantize_gguf(type, w.data_ptr<uint8_t>(), n, in, t0 * kTile,
                         std::min(t1 * kTile, n), out.data_ptr<float>());
  });
  return out;
}

// GGUF rows (uint8 [out, in / 32, block bytes], as the file stores the tensor) -> packed.
Tensor pack_gguf_cpu(const Tensor& rows) {
  const cpu::GgufType type = check_gguf_weight("pack_gguf", "rows", rows);
  const Tensor r = rows.contiguous();
  Tensor out = at::empty(r.sizes(), r.options());
  cpu::pack_gguf(type, r.data_ptr<uint8_t>(), r.size(0), r.size(1) * cpu::kGgufGroup,
                 out.data_ptr<uint8_t>());
  return out;
}

// Up to kMaxGgufRows rows quantise x per group of 32 and stream the blocks once with integer
// dot products (cpu/gguf_blocks.h); more rows (a long prefill, a tuning forward) dequantise
// the weight and run sgemm in x's dtype.
Tensor decode_linear_gguf_cpu(const Tensor& x, const Tensor& qweight,
                              const std::optional<Tensor>& bias) {
  check_decode_linear_gguf_args(x, qweight, bias);
  Tensor y = kernel_rows(x, qweight, nullptr, bias);
  return y.defined() ? y
                     : at::linear(x, dequantize_gguf_cpu(qweight).to(x.scalar_type()), bias);
}

TORCH_LIBRARY_IMPL(eefast, CPU, m) {
  m.impl("decode_linear_gguf", &decode_linear_gguf_cpu);
  m.impl("dequantize_gguf", &dequantize_gguf_cpu);
  m.impl("pack_gguf", &pack_gguf_cpu);
  m.impl("decode_linear", &decode_linear_cpu);
  m.impl("decode_linear_q8", &decode_linear_q8_cpu);
}

}  // namespace eefast
