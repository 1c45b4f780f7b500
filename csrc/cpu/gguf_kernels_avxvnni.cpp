// dot_gguf's kernel built for AVX2 + FMA + F16C + AVX-VNNI (gguf_kernels.h): u8 x s8 dots
// with vpdpbusd, one instruction where AVX2 needs three.
#define EEFAST_GGUF_VNNI 1
#include "cpu/gguf_kernels.h"

namespace eefast::cpu {

void dot_gguf_avxvnni(GgufType type, const int8_t* xq, const float* xd, const float* xs,
                   int64_t rows, int64_t in, const uint8_t* w, int64_t n, int64_t v0, int64_t v1,
                   float* out, int64_t ld) {
  switch (type) {
    case GgufType::kQ4_0: return dot_all<GgufType::kQ4_0>(xq, xd, xs, rows, in, w, n, v0, v1, out, ld);
    case GgufType::kQ4_1: return dot_all<GgufType::kQ4_1>(xq, xd, xs, rows, in, w, n, v0, v1, out, ld);
    case GgufType::kQ8_0: return dot_all<GgufType::kQ8_0>(xq, xd, xs, rows, in, w, n, v0, v1, out, ld);
  }
}

}  // namespace eefast::cpu
