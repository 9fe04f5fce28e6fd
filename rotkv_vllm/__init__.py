"""RotateKV: config, calibration, transformers reference cache, and the vLLM plugin."""
