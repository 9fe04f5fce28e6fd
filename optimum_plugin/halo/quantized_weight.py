"""The weight a HALO layer receives under HQ-FSDP: the all-gathered 8-bit ``Q(rot W)`` and its scales, dressed as
the float weight. ``fsdp.py`` builds it after the all-gather; ``linear.py`` reads it (both import it from here).
"""

from __future__ import annotations

import torch

__all__ = ["HALOQuantizedWeight"]

aten = torch.ops.aten


class HALOQuantizedWeight(torch.Tensor):
    """The unsharded weight under HQ-FSDP: shaped and typed like the float ``(N, K)`` weight, holding
    ``codes`` (``(N, K)`` int8/fp8 of ``rot W``) and ``scale`` (``(N, 1)`` float32, or ``(1, 1)``).

    Only the HALO layer reads it (through ``codes``/``scale``); other ops raise.
    """

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, requires_grad: bool = False):
        return torch.Tensor._make_wrapper_subclass(
            cls, codes.shape, dtype=dtype, device=codes.device, requires_grad=requires_grad
        )

    def __init__(self, codes, scale, dtype, requires_grad=False):
        self.codes = codes
        self.scale = scale

    def __repr__(self) -> str:
        return f"HALOQuantizedWeight(shape={tuple(self.shape)}, codes={self.codes.dtype}, dtype={self.dtype})"

    def __tensor_flatten__(self):
        return ["codes", "scale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner, dtype, outer_size, outer_stride):
        return HALOQuantizedWeight(inner["codes"], inner["scale"], dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0]
        if func in (aten.detach.default, aten.alias.default):
            return HALOQuantizedWeight(t.codes, t.scale, t.dtype)
        if func is aten.as_strided.default and tuple(args[1]) == tuple(t.shape):
            # FSDP views the all-gather output with the parameter's own shape and contiguous strides
            return HALOQuantizedWeight(t.codes, t.scale, t.dtype)
        raise NotImplementedError(
            f"HALOQuantizedWeight (HQ-FSDP) does not support {func}; only HALO layers may read the all-gathered "
            "weight. Leave the module out of prepare_hq_fsdp or disable hq_fsdp."
        )
