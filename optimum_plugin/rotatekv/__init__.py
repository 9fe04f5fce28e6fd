"""RotateKV's Optimum face (the method itself lives in ``rotkv_vllm``)."""

from optimum_plugin.rotatekv.optimum_quantizer import RotateKVQuantizer, load_rotkv

__all__ = ["RotateKVQuantizer", "load_rotkv"]
