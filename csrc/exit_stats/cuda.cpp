// CUDA dispatch glue of exit_stats: checks, allocation and the current stream around the
// launch function in exit_stats/kernels.cuh. Built only against a CUDA-enabled torch.
#include "exit_stats/exit_stats.h"
#include "common/head_logits.h"

#include <ATen/ops/empty.h>
#include <ATen/core/grad_mode.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "exit_stats/kernels.cuh"

namespace eefast {
namespace {

using at::Tensor;

// From this many rows on, cuBLAS logits + a row reduction beat the fused kernel, which re-reads
// W per tile of 8 rows and uses no tensor cores (measured on an H100: see the README).
constexpr int64_t kGemmRows = 32;

// Statistics of many rows: logits a row chunk at a time with linear_cross_entropy's fp32 GEMMs
// (a bf16 W is upcast a vocab block at a time, as the fused kernel reads it), then one
// reduction block per row.
void exit_stats_by_gemm(const Tensor& h32, const Tensor& w, const Tensor& b32, float inv_t,
                        ExitStatsOutputs& out) {
  const int64_t rows = h32.size(0), vocab = w.size(0), d = w.size(1);
  const int64_t chunk = std::max<int64_t>(1, std::min(rows, chunk_elems(h32) / vocab));
  Tensor z_buf = at::empty({chunk, vocab}, h32.options());
  Tensor w_buf = at::empty({w.scalar_type() == at::kFloat ? 0 : kVocabBlock, d}, h32.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    Tensor z = z_buf.narrow(0, 0, n);
    logits_into(z, h32.narrow(0, r0, n), w, Tensor(), w_buf);
    const cudaError_t err = cuda::exit_stats_from_logits(
        z.data_ptr<float>(), b32.defined() ? b32.data_ptr<float>() : nullptr, inv_t, n, vocab,
        out.lse.data_ptr<float>() + r0, out.max_prob.data_ptr<float>() + r0,
        out.argmax.data_ptr<int64_t>() + r0, out.entropy.data_ptr<float>() + r0,
        out.margin.data_ptr<float>() + r0, stream);
    TORCH_CHECK(err == cudaSuccess, "exit_stats: CUDA error: ", cudaGetErrorString(err));
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> exit_stats_cuda(
    const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
    double temperature) {
  check_exit_stats_args(hidden, weight, bias, temperature);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::NoGradGuard no_grad;  // forward only: a head that requires grad is just read
  const int64_t vocab = weight.size(0), d = weight.size(1);
  const Tensor h32 = as_rows(hidden, d).to(at::kFloat).contiguous();
  const Tensor w = weight.contiguous();
  const Tensor b32 = bias ? bias->to(at::kFloat).contiguous() : Tensor();
  const int64_t rows = h32.size(0);
  ExitStatsOutputs out(rows, h32.options());
  const float inv_t = static_cast<float>(1.0 / temperature);
  if (rows >= kGemmRows) {
    exit_stats_by_gemm(h32, w, b32, inv_t, out);
    return out.shaped_like(hidden.sizes());
  }
  Tensor workspace =
      at::empty({cuda::exit_stats_workspace_bytes(rows, vocab)}, h32.options().dtype(at::kByte));
  const cudaError_t err = cuda::exit_stats_forward(
      h32.data_ptr<float>(), w.data_ptr(), w.scalar_type() == at::kBFloat16,
      bias ? b32.data_ptr<float>() : nullptr, inv_t, rows, d,
      vocab, workspace.data_ptr(), out.lse.data_ptr<float>(), out.max_prob.data_ptr<float>(),
      out.argmax.data_ptr<int64_t>(), out.entropy.data_ptr<float>(), out.margin.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "exit_stats: CUDA error: ", cudaGetErrorString(err));
  return out.shaped_like(hidden.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, CUDA, m) { m.impl("exit_stats", &exit_stats_cuda); }

}  // namespace eefast
