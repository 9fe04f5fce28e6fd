"""vLLM general plugin for HALO W8A8 checkpoints: the CPU path of compressed-tensors Hadamard transforms.

HALO's W8A8 export (:func:`optimum_plugin.halo.export.save_w8a8`) is a standard compressed-tensors
checkpoint with an online input transform. On GPUs vLLM 0.32 serves it with no plugin. On its CPU
platform the transform's dense matmul goes through ``cpu_unquantized_gemm(layer, ...)``, which calls
``layer.cpu_linear`` -- an attribute vLLM's ``UnquantizedLinearMethod`` sets on linear layers but its
``HadamardTransform`` module never gets -- so the first forward fails with
``'HadamardTransform' object has no attribute 'cpu_linear'``.

``register()`` (entry point ``vllm.general_plugins: halo``) registers the quantization method
``halo_compressed_tensors``: the compressed-tensors method itself, which claims compressed-tensors
checkpoints that carry a ``transform_config`` only on the CPU platform (through vLLM's
``override_quantization_method`` hook) and gives each transform module a ``cpu_linear`` that is
``F.linear``; and it registers the ``halo_w8a8`` model type of those checkpoints with transformers'
``AutoConfig`` (:mod:`optimum_plugin.halo.w8a8_config`), which vLLM reads configurations through.
Everything else -- weight loading, the int8 GEMM, dynamic per-token activation
quantization -- is vLLM's own compressed-tensors code. It is safe to call more than once.
"""

from __future__ import annotations

import logging

__all__ = ["register", "QUANT_METHOD_NAME"]

logger = logging.getLogger(__name__)

QUANT_METHOD_NAME = "halo_compressed_tensors"


def register() -> None:
    """Register the ``halo_compressed_tensors`` quantization method with vLLM (idempotent)."""
    from vllm.model_executor.layers.quantization import register_quantization_config

    from optimum_plugin.halo._vllm_quant import QUANT_METHOD_NAME as name, HALOCompressedTensorsConfig
    from optimum_plugin.halo.w8a8_config import register_config

    assert name == QUANT_METHOD_NAME
    # re-registering overwrites the same entry, so repeated loads in each vLLM process are harmless
    register_quantization_config(QUANT_METHOD_NAME)(HALOCompressedTensorsConfig)
    # W8A8 exports are typed "halo_w8a8" so that transformers cannot load them without their transforms;
    # vLLM reads them as their base model once the type is known (optimum_plugin.halo.w8a8_config).
    register_config()
    logger.debug("rotkv HALO: registered vLLM quantization method %r", QUANT_METHOD_NAME)
