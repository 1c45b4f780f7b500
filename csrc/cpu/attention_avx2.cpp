// decode_block's attention for one query row (attention.h) with AVX2 + FMA: eight head
// dimensions per instruction for the scores and the weighted sum of values. The softmax
// between them is the portable one (softmax_seen: a few hundred exponentials per row).
// Compiled with -mavx2 -mfma.
#include <immintrin.h>

#include <algorithm>
#include <limits>

#include "cpu/attention.h"

namespace eefast::cpu {

void attend_avx2(const float* q, const float* keys, const float* values, const bool* sees,
                 int64_t n_keys, int64_t hd, float scale, float* p, float* out) {
  if (hd % 8 != 0) return attend_portable(q, keys, values, sees, n_keys, hd, scale, p, out);
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n_keys; ++j) {
    if (!sees[j]) continue;
    const float* k = keys + j * hd;
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
    for (int64_t c = 8; c < hd; c += 8) {
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(k + c), acc);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    p[j] = _mm_cvtss_f32(s) * scale;
    top = std::max(top, p[j]);
  }
  std::fill_n(out, hd, 0.0f);
  if (top == -std::numeric_limits<float>::infinity()) return;  // sees no key: zeros
  softmax_seen(p, sees, n_keys, top);
  // Unseen slots may hold anything (even NaN), so they are skipped, not weighted by zero.
  for (int64_t c = 0; c < hd; c += 8) {
    __m256 o = _mm256_setzero_ps();
    for (int64_t j = 0; j < n_keys; ++j) {
      if (!sees[j]) continue;
      o = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), _mm256_loadu_ps(values + j * hd + c), o);
    }
    _mm256_storeu_ps(out + c, o);
  }
}

}  // namespace eefast::cpu
