"""Export round-trips: the merged bf16 checkpoint and the compressed-tensors W8A8 checkpoint.

The W8A8 checkpoint computes ``Q_tok(x R^T) Q_ch(W R^T)^T``, which is HALO's int8 forward with row
granularity: loaded back with :func:`load_w8a8` it must reproduce the HALO model's logits up to the
rare rounding-boundary flips between two float32 evaluations of ``x R^T`` (dense transform matrix vs
the two-factor GEMMs); each flip moves one code by one step, so we allow a relative change of 1e-3.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from optimum_plugin.halo.apply import apply_halo, halo_modules, remove_halo
from optimum_plugin.halo.config import HALOConfig
from optimum_plugin.halo.export import TRANSFORM_SCHEME, load_w8a8, save_merged, save_w8a8
from optimum_plugin.halo.functional import hadamard_rotate


def tiny_llama(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).float().eval()


IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_merged_bf16_round_trip(tmp_path):
    model = apply_halo(tiny_llama(), HALOConfig(level=2))
    out = save_merged(model, tmp_path / "merged")
    assert halo_modules(model)  # the model passed in keeps its HALO layers
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert not halo_modules(loaded)
    ref = remove_halo(tiny_llama()).to(torch.bfloat16)
    for n, p in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[n], p), n
    assert HALOConfig.from_json((out / "halo_config.json").read_text()) == HALOConfig(level=2)


@pytest.mark.parametrize("tie", [True, False])
def test_w8a8_checkpoint_layout(tmp_path, tie):
    model = apply_halo(tiny_llama(tie), HALOConfig(level=1))
    out = save_w8a8(model, tmp_path / "w8a8")
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "int-quantized"
    assert q["ignore"] == ["lm_head"]
    g = q["config_groups"]["group_0"]
    assert g["weights"]["strategy"] == "channel" and g["input_activations"]["dynamic"] is True
    assert q["transform_config"]["config_groups"][TRANSFORM_SCHEME]["apply"][0]["location"] == "input"
    t = load_file(str(out / "model.safetensors"))
    assert ("lm_head.weight" in t) != tie
    down = "model.layers.0.mlp.down_proj"
    w, s, m = t[f"{down}.weight"], t[f"{down}.weight_scale"], t[f"{down}.{TRANSFORM_SCHEME}_input.weight"]
    assert w.dtype == torch.int8 and w.shape == (64, 192) and s.shape == (64, 1) and m.shape == (192, 192)
    # M = sqrt(b) R^T: entries +-1, and x @ M / sqrt(b) is HALO's rotation (192 = 12*16 is not symmetric)
    assert bool((m.float().abs() == 1).all())
    x = torch.randn(5, 192)
    torch.testing.assert_close(x @ m.float() / math.sqrt(192), hadamard_rotate(x), rtol=1e-5, atol=1e-5)
    # the stored codes dequantize to W R^T within half a step
    wt = hadamard_rotate(model.model.layers[0].mlp.down_proj.weight.detach())
    assert bool(((w.float() * s - wt).abs() <= s / 2 * (1 + 1e-5) + 1e-6).all())


def test_w8a8_reproduces_halo_forward(tmp_path):
    model = apply_halo(tiny_llama(), HALOConfig(level=1))
    # float32 storage for embeddings and norms isolates the int8 maths (the default stores them in bf16)
    out = save_w8a8(model, tmp_path / "w8a8", dtype=torch.float32)
    loaded = load_w8a8(out)
    with torch.no_grad():
        halo_logits = model(input_ids=IDS).logits
        w8a8_logits = loaded(input_ids=IDS).logits
        fp_logits = remove_halo(tiny_llama())(input_ids=IDS).logits
    assert _rel(w8a8_logits, halo_logits) < 1e-3
    assert _rel(w8a8_logits, fp_logits) < 0.05  # and it is the model, up to int8 noise


def test_w8a8_block_and_unrotated_variants(tmp_path):
    model = apply_halo(tiny_llama(), HALOConfig(level=1, hadamard="block", hadamard_block_size=16))
    with torch.no_grad():
        fp_logits = remove_halo(tiny_llama())(input_ids=IDS).logits
    blk = save_w8a8(model, tmp_path / "blk", hadamard="block", block_size=16)
    q = json.loads((blk / "config.json").read_text())["quantization_config"]
    assert q["transform_config"]["config_groups"][TRANSFORM_SCHEME]["head_dim"] == 16
    none = save_w8a8(model, tmp_path / "none", hadamard="none")
    assert "transform_config" not in json.loads((none / "config.json").read_text())["quantization_config"]
    with torch.no_grad():
        for path in (blk, none):
            assert _rel(load_w8a8(path)(input_ids=IDS).logits, fp_logits) < 0.05


def test_export_errors(tmp_path):
    model = apply_halo(tiny_llama(), HALOConfig(level=1))
    with pytest.raises(ValueError, match="hadamard"):
        save_w8a8(model, tmp_path / "x", hadamard="random")
    with pytest.raises(ValueError, match="hadamard_block_size=40 does not divide"):
        save_w8a8(model, tmp_path / "x", hadamard="block", block_size=40)
    save_merged(model, tmp_path / "merged")
    with pytest.raises(ValueError, match="not a compressed-tensors int-quantized"):
        load_w8a8(tmp_path / "merged")


def test_w8a8_linear_fast_and_dense_transform_paths():
    """A stored matrix equal to our Hadamard runs as the two-factor rotation; any other one densely."""
    from optimum_plugin.halo.export import W8A8Linear
    from rotkv_kernels.hadamard import hadamard_matrix
    from rotkv_kernels.lowp_matmul import lowp_matmul, quantize_lowp

    torch.manual_seed(0)
    wq, ws = quantize_lowp(torch.randn(8, 192), "int8", "row")
    x = torch.randn(5, 192)
    had = W8A8Linear(wq, ws, hadamard_matrix(192, normalized=False).T.contiguous())
    assert had.hadamard_block == 192
    q, s = quantize_lowp(hadamard_rotate(x), "int8", "row")
    assert torch.equal(had(x), lowp_matmul(q, s, wq, ws))
    other = torch.linalg.qr(torch.randn(192, 192))[0] * math.sqrt(192)
    dense = W8A8Linear(wq, ws, other)
    assert dense.hadamard_block is None
    q, s = quantize_lowp(x @ (other / math.sqrt(192)), "int8", "row")
    assert _rel(dense(x), lowp_matmul(q, s, wq, ws)) < 1e-3  # float32 order only (module docstring)
    with pytest.raises(ValueError, match="int8 weight"):
        W8A8Linear(torch.randn(8, 192), ws, None)
