// D = alpha * op(A) op(B) + beta * C through CUTLASS 2.x device GEMMs, row-major D.
// Shared by the CUDA kernels in this folder; include only from .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cutlass/bfloat16.h"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/device/gemm.h"
#include "cutlass/layout/matrix.h"

namespace eefast::cuda::gemm {

using cutlass::layout::ColumnMajor;
using cutlass::layout::RowMajor;

// Runs one CUTLASS GEMM; returns cudaErrorNotSupported if it cannot take this problem
// (alignment), so a caller can fall back to a more general kernel.
template <typename Gemm>
cudaError_t run(int m, int n, int k, float alpha, const void* a, int64_t lda, const void* b,
                int64_t ldb, float beta, const void* c, int64_t ldc, void* d, int64_t ldd,
                cudaStream_t stream) {
  using EA = typename Gemm::ElementA;
  using EB = typename Gemm::ElementB;
  using EC = typename Gemm::ElementC;
  typename Gemm::Arguments args(
      {m, n, k},
      {static_cast<const EA*>(a), typename Gemm::LayoutA(lda)},
      {static_cast<const EB*>(b), typename Gemm::LayoutB(ldb)},
      {static_cast<const EC*>(c), typename Gemm::LayoutC(ldc)},
      {static_cast<EC*>(d), typename Gemm::LayoutC(ldd)},
      {alpha, beta});
  Gemm op;
  if (op.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  if (op(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

// bf16: tensor cores with fp32 accumulation when every operand is 16-byte aligned along its
// contiguous dimension; otherwise an alignment-1 SIMT kernel (still fp32 accumulation).
struct BFloat16 {
  using Element = cutlass::bfloat16_t;
  template <typename LA, typename LB>
  using TensorOp = cutlass::gemm::device::Gemm<Element, LA, Element, LB, Element, RowMajor, float,
                                               cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80>;
  template <typename LA, typename LB>
  using Simt = cutlass::gemm::device::Gemm<Element, LA, Element, LB, Element, RowMajor, float,
                                           cutlass::arch::OpClassSimt, cutlass::arch::Sm80>;

  template <typename LA, typename LB>
  static cudaError_t gemm(int m, int n, int k, float alpha, const void* a, int64_t lda,
                          const void* b, int64_t ldb, float beta, const void* c, int64_t ldc,
                          void* d, int64_t ldd, cudaStream_t s) {
    cudaError_t err = run<TensorOp<LA, LB>>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, d, ldd, s);
    if (err != cudaErrorNotSupported) return err;
    return run<Simt<LA, LB>>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, d, ldd, s);
  }
};

}  // namespace eefast::cuda::gemm
