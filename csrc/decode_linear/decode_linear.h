// decode_linear's argument checks, shared by the CPU and CUDA kernels, and its CPU kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "common/checks.h"

namespace eefast {

inline void check_decode_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "decode_linear";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [out, in], got ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": x's last dim (",
              x.dim() ? x.size(-1) : 0, ") must equal weight's in features (", weight.size(1), ")");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op,
              ": x must be float32, bfloat16, float16 or float64, got ", dt);
  check_same_dtype_device(op, x, "weight", weight);
  if (bias) {
    check_same_dtype_device(op, x, "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [",
                weight.size(0), "], got ", bias->sizes());
  }
}

// The CPU kernel, also called by decode_block's.
at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias);

}  // namespace eefast
