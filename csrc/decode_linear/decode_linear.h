// decode_linear's argument checks, shared by the CPU and CUDA kernels, and its CPU kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "common/checks.h"
#include "cpu/gguf_blocks.h"

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

// decode_linear_q8: y = x (scales * qweight)^T + b, with qweight int8 [out, in] and one fp32
// scale per output row (weight-only int8, symmetric).
inline void check_decode_linear_q8_args(const at::Tensor& x, const at::Tensor& qweight,
                                        const at::Tensor& scales,
                                        const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "decode_linear_q8";
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, op,
              ": qweight must be int8 [out, in], got ", qweight.scalar_type(), " ",
              qweight.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
                  scales.size(0) == qweight.size(0), op, ": scales must be float32 [",
              qweight.size(0), "] (one per output row), got ", scales.scalar_type(), " ",
              scales.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == qweight.size(1), op, ": x's last dim (",
              x.dim() ? x.size(-1) : 0, ") must equal qweight's in features (",
              qweight.size(1), ")");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op,
              ": x must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK(qweight.device() == x.device() && scales.device() == x.device(), op,
              ": qweight and scales must be on x's device ", x.device());
  if (bias) {
    check_same_dtype_device(op, x, "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == qweight.size(0), op, ": bias must be [",
                qweight.size(0), "], got ", bias->sizes());
  }
}

// scales[:, None] * qweight in `dtype`: the weight that decode_linear_q8 multiplies by.
inline at::Tensor dequantize_rows(const at::Tensor& qweight, const at::Tensor& scales,
                                  at::ScalarType dtype) {
  return qweight.to(at::kFloat).mul(scales.unsqueeze(1)).to(dtype);
}

at::Tensor decode_linear_q8_cpu(const at::Tensor& x, const at::Tensor& qweight,
                                const at::Tensor& scales, const std::optional<at::Tensor>& bias);

// decode_linear_gguf: y = x W^T + b with W held as GGUF blocks, qweight uint8
// [out, in / 32, block bytes] (cpu/gguf_blocks.h). Returns the blocks' type.
inline cpu::GgufType check_gguf_weight(const char* op, const char* name, const at::Tensor& w) {
  cpu::GgufType type{};
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 &&
                  cpu::gguf_type_of_block_bytes(w.size(2), &type), op, ": ", name,
              " must be GGUF blocks, uint8 [out, in / 32, 18 (Q4_0) | 20 (Q4_1) | 34 (Q8_0)], "
              "got ", w.scalar_type(), " ", w.sizes());
  return type;
}

inline void check_decode_linear_gguf_args(const at::Tensor& x, const at::Tensor& qweight,
                                          const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "decode_linear_gguf";
  check_gguf_weight(op, "qweight", qweight);
  const int64_t in = qweight.size(1) * cpu::kGgufGroup;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, op, ": x's last dim (", x.dim() ? x.size(-1) : 0,
              ") must equal qweight's in features (", qweight.size(1), " blocks of 32 = ", in, ")");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op,
              ": x must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK(qweight.device() == x.device(), op, ": qweight must be on x's device ", x.device());
  if (bias) {
    check_same_dtype_device(op, x, "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == qweight.size(0), op, ": bias must be [",
                qweight.size(0), "], got ", bias->sizes());
  }
}

// The float32 [out, in] weight that GGUF blocks define (CPU).
at::Tensor dequantize_gguf_cpu(const at::Tensor& qweight);

at::Tensor decode_linear_gguf_cpu(const at::Tensor& x, const at::Tensor& qweight,
                                  const std::optional<at::Tensor>& bias);

// The CPU kernel without tensors around it, for decode_block: one linear of a call to
// linear_rows_into, writing out [rows, out] (float32) = x W^T + bias.
struct RowsLinear {
  const at::Tensor* weight;  // float32/bf16 [out, in], int8 with scales, or GGUF blocks
  const at::Tensor* scales;  // float32 [out], or nullptr
  const std::optional<at::Tensor>& bias;
  float* out;
};

// Several linears of the same x [rows, in] (float32) in one parallel region, with the same
// sums as decode_linear(_q8). Returns false (writing nothing) where that kernel does not run
// (no AVX2, more than 8 rows, a non-contiguous weight); the caller then takes the ATen path.
bool linear_rows_into(const float* x, int64_t rows, const std::vector<RowsLinear>& linears);

}  // namespace eefast
