// CUDA dispatch glue of bottleneck_adapter: the GEMMs are cuBLAS (through ATen) in the input
// dtype, and the element-wise passes are the fused kernels of bottleneck_adapter/kernels.cuh. The
// scale stays on the device, so a learned scale costs no host sync.
#include "bottleneck_adapter/bottleneck_adapter.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bottleneck_adapter/kernels.cuh"

namespace eefast {
namespace {

using at::Tensor;

cuda::DType adapter_dtype(const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "bottleneck_adapter: CUDA supports float32 and bfloat16, got ", t.scalar_type());
  return t.scalar_type() == at::kFloat ? cuda::DType::kFloat32 : cuda::DType::kBFloat16;
}

cuda::Act cuda_act(c10::string_view name) {
  return static_cast<cuda::Act>(static_cast<int>(parse_activation(name)));
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "bottleneck_adapter: CUDA error: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor> bottleneck_adapter_cuda(const Tensor& x,
                                                   const std::optional<Tensor>& residual,
                                                   const Tensor& down_weight,
                                                   const std::optional<Tensor>& down_bias,
                                                   const Tensor& up_weight,
                                                   const std::optional<Tensor>& up_bias,
                                                   const Tensor& scale,
                                                   c10::string_view activation) {
  check_bottleneck_adapter_args(x, residual, down_weight, down_bias, up_weight, up_bias, scale);
  const auto dtype = adapter_dtype(x);
  const auto act = cuda_act(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t in = x.size(-1), r = down_weight.size(0), out = up_weight.size(0);
  const Tensor x2 = as_rows(x, in).contiguous();
  const int64_t rows = x2.size(0);
  const Tensor xd = at::mm(x2, down_weight.t());
  const Tensor bd = down_bias ? down_bias->contiguous() : Tensor();
  Tensor z = at::empty({rows, r}, x.options().dtype(at::kFloat));
  Tensor a = at::empty({rows, r}, x.options());
  check_launch(cuda::adapter_bias_act(dtype, xd.data_ptr(), down_bias ? bd.data_ptr() : nullptr,
                                      z.data_ptr<float>(), a.data_ptr(), rows, r, act, stream));
  Tensor y = at::mm(a, up_weight.t());
  const Tensor res = residual ? as_rows(*residual, out).contiguous() : x2;
  const Tensor bu = up_bias ? up_bias->contiguous() : Tensor();
  const Tensor s = scale.contiguous();
  check_launch(cuda::adapter_scale_residual(dtype, y.data_ptr(), res.data_ptr(),
                                            up_bias ? bu.data_ptr() : nullptr,
                                            s.data_ptr<float>(), rows, out, stream));
  return {y.view(with_last_dim(x.sizes(), out)), z.view(with_last_dim(x.sizes(), r))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bottleneck_adapter_backward_cuda(
    const Tensor& grad_out, const Tensor& x, const Tensor& down_weight, const Tensor& up_weight,
    const std::optional<Tensor>& up_bias, const Tensor& z, const Tensor& scale,
    c10::string_view activation, bool residual_is_x, bool needs_grad_x, bool needs_grad_scale) {
  check_bottleneck_adapter_backward_args(grad_out, x, down_weight, up_weight, up_bias, z, scale);
  const auto dtype = adapter_dtype(x);
  const auto act = cuda_act(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t in = x.size(-1), r = down_weight.size(0), out = up_weight.size(0);
  const Tensor g2 = as_rows(grad_out, out).contiguous();
  const Tensor x2 = as_rows(x, in).contiguous();
  const Tensor z2 = as_rows(z, r).contiguous();
  const int64_t rows = x2.size(0);  // grad_out and z have x's leading dimensions (checked)
  const Tensor s = scale.contiguous();
  const Tensor gu = at::mm(g2, up_weight);
  Tensor a = at::empty({rows, r}, x.options());
  Tensor gz = at::empty({rows, r}, x.options());
  Tensor scale_grad = needs_grad_scale ? at::zeros({}, scale.options()) : Tensor();
  check_launch(cuda::adapter_act_backward(dtype, gu.data_ptr(), z2.data_ptr<float>(),
                                          s.data_ptr<float>(), a.data_ptr(), gz.data_ptr(),
                                          needs_grad_scale ? scale_grad.data_ptr<float>() : nullptr,
                                          rows, r, act, stream));
  const Tensor g_colsum = at::sum(g2, 0, false, at::kFloat);
  Tensor grad_scale = at::empty({0}, scale.options());
  if (needs_grad_scale) {
    if (up_bias) scale_grad.add_(at::dot(g_colsum, up_bias->to(at::kFloat)));
    grad_scale = scale_grad.reshape(scale.sizes());
  }
  Tensor grad_x = at::empty({0, in}, x.options());
  if (needs_grad_x) {
    grad_x = (residual_is_x ? at::addmm(g2, gz, down_weight) : at::mm(gz, down_weight))
                 .view(x.sizes());
  }
  const Tensor grad_up = at::mm(g2.t(), a).mul_(s);
  return {grad_x,
          at::mm(gz.t(), x2),
          at::sum(gz, 0, false, at::kFloat).to(x.scalar_type()),
          grad_up,
          g_colsum.mul(s).to(x.scalar_type()),
          grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, CUDA, m) {
  m.impl("bottleneck_adapter", &bottleneck_adapter_cuda);
  m.impl("bottleneck_adapter_backward", &bottleneck_adapter_backward_cuda);
}

}  // namespace eefast
