// AVX2+FMA row kernels of the exit-head ops. Compiled with -mavx2 -mfma and called only where the CPU has
// them (see row_kernels.cpp). Includes no torch or standard-library headers with inline
// functions: an inline function compiled here with AVX2 could otherwise be the copy the linker
// keeps for the whole program, and crash CPUs without AVX2.
#include <immintrin.h>

#include "cpu/row_kernels.h"

namespace eefast::cpu {
namespace {

// max(x, -87): the range exp_nonpositive takes. max_ps returns x when x is NaN: NaN stays.
inline __m256 clamp_exp_arg(__m256 x) { return _mm256_max_ps(_mm256_set1_ps(-87.0f), x); }

// exp(x) for -87 <= x <= 0, same range reduction and polynomial as the portable version.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Top two of 8 + 8 lane candidates and the scalar tail, duplicates counted (a tie gives
// max2 == max1).
inline void push_top2(float v, float& best, float& second) {
  if (v > best) {
    second = best;
    best = v;
  } else if (v > second) {
    second = v;
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// How a weight matrix stores its values.
enum class W { kF32, kBf16, kI8 };

// Eight weights as fp32: loaded, widened from bf16 (the bf16 bits are the top half of fp32),
// or converted from int8 (the row's scale is applied to the finished dot product).
template <W kW>
inline __m256 load_w(const void* w, int64_t k) {
  if constexpr (kW == W::kBf16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(
        static_cast<const unsigned short*>(w) + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
  } else if constexpr (kW == W::kI8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(
        static_cast<const signed char*>(w) + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(w) + k);
  }
}

template <W kW>
inline float w_at(const void* w, int64_t k) {
  if constexpr (kW == W::kBf16) {
    const unsigned bits = static_cast<unsigned>(static_cast<const unsigned short*>(w)[k]) << 16;
    return __builtin_bit_cast(float, bits);
  } else if constexpr (kW == W::kI8) {
    return static_cast<float>(static_cast<const signed char*>(w)[k]);
  } else {
    return static_cast<const float*>(w)[k];
  }
}

template <W kW>
constexpr int64_t w_bytes() {
  return kW == W::kF32 ? 4 : (kW == W::kBf16 ? 2 : 1);
}

// out[r * ld] = scale * (h[r] . w) for R rows: each w vector is loaded once for all R rows,
// with two accumulators per row to hide FMA latency.
template <W kW, int R>
inline void dot_rows(const float* h, int64_t d, const void* w, float scale, float* out,
                     int64_t ld, const char* ahead) {
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= d; k += 16) {
    if (((k * w_bytes<kW>()) & 63) == 0) _mm_prefetch(ahead + k * w_bytes<kW>(), _MM_HINT_T0);
    const __m256 w0 = load_w<kW>(w, k), w1 = load_w<kW>(w, k + 8);
    for (int r = 0; r < R; ++r) {
      acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(h + r * d + k), w0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(h + r * d + k + 8), w1, acc1[r]);
    }
  }
  for (; k + 8 <= d; k += 8) {
    const __m256 w0 = load_w<kW>(w, k);
    for (int r = 0; r < R; ++r) acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(h + r * d + k), w0, acc0[r]);
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(_mm256_add_ps(acc0[r], acc1[r]));
    for (int64_t kk = k; kk < d; ++kk) s += h[r * d + kk] * w_at<kW>(w, kk);
    out[r * ld] = kW == W::kI8 ? s * scale : s;
  }
}

constexpr int64_t kPrefetchGroups = 2;  // how far ahead dot_row_x4 prefetches, in groups of 4
constexpr int64_t kPrefetchRows = 16;   // how far ahead dot_rows prefetches, in weight rows

// dot_rows<kW, 1> for four weight vectors at once: the same sums in the same order for each
// (so a row's result does not depend on how many rows the call has), but eight independent
// FMA chains instead of two, which one row needs to keep up with the int8 stream.
template <W kW>
inline void dot_row_x4(const float* h, int64_t d, const void* w, int64_t w_stride,
                       const float* scales, float* out) {
  const char* wb = static_cast<const char*>(w);
  __m256 acc0[4], acc1[4];
  for (int j = 0; j < 4; ++j) acc0[j] = acc1[j] = _mm256_setzero_ps();
  // The next groups' rows, a cache line per row every 64 bytes: int8 rows are short, and
  // without it too few lines are in flight to keep up with memory.
  const char* ahead = wb + kPrefetchGroups * 4 * w_stride;
  int64_t k = 0;
  for (; k + 16 <= d; k += 16) {
    if (((k * w_bytes<kW>()) & 63) == 0) {
      for (int j = 0; j < 4; ++j) {
        _mm_prefetch(ahead + j * w_stride + k * w_bytes<kW>(), _MM_HINT_T0);
      }
    }
    const __m256 x0 = _mm256_loadu_ps(h + k), x1 = _mm256_loadu_ps(h + k + 8);
    for (int j = 0; j < 4; ++j) {
      acc0[j] = _mm256_fmadd_ps(x0, load_w<kW>(wb + j * w_stride, k), acc0[j]);
      acc1[j] = _mm256_fmadd_ps(x1, load_w<kW>(wb + j * w_stride, k + 8), acc1[j]);
    }
  }
  for (; k + 8 <= d; k += 8) {
    const __m256 x0 = _mm256_loadu_ps(h + k);
    for (int j = 0; j < 4; ++j) {
      acc0[j] = _mm256_fmadd_ps(x0, load_w<kW>(wb + j * w_stride, k), acc0[j]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    float s = hsum(_mm256_add_ps(acc0[j], acc1[j]));
    for (int64_t kk = k; kk < d; ++kk) s += h[kk] * w_at<kW>(wb + j * w_stride, kk);
    out[j] = kW == W::kI8 ? s * scales[j] : s;
  }
}

template <W kW>
void dot_logits(const float* h, int64_t rows, int64_t d, const void* w, const float* scales,
                int64_t n, float* logits, int64_t ld) {
  const int64_t w_stride = d * w_bytes<kW>();
  int64_t v0 = 0;
  if (kW == W::kI8 && rows == 1) {  // float rows stream memory-bound either way
    static const float kOnes[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    for (; v0 + 4 <= n; v0 += 4) {
      dot_row_x4<kW>(h, d, static_cast<const char*>(w) + v0 * w_stride, w_stride,
                     scales ? scales + v0 : kOnes, logits + v0);
    }
  }
  for (int64_t v = v0; v < n; ++v) {
    const void* wv = static_cast<const char*>(w) + v * w_stride;
    const char* ahead = static_cast<const char*>(wv) + kPrefetchRows * w_stride;
    const float scale = scales ? scales[v] : 1.0f;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {  // the first four rows prefetch; later passes hit cache
      dot_rows<kW, 4>(h + r * d, d, wv, scale, logits + r * ld + v, ld, ahead);
    }
    float* o = logits + r * ld + v;
    switch (rows - r) {
      case 3: dot_rows<kW, 3>(h + r * d, d, wv, scale, o, ld, ahead); break;
      case 2: dot_rows<kW, 2>(h + r * d, d, wv, scale, o, ld, ahead); break;
      case 1: dot_rows<kW, 1>(h + r * d, d, wv, scale, o, ld, ahead); break;
      default: break;
    }
  }
}

}  // namespace

void dot_logits_avx2(const float* h, int64_t rows, int64_t d, const void* w, bool w_bf16,
                     int64_t n, float* logits, int64_t ld) {
  if (w_bf16) {
    dot_logits<W::kBf16>(h, rows, d, w, nullptr, n, logits, ld);
  } else {
    dot_logits<W::kF32>(h, rows, d, w, nullptr, n, logits, ld);
  }
}

void dot_logits_i8_avx2(const float* h, int64_t rows, int64_t d, const signed char* w,
                        const float* scales, int64_t n, float* logits, int64_t ld) {
  dot_logits<W::kI8>(h, rows, d, w, scales, n, logits, ld);
}

SoftmaxStats softmax_stats_avx2(float* z, int64_t n, const float* bias, float inv_t,
                                int64_t base) {
  constexpr int64_t kW = 8;
  const float neg_inf = -__builtin_inff();
  const __m256 scale = _mm256_set1_ps(inv_t);
  __m256 m1 = _mm256_set1_ps(neg_inf), m2 = m1;
  int64_t i = 0;
  // Pass 1: finish the logits in place and keep the top two per lane.
  for (; i + kW <= n; i += kW) {
    __m256 v = _mm256_loadu_ps(z + i);
    if (bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + i));
    v = _mm256_mul_ps(v, scale);
    _mm256_storeu_ps(z + i, v);
    m2 = _mm256_max_ps(m2, _mm256_min_ps(m1, v));
    m1 = _mm256_max_ps(m1, v);
  }
  float lanes1[kW], lanes2[kW];
  _mm256_storeu_ps(lanes1, m1);
  _mm256_storeu_ps(lanes2, m2);
  float best = neg_inf, second = neg_inf;
  for (int64_t l = 0; l < kW; ++l) {
    push_top2(lanes1[l], best, second);
    push_top2(lanes2[l], best, second);
  }
  for (; i < n; ++i) {
    z[i] = (bias != nullptr ? z[i] + bias[i] : z[i]) * inv_t;
    push_top2(z[i], best, second);
  }

  SoftmaxStats st{best, second, 0.f, 0.f, -1, -1};
  // First index of the max, eight at a time.
  const __m256 vbest = _mm256_set1_ps(best);
  for (i = 0; i + kW <= n && st.arg1 < 0; i += kW) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(z + i), vbest, _CMP_EQ_OQ));
    if (mask != 0) st.arg1 = i + __builtin_ctz(static_cast<unsigned>(mask));
  }
  for (; i < n && st.arg1 < 0; ++i) {
    if (z[i] == best) st.arg1 = i;
  }

