// decode_block on CPU: a whole decoder block of a decode or verify step in one call.
//
// At decode time a SmolLM2 block's work is seven weight-bound linears plus some forty small
// tensor ops (norms, rotary, cache writes, attention, residuals), and run from Python those
// small ops cost about as much as streaming the weights. Here they are plain loops over a few
// rows, and the linears are decode_linear's kernel.
//
// Every row is computed alone and in a fixed order: a query's attention sums over the keys it
// may see in slot order, skipping the others. So a token's output is bit-identical whether it
// is decoded alone, verified with drafts, batched with other sequences or left-padded, which
// is what keeps speculative decoding exact. float32 only; other dtypes take the composite path.
// With `scales`, the seven weights are int8 and the linears are decode_linear_q8's kernel;
// uint8 weights are GGUF blocks and take decode_linear_gguf's.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/attention.h"
#include "decode_block/decode_block.h"
#include "decode_linear/decode_linear.h"

namespace eefast {
namespace {

using at::Tensor;

// a . b in a fixed order (eight running partial sums, which the compiler can vectorise).
float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[r] = weight * x[r] / rms(x[r]) for each of `rows` rows of length d.
void rms_norm_rows(const float* x, const float* weight, float eps, int64_t rows, int64_t d,
                   float* out) {
  for (int64_t r = 0; r < rows; ++r, x += d, out += d) {
    const float inv = 1.0f / std::sqrt(dot(x, x, d) / static_cast<float>(d) + eps);
    for (int64_t j = 0; j < d; ++j) out[j] = weight[j] * (x[j] * inv);
  }
}

// Rotates each head of x [rows, heads * hd] in place by its row's cos/sin [rows, hd].
void rotary_rows(float* x, const float* cos, const float* sin, int64_t rows, int64_t heads,
                 int64_t hd) {
  const int64_t half = hd / 2;
  std::vector<float> tmp(hd);
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + r * hd;
    const float* s = sin + r * hd;
    for (int64_t n = 0; n < heads; ++n) {
      float* v = x + (r * heads + n) * hd;
      for (int64_t j = 0; j < half; ++j) tmp[j] = v[j] * c[j] - v[j + half] * s[j];
      for (int64_t j = half; j < hd; ++j) tmp[j] = v[j] * c[j] + v[j - half] * s[j];
      std::copy(tmp.begin(), tmp.end(), v);
    }
  }
}

Tensor decode_block_cpu(const Tensor& h, const Tensor& cos, const Tensor& sin,
                        const Tensor& allowed, Tensor& k_cache, Tensor& v_cache,
                        int64_t cache_len, const Tensor& norm1, const Tensor& norm2,
                        const std::vector<Tensor>& weights,
                        const std::vector<std::optional<Tensor>>& biases, double eps,
                        double scaling, const std::vector<Tensor>& scales) {
  if (h.scalar_type() != at::kFloat) {
    return decode_block_composite(h, cos, sin, allowed, k_cache, v_cache, cache_len, norm1,
                                  norm2, weights, biases, eps, scaling, scales,
                                  &decode_linear_cpu);
  }
  const DecodeBlockDims n = check_decode_block_args(h, cos, sin, allowed, k_cache, v_cache,
                                                    cache_len, norm1, norm2, weights, biases,
                                                    scales);
  const int64_t rows = n.batch * n.q, d = n.d, hd = n.head_dim;
  const int64_t slots = k_cache.size(2), group = n.heads / n.kv_heads;
  const float feps = static_cast<float>(eps), fscale = static_cast<float>(scaling);
  // Linears that read the same x run in one parallel region, straight from the kernel into
  // fresh float32 [rows, out] buffers (a decode step's linears are small: no dtype round
  // trips, checks or fork/join per linear); otherwise each takes its decode_linear op's path.
  auto linears = [&](const Tensor& x, std::initializer_list<int> which) {
    std::vector<Tensor> outs;
    std::vector<RowsLinear> jobs;
    outs.reserve(which.size());
    for (int i : which) {
      outs.push_back(at::empty({rows, weights[i].size(0)}, x.options()));
      jobs.push_back({&weights[i], scales.empty() ? nullptr : &scales[i], biases[i],
                      outs.back().data_ptr<float>()});
    }
    if (!linear_rows_into(x.data_ptr<float>(), rows, jobs)) {
      int j = 0;
      for (int i : which) {
        outs[j++] = weights[i].scalar_type() == at::kByte
                        ? decode_linear_gguf_cpu(x, weights[i], biases[i])
                    : scales.empty() ? decode_linear_cpu(x, weights[i], biases[i])
                                     : decode_linear_q8_cpu(x, weights[i], scales[i], biases[i]);
      }
    }
    return outs;
  };
  auto linear = [&](const Tensor& x, int i) { return linears(x, {i})[0]; };

  const Tensor h_in = h.reshape({rows, d}).contiguous();
  const Tensor cos_c = cos.reshape({rows, hd}).contiguous();
  const Tensor sin_c = sin.reshape({rows, hd}).contiguous();
  const Tensor allowed_c = allowed.contiguous();
  const Tensor n1 = norm1.contiguous(), n2 = norm2.contiguous();

  Tensor x = at::empty({rows, d}, h.options());
  rms_norm_rows(h_in.data_ptr<float>(), n1.data_ptr<float>(), feps, rows, d, x.data_ptr<float>());
  std::vector<Tensor> qkv = linears(x, {kQ, kK, kV});
  Tensor q = qkv[0].contiguous(), k = qkv[1].contiguous(), v = qkv[2].contiguous();
  rotary_rows(q.data_ptr<float>(), cos_c.data_ptr<float>(), sin_c.data_ptr<float>(), rows,
              n.heads, hd);
  rotary_rows(k.data_ptr<float>(), cos_c.data_ptr<float>(), sin_c.data_ptr<float>(), rows,
              n.kv_heads, hd);

  // Keys and values into their slots: cache[b, head, cache_len + t] = row (b, t), head.
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t b = 0; b < n.batch; ++b) {
    for (int64_t t = 0; t < n.q; ++t) {
      const int64_t row = b * n.q + t;
      for (int64_t g = 0; g < n.kv_heads; ++g) {
        const int64_t at_slot = ((b * n.kv_heads + g) * slots + cache_len + t) * hd;
        std::copy_n(k.data_ptr<float>() + (row * n.kv_heads + g) * hd, hd, kc + at_slot);
        std::copy_n(v.data_ptr<float>() + (row * n.kv_heads + g) * hd, hd, vc + at_slot);
      }
    }
  }

