// Argument checks of exit_stats, shared by the CPU kernel and the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"

namespace eefast {

inline void check_exit_stats_args(const at::Tensor& hidden, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, double temperature) {
  constexpr const char* op = "exit_stats";
  TORCH_CHECK(hidden.dim() >= 1, op, ": hidden must be [..., d], got a 0-d tensor");
  const auto hdt = hidden.scalar_type();
  TORCH_CHECK(hdt == at::kFloat || hdt == at::kBFloat16 || hdt == at::kHalf, op,
              ": hidden must be float32, bfloat16 or float16, got ", hdt);
  const auto wdt = weight.scalar_type();
  TORCH_CHECK(wdt == at::kFloat || wdt == at::kBFloat16, op,
              ": weight must be float32 or bfloat16, got ", wdt);
  TORCH_CHECK(weight.device() == hidden.device(), op, ": weight is on ", weight.device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [vocab, d], got shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, op, ": weight has an empty vocab");
  TORCH_CHECK(hidden.size(-1) == weight.size(1), op, ": hidden has d=", hidden.size(-1),
              " but weight is [vocab, d=", weight.size(1), "]");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == wdt, op, ": bias has dtype ", bias->scalar_type(),
                " but weight has ", wdt);
    TORCH_CHECK(bias->device() == hidden.device(), op, ": bias is on ", bias->device(),
                " but hidden is on ", hidden.device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must be [vocab=", weight.size(0), "], got shape ", bias->sizes());
  }
  // The kernels scale logits by 1/T in float32: a subnormal T (flushed to zero) or one whose
  // reciprocal overflows would make every statistic NaN.
  TORCH_CHECK(std::isfinite(temperature) && temperature >= std::numeric_limits<float>::min() &&
                  std::isfinite(1.0f / static_cast<float>(temperature)),
              op, ": temperature must be a finite float32 number >= ",
              std::numeric_limits<float>::min(), " (a normal float), got ", temperature);
}

// The five outputs of exit_stats for `rows` flattened rows: fp32, argmax int64.
struct ExitStatsOutputs {
  at::Tensor lse, max_prob, argmax, entropy, margin;

  ExitStatsOutputs(int64_t rows, const at::TensorOptions& f32)
      : lse(at::empty({rows}, f32)),
        max_prob(at::empty({rows}, f32)),
        argmax(at::empty({rows}, f32.dtype(at::kLong))),
        entropy(at::empty({rows}, f32)),
        margin(at::empty({rows}, f32)) {}

  // The outputs shaped like hidden without its last dimension, in schema order.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shaped_like(
      at::IntArrayRef hidden_shape) const {
    const std::vector<int64_t> lead(hidden_shape.begin(), hidden_shape.end() - 1);
    return {lse.view(lead), max_prob.view(lead), argmax.view(lead), entropy.view(lead),
            margin.view(lead)};
  }
};

}  // namespace eefast
