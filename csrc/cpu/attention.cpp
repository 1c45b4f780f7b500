// decode_block's attention for one query row (attention.h): the portable build and the
// dispatch to the AVX2 one.
#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/row_kernels.h"

namespace eefast::cpu {

void attend_portable(const float* q, const float* keys, const float* values, const bool* sees,
                     int64_t n_keys, int64_t hd, float scale, float* p, float* out) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n_keys; ++j) {
    if (!sees[j]) continue;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const float* k = keys + j * hd;
    int64_t c = 0;
    for (; c + 8 <= hd; c += 8) {
      for (int l = 0; l < 8; ++l) acc[l] += q[c + l] * k[c + l];
    }
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; c < hd; ++c) s += q[c] * k[c];
    p[j] = s * scale;
    top = std::max(top, p[j]);
  }
  std::fill_n(out, hd, 0.0f);
  if (top == -std::numeric_limits<float>::infinity()) return;  // sees no key: zeros
  softmax_seen(p, sees, n_keys, top);
  for (int64_t j = 0; j < n_keys; ++j) {
    if (!sees[j]) continue;
    const float* v = values + j * hd;
    for (int64_t c = 0; c < hd; ++c) out[c] += p[j] * v[c];
  }
}

void softmax_seen(float* p, const bool* sees, int64_t n_keys, float top) {
  float sum = 0.0f;
  for (int64_t j = 0; j < n_keys; ++j) {
    if (sees[j]) sum += (p[j] = std::exp(p[j] - top));
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < n_keys; ++j) {
    if (sees[j]) p[j] *= inv;
  }
}

void attend(const float* q, const float* keys, const float* values, const bool* sees,
            int64_t n_keys, int64_t hd, float scale, float* p, float* out) {
#if defined(EEFAST_HAVE_AVX2_KERNELS)
  if (has_avx2_kernels()) return attend_avx2(q, keys, values, sees, n_keys, hd, scale, p, out);
#endif
  attend_portable(q, keys, values, sees, n_keys, hd, scale, p, out);
}

}  // namespace eefast::cpu
