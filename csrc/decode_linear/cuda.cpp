// decode_linear on CUDA is cuBLAS (at::linear). The op exists for the CPU, where MKL's sgemm
// is slow at 2-16 rows; on CUDA it only keeps one code path for callers (not re-timed on a GPU).
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include "decode_linear/decode_linear.h"

namespace eefast {
namespace {

at::Tensor decode_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  check_decode_linear_args(x, weight, bias);
  return at::linear(x, weight, bias);
}

// Not a CUDA kernel yet: the int8 weight is dequantised, then cuBLAS.
at::Tensor decode_linear_q8_cuda(const at::Tensor& x, const at::Tensor& qweight,
                                 const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  check_decode_linear_q8_args(x, qweight, scales, bias);
  return at::linear(x, dequantize_rows(qweight, scales, x.scalar_type()), bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, CUDA, m) {
  m.impl("decode_linear", &decode_linear_cuda);
  m.impl("decode_linear_q8", &decode_linear_q8_cuda);
}

}  // namespace eefast
