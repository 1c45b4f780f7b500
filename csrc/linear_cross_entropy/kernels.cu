// linear_cross_entropy's per-chunk row work on CUDA, fused: the logsumexp and the logits'
// gradient in two reads of each row and one write, where ATen's element-wise ops take six
// passes over the [rows, vocab] chunk (and a seventh to round dz to bf16).
#include <cuda_bf16.h>

#include <cfloat>

#include "linear_cross_entropy/kernels.cuh"

namespace eefast::cuda {
namespace {

constexpr int kThreads = 256;

// (m, s) <- the online-softmax merge of (m, s) and (m2, s2): s is the sum of exp(z - m).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  if (m2 == -FLT_MAX) return;
  if (m == -FLT_MAX) {
    m = m2;
    s = s2;
    return;
  }
  const float hi = fmaxf(m, m2);
  s = s * expf(m - hi) + s2 * expf(m2 - hi);
  m = hi;
}

__device__ __forceinline__ void store(float* out, int64_t i, float v) { out[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* out, int64_t i, float v) {
  out[i] = __float2bfloat16(v);
}

template <typename Out>
__global__ void __launch_bounds__(kThreads)
    lce_rows_kernel(const float* z, const int64_t* __restrict__ targets,
                    const float* __restrict__ scale, float z_loss, int64_t vocab, float* lse,
                    Out* dz) {
  __shared__ float warp_m[kThreads / 32], warp_s[kThreads / 32];
  __shared__ float row_lse;
  const int64_t r = blockIdx.x;
  const float* row = z + r * vocab;
  float m = -FLT_MAX, s = 0.f;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) merge(m, s, row[v], 1.f);
  for (int offset = 16; offset > 0; offset /= 2) {
    merge(m, s, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, s, offset));
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) merge(warp_m[0], warp_s[0], warp_m[w], warp_s[w]);
    row_lse = warp_m[0] + logf(warp_s[0]);
    lse[r] = row_lse;
  }
  if (dz == nullptr) return;
  __syncthreads();
  const float l = row_lse, sc = scale[r], coef = (1.f + 2.f * z_loss * l) * sc;
  const int64_t target = targets[r];
  Out* out = dz + r * vocab;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    store(out, v, expf(row[v] - l) * coef - (v == target ? sc : 0.f));
  }
}

}  // namespace

cudaError_t lce_rows(const float* z, const int64_t* targets, const float* scale, float z_loss,
                     int64_t rows, int64_t vocab, float* lse, void* dz, bool dz_bf16,
                     cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned>(rows);
  if (dz_bf16) {
    lce_rows_kernel<<<blocks, kThreads, 0, stream>>>(z, targets, scale, z_loss, vocab, lse,
                                                     static_cast<__nv_bfloat16*>(dz));
  } else {
    lce_rows_kernel<<<blocks, kThreads, 0, stream>>>(z, targets, scale, z_loss, vocab, lse,
                                                     static_cast<float*>(dz));
  }
  return cudaGetLastError();
}

}  // namespace eefast::cuda
