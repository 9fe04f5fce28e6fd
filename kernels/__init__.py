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

# RotateKV cache records (pure PyTorch reference + dispatch; imports no Triton).
from rotkv_kernels.rotkv_cache import (  # noqa: E402
    check_perm,
    record_bytes,
    rotkv_read,
    rotkv_read_ref,
    rotkv_write,
    rotkv_write_ref,
    triton_available,
)

__all__ += [
    "check_perm",
    "record_bytes",
    "rotkv_read",
    "rotkv_read_ref",
    "rotkv_write",
    "rotkv_write_ref",
    "triton_available",
    "hadamard_transform_triton",
    "quantize_pack_triton",
    "unpack_dequantize_triton",
    "rotkv_write_triton",
    "rotkv_read_triton",
]

# Twin-Log weight quantization (LRQ-DiT; pure PyTorch reference).
from rotkv_kernels.twin_log import (  # noqa: E402
    TwinLogGrid,
    twin_log_dequantize,
    twin_log_linear_ref,
    twin_log_pack,
    twin_log_search,
    twin_log_unpack,
)

__all__ += [
    "TwinLogGrid",
    "twin_log_dequantize",
    "twin_log_linear_ref",
    "twin_log_pack",
    "twin_log_search",
    "twin_log_unpack",
    "twin_log_linear_triton",
]

# Triton entry points load on first access, so `import rotkv_kernels` never imports triton.
_LAZY_TRITON = {
    "twin_log_linear_triton": "rotkv_kernels.twin_log_triton",
    "hadamard_transform_triton": "rotkv_kernels.hadamard_triton",
    "quantize_pack_triton": "rotkv_kernels.quant_triton",
    "unpack_dequantize_triton": "rotkv_kernels.quant_triton",
    "rotkv_write_triton": "rotkv_kernels.rotkv_cache_triton",
    "rotkv_read_triton": "rotkv_kernels.rotkv_cache_triton",
}


def __getattr__(name):
    if name in _LAZY_TRITON:
        import importlib

        return getattr(importlib.import_module(_LAZY_TRITON[name]), name)
    raise AttributeError(f"module 'rotkv_kernels' has no attribute {name!r}")
