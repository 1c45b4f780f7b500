// The element-wise work of bottleneck_adapter on CUDA, one pass each: the bias + activation of
// the bottleneck, the scale + up-bias + residual epilogue of the output, and the activation
// backward fused with the learned scale's reduction. ATen would take 2, 3 and 4+ kernels.
#include <cuda_bf16.h>

#include "bottleneck_adapter/kernels.cuh"

namespace eefast::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16(v);
}

constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// act(z) and act'(z).
__device__ __forceinline__ void act_fwd_bwd(Act act, float z, float& a, float& da) {
  switch (act) {
    case Act::kIdentity:
      a = z;
      da = 1.f;
      return;
    case Act::kRelu:
      a = z > 0.f ? z : 0.f;
      da = z > 0.f ? 1.f : 0.f;
      return;
    case Act::kGelu: {
      const float cdf = 0.5f * (1.f + erff(z * kSqrt1_2));
      a = z * cdf;
      da = cdf + z * kInvSqrt2Pi * expf(-0.5f * z * z);
      return;
    }
    case Act::kGeluTanh: {
      const float inner = kSqrt2OverPi * (z + 0.044715f * z * z * z);
      const float t = tanhf(inner);
      a = 0.5f * z * (1.f + t);
      da = 0.5f * (1.f + t) +
           0.5f * z * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * 0.044715f * z * z);
      return;
    }
    case Act::kSilu: {
      const float sig = 1.f / (1.f + expf(-z));
      a = z * sig;
      da = sig * (1.f + z * (1.f - sig));
      return;
    }
    case Act::kTanh:
      a = tanhf(z);
      da = 1.f - a * a;
      return;
  }
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

template <typename T>
__global__ void bias_act_kernel(const T* xd, const T* bias, float* z, T* a, int64_t n, int64_t r,
                                Act act) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float v = load(xd, i) + (bias ? load(bias, i % r) : 0.f);
    float av, unused;
    act_fwd_bwd(act, v, av, unused);
    z[i] = v;
    store(a, i, av);
  }
}

template <typename T>
__global__ void scale_residual_kernel(T* out, const T* residual, const T* bias,
                                      const float* scale, int64_t n, int64_t features) {
  const float s = *scale;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float y = load(out, i) + (bias ? load(bias, i % features) : 0.f);
    store(out, i, load(residual, i) + s * y);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    act_backward_kernel(const T* gu, const float* z, const float* scale, T* a, T* gz,
                        float* scale_grad, int64_t n, Act act) {
  const float s = *scale;
  float partial = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float av, da;
    act_fwd_bwd(act, z[i], av, da);
    const float g = load(gu, i);
    store(a, i, av);
    store(gz, i, s * g * da);
    partial += g * av;
  }
  if (scale_grad == nullptr) return;
  __shared__ float warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    partial += __shfl_xor_sync(0xffffffffu, partial, offset);
  }
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = partial;
  __syncthreads();
  if (threadIdx.x == 0) {
    float block_sum = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) block_sum += warp_sums[w];
    atomicAdd(scale_grad, block_sum);
  }
}

}  // namespace

cudaError_t adapter_bias_act(DType dtype, const void* xd, const void* bias, float* z, void* a,
                             int64_t rows, int64_t r, Act act, cudaStream_t stream) {
  const int64_t n = rows * r;
  if (n == 0) return cudaSuccess;
  if (dtype == DType::kBFloat16) {
    using T = __nv_bfloat16;
    bias_act_kernel<<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const T*>(xd), static_cast<const T*>(bias), z, static_cast<T*>(a), n, r, act);
  } else {
    bias_act_kernel<<<grid_for(n), kThreads, 0, stream>>>(static_cast<const float*>(xd),
                                                          static_cast<const float*>(bias), z,
                                                          static_cast<float*>(a), n, r, act);
  }
  return cudaGetLastError();
}

cudaError_t adapter_scale_residual(DType dtype, void* out, const void* residual,
                                   const void* bias, const float* scale, int64_t rows,
                                   int64_t features, cudaStream_t stream) {
  const int64_t n = rows * features;
  if (n == 0) return cudaSuccess;
  if (dtype == DType::kBFloat16) {
    using T = __nv_bfloat16;
    scale_residual_kernel<<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<T*>(out), static_cast<const T*>(residual), static_cast<const T*>(bias),
        scale, n, features);
  } else {
    scale_residual_kernel<<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<float*>(out), static_cast<const float*>(residual),
        static_cast<const float*>(bias), scale, n, features);
  }
  return cudaGetLastError();
}

cudaError_t adapter_act_backward(DType dtype, const void* gu, const float* z, const float* scale,
                                 void* a, void* gz, float* scale_grad, int64_t rows, int64_t r,
                                 Act act, cudaStream_t stream) {
  const int64_t n = rows * r;
  if (n == 0) return cudaSuccess;
  if (dtype == DType::kBFloat16) {
    using T = __nv_bfloat16;
    act_backward_kernel<<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const T*>(gu), z, scale, static_cast<T*>(a), static_cast<T*>(gz),
        scale_grad, n, act);
  } else {
    act_backward_kernel<<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const float*>(gu), z, scale, static_cast<float*>(a),
        static_cast<float*>(gz), scale_grad, n, act);
  }
  return cudaGetLastError();
}

}  // namespace eefast::cuda
