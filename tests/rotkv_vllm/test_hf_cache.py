import dataclasses

import pytest
import torch

from rotkv_kernels.rotkv_cache import record_bytes
from rotkv_vllm.calibration import calibrate
from rotkv_vllm.config import RotateKVConfig
from rotkv_vllm.hf_cache import rotkv_cache
from rotkv_vllm.reference import KVMethod, quantized_kv


@pytest.fixture(scope="module")
def tiny_calib(tiny_llama, calib_text):
    model, tok = tiny_llama
    cfg = RotateKVConfig(sink_mode="first", max_sink_tokens=1, center_keys=True, group_size=32)
    return calibrate(model, tok, cfg, text=calib_text, num_sequences=2, seq_len=64, progress=False)


def test_generate_matches_teacher_forced_reference(tiny_llama, tiny_calib):
    """Greedy decoding through the packed cache sees the same K/V as the teacher-forced harness."""
    model, tok = tiny_llama
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    with torch.no_grad(), rotkv_cache(model, tiny_calib) as cache:
        out = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    seq = out.sequences
    assert seq.shape[1] == ids.shape[1] + 12
    with torch.no_grad(), quantized_kv(model, KVMethod.from_config(tiny_calib.config), tiny_calib):
        logits = model(seq).logits[0]
    n = ids.shape[1]
    for i, step_scores in enumerate(out.scores):
        ref = logits[n - 1 + i]
        torch.testing.assert_close(step_scores[0], ref, rtol=2e-3, atol=2e-3)
    # The packed records hold exactly the formula's bytes.
    lay = tiny_calib.layout()
    fmt = tiny_calib.config.scale_format
    per_tok = record_bytes(lay.kv_width, 2, lay.group_size, fmt) + record_bytes(lay.kv_width, 2, lay.value_group_size, fmt)
    assert cache.quantized_nbytes() == per_tok * (seq.shape[1] - 1) * model.config.num_hidden_layers


def test_four_bit_cache_generates_like_fp(smollm2, smol_calib_4bit):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False)
        with rotkv_cache(model, smol_calib_4bit) as cache:
            out = model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=cache)
    assert "Paris" in tok.decode(ref[0, ids.shape[1]:])
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.fixture(scope="module")
def smol_calib_4bit(smollm2, calib_text):
    model, tok = smollm2
    return calibrate(model, tok, RotateKVConfig.for_bits(4), text=calib_text, num_sequences=1, seq_len=256,
                     progress=False)


def test_cache_errors(tiny_llama, tiny_calib):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="calibration="):
        with rotkv_cache(model, None, RotateKVConfig()):
            pass
    with pytest.raises(ValueError, match="pre_rope=False"):
        with rotkv_cache(model, tiny_calib, dataclasses.replace(tiny_calib.config, pre_rope=False)):
            pass
