// linear_cross_entropy: LM head + cross-entropy (+ z-loss, + distillation to a teacher head)
// without [tokens, vocab] logits. Written in device-generic ATen ops and registered for
// CompositeExplicitAutograd, so the same chunked algorithm runs on CPU and on CUDA (cuBLAS);
// each chunk's row work goes through a fused row pass on either device. Float32 GEMMs on the CPU
// go through common/gemm.h (oneDNN where torch exports it).
//
// The general path processes rows in chunks sized so that one chunk's [rows, vocab] fp32 logits
// stay a few MB; every chunk computes its logits, the loss, and for mean/sum the gradient of the
// logits right away (softmax - onehot, ...), which turns into the hidden gradient (dz W) and
// accumulates the weight gradient (dz^T h). That is 3 GEMMs per chunk and no second pass. Extra
// memory is O(chunk x vocab), independent of the number of tokens. Chunks run in order, so the
// weight-gradient accumulation is deterministic. On CPU, bf16 weights are upcast a vocab block at
// a time (ATen's bf16 GEMMs are slow on AVX2 CPUs). On CUDA, chunks are 8x taller so cuBLAS gets
// GEMMs that fill the GPU, and a bf16 hidden with a bf16 head runs bf16 GEMMs with fp32 output
// (mm.dtype): the logits, softmax and loss stay fp32, dz is rounded to bf16 for the two
// backward GEMMs, as bf16 autograd would do.
// The plain loss (+ z-loss, no teacher) has two faster CPU paths: a head without gradient runs
// the vocabulary in blocks with an online softmax (frozen_head_rows), and a float32 trainable
// head runs its chunks vocab-major (trainable_head_chunk).
// Without a teacher, the per-row logsumexp and softmax-gradient passes go through the
// vectorised row kernels of cpu/row_kernels.h on CPU and linear_cross_entropy/kernels.cu on CUDA: two reads
// and one write of each chunk instead of ATen's six element-wise passes and a temporary.

#include "cpu/row_kernels.h"
#include "common/gemm.h"
#include "common/head_logits.h"
#include "linear_cross_entropy/linear_cross_entropy.h"

#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace eefast {
namespace {

using at::Tensor;

#ifdef EEFAST_WITH_CUDA
constexpr bool kCudaRowPass = true;
#else
constexpr bool kCudaRowPass = false;
// Never called: cuda_rows is false without CUDA.
void lce_rows_cuda(const Tensor&, const Tensor&, const Tensor&, double, Tensor&, const Tensor&) {}
#endif

// bf16 x bf16 GEMMs with fp32 output: CUDA only, where cuBLAS runs them on tensor cores.
bool bf16_gemms(const Tensor& hidden, const Tensor& weight) {
  return hidden.is_cuda() && hidden.scalar_type() == at::kBFloat16 &&
         weight.scalar_type() == at::kBFloat16;
}

// The loss beyond the plain cross-entropy: z-loss, distillation, label smoothing, a logit
// softcap and per-class weights (the last three as torch's cross_entropy and Gemma-2 define
// them).
struct LossTerms {
  int64_t ignore_index;
  double z_loss, kd_weight, label_smoothing, softcap;
  std::optional<Tensor> class_weight;  // [vocab]
  bool plain() const { return label_smoothing == 0 && softcap == 0 && !class_weight; }
};

void check_args(const char* op, const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                const std::optional<Tensor>& bias, const std::optional<Tensor>& teacher_hidden,
                const std::optional<Tensor>& teacher_weight, const LossTerms& terms) {
  const double z_loss = terms.z_loss, kd_weight = terms.kd_weight;
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be [tokens, d], got shape ", hidden.sizes());
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), op, ": hidden must be floating point");
  const auto wdt = weight.scalar_type();
  TORCH_CHECK(wdt == at::kFloat || wdt == at::kBFloat16, op,
              ": weight must be float32 or bfloat16, got ", wdt);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) > 0, op,
              ": weight must be [vocab, d] with vocab > 0, got shape ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), op, ": hidden has d=", hidden.size(1),
              " but weight is [vocab, d=", weight.size(1), "]");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), op,
              ": targets must be [tokens=", hidden.size(0), "], got shape ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ",
              targets.scalar_type());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [vocab=",
                weight.size(0), "], got shape ", bias->sizes());
  }
  TORCH_CHECK(teacher_hidden.has_value() == teacher_weight.has_value(), op,
              ": teacher_hidden and teacher_weight come together");
  if (teacher_hidden) {
    TORCH_CHECK(teacher_weight->dim() == 2 && teacher_weight->size(0) == weight.size(0), op,
                ": teacher_weight must have the student's vocab=", weight.size(0), ", got shape ",
                teacher_weight->sizes());
    TORCH_CHECK(teacher_hidden->dim() == 2 && teacher_hidden->size(0) == hidden.size(0) &&
                    teacher_hidden->size(1) == teacher_weight->size(1),
                op, ": teacher_hidden must be [tokens=", hidden.size(0), ", teacher d=",
                teacher_weight->size(1), "], got shape ", teacher_hidden->sizes());
  }
  TORCH_CHECK(std::isfinite(z_loss) && z_loss >= 0 && std::isfinite(kd_weight) && kd_weight >= 0,
              op, ": z_loss and kd_weight must be finite and >= 0, got ", z_loss, " and ",
              kd_weight);
  TORCH_CHECK(kd_weight == 0 || teacher_hidden.has_value(), op,
              ": kd_weight > 0 needs a teacher (teacher_hidden and teacher_weight)");
  TORCH_CHECK(terms.label_smoothing >= 0 && terms.label_smoothing <= 1, op,
              ": label_smoothing must be in [0, 1], got ", terms.label_smoothing);
  TORCH_CHECK(std::isfinite(terms.softcap) && terms.softcap >= 0, op,
              ": softcap must be finite and >= 0 (0: none), got ", terms.softcap);
  if (terms.class_weight) {
    const Tensor& cw = *terms.class_weight;
    TORCH_CHECK(cw.dim() == 1 && cw.size(0) == weight.size(0) && at::isFloatingType(cw.scalar_type()),
                op, ": class_weight must be a float [vocab=", weight.size(0), "], got ",
                cw.scalar_type(), " ", cw.sizes());
  }
  for (const auto& t : {std::optional<Tensor>(weight), std::optional<Tensor>(targets), bias,
                        teacher_hidden, teacher_weight, terms.class_weight}) {
    TORCH_CHECK(!t || t->device() == hidden.device(), op,
                ": all inputs must be on hidden's device (", hidden.device(), "), got ",
                t->device());
  }
}

