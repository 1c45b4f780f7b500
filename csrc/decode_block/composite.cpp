// decode_block's argument checks and its composite implementation (ATen ops): the CUDA kernel,
// and the CPU's for dtypes other than float32. It computes what HF's llama/mistral/qwen2
// decoder block computes (RMSNorm, rotary, grouped-query attention, SiLU-gated MLP), with the
// attention mask given as the keys each query may see.
#include "decode_block/decode_block.h"
#include "decode_linear/decode_linear.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/softmax.h>

#include <algorithm>
#include <limits>

namespace eefast {
namespace {

using at::Tensor;

const char* const kLinearNames[kNumLinears] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"};

bool is_gguf(const Tensor& w) { return w.scalar_type() == at::kByte; }

// A float [rows, cols] weight, or GGUF blocks [rows, cols / 32, block bytes].
void check_matrix(const Tensor& w, int64_t rows, int64_t cols, const char* name) {
  if (is_gguf(w)) {
    check_gguf_weight("decode_block", name, w);
    TORCH_CHECK((rows < 0 || w.size(0) == rows) && w.size(1) * cpu::kGgufGroup == cols,
                "decode_block: ", name, " must hold [", rows < 0 ? "?" : std::to_string(rows),
                ", ", cols, "] weights, got GGUF blocks ", w.sizes());
    return;
  }
  TORCH_CHECK(w.dim() == 2 && (rows < 0 || w.size(0) == rows) && w.size(1) == cols,
              "decode_block: ", name, " weight must be [", rows < 0 ? "?" : std::to_string(rows),
              ", ", cols, "], got ", w.sizes());
}

// HF's RMSNorm: float32 statistics, the normalised row cast back before the weight.
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  const Tensor x32 = x.to(at::kFloat);
  const Tensor inv = at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * (x32 * inv).to(x.scalar_type());
}

// x [B, heads, q, hd] rotated by cos/sin [B, q, hd] (rotate-half convention).
Tensor rotary(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1);
}

}  // namespace

DecodeBlockDims check_decode_block_args(const Tensor& h, const Tensor& cos, const Tensor& sin,
                                        const Tensor& allowed, const Tensor& k_cache,
                                        const Tensor& v_cache, int64_t cache_len,
                                        const Tensor& norm1, const Tensor& norm2,
                                        const std::vector<Tensor>& weights,
                                        const std::vector<std::optional<Tensor>>& biases,
                                        const std::vector<Tensor>& scales) {
  TORCH_CHECK(h.dim() == 3, "decode_block: h must be [batch, q, d], got ", h.sizes());
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), "decode_block: h must be floating point");
  TORCH_CHECK(weights.size() == kNumLinears && biases.size() == kNumLinears,
              "decode_block: weights and biases must list the 7 linears (q, k, v, o, gate, up, "
              "down), got ", weights.size(), " and ", biases.size());
  TORCH_CHECK(k_cache.dim() == 4, "decode_block: k_cache must be [batch, kv_heads, slots, "
              "head_dim], got ", k_cache.sizes());
  const int64_t batch = h.size(0), q = h.size(1), d = h.size(2);
  const int64_t head_dim = k_cache.size(3), kv_heads = k_cache.size(1);
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, "decode_block: head_dim must be even");
  TORCH_CHECK(weights[kQ].dim() >= 2 && weights[kQ].size(0) % head_dim == 0,
              "decode_block: q_proj weight must be [heads * ", head_dim, ", ", d, "], got ",
              weights[kQ].sizes());
  const int64_t heads = weights[kQ].size(0) / head_dim;
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "decode_block: ", heads,
              " query heads are not a multiple of ", kv_heads, " kv heads");
  const int64_t inner = weights[kGate].dim() >= 2 ? weights[kGate].size(0) : -1;
  check_matrix(weights[kQ], heads * head_dim, d, "q_proj");
  check_matrix(weights[kK], kv_heads * head_dim, d, "k_proj");
  check_matrix(weights[kV], kv_heads * head_dim, d, "v_proj");
  check_matrix(weights[kO], d, heads * head_dim, "o_proj");
  check_matrix(weights[kGate], inner, d, "gate_proj");
  check_matrix(weights[kUp], inner, d, "up_proj");
  check_matrix(weights[kDown], d, inner, "down_proj");
  TORCH_CHECK(scales.empty() || std::none_of(weights.begin(), weights.end(), is_gguf),
              "decode_block: GGUF block weights take no scales");
  const int64_t keys = cache_len + q;
  TORCH_CHECK(cache_len >= 0, "decode_block: cache_len must be >= 0, got ", cache_len);
  for (const Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK(c->dim() == 4 && c->size(0) == batch && c->size(1) == kv_heads &&
                    c->size(2) >= keys && c->size(3) == head_dim,
                "decode_block: k_cache and v_cache must be [", batch, ", ", kv_heads,
                ", >= ", keys, ", ", head_dim, "], got ", k_cache.sizes(), " and ",
                v_cache.sizes());
    TORCH_CHECK(c->is_contiguous(), "decode_block: the caches must be contiguous");
  }
  for (const Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == batch && t->size(1) == q &&
                    t->size(2) == head_dim,
                "decode_block: cos and sin must be [", batch, ", ", q, ", ", head_dim, "], got ",
                t->sizes());
  }
  TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.dim() == 3 &&
                  allowed.size(0) == batch && allowed.size(1) == q && allowed.size(2) == keys,
              "decode_block: allowed must be bool [", batch, ", ", q, ", ", keys, "], got ",
              allowed.scalar_type(), " ", allowed.sizes());
  TORCH_CHECK(norm1.dim() == 1 && norm1.size(0) == d && norm2.dim() == 1 && norm2.size(0) == d,
              "decode_block: norm weights must be [", d, "]");
  TORCH_CHECK(scales.empty() || scales.size() == kNumLinears,
              "decode_block: scales must be empty or list the 7 linears' scales, got ",
              scales.size());
  std::vector<const Tensor*> same_dtype = {&cos, &sin, &k_cache, &v_cache, &norm1, &norm2};
  for (int i = 0; i < kNumLinears; ++i) {
    if (is_gguf(weights[i])) {
      TORCH_CHECK(weights[i].device() == h.device(), "decode_block: every tensor must be on ",
                  h.device());
    } else if (scales.empty()) {
      same_dtype.push_back(&weights[i]);
    } else {
      TORCH_CHECK(weights[i].scalar_type() == at::kChar && scales[i].scalar_type() == at::kFloat &&
                      scales[i].dim() == 1 && scales[i].size(0) == weights[i].size(0),
                  "decode_block: with scales, ", kLinearNames[i], " must be int8 with float32 "
                  "scales [", weights[i].size(0), "], got ", weights[i].scalar_type(), " and ",
                  scales[i].scalar_type(), " ", scales[i].sizes());
      TORCH_CHECK(weights[i].device() == h.device() && scales[i].device() == h.device(),
                  "decode_block: every tensor must be on ", h.device());
    }
    if (biases[i]) {
      TORCH_CHECK(biases[i]->dim() == 1 && biases[i]->size(0) == weights[i].size(0),
                  "decode_block: ", kLinearNames[i], " bias must be [", weights[i].size(0), "]");
      same_dtype.push_back(&*biases[i]);
    }
  }
  for (const Tensor* t : same_dtype) {
    TORCH_CHECK(t->scalar_type() == h.scalar_type(), "decode_block: every weight, cache and "
                "cos/sin must be ", h.scalar_type(), " like h, got ", t->scalar_type());
  }
  same_dtype.push_back(&allowed);
  for (const Tensor* t : same_dtype) {
    TORCH_CHECK(t->device() == h.device(), "decode_block: every tensor must be on ",
                h.device(), ", got one on ", t->device());
  }
  return {batch, q, d, head_dim, heads, kv_heads, keys};
}

