// CUDA element-wise passes of bottleneck_adapter (the GEMMs go to cuBLAS through ATen).
// Plain pointers, sizes and a stream: no torch headers. Matrices are row-major, contiguous.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_dtype.cuh"

namespace eefast::cuda {

// Activation codes, in the order of eefast::AdapterActivation.
enum class Act : int { kIdentity = 0, kRelu, kGelu, kGeluTanh, kSilu, kTanh };

// z[i, j] = xd[i, j] + bias[j] (float32 out; bias may be null); a = act(z) in dtype.
cudaError_t adapter_bias_act(DType dtype, const void* xd, const void* bias, float* z, void* a,
                             int64_t rows, int64_t r, Act act, cudaStream_t stream);

// out[i, j] = residual[i, j] + scale[0] * (out[i, j] + bias[j]); bias may be null. out holds
// a U^T on entry. scale is a device pointer, so a learned scale needs no host sync.
cudaError_t adapter_scale_residual(DType dtype, void* out, const void* residual,
                                   const void* bias, const float* scale, int64_t rows,
                                   int64_t features, cudaStream_t stream);

// From gu = grad_out U [rows, r] and the forward's z: a = act(z), gz = scale * gu * act'(z),
// both in dtype; when scale_grad is not null, atomically adds sum(gu * a) to *scale_grad.
cudaError_t adapter_act_backward(DType dtype, const void* gu, const float* z, const float* scale,
                                 void* a, void* gz, float* scale_grad, int64_t rows, int64_t r,
                                 Act act, cudaStream_t stream);

}  // namespace eefast::cuda
