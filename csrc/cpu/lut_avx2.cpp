// LUT-GEMV kernel, avx2 variant (flags from the file suffix, see setup.py).
#define PK_ISA_NS avx2
#include "lut_kernel.h"
