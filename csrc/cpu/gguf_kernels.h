// The body of dot_gguf's kernel (gguf_blocks.h), included by gguf_kernels_avx2.cpp,
// gguf_kernels_avxvnni.cpp and gguf_kernels_avx512vnni.cpp, which build it with 256-bit
// registers without and with AVX-VNNI, or with 512-bit ones and AVX-512 VNNI
// (EEFAST_GGUF_VNNI: 0, 1 or 512), as the entry point EEFAST_GGUF_ENTRY names.
// Every integer sum is exact and every float operation is the same per output lane, so all
// builds give the same bits.
//
// A packed tile's 64-byte chunk holds four consecutive quants of sixteen rows
// (gguf_blocks.h): one u8 x s8 dot against those four activations, broadcast, gives each
// row's partial sum in its own lane. The 512-bit build takes the sixteen rows at once; the
// 256-bit ones take each half of eight in turn (the tile stays in L1 for the second).
// Per block column and activation row: the integer sums of the rows, one conversion, one FMA
// with d * d_x, and for Q4 one FMA with the constant term (m, or -8 d) times the activations'
// group sum s. Two integer sums per row (low and high nibbles; even and odd Q8_0 chunks)
// halve the chain of dependent dots. The out % 16 plain rows after the tiles are packed into
// a zero-padded tile per call, so they take the same arithmetic.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/gguf_blocks.h"

#if !defined(EEFAST_GGUF_VNNI) || !defined(EEFAST_GGUF_ENTRY)
#error "define EEFAST_GGUF_VNNI (0, 1 or 512) and EEFAST_GGUF_ENTRY before including gguf_kernels.h"
#endif

