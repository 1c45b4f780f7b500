// dot_gguf's kernel built for AVX2 + FMA + F16C + AVX-VNNI (gguf_kernels.h): u8 x s8 dots
// with vpdpbusd, one instruction where AVX2 needs three.
#define EEFAST_GGUF_VNNI 1
#define EEFAST_GGUF_ENTRY dot_gguf_avxvnni
#include "cpu/gguf_kernels.h"
