// LUT-GEMV kernel, AVX-512 + VBMI (vpermb, vpmultishiftqb) + VNNI (vpdpbusd) variant for the
// int8 tables (flags from the file suffix, see setup.py). Chosen at run time when the CPU has both.
#define PK_ISA_NS avx512vbmi
#include "lut_kernel.h"
