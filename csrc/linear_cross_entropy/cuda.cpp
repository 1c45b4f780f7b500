// CUDA glue of linear_cross_entropy's fused row pass: checks and the current stream around
// linear_cross_entropy/kernels.cuh. Built only against a CUDA-enabled torch.
#include "linear_cross_entropy/linear_cross_entropy.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "linear_cross_entropy/kernels.cuh"

namespace eefast {

void lce_rows_cuda(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& scale,
                   double z_loss, at::Tensor& lse, const at::Tensor& dz) {
  TORCH_CHECK(z.scalar_type() == at::kFloat && z.is_contiguous() && targets.is_contiguous() &&
                  lse.is_contiguous(),
              "linear_cross_entropy: internal error, bad row-pass inputs");
  const bool grads = dz.defined();
  const at::Tensor sc = grads ? scale.contiguous() : at::Tensor();
  TORCH_CHECK(!grads || (dz.is_contiguous() && dz.sizes() == z.sizes()),
              "linear_cross_entropy: internal error, bad row-pass dz");
  const c10::cuda::CUDAGuard guard(z.device());
  const cudaError_t err = cuda::lce_rows(
      z.data_ptr<float>(), targets.data_ptr<int64_t>(), grads ? sc.data_ptr<float>() : nullptr,
      static_cast<float>(z_loss), z.size(0), z.size(1), lse.data_ptr<float>(),
      grads ? dz.data_ptr() : nullptr, grads && dz.scalar_type() == at::kBFloat16,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "linear_cross_entropy: CUDA error: ", cudaGetErrorString(err));
}

}  // namespace eefast