// grad_h[rows, d] = dz W in fp32: dz is fp32, or bf16 for bf16_gemms; otherwise a bf16 W is
// upcast one vocab block at a time.
void grad_hidden_into(Tensor& grad_h, const Tensor& dz, const Tensor& weight, Tensor& w_buf) {
  if (dz.scalar_type() == at::kBFloat16) {
    at::mm_out(grad_h, dz, weight, at::kFloat);
    return;
  }
  if (weight.scalar_type() == at::kFloat) {
    gemm(dz, weight, grad_h, /*accumulate=*/false);
    return;
  }
  grad_h.zero_();
  for (int64_t v = 0; v < weight.size(0); v += kVocabBlock) {
    const int64_t n = std::min(kVocabBlock, weight.size(0) - v);
    Tensor w = w_buf.narrow(0, 0, n).copy_(weight.narrow(0, v, n));
    gemm(dz.narrow(1, v, n), w, grad_h, /*accumulate=*/true);
  }
}

// [rows, 1] logsumexp of each row of contiguous fp32 z, by the vectorised row kernel.
Tensor row_logsumexp(const Tensor& z) {
  const int64_t rows = z.size(0), n = z.size(1);
  Tensor lse = at::empty({rows, 1}, z.options());
  float* zp = z.data_ptr<float>();
  float* out = lse.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const cpu::SoftmaxStats st = cpu::softmax_stats(zp + r * n, n, nullptr, 1.f, 0);
      out[r] = st.nan_at >= 0 ? std::numeric_limits<float>::quiet_NaN()
                              : st.max1 + std::log(st.sum);
    }
  });
  return lse;
}

// Row r of z becomes coef[r] * softmax(z[r]), given its logsumexp.
void rows_scaled_softmax(Tensor& z, const Tensor& lse, const Tensor& coef) {
  const int64_t n = z.size(1);
  float* zp = z.data_ptr<float>();
  const Tensor c = coef.contiguous();
  const float *lp = lse.data_ptr<float>(), *cp = c.data_ptr<float>();
  at::parallel_for(0, z.size(0), 1, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) cpu::scaled_softmax(zp + r * n, n, lp[r], cp[r]);
  });
}

struct Results {
  Tensor loss_rows, lse_rows, grad_hidden, grad_weight, grad_bias;
};

