// CPU kernel of exit_stats: per row of hidden, the softmax statistics of hidden W^T + b
// (logsumexp, max prob, argmax, entropy, top-1 minus top-2 prob) without [N, vocab] logits.
//
// The vocab is cut into fixed chunks. Each (chunk, row) gets its statistics relative to the
// chunk's own max (online softmax), and the chunks are merged per row in vocab order, so the
// result has the same bits for any thread count. Threads split:
// - over vocab chunks when rows are few (decode): each thread streams its part of W once
//   (reading W once is the physical floor at decode), a bf16 chunk upcast in cache;
// - over rows when rows are many, after one multi-threaded sgemm per chunk.
// Logits come from sgemm into a [rows, chunk] buffer, then a vectorised statistics pass
// (cpu/row_kernels.h: AVX2 where the CPU has it).
// Extra memory is O(rows x chunk), never O(rows x vocab).

#include "exit_stats/exit_stats.h"
#include "cpu/row_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace eefast {
namespace {

using at::Tensor;

constexpr int64_t kFewRows = 16;      // at most this many rows: split threads over vocab
constexpr int64_t kVocabChunk = 2048;  // vocab rows per chunk
constexpr int64_t kRowBlock = 2048;    // rows per sgemm on the many-rows path

using cpu::SoftmaxStats;

// The fp32 rows [v0, v0 + n) of W: a view when W is fp32, else upcast into buf.
Tensor weight_chunk_f32(const Tensor& weight, int64_t v0, int64_t n, Tensor& buf) {
  Tensor w = weight.narrow(0, v0, n);
  if (w.scalar_type() == at::kFloat) return w;
  if (!buf.defined()) {
    buf = at::empty({kVocabChunk, weight.size(1)}, weight.options().dtype(at::kFloat));
  }
  return buf.narrow(0, 0, n).copy_(w);
}

// Statistics of logits z (rows r0.. of the input, vocab v0..) into stats[c * rows + r0 + r].
// Threads split over rows (a no-op when already inside a parallel region).
void logits_stats(Tensor& z, int64_t rows, int64_t r0, int64_t v0, int64_t c, const float* bias,
                  float inv_t, std::vector<SoftmaxStats>& stats) {
  const int64_t n = z.size(1), ld = z.stride(0);
  float* base = z.data_ptr<float>();
  at::parallel_for(0, z.size(0), 16, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      stats[c * rows + r0 + r] =
          cpu::softmax_stats(base + r * ld, n, bias ? bias + v0 : nullptr, inv_t, v0);
    }
  });
}

// Logits of rows h32[r0, r0 + z.size(0)) against vocab [v0, v0 + n) into z by sgemm, then stats.
void chunk_rows_stats(const Tensor& h32, int64_t r0, const Tensor& w, int64_t v0, Tensor& z,
                      const float* bias, float inv_t, std::vector<SoftmaxStats>& stats, int64_t c) {
  at::mm_out(z, h32.narrow(0, r0, z.size(0)), w.t());
  logits_stats(z, h32.size(0), r0, v0, c, bias, inv_t, stats);
}

// Few rows (decode): threads over vocab chunks, each streaming its part of W once.
void stats_few_rows(const Tensor& h32, const Tensor& weight, const float* bias, float inv_t,
                    std::vector<SoftmaxStats>& stats) {
  const int64_t rows = h32.size(0), vocab = weight.size(0);
  const int64_t chunks = (vocab + kVocabChunk - 1) / kVocabChunk;
  const bool direct = cpu::has_avx2_kernels();
  const bool w_bf16 = weight.scalar_type() == at::kBFloat16;
  const char* w_base = static_cast<const char*>(weight.data_ptr());
  const int64_t w_row_bytes = weight.size(1) * weight.element_size();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    Tensor logits = at::empty({rows, kVocabChunk}, h32.options());
    Tensor w_buf;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t v0 = c * kVocabChunk, n = std::min(kVocabChunk, vocab - v0);
      Tensor z = logits.narrow(1, 0, n);
      if (!direct) {
        chunk_rows_stats(h32, 0, weight_chunk_f32(weight, v0, n, w_buf), v0, z, bias, inv_t,
                         stats, c);
        continue;
      }
      // Dot products straight from W (fp32 or bf16), no packing or upcast copy.
      cpu::dot_logits_avx2(h32.data_ptr<float>(), rows, weight.size(1), w_base + v0 * w_row_bytes,
                           w_bf16, n, z.data_ptr<float>(), kVocabChunk);
      logits_stats(z, rows, 0, v0, c, bias, inv_t, stats);
    }
  });
}

