// The int8 dot kernel with AVX-512 (F + BW): sixteen int8 weights per conversion and FMA, half
// the instructions of the AVX2 kernel, which one-row int8 decoding is bound by. Compiled with
// -mavx512f -mavx512bw and called only after a runtime CPU check (has_avx512_kernels()).
// Every output is summed in the same order whatever the number of rows, as in the AVX2 kernel
// (a machine uses one of the two for every call).
#include <immintrin.h>

#include "cpu/row_kernels.h"

namespace eefast::cpu {
namespace {

inline __m512 load_i8(const signed char* w, int64_t k) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

constexpr int64_t kPrefetchGroups = 2;  // dot_row_x4: how far ahead, in groups of 4 rows
constexpr int64_t kPrefetchRows = 16;   // dot_rows: how far ahead, in rows

// out[r * ld] = scale * (h[r] . w) for R rows; each 16-weight vector is converted once.
template <int R>
inline void dot_rows(const float* h, int64_t d, const signed char* w, float scale, float* out,
                     int64_t ld, const signed char* ahead) {
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= d; k += 32) {
    if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(ahead + k), _MM_HINT_T0);
    const __m512 w0 = load_i8(w, k), w1 = load_i8(w, k + 16);
    for (int r = 0; r < R; ++r) {
      acc0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(h + r * d + k), w0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(h + r * d + k + 16), w1, acc1[r]);
    }
  }
  for (; k + 16 <= d; k += 16) {
    const __m512 w0 = load_i8(w, k);
    for (int r = 0; r < R; ++r) {
      acc0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(h + r * d + k), w0, acc0[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
    for (int64_t kk = k; kk < d; ++kk) s += h[r * d + kk] * static_cast<float>(w[kk]);
    out[r * ld] = s * scale;
  }
}

// dot_rows<1> for four weight rows at once: the same sums, eight independent FMA chains.
inline void dot_row_x4(const float* h, int64_t d, const signed char* w, int64_t stride,
                       const float* scales, float* out) {
  const signed char* ahead = w + kPrefetchGroups * 4 * stride;
  __m512 acc0[4], acc1[4];
  for (int j = 0; j < 4; ++j) acc0[j] = acc1[j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= d; k += 32) {
    if ((k & 63) == 0) {
      for (int j = 0; j < 4; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + j * stride + k), _MM_HINT_T0);
      }
    }
    const __m512 x0 = _mm512_loadu_ps(h + k), x1 = _mm512_loadu_ps(h + k + 16);
    for (int j = 0; j < 4; ++j) {
      acc0[j] = _mm512_fmadd_ps(x0, load_i8(w + j * stride, k), acc0[j]);
      acc1[j] = _mm512_fmadd_ps(x1, load_i8(w + j * stride, k + 16), acc1[j]);
    }
  }
  for (; k + 16 <= d; k += 16) {
    const __m512 x0 = _mm512_loadu_ps(h + k);
    for (int j = 0; j < 4; ++j) acc0[j] = _mm512_fmadd_ps(x0, load_i8(w + j * stride, k), acc0[j]);
  }
  for (int j = 0; j < 4; ++j) {
    float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0[j], acc1[j]));
    for (int64_t kk = k; kk < d; ++kk) s += h[kk] * static_cast<float>(w[j * stride + kk]);
    out[j] = s * scales[j];
  }
}

}  // namespace

void dot_logits_i8_avx512(const float* h, int64_t rows, int64_t d, const signed char* w,
                          const float* scales, int64_t n, float* logits, int64_t ld) {
  int64_t v0 = 0;
  if (rows == 1) {
    for (; v0 + 4 <= n; v0 += 4) dot_row_x4(h, d, w + v0 * d, d, scales + v0, logits + v0);
  }
  for (int64_t v = v0; v < n; ++v) {
    const signed char* wv = w + v * d;
    const signed char* ahead = wv + kPrefetchRows * d;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      dot_rows<4>(h + r * d, d, wv, scales[v], logits + r * ld + v, ld, ahead);
    }
    float* o = logits + r * ld + v;
    switch (rows - r) {
      case 3: dot_rows<3>(h + r * d, d, wv, scales[v], o, ld, ahead); break;
      case 2: dot_rows<2>(h + r * d, d, wv, scales[v], o, ld, ahead); break;
      case 1: dot_rows<1>(h + r * d, d, wv, scales[v], o, ld, ahead); break;
      default: break;
    }
  }
}

}  // namespace eefast::cpu
