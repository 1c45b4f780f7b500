// Dtype dispatch of the lora_linear launch functions declared in lora_linear.cuh.
#include "lora_linear/kernels.cuh"

namespace eefast::cuda {

// Defined in lora_linear_f32.cu and lora_linear_bf16.cu.
#define EEFAST_DECLARE_LORA(suffix)                                                             \
  cudaError_t lora_linear_forward_##suffix(const void*, const void*, const void*, const void*, \
                                           const void*, const void*, float, void*, void*,      \
                                           LoraShape, cudaStream_t);                           \
  cudaError_t lora_linear_backward_##suffix(const void*, const void*, const void*, const void*,\
                                            const void*, const void*, float, void*, void*,     \
                                            void*, void*, void*, LoraShape, cudaStream_t);
EEFAST_DECLARE_LORA(f32)
EEFAST_DECLARE_LORA(bf16)
#undef EEFAST_DECLARE_LORA

cudaError_t lora_linear_forward(DType dtype, const void* x, const void* x_lora, const void* weight,
                                const void* bias, const void* lora_a, const void* lora_b,
                                float scaling, void* y, void* xa, LoraShape shape,
                                cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return lora_linear_forward_f32(x, x_lora, weight, bias, lora_a, lora_b, scaling, y, xa,
                                     shape, stream);
    case DType::kBFloat16:
      return lora_linear_forward_bf16(x, x_lora, weight, bias, lora_a, lora_b, scaling, y, xa,
                                      shape, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t lora_linear_backward(DType dtype, const void* grad_out, const void* weight,
                                 const void* lora_a, const void* lora_b, const void* x_lora,
                                 const void* xa, float scaling, void* grad_x, void* grad_x_lora,
                                 void* grad_a, void* grad_b, void* gb_workspace, LoraShape shape,
                                 cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return lora_linear_backward_f32(grad_out, weight, lora_a, lora_b, x_lora, xa, scaling,
                                      grad_x, grad_x_lora, grad_a, grad_b, gb_workspace, shape,
                                      stream);
    case DType::kBFloat16:
      return lora_linear_backward_bf16(grad_out, weight, lora_a, lora_b, x_lora, xa, scaling,
                                       grad_x, grad_x_lora, grad_a, grad_b, gb_workspace, shape,
                                       stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace eefast::cuda
