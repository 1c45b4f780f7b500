// CUDA launch functions of lora_linear (bf16; fp32 runs through cuBLAS in the glue). Plain
// pointers, sizes and a stream: no torch headers.
// All matrices are row-major and contiguous: x/x_lora [rows, in], weight [out, in],
// lora_a [r, in], lora_b [out, r], y [rows, out], xa [rows, r].
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_dtype.cuh"

namespace eefast::cuda {

struct LoraShape {
  int64_t rows, in, out, r;
};

// xa = x_lora A^T; y = x W^T + bias + scaling * xa B^T. bias may be null.
cudaError_t lora_linear_forward(DType dtype, const void* x, const void* x_lora, const void* weight,
                                const void* bias, const void* lora_a, const void* lora_b,
                                float scaling, void* y, void* xa, LoraShape shape,
                                cudaStream_t stream);

// gb = grad_out B (workspace, [rows, r]); grad_b = s grad_out^T xa; grad_a = s gb^T x_lora;
// grad_x = grad_out W, plus s gb A unless grad_x_lora is given, which then receives it.
// grad_x and grad_x_lora may be null (not needed).
cudaError_t lora_linear_backward(DType dtype, const void* grad_out, const void* weight,
                                 const void* lora_a, const void* lora_b, const void* x_lora,
                                 const void* xa, float scaling, void* grad_x, void* grad_x_lora,
                                 void* grad_a, void* grad_b, void* gb_workspace, LoraShape shape,
                                 cudaStream_t stream);

}  // namespace eefast::cuda