// Rows r0.. of the plain loss, lse - z_target (+ z_loss lse^2), and of lse, 0 where ignored.
void store_plain_loss(Results& res, int64_t r0, const Tensor& lse, const Tensor& z_target,
                      const Tensor& ok, double z_loss) {
  Tensor loss = lse - z_target;
  if (z_loss > 0) loss = loss + z_loss * lse.square();
  const int64_t n = lse.size(0);
  res.loss_rows.narrow(0, r0, n).copy_(at::where(ok.to(at::kBool), loss, at::zeros_like(loss)));
  res.lse_rows.narrow(0, r0, n).copy_(lse * ok);
}

// Rows per group of the frozen-head path.
constexpr int64_t kFrozenHeadRows = 8192;

// Vocab columns per block of the frozen-head path: its [rows, block] fp32 logits are 8 MB, at
// least 256 columns (a multiple of 16).
int64_t vocab_block_cols(int64_t rows, int64_t vocab) {
  const int64_t cols = std::max<int64_t>(256, (int64_t{1} << 21) / std::max<int64_t>(rows, 1));
  return cols >= vocab ? vocab : cols / 16 * 16;
}

// The plain loss (+ z-loss) of a head that gets no gradient, on the CPU: the vocabulary in blocks
// of columns over a group of rows at once, with an online softmax, as attention is computed
// without its score matrix. The hidden gradient needs only softmax(z) W - W[target], so
// sum_v exp(z_v - m) W_v is accumulated block by block (rescaled when a row's running max m
// grows) and divided by the row's sum of exponentials at the end. That is the row path's two
// GEMMs, but each is [rows x d] by [d x block] with the block's logits still in cache, instead of
// a short chunk of rows against all of W: at 2048 x 576 -> 49152 the whole op took 0.61 s against
// the row path's 0.73 s (oneDNN; with MKL 1.13 s against 1.42 s for the GEMMs alone), with 26 MB
// of extra memory against 37. Row groups bound the extra memory when there are many rows.
void frozen_head_rows(const Tensor& h32, const Tensor& w, const Tensor& bias32,
                      const Tensor& safe_targets, const Tensor& ok, double z_loss,
                      const Tensor& scale, int64_t r0, Results& res) {
  const int64_t rows = h32.size(0), vocab = w.size(0), d = w.size(1);
  const bool grads = scale.defined();
  const auto f32 = h32.options().dtype(at::kFloat);
  const int64_t cols = vocab_block_cols(rows, vocab);
  Tensor z_buf = at::empty({rows * cols}, f32);
  Tensor w_buf = at::empty({w.scalar_type() == at::kFloat ? 0 : cols, d}, f32);
  Tensor acc = grads ? at::zeros({rows, d}, f32) : Tensor();  // sum_v exp(z_v - m) W_v
  std::vector<float> run_max(rows, -std::numeric_limits<float>::infinity()), run_sum(rows, 0.f),
      z_target(rows, 0.f);
  std::vector<char> has_nan(rows, 0);
  const int64_t* tp = safe_targets.data_ptr<int64_t>();
  for (int64_t v0 = 0; v0 < vocab; v0 += cols) {
    const int64_t n = std::min(cols, vocab - v0);
    Tensor z = z_buf.narrow(0, 0, rows * n).view({rows, n});
    Tensor wc = w.narrow(0, v0, n);
    if (wc.scalar_type() != at::kFloat) wc = w_buf.narrow(0, 0, n).copy_(wc);
    gemm_plus(bias32.defined() ? bias32.narrow(0, v0, n) : Tensor(), h32, wc.t(), z);
    float* zp = z.data_ptr<float>();
    float* ap = grads ? acc.data_ptr<float>() : nullptr;
    at::parallel_for(0, rows, 1, [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) {
        float* zr = zp + r * n;
        const int64_t t = tp[r] - v0;
        if (t >= 0 && t < n) z_target[r] = zr[t];
        const cpu::SoftmaxStats st = cpu::softmax_stats(zr, n, nullptr, 1.f, 0);
        if (st.nan_at >= 0) has_nan[r] = 1;
        const float m = std::max(run_max[r], st.max1);
        const float grow = std::exp(run_max[r] - m);  // 0 for the first block, else <= 1
        run_sum[r] = run_sum[r] * grow + st.sum * std::exp(st.max1 - m);
        if (grads && grow != 1.f) {
          for (int64_t j = 0; j < d; ++j) ap[r * d + j] *= grow;
        }
        run_max[r] = m;
        if (grads) cpu::scaled_softmax(zr, n, m, 1.f);  // exp(z - m)
      }
    });
    if (grads) gemm(z, wc, acc, /*accumulate=*/true);
  }
  const Tensor lse = at::empty({rows}, f32);
  float* lp = lse.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    lp[r] = has_nan[r] ? std::numeric_limits<float>::quiet_NaN()
                       : run_max[r] + std::log(run_sum[r]);
  }
  store_plain_loss(res, r0, lse, at::from_blob(z_target.data(), {rows}, f32), ok, z_loss);
  if (!grads) return;
  // dh = scale [(1 + 2 z_loss lse) softmax(z) W - W[target]]
  const Tensor sums = at::from_blob(run_sum.data(), {rows}, f32);
  const Tensor coef = (scale * (1.0 + 2.0 * z_loss * lse) / sums).unsqueeze(1);
  Tensor gh = res.grad_hidden.narrow(0, r0, rows);
  at::mul_out(gh, acc, coef);
  gh.sub_(w.index_select(0, safe_targets).to(at::kFloat) * scale.unsqueeze(1));
}

