// GGUF's 32-weight quantisation blocks (llama.cpp's Q4_0, Q4_1 and Q8_0) and the kernels that
// multiply a few activation rows by a matrix of them.
//
// A GGUF row of `in` weights is in / 32 blocks (little-endian, packed):
//   Q4_0 (18 bytes): fp16 d, 16 bytes of nibbles; weight = d * (q - 8)
//   Q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes of nibbles; weight = d * q + m
//   Q8_0 (34 bytes): fp16 d, 32 int8; weight = d * q
// Nibble byte j of a block holds weight j (low four bits) and weight j + 16 (high four bits).
//
// eefast keeps a matrix [out, in] of blocks "packed": the same bytes, regrouped so that one
// 512-bit load holds four consecutive weights of sixteen output rows (and each 256-bit half,
// eight). Rows come in tiles of 16; tile t, block column g is at byte
// (t * groups + g) * 16 * block_bytes and holds
//   the 16 rows' d (fp16 [16]), for Q4_1 their m (fp16 [16]), then the quants in chunks of 64
//   bytes: chunk c, row j = bytes 4c..4c+3 of row j's nibbles (Q4) or int8 weights (Q8_0).
// The last out % 16 rows follow the tiles as plain GGUF rows. As a tensor it is uint8
// [out, in / 32, block_bytes], which is also how its type is told apart (18, 20 or 34).
//
// The kernels quantise the activations per group of 32 (int8, d = max|x| / 127), as
// llama.cpp does, and sum each tile's bytes with integer dot products (exact, in any order);
// each float sum runs in the same order whatever the number of rows.
// Plain C++ (no torch headers), so the SIMD translation units can include it.
#pragma once

#include <cstdint>

namespace eefast::cpu {

enum class GgufType { kQ4_0, kQ4_1, kQ8_0 };

constexpr int64_t kGgufGroup = 32;  // weights per block
constexpr int64_t kGgufTile = 16;   // rows per packed tile

int64_t gguf_block_bytes(GgufType type);
// The type whose blocks are `bytes` long; false if none is.
bool gguf_type_of_block_bytes(int64_t bytes, GgufType* type);

// GGUF rows [n, in / 32 blocks] -> the packed layout above (out must not alias rows).
void pack_gguf(GgufType type, const uint8_t* rows, int64_t n, int64_t in, uint8_t* out);
// Rows [v0, v1) of the packed matrix [n, in] as the float32 weights GGUF defines (exactly),
// into out [n, in]. v0 is a multiple of 16; v1 too, or n.
void dequantize_gguf(GgufType type, const uint8_t* packed, int64_t n, int64_t in, int64_t v0,
                     int64_t v1, float* out);

// x [rows, in] (in a multiple of 32) as the kernels multiply it: q [rows, in] int8, and per
// group of 32 its scale d = max|x| / 127 [rows, in / 32] and s = d * sum(q) (what Q4's
// constant multiplies); q = x * (1 / d) rounded to nearest even. AVX2 (the kernels' callers
// check has_avx2_kernels()).
void quantize_activations_avx2(const float* x, int64_t rows, int64_t in, int8_t* q, float* d,
                               float* s);

// out[r * ld + v] for r < rows and v in [v0, v1): activation row r (quantize_activations_avx2's q,
// d, s) times row v of the packed matrix w [n, in]. v0 is a multiple of 16; v1 too, or n.
// AVX2 + FMA + F16C, with AVX-VNNI or AVX-512 VNNI where the CPU has them (callers check
// has_avx2_kernels()).
void dot_gguf(GgufType type, const int8_t* xq, const float* xd, const float* xs, int64_t rows,
              int64_t in, const uint8_t* w, int64_t n, int64_t v0, int64_t v1, float* out,
              int64_t ld);

// The builds of dot_gguf's kernel, with identical results: 256-bit (gguf_kernels.h) without
// and with AVX-VNNI, and 512-bit (gguf_kernels_avx512vnni.cpp).
void dot_gguf_avx2(GgufType type, const int8_t* xq, const float* xd, const float* xs,
                   int64_t rows, int64_t in, const uint8_t* w, int64_t n, int64_t v0, int64_t v1,
                   float* out, int64_t ld);
void dot_gguf_avxvnni(GgufType type, const int8_t* xq, const float* xd, const float* xs,
                      int64_t rows, int64_t in, const uint8_t* w, int64_t n, int64_t v0,
                      int64_t v1, float* out, int64_t ld);
void dot_gguf_avx512vnni(GgufType type, const int8_t* xq, const float* xd, const float* xs,
                         int64_t rows, int64_t in, const uint8_t* w, int64_t n, int64_t v0,
                         int64_t v1, float* out, int64_t ld);

}  // namespace eefast::cpu
