// Row kernels of the exit-head ops: the portable softmax statistics, the merge of two partials,
// and the dispatch to the AVX2 versions (row_kernels_avx2.cpp).
#include "cpu/row_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

namespace eefast::cpu {
namespace {

// exp(x) for -87 <= x <= 0. Cody-Waite range reduction, x = n ln2 + r with |r| <= ln2/2, and a
// degree-6 polynomial: relative error below 2e-7.
float exp_nonpositive(float x) {
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return std::ldexp(p, static_cast<int>(n));
}

}  // namespace

bool has_avx2_kernels() {
#if defined(EEFAST_HAVE_AVX2_KERNELS)
  // EEFAST_DISABLE_AVX2=1 forces the portable kernels (read once; tests use it).
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") &&
                          std::getenv("EEFAST_DISABLE_AVX2") == nullptr;
  return has;
#else
  return false;
#endif
}

bool has_avx512_kernels() {
#if defined(EEFAST_HAVE_AVX512_KERNELS)
  // EEFAST_DISABLE_AVX512=1 keeps the AVX2 kernels (read once).
  static const bool has = has_avx2_kernels() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          std::getenv("EEFAST_DISABLE_AVX512") == nullptr;
  return has;
#else
  return false;
#endif
}

bool has_avxvnni_kernels() {
#if defined(EEFAST_HAVE_AVXVNNI_KERNELS)
  // EEFAST_DISABLE_AVXVNNI=1 keeps the AVX2 build of the GGUF kernel (read once; same bits).
  static const bool has = has_avx2_kernels() && __builtin_cpu_supports("avxvnni") &&
                          std::getenv("EEFAST_DISABLE_AVXVNNI") == nullptr;
  return has;
#else
  return false;
#endif
}

bool has_avx512vnni_kernels() {
#if defined(EEFAST_HAVE_AVX512VNNI_KERNELS)
  // EEFAST_DISABLE_AVX512=1 keeps the 256-bit builds of the GGUF kernel too (same bits).
  static const bool has = has_avx512_kernels() && __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

void dot_logits_i8(const float* h, int64_t rows, int64_t d, const signed char* w,
                   const float* scales, int64_t n, float* logits, int64_t ld) {
#if defined(EEFAST_HAVE_AVX512_KERNELS)
  if (has_avx512_kernels()) return dot_logits_i8_avx512(h, rows, d, w, scales, n, logits, ld);
#endif
  dot_logits_i8_avx2(h, rows, d, w, scales, n, logits, ld);
}

void dot_logits_f(const float* h, int64_t rows, int64_t d, const void* w, bool w_bf16,
                  int64_t n, float* logits, int64_t ld) {
#if defined(EEFAST_HAVE_AVX512_KERNELS)
  // Up to 4 rows stream the weights from memory, where the AVX2 kernel's one-weight-row-at-a-
  // time pass keeps up better (a SmolLM2 verify step over 4 rows: 23 against 29 ms); from 5
  // rows the tiles' shared loads win (that step over 8 rows: 34 against 43 ms; SmolLM2's LM
  // head over 32 rows: 14 against 43 ms). Both give the same bits.
  if (rows >= 5 && has_avx512_kernels()) {
    return dot_logits_f_avx512(h, rows, d, w, w_bf16, n, logits, ld);
  }
#endif
  dot_logits_avx2(h, rows, d, w, w_bf16, n, logits, ld);
}

SoftmaxStats softmax_stats_portable(float* z, int64_t n, const float* bias, float inv_t,
                                    int64_t base) {
  SoftmaxStats st{-std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity(), 0.f, 0.f, -1, -1};
  for (int64_t i = 0; i < n; ++i) {
    z[i] = (bias != nullptr ? z[i] + bias[i] : z[i]) * inv_t;
    if (z[i] > st.max1) {
      st.max2 = st.max1;
      st.max1 = z[i];
      st.arg1 = i;
    } else if (z[i] > st.max2) {
      st.max2 = z[i];
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const float d = std::max(z[i] - st.max1, -87.0f);  // NaN stays NaN
    const float p = exp_nonpositive(d);
    st.sum += p;
    st.ent += p * d;
  }
  if (std::isnan(st.sum) || st.arg1 < 0) {
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(z[i])) {
        st.nan_at = base + i;
        break;
      }
    }
    st.arg1 = std::max<int64_t>(st.arg1, 0);
  }
  st.arg1 += base;
  return st;
}

SoftmaxStats softmax_stats(float* z, int64_t n, const float* bias, float inv_t, int64_t base) {
  if (has_avx2_kernels()) return softmax_stats_avx2(z, n, bias, inv_t, base);
  return softmax_stats_portable(z, n, bias, inv_t, base);
}

void scaled_softmax_portable(float* z, int64_t n, float lse, float coef) {
  for (int64_t i = 0; i < n; ++i) z[i] = coef * exp_nonpositive(std::max(z[i] - lse, -87.0f));
}

void scaled_softmax(float* z, int64_t n, float lse, float coef) {
  if (has_avx2_kernels()) return scaled_softmax_avx2(z, n, lse, coef);
  scaled_softmax_portable(z, n, lse, coef);
}

void col_exp_portable(float* z, int64_t n, int64_t cols, float* max, float* sum) {
  std::fill(max, max + cols, -std::numeric_limits<float>::infinity());
  std::fill(sum, sum + cols, 0.f);
  for (int64_t v = 0; v < n; ++v) {
    for (int64_t c = 0; c < cols; ++c) max[c] = std::max(max[c], z[v * cols + c]);
  }
  for (int64_t v = 0; v < n; ++v) {  // std::max(x, -87) keeps a NaN x: NaN columns sum to NaN
    for (int64_t c = 0; c < cols; ++c) {
      float& x = z[v * cols + c];
      x = exp_nonpositive(std::max(x - max[c], -87.0f));
      sum[c] += x;
    }
  }
}

void col_exp(float* z, int64_t n, int64_t cols, float* max, float* sum) {
  if (has_avx2_kernels()) return col_exp_avx2(z, n, cols, max, sum);
  col_exp_portable(z, n, cols, max, sum);
}

void merge(SoftmaxStats& a, const SoftmaxStats& b) {
  if (a.nan_at < 0) a.nan_at = b.nan_at;
  if (b.max1 > a.max1) {
    const float shift = a.max1 - b.max1;
    const float scale = std::exp(shift);
    a.ent = (a.ent + a.sum * shift) * scale + b.ent;
    a.sum = a.sum * scale + b.sum;
    a.max2 = std::max(a.max1, b.max2);
    a.max1 = b.max1;
    a.arg1 = b.arg1;
  } else {
    const float shift = b.max1 - a.max1;
    const float scale = std::exp(shift);
    a.ent += (b.ent + b.sum * shift) * scale;
    a.sum += b.sum * scale;
    a.max2 = std::max(a.max2, b.max1);
  }
}

}  // namespace eefast::cpu