// Rows per chunk of trainable_head_chunk: 8 MB of logits, a multiple of 16 rows, and at least
// 48 rows. The chunk is the only extra memory besides the [vocab, d] gradient. At SmolLM2's
// head (2048 tokens, fp32, 2 threads; time / peak extra memory) 16 rows took 2.11 s / 116 MiB,
// 32 rows 1.41 s / 119, 48 rows 1.16-1.48 s / 122, 64 rows 1.09 s / 125, 160 rows 0.97-1.05 s /
// 143: 48 rows keep the op within a quarter of Cut Cross-Entropy's 497 MiB at about 1.7x its
// speed.
int64_t trainable_chunk_rows(int64_t vocab) {
  return std::max<int64_t>(48, (int64_t{1} << 21) / vocab / 16 * 16);
}

// One chunk of rows of the plain loss (+ z-loss) of a trainable head, on the CPU, vocab-major:
// zt[vocab, rows] = W h^T (+ bias), a softmax down its columns, then the row path's other two
// GEMMs from zt (grad_h = zt^T W, grad_W += zt h). With W as the GEMM's tall operand and a
// chunk of a multiple of 16 rows, this ran about 10% faster than the row-major chunks at
// 2048 x 576 -> 49152 on this 2-core VM: 1.02 s against 1.13 s for the whole op with oneDNN,
// 1.85 s against 2.08 s for the GEMMs alone with MKL. One exponential per logit: col_exp leaves
// exp(z - the part's max) in place and a multiply per part makes it coef * softmax.
void trainable_head_chunk(const Tensor& h, const Tensor& w, const Tensor& bias32,
                          const Tensor& safe_targets, const Tensor& ok, const Tensor& scale,
                          double z_loss, int64_t r0, Tensor& zt_buf, Results& res) {
  const int64_t n = h.size(0), vocab = w.size(0);
  const auto f32 = h.options().dtype(at::kFloat);
  Tensor zt = zt_buf.narrow(0, 0, vocab * n).view({vocab, n});
  gemm_plus(bias32.defined() ? bias32.unsqueeze(1) : Tensor(), w, h.t(), zt);
  float* zp = zt.data_ptr<float>();
  const Tensor z_target = at::empty({n}, f32);
  float* ztp = z_target.data_ptr<float>();
  const int64_t* tp = safe_targets.data_ptr<int64_t>();
  for (int64_t c = 0; c < n; ++c) ztp[c] = zp[tp[c] * n + c];
  // exp(z - the part's column max) over parts of the vocabulary in parallel; each part is then
  // scaled to coef * softmax with a multiply (one exponential per logit).
  const int64_t parts = std::min<int64_t>(vocab, 4 * at::get_num_threads());
  const auto part_begin = [&](int64_t p) { return vocab * p / parts; };
  Tensor part_max = at::empty({parts, n}, f32), part_sum = at::empty({parts, n}, f32);
  float *pm = part_max.data_ptr<float>(), *ps = part_sum.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t a, int64_t b) {
    for (int64_t p = a; p < b; ++p) {
      const int64_t v0 = part_begin(p);
      cpu::col_exp(zp + v0 * n, part_begin(p + 1) - v0, n, pm + p * n, ps + p * n);
    }
  });
  const Tensor m = std::get<0>(part_max.max(0));
  part_max.sub_(m);  // NaN-free: a NaN column's sum is NaN, and its lse with it
  const Tensor lse = m + part_sum.mul(part_max.exp()).sum(0).log();
  store_plain_loss(res, r0, lse, z_target, ok, z_loss);
  // dz^T = coef softmax - scale onehot, coef = scale (1 + 2 z_loss lse): part p's exponentials
  // times coef exp(its max - lse).
  const Tensor factor = (part_max - (lse - m)).exp_().mul_(scale * (1.0 + 2.0 * z_loss * lse));
  at::parallel_for(0, parts, 1, [&](int64_t a, int64_t b) {
    for (int64_t p = a; p < b; ++p) {
      const int64_t v0 = part_begin(p);
      zt.narrow(0, v0, part_begin(p + 1) - v0).mul_(factor[p]);
    }
  });
  const float* sp = scale.data_ptr<float>();
  for (int64_t c = 0; c < n; ++c) zp[tp[c] * n + c] -= sp[c];
  if (bias32.defined()) res.grad_bias.add_(zt.sum(1));
  Tensor gh = res.grad_hidden.narrow(0, r0, n);
  gemm(zt.t(), w, gh, /*accumulate=*/false);
  gemm(zt, h, res.grad_weight, /*accumulate=*/true);
}

