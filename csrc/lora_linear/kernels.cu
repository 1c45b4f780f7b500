// The lora_linear launch functions declared in lora_linear/kernels.cuh: bf16 on CUTLASS
// (kernels_bf16.cu). fp32 never comes here: the glue runs it through cuBLAS SGEMM (blas.h),
// which beats CUTLASS's SIMT kernels.
#include "lora_linear/kernels.cuh"

namespace eefast::cuda {

// Defined in kernels_bf16.cu.
cudaError_t lora_linear_forward_bf16(const void*, const void*, const void*, const void*,
                                     const void*, const void*, float, void*, void*, LoraShape,
                                     cudaStream_t);
cudaError_t lora_linear_backward_bf16(const void*, const void*, const void*, const void*,
                                      const void*, const void*, float, void*, void*, void*, void*,
                                      void*, LoraShape, cudaStream_t);

cudaError_t lora_linear_forward(DType dtype, const void* x, const void* x_lora, const void* weight,
                                const void* bias, const void* lora_a, const void* lora_b,
                                float scaling, void* y, void* xa, LoraShape shape,
                                cudaStream_t stream) {
  if (dtype != DType::kBFloat16) return cudaErrorNotSupported;
  return lora_linear_forward_bf16(x, x_lora, weight, bias, lora_a, lora_b, scaling, y, xa, shape,
                                  stream);
}

cudaError_t lora_linear_backward(DType dtype, const void* grad_out, const void* weight,
                                 const void* lora_a, const void* lora_b, const void* x_lora,
                                 const void* xa, float scaling, void* grad_x, void* grad_x_lora,
                                 void* grad_a, void* grad_b, void* gb_workspace, LoraShape shape,
                                 cudaStream_t stream) {
  if (dtype != DType::kBFloat16) return cudaErrorNotSupported;
  return lora_linear_backward_bf16(grad_out, weight, lora_a, lora_b, x_lora, xa, scaling, grad_x,
                                   grad_x_lora, grad_a, grad_b, gb_workspace, shape, stream);
}

}  // namespace eefast::cuda
