// GEMMs into a given output; float32 on the CPU through oneDNN where torch exports it.
#pragma once

#include <ATen/core/Tensor.h>

namespace eefast {

// out = a b (accumulate: out += a b) for 2-D tensors of one dtype; a and b may be transposed
// views. For float32 on the CPU: oneDNN's matmul (the one torch runs for bf16 addmm) when this
// torch exports at::native::mkldnn_matmul (and out is contiguous), else at::mm_out / addmm_: on
// AMD CPUs MKL takes a generic AVX2 path, and oneDNN's AVX-512 kernels ran the LM-head GEMMs of
// linear_cross_entropy 2-2.7x faster (2 threads, an AVX-512 Zen). Where oneDNN refuses the CPU
// (torch 2.13 throws on AVX2-only ones), ATen's runs from then on. EEFAST_DISABLE_ONEDNN=1 keeps
// ATen's. Other devices and dtypes: ATen.
void gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate);

// out = c + a b, with c broadcast to out (an undefined c: out = a b), as addmm does.
void gemm_plus(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, at::Tensor& out);

}  // namespace eefast