// Per-row losses, and when row_scale is given the gradients of sum_i row_scale[i] * loss_i.
// The weight/bias gradients are added into grad_weight/grad_bias (fp32 [vocab, d] / [vocab])
// when those are defined, so several exits can share one buffer.
Results lce_core(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                 const std::optional<Tensor>& bias, const std::optional<Tensor>& teacher_hidden,
                 const std::optional<Tensor>& teacher_weight, const LossTerms& terms,
                 const std::optional<Tensor>& row_scale, bool weight_grad,
                 Tensor grad_weight = Tensor(), Tensor grad_bias = Tensor()) {
  const int64_t ignore_index = terms.ignore_index;
  const double z_loss = terms.z_loss, kd_weight = terms.kd_weight;
  const double eps = terms.label_smoothing, cap = terms.softcap;
  const int64_t rows = hidden.size(0), vocab = weight.size(0), d = weight.size(1);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const bool lowp = bf16_gemms(hidden, weight);
  const Tensor valid = targets.ne(ignore_index);
  // Ignored rows contribute nothing, not even a NaN or inf they hold: they enter as zeros.
  const bool any_ignored = !valid.all().item<bool>();
  const auto zero_ignored = [&](const Tensor& t) {
    return any_ignored ? t.masked_fill(valid.logical_not().unsqueeze(1), 0) : t;
  };
  const Tensor h32 =
      zero_ignored(lowp ? hidden.contiguous() : hidden.to(at::kFloat).contiguous());
  const Tensor w = weight.contiguous();
  const Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : Tensor();
  const bool teach = teacher_hidden.has_value() && kd_weight > 0;
  const bool teach_lowp = teach && bf16_gemms(*teacher_hidden, *teacher_weight);
  const Tensor th32 = !teach        ? Tensor()
                      : teach_lowp ? zero_ignored(teacher_hidden->contiguous())
                                   : zero_ignored(teacher_hidden->to(at::kFloat).contiguous());
  const Tensor tw = teach ? teacher_weight->contiguous() : Tensor();

  const Tensor in_range = targets.ge(0).logical_and(targets.lt(vocab));
  TORCH_CHECK(in_range.logical_or(valid.logical_not()).all().item<bool>(),
              "linear_cross_entropy: targets must be in [0, vocab=", vocab, ") or ignore_index=",
              ignore_index);
  const Tensor safe_targets = targets.masked_fill(valid.logical_not(), 0);
  const Tensor cw = terms.class_weight ? terms.class_weight->to(at::kFloat).contiguous() : Tensor();
  const Tensor row_w = cw.defined() ? cw.index_select(0, safe_targets) : Tensor();  // w_target
  const double wsum = cw.defined() ? cw.sum().item<double>() : static_cast<double>(vocab);

  const bool grads = row_scale.has_value();
  Results res;
  res.loss_rows = at::empty({rows}, f32);
  res.lse_rows = at::empty({rows}, f32);
  res.grad_hidden = at::empty({grads ? rows : 0, d}, f32);
  res.grad_weight =
      grad_weight.defined() ? grad_weight : at::zeros({grads && weight_grad ? vocab : 0, d}, f32);
  res.grad_bias =
      grad_bias.defined() ? grad_bias : at::zeros({grads && weight_grad && bias ? vocab : 0}, f32);

  // The plain loss on the CPU: a frozen head in vocab blocks, a float32 trainable one in
  // vocab-major chunks (above); the rest takes the row chunks below.
  const bool frozen = !(grads && weight_grad);
  if (hidden.is_cpu() && !teach && terms.plain() && (frozen || w.scalar_type() == at::kFloat)) {
    const Tensor ok = valid.to(at::kFloat);
    const int64_t chunk = frozen ? kFrozenHeadRows : std::min(rows, trainable_chunk_rows(vocab));
    Tensor zt_buf = frozen ? Tensor() : at::empty({chunk * vocab}, f32);
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const int64_t n = std::min(chunk, rows - r0);
      const Tensor ok_n = ok.narrow(0, r0, n), tgt_n = safe_targets.narrow(0, r0, n).contiguous();
      const Tensor scale = grads ? (ok_n * row_scale->narrow(0, r0, n)).contiguous() : Tensor();
      if (frozen) {
        frozen_head_rows(h32.narrow(0, r0, n), w, bias32, tgt_n, ok_n, z_loss, scale, r0, res);
      } else {
        trainable_head_chunk(h32.narrow(0, r0, n), w, bias32, tgt_n, ok_n, scale, z_loss, r0,
                             zt_buf, res);
      }
    }
    return res;
  }
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(rows, chunk_elems(hidden) / vocab));
  Tensor z_buf = at::empty({chunk, vocab}, f32);
  Tensor dz_lowp = lowp && grads ? at::empty({chunk, vocab}, hidden.options()) : Tensor();
  Tensor zt_buf = teach ? at::empty({chunk, vocab}, f32) : Tensor();
  Tensor w_buf = at::empty({w.scalar_type() == at::kFloat ? 0 : kVocabBlock, d}, f32);
  Tensor tw_buf = teach ? at::empty({tw.scalar_type() == at::kFloat ? 0 : kVocabBlock,
                                     tw.size(1)}, f32)
                        : Tensor();
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    Tensor z = z_buf.narrow(0, 0, n);
    const Tensor h = h32.narrow(0, r0, n);
    logits_into(z, h, w, bias32, w_buf);
    Tensor cap_grad;  // d capped / d logit = 1 - tanh^2
    if (cap > 0) {  // Gemma-2's softcap: cap * tanh(z / cap)
      z.div_(cap).tanh_();
      if (grads) cap_grad = 1.0 - z.square();
      z.mul_(cap);
    }
    const Tensor tgt = safe_targets.narrow(0, r0, n).unsqueeze(1);
    const Tensor ok = valid.narrow(0, r0, n).to(at::kFloat);
    const Tensor z_target = z.gather(1, tgt).squeeze(1);  // before dz may overwrite z
    const Tensor wt = row_w.defined() ? row_w.narrow(0, r0, n) : Tensor();
    Tensor z_smooth;  // sum_j w_j z_j, the label-smoothing term, also before dz overwrites z
    if (eps > 0) z_smooth = cw.defined() ? at::mv(z, cw) : z.sum(1);
    const bool fused_rows = !teach && terms.plain();
    const bool cpu_rows = z.is_cpu() && fused_rows;  // fused row passes (cpu/row_kernels.h)
    const bool cuda_rows = kCudaRowPass && z.is_cuda() && fused_rows;  // (kernels.cu)
    // dz = scale * [(1 + 2 z_loss lse) p - onehot + kd_weight (p - p_t)], p = softmax(z)
    const Tensor scale = grads ? (ok * row_scale->narrow(0, r0, n)).unsqueeze(1) : Tensor();
    Tensor dz = grads && lowp ? dz_lowp.narrow(0, 0, n) : z;  // fp32 dz: in place over z
    Tensor lse;
    if (cuda_rows) {
      lse = at::empty({n, 1}, f32);
      lce_rows_cuda(z, tgt.squeeze(1), grads ? scale.squeeze(1) : Tensor(), z_loss, lse,
                    grads ? dz : Tensor());
    } else {
      lse = cpu_rows ? row_logsumexp(z) : z.logsumexp({1}, /*keepdim=*/true);
    }
    // torch's cross_entropy with weight w and label smoothing e:
    // (1 - e) w_t (lse - z_t) + (e / V) sum_j w_j (lse - z_j)
    Tensor loss = lse.squeeze(1) - z_target;
    if (wt.defined()) loss = loss * wt;
    if (eps > 0) loss = loss * (1.0 - eps) + (eps / vocab) * (wsum * lse.squeeze(1) - z_smooth);
    res.lse_rows.narrow(0, r0, n).copy_(lse.squeeze(1) * ok);  // 0 where ignored
    if (z_loss > 0) loss = loss + z_loss * lse.squeeze(1).square();
    Tensor log_pt;
    if (teach) {
      Tensor zt = zt_buf.narrow(0, 0, n);
      logits_into(zt, th32.narrow(0, r0, n), tw, Tensor(), tw_buf);
      log_pt = zt.log_softmax(1);
      // KL(teacher || student) = sum p_t (log p_t - log p_s), log p_s = z - lse
      loss = loss + kd_weight * (log_pt.exp() * (log_pt - (z - lse))).sum(1);
    }
    res.loss_rows.narrow(0, r0, n).copy_(at::where(ok.to(at::kBool), loss, at::zeros_like(loss)));
    if (!grads) continue;

    if (cpu_rows) {
      rows_scaled_softmax(z, lse, (1.0 + 2.0 * z_loss * lse) * scale);
      z.scatter_add_(1, tgt, -scale);
    } else if (!cuda_rows) {
      // dz = p (a + e W / V + 2 z_loss lse + kd) - a onehot - (e / V) w - kd p_t, a = (1-e) w_t
      const Tensor a = wt.defined() ? wt.unsqueeze(1) * (1.0 - eps) : at::full({n, 1}, 1.0 - eps, f32);
      z.sub_(lse).exp_().mul_(a + (eps / vocab * wsum + kd_weight) + 2.0 * z_loss * lse);
      if (teach) z.sub_(log_pt.exp_().mul_(kd_weight));
      z.scatter_add_(1, tgt, -a);
      if (eps > 0) {
        if (cw.defined()) {
          z.sub_(cw.unsqueeze(0) * (eps / vocab));
        } else {
          z.sub_(eps / vocab);
        }
      }
      if (cap_grad.defined()) z.mul_(cap_grad);
      z.mul_(scale);
    }
    if (lowp && !cuda_rows) dz.copy_(z);
    if (bias && weight_grad) res.grad_bias.add_(dz.sum(0, /*keepdim=*/false, at::kFloat));
    Tensor gh = res.grad_hidden.narrow(0, r0, n);
    grad_hidden_into(gh, dz, w, w_buf);
    if (weight_grad) {
      if (lowp) {
        at::addmm_out(res.grad_weight, res.grad_weight, dz.t(), h, at::kFloat);
      } else {
        gemm(dz.t(), h, res.grad_weight, /*accumulate=*/true);
      }
    }
  }
  return res;
}

