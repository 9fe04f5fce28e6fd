import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from rotkv_kernels.hadamard import hadamard_transform
from rotkv_vllm.calibration import (
    CONFIG_FILE,
    TENSORS_FILE,
    calibrate,
    describe_model,
    find_calibration,
    load_calibration,
    save_calibration,
)
from rotkv_vllm.config import RotateKVConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from family_models import FAMILY_NAMES, build_family_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_calib(tiny_llama, calib_text):
    model, tok = tiny_llama
    cfg = RotateKVConfig(sink_mode="none", center_keys=False)
    return calibrate(model, tok, cfg, text=calib_text, num_sequences=3, seq_len=64, progress=False)


def _independent_sums(model, tok, text, n, seq_len, group_width):
    """Rotated pre-RoPE key channel sums, from hidden states instead of hooks."""
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0][: n * seq_len].view(n, seq_len)
    sums = None
    with torch.no_grad():
        for row in ids:
            hs = model(row[None], output_hidden_states=True, use_cache=False).hidden_states
            layer_sums = []
            for i, layer in enumerate(model.model.layers):
                k = layer.self_attn.k_proj(layer.input_layernorm(hs[i]))
                layer_sums.append(hadamard_transform(k, block_size=group_width).sum(dim=(0, 1)).double())
            sums = layer_sums if sums is None else [a + b for a, b in zip(sums, layer_sums)]
    return sums


def test_orders_sort_rotated_channel_sums_within_groups(tiny_llama, calib_text, tiny_calib):
    model, tok = tiny_llama
    lay = tiny_calib.layout()
    assert (lay.head_group_size, lay.group_width) == (2, 64)
    sums = _independent_sums(model, tok, calib_text, 3, 64, lay.group_width)
    for order, mine, ref in zip(tiny_calib.key_orders, tiny_calib.key_channel_sums, sums):
        torch.testing.assert_close(mine.double(), ref, rtol=1e-4, atol=1e-3)
        blocks = order.view(-1, lay.group_width)
        # a permutation of each head group onto itself ...
        base = torch.arange(0, order.numel(), lay.group_width)[:, None]
        assert torch.equal(blocks.sort(dim=1).values, base + torch.arange(lay.group_width))
        # ... that sorts the signed channel sums ascending
        sorted_sums = ref[order].view(-1, lay.group_width)
        assert bool((sorted_sums[:, 1:] >= sorted_sums[:, :-1]).all())


def test_save_load_round_trip_and_find(tmp_path, tiny_calib, tiny_llama):
    save_calibration(tiny_calib, tmp_path)
    again = load_calibration(tmp_path)
    assert again.config == tiny_calib.config
    assert again.head_group_size == tiny_calib.head_group_size
    for a, b in zip(again.key_orders, tiny_calib.key_orders):
        assert torch.equal(a, b)
    for a, b in zip(again.key_means, tiny_calib.key_means):
        assert torch.equal(a, b)
    assert find_calibration(tmp_path) == tmp_path
    assert find_calibration(tmp_path / "nowhere") is None
    again.check_model(tiny_llama[0])


def test_calibration_for_another_model_is_refused(tiny_calib, smollm2):
    with pytest.raises(ValueError, match="recalibrate"):
        tiny_calib.check_model(smollm2[0])


def test_other_weights_same_shapes_refused(tiny_calib, tiny_llama):
    model, _ = tiny_llama
    other = type(model)(model.config).eval()
    with pytest.raises(ValueError, match="other weights"):
        tiny_calib.check_model(other)