  // Pass 2: sum exp(z - max1) and sum exp(z - max1)(z - max1), lane-wise then in fixed order.
  // (z - max1 is clamped at -87, where exp is ~1e-38: -inf logits add 0, not -inf * 0.)
  __m256 s = _mm256_setzero_ps(), e = _mm256_setzero_ps();
  for (i = 0; i + kW <= n; i += kW) {
    const __m256 d = clamp_exp_arg(_mm256_sub_ps(_mm256_loadu_ps(z + i), vbest));
    const __m256 p = exp_nonpositive(d);
    s = _mm256_add_ps(s, p);
    e = _mm256_fmadd_ps(p, d, e);
  }
  float ls[kW], le[kW];
  _mm256_storeu_ps(ls, s);
  _mm256_storeu_ps(le, e);
  // The tail goes through one more (masked) vector so it uses the same exp.
  if (i < n) {
    float tail[kW];
    for (int64_t l = 0; l < kW; ++l) tail[l] = i + l < n ? z[i + l] - best : neg_inf;
    const __m256 raw = _mm256_loadu_ps(tail);
    const __m256 valid = _mm256_cmp_ps(raw, _mm256_set1_ps(neg_inf), _CMP_NEQ_UQ);
    const __m256 d = clamp_exp_arg(raw);
    const __m256 p = _mm256_and_ps(exp_nonpositive(d), valid);
    float tp[kW], te[kW];
    _mm256_storeu_ps(tp, p);
    _mm256_storeu_ps(te, _mm256_mul_ps(p, _mm256_and_ps(d, valid)));
    for (int64_t l = 0; l < kW; ++l) {
      ls[l] += tp[l];
      le[l] += te[l];
    }
  }
  for (int64_t l = 0; l < kW; ++l) {
    st.sum += ls[l];
    st.ent += le[l];
  }

