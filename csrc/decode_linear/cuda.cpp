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

// GGUF blocks have no CUDA kernel yet: say so rather than "no CUDA kernel registered".
[[noreturn]] void gguf_not_on_cuda(const char* op) {
  TORCH_CHECK(false, op, ": GGUF block weights run on CPU only for now; on CUDA load the "
              "backbone with weights='fp32', 'bf16' or 'int8'");
  throw;  // unreachable
}

at::Tensor decode_linear_gguf_cuda(const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&) {
  gguf_not_on_cuda("decode_linear_gguf");
}

at::Tensor dequantize_gguf_cuda(const at::Tensor&) { gguf_not_on_cuda("dequantize_gguf"); }

at::Tensor pack_gguf_cuda(const at::Tensor&) { gguf_not_on_cuda("pack_gguf"); }

}  // namespace

TORCH_LIBRARY_IMPL(eefast, CUDA, m) {
  m.impl("decode_linear_gguf", &decode_linear_gguf_cuda);
  m.impl("dequantize_gguf", &dequantize_gguf_cuda);
  m.impl("pack_gguf", &pack_gguf_cuda);
  m.impl("decode_linear", &decode_linear_cuda);
  m.impl("decode_linear_q8", &decode_linear_q8_cuda);
}

}  // namespace eefast
