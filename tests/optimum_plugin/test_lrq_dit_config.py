"""LRQDiTConfig: validation, JSON round trip, the Hugging Face wrappers and the idempotent registration."""

from __future__ import annotations

import json

import pytest

import optimum_plugin.lrq_dit as lrq
from optimum_plugin.lrq_dit import registration
from optimum_plugin.lrq_dit.config import CONFIG_VERSION, LayerPlan, LRQDiTConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _resolved() -> LRQDiTConfig:
    return LRQDiTConfig(
        weight_bits=3,
        act_bits=4,
        rotation="auto",
        rotation_block_size=64,
        modules_to_not_convert=("proj_out*",),
        layers={
            "blocks.0.attn.to_q": LayerPlan("hadamard", 64, 0, True, 2.5),
            "blocks.0.ff.net.2": LayerPlan("outlier_aware", 64, 3, True, 40.0),
            "blocks.0.norm1.linear": LayerPlan("none", 0, 0, False),
        },
    )


@pytest.mark.parametrize("cfg", [LRQDiTConfig(), LRQDiTConfig(weight_bits=8, act_bits=None, weight_quantizer="uniform",
                                                              rotation="none", smooth_alpha=None), _resolved()],
                         ids=["default", "weight-only", "resolved"])
def test_json_roundtrip(cfg):
    s = cfg.to_json()
    again = LRQDiTConfig.from_json(s)
    assert again == cfg
    assert again.to_json() == s
    assert json.loads(s)["version"] == CONFIG_VERSION


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"weight_bits": 2}, "weight_bits"),
        ({"weight_bits": 5}, "weight_bits"),
        ({"weight_bits": True}, "weight_bits"),
        ({"act_bits": 3}, "act_bits"),
        ({"act_bits": 16}, "act_bits"),
        ({"weight_quantizer": "nf4"}, "weight_quantizer"),
        ({"rotation": "random"}, "rotation"),
        ({"fluctuation_threshold": 0.5}, "fluctuation_threshold"),
        ({"rotation_block_size": 3}, "rotation_block_size"),
        ({"greedy_steps": 0}, "greedy_steps"),
        ({"smooth_alpha": 1.5}, "smooth_alpha"),
        ({"eta_grid": ()}, "eta_ratios"),
        ({"clip_upper_grid": (0.01,), "clip_lower_grid": (0.1,)}, "upper quantile"),
        ({"modules_to_not_convert": "proj_out"}, "modules_to_not_convert"),
        ({"calibration_tokens": 4}, "calibration_tokens"),
        ({"version": CONFIG_VERSION + 1}, "version"),
        ({"act_bits": None, "layers": {"a": {"rotation": "hadamard", "block_size": 8}}}, "act_bits"),
    ],
)
def test_bad_values_raise_naming_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        LRQDiTConfig(**kwargs)


def test_bad_layer_plans_and_unknown_fields_raise():
    with pytest.raises(ValueError, match="rotation"):
        LayerPlan(rotation="spin", block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        LayerPlan(rotation="hadamard", block_size=0)
    with pytest.raises(ValueError, match="greedy_steps"):
        LayerPlan(rotation="hadamard", block_size=8, greedy_steps=2)
    with pytest.raises(ValueError, match="unknown LRQDiTConfig fields"):
        LRQDiTConfig.from_dict({"weight_bit": 4})
    with pytest.raises(ValueError, match="unknown LayerPlan fields"):
        LRQDiTConfig.from_dict({"layers": {"x": {"rot": "none"}}})


def test_excludes_uses_fnmatch_on_full_names():
    cfg = LRQDiTConfig(modules_to_not_convert=("proj_out*", "*.norm1.linear"))
    assert cfg.excludes("proj_out_2")
    assert cfg.excludes("transformer_blocks.3.norm1.linear")
    assert not cfg.excludes("transformer_blocks.3.attn1.to_q")


@pytest.mark.parametrize("wrapper", [registration.LRQDiTDiffusersConfig, registration.LRQDiTTransformersConfig])
def test_hf_wrappers_roundtrip_and_carry_quant_method(wrapper):
    cfg = _resolved()
    w = wrapper(cfg)
    d = w.to_dict()
    assert d["quant_method"] == "lrq_dit"
    assert w.quant_method.value == "lrq_dit" and w.quant_method == "lrq_dit"
    again = wrapper.from_dict(json.loads(w.to_json_string()))
    assert again.lrq_config == cfg
    with pytest.raises(ValueError, match="quant_method"):
        wrapper.from_dict({**d, "quant_method": "gptq"})


def test_registration_is_idempotent_and_complete():
    from diffusers.quantizers import auto as dauto
    from transformers.quantizers import auto as tauto

    for _ in range(3):
        lrq.register()
    assert dauto.AUTO_QUANTIZER_MAPPING["lrq_dit"] is registration.LRQDiTDiffusersQuantizer
    assert dauto.AUTO_QUANTIZATION_CONFIG_MAPPING["lrq_dit"] is registration.LRQDiTDiffusersConfig
    assert tauto.AUTO_QUANTIZER_MAPPING["lrq_dit"] is registration.LRQDiTTransformersQuantizer
    assert tauto.AUTO_QUANTIZATION_CONFIG_MAPPING["lrq_dit"] is registration.LRQDiTTransformersConfig
    # diffusers' own dispatch finds us from a config.json dict.
    q = dauto.DiffusersAutoQuantizer.from_config(registration.LRQDiTDiffusersConfig(_resolved()).to_dict(),
                                                 pre_quantized=True)
    assert isinstance(q, registration.LRQDiTDiffusersQuantizer)


def test_registration_refuses_a_foreign_entry(monkeypatch):
    from diffusers.quantizers import auto as dauto

    class Other:
        pass

    monkeypatch.setitem(dauto.AUTO_QUANTIZER_MAPPING, "lrq_dit", Other)
    with pytest.raises(RuntimeError, match="already taken"):
        lrq.register()


def test_other_diffusers_version_fails_loudly(monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers, "__version__", "0.43.0")
    with pytest.raises(RuntimeError, match="0.42.1"):
        lrq.register()


def test_quantizing_at_load_time_is_refused():
    """LRQ-DiT needs calibration: diffusers must not 'quantize on load' a floating-point checkpoint."""
    with pytest.raises(ValueError, match="pre-quantized"):
        registration.LRQDiTDiffusersQuantizer(registration.LRQDiTDiffusersConfig(LRQDiTConfig()), pre_quantized=False)
