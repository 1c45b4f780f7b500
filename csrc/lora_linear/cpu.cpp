// CPU kernels of lora_linear: y = x W^T + b + s * (x_lora A^T) B^T and its backward.
//
// fp32: BLAS calls with the low-rank terms accumulated by beta=1 GEMMs (blas.cpp, shared with
// CUDA's fp32 path). On CPUs fresh large buffers cost page faults on first touch, so avoiding
// [tokens, out] temporaries matters as much as the arithmetic.
//
// bf16/fp16: on CPUs without native bf16 dot products (AVX2 machines) ATen's reduced-precision
// GEMM is 5x (forward) to 100x+ (backward layouts) slower than sgemm, even for one token. So
// inputs are upcast to fp32 and run through sgemm, the frozen weight one block of features at a
// time, so the fp32 copy of W never exists whole. The result is rounded once, at the end.

#include "lora_linear/lora_linear.h"
#include "lora_linear/blas.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

namespace eefast {
namespace {

using at::Tensor;

// Features of W upcast per block. Small enough that the fp32 working set (a block of W plus a
// [tokens, block] product) stays below the [tokens, out] temporaries of an unfused bf16 LoRA;
// large enough that each sgemm still runs at full speed.
constexpr int64_t kFeatureBlock = 128;
// Rows of x upcast at a time when reducing over tokens (the grad of A).
constexpr int64_t kRowChunk = 128;

bool use_fp32_upcast(const Tensor& t) { return t.scalar_type() != at::kFloat; }

Tensor to_float(const Tensor& t) { return t.to(at::kFloat); }

// dst[:, f] = a32 Wf (+ bias32[f]) (+ s * left32 Rf) over blocks f of dst's columns, with Wf
// the block of W upcast to fp32, so the fp32 product never exists for all features. The
// forward blocks W's rows (dim 0: dst = x W^T + b + s xa B^T, R = B); the input gradient blocks
// its columns (dim 1: dst = g W + s gb A, R = A). The right factor R is sliced the same way.
void blocked_upcast_gemm(Tensor& dst, const Tensor& a32, const Tensor& weight, int64_t dim,
                         const Tensor& bias32, const Tensor& left32, const Tensor& right32,
                         double s) {
  const int64_t rows = a32.size(0), features = weight.size(dim), depth = weight.size(1 - dim);
  const int64_t block = std::min(kFeatureBlock, features);
  Tensor w_buf = at::empty(dim == 0 ? std::vector<int64_t>{block, depth}
                                    : std::vector<int64_t>{depth, block},
                           a32.options());
  Tensor out_buf = at::empty({rows, block}, a32.options());
  const auto slice = [dim](const Tensor& t, int64_t f, int64_t n) {
    return dim == 0 ? t.narrow(0, f, n).t() : t.narrow(1, f, n);
  };
  for (int64_t f = 0; f < features; f += block) {
    const int64_t n = std::min(block, features - f);
    Tensor w = w_buf.narrow(dim, 0, n);
    w.copy_(weight.narrow(dim, f, n));
    Tensor ob = out_buf.narrow(1, 0, n);
    const Tensor wf = dim == 0 ? w.t() : w;
    if (bias32.defined()) {
      at::addmm_out(ob, bias32.narrow(0, f, n), a32, wf);
    } else {
      at::mm_out(ob, a32, wf);
    }
    if (left32.defined()) ob.addmm_(left32, slice(right32, f, n), 1.0, s);
    dst.narrow(1, f, n).copy_(ob);
  }
}

// grad_a[r, in] = s * gb32^T x_lora, upcasting x_lora a chunk of rows at a time.
Tensor grad_a_upcast(const Tensor& gb32, const Tensor& x_lora, double s) {
  const int64_t rows = x_lora.size(0);
  Tensor acc = at::zeros({gb32.size(1), x_lora.size(1)}, gb32.options());
  for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
    const int64_t n = std::min(kRowChunk, rows - r0);
    acc.addmm_(gb32.narrow(0, r0, n).t(), to_float(x_lora.narrow(0, r0, n)), 1.0, s);
  }
  return acc;
}

std::tuple<Tensor, Tensor> lora_linear_cpu(const Tensor& x, const Tensor& weight,
                                           const std::optional<Tensor>& bias, const Tensor& lora_a,
                                           const Tensor& lora_b, double scaling,
                                           const std::optional<Tensor>& x_lora) {
  check_lora_linear_args(x, weight, bias, lora_a, lora_b, x_lora, scaling);
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_a.size(0);
  const Tensor x2 = as_rows(x, in);
  const Tensor xl2 = x_lora ? as_rows(*x_lora, in) : x2;
  Tensor y = at::empty({x2.size(0), out}, x.options());
  Tensor xa = at::empty({x2.size(0), r}, x.options());

  if (use_fp32_upcast(x2)) {
    const Tensor x32 = to_float(x2);
    const Tensor xa32 = at::mm(x_lora ? to_float(xl2) : x32, to_float(lora_a).t());
    xa.copy_(xa32);
    blocked_upcast_gemm(y, x32, weight, 0, bias ? to_float(*bias) : Tensor(), xa32,
                        to_float(lora_b), scaling);
  } else {
    lora_forward_blas(x2, xl2, weight, bias, lora_a, lora_b, scaling, y, xa);
  }
  return {y.view(with_last_dim(x.sizes(), out)), xa.view(with_last_dim(x.sizes(), r))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lora_linear_backward_cpu(
    const Tensor& grad_out, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
    const Tensor& x_lora, const Tensor& xa, double scaling, bool needs_grad_x, bool split_grad_x) {
  check_lora_linear_backward_args(grad_out, weight, lora_a, lora_b, x_lora, xa, scaling);
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_a.size(0);
  const Tensor g2 = as_rows(grad_out, out);
  const Tensor xl2 = as_rows(x_lora, in);
  const Tensor xa2 = as_rows(xa, r);
  const auto opts = x_lora.options();
  Tensor grad_x = at::empty({needs_grad_x ? xl2.size(0) : 0, in}, opts);
  Tensor grad_x_lora = at::empty({needs_grad_x && split_grad_x ? xl2.size(0) : 0, in}, opts);
  Tensor grad_a, grad_b;

  if (use_fp32_upcast(xl2)) {
    Tensor g32 = to_float(g2);
    const Tensor a32 = to_float(lora_a);
    const Tensor gb32 = at::mm(g32, to_float(lora_b));  // [N, r]
    grad_b = at::mm(g32.t(), to_float(xa2)).mul_(scaling).to(opts.dtype());
    if (needs_grad_x) {
      blocked_upcast_gemm(grad_x, g32, weight, 1, Tensor(), split_grad_x ? Tensor() : gb32, a32,
                          scaling);
      if (split_grad_x) grad_x_lora.copy_(at::mm(gb32, a32).mul_(scaling));
    }
    g32.reset();  // free before the token reduction below upcasts x
    grad_a = grad_a_upcast(gb32, xl2, scaling).to(opts.dtype());
  } else {
    std::tie(grad_a, grad_b) = lora_backward_blas(g2, weight, lora_a, lora_b, xl2, xa2, scaling,
                                                  needs_grad_x, split_grad_x, grad_x, grad_x_lora);
  }
  if (needs_grad_x) grad_x = grad_x.view(x_lora.sizes());
  if (needs_grad_x && split_grad_x) grad_x_lora = grad_x_lora.view(x_lora.sizes());
  return {grad_x, grad_x_lora, grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace eefast
