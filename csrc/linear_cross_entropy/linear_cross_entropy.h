// linear_cross_entropy's hook into its CUDA row pass (linear_cross_entropy/cuda.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace eefast {

#ifdef EEFAST_WITH_CUDA
// For one chunk of fp32 logits z [n, vocab] on CUDA: lse [n, 1] (written) and, when dz is
// defined (fp32 [n, vocab], possibly z itself, or bf16), the logits' gradient of the cross-
// entropy + z-loss with per-row scale [n]. See linear_cross_entropy/kernels.cuh.
void lce_rows_cuda(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& scale,
                   double z_loss, at::Tensor& lse, const at::Tensor& dz);
#endif

}  // namespace eefast
