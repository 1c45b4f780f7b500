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
// sgemm on CPUs without bf16 dot products) and rounded once at the end.

#include "bottleneck_adapter.h"

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
#include <torch/library.h>

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
  const Tensor x32 = f32(x.reshape({-1, in}));
  const Tensor d32 = f32(down_weight);
  const Tensor z = down_bias ? at::addmm(f32(*down_bias), x32, d32.t()) : at::mm(x32, d32.t());
  const Tensor a = activate(z, act);
  const Tensor res32 = residual ? f32(residual->reshape({-1, out})) : x32;
  Tensor out32 = up_bias ? at::add(res32, f32(*up_bias), s)
                         : res32.clone(at::MemoryFormat::Contiguous);
  out32.addmm_(a, f32(up_weight).t(), 1.0, s);
  const Tensor y = x.scalar_type() == at::kFloat ? out32 : out32.to(x.scalar_type());
  return {y.view(with_last_dim(x.sizes(), out)), z.view(with_last_dim(x.sizes(), r))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bottleneck_adapter_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& down_weight, const Tensor& up_weight,
    const std::optional<Tensor>& up_bias, const Tensor& z, const Tensor& scale,
    c10::string_view activation, bool residual_is_x, bool needs_grad_x, bool needs_grad_scale) {
  constexpr const char* op = "bottleneck_adapter_backward";
  check_float_dtype(op, x);
  check_same_dtype_device(op, x, "grad_out", grad_out);
  check_same_dtype_device(op, x, "down_weight", down_weight);
  check_same_dtype_device(op, x, "up_weight", up_weight);
  if (up_bias) check_same_dtype_device(op, x, "up_bias", *up_bias);
  check_scale(op, scale, x);
  const int64_t in = x.size(-1), r = down_weight.size(0), out = up_weight.size(0);
  TORCH_CHECK(down_weight.dim() == 2 && down_weight.size(1) == in && up_weight.dim() == 2 &&
                  up_weight.size(1) == r,
              op, ": down_weight [r, in] and up_weight [out, r] do not match x");
  TORCH_CHECK(z.scalar_type() == at::kFloat && z.size(-1) == r &&
                  z.numel() / std::max<int64_t>(r, 1) == x.numel() / std::max<int64_t>(in, 1),
              op, ": z must be the float32 [..., r=", r, "] from the forward, got ", z.sizes());
  TORCH_CHECK(grad_out.size(-1) == out &&
                  grad_out.numel() / std::max<int64_t>(out, 1) ==
                      x.numel() / std::max<int64_t>(in, 1),
              op, ": grad_out must be x's shape with out_features=", out, " last, got ",
              grad_out.sizes());
  const auto act = parse_activation(activation);
  const double s = scale.item<double>();
  const auto dtype = x.scalar_type();
  const auto cast = [dtype](const Tensor& t) { return dtype == at::kFloat ? t : t.to(dtype); };

  const Tensor g32 = f32(grad_out.reshape({-1, out}));
  const Tensor x32 = f32(x.reshape({-1, in}));
  const Tensor z2 = z.reshape({-1, r});
  const Tensor a = activate(z2, act);
  Tensor ga = at::mm(g32, f32(up_weight));  // [N, r], the gradient of the up-projection input / s
  const Tensor grad_up = at::mm(g32.t(), a).mul_(s);
  const Tensor g_colsum = at::sum(g32, 0);
  Tensor grad_scale = at::empty({0}, scale.options());
  if (needs_grad_scale) {
    Tensor gs = at::dot(ga.flatten(), a.flatten());
    if (up_bias) gs.add_(at::dot(g_colsum, f32(*up_bias)));
    grad_scale = gs.reshape(scale.sizes());
  }
  ga.mul_(s);
  const Tensor gz = activate_backward(ga, z2, a, act);
  const Tensor d32 = f32(down_weight);
  Tensor grad_x = at::empty({0, in}, x.options());
  if (needs_grad_x) {
    const Tensor gx = residual_is_x ? at::addmm(g32, gz, d32) : at::mm(gz, d32);
    grad_x = cast(gx).view(x.sizes());
  }
  return {grad_x,
          cast(at::mm(gz.t(), x32)),
          cast(at::sum(gz, 0)),
          cast(grad_up),
          cast(g_colsum.mul(s)),
          grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, CPU, m) {
  m.impl("bottleneck_adapter", &bottleneck_adapter_cpu);
  m.impl("bottleneck_adapter_backward", &bottleneck_adapter_backward_cpu);
}

}  // namespace eefast
