// The CPU attention kernel for scalar: no ISA flags: the portable reference of the vectorized kernels.
// No torch header here (see rotkv_paged_cpu.h).

#define ROTKV_ISA_NAMESPACE scalar
#include "rotkv_paged_cpu_kernel.h"
