// CUDA launch function of exit_stats. Plain pointers, sizes and a stream: no torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace eefast::cuda {

// Online-softmax partial of one (vocab chunk, row); the workspace holds chunks x rows of them.
struct ExitStatsPartial {
  float max1, max2, sum, ent;
  int64_t arg1, nan_at;
};

// Bytes of workspace exit_stats_forward needs.
int64_t exit_stats_workspace_bytes(int64_t rows, int64_t vocab);

// Per row of hidden [rows, d] (fp32): statistics of (hidden W^T + bias) / temperature, with W
// [vocab, d] fp32 or bf16 (weight_bf16) and bias [vocab] fp32 or null. Outputs are [rows]:
// lse, max_prob, entropy, margin fp32 and argmax int64.
cudaError_t exit_stats_forward(const float* hidden, const void* weight, bool weight_bf16,
                               const float* bias, float inv_temperature, int64_t rows, int64_t d,
                               int64_t vocab, void* workspace, float* lse, float* max_prob,
                               int64_t* argmax, float* entropy, float* margin,
                               cudaStream_t stream);

// The same statistics from precomputed fp32 logits [rows, vocab] (contiguous), adding bias
// (fp32 [vocab] or null) before the temperature. Used for many rows, where a GEMM makes the
// logits faster than the fused kernel can.
cudaError_t exit_stats_from_logits(const float* logits, const float* bias, float inv_temperature,
                                   int64_t rows, int64_t vocab, float* lse, float* max_prob,
                                   int64_t* argmax, float* entropy, float* margin,
                                   cudaStream_t stream);

}  // namespace eefast::cuda
