// GGUF blocks: their sizes, packing, the exact dequantisation and the dispatch to the dot
// kernel's builds (gguf_blocks.h). Portable C++; the kernels are gguf_kernels_*.cpp.
#include "cpu/gguf_blocks.h"
#include "cpu/row_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace eefast::cpu {
namespace {

// IEEE half -> float, exactly (every half is a float).
float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);  // zero or subnormal
  } else if (exp == 31) {
    v = man ? std::nanf("") : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400), static_cast<int>(exp) - 25);
  }
  float out;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits |= sign;
  std::memcpy(&out, &bits, 4);
  return out;
}

}  // namespace

int64_t gguf_block_bytes(GgufType type) {
  switch (type) {
    case GgufType::kQ4_0: return 18;
    case GgufType::kQ4_1: return 20;
    case GgufType::kQ8_0: return 34;
  }
  return 0;
}

bool gguf_type_of_block_bytes(int64_t bytes, GgufType* type) {
  for (GgufType t : {GgufType::kQ4_0, GgufType::kQ4_1, GgufType::kQ8_0}) {
    if (gguf_block_bytes(t) == bytes) {
      *type = t;
      return true;
    }
  }
  return false;
}

namespace {

// Copies block g of row v between the GGUF bytes `block` and the packed matrix [n, groups
// blocks] (gguf_blocks.h), into the packed matrix if to_packed, else out of it.
void move_block(GgufType type, uint8_t* packed, int64_t n, int64_t groups, int64_t v, int64_t g,
                uint8_t* block, bool to_packed) {
  const int64_t bytes = gguf_block_bytes(type), tiled = n / kGgufTile * kGgufTile;
  auto move = [&](uint8_t* p, uint8_t* b, int64_t len) {
    to_packed ? std::memcpy(p, b, len) : std::memcpy(b, p, len);
  };
  if (v >= tiled) {
    move(packed + (tiled * groups + (v - tiled) * groups + g) * bytes, block, bytes);
    return;
  }
  uint8_t* tile = packed + ((v / kGgufTile) * groups + g) * kGgufTile * bytes;
  const int64_t j = v % kGgufTile;
  move(tile + 2 * j, block, 2);  // d
  int64_t head = 2 * kGgufTile;
  if (type == GgufType::kQ4_1) {
    move(tile + head + 2 * j, block + 2, 2);  // m
    head += 2 * kGgufTile;
  }
  const int64_t quants = type == GgufType::kQ8_0 ? 32 : 16;
  uint8_t* q = block + bytes - quants;
  for (int64_t c = 0; c < quants / 4; ++c) {
    move(tile + head + 4 * kGgufTile * c + 4 * j, q + 4 * c, 4);
  }
}

// One GGUF block's 32 weights.
void dequantize_block(GgufType type, const uint8_t* b, float* out) {
  const float d = half_to_float(b);
  if (type == GgufType::kQ8_0) {
    for (int64_t j = 0; j < kGgufGroup; ++j) {
      out[j] = d * static_cast<float>(static_cast<int8_t>(b[2 + j]));
    }
    return;
  }
  const uint8_t* qs = b + (type == GgufType::kQ4_1 ? 4 : 2);
  const float m = type == GgufType::kQ4_1 ? half_to_float(b + 2) : 0.0f;
  for (int64_t j = 0; j < kGgufGroup / 2; ++j) {
    const int lo = qs[j] & 0x0F, hi = qs[j] >> 4;
    if (type == GgufType::kQ4_1) {
      out[j] = d * static_cast<float>(lo) + m;
      out[j + 16] = d * static_cast<float>(hi) + m;
    } else {
      out[j] = d * static_cast<float>(lo - 8);
      out[j + 16] = d * static_cast<float>(hi - 8);
    }
  }
}

}  // namespace

void pack_gguf(GgufType type, const uint8_t* rows, int64_t n, int64_t in, uint8_t* out) {
  const int64_t groups = in / kGgufGroup, bytes = gguf_block_bytes(type);
  for (int64_t v = 0; v < n; ++v) {
    for (int64_t g = 0; g < groups; ++g) {
      move_block(type, out, n, groups, v, g, const_cast<uint8_t*>(rows + (v * groups + g) * bytes),
                 /*to_packed=*/true);
    }
  }
}

void dequantize_gguf(GgufType type, const uint8_t* packed, int64_t n, int64_t in, int64_t v0,
                     int64_t v1, float* out) {
  const int64_t groups = in / kGgufGroup, bytes = gguf_block_bytes(type);
  const int64_t tiled = n / kGgufTile * kGgufTile;
  const bool q8 = type == GgufType::kQ8_0, q4_1 = type == GgufType::kQ4_1;
  const int64_t head = (q4_1 ? 4 : 2) * kGgufTile;
  for (int64_t v = v0; v < std::min(v1, tiled); v += kGgufTile) {
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* tile = packed + ((v / kGgufTile) * groups + g) * kGgufTile * bytes;
      for (int64_t j = 0; j < kGgufTile; ++j) {
        const float d = half_to_float(tile + 2 * j);
        const float m = q4_1 ? half_to_float(tile + 2 * kGgufTile + 2 * j) : 0.0f;
        float* o = out + (v + j) * in + g * kGgufGroup;
        for (int64_t c = 0; c < (q8 ? 8 : 4); ++c) {
          const uint8_t* q = tile + head + 4 * kGgufTile * c + 4 * j;
          for (int64_t b = 0; b < 4; ++b) {
            if (q8) {
              o[4 * c + b] = d * static_cast<float>(static_cast<int8_t>(q[b]));
            } else if (q4_1) {
              o[4 * c + b] = d * static_cast<float>(q[b] & 0x0F) + m;
              o[16 + 4 * c + b] = d * static_cast<float>(q[b] >> 4) + m;
            } else {
              o[4 * c + b] = d * static_cast<float>((q[b] & 0x0F) - 8);
              o[16 + 4 * c + b] = d * static_cast<float>((q[b] >> 4) - 8);
            }
          }
        }
      }
    }
  }
  for (int64_t v = std::max(v0, tiled); v < v1; ++v) {  // the plain tail rows
    for (int64_t g = 0; g < groups; ++g) {
      dequantize_block(type, packed + (tiled * groups + (v - tiled) * groups + g) * bytes,
                       out + v * in + g * kGgufGroup);
    }
  }
}

void dot_gguf(GgufType type, const int8_t* xq, const float* xd, const float* xs, int64_t rows,
              int64_t in, const uint8_t* w, int64_t n, int64_t v0, int64_t v1, float* out,
              int64_t ld) {
#if defined(EEFAST_HAVE_AVX512VNNI_KERNELS)
  if (has_avx512vnni_kernels()) {
    return dot_gguf_avx512vnni(type, xq, xd, xs, rows, in, w, n, v0, v1, out, ld);
  }
#endif
#if defined(EEFAST_HAVE_AVXVNNI_KERNELS)
  if (has_avxvnni_kernels()) return dot_gguf_avxvnni(type, xq, xd, xs, rows, in, w, n, v0, v1, out, ld);
#endif
  dot_gguf_avx2(type, xq, xd, xs, rows, in, w, n, v0, v1, out, ld);
}

}  // namespace eefast::cpu
