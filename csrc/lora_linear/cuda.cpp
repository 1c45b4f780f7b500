// CUDA dispatch glue of lora_linear: checks, allocation and the current stream around the
// launch functions in lora_linear/kernels.cuh (bf16, CUTLASS on tensor cores). fp32 runs
// through cuBLAS SGEMM (blas.cpp), which beats CUTLASS's SIMT kernels: 0.58-0.92x PEFT on an
// H100 with CUTLASS. Built only against a CUDA-enabled torch.
#include "lora_linear/lora_linear.h"
#include "lora_linear/blas.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "lora_linear/kernels.cuh"

namespace eefast {
namespace {

using at::Tensor;

cuda::DType cuda_dtype(const Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": CUDA supports float32 and bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err != cudaErrorNotSupported, op, ": no CUDA kernel for this shape/alignment");
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

cuda::LoraShape lora_shape(int64_t rows, const Tensor& weight, const Tensor& lora_a) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(rows <= kMax && weight.size(0) <= kMax && weight.size(1) <= kMax,
              "lora_linear: sizes must fit in int32 on CUDA");
  return {rows, weight.size(1), weight.size(0), lora_a.size(0)};
}

std::tuple<Tensor, Tensor> lora_linear_cuda(const Tensor& x, const Tensor& weight,
                                            const std::optional<Tensor>& bias,
                                            const Tensor& lora_a, const Tensor& lora_b,
                                            double scaling, const std::optional<Tensor>& x_lora) {
  check_lora_linear_args(x, weight, bias, lora_a, lora_b, x_lora, scaling);
  const auto dtype = cuda_dtype(x, "lora_linear");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_a.size(0);
  const Tensor x2 = as_rows(x, in).contiguous();
  const Tensor xl2 = x_lora ? as_rows(*x_lora, in).contiguous() : x2;
  const Tensor w = weight.contiguous(), a = lora_a.contiguous(), b = lora_b.contiguous();
  const Tensor bias_c = bias ? bias->contiguous() : Tensor();
  Tensor y = at::empty({x2.size(0), out}, x.options());
  Tensor xa = at::empty({x2.size(0), r}, x.options());
  if (dtype == cuda::DType::kFloat32) {  // cuBLAS SGEMM beats CUTLASS's SIMT kernels in fp32
    lora_forward_blas(x2, xl2, w, bias, a, b, scaling, y, xa);
    return {y.view(with_last_dim(x.sizes(), out)), xa.view(with_last_dim(x.sizes(), r))};
  }
  check_cuda(cuda::lora_linear_forward(dtype, x2.data_ptr(), xl2.data_ptr(), w.data_ptr(),
                                       bias ? bias_c.data_ptr() : nullptr, a.data_ptr(),
                                       b.data_ptr(), static_cast<float>(scaling), y.data_ptr(),
                                       xa.data_ptr(), lora_shape(x2.size(0), w, a),
                                       c10::cuda::getCurrentCUDAStream().stream()),
             "lora_linear");
  return {y.view(with_last_dim(x.sizes(), out)), xa.view(with_last_dim(x.sizes(), r))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lora_linear_backward_cuda(
    const Tensor& grad_out, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
    const Tensor& x_lora, const Tensor& xa, double scaling, bool needs_grad_x, bool split_grad_x) {
  check_lora_linear_backward_args(grad_out, weight, lora_a, lora_b, x_lora, xa, scaling);
  const auto dtype = cuda_dtype(x_lora, "lora_linear_backward");
  const c10::cuda::CUDAGuard guard(x_lora.device());
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_a.size(0);
  const Tensor g2 = as_rows(grad_out, out).contiguous();
  const Tensor xl2 = as_rows(x_lora, in).contiguous();
  const Tensor xa2 = as_rows(xa, r).contiguous();
  const Tensor w = weight.contiguous(), a = lora_a.contiguous(), b = lora_b.contiguous();
  const int64_t rows = xl2.size(0);
  const auto opts = x_lora.options();
  Tensor grad_x = at::empty({needs_grad_x ? rows : 0, in}, opts);
  Tensor grad_x_lora = at::empty({needs_grad_x && split_grad_x ? rows : 0, in}, opts);
  Tensor grad_a = at::empty({r, in}, opts), grad_b = at::empty({out, r}, opts);
  if (dtype == cuda::DType::kFloat32) {  // cuBLAS SGEMM, as in the forward
    std::tie(grad_a, grad_b) = lora_backward_blas(g2, w, a, b, xl2, xa2, scaling, needs_grad_x,
                                                  split_grad_x, grad_x, grad_x_lora);
  } else {
    Tensor gb = at::empty({rows, r}, opts);
    check_cuda(cuda::lora_linear_backward(
                 dtype, g2.data_ptr(), w.data_ptr(), a.data_ptr(), b.data_ptr(), xl2.data_ptr(),
                 xa2.data_ptr(), static_cast<float>(scaling),
                 needs_grad_x ? grad_x.data_ptr() : nullptr,
                 needs_grad_x && split_grad_x ? grad_x_lora.data_ptr() : nullptr,
                 grad_a.data_ptr(), grad_b.data_ptr(), gb.data_ptr(), lora_shape(rows, w, a),
                 c10::cuda::getCurrentCUDAStream().stream()),
             "lora_linear_backward");
  }
  if (needs_grad_x) grad_x = grad_x.view(x_lora.sizes());
  if (needs_grad_x && split_grad_x) grad_x_lora = grad_x_lora.view(x_lora.sizes());
  return {grad_x, grad_x_lora, grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, CUDA, m) {
  m.impl("lora_linear", &lora_linear_cuda);
  m.impl("lora_linear_backward", &lora_linear_backward_cuda);
}

}  // namespace eefast
