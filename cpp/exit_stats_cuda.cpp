// CUDA dispatch glue of exit_stats: checks, allocation and the current stream around the
// launch function in cuda/exit_stats.cuh. Built only against a CUDA-enabled torch.
#include "exit_stats.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "exit_stats.cuh"

namespace eefast {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> exit_stats_cuda(
    const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
    double temperature) {
  check_exit_stats_args(hidden, weight, bias, temperature);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t vocab = weight.size(0), d = weight.size(1);
  const Tensor h32 = hidden.reshape({-1, d}).to(at::kFloat).contiguous();
  const Tensor w = weight.contiguous();
  const Tensor b32 = bias ? bias->to(at::kFloat).contiguous() : Tensor();
  const int64_t rows = h32.size(0);
  ExitStatsOutputs out(rows, h32.options());
  Tensor workspace =
      at::empty({cuda::exit_stats_workspace_bytes(rows, vocab)}, h32.options().dtype(at::kByte));
  const cudaError_t err = cuda::exit_stats_forward(
      h32.data_ptr<float>(), w.data_ptr(), w.scalar_type() == at::kBFloat16,
      bias ? b32.data_ptr<float>() : nullptr, static_cast<float>(1.0 / temperature), rows, d,
      vocab, workspace.data_ptr(), out.lse.data_ptr<float>(), out.max_prob.data_ptr<float>(),
      out.argmax.data_ptr<int64_t>(), out.entropy.data_ptr<float>(), out.margin.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "exit_stats: CUDA error: ", cudaGetErrorString(err));
  return out.shaped_like(hidden.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, CUDA, m) { m.impl("exit_stats", &exit_stats_cuda); }

}  // namespace eefast
