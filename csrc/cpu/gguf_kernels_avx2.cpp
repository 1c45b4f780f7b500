// dot_gguf's kernel built for AVX2 + FMA + F16C (gguf_kernels.h): u8 x s8 dots with maddubs;
// and the activations' quantisation that both builds read.
#define EEFAST_GGUF_VNNI 0
#define EEFAST_GGUF_ENTRY dot_gguf_avx2
#include "cpu/gguf_kernels.h"

namespace eefast::cpu {

void quantize_activations_avx2(const float* x, int64_t rows, int64_t in, int8_t* q, float* d,
                               float* s) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lanes
  for (int64_t g = 0; g < rows * (in / kGgufGroup); ++g, x += kGgufGroup, q += kGgufGroup) {
    __m256 v[4], top = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(x + 8 * j);
      top = _mm256_max_ps(top, _mm256_and_ps(v[j], abs_mask));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float scale = _mm_cvtss_f32(m) / 127.0f;
    const __m256 inv = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
    __m256i i[4];
    for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));  // even ties
    const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]),
                                           _mm256_add_epi32(i[2], i[3]));
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]),
                                             _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(bytes, order));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    d[g] = scale;
    s[g] = scale * static_cast<float>(_mm_cvtsi128_si32(t));
  }
}

}  // namespace eefast::cpu
