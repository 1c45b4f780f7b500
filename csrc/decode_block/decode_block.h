// decode_block: one llama-family decoder block for a decode or verify step. Argument checks and
// the composite (ATen ops) implementation shared by the CUDA glue and the CPU's fallback.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace eefast {

// The seven linears of a block, in this order, in `weights` and `biases`.
enum DecodeBlockLinear { kQ, kK, kV, kO, kGate, kUp, kDown, kNumLinears };

struct DecodeBlockDims {
  int64_t batch, q, d, head_dim, heads, kv_heads, keys;  // keys = cache_len + q
};

// Checks every argument (naming the bad one) and returns the block's dimensions.
DecodeBlockDims check_decode_block_args(const at::Tensor& h, const at::Tensor& cos,
                                        const at::Tensor& sin, const at::Tensor& allowed,
                                        const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        int64_t cache_len, const at::Tensor& norm1,
                                        const at::Tensor& norm2,
                                        const std::vector<at::Tensor>& weights,
                                        const std::vector<std::optional<at::Tensor>>& biases,
                                        const std::vector<at::Tensor>& scales);

// y = x W^T + b: at::linear on CUDA, decode_linear's kernel on CPU (whose bf16 path avoids
// ATen's slow bf16 GEMM on AVX2 CPUs).
using LinearFn = at::Tensor (*)(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias);

// The block with ATen ops and `linear` (any device and float dtype); writes the step's keys
// and values to the caches' slots [cache_len, cache_len + q). int8 weights (with `scales`)
// are dequantised first.
at::Tensor decode_block_composite(const at::Tensor& h, const at::Tensor& cos,
                                  const at::Tensor& sin, const at::Tensor& allowed,
                                  at::Tensor& k_cache, at::Tensor& v_cache, int64_t cache_len,
                                  const at::Tensor& norm1, const at::Tensor& norm2,
                                  const std::vector<at::Tensor>& weights,
                                  const std::vector<std::optional<at::Tensor>>& biases,
                                  double eps, double scaling, const std::vector<at::Tensor>& scales,
                                  LinearFn linear);

}  // namespace eefast
