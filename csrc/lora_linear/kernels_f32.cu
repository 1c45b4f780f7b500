// lora_linear CUDA kernels for one dtype (one file per dtype so they compile in parallel).
#include "lora_linear/kernels_impl.cuh"

namespace eefast::cuda {

cudaError_t lora_linear_forward_f32(const void* x, const void* x_lora, const void* weight,
                                     const void* bias, const void* lora_a, const void* lora_b,
                                     float s, void* y, void* xa, LoraShape p, cudaStream_t st) {
  return lora_linear_forward_impl<gemm::Float32>(x, x_lora, weight, bias, lora_a, lora_b, s, y, xa,
                                              p, st);
}

cudaError_t lora_linear_backward_f32(const void* g, const void* weight, const void* lora_a,
                                      const void* lora_b, const void* x_lora, const void* xa,
                                      float s, void* grad_x, void* grad_x_lora, void* grad_a,
                                      void* grad_b, void* gb, LoraShape p, cudaStream_t st) {
  return lora_linear_backward_impl<gemm::Float32>(g, weight, lora_a, lora_b, x_lora, xa, s, grad_x,
                                               grad_x_lora, grad_a, grad_b, gb, p, st);
}

}  // namespace eefast::cuda
