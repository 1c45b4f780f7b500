// Argument checks and activations shared by the CPU kernel and the CUDA glue of
// bottleneck_adapter: out = residual + scale * (act(x D^T + bd) U^T + bu), residual = x if absent.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

#include "common/checks.h"

namespace eefast {

enum class AdapterActivation { kIdentity, kRelu, kGelu, kGeluTanh, kSilu, kTanh };

inline AdapterActivation parse_activation(std::string_view name) {
  if (name == "identity") return AdapterActivation::kIdentity;
  if (name == "relu") return AdapterActivation::kRelu;
  if (name == "gelu") return AdapterActivation::kGelu;
  if (name == "gelu_tanh") return AdapterActivation::kGeluTanh;
  if (name == "silu") return AdapterActivation::kSilu;
  if (name == "tanh") return AdapterActivation::kTanh;
  TORCH_CHECK(false, "bottleneck_adapter: unknown activation '", name,
              "'; expected one of identity, relu, gelu, gelu_tanh, silu, tanh");
}

inline void check_scale(const char* op, const at::Tensor& scale, const at::Tensor& x) {
  TORCH_CHECK(scale.numel() == 1 && scale.dim() <= 1, op,
              ": scale must hold one element (a 0-d or [1] tensor), got shape ", scale.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ",
              scale.scalar_type());
  TORCH_CHECK(scale.device() == x.device(), op, ": scale is on ", scale.device(),
              " but x is on ", x.device());
}

inline void check_bottleneck_adapter_args(const at::Tensor& x,
                                          const std::optional<at::Tensor>& residual,
                                          const at::Tensor& down_weight,
                                          const std::optional<at::Tensor>& down_bias,
                                          const at::Tensor& up_weight,
                                          const std::optional<at::Tensor>& up_bias,
                                          const at::Tensor& scale) {
  constexpr const char* op = "bottleneck_adapter";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension (features last), got a 0-d tensor");
  check_float_dtype(op, x);
  check_same_dtype_device(op, x, "down_weight", down_weight);
  check_same_dtype_device(op, x, "up_weight", up_weight);
  if (down_bias) check_same_dtype_device(op, x, "down_bias", *down_bias);
  if (up_bias) check_same_dtype_device(op, x, "up_bias", *up_bias);
  if (residual) check_same_dtype_device(op, x, "residual", *residual);
  check_scale(op, scale, x);
  TORCH_CHECK(down_weight.dim() == 2 && down_weight.size(1) == x.size(-1), op,
              ": down_weight must be [bottleneck, in_features=", x.size(-1), "], got shape ",
              down_weight.sizes());
  const int64_t r = down_weight.size(0), out = up_weight.size(0);
  TORCH_CHECK(up_weight.dim() == 2 && up_weight.size(1) == r, op,
              ": up_weight must be [out_features, bottleneck=", r, "], got shape ", up_weight.sizes());
  if (down_bias) {
    TORCH_CHECK(down_bias->dim() == 1 && down_bias->size(0) == r, op,
                ": down_bias must be [bottleneck=", r, "], got shape ", down_bias->sizes());
  }
  if (up_bias) {
    TORCH_CHECK(up_bias->dim() == 1 && up_bias->size(0) == out, op,
                ": up_bias must be [out_features=", out, "], got shape ", up_bias->sizes());
  }
  if (residual) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(with_last_dim(x.sizes(), out)), op,
                ": residual must be x's shape with out_features=", out, " last, ",
                with_last_dim(x.sizes(), out), ", got ", residual->sizes());
  } else {
    TORCH_CHECK(out == x.size(-1), op, ": without a residual the output is added to x, so "
                "up_weight must have out_features=in_features=", x.size(-1), ", got ", out);
  }
}

inline void check_bottleneck_adapter_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                                   const at::Tensor& down_weight,
                                                   const at::Tensor& up_weight,
                                                   const std::optional<at::Tensor>& up_bias,
                                                   const at::Tensor& z, const at::Tensor& scale) {
  constexpr const char* op = "bottleneck_adapter_backward";
  check_float_dtype(op, x);
  check_same_dtype_device(op, x, "grad_out", grad_out);
  check_same_dtype_device(op, x, "down_weight", down_weight);
  check_same_dtype_device(op, x, "up_weight", up_weight);
  if (up_bias) check_same_dtype_device(op, x, "up_bias", *up_bias);
  check_scale(op, scale, x);
  check_device(op, "z", z, x);
  const int64_t in = x.size(-1), r = down_weight.size(0), out = up_weight.size(0);
  TORCH_CHECK(down_weight.dim() == 2 && down_weight.size(1) == in && up_weight.dim() == 2 &&
                  up_weight.size(1) == r,
              op, ": down_weight [r, in] and up_weight [out, r] do not match x");
  TORCH_CHECK(z.scalar_type() == at::kFloat && z.size(-1) == r && same_lead(z, x),
              op, ": z must be the float32 [..., r=", r, "] from the forward, got ", z.sizes());
  TORCH_CHECK(grad_out.size(-1) == out && same_lead(grad_out, x),
              op, ": grad_out must be x's shape with out_features=", out, " last, got ",
              grad_out.sizes());
}

}  // namespace eefast