def test_corrupt_or_foreign_files(tmp_path, tiny_calib):
    save_calibration(tiny_calib, tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta["format_version"] = 99
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version"):
        load_calibration(tmp_path)
    with pytest.raises(ValueError, match="python -m rotkv_vllm.calibration"):
        load_calibration(tmp_path / "empty")
    # not a permutation (a channel twice)
    bad = [o.clone() for o in tiny_calib.key_orders]
    bad[1][0] = bad[1][1]
    save_calibration(dataclasses.replace(tiny_calib, key_orders=bad), tmp_path)
    with pytest.raises(ValueError, match="permutation within each"):
        load_calibration(tmp_path)
    (tmp_path / TENSORS_FILE).unlink()
    with pytest.raises(ValueError, match="no RotateKV calibration"):
        load_calibration(tmp_path)


def test_centered_calibration_stores_means(tiny_llama, calib_text):
    model, tok = tiny_llama
    cal = calibrate(model, tok, RotateKVConfig(center_keys=True, sink_mode="none"), text=calib_text,
                    num_sequences=2, seq_len=64, progress=False)
    ids = tok(calib_text, return_tensors="pt", add_special_tokens=False).input_ids[0][:128].view(2, 64)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True, use_cache=False).hidden_states
        layer = model.model.layers[1]
        k = layer.self_attn.k_proj(layer.input_layernorm(hs[1]))
    torch.testing.assert_close(cal.key_means[1], k.reshape(-1, k.shape[-1]).mean(0), rtol=1e-4, atol=1e-5)


def test_unsupported_architectures_named():
    from transformers import GPT2Config, MistralConfig

    with pytest.raises(ValueError, match="model_type='gpt2' is not supported: learned absolute positions, no RoPE"):
        describe_model(GPT2Config())
    # a sliding window is the model's mask's business in transformers: calibration takes the model
    assert describe_model(MistralConfig(sliding_window=4096))["model_type"] == "mistral"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_each_family_calibrates_the_key_its_attention_rotates(name, smollm2_dir, calib_text):
    """Key means from the calibration hooks == the mean over the calibration tokens of the pre-RoPE key computed
    from the hidden states by hand: ``k_proj`` (with Qwen2's bias), then the per-head ``k_norm`` of Qwen3 and
    Gemma 3 -- which moves the mean by far more than the tolerance (checked), so keys read at ``k_proj``'s
    output, as rotkv did before, fail here. Gemma 3 and Mistral with sliding-window layers (``window=32``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = build_family_model(name, tok, window=32)
    cal = calibrate(model, tok, RotateKVConfig(center_keys=True, sink_mode="none"), text=calib_text,
                    num_sequences=2, seq_len=64, progress=False)
    ids = tok(calib_text, return_tensors="pt", add_special_tokens=False).input_ids[0][:128].view(2, 64)
    d = describe_model(model)["head_dim"]
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True, use_cache=False).hidden_states
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            k = attn.k_proj(layer.input_layernorm(hs[i]))  # bias included
            raw_mean = k.reshape(-1, k.shape[-1]).mean(0)
            if name in ("qwen3", "gemma3"):
                k = attn.k_norm(k.view(*k.shape[:-1], -1, d)).flatten(-2)
            mean = k.reshape(-1, k.shape[-1]).mean(0)
            torch.testing.assert_close(cal.key_means[i], mean, rtol=1e-4, atol=1e-4)
            if name in ("qwen3", "gemma3"):
                assert float((raw_mean - mean).norm() / mean.norm()) > 0.1


def test_text_sources(tmp_path, tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(model, tok, text="a", text_file="b")
    with pytest.raises(ValueError, match="does not exist"):
        calibrate(model, tok, text_file=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        calibrate(model, tok, text="too short", seq_len=64, progress=False)


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
def test_chunks_open_with_bos_where_the_tokenizer_adds_one(tiny_llama, calib_text, bos):
    """Served text starts with the BOS token where the tokenizer adds one (Gemma's does), so each calibration
    chunk does too; the text tokens stay consecutive across chunks either way."""
    import copy

    model, tok = tiny_llama
    tok = copy.deepcopy(tok)
    tok.add_bos_token = bos
    assert (tok("a").input_ids[0] == tok.bos_token_id) == bos
    seen = []
    handle = model.model.embed_tokens.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        calibrate(model, tok, RotateKVConfig(sink_mode="none", center_keys=False), text=calib_text,
                  num_sequences=3, seq_len=64, progress=False)
    finally:
        handle.remove()
    rows = torch.cat(seen)
    assert rows.shape == (3, 64)
    text_ids = tok(calib_text[:20_000], return_tensors="pt", add_special_tokens=False).input_ids[0]
    if bos:
        assert (rows[:, 0] == tok.bos_token_id).all()
        rows = rows[:, 1:]
    torch.testing.assert_close(rows.flatten(), text_ids[: rows.numel()], rtol=0, atol=0)
