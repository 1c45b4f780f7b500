// Dot kernels with AVX-512 (F + BW), compiled with -mavx512f -mavx512bw and called only after a
// runtime CPU check (has_avx512_kernels()):
// - int8 weights: sixteen int8 weights per conversion and FMA, half the instructions of the
//   AVX2 kernel, which one-row int8 decoding is bound by. Every output is summed in the same
//   order whatever the number of rows, as in the AVX2 kernel (a machine uses one of the two
//   for every call).
// - float32/bf16 weights, for the 2-64 rows of a verify step or a small batch: register tiles
//   of 4 rows x 4 weight rows, so each loaded vector feeds four FMAs. Each output is summed
//   exactly as the AVX2 kernel sums it (see dot_tile), so the two give the same bits.
// GCC 12's AVX-512 intrinsics fill unused lanes from _mm512_undefined_*(), which its own
// uninitialized-use analysis then reports at every call site (a known false positive).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
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

// Sixteen float32 or bf16 weights (bf16 bits are the top half of fp32's).
template <bool kBf16>
inline __m512 load_f(const char* w, int64_t k) {
  if constexpr (kBf16) {
    const __m256i b = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(reinterpret_cast<const unsigned short*>(w) + k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
  } else {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(w) + k);
  }
}

// Eight of them into lanes 0-7 (the rest zero), reading no further.
template <bool kBf16>
inline __m512 load_f8(const char* w, int64_t k) {
  if constexpr (kBf16) {
    const __m128i b = _mm_loadu_si128(
        reinterpret_cast<const __m128i*>(reinterpret_cast<const unsigned short*>(w) + k));
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_zextsi128_si256(b));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  } else {
    return _mm512_maskz_loadu_ps(0xFF, reinterpret_cast<const float*>(w) + k);
  }
}

template <bool kBf16>
inline float w_at(const char* w, int64_t k) {
  if constexpr (kBf16) {
    const unsigned bits = static_cast<unsigned>(reinterpret_cast<const unsigned short*>(w)[k])
                          << 16;
    return __builtin_bit_cast(float, bits);
  } else {
    return reinterpret_cast<const float*>(w)[k];
  }
}

// The AVX2 kernel's horizontal sum of its two 8-lane accumulators (lanes 0-7 and 8-15 here).
inline float hsum_as_avx2(__m512 acc) {
  const __m256 lo = _mm512_castps512_ps256(acc);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
  const __m256 v = _mm256_add_ps(lo, hi);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int64_t kTileAhead = 4;  // dot_tile prefetches this many tiles of weight rows ahead

// out[r * ld + j] = h[r] . w[j] for R rows x N weight rows (w_stride bytes apart). Lane l of
// one accumulator per output sums the k = l (mod 16) products in k order, then the AVX2
// kernel's reduction: the AVX2 kernel's acc0 and acc1 are lanes 0-7 and 8-15 here, so every
// output gets the same bits whatever R, N or instruction set computed it.
template <bool kBf16, int R, int N>
inline void dot_tile(const float* h, int64_t d, const char* w, int64_t w_stride, float* out,
                     int64_t ld) {
  constexpr int64_t kBytes = kBf16 ? 2 : 4;
  const char* ahead = w + kTileAhead * N * w_stride;
  __m512 acc[R][N];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < N; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 16 <= d; k += 16) {
    if (((k * kBytes) & 63) == 0) {
      for (int j = 0; j < N; ++j) _mm_prefetch(ahead + j * w_stride + k * kBytes, _MM_HINT_T0);
    }
    __m512 wv[N];
    for (int j = 0; j < N; ++j) wv[j] = load_f<kBf16>(w + j * w_stride, k);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_loadu_ps(h + r * d + k);
      for (int j = 0; j < N; ++j) acc[r][j] = _mm512_fmadd_ps(x, wv[j], acc[r][j]);
    }
  }
  if (k + 8 <= d) {  // the AVX2 kernel's last 8-wide step, into acc0 (lanes 0-7) only
    __m512 wv[N];
    for (int j = 0; j < N; ++j) wv[j] = load_f8<kBf16>(w + j * w_stride, k);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_maskz_loadu_ps(0xFF, h + r * d + k);
      for (int j = 0; j < N; ++j) acc[r][j] = _mm512_mask3_fmadd_ps(x, wv[j], acc[r][j], 0xFF);
    }
    k += 8;
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < N; ++j) {
      float s = hsum_as_avx2(acc[r][j]);
      for (int64_t kk = k; kk < d; ++kk) s += h[r * d + kk] * w_at<kBf16>(w + j * w_stride, kk);
      out[r * ld + j] = s;
    }
  }
}

// Rows in groups of 4 (then 3, 2 or 1) against N weight rows.
template <bool kBf16, int N>
inline void dot_tile_rows(const float* h, int64_t rows, int64_t d, const char* w,
                          int64_t w_stride, float* out, int64_t ld) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) dot_tile<kBf16, 4, N>(h + r * d, d, w, w_stride, out + r * ld, ld);
  const float* hr = h + r * d;
  float* o = out + r * ld;
  switch (rows - r) {
    case 3: dot_tile<kBf16, 3, N>(hr, d, w, w_stride, o, ld); break;
    case 2: dot_tile<kBf16, 2, N>(hr, d, w, w_stride, o, ld); break;
    case 1: dot_tile<kBf16, 1, N>(hr, d, w, w_stride, o, ld); break;
    default: break;
  }
}

template <bool kBf16>
void dot_logits_f(const float* h, int64_t rows, int64_t d, const void* w, int64_t n,
                  float* logits, int64_t ld) {
  const int64_t stride = d * (kBf16 ? 2 : 4);
  const char* wb = static_cast<const char*>(w);
  int64_t v = 0;
  // Tiles of 4 weight rows: each stays in L1 while every row group passes over it.
  for (; v + 4 <= n; v += 4) {
    dot_tile_rows<kBf16, 4>(h, rows, d, wb + v * stride, stride, logits + v, ld);
  }
  for (; v < n; ++v) dot_tile_rows<kBf16, 1>(h, rows, d, wb + v * stride, stride, logits + v, ld);
}

}  // namespace

void dot_logits_f_avx512(const float* h, int64_t rows, int64_t d, const void* w, bool w_bf16,
                         int64_t n, float* logits, int64_t ld) {
  if (w_bf16) {
    dot_logits_f<true>(h, rows, d, w, n, logits, ld);
  } else {
    dot_logits_f<false>(h, rows, d, w, n, logits, ld);
  }
}

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
