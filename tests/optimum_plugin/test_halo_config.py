"""HALOConfig: validation with clear errors, JSON round-trip, module matching, width checks."""

from __future__ import annotations

import json

import pytest

from optimum_plugin.halo.config import HALO_CONFIG_VERSION, HALOConfig


def test_defaults():
    c = HALOConfig()
    assert (c.level, c.dtype, c.granularity, c.hadamard) == (1, "int8", "row", "full")
    assert c.skip_modules == ("lm_head",) and c.version == HALO_CONFIG_VERSION


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(level=0, dtype="fp8_e4m3", granularity="tensor"),
        dict(level=2, hadamard="block", hadamard_block_size=128, token_block_size=256, skip_modules=["lm_head", "*.mlp.*"],
             backend="emulated", hq_fsdp=True),
    ],
)
def test_round_trip(kw):
    c = HALOConfig(**kw)
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON types only
    assert HALOConfig.from_dict(d) == c
    assert HALOConfig.from_json(c.to_json()) == c
    assert isinstance(HALOConfig.from_json(c.to_json()).skip_modules, tuple)


@pytest.mark.parametrize(
    "kw, arg",
    [
        (dict(level=3), "level"),
        (dict(level=True), "level"),
        (dict(dtype="int4"), "dtype"),
        (dict(dtype="fp8_e5m2"), "dtype"),
        (dict(granularity="group"), "granularity"),
        (dict(hadamard="random"), "hadamard"),
        (dict(hadamard_block_size=100), "hadamard_block_size"),
        (dict(token_block_size=0), "token_block_size"),
        (dict(skip_modules="lm_head"), "skip_modules"),
        (dict(skip_modules=["lm_head", ""]), "skip_modules"),
        (dict(backend="cutlass"), "backend"),
        (dict(hq_fsdp="yes"), "hq_fsdp"),
        (dict(version=2), "version"),
    ],
)
def test_bad_values_name_the_argument(kw, arg):
    with pytest.raises(ValueError, match=arg):
        HALOConfig(**kw)


def test_from_dict_rejects_unknown_fields():
    d = HALOConfig().to_dict()
    d["bits"] = 8
    with pytest.raises(ValueError, match="unknown HALOConfig fields.*bits"):
        HALOConfig.from_dict(d)


def test_skip_patterns_match_names_and_last_component():
    c = HALOConfig(skip_modules=["lm_head", "*.mlp.down_proj"])
    assert c.skips("lm_head") and c.skips("model.lm_head")
    assert c.skips("model.layers.3.mlp.down_proj")
    assert not c.skips("model.layers.3.mlp.up_proj") and not c.skips("model.layers.0.self_attn.q_proj")


def test_in_features_checks():
    HALOConfig().check_in_features(576)  # 36 * 16
    HALOConfig().check_in_features(1536)  # 12 * 128
    HALOConfig(level=0).check_in_features(100)  # no rotation, any width
    with pytest.raises(ValueError, match="proj.*in_features=100.*hadamard='block'"):
        HALOConfig().check_in_features(100, "proj")
    with pytest.raises(ValueError, match="hadamard_block_size=64 does not divide in_features=100"):
        HALOConfig(hadamard="block").check_in_features(100)
    HALOConfig(hadamard="block", hadamard_block_size=12).check_in_features(36)
