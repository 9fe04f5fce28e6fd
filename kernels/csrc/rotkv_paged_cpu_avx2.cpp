// The CPU attention kernel for avx2: compiled with the avx2 flags of setup.py (ISA_FLAGS), chosen at run time.
// No torch header here (see rotkv_paged_cpu.h).
#define ROTKV_VEC_AVX2
#define ROTKV_ISA_NAMESPACE avx2
#include "rotkv_paged_cpu_kernel.h"