// What the mean divides by: the non-ignored rows (their targets' class weights, as torch's
// weighted mean), at least 1 (no valid row gives 0, not NaN).
double mean_divisor(const Tensor& targets, const LossTerms& terms) {
  const Tensor valid = targets.ne(terms.ignore_index);
  if (!terms.class_weight) {
    return static_cast<double>(std::max<int64_t>(1, valid.sum().item<int64_t>()));
  }
  const Tensor safe = targets.masked_fill(valid.logical_not(), 0);
  const double total =
      (terms.class_weight->to(at::kFloat).index_select(0, safe) * valid).sum().item<double>();
  return total > 0 ? total : 1.0;
}

// The head's fp32 gradients in the dtypes of weight and bias.
std::tuple<Tensor, Tensor> head_grads(const Tensor& grad_weight, const Tensor& grad_bias,
                                      const Tensor& weight, const std::optional<Tensor>& bias) {
  return {grad_weight.to(weight.scalar_type()),
          bias ? grad_bias.to(bias->scalar_type()) : grad_bias};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_impl(
    const Tensor& hidden, const Tensor& weight, const Tensor& targets,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& teacher_hidden,
    const std::optional<Tensor>& teacher_weight, int64_t ignore_index, int64_t reduction,
    double z_loss, double kd_weight, double label_smoothing, double softcap,
    const std::optional<Tensor>& class_weight, bool weight_grad) {
  const LossTerms terms{ignore_index, z_loss, kd_weight, label_smoothing, softcap, class_weight};
  check_args("linear_cross_entropy", hidden, weight, targets, bias, teacher_hidden,
             teacher_weight, terms);
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "linear_cross_entropy: reduction must be 0 (none), 1 (mean) or 2 (sum)");
  std::optional<Tensor> scale;
  const double divisor = reduction == 1 ? mean_divisor(targets, terms) : 1.0;
  if (reduction != 0) {
    scale = at::full({hidden.size(0)}, 1.0 / divisor, hidden.options().dtype(at::kFloat));
  }
  Results r = lce_core(hidden, weight, targets, bias, teacher_hidden, teacher_weight, terms,
                       scale, weight_grad);
  const Tensor loss = reduction == 0 ? r.loss_rows : r.loss_rows.sum().div_(divisor);
  auto [grad_weight, grad_bias] = head_grads(r.grad_weight, r.grad_bias, weight, bias);
  return {loss, r.grad_hidden.to(hidden.scalar_type()), grad_weight, grad_bias, r.lse_rows};
}

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_backward_impl(
    const Tensor& grad_rows, const Tensor& hidden, const Tensor& weight, const Tensor& targets,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& teacher_hidden,
    const std::optional<Tensor>& teacher_weight, int64_t ignore_index, double z_loss,
    double kd_weight, double label_smoothing, double softcap,
    const std::optional<Tensor>& class_weight, bool weight_grad) {
  const LossTerms terms{ignore_index, z_loss, kd_weight, label_smoothing, softcap, class_weight};
  check_args("linear_cross_entropy_backward", hidden, weight, targets, bias, teacher_hidden,
             teacher_weight, terms);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == hidden.size(0),
              "linear_cross_entropy_backward: grad_rows must be [tokens]");
  Results r = lce_core(hidden, weight, targets, bias, teacher_hidden, teacher_weight, terms,
                       grad_rows.to(at::kFloat), weight_grad);
  auto [grad_weight, grad_bias] = head_grads(r.grad_weight, r.grad_bias, weight, bias);
  return {r.grad_hidden.to(hidden.scalar_type()), grad_weight, grad_bias};
}

