// Dense bf16 GEMV kernel, avx2 variant (flags from the file suffix, see setup.py).
#define PK_ISA_NS avx2
#include "gemv_kernel.h"
