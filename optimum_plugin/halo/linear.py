"""`HALOLinear`: an ``nn.Linear`` whose matmuls (forward and backward) run through HALO."""

from __future__ import annotations

import torch
from torch import nn

from optimum_plugin.halo.config import HALOConfig
from optimum_plugin.halo.functional import halo_linear, quantize_weight
from optimum_plugin.halo.quantized_weight import HALOQuantizedWeight

__all__ = ["HALOLinear"]


class HALOLinear(nn.Linear):
    """Drop-in ``nn.Linear`` with HALO's 8-bit forward and backward.

    Parameters keep their names, shapes and dtypes (``weight`` ``(out, in)``, ``bias`` ``(out,)``), so
    state dicts, optimizers, PEFT and FSDP see an ordinary linear layer. Two cases skip quantizing
    the weight on every call:

    - a frozen weight (``requires_grad=False``, e.g. the base layer under PEFT LoRA) is rotated and
      quantized once; the cache is keyed on the tensor's storage, version counter and a float64 sum,
      so an in-place update (``merge_and_unload``, ``load_state_dict``) invalidates it;
    - under HQ-FSDP the all-gathered weight already *is* the quantized ``Q(rot W)``
      (:class:`optimum_plugin.halo.quantized_weight.HALOQuantizedWeight`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        halo_config: HALOConfig,
    ) -> None:
        if not isinstance(halo_config, HALOConfig):
            raise ValueError(f"halo_config must be a HALOConfig, got {type(halo_config).__name__}")
        halo_config.check_in_features(in_features)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.halo_config = halo_config
        self._frozen_key = None
        self._frozen_q: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, halo_config: HALOConfig, name: str = "layer") -> "HALOLinear":
        """A HALOLinear that shares ``linear``'s parameter objects (no copy)."""
        halo_config.check_in_features(linear.in_features, name)
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  halo_config=halo_config)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's parameter objects."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def _quantized_weight(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w = self.weight
        if isinstance(w, HALOQuantizedWeight):
            return w.codes, w.scale
        if w.requires_grad:
            return None, None
        # In-place edits through `.data` (PEFT's merge does `weight.data += delta`) bypass the version
        # counter, so the key also holds a float64 sum of the weight: one read pass per call, against
        # the rotation + quantization passes it saves.
        key = (w.data_ptr(), w._version, w.dtype, w.device, float(w.detach().sum(dtype=torch.float64)))
        if self._frozen_key != key:
            with torch.no_grad():
                self._frozen_q = quantize_weight(w, self.halo_config)
            self._frozen_key = key
        return self._frozen_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_q, w_s = self._quantized_weight()
        return halo_linear(x, self.weight, self.bias, self.halo_config, w_q, w_s)

    def extra_repr(self) -> str:
        c = self.halo_config
        rot = "none" if not c.rotates else (c.hadamard if c.hadamard == "full" else f"block{c.hadamard_block_size}")
        return f"{super().extra_repr()}, level={c.level}, dtype={c.dtype}, granularity={c.granularity}, hadamard={rot}"
