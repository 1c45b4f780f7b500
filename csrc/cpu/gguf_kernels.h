// The body of dot_gguf's kernel (gguf_blocks.h), included by gguf_kernels_avx2.cpp and
// gguf_kernels_avxvnni.cpp, which build it with and without AVX-VNNI (EEFAST_GGUF_VNNI) as
// the entry point EEFAST_GGUF_ENTRY names.
// Every integer sum is exact, so both builds give the same bits.
//
// A packed tile's 256-bit chunk holds four consecutive quants of eight rows (gguf_blocks.h):
// one u8 x s8 dot against those four activations, broadcast, gives each row's partial sum in
// its own lane. Per block column and activation row: the integer sums of the 8 rows, one
// conversion, one FMA with d * d_x, and for Q4 one FMA with the constant term (m, or -8 d)
// times the activations' group sum s. The out % 8 plain rows after the tiles are packed into
// a zero-padded tile per call, so they take the same arithmetic.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/gguf_blocks.h"

#if !defined(EEFAST_GGUF_VNNI) || !defined(EEFAST_GGUF_ENTRY)
#error "define EEFAST_GGUF_VNNI (0 or 1) and EEFAST_GGUF_ENTRY before including gguf_kernels.h"
#endif

namespace eefast::cpu {
namespace {

// acc + the sums of four u8 x s8 products per 32-bit lane.
inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {
#if EEFAST_GGUF_VNNI
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  const __m256i pairs = _mm256_maddubs_epi16(u, s);  // no saturation: |u| <= 128, |s| <= 127
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

inline __m256i bcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256 halves8(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Software prefetch this far ahead of the block column being summed. The kernel needs about
// as long to multiply a tile as DRAM needs to deliver it; without prefetch the two barely
// overlap (SmolLM2 blocks cycled from DRAM took 1.1-1.5x longer without it, 5 A/B runs).
constexpr int64_t kPrefetchBytes = 16384;

constexpr int64_t block_bytes(GgufType t) {
  return t == GgufType::kQ8_0 ? 34 : t == GgufType::kQ4_1 ? 20 : 18;
}

// out[r * ld + j], j < 8, for R activation rows and one tile of 8 packed rows.
template <GgufType T, int R>
inline void dot_tile(const int8_t* xq, const float* xd, const float* xs, int64_t in,
                     const uint8_t* tile, float* out, int64_t ld) {
  constexpr int64_t kStride = kGgufTile * block_bytes(T);  // one block column of the tile
  constexpr int64_t kHead = (T == GgufType::kQ4_1 ? 4 : 2) * kGgufTile;  // d (and m)
  const int64_t groups = in / kGgufGroup;
  __m256 acc[R], konst[R];
  for (int r = 0; r < R; ++r) acc[r] = konst[r] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; ++g, tile += kStride) {
    for (int64_t line = 0; line < kStride; line += 64) {  // prefetch never faults
      _mm_prefetch(reinterpret_cast<const char*>(tile + kPrefetchBytes + line), _MM_HINT_T0);
    }
    const uint8_t* qs = tile + kHead;
    __m256i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_si256();
    if constexpr (T == GgufType::kQ8_0) {
      for (int c = 0; c < 8; ++c) {  // quants 4c..4c+3; |w| against x with w's sign
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
        const __m256i u = _mm256_sign_epi8(w, w);
        for (int r = 0; r < R; ++r) {
          const __m256i x = bcast4(xq + r * in + g * kGgufGroup + 4 * c);
          sum[r] = dot4(sum[r], u, _mm256_sign_epi8(x, w));
        }
      }
    } else {
      for (int c = 0; c < 4; ++c) {  // low nibbles: quants 4c..4c+3; high: 16 + 4c..
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
        const __m256i lo = _mm256_and_si256(raw, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
        for (int r = 0; r < R; ++r) {
          const int8_t* x = xq + r * in + g * kGgufGroup + 4 * c;
          sum[r] = dot4(dot4(sum[r], lo, bcast4(x)), hi, bcast4(x + 16));
        }
      }
    }
    const __m256 d = halves8(tile);
    const __m256 m = T == GgufType::kQ4_1 ? halves8(tile + 2 * kGgufTile)
                                           : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
    for (int r = 0; r < R; ++r) {
      const int64_t at = r * groups + g;
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]),
                               _mm256_mul_ps(d, _mm256_set1_ps(xd[at])), acc[r]);
      if constexpr (T != GgufType::kQ8_0) {
        konst[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xs[at]), konst[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * ld, _mm256_add_ps(acc[r], konst[r]));
}

template <GgufType T>
void dot_all(const int8_t* xq, const float* xd, const float* xs, int64_t rows, int64_t in,
             const uint8_t* w, int64_t n, int64_t v0, int64_t v1, float* out, int64_t ld) {
  const int64_t groups = in / kGgufGroup, tiled = n / kGgufTile * kGgufTile;
  const int64_t tile_bytes = groups * kGgufTile * block_bytes(T);
  // Every activation row against one tile, four rows at a time.
  auto dot_tiles = [&](const uint8_t* tile, float* o, int64_t ldo) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      dot_tile<T, 4>(xq + r * in, xd + r * groups, xs + r * groups, in, tile, o + r * ldo, ldo);
    }
    const int8_t* q = xq + r * in;
    const float* d = xd + r * groups;
    const float* s = xs + r * groups;
    switch (rows - r) {
      case 3: dot_tile<T, 3>(q, d, s, in, tile, o + r * ldo, ldo); break;
      case 2: dot_tile<T, 2>(q, d, s, in, tile, o + r * ldo, ldo); break;
      case 1: dot_tile<T, 1>(q, d, s, in, tile, o + r * ldo, ldo); break;
      default: break;
    }
  };
  for (int64_t v = v0; v < std::min(v1, tiled); v += kGgufTile) {
    dot_tiles(w + v / kGgufTile * tile_bytes, out + v, ld);
  }
  if (v1 > tiled) {  // the tail rows, packed into one zero-padded tile
    const int64_t row_bytes = groups * block_bytes(T);
    std::vector<uint8_t> rows8(tile_bytes, 0), tile(tile_bytes);
    std::memcpy(rows8.data(), w + tiled * row_bytes, (n - tiled) * row_bytes);
    pack_gguf(T, rows8.data(), kGgufTile, in, tile.data());
    std::vector<float> o(rows * kGgufTile);
    dot_tiles(tile.data(), o.data(), kGgufTile);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t v = std::max(v0, tiled); v < v1; ++v) out[r * ld + v] = o[r * kGgufTile + v - tiled];
    }
  }
}

}  // namespace

// The entry point of this build: dot_gguf_avx2 or dot_gguf_avxvnni (gguf_blocks.h).
void EEFAST_GGUF_ENTRY(GgufType type, const int8_t* xq, const float* xd, const float* xs,
                       int64_t rows, int64_t in, const uint8_t* w, int64_t n, int64_t v0,
                       int64_t v1, float* out, int64_t ld) {
  switch (type) {
    case GgufType::kQ4_0: return dot_all<GgufType::kQ4_0>(xq, xd, xs, rows, in, w, n, v0, v1, out, ld);
    case GgufType::kQ4_1: return dot_all<GgufType::kQ4_1>(xq, xd, xs, rows, in, w, n, v0, v1, out, ld);
    case GgufType::kQ8_0: return dot_all<GgufType::kQ8_0>(xq, xd, xs, rows, in, w, n, v0, v1, out, ld);
  }
}

}  // namespace eefast::cpu
