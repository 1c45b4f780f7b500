// One query row's attention over a KV cache for decode_block: plain C++ (no torch headers),
// with an AVX2 + FMA build (attention_avx2.cpp) and a portable one (attention.cpp).
#pragma once

#include <cstdint>

namespace eefast::cpu {

// out [hd] = softmax over the keys j < n_keys with sees[j] of (q . keys[j]) * scale, times
// values[j] (keys and values [n_keys, hd] rows); zeros if it sees no key. p [n_keys] is
// scratch. The sums run over seen keys in slot order, so a row's output depends on nothing
// else in the call. Dispatches to AVX2 where has_avx2_kernels().
void attend(const float* q, const float* keys, const float* values, const bool* sees,
            int64_t n_keys, int64_t hd, float scale, float* p, float* out);
void attend_portable(const float* q, const float* keys, const float* values, const bool* sees,
                     int64_t n_keys, int64_t hd, float scale, float* p, float* out);
void attend_avx2(const float* q, const float* keys, const float* values, const bool* sees,
                 int64_t n_keys, int64_t hd, float scale, float* p, float* out);

// What both builds share: the seen keys' scores p (top their max) become their softmax
// weights, summed in slot order.
void softmax_seen(float* p, const bool* sees, int64_t n_keys, float top);

}  // namespace eefast::cpu
