#include "lora_linear/blas.h"

#include "common/gemm.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

namespace eefast {

using at::Tensor;

void lora_forward_blas(const Tensor& x, const Tensor& x_lora, const Tensor& weight,
                       const std::optional<Tensor>& bias, const Tensor& lora_a,
                       const Tensor& lora_b, double scaling, Tensor& y, Tensor& xa) {
  at::mm_out(xa, x_lora, lora_a.t());
  gemm_plus(bias ? *bias : Tensor(), x, weight.t(), y);  // oneDNN for float32 on the CPU
  y.addmm_(xa, lora_b.t(), 1.0, scaling);  // the low-rank term, accumulated in place
}

std::tuple<Tensor, Tensor> lora_backward_blas(const Tensor& grad_out, const Tensor& weight,
                                              const Tensor& lora_a, const Tensor& lora_b,
                                              const Tensor& x_lora, const Tensor& xa,
                                              double scaling, bool needs_grad_x,
                                              bool split_grad_x, Tensor& grad_x,
                                              Tensor& grad_x_lora) {
  const Tensor gb = at::mm(grad_out, lora_b);  // [N, r]
  Tensor grad_b = at::mm(grad_out.t(), xa).mul_(scaling);
  Tensor grad_a = at::mm(gb.t(), x_lora).mul_(scaling);
  if (needs_grad_x) {
    gemm(grad_out, weight, grad_x, /*accumulate=*/false);
    if (split_grad_x) {
      at::mm_out(grad_x_lora, gb, lora_a).mul_(scaling);
    } else {
      grad_x.addmm_(gb, lora_a, 1.0, scaling);  // low-rank input grad, accumulated in place
    }
  }
  return {grad_a, grad_b};
}

}  // namespace eefast
