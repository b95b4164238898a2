// Dense bf16 GEMV kernel, avx512 variant (flags from the file suffix, see setup.py).
#define PK_ISA_NS avx512
#include "gemv_kernel.h"
