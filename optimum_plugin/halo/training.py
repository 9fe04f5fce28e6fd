"""PEFT and Hugging Face ``Trainer`` glue for HALO.

HALO layers are ``nn.Linear`` subclasses with unchanged parameter names, so the ``Trainer``,
gradient checkpointing (``model.gradient_checkpointing_enable()``: the forward is deterministic,
so the recomputed activations quantize identically) and ``save_pretrained`` work unchanged. What
needs a little care is PEFT LoRA: the base weights are frozen and must be quantized once, the
adapters must stay in higher precision. :func:`prepare_halo_lora` does both in the right order.
"""

from __future__ import annotations

import logging

from torch import nn

from optimum_plugin.halo.apply import apply_halo, halo_modules
from optimum_plugin.halo.config import HALOConfig

__all__ = ["prepare_halo_lora", "halo_summary"]

logger = logging.getLogger(__name__)


def prepare_halo_lora(model: nn.Module, halo_config: HALOConfig, lora_config) -> nn.Module:
    """HALO base layers plus LoRA adapters: ``apply_halo`` then ``peft.get_peft_model``.

    PEFT wraps each targeted :class:`HALOLinear` (an ``nn.Linear``) as the ``base_layer`` of a LoRA
    layer and freezes its weight; the HALO layer then quantizes that frozen weight once (cached
    until it changes in place, e.g. by ``merge_and_unload``) and computes only the input gradient
    in 8 bits. ``lora_A``/``lora_B`` are plain ``nn.Linear`` in the model's dtype.

    Returns:
        the ``PeftModel``.
    Raises:
        ValueError: as :func:`apply_halo`; ImportError without ``peft`` (the ``halo`` extra).
    """
    try:
        from peft import get_peft_model
    except ImportError as e:  # optional dependency
        raise ImportError("prepare_halo_lora needs peft: pip install 'rotkv[halo]'") from e
    apply_halo(model, halo_config)
    peft_model = get_peft_model(model, lora_config)
    frozen = sum(1 for m in halo_modules(peft_model).values() if not m.weight.requires_grad)
    logger.info("HALO + LoRA: %d frozen HALO base layers", frozen)
    return peft_model


def halo_summary(model: nn.Module) -> dict[str, int]:
    """Counts for logs: HALO layers, how many have frozen weights, and trainable parameters."""
    layers = halo_modules(model)
    return {
        "halo_layers": len(layers),
        "frozen_halo_layers": sum(1 for m in layers.values() if not m.weight.requires_grad),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
