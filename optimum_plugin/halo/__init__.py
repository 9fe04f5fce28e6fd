"""HALO: Hadamard-assisted INT8/FP8 training and fine-tuning for transformers models, exported for vLLM.

    from optimum_plugin.halo import HALOConfig, apply_halo, save_w8a8
    apply_halo(model, HALOConfig(level=2, dtype="int8"))   # every nn.Linear but lm_head -> HALOLinear
    ...train (Trainer, PEFT LoRA, FSDP2)...
    save_w8a8(model, "out-w8a8", tokenizer)                # compressed-tensors W8A8 for vLLM
"""

from optimum_plugin.halo.apply import apply_halo, get_halo_config, halo_modules, remove_halo
from optimum_plugin.halo.config import HALO_CONFIG_VERSION, HALOConfig
from optimum_plugin.halo.export import load_w8a8, save_merged, save_w8a8
from optimum_plugin.halo.fsdp import prepare_hq_fsdp
from optimum_plugin.halo.functional import HALOLinearFunction, halo_linear
from optimum_plugin.halo.linear import HALOLinear
from optimum_plugin.halo.training import prepare_halo_lora

__all__ = [
    "HALOConfig",
    "HALO_CONFIG_VERSION",
    "HALOLinear",
    "HALOLinearFunction",
    "halo_linear",
    "apply_halo",
    "remove_halo",
    "halo_modules",
    "get_halo_config",
    "prepare_halo_lora",
    "prepare_hq_fsdp",
    "save_merged",
    "save_w8a8",
    "load_w8a8",
]