  if (st.sum != st.sum || st.arg1 < 0) {  // a NaN logit: report the first one
    for (i = 0; i < n; ++i) {
      if (z[i] != z[i]) {
        st.nan_at = base + i;
        break;
      }
    }
    if (st.arg1 < 0) st.arg1 = 0;
  }
  st.arg1 += base;
  return st;
}

void scaled_softmax_avx2(float* z, int64_t n, float lse, float coef) {
  constexpr int64_t kW = 8;
  const __m256 vlse = _mm256_set1_ps(lse), vcoef = _mm256_set1_ps(coef);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const __m256 d = clamp_exp_arg(_mm256_sub_ps(_mm256_loadu_ps(z + i), vlse));
    _mm256_storeu_ps(z + i, _mm256_mul_ps(vcoef, exp_nonpositive(d)));
  }
  if (i < n) {  // the tail through one padded vector, so it uses the same exp
    float tail[kW];
    for (int64_t l = 0; l < kW; ++l) tail[l] = i + l < n ? z[i + l] : lse;
    const __m256 d = clamp_exp_arg(_mm256_sub_ps(_mm256_loadu_ps(tail), vlse));
    _mm256_storeu_ps(tail, _mm256_mul_ps(vcoef, exp_nonpositive(d)));
    for (int64_t l = 0; i + l < n; ++l) z[i + l] = tail[l];
  }
}