  // Attention, one (batch, head, query) task at a time.
  Tensor attn = at::empty({rows, n.heads * hd}, h.options());
  const float* qp = q.data_ptr<float>();
  const bool* mask = allowed_c.data_ptr<bool>();
  float* out = attn.data_ptr<float>();
  const int64_t tasks = rows * n.heads;
  const int64_t grain = std::max<int64_t>(1, 16384 / (n.keys * hd));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(n.keys);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t row = task / n.heads, head = task % n.heads, b = row / n.q;
      const int64_t base = (b * n.kv_heads + head / group) * slots * hd;
      cpu::attend(qp + task * hd, kc + base, vc + base, mask + row * n.keys, n.keys, hd, fscale,
                  p.data(), out + task * hd);
    }
  });

  // h + o_proj(attn), then the MLP with its residual.
  Tensor h_mid = linear(attn, kO).add_(h_in);
  rms_norm_rows(h_mid.data_ptr<float>(), n2.data_ptr<float>(), feps, rows, d,
                x.data_ptr<float>());
  std::vector<Tensor> gate_up = linears(x, {kGate, kUp});
  Tensor gate = gate_up[0].contiguous();
  const Tensor up = gate_up[1].contiguous();
  float* g = gate.data_ptr<float>();
  const float* u = up.data_ptr<float>();
  for (int64_t i = 0, e = gate.numel(); i < e; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  return linear(gate, kDown).add_(h_mid).view(h.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, CPU, m) { m.impl("decode_block", &decode_block_cpu); }

}  // namespace eefast
