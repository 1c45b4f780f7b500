// decode_linear's argument checks, shared by the CPU and CUDA kernels, and its CPU kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace eefast {

inline void check_decode_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, "decode_linear: weight must be [out, in], got ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "decode_linear: x's last dim (",
              x.dim() ? x.size(-1) : 0, ") must equal weight's in features (", weight.size(1), ")");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "decode_linear: x is ", x.scalar_type(),
              " but weight is ", weight.scalar_type());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "decode_linear: bias must be [", weight.size(0), "]");
  TORCH_CHECK(x.device() == weight.device() && (!bias || bias->device() == x.device()),
              "decode_linear: x, weight and bias must be on one device");
}

// The CPU kernel, also called by decode_block's.
at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias);

}  // namespace eefast
