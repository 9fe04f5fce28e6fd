"""The HALO vLLM plugin: registration and which checkpoints its quantization method claims (no engine)."""

from __future__ import annotations

import importlib.metadata

import pytest

pytest.importorskip("vllm")

from optimum_plugin.halo.export import w8a8_quantization_config  # noqa: E402
from optimum_plugin.halo.vllm_plugin import QUANT_METHOD_NAME, register  # noqa: E402


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "halo" and ep.value == "optimum_plugin.halo.vllm_plugin:register" for ep in eps)


def test_register_is_idempotent_and_claims_transform_checkpoints_on_cpu():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.platforms import current_platform

    register()
    register()
    assert QUANTIZATION_METHODS.count(QUANT_METHOD_NAME) == 1
    cls = get_quantization_config(QUANT_METHOD_NAME)
    with_tf = w8a8_quantization_config(["lm_head"], None)
    without_tf = {k: v for k, v in with_tf.items() if k != "transform_config"}
    expect = QUANT_METHOD_NAME if current_platform.is_cpu() else None
    assert cls.override_quantization_method(with_tf, None) == expect
    assert cls.override_quantization_method(with_tf, "compressed-tensors") == expect
    # plain compressed-tensors needs no help; other methods are never claimed
    assert cls.override_quantization_method(without_tf, None) is None
    assert cls.override_quantization_method({"quant_method": "gptq"}, None) is None
    assert cls.override_quantization_method(with_tf, "awq") is None
    # it parses our config like compressed-tensors does, keeping the transforms
    cfg = cls.from_config(dict(with_tf))
    assert cfg.get_name() == QUANT_METHOD_NAME and cfg.transform_config is not None