std::tuple<Tensor, Tensor, std::vector<Tensor>, Tensor, Tensor> linear_cross_entropy_multi_impl(
    at::TensorList hiddens, const Tensor& weight, const Tensor& targets,
    const std::optional<Tensor>& bias, at::ArrayRef<double> exit_weights,
    const std::optional<Tensor>& teacher_hidden, const std::optional<Tensor>& teacher_weight,
    int64_t ignore_index, int64_t reduction, double z_loss, double kd_weight,
    double label_smoothing, double softcap, const std::optional<Tensor>& class_weight,
    bool weight_grad) {
  const LossTerms terms{ignore_index, z_loss, kd_weight, label_smoothing, softcap, class_weight};
  TORCH_CHECK(!hiddens.empty(), "linear_cross_entropy_multi: no exits");
  TORCH_CHECK(exit_weights.size() == hiddens.size(), "linear_cross_entropy_multi: ",
              hiddens.size(), " exits but ", exit_weights.size(), " exit weights");
  TORCH_CHECK(reduction == 1 || reduction == 2,
              "linear_cross_entropy_multi: reduction must be 1 (mean) or 2 (sum)");
  for (const double c : exit_weights) {
    TORCH_CHECK(std::isfinite(c), "linear_cross_entropy_multi: exit weights must be finite, got ",
                c);
  }
  for (const Tensor& h : hiddens) {
    check_args("linear_cross_entropy_multi", h, weight, targets, bias, teacher_hidden,
               teacher_weight, terms);
  }
  const auto f32 = hiddens[0].options().dtype(at::kFloat);
  const double divisor = reduction == 1 ? mean_divisor(targets, terms) : 1.0;
  const int64_t vocab = weight.size(0), d = weight.size(1);
  // One weight-gradient buffer for every exit sharing the head.
  Tensor grad_weight = at::zeros({weight_grad ? vocab : 0, d}, f32);
  Tensor grad_bias = at::zeros({weight_grad && bias ? vocab : 0}, f32);
  Tensor losses = at::empty({static_cast<int64_t>(hiddens.size())}, f32);
  std::vector<Tensor> grad_hiddens;
  for (size_t e = 0; e < hiddens.size(); ++e) {
    const Tensor scale = at::full({hiddens[e].size(0)}, exit_weights[e] / divisor, f32);
    Results r = lce_core(hiddens[e], weight, targets, bias, teacher_hidden, teacher_weight, terms,
                         scale, weight_grad, grad_weight, grad_bias);
    losses[e].copy_(r.loss_rows.sum().div_(divisor));
    grad_hiddens.push_back(r.grad_hidden.to(hiddens[e].scalar_type()));
  }
  const Tensor total = (losses * at::tensor(std::vector<double>(exit_weights.begin(),
                                                                  exit_weights.end()),
                                              f32))
                           .sum();
  auto [grad_weight_out, grad_bias_out] = head_grads(grad_weight, grad_bias, weight, bias);
  return {total, losses, grad_hiddens, grad_weight_out, grad_bias_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(eefast, CompositeExplicitAutograd, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_impl);
  m.impl("linear_cross_entropy_multi", &linear_cross_entropy_multi_impl);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_impl);
}

}  // namespace eefast