Tensor decode_block_composite(const Tensor& h, const Tensor& cos, const Tensor& sin,
                              const Tensor& allowed, Tensor& k_cache, Tensor& v_cache,
                              int64_t cache_len, const Tensor& norm1, const Tensor& norm2,
                              const std::vector<Tensor>& weights,
                              const std::vector<std::optional<Tensor>>& biases, double eps,
                              double scaling, const std::vector<Tensor>& scales,
                              LinearFn linear_fn) {
  const DecodeBlockDims n = check_decode_block_args(h, cos, sin, allowed, k_cache, v_cache,
                                                    cache_len, norm1, norm2, weights, biases,
                                                    scales);
  std::vector<Tensor> w = weights;
  for (size_t i = 0; i < scales.size(); ++i) w[i] = dequantize_rows(w[i], scales[i], h.scalar_type());
  auto linear = [&](const Tensor& x, int i) {
    if (!is_gguf(w[i])) return linear_fn(x, w[i], biases[i]);
    TORCH_CHECK(w[i].is_cpu(), "decode_block: GGUF block weights run on CPU only for now; on ",
                w[i].device(), " load the backbone with weights='fp32', 'bf16' or 'int8'");
    return decode_linear_gguf_cpu(x, w[i], biases[i]);
  };
  auto heads = [&](const Tensor& x) {  // [B, q, n * hd] -> [B, n, q, hd]
    return x.view({n.batch, n.q, x.size(-1) / n.head_dim, n.head_dim}).transpose(1, 2);
  };

  Tensor x = rms_norm(h, norm1, eps);
  const Tensor q = rotary(heads(linear(x, kQ)), cos, sin);
  k_cache.narrow(2, cache_len, n.q).copy_(rotary(heads(linear(x, kK)), cos, sin));
  v_cache.narrow(2, cache_len, n.q).copy_(heads(linear(x, kV)));
  const int64_t group = n.heads / n.kv_heads;
  const Tensor keys = k_cache.narrow(2, 0, n.keys).repeat_interleave(group, 1).to(at::kFloat);
  const Tensor values = v_cache.narrow(2, 0, n.keys).repeat_interleave(group, 1).to(at::kFloat);
  const Tensor hidden = ~allowed.unsqueeze(1);  // [B, 1, q, keys]
  Tensor scores = at::matmul(q.to(at::kFloat), keys.transpose(-1, -2)) * scaling;
  scores.masked_fill_(hidden, -std::numeric_limits<float>::infinity());
  // A query that sees no key (a hole's) gets zeros rather than softmax's NaN.
  const Tensor probs = at::softmax(scores, -1).masked_fill(hidden, 0.0);
  const Tensor attn = at::matmul(probs, values).to(h.scalar_type()).transpose(1, 2);
  const Tensor h_mid = h + linear(attn.reshape({n.batch, n.q, n.heads * n.head_dim}), kO);

  x = rms_norm(h_mid, norm2, eps);
  return h_mid + linear(at::silu(linear(x, kGate)) * linear(x, kUp), kDown);
}

}  // namespace eefast
