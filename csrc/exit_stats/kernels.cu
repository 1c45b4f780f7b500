// exit_stats on CUDA: softmax statistics of an LM head's logits without [rows, vocab] logits.
//
// Kernel 1, grid (vocab chunks, row tiles): each warp walks vocab rows of its chunk; for each it
// loads the weight row once for all rows of the tile (up to 8), reduces the dot products with
// shuffles, and lane r folds logit r into row r's online-softmax statistics. The warps' partials
// are merged in a fixed order into one partial per (chunk, row). Kernel 2 merges the chunks per
// row in vocab order and writes the outputs. Argmax ties go to the lower vocab index explicitly,
// so merge order never changes the argmax, and the fixed order makes the sums deterministic.
// Decode (few rows) is bound by reading W once, which this does. For many rows the glue
// (exit_stats/cuda.cpp) instead computes chunks of logits with cuBLAS and reduces each row
// with exit_stats_from_logits: one block per row, the same online-softmax fold and merge, in a
// fixed tree order.
#include <cfloat>
#include <cstdint>

#include "exit_stats/kernels.cuh"

namespace eefast::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 256;    // vocab rows per block
constexpr int kMaxTile = 8;    // rows per block
constexpr int64_t kNoIndex = INT64_MAX;

__device__ __forceinline__ float load_weight(const float* w, int64_t i) { return w[i]; }
__device__ __forceinline__ float load_weight(const uint16_t* w, int64_t i) {
  return __uint_as_float(static_cast<uint32_t>(w[i]) << 16);
}

__device__ __forceinline__ ExitStatsPartial empty_partial() {
  return {-FLT_MAX, -FLT_MAX, 0.f, 0.f, kNoIndex, kNoIndex};
}

// Fold one logit z (vocab index v, ascending within a lane) into s.
__device__ __forceinline__ void push_logit(ExitStatsPartial& s, float z, int64_t v) {
  if (z != z) {
    if (v < s.nan_at) s.nan_at = v;
    s.sum = z;  // NaN: the row's statistics are NaN
    return;
  }
  if (s.arg1 == kNoIndex) {
    s = {z, -FLT_MAX, 1.f, 0.f, v, s.nan_at};
  } else if (z > s.max1) {
    const float shift = s.max1 - z, scale = expf(shift);
    s.ent = (s.ent + s.sum * shift) * scale;
    s.sum = s.sum * scale + 1.f;
    s.max2 = s.max1;
    s.max1 = z;
    s.arg1 = v;
  } else {
    const float d = z - s.max1, e = expf(d);
    s.sum += e;
    s.ent += e * d;
    s.max2 = fmaxf(s.max2, z);
  }
}

// a <- a merged with b. Ties on the max go to the lower vocab index.
__device__ __forceinline__ void merge(ExitStatsPartial& a, const ExitStatsPartial& b) {
  if (b.nan_at < a.nan_at) a.nan_at = b.nan_at;
  if (b.arg1 == kNoIndex) return;
  if (a.arg1 == kNoIndex) {
    const int64_t nan_at = a.nan_at;
    a = b;
    a.nan_at = nan_at;
    return;
  }
  const bool b_wins = b.max1 > a.max1 || (b.max1 == a.max1 && b.arg1 < a.arg1);
  const ExitStatsPartial& hi = b_wins ? b : a;
  const ExitStatsPartial& lo = b_wins ? a : b;
  const float shift = lo.max1 - hi.max1, scale = expf(shift);
  const float sum = hi.sum + lo.sum * scale;
  const float ent = hi.ent + (lo.ent + lo.sum * shift) * scale;
  const float max2 = fmaxf(hi.max2, lo.max1);
  a = {hi.max1, max2, sum, ent, hi.arg1, a.nan_at};
}

template <typename W, int R>
__global__ void __launch_bounds__(kThreads)
    chunk_stats_kernel(const float* __restrict__ hidden, const W* __restrict__ weight,
                       const float* __restrict__ bias, float inv_t, int64_t rows, int64_t d,
                       int64_t vocab, ExitStatsPartial* __restrict__ partials) {
  __shared__ ExitStatsPartial warp_partials[kWarps][R];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t v_begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t v_end = v_begin + kChunk < vocab ? v_begin + kChunk : vocab;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * R;
  const int tile = rows - r0 < R ? static_cast<int>(rows - r0) : R;

  ExitStatsPartial mine = empty_partial();  // lane r < tile: row r0 + r
  for (int64_t v = v_begin + warp; v < v_end; v += kWarps) {
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    for (int64_t k = lane; k < d; k += 32) {
      const float w = load_weight(weight, v * d + k);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < tile) acc[r] = fmaf(hidden[(r0 + r) * d + k], w, acc[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      for (int offset = 16; offset > 0; offset /= 2) {
        acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], offset);
      }
      if (lane == r && r < tile) {
        const float z = (acc[r] + (bias != nullptr ? bias[v] : 0.f)) * inv_t;
        push_logit(mine, z, v);
      }
    }
  }
  if (lane < tile) warp_partials[warp][lane] = mine;
  __syncthreads();
  if (threadIdx.x < tile) {
    ExitStatsPartial s = warp_partials[0][threadIdx.x];
    for (int w = 1; w < kWarps; ++w) merge(s, warp_partials[w][threadIdx.x]);
    partials[static_cast<int64_t>(blockIdx.x) * rows + r0 + threadIdx.x] = s;
  }
}

