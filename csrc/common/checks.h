// Argument checks every op shares: one dtype and one device for all inputs, float dtypes, and
// a shape helper. Each op's own checks live in csrc/<op>/<op>.h and call these.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace eefast {

inline void check_same_dtype_device(const char* op, const at::Tensor& x, const char* name,
                                    const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type(), "; all inputs must share one dtype");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device(), "; all inputs must be on one device");
}

inline void check_float_dtype(const char* op, const at::Tensor& x) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be a float32, bfloat16 or float16 tensor, got ", dt);
}

// A hyper-parameter that must be a finite number (NaN and inf would be swallowed or spread).
inline void check_finite(const char* op, const char* name, double value) {
  TORCH_CHECK(std::isfinite(value), op, ": ", name, " must be finite, got ", value);
}

// Every tensor argument on the first one's device. A tensor on another device (the meta device
// included) would otherwise send the whole call to the wrong kernel.
inline void check_device(const char* op, const char* name, const at::Tensor& t,
                         const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but the inputs are on ", ref.device(), "; all inputs must be on one device");
}

// t as [rows, cols], rows the product of its leading dimensions: reshape({-1, cols}) cannot
// infer rows when cols is 0.
inline at::Tensor as_rows(const at::Tensor& t, int64_t cols) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) rows *= t.size(i);
  return t.reshape({rows, cols});
}

// Whether a and b have the same leading dimensions (all but the last).
inline bool same_lead(const at::Tensor& a, const at::Tensor& b) {
  return a.dim() == b.dim() && a.sizes().slice(0, a.dim() - 1) == b.sizes().slice(0, b.dim() - 1);
}

// Shape of x with the last dimension replaced.
inline std::vector<int64_t> with_last_dim(at::IntArrayRef shape, int64_t last) {
  std::vector<int64_t> s(shape.begin(), shape.end());
  s.back() = last;
  return s;
}

}  // namespace eefast
