"""rotkv_kernels: pure ops (PyTorch references and Triton kernels), no model knowledge."""

from rotkv_kernels.hadamard import hadamard_matrix, hadamard_transform, has_hadamard
from rotkv_kernels.quant import (
    dequantize_groupwise,
    pack_codes,
    quantize_groupwise,
    unpack_codes,
)

__all__ = [
    "hadamard_matrix",
    "hadamard_transform",
    "has_hadamard",
    "quantize_groupwise",
    "dequantize_groupwise",
    "pack_codes",
    "unpack_codes",
]
