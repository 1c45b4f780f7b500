// Row kernels of the exit-head ops: logits of a few rows against a weight chunk, and the
// softmax statistics of one row of logits.
// Plain C++ (no torch headers) so the AVX2 translation unit can include it safely.
#pragma once

#include <cstdint>

namespace eefast::cpu {

// Statistics of a slice of logits, relative to the slice's own max (an online-softmax partial).
struct SoftmaxStats {
  float max1;     // largest logit
  float max2;     // second largest (equal to max1 on a tie)
  float sum;      // sum of exp(z - max1)
  float ent;      // sum of exp(z - max1) * (z - max1)
  int64_t arg1;   // vocab index of the first max1
  int64_t nan_at; // vocab index of the first NaN logit, or -1
};

// Rewrites z[0, n) as (z + bias) * inv_t (bias may be null) and returns its statistics; z[0]
// has vocab index `base`. Dispatches to AVX2+FMA where the CPU has them.
SoftmaxStats softmax_stats(float* z, int64_t n, const float* bias, float inv_t, int64_t base);

// The two implementations behind softmax_stats (exposed for tests and benchmarks).
SoftmaxStats softmax_stats_portable(float* z, int64_t n, const float* bias, float inv_t,
                                    int64_t base);
SoftmaxStats softmax_stats_avx2(float* z, int64_t n, const float* bias, float inv_t,
                                int64_t base);

// Rewrites z[0, n) as coef * exp(z - lse): the softmax of a row whose logsumexp is lse, scaled
// (a cross-entropy gradient before its one-hot term). Dispatches like softmax_stats.
void scaled_softmax(float* z, int64_t n, float lse, float coef);
void scaled_softmax_portable(float* z, int64_t n, float lse, float coef);
void scaled_softmax_avx2(float* z, int64_t n, float lse, float coef);

// The softmax's exponentials down the columns of a row-major [n, cols] block: the logits of
// `cols` tokens laid out vocab-major, as the GEMM W h^T writes them. Sets max[c] to the largest
// z[v][c] over v < n, rewrites z[v][c] as exp(z[v][c] - max[c]) and sets sum[c] to their sum
// (NaN when a NaN is in the column).
void col_exp(float* z, int64_t n, int64_t cols, float* max, float* sum);
void col_exp_portable(float* z, int64_t n, int64_t cols, float* max, float* sum);
void col_exp_avx2(float* z, int64_t n, int64_t cols, float* max, float* sum);

// Whether the AVX2+FMA+F16C kernels below (and gguf_blocks.h's) can run on this CPU (and were
// built).
bool has_avx2_kernels();

// logits[r * ld + v] = h[r] . w[v] for r < rows, v < n, with h [rows, d] fp32 and w n rows of
// length d, fp32 or bf16 (raw bits; w_bf16). Streams w once: the decode-time floor. AVX2 only
// (callers check has_avx2_kernels()).
void dot_logits_avx2(const float* h, int64_t rows, int64_t d, const void* w, bool w_bf16,
                     int64_t n, float* logits, int64_t ld);

// The same for int8 weights with one scale per weight row: logits[r * ld + v] =
// scales[v] * (h[r] . w[v]). AVX2 only.
void dot_logits_i8_avx2(const float* h, int64_t rows, int64_t d, const signed char* w,
                        const float* scales, int64_t n, float* logits, int64_t ld);

// The same with AVX-512 (F + BW), where has_avx512_kernels(); and the dispatcher decode-time
// callers use (AVX-512, else AVX2; callers check has_avx2_kernels()).
bool has_avx512_kernels();
void dot_logits_i8_avx512(const float* h, int64_t rows, int64_t d, const signed char* w,
                          const float* scales, int64_t n, float* logits, int64_t ld);
void dot_logits_i8(const float* h, int64_t rows, int64_t d, const signed char* w,
                   const float* scales, int64_t n, float* logits, int64_t ld);

// The float32/bf16 dot_logits with AVX-512 register tiles (4 rows x 4 weight rows): the same
// bits as dot_logits_avx2. And the dispatcher decode-time callers use: the tiles from 5 rows
// on where has_avx512_kernels(), else dot_logits_avx2 (callers check has_avx2_kernels()).
void dot_logits_f_avx512(const float* h, int64_t rows, int64_t d, const void* w, bool w_bf16,
                         int64_t n, float* logits, int64_t ld);
void dot_logits_f(const float* h, int64_t rows, int64_t d, const void* w, bool w_bf16,
                  int64_t n, float* logits, int64_t ld);

// Whether the AVX-VNNI build of the GGUF block kernel (gguf_blocks.h) can run here.
bool has_avxvnni_kernels();
// Whether its AVX-512 VNNI build can run here.
bool has_avx512vnni_kernels();

// Folds b (later vocab indices) into a. Ties keep a's argmax, like torch.argmax.
void merge(SoftmaxStats& a, const SoftmaxStats& b);

}  // namespace eefast::cpu
