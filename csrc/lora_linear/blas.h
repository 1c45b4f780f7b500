// lora_linear in BLAS calls, for any device: the CPU's fp32 kernel (oneDNN via common/gemm.h for
// the frozen weight's GEMMs, ATen for the low-rank ones) and
// CUDA's fp32 path (cuBLAS SGEMM, which beats a CUTLASS SIMT GEMM there). The low-rank terms are
// accumulated by beta=1 GEMMs, so no [tokens, out] temporary is allocated, forward or backward.
// All tensors are 2-D [rows, features] views; outputs are preallocated.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace eefast {

// xa = x_lora A^T; y = x W^T + bias + s xa B^T.
void lora_forward_blas(const at::Tensor& x, const at::Tensor& x_lora, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                       const at::Tensor& lora_b, double scaling, at::Tensor& y, at::Tensor& xa);

// (grad_a, grad_b); and when needs_grad_x, grad_x = g W (+ s (g B) A, which goes to grad_x_lora
// instead when split_grad_x).
std::tuple<at::Tensor, at::Tensor> lora_backward_blas(
    const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& x_lora, const at::Tensor& xa, double scaling,
    bool needs_grad_x, bool split_grad_x, at::Tensor& grad_x, at::Tensor& grad_x_lora);

}  // namespace eefast
