"""vLLM classes behind :mod:`optimum_plugin.halo.vllm_plugin` (imports vLLM; loaded by ``register()``).

Module-level so that vLLM can pickle the quantization config into its engine and worker processes.
"""

from __future__ import annotations

import torch.nn.functional as F
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.layers.quantization.compressed_tensors.transform.linear import (
    CompressedTensorsLinearTransformMethod,
)
from vllm.model_executor.layers.quantization.compressed_tensors.transform.module import HadamardTransform
from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED
from vllm.platforms import current_platform

QUANT_METHOD_NAME = "halo_compressed_tensors"


def _dense_linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


class HALOCPUTransformMethod(CompressedTensorsLinearTransformMethod):
    """compressed-tensors' transform method with the transform's dense GEMM wired up on the CPU
    (vLLM 0.32's CPU GEMM dispatch calls ``layer.cpu_linear``, which ``HadamardTransform`` lacks)."""

    def process_weights_after_loading(self, layer):
        super().process_weights_after_loading(layer)
        for sub in layer.children():
            if isinstance(sub, HadamardTransform) and not hasattr(sub, "cpu_linear"):
                sub.cpu_linear = _dense_linear


# vLLM picks a layer's weight loader by the quant method's class name; ours loads like its parent (v2).
if HALOCPUTransformMethod.__name__ not in WEIGHT_LOADER_V2_SUPPORTED:
    WEIGHT_LOADER_V2_SUPPORTED.append(HALOCPUTransformMethod.__name__)


class HALOCompressedTensorsConfig(CompressedTensorsConfig):
    """compressed-tensors, claiming checkpoints that carry online transforms on the CPU platform."""

    def get_name(self) -> str:
        return QUANT_METHOD_NAME

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        if not current_platform.is_cpu():
            return None
        if not isinstance(hf_quant_cfg, dict) or hf_quant_cfg.get("quant_method") != "compressed-tensors":
            return None
        if not hf_quant_cfg.get("transform_config"):
            return None
        if user_quant not in (None, "compressed-tensors", QUANT_METHOD_NAME):
            return None
        return QUANT_METHOD_NAME

    def get_quant_method(self, layer, prefix):
        method = super().get_quant_method(layer, prefix)
        if type(method) is CompressedTensorsLinearTransformMethod:
            return HALOCPUTransformMethod(method.quant_method, method.input_tfms, method.output_tfms)
        return method
