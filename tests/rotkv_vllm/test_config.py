import json

import pytest

from rotkv_vllm.config import (
    DEFAULT_RECENT_WINDOW,
    KV_CACHE_DTYPES,
    RotateKVConfig,
    RotateKVLayout,
    config_for_cache_dtype,
)


@pytest.mark.parametrize(
    "cfg",
    [
        RotateKVConfig(),
        RotateKVConfig(key_bits=3, value_bits=2, group_size=64, value_group_size=192, center_keys=True,
                       sink_mode="first", max_sink_tokens=2, recent_window=16, boosted_layers=(0, 5),
                       scale_format="fp8", key_clip_ratio=0.9),
    ],
    ids=["default", "everything-set"],
)
def test_json_round_trip(cfg):
    again = RotateKVConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["version"] == 1


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"key_bits": 5}, "key_bits"),
        ({"value_bits": 1}, "value_bits"),
        ({"group_size": 12}, "group_size"),
        ({"value_group_size": 0}, "value_group_size"),
        ({"key_clip_ratio": 1.5}, "key_clip_ratio"),
        ({"sink_mode": "middle"}, "sink_mode"),
        ({"sink_mode": "first", "max_sink_tokens": 0}, "max_sink_tokens"),
        ({"boosted_layers": (1, 1)}, "boosted_layers"),
        ({"scale_format": "bf16"}, "scale_format"),
        ({"version": 2}, "version"),
        ({"recent_window": -1}, "recent_window"),
    ],
)
def test_bad_values_raise_valueerror_naming_the_field(kwargs, word):
    with pytest.raises(ValueError, match=word):
        RotateKVConfig(**kwargs)


def test_unknown_field_rejected():
    with pytest.raises(ValueError, match="unknown"):
        RotateKVConfig.from_dict({"bits": 2})


def test_cache_dtype_names():
    assert config_for_cache_dtype("rotkv3").key_bits == 3
    # key/value presets in vLLM's naming style; every preset keeps the default full-precision recent window
    k3v2 = config_for_cache_dtype("rotkv_k3v2")
    assert (k3v2.key_bits, k3v2.value_bits) == (3, 2)
    assert {config_for_cache_dtype(n).recent_window for n in KV_CACHE_DTYPES} == {DEFAULT_RECENT_WINDOW}
    assert config_for_cache_dtype("rotkv2", recent_window=0).recent_window == 0
    assert RotateKVConfig().recent_window == 0  # calibration configs (and their files) are unchanged
    with pytest.raises(ValueError, match="rotkv2"):
        config_for_cache_dtype("rotkv8")


def test_layout_smollm2_and_llama_tp():
    lay = RotateKVLayout.resolve(RotateKVConfig(), num_kv_heads=3, head_dim=64)
    # keys: groups of 64 inside the 192-wide rotated head group; values: one group per token
    assert (lay.head_group_size, lay.group_width, lay.group_size, lay.value_group_size) == (3, 192, 64, 192)
    # 2 bits over 192 channels: 48 code bytes + per group an fp8 scale and an int zero (2 bytes).
    assert lay.packed_bytes_per_token(2, "fp8") == 48 + 3 * 2
    assert lay.packed_bytes_per_token(2, "fp8", key=False) == 48 + 2
    assert lay.packed_bytes_per_token(2, "fp16", key=False) == 48 + 4
    assert lay.bits_per_element(2, "fp8") == pytest.approx(2 + 16 / 64)
    assert lay.bits_per_element(2, "fp16", key=False) == pytest.approx(2 + 32 / 192)
    tp = RotateKVLayout.resolve(RotateKVConfig(), num_kv_heads=8, head_dim=128, tp_size=2)
    assert (tp.num_kv_heads, tp.head_group_size, tp.group_size, tp.value_group_size) == (4, 4, 64, 128)
    paper = RotateKVLayout.resolve(RotateKVConfig(group_size=192, value_group_size=192), 3, 64)
    assert paper.packed_bytes_per_token(2, "fp16") == 48 + 4


@pytest.mark.parametrize(
    "kwargs, shape, word",
    [
        ({}, (3, 100, 1), "head_dim=100"),
        ({}, (3, 64, 2), "tensor_parallel_size"),
        ({"group_size": 128}, (3, 64, 1), "group_size=128"),
        ({"head_group_size": 2}, (3, 64, 1), "head_group_size=2"),
        ({"value_group_size": 128}, (3, 64, 1), "value_group_size=128"),
    ],
)
def test_layout_errors(kwargs, shape, word):
    heads, dim, tp = shape
    with pytest.raises(ValueError, match=word):
        RotateKVLayout.resolve(RotateKVConfig(**kwargs), heads, dim, tp)
