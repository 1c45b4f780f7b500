#include "common/head_logits.h"

#include "common/gemm.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

#include <algorithm>

namespace eefast {

int64_t chunk_elems(const at::Tensor& t) { return int64_t{1} << (t.is_cpu() ? 23 : 26); }

void logits_into(at::Tensor& z, const at::Tensor& h, const at::Tensor& weight,
                 const at::Tensor& bias32, at::Tensor& w_buf) {
  const int64_t vocab = weight.size(0);
  if (h.scalar_type() == at::kBFloat16) {
    at::mm_out(z, h, weight.t(), at::kFloat);
    if (bias32.defined()) z.add_(bias32);
    return;
  }
  if (weight.scalar_type() == at::kFloat) {
    gemm_plus(bias32, h, weight.t(), z);
    return;
  }
  for (int64_t v = 0; v < vocab; v += kVocabBlock) {
    const int64_t n = std::min(kVocabBlock, vocab - v);
    at::Tensor w = w_buf.narrow(0, 0, n).copy_(weight.narrow(0, v, n));
    at::Tensor zb = z.narrow(1, v, n);
    gemm_plus(bias32.defined() ? bias32.narrow(0, v, n) : at::Tensor(), h, w.t(), zb);
  }
}

}  // namespace eefast
