// The CPU attention kernel for avx512: compiled with the avx512 flags of setup.py (ISA_FLAGS), chosen at run time.
// No torch header here (see rotkv_paged_cpu.h).
#define ROTKV_VEC_AVX512
#define ROTKV_ISA_NAMESPACE avx512
#include "rotkv_paged_cpu_kernel.h"
