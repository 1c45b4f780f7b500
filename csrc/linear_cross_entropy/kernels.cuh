// CUDA row pass of linear_cross_entropy: plain pointers, sizes and a stream, no torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace eefast::cuda {

// Per row r of fp32 logits z [rows, vocab] (contiguous): lse[r] = logsumexp(z[r]). When dz is
// not null, also the loss gradient of the logits,
//   dz[r] = scale[r] * ((1 + 2 z_loss lse[r]) softmax(z[r]) - onehot(targets[r])),
// written as fp32 (dz may be z itself) or bf16 (dz_bf16). One block per row, two reads of z.
cudaError_t lce_rows(const float* z, const int64_t* targets, const float* scale, float z_loss,
                     int64_t rows, int64_t vocab, float* lse, void* dz, bool dz_bf16,
                     cudaStream_t stream);

}  // namespace eefast::cuda
