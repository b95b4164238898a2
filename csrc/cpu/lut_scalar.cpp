// LUT-GEMV kernel, portable C++ variant (no ISA flags; also the reference the tests compare with).
#define PK_ISA_NS scalar
#include "lut_kernel.h"
