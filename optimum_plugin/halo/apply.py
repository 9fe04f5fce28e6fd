"""One entry point: ``apply_halo(model, config)`` swaps ``nn.Linear`` layers for :class:`HALOLinear`."""

from __future__ import annotations

import logging

from torch import nn

from optimum_plugin.halo.config import HALOConfig
from optimum_plugin.halo.linear import HALOLinear

__all__ = ["apply_halo", "remove_halo", "halo_modules", "get_halo_config", "is_adapter_module"]

logger = logging.getLogger(__name__)

_CONFIG_ATTR = "_halo_config"
# PEFT keeps adapter layers under these names; adapters stay in higher precision.
_ADAPTER_PREFIXES = ("lora_",)


def is_adapter_module(name: str) -> bool:
    """Whether a qualified module name lies inside a PEFT adapter (``...lora_A.default``)."""
    return any(part.startswith(_ADAPTER_PREFIXES) for part in name.split("."))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def halo_modules(model: nn.Module) -> dict[str, HALOLinear]:
    """The HALO layers of a model, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, HALOLinear)}


def get_halo_config(model: nn.Module) -> HALOConfig | None:
    """The config ``apply_halo`` used on this model, or None."""
    return getattr(model, _CONFIG_ATTR, None)


def apply_halo(model: nn.Module, config: HALOConfig) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`HALOLinear` sharing its parameters.

    Skipped: modules matching ``config.skip_modules`` (``lm_head`` by default) and PEFT adapter layers
    (``lora_A``/``lora_B``), which stay in higher precision. Call it before ``fully_shard`` and either
    before or after ``peft.get_peft_model``. Every layer is checked before any is replaced.

    Returns:
        the same ``model``.
    Raises:
        ValueError: the model already has HALO layers, no layer would be converted, or a layer's
            ``in_features`` has no Hadamard matrix for this config (the message names the layer).
    """
    if not isinstance(config, HALOConfig):
        raise ValueError(f"config must be a HALOConfig, got {type(config).__name__}")
    if halo_modules(model):
        raise ValueError("the model already has HALO layers; call remove_halo(model) before applying another config")
    targets = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        if config.skips(name) or is_adapter_module(name):
            continue
        config.check_in_features(mod.in_features, name)
        targets.append(name)
    if not targets:
        raise ValueError(
            f"apply_halo found no nn.Linear to convert (skip_modules={list(config.skip_modules)}); "
            "check the model and the skip patterns"
        )
    for name in targets:
        _set_submodule(model, name, HALOLinear.from_linear(model.get_submodule(name), config, name))
    setattr(model, _CONFIG_ATTR, config)
    logger.info("HALO level %d %s: converted %d linear layers", config.level, config.dtype, len(targets))
    return model


def remove_halo(model: nn.Module) -> nn.Module:
    """Swap every :class:`HALOLinear` back to ``nn.Linear`` (same parameters), in place."""
    for name, mod in list(halo_modules(model).items()):
        _set_submodule(model, name, mod.to_linear())
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    return model