namespace eefast::cpu {
namespace {

#if EEFAST_GGUF_VNNI == 512
// 512-bit registers: a whole tile of 16 rows per pass.
using VecI = __m512i;
using VecF = __m512;
constexpr int kLanes = 16;
inline VecI zero_i() { return _mm512_setzero_si512(); }
inline VecF zero_f() { return _mm512_setzero_ps(); }
inline VecI load_i(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline VecI set1_i8(char v) { return _mm512_set1_epi8(v); }
inline VecI and_i(VecI a, VecI b) { return _mm512_and_si512(a, b); }
inline VecI high_nibbles(VecI raw) { return _mm512_srli_epi16(raw, 4); }
inline VecI add_i32(VecI a, VecI b) { return _mm512_add_epi32(a, b); }
inline VecI dot4(VecI acc, VecI u, VecI s) { return _mm512_dpbusd_epi32(acc, u, s); }
// |w| and x with w's sign: u8 x s8 dots of int8 x int8 (no saturation: |x| <= 127).
inline VecI abs_i8(VecI w) { return _mm512_abs_epi8(w); }
inline VecI sign_i8(VecI x, VecI w) {
  return _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
}
inline VecI bcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm512_set1_epi32(v);
}
inline VecF halves(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline VecF set1_f(float v) { return _mm512_set1_ps(v); }
inline VecF mul_f(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF add_f(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline VecF fmadd(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF to_float(VecI v) { return _mm512_cvtepi32_ps(v); }
inline void store_f(float* p, VecF v) { _mm512_storeu_ps(p, v); }
#else
// 256-bit registers: half a tile (8 rows) per pass.
using VecI = __m256i;
using VecF = __m256;
constexpr int kLanes = 8;
inline VecI zero_i() { return _mm256_setzero_si256(); }
inline VecF zero_f() { return _mm256_setzero_ps(); }
inline VecI load_i(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline VecI set1_i8(char v) { return _mm256_set1_epi8(v); }
inline VecI and_i(VecI a, VecI b) { return _mm256_and_si256(a, b); }
inline VecI high_nibbles(VecI raw) { return _mm256_srli_epi16(raw, 4); }
inline VecI add_i32(VecI a, VecI b) { return _mm256_add_epi32(a, b); }
// acc + the sums of four u8 x s8 products per 32-bit lane.
inline VecI dot4(VecI acc, VecI u, VecI s) {
#if EEFAST_GGUF_VNNI
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  const __m256i pairs = _mm256_maddubs_epi16(u, s);  // no saturation: |u| <= 128, |s| <= 127
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}
inline VecI abs_i8(VecI w) { return _mm256_sign_epi8(w, w); }
inline VecI sign_i8(VecI x, VecI w) { return _mm256_sign_epi8(x, w); }
inline VecI bcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}
inline VecF halves(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline VecF set1_f(float v) { return _mm256_set1_ps(v); }
inline VecF mul_f(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF add_f(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline VecF fmadd(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF to_float(VecI v) { return _mm256_cvtepi32_ps(v); }
inline void store_f(float* p, VecF v) { _mm256_storeu_ps(p, v); }
#endif

constexpr int kPasses = kGgufTile / kLanes;  // passes over a tile, kLanes rows each

// Software prefetch this far ahead of the block column being summed. The kernel needs about
// as long to multiply a tile as DRAM needs to deliver it; without prefetch the two barely
// overlap (SmolLM2 blocks cycled from DRAM took 1.1-1.5x longer without it, 5 A/B runs).
constexpr int64_t kPrefetchBytes = 16384;

constexpr int64_t block_bytes(GgufType t) {
  return t == GgufType::kQ8_0 ? 34 : t == GgufType::kQ4_1 ? 20 : 18;
}

// out[r * ld + j], j < kLanes, for R activation rows and rows pass * kLanes.. of one tile.
template <GgufType T, int R>
inline void dot_tile(const int8_t* xq, const float* xd, const float* xs, int64_t in,
                     const uint8_t* tile, int pass, float* out, int64_t ld) {
  constexpr int64_t kStride = kGgufTile * block_bytes(T);  // one block column of the tile
  constexpr int64_t kHead = (T == GgufType::kQ4_1 ? 4 : 2) * kGgufTile;  // d (and m)
  constexpr int64_t kChunk = 4 * kGgufTile;  // bytes of four quants of every row
  const int64_t groups = in / kGgufGroup, lane0 = pass * kLanes;
  VecF acc[R], konst[R];
  for (int r = 0; r < R; ++r) acc[r] = konst[r] = zero_f();
  const VecI low4 = set1_i8(0x0F);
  for (int64_t g = 0; g < groups; ++g, tile += kStride) {
    if (pass == 0) {
      for (int64_t line = 0; line < kStride; line += 64) {  // prefetch never faults
        _mm_prefetch(reinterpret_cast<const char*>(tile + kPrefetchBytes + line), _MM_HINT_T0);
      }
    }
    const uint8_t* qs = tile + kHead + 4 * lane0;
    VecI even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = zero_i();
    if constexpr (T == GgufType::kQ8_0) {
      for (int c = 0; c < 8; c += 2) {  // quants 4c..4c+3 and 4c+4..4c+7
        const VecI w0 = load_i(qs + kChunk * c), w1 = load_i(qs + kChunk * (c + 1));
        const VecI u0 = abs_i8(w0), u1 = abs_i8(w1);
        for (int r = 0; r < R; ++r) {
          const int8_t* x = xq + r * in + g * kGgufGroup + 4 * c;
          even[r] = dot4(even[r], u0, sign_i8(bcast4(x), w0));
          odd[r] = dot4(odd[r], u1, sign_i8(bcast4(x + 4), w1));
        }
      }
    } else {
      for (int c = 0; c < 4; ++c) {  // low nibbles: quants 4c..4c+3; high: 16 + 4c..
        const VecI raw = load_i(qs + kChunk * c);
        const VecI lo = and_i(raw, low4), hi = and_i(high_nibbles(raw), low4);
        for (int r = 0; r < R; ++r) {
          const int8_t* x = xq + r * in + g * kGgufGroup + 4 * c;
          even[r] = dot4(even[r], lo, bcast4(x));
          odd[r] = dot4(odd[r], hi, bcast4(x + 16));
        }
      }
    }
    const VecF d = halves(tile + 2 * lane0);
    const VecF m = T == GgufType::kQ4_1 ? halves(tile + 2 * kGgufTile + 2 * lane0)
                                         : mul_f(d, set1_f(-8.0f));
    for (int r = 0; r < R; ++r) {
      const int64_t at = r * groups + g;
      acc[r] = fmadd(to_float(add_i32(even[r], odd[r])), mul_f(d, set1_f(xd[at])), acc[r]);
      if constexpr (T != GgufType::kQ8_0) konst[r] = fmadd(m, set1_f(xs[at]), konst[r]);
    }
  }
  for (int r = 0; r < R; ++r) store_f(out + r * ld, add_f(acc[r], konst[r]));
}

template <GgufType T>
void dot_all(const int8_t* xq, const float* xd, const float* xs, int64_t rows, int64_t in,
             const uint8_t* w, int64_t n, int64_t v0, int64_t v1, float* out, int64_t ld) {
  const int64_t groups = in / kGgufGroup, tiled = n / kGgufTile * kGgufTile;
  const int64_t tile_bytes = groups * kGgufTile * block_bytes(T);
  // Every activation row against one tile, four rows at a time.
  auto dot_tiles = [&](const uint8_t* tile, float* o, int64_t ldo) {
    for (int pass = 0; pass < kPasses; ++pass) {
      float* p = o + pass * kLanes;
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) {
        dot_tile<T, 4>(xq + r * in, xd + r * groups, xs + r * groups, in, tile, pass,
                       p + r * ldo, ldo);
      }
      const int8_t* q = xq + r * in;
      const float* d = xd + r * groups;
      const float* s = xs + r * groups;
      switch (rows - r) {
        case 3: dot_tile<T, 3>(q, d, s, in, tile, pass, p + r * ldo, ldo); break;
        case 2: dot_tile<T, 2>(q, d, s, in, tile, pass, p + r * ldo, ldo); break;
        case 1: dot_tile<T, 1>(q, d, s, in, tile, pass, p + r * ldo, ldo); break;
        default: break;
      }
    }
  };
  for (int64_t v = v0; v < std::min(v1, tiled); v += kGgufTile) {
    dot_tiles(w + v / kGgufTile * tile_bytes, out + v, ld);
  }
  if (v1 > tiled) {  // the tail rows, packed into one zero-padded tile
    const int64_t row_bytes = groups * block_bytes(T);
    std::vector<uint8_t> rows16(tile_bytes, 0), tile(tile_bytes);
    std::memcpy(rows16.data(), w + tiled * row_bytes, (n - tiled) * row_bytes);
    pack_gguf(T, rows16.data(), kGgufTile, in, tile.data());
    std::vector<float> o(rows * kGgufTile);
    dot_tiles(tile.data(), o.data(), kGgufTile);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t v = std::max(v0, tiled); v < v1; ++v) out[r * ld + v] = o[r * kGgufTile + v - tiled];
    }
  }
}

}  // namespace

// The entry point of this build: dot_gguf_avx2, _avxvnni or _avx512vnni (gguf_blocks.h).
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
