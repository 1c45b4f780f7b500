// lora_linear's argument checks, shared by its CPU kernel and its CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "common/checks.h"

namespace eefast {

inline void check_lora_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                   const at::Tensor& lora_b,
                                   const std::optional<at::Tensor>& x_lora, double scaling) {
  constexpr const char* op = "lora_linear";
  check_finite(op, "scaling", scaling);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension (features last), got a 0-d tensor");
  check_float_dtype(op, x);
  check_same_dtype_device(op, x, "weight", weight);
  check_same_dtype_device(op, x, "lora_a", lora_a);
  check_same_dtype_device(op, x, "lora_b", lora_b);
  if (bias) check_same_dtype_device(op, x, "bias", *bias);
  if (x_lora) check_same_dtype_device(op, x, "x_lora", *x_lora);

  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got shape ",
              weight.sizes());
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(x.size(-1) == in, op, ": x has ", x.size(-1), " features (last dim) but weight has in_features=", in);
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == in, op, ": lora_a must be [r, in_features=", in,
              "], got shape ", lora_a.sizes());
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.size(0) == out, op, ": lora_b must be [out_features=", out,
              ", r], got shape ", lora_b.sizes());
  TORCH_CHECK(lora_a.size(0) == lora_b.size(1), op, ": lora_a has rank r=", lora_a.size(0),
              " but lora_b has rank r=", lora_b.size(1), "; the ranks must match");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": bias must be [out_features=", out,
                "], got shape ", bias->sizes());
  }
  if (x_lora) {
    TORCH_CHECK(x_lora->sizes() == x.sizes(), op, ": x_lora must have the shape of x ", x.sizes(),
                ", got ", x_lora->sizes());
  }
}

inline void check_lora_linear_backward_args(const at::Tensor& grad_out, const at::Tensor& weight,
                                            const at::Tensor& lora_a, const at::Tensor& lora_b,
                                            const at::Tensor& x_lora, const at::Tensor& xa,
                                            double scaling) {
  constexpr const char* op = "lora_linear_backward";
  check_finite(op, "scaling", scaling);
  check_float_dtype(op, x_lora);
  check_same_dtype_device(op, x_lora, "grad_out", grad_out);
  check_same_dtype_device(op, x_lora, "weight", weight);
  check_same_dtype_device(op, x_lora, "lora_a", lora_a);
  check_same_dtype_device(op, x_lora, "lora_b", lora_b);
  check_same_dtype_device(op, x_lora, "xa", xa);
  TORCH_CHECK(weight.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2, op,
              ": weight, lora_a and lora_b must be 2-D");
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_a.size(0);
  TORCH_CHECK(x_lora.dim() >= 1 && x_lora.size(-1) == in, op, ": x must end in in_features=", in,
              ", got shape ", x_lora.sizes());
  TORCH_CHECK(grad_out.size(-1) == out && same_lead(grad_out, x_lora),
              op, ": grad_out must be x's shape with out_features=", out, " last, got ", grad_out.sizes());
  TORCH_CHECK(lora_a.size(1) == in && lora_b.size(0) == out && lora_b.size(1) == r, op,
              ": lora_a [r, in] and lora_b [out, r] do not match weight [out, in]");
  TORCH_CHECK(xa.size(-1) == r && same_lead(xa, x_lora), op, ": xa must end in r=", r,
              ", got shape ", xa.sizes());
}

}  // namespace eefast