// Many rows: chunk by chunk, one multi-threaded sgemm per row block, then threads over rows.
void stats_many_rows(const Tensor& h32, const Tensor& weight, const float* bias, float inv_t,
                     std::vector<SoftmaxStats>& stats) {
  const int64_t rows = h32.size(0), vocab = weight.size(0);
  const int64_t chunks = (vocab + kVocabChunk - 1) / kVocabChunk;
  Tensor logits = at::empty({std::min(rows, kRowBlock), kVocabChunk}, h32.options());
  Tensor w_buf;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t v0 = c * kVocabChunk, n = std::min(kVocabChunk, vocab - v0);
    const Tensor w = weight_chunk_f32(weight, v0, n, w_buf);
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
      Tensor z = logits.narrow(0, 0, std::min(kRowBlock, rows - r0)).narrow(1, 0, n);
      chunk_rows_stats(h32, r0, w, v0, z, bias, inv_t, stats, c);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> exit_stats_cpu(
    const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
    double temperature) {
  check_exit_stats_args(hidden, weight, bias, temperature);
  const at::NoGradGuard no_grad;  // forward only: a head that requires grad is just read
  const int64_t vocab = weight.size(0), d = weight.size(1);
  const Tensor h32 = as_rows(hidden, d).to(at::kFloat).contiguous();
  const Tensor w = weight.contiguous();
  const Tensor b32 = bias ? bias->to(at::kFloat).contiguous() : Tensor();
  const float* bias_ptr = bias ? b32.data_ptr<float>() : nullptr;
  const int64_t rows = h32.size(0);
  const int64_t chunks = (vocab + kVocabChunk - 1) / kVocabChunk;
  const float inv_t = static_cast<float>(1.0 / temperature);

  std::vector<SoftmaxStats> stats(chunks * rows);
  if (rows <= kFewRows) {
    stats_few_rows(h32, w, bias_ptr, inv_t, stats);
  } else {
    stats_many_rows(h32, w, bias_ptr, inv_t, stats);
  }

  ExitStatsOutputs out(rows, h32.options());
  float *lse_p = out.lse.data_ptr<float>(), *mp_p = out.max_prob.data_ptr<float>();
  float *ent_p = out.entropy.data_ptr<float>(), *mg_p = out.margin.data_ptr<float>();
  int64_t* arg_p = out.argmax.data_ptr<int64_t>();
  at::parallel_for(0, rows, 64, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      SoftmaxStats st = stats[r];
      for (int64_t c = 1; c < chunks; ++c) cpu::merge(st, stats[c * rows + r]);
      if (st.nan_at >= 0) {
        const float nan = std::numeric_limits<float>::quiet_NaN();
        lse_p[r] = mp_p[r] = ent_p[r] = mg_p[r] = nan;
        arg_p[r] = st.nan_at;
        continue;
      }
      if (std::isinf(st.max1)) {  // as torch: logsumexp is that infinity, the softmax NaN
        lse_p[r] = st.max1;
        mp_p[r] = ent_p[r] = mg_p[r] = std::numeric_limits<float>::quiet_NaN();
        arg_p[r] = st.arg1;
        continue;
      }
      const float log_sum = std::log(st.sum);
      lse_p[r] = st.max1 + log_sum;
      mp_p[r] = 1.f / st.sum;
      ent_p[r] = log_sum - st.ent / st.sum;
      mg_p[r] = (1.f - std::exp(st.max2 - st.max1)) / st.sum;
      arg_p[r] = st.arg1;
    }
  });
  return out.shaped_like(hidden.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, CPU, m) { m.impl("exit_stats", &exit_stats_cpu); }

}  // namespace eefast
