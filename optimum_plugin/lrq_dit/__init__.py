"""LRQ-DiT: Twin-Log weights and adaptive rotations for diffusion transformers, as a diffusers quantization config.

    import optimum_plugin.lrq_dit as lrq                      # registers quant_method "lrq_dit" (idempotent)
    pipe = DiTPipeline.from_pretrained(folder)
    cfg = lrq.quantize_pipeline(pipe, lrq.LRQDiTConfig(weight_bits=4, act_bits=8), prompts=[0, 1, 2, 3])
    pipe.save_pretrained(out)                                  # packed codes + quantization_config
    DiTPipeline.from_pretrained(out)                           # loads packed, dequantizes per layer at run time

See ``quantizer.py`` for the procedure, ``rotation.py`` for the Adaptive Rotation Scheme and
``rotkv_kernels.twin_log`` for Twin-Log quantization.
"""

from .calibration import ActivationRecorder, LayerStats, calibrate_pipeline, target_linears
from .config import LayerPlan, LRQDiTConfig
from .modules import LRQLinear
from .quantizer import quantize_, quantize_linear, quantize_pipeline
from .registration import register

register()

__all__ = [
    "ActivationRecorder",
    "LRQDiTConfig",
    "LRQLinear",
    "LayerPlan",
    "LayerStats",
    "calibrate_pipeline",
    "quantize_",
    "quantize_linear",
    "quantize_pipeline",
    "register",
    "target_linears",
]
