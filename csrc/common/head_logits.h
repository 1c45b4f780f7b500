// The LM-head GEMM that linear_cross_entropy and CUDA exit_stats (many rows) share: chunks of
// fp32 logits [rows, vocab], and how tall a chunk is.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace eefast {

// Vocab rows of a bf16 weight upcast to fp32 at once (the size of w_buf's first dimension).
constexpr int64_t kVocabBlock = 4096;

// [rows, vocab] fp32 logits per chunk: 32 MB on CPU, 256 MB on CUDA. Fewer, taller chunks
// matter: each chunk's weight gradient dz^T h is a GEMM of depth `rows` that rewrites the whole
// [vocab, d] accumulator, and on CUDA a short GEMM leaves most of the GPU idle.
int64_t chunk_elems(const at::Tensor& t);

// z[rows, vocab] = h W^T + bias32 (bias32 may be undefined) in fp32. h is fp32, or bf16 with a
// bf16 W (bf16 GEMMs with fp32 output); otherwise a bf16 W is upcast one vocab block at a time
// into w_buf [kVocabBlock, d] fp32.
void logits_into(at::Tensor& z, const at::Tensor& h, const at::Tensor& weight,
                 const at::Tensor& bias32, at::Tensor& w_buf);

}  // namespace eefast