__device__ void write_stats(const ExitStatsPartial& s, int64_t r, float* lse, float* max_prob,
                            int64_t* argmax, float* entropy, float* margin) {
  if (s.nan_at != kNoIndex) {
    lse[r] = max_prob[r] = entropy[r] = margin[r] = __int_as_float(0x7fc00000);
    argmax[r] = s.nan_at;
    return;
  }
  if (isinf(s.max1)) {  // as torch: logsumexp is that infinity, the softmax NaN
    lse[r] = s.max1;
    max_prob[r] = entropy[r] = margin[r] = __int_as_float(0x7fc00000);
    argmax[r] = s.arg1;
    return;
  }
  const float log_sum = logf(s.sum);
  lse[r] = s.max1 + log_sum;
  max_prob[r] = 1.f / s.sum;
  entropy[r] = log_sum - s.ent / s.sum;
  margin[r] = (1.f - expf(s.max2 - s.max1)) / s.sum;
  argmax[r] = s.arg1;
}

__global__ void finish_kernel(const ExitStatsPartial* __restrict__ partials, int64_t chunks,
                              int64_t rows, float* lse, float* max_prob, int64_t* argmax,
                              float* entropy, float* margin) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  ExitStatsPartial s = partials[r];
  for (int64_t c = 1; c < chunks; ++c) merge(s, partials[c * rows + r]);
  write_stats(s, r, lse, max_prob, argmax, entropy, margin);
}

// One block per row of fp32 logits: thread t folds vocab entries t, t + kThreads, ... (ascending,
// as push_logit needs), then the block merges its partials in a fixed tree order.
__global__ void __launch_bounds__(kThreads)
    logits_stats_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                        float inv_t, int64_t vocab, float* lse, float* max_prob, int64_t* argmax,
                        float* entropy, float* margin) {
  __shared__ ExitStatsPartial parts[kThreads];
  const int64_t r = blockIdx.x;
  const float* z = logits + r * vocab;
  ExitStatsPartial s = empty_partial();
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    push_logit(s, (z[v] + (bias != nullptr ? bias[v] : 0.f)) * inv_t, v);
  }
  parts[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) merge(parts[threadIdx.x], parts[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x == 0) write_stats(parts[0], r, lse, max_prob, argmax, entropy, margin);
}

template <typename W, int R>
cudaError_t launch_chunks(const float* hidden, const void* weight, const float* bias, float inv_t,
                          int64_t rows, int64_t d, int64_t vocab, ExitStatsPartial* partials,
                          cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((vocab + kChunk - 1) / kChunk),
                  static_cast<unsigned>((rows + R - 1) / R));
  chunk_stats_kernel<W, R><<<grid, kThreads, 0, stream>>>(
      hidden, static_cast<const W*>(weight), bias, inv_t, rows, d, vocab, partials);
  return cudaGetLastError();
}

template <typename W>
cudaError_t launch_chunks_for_rows(const float* hidden, const void* weight, const float* bias,
                                   float inv_t, int64_t rows, int64_t d, int64_t vocab,
                                   ExitStatsPartial* partials, cudaStream_t stream) {
  if (rows == 1) return launch_chunks<W, 1>(hidden, weight, bias, inv_t, rows, d, vocab, partials, stream);
  if (rows == 2) return launch_chunks<W, 2>(hidden, weight, bias, inv_t, rows, d, vocab, partials, stream);
  if (rows <= 4) return launch_chunks<W, 4>(hidden, weight, bias, inv_t, rows, d, vocab, partials, stream);
  return launch_chunks<W, kMaxTile>(hidden, weight, bias, inv_t, rows, d, vocab, partials, stream);
}

}  // namespace

int64_t exit_stats_workspace_bytes(int64_t rows, int64_t vocab) {
  return ((vocab + kChunk - 1) / kChunk) * rows * static_cast<int64_t>(sizeof(ExitStatsPartial));
}

cudaError_t exit_stats_forward(const float* hidden, const void* weight, bool weight_bf16,
                               const float* bias, float inv_temperature, int64_t rows, int64_t d,
                               int64_t vocab, void* workspace, float* lse, float* max_prob,
                               int64_t* argmax, float* entropy, float* margin,
                               cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  auto* partials = static_cast<ExitStatsPartial*>(workspace);
  const cudaError_t err =
      weight_bf16 ? launch_chunks_for_rows<uint16_t>(hidden, weight, bias, inv_temperature, rows,
                                                     d, vocab, partials, stream)
                  : launch_chunks_for_rows<float>(hidden, weight, bias, inv_temperature, rows, d,
                                                  vocab, partials, stream);
  if (err != cudaSuccess) return err;
  const int64_t chunks = (vocab + kChunk - 1) / kChunk;
  finish_kernel<<<static_cast<unsigned>((rows + 127) / 128), 128, 0, stream>>>(
      partials, chunks, rows, lse, max_prob, argmax, entropy, margin);
  return cudaGetLastError();
}

cudaError_t exit_stats_from_logits(const float* logits, const float* bias, float inv_temperature,
                                   int64_t rows, int64_t vocab, float* lse, float* max_prob,
                                   int64_t* argmax, float* entropy, float* margin,
                                   cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  logits_stats_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      logits, bias, inv_temperature, vocab, lse, max_prob, argmax, entropy, margin);
  return cudaGetLastError();
}

}  // namespace eefast::cuda
