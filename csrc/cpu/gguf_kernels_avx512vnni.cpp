// dot_gguf's kernel built for AVX-512 (F + BW + VNNI) (gguf_kernels.h): a whole tile of 16
// rows per 512-bit dot, half the dots of the 256-bit builds, with the same bits.
#define EEFAST_GGUF_VNNI 512
#define EEFAST_GGUF_ENTRY dot_gguf_avx512vnni
#include "cpu/gguf_kernels.h"
