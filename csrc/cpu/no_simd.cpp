// Stand-ins for the SIMD kernels on CPUs they are not built for (non-x86-64). There
// has_avx2_kernels() is false, so these are never called; they exist so that the module links
// and loads. On x86-64 (EEFAST_HAVE_AVX2_KERNELS) this file is empty.
#include <cstdlib>

#include "cpu/attention.h"
#include "cpu/gguf_blocks.h"
#include "cpu/row_kernels.h"

#if !defined(EEFAST_HAVE_AVX2_KERNELS)

namespace eefast::cpu {

void dot_logits_avx2(const float*, int64_t, int64_t, const void*, bool, int64_t, float*,
                     int64_t) {
  std::abort();
}

void dot_logits_i8_avx2(const float*, int64_t, int64_t, const signed char*, const float*,
                        int64_t, float*, int64_t) {
  std::abort();
}

SoftmaxStats softmax_stats_avx2(float*, int64_t, const float*, float, int64_t) { std::abort(); }

void scaled_softmax_avx2(float*, int64_t, float, float) { std::abort(); }

void col_exp_avx2(float*, int64_t, int64_t, float*, float*) { std::abort(); }

void dot_gguf_avx2(GgufType, const int8_t*, const float*, const float*, int64_t, int64_t,
                   const uint8_t*, int64_t, int64_t, int64_t, float*, int64_t) {
  std::abort();
}

void quantize_activations_avx2(const float*, int64_t, int64_t, int8_t*, float*, float*) {
  std::abort();
}

void attend_avx2(const float*, const float*, const float*, const bool*, int64_t, int64_t, float,
                 float*, float*) {
  std::abort();
}

}  // namespace eefast::cpu

#endif