namespace {

// Lanes c..c+7 of a row of `cols` floats, the ones past cols masked off (loads give 0 there).
inline __m256i tail_mask(int64_t left) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)), lane);
}

}  // namespace

// Each pass streams z once, row after row; the per-column max and sum stay in L1.
void col_exp_avx2(float* z, int64_t n, int64_t cols, float* max, float* sum) {
  constexpr int64_t kW = 8;
  for (int64_t c = 0; c < cols; ++c) {
    max[c] = -__builtin_inff();
    sum[c] = 0.f;
  }
  const int64_t full = cols / kW * kW;
  const __m256i mask = tail_mask(cols - full);
  for (int64_t v = 0; v < n; ++v) {
    const float* zr = z + v * cols;
    for (int64_t c = 0; c < full; c += kW) {  // max_ps(z, m) gives m when z is NaN
      _mm256_storeu_ps(max + c, _mm256_max_ps(_mm256_loadu_ps(zr + c), _mm256_loadu_ps(max + c)));
    }
    if (full < cols) {
      const __m256 m = _mm256_max_ps(_mm256_maskload_ps(zr + full, mask),
                                     _mm256_maskload_ps(max + full, mask));
      _mm256_maskstore_ps(max + full, mask, m);
    }
  }
  for (int64_t v = 0; v < n; ++v) {  // a NaN logit stays NaN through exp: its column sums to NaN
    float* zr = z + v * cols;
    for (int64_t c = 0; c < full; c += kW) {
      const __m256 e = exp_nonpositive(
          clamp_exp_arg(_mm256_sub_ps(_mm256_loadu_ps(zr + c), _mm256_loadu_ps(max + c))));
      _mm256_storeu_ps(zr + c, e);
      _mm256_storeu_ps(sum + c, _mm256_add_ps(_mm256_loadu_ps(sum + c), e));
    }
    if (full < cols) {
      const __m256 e = exp_nonpositive(clamp_exp_arg(_mm256_sub_ps(
          _mm256_maskload_ps(zr + full, mask), _mm256_maskload_ps(max + full, mask))));
      _mm256_maskstore_ps(zr + full, mask, e);
      _mm256_maskstore_ps(sum + full, mask, _mm256_add_ps(_mm256_maskload_ps(sum + full, mask), e));
    }
  }
}

}  // namespace eefast::cpu
