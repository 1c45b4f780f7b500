// lora_linear on CUDA, templated on the element family (gemm::BFloat16; fp32 runs through
// cuBLAS in the glue, see lora_linear/blas.h).
//
// Design: the frozen GEMM (x W^T, K = in_features) dominates, so it gets the full CUTLASS
// mainloop, with the bias broadcast through a zero-stride C operand. The low-rank term is a
// second GEMM of depth K = r whose epilogue has beta = 1, so it accumulates s * xa B^T straight
// into y: [tokens, out] is written once by each GEMM and no [tokens, out] temporary exists.
// The alternative, one GEMM over the concatenated K = in + r ([x | xa] [W | sB]^T), would save
// that second pass over y but needs x and W copied into concatenated buffers every call, which
// costs more than one extra read-modify-write of y when r is small. The backward is five GEMMs
// with the same trick: the low-rank input gradient s (g B) A is accumulated into grad_x by an
// epilogue with beta = 1.
#pragma once

#include "common/cutlass_gemm.cuh"
#include "lora_linear/kernels.cuh"

namespace eefast::cuda {

template <class F, class LA, class LB>
cudaError_t gemm_or_zero(int64_t m, int64_t n, int64_t k, float alpha, const void* a, int64_t lda,
                 const void* b, int64_t ldb, float beta, const void* c, int64_t ldc, void* d,
                 int64_t ldd, cudaStream_t s) {
  if (m == 0 || n == 0) return cudaSuccess;
  if (k == 0 && beta == 0.0f) {  // no products: D = 0
    const size_t elt = sizeof(typename F::Element);
    return cudaMemset2DAsync(d, ldd * elt, 0, n * elt, m, s);
  }
  return F::template gemm<LA, LB>(static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
                                  alpha, a, lda, b, ldb, beta, c, ldc, d, ldd, s);
}

#define EEFAST_RETURN_IF_ERROR(expr)        \
  do {                                      \
    const cudaError_t err_ = (expr);        \
    if (err_ != cudaSuccess) return err_;   \
  } while (0)

template <class F>
cudaError_t lora_linear_forward_impl(const void* x, const void* x_lora, const void* weight,
                                     const void* bias, const void* lora_a, const void* lora_b,
                                     float s, void* y, void* xa, LoraShape p, cudaStream_t st) {
  using gemm::ColumnMajor;
  using gemm::RowMajor;
  // A row-major [r, in] is A^T as a column-major [in, r] with ld = in; likewise W and B.
  // xa[rows, r] = x_lora A^T
  EEFAST_RETURN_IF_ERROR((gemm_or_zero<F, RowMajor, ColumnMajor>(
      p.rows, p.r, p.in, 1.f, x_lora, p.in, lora_a, p.in, 0.f, xa, p.r, xa, p.r, st)));
  // y = x W^T + bias, the bias broadcast over rows by a zero row stride
  EEFAST_RETURN_IF_ERROR((gemm_or_zero<F, RowMajor, ColumnMajor>(
      p.rows, p.out, p.in, 1.f, x, p.in, weight, p.in, bias ? 1.f : 0.f, bias ? bias : y,
      bias ? 0 : p.out, y, p.out, st)));
  // y += s * xa B^T: the epilogue (beta = 1) accumulates the low-rank term into y
  return gemm_or_zero<F, RowMajor, ColumnMajor>(p.rows, p.out, p.r, s, xa, p.r, lora_b, p.r, 1.f, y,
                                        p.out, y, p.out, st);
}

template <class F>
cudaError_t lora_linear_backward_impl(const void* g, const void* weight, const void* lora_a,
                                      const void* lora_b, const void* x_lora, const void* xa,
                                      float s, void* grad_x, void* grad_x_lora, void* grad_a,
                                      void* grad_b, void* gb, LoraShape p, cudaStream_t st) {
  using gemm::ColumnMajor;
  using gemm::RowMajor;
  // gb[rows, r] = g B
  EEFAST_RETURN_IF_ERROR((gemm_or_zero<F, RowMajor, RowMajor>(p.rows, p.r, p.out, 1.f, g, p.out, lora_b,
                                                     p.r, 0.f, gb, p.r, gb, p.r, st)));
  // grad_b[out, r] = s g^T xa   (g^T is g read column-major)
  EEFAST_RETURN_IF_ERROR((gemm_or_zero<F, ColumnMajor, RowMajor>(p.out, p.r, p.rows, s, g, p.out, xa, p.r,
                                                        0.f, grad_b, p.r, grad_b, p.r, st)));
  // grad_a[r, in] = s gb^T x_lora
  EEFAST_RETURN_IF_ERROR((gemm_or_zero<F, ColumnMajor, RowMajor>(p.r, p.in, p.rows, s, gb, p.r, x_lora,
                                                        p.in, 0.f, grad_a, p.in, grad_a, p.in, st)));
  if (grad_x == nullptr) return cudaSuccess;
  // grad_x[rows, in] = g W
  EEFAST_RETURN_IF_ERROR((gemm_or_zero<F, RowMajor, RowMajor>(p.rows, p.in, p.out, 1.f, g, p.out, weight,
                                                     p.in, 0.f, grad_x, p.in, grad_x, p.in, st)));
  if (grad_x_lora != nullptr) {  // dropout in front of the low-rank path: keep it apart
    return gemm_or_zero<F, RowMajor, RowMajor>(p.rows, p.in, p.r, s, gb, p.r, lora_a, p.in, 0.f,
                                       grad_x_lora, p.in, grad_x_lora, p.in, st);
  }
  // grad_x += s gb A, accumulated by the epilogue (beta = 1)
  return gemm_or_zero<F, RowMajor, RowMajor>(p.rows, p.in, p.r, s, gb, p.r, lora_a, p.in, 1.f, grad_x,
                                     p.in, grad_x, p.in, st);
}

}  // namespace eefast::cuda
