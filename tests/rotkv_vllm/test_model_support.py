"""One model-support list (``rotkv_vllm.model_support``) behind every RotateKV entry point, and
``rotate_values`` meaning the same thing in the reference, the transformers cache and the vLLM runtime."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rotkv_vllm.calibration import RotateKVCalibration, calibrate
from rotkv_vllm.config import RotateKVConfig
from rotkv_vllm.hf_cache import rotkv_cache
from rotkv_vllm.model_support import REFUSED_FAMILIES, SUPPORTED_MODEL_TYPES, describe_model
from rotkv_vllm.reference import KVMethod, quantized_kv
from rotkv_vllm.runtime import RotateKVRuntime, check_served_model

QWEN3_REASON = r"model_type='qwen3' is not supported yet: its attention normalizes each key head \(k_norm\)"


@pytest.fixture(scope="module")
def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).eval()


def test_the_list():
    assert SUPPORTED_MODEL_TYPES == ("llama", "mistral", "qwen2")
    assert set(REFUSED_FAMILIES) == {"qwen3"}


def test_qwen3_refused_by_calibration_reference_cache_and_vllm(tiny_qwen3, smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    with pytest.raises(ValueError, match=QWEN3_REASON):
        describe_model(tiny_qwen3.config)
    with pytest.raises(ValueError, match=QWEN3_REASON):
        calibrate(tiny_qwen3, tok, text="a b c " * 200, num_sequences=1, seq_len=16, progress=False)
    with pytest.raises(ValueError, match=QWEN3_REASON):
        with quantized_kv(tiny_qwen3, "int4"):
            pass
    with pytest.raises(ValueError, match=QWEN3_REASON):
        with rotkv_cache(tiny_qwen3, None, RotateKVConfig(reorder=False, center_keys=False)):
            pass
    with pytest.raises(ValueError, match=r"--kv-cache-dtype rotkv2: " + QWEN3_REASON + r"[\s\S]*--kv-cache-dtype auto"):
        check_served_model(tiny_qwen3.config, "rotkv2")


def test_qwen3_refused_by_the_optimum_quantizer(tiny_qwen3, tmp_path):
    pytest.importorskip("optimum")
    from optimum_plugin.quantizers import RotateKVQuantizer

    tiny_qwen3.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=QWEN3_REASON):
        RotateKVQuantizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("config,needle", [
    ({"model_type": "mistral", "sliding_window": 128}, "sliding-window attention"),
    ({"model_type": "gemma"}, "model_type='gemma' is not supported: RotateKV needs a Llama-architecture attention"),
])
def test_other_refusals_name_the_reason(config, needle):
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    for k, v in config.items():
        setattr(hf, k, v)
    with pytest.raises(ValueError, match=needle):
        describe_model(hf)


# ---- rotate_values ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[True, False], ids=["rotate_values", "no_value_rotation"])
def calib_rv(request, tiny_llama, calib_text):
    model, tok = tiny_llama
    cfg = RotateKVConfig(sink_mode="first", max_sink_tokens=1, center_keys=True, group_size=32,
                         rotate_values=request.param)
    return calibrate(model, tok, cfg, text=calib_text, num_sequences=2, seq_len=64, progress=False)


def test_rotate_values_is_the_same_value_transform_everywhere(tiny_llama, calib_rv: RotateKVCalibration):
    """The vLLM runtime's V records (``paged_write_ref``) and the transformers cache's are the same bytes, with a
    per-head Hadamard (``rotate_values=True``) or none at all (``False``)."""
    from rotkv_kernels.rotkv_paged import alloc_paged_cache, paged_write_ref
    from rotkv_kernels.rotkv_paged_tiles import AttentionTile, read_tile

    model, _ = tiny_llama
    cfg = calib_rv.config
    head_dim = calib_rv.model_info["head_dim"]
    cos = torch.ones(64, head_dim)
    rt = RotateKVRuntime.from_calibration(calib_rv, "rotkv2", dtype=torch.float32, rope=(cos, torch.zeros_like(cos)))
    spec = rt.paged_spec(0)
    assert spec.value_rot_width == (head_dim if cfg.rotate_values else 1)

    gen = torch.Generator().manual_seed(1)
    t, h = 5, spec.num_kv_heads
    value = torch.randn(t, h, head_dim, generator=gen)
    key = torch.randn(t, h, head_dim, generator=gen)
    cache = alloc_paged_cache(spec, 2, 16, torch.float32, fill=0)
    p = rt.kernel_params(0, "cpu")
    paged_write_ref(key, value, torch.arange(1, t + 1), cache.records, spec=spec, positions=torch.arange(1, t + 1),
                    sinks=cache.sinks, rope_cos=p.rope_cos, rope_sin=p.rope_sin, key_perm=p.key_perm,
                    key_mean=p.key_mean)
    vllm_v = cache.records[0, 1:t + 1, spec.key_bytes:spec.key_bytes + spec.value_bytes]

    # The transformers cache's pages hold the same V bytes for the V the model produced (layer 0's v_proj output).
    seen = []
    hook = model.model.layers[0].self_attn.v_proj.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad(), rotkv_cache(model, calib_rv, block_size=16, attention_impl="torch") as hf:
            model(torch.arange(5, 5 + t)[None], past_key_values=hf, use_cache=True)
    finally:
        hook.remove()
    assert hf.runtime.paged_spec(0).value_rot_width == spec.value_rot_width
    model_v = seen[0].view(t, h, head_dim)
    check = alloc_paged_cache(spec, 2, 16, torch.float32, fill=0)
    paged_write_ref(key, model_v, torch.arange(1, t + 1), check.records, spec=spec, positions=torch.arange(1, t + 1),
                    sinks=check.sinks, rope_cos=p.rope_cos, rope_sin=p.rope_sin, key_perm=p.key_perm,
                    key_mean=p.key_mean)
    kv = slice(spec.key_bytes, spec.key_bytes + spec.value_bytes)
    assert torch.equal(hf.layers[0].pages.records[0, :t, kv], check.records[0, 1:t + 1, kv])
    assert not torch.equal(vllm_v, check.records[0, 1:t + 1, kv])  # (another V gives other bytes)

    # read back: with no rotation the stored basis is the original one; with it, a per-head Hadamard of V
    tile = AttentionTile(tok_idx=torch.zeros(1, 1, dtype=torch.int64), q_valid=torch.ones(1, 1, dtype=torch.bool),
                         ctx_blk=torch.zeros(1, t + 1, dtype=torch.int64), ctx_off=torch.arange(t + 1).view(1, -1),
                         ctx_valid=torch.ones(1, t + 1, dtype=torch.bool), mask=torch.ones(1, 1, 1, t + 1, dtype=torch.bool),
                         first_blk=torch.zeros(1, dtype=torch.int64))
    _, v_read = read_tile(cache.records, cache.sinks, tile, rt.cpu_tables(0))
    v_read = v_read[0, 1:]
    if cfg.rotate_values:
        from rotkv_kernels.hadamard import hadamard_transform

        v_read = hadamard_transform(v_read, block_size=head_dim, inverse=True)
    rel = float((v_read - value).norm() / value.norm())
    assert rel < 0.6  # 2-bit values, decoded in the basis they were written in


def test_reference_and_cache_agree_with_and_without_value_rotation(tiny_llama, calib_rv):
    model, tok = tiny_llama
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    with torch.no_grad(), rotkv_cache(model, calib_rv) as cache:
        cached = model(ids, past_key_values=cache, use_cache=True).logits[0]
    with torch.no_grad(), quantized_kv(model, KVMethod.from_config(calib_rv.config), calib_rv):
        ref = model(ids).logits[0]
    torch.testing.assert_close(cached, ref, rtol=2e-3, atol=2e-3)
    if not calib_rv.config.rotate_values:
        # and it is not the rotated variant: the value transform matters at 2 bits
        other = dataclasses.replace(calib_rv, config=dataclasses.replace(calib_rv.config, rotate_values=True))
        with torch.no_grad(), quantized_kv(model, KVMethod.from_config(other.config), other):
            rotated = model(ids).logits[0]
        assert not torch.allclose(rotated, ref, rtol=2e-3, atol=2e-3)
