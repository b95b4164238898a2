// Dense bf16 GEMV kernel, portable C++ variant (no ISA flags; the tests run it as well).
#define PK_ISA_NS scalar
#include "gemv_kernel.h"
