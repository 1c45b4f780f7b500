// CPU kernels of bottleneck_adapter: out = residual + s * (act(x D^T + bd) U^T + bu).
//
// The unfused module runs down-linear, activation, up-linear, `* s` and `+ residual`, each
// writing a fresh tensor; the [tokens, features] ones (up output, scaled copy, sum) dominate its
// memory traffic, and their backward repeats them (s * grad, a copy for the residual branch).
// Here the only [tokens, features] tensor written is the output itself: it starts as
// residual + s * bu and the up-projection is accumulated into it by one beta=1 GEMM. The
// backward reads grad_out through GEMMs only, and for a series adapter (residual = x) the
// input gradient is one addmm onto grad_out. The bottleneck-wide tensors are small (r << d).
//
// bf16/fp16 inputs are computed in fp32 (ATen's reduced-precision GEMMs are far slower than
// sgemm on CPUs without bf16 dot products) and rounded once at the end, kRowChunk rows at a
// time so the fp32 copies stay a small workspace.

#include "bottleneck_adapter/bottleneck_adapter.h"

#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/tanh_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

namespace eefast {
namespace {

using at::Tensor;

Tensor f32(const Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

Tensor activate(const Tensor& z, AdapterActivation act) {
  switch (act) {
    case AdapterActivation::kIdentity:
      return z;
    case AdapterActivation::kRelu:
      return at::relu(z);
    case AdapterActivation::kGelu:
      return at::gelu(z, "none");
    case AdapterActivation::kGeluTanh:
      return at::gelu(z, "tanh");
    case AdapterActivation::kSilu:
      return at::silu(z);
    case AdapterActivation::kTanh:
      return at::tanh(z);
  }
  TORCH_CHECK(false, "bottleneck_adapter: unhandled activation");
}

// d act(z) / dz * ga, given z and a = act(z).
Tensor activate_backward(const Tensor& ga, const Tensor& z, const Tensor& a, AdapterActivation act) {
  switch (act) {
    case AdapterActivation::kIdentity:
      return ga;
    case AdapterActivation::kRelu:
      return at::threshold_backward(ga, z, 0);
    case AdapterActivation::kGelu:
      return at::gelu_backward(ga, z, "none");
    case AdapterActivation::kGeluTanh:
      return at::gelu_backward(ga, z, "tanh");
    case AdapterActivation::kSilu:
      return at::silu_backward(ga, z);
    case AdapterActivation::kTanh:
      return at::tanh_backward(ga, a);
  }
  TORCH_CHECK(false, "bottleneck_adapter: unhandled activation");
}

// bf16/fp16 rows are upcast this many at a time, so the fp32 copies stay a bounded workspace
// instead of several [tokens, d] tensors. fp32 runs in one chunk: nothing is copied.
constexpr int64_t kRowChunk = 256;

int64_t row_chunk(const Tensor& x, int64_t rows) {
  return x.scalar_type() == at::kFloat ? std::max<int64_t>(rows, 1) : kRowChunk;
}

std::tuple<Tensor, Tensor> bottleneck_adapter_cpu(const Tensor& x,
                                                  const std::optional<Tensor>& residual,
                                                  const Tensor& down_weight,
                                                  const std::optional<Tensor>& down_bias,
                                                  const Tensor& up_weight,
                                                  const std::optional<Tensor>& up_bias,
                                                  const Tensor& scale,
                                                  c10::string_view activation) {
  check_bottleneck_adapter_args(x, residual, down_weight, down_bias, up_weight, up_bias, scale);
  const auto act = parse_activation(activation);
  const double s = scale.item<double>();
  const int64_t in = x.size(-1), r = down_weight.size(0), out = up_weight.size(0);
  const Tensor x2 = as_rows(x, in);
  const Tensor res2 = residual ? as_rows(*residual, out) : x2;
  const int64_t rows = x2.size(0), chunk = row_chunk(x, rows);
  const bool fp32 = x.scalar_type() == at::kFloat;
  const Tensor d32 = f32(down_weight), u32t = f32(up_weight).t();
  const Tensor bd32 = down_bias ? f32(*down_bias) : Tensor();
  const Tensor bu32 = up_bias ? f32(*up_bias) : Tensor();
  Tensor y = at::empty({rows, out}, x.options());
  Tensor z = at::empty({rows, r}, x.options().dtype(at::kFloat));
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    const Tensor x32 = f32(x2.narrow(0, r0, n));
    Tensor zc = z.narrow(0, r0, n);
    if (down_bias) {
      at::addmm_out(zc, bd32, x32, d32.t());
    } else {
      at::mm_out(zc, x32, d32.t());
    }
    const Tensor res32 = residual ? f32(res2.narrow(0, r0, n)) : x32;
    // The output starts as residual + s * bu; the up-projection accumulates into it.
    Tensor o32 = fp32 ? y.narrow(0, r0, n) : at::empty({n, out}, z.options());
    if (up_bias) {
      at::add_out(o32, res32, bu32, s);
    } else {
      o32.copy_(res32);
    }
    o32.addmm_(activate(zc, act), u32t, 1.0, s);
    if (!fp32) y.narrow(0, r0, n).copy_(o32);
  }
  return {y.view(with_last_dim(x.sizes(), out)), z.view(with_last_dim(x.sizes(), r))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bottleneck_adapter_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& down_weight, const Tensor& up_weight,
    const std::optional<Tensor>& up_bias, const Tensor& z, const Tensor& scale,
    c10::string_view activation, bool residual_is_x, bool needs_grad_x, bool needs_grad_scale) {
  check_bottleneck_adapter_backward_args(grad_out, x, down_weight, up_weight, up_bias, z, scale);
  const int64_t in = x.size(-1), r = down_weight.size(0), out = up_weight.size(0);
  const auto act = parse_activation(activation);
  const double s = scale.item<double>();
  const auto dtype = x.scalar_type();
  const auto cast = [dtype](const Tensor& t) { return dtype == at::kFloat ? t : t.to(dtype); };

  const Tensor g2 = as_rows(grad_out, out);
  const Tensor x2 = as_rows(x, in);
  const Tensor z2 = as_rows(z, r);
  const int64_t rows = x2.size(0), chunk = row_chunk(x, rows);
  const bool fp32 = dtype == at::kFloat;
  const Tensor d32 = f32(down_weight), u32 = f32(up_weight);
  const auto f32_opts = z.options();
  // Parameter gradients and the scale's partial sums, accumulated over row chunks in order.
  Tensor grad_up = at::zeros({out, r}, f32_opts), grad_down = at::zeros({r, in}, f32_opts);
  Tensor gz_colsum = at::zeros({r}, f32_opts), g_colsum = at::zeros({out}, f32_opts);
  Tensor ga_dot_a = at::zeros({}, f32_opts);
  Tensor grad_x = at::empty({needs_grad_x ? rows : 0, in}, x.options());
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    const Tensor g32 = f32(g2.narrow(0, r0, n));
    const Tensor zc = z2.narrow(0, r0, n);
    const Tensor a = activate(zc, act);
    Tensor ga = at::mm(g32, u32);  // [n, r], the gradient of the up-projection's input / s
    grad_up.addmm_(g32.t(), a);
    g_colsum.add_(at::sum(g32, 0));
    if (needs_grad_scale) ga_dot_a.add_(at::dot(ga.flatten(), a.flatten()));
    const Tensor gz = activate_backward(ga.mul_(s), zc, a, act);
    grad_down.addmm_(gz.t(), f32(x2.narrow(0, r0, n)));
    gz_colsum.add_(at::sum(gz, 0));
    if (needs_grad_x) {
      // fp32 writes straight into grad_x; reduced precision rounds a chunk-sized fp32 result.
      Tensor gx = grad_x.narrow(0, r0, n);
      Tensor gx32 = fp32 ? gx : at::empty({n, in}, f32_opts);
      if (residual_is_x) {
        at::addmm_out(gx32, g32, gz, d32);
      } else {
        at::mm_out(gx32, gz, d32);
      }
      if (!fp32) gx.copy_(gx32);
    }
  }
  Tensor grad_scale = at::empty({0}, scale.options());
  if (needs_grad_scale) {
    if (up_bias) ga_dot_a.add_(at::dot(g_colsum, f32(*up_bias)));
    grad_scale = ga_dot_a.reshape(scale.sizes());
  }
  return {needs_grad_x ? grad_x.view(x.sizes()) : grad_x,
          cast(grad_down),
          cast(gz_colsum),
          cast(grad_up.mul_(s)),
          cast(g_colsum.mul_(s)),
          grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, CPU, m) {
  m.impl("bottleneck_adapter", &bottleneck_adapter_cpu);
  m.impl("bottleneck_adapter_backward", &bottleneck_adapter_backward_cpu);
}

}  // namespace eefast
