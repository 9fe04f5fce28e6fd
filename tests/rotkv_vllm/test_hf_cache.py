"""The transformers RotateKV cache: generate, padding, beam search, crop and its byte count.

Oracle: ``rotkv_vllm.reference.quantized_kv`` (teacher-forced, the same records' maths in PyTorch, every K/V
dequantized each forward). The cache computes the same attention through the paged kernels, so logits agree to
fp32 rounding: the bound 2e-3 on logits of size ~10 is ~1e3 times the observed differences (~1e-6) and far below
what one wrong token's K/V moves them (a changed sink or a record read at a wrong position moves logits by >1e-2
on this random model, checked by ``test_a_wrong_position_is_seen``).
"""

import dataclasses
import math

import pytest
import torch

from rotkv_kernels.rotkv_cache import record_bytes
from rotkv_kernels.rotkv_paged_cpu import cpu_kernels_available
from rotkv_vllm.calibration import calibrate
from rotkv_vllm.config import RotateKVConfig
from rotkv_vllm.hf_cache import RotateKVCache, register_rotkv_attention, rotkv_cache
from rotkv_vllm.reference import KVMethod, quantized_kv

# The C++ kernels are built by scripts/setup.sh; "torch" is the vLLM backend's PyTorch CPU path.
IMPLS = ["cpu", "torch"] if cpu_kernels_available() else ["torch"]
TOL = dict(rtol=2e-3, atol=2e-3)


@pytest.fixture(scope="module")
def tiny_calib(tiny_llama, calib_text):
    model, tok = tiny_llama
    cfg = RotateKVConfig(sink_mode="first", max_sink_tokens=1, center_keys=True, group_size=32)
    return calibrate(model, tok, cfg, text=calib_text, num_sequences=2, seq_len=64, progress=False)


def _reference_logits(model, calib, ids, attention_mask=None):
    with torch.no_grad(), quantized_kv(model, KVMethod.from_config(calib.config), calib):
        return model(ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("impl", IMPLS)
def test_generate_matches_teacher_forced_reference(tiny_llama, tiny_calib, impl):
    """Greedy decoding through the packed cache sees the same K/V as the teacher-forced harness."""
    model, tok = tiny_llama
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    with torch.no_grad(), rotkv_cache(model, tiny_calib, attention_impl=impl) as cache:
        out = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    assert model.config._attn_implementation != "rotkv"  # restored
    seq = out.sequences
    assert seq.shape[1] == ids.shape[1] + 12
    logits = _reference_logits(model, tiny_calib, seq)[0]
    n = ids.shape[1]
    for i, step_scores in enumerate(out.scores):
        torch.testing.assert_close(step_scores[0], logits[n - 1 + i], **TOL)
    # The pages: every layer holds ceil(L / block_size) pages of block_size records of C bytes + the sink area.
    lay, fmt = tiny_calib.layout(), tiny_calib.config.scale_format
    c = record_bytes(lay.kv_width, 2, lay.group_size, fmt) + record_bytes(lay.kv_width, 2, lay.value_group_size, fmt)
    c += c % 2
    stored = seq.shape[1] - 1  # the last token is never fed back
    pages = math.ceil(stored / cache.block_size)
    page = cache.block_size * c + 1 * 2 * lay.kv_width * 4  # one fp32 sink token (K and V)
    rows = 2 * 8 + 8 * pages  # lengths, left padding (int64 [1]) and the block table (int64 [1, pages])
    assert cache.quantized_nbytes() == pages * page * model.config.num_hidden_layers + rows


def _storages(obj, seen_objs, found, skip) -> None:
    """Collect the storage of every tensor reachable from ``obj`` (attributes, lists, tuples, dicts)."""
    if id(obj) in seen_objs or any(obj is s for s in skip):
        return
    seen_objs.add(id(obj))
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        found[st.data_ptr()] = max(found.get(st.data_ptr(), 0), st.nbytes())
        return
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = list(vars(obj).values())
    else:
        return
    for x in items:
        _storages(x, seen_objs, found, skip)


def test_quantized_nbytes_is_every_tensor_the_cache_holds(tiny_llama, tiny_calib):
    """Walk everything the cache object reaches and sum its tensors' storages: that is ``quantized_nbytes()``, and
    no K/V in full precision is among them (the largest storages are the uint8 pools)."""
    model, tok = tiny_llama
    ids = tok(["A short one", "and a longer second prompt of several words"], return_tensors="pt", padding=True,
              padding_side="left")
    with torch.no_grad(), rotkv_cache(model, tiny_calib) as cache:
        model.generate(**ids, max_new_tokens=20, do_sample=False, past_key_values=cache, pad_token_id=0)
        found: dict[int, int] = {}
        # The runtime (RoPE tables, key orders) is a model constant shared by every cache of the model, like the
        # model config: not the cache's.
        _storages(cache, set(), found, skip=(cache.runtime, cache.model_config, cache._rotary))
    assert sum(found.values()) == cache.quantized_nbytes() > 0
    pools = [layer.pages.raw for layer in cache.layers]
    assert all(p.dtype == torch.uint8 for p in pools)
    assert sum(found.values()) - sum(p.numel() for p in pools) < 1024  # the rest is per-row int64 state
    # and the pools are small: < 0.5 of what an fp32 DynamicCache holds for the same tokens (2-bit records of
    # ~2.6 bits/element plus a fp32 sink area per page, pages of block_size tokens)
    tokens = int(cache.lengths.sum())
    fp32_dynamic = tokens * 2 * tiny_calib.layout().kv_width * 4 * model.config.num_hidden_layers
    assert cache.quantized_nbytes() < 0.5 * fp32_dynamic * cache.block_size / 64 or tokens < 64


@pytest.mark.parametrize("impl", IMPLS)
def test_left_padded_batch_matches_each_prompt_alone(tiny_llama, tiny_calib, impl):
    """A left-padded batch decodes each row as that prompt alone does (padding columns are not stored; RoPE is
    re-applied at each row's own positions)."""
    model, tok = tiny_llama
    prompts = ["Hello", "The tower is 324 metres tall, about the same height as"]
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), rotkv_cache(model, tiny_calib, attention_impl=impl) as cache:
        both = model.generate(**batch, past_key_values=cache, **greedy)
    assert cache.left_padding.tolist() == (batch.attention_mask == 0).sum(1).tolist()
    width = batch.input_ids.shape[1]
    for r, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad(), rotkv_cache(model, tiny_calib, attention_impl=impl) as c1:
            alone = model.generate(ids, past_key_values=c1, **greedy)
        assert torch.equal(both.sequences[r, width:], alone.sequences[0, ids.shape[1]:])
        for s_both, s_alone in zip(both.scores, alone.scores):
            torch.testing.assert_close(s_both[r], s_alone[0], rtol=1e-4, atol=1e-4)


def test_beam_search_scores_match_the_reference(tiny_llama, tiny_calib):
    """Beam search reorders the cache's rows every step; the returned beams' scores are the reference's
    log-probabilities of those exact sequences (a row holding another beam's history would not be)."""
    model, tok = tiny_llama
    ids = tok("Beam search over a quantized cache", return_tensors="pt").input_ids
    n = ids.shape[1]
    with torch.no_grad(), rotkv_cache(model, tiny_calib) as cache:
        out = model.generate(ids, max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False,
                             early_stopping=False, length_penalty=0.0, pad_token_id=0, past_key_values=cache,
                             return_dict_in_generate=True, output_scores=True)
    for seq, score in zip(out.sequences, out.sequences_scores):
        logp = _reference_logits(model, tiny_calib, seq[None])[0].log_softmax(-1)
        want = sum(float(logp[n - 1 + i, seq[n + i]]) for i in range(seq.shape[0] - n))
        assert score.item() == pytest.approx(want, abs=2e-3)


def test_crop_then_refeed_equals_one_pass_and_frees_pages(tiny_llama, tiny_calib):
    """Manual forward loop: prefill, crop the last k tokens, feed them again: the same logits as one pass; crop
    releases the pages past the new length."""
    model, tok = tiny_llama
    ids = tok("word " * 150, return_tensors="pt").input_ids[:, :150]
    k = 30
    with torch.no_grad(), rotkv_cache(model, tiny_calib, block_size=64) as cache:
        full = model(ids, past_key_values=cache, use_cache=True).logits
        before = cache.quantized_nbytes()
        cache.crop(-k)
        assert cache.get_seq_length() == 150 - k and cache.num_blocks == 2  # 120 tokens: 2 pages of 64
        assert cache.quantized_nbytes() < before
        again = model(ids[:, -k:], past_key_values=cache, use_cache=True).logits
        step = model(again[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(again, full[:, -k:], rtol=1e-5, atol=1e-5)
    ref = _reference_logits(model, tiny_calib, torch.cat([ids, again[:, -1:].argmax(-1)], 1))
    torch.testing.assert_close(step[0, -1], ref[0, -1], **TOL)


def test_a_wrong_position_is_seen(tiny_llama, tiny_calib):
    """The tolerance above can fail: shifting the stored positions by one (RoPE re-applied one step off) moves
    the logits far beyond it."""
    model, tok = tiny_llama
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    with torch.no_grad(), rotkv_cache(model, tiny_calib) as cache:
        model(ids[:, :1], past_key_values=cache, use_cache=True)
        cache.lengths += 1  # pretend one more token was stored: every later token lands one position off
        cache._ensure_blocks(cache.lengths)
        shifted = model(ids[:, 1:], past_key_values=cache, use_cache=True,
                        position_ids=torch.arange(2, ids.shape[1] + 1)[None]).logits
    ref = _reference_logits(model, tiny_calib, ids)
    assert (shifted[0] - ref[0, 1:]).abs().max() > 1e-2


def test_qwen2_and_mistral_families(smollm2_dir, calib_text):
    """The other served families (qwen2 with k_proj bias, mistral without a sliding window) decode like the
    reference."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    shapes = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                  tie_word_embeddings=True)
    for cls, cfg in ((Qwen2ForCausalLM, Qwen2Config(**shapes)), (MistralForCausalLM,
                                                                  MistralConfig(sliding_window=None, **shapes))):
        torch.manual_seed(0)
        model = cls(cfg).eval()
        cal = calibrate(model, tok, RotateKVConfig(group_size=32), text=calib_text, num_sequences=1, seq_len=64,
                        progress=False)
        ids = tok("Qwen and Mistral attend like Llama", return_tensors="pt").input_ids
        with torch.no_grad(), rotkv_cache(model, cal) as cache:
            out = model.generate(ids, max_new_tokens=5, do_sample=False, past_key_values=cache, pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
        ref = _reference_logits(model, cal, out.sequences)[0]
        for i, s in enumerate(out.scores):
            torch.testing.assert_close(s[0], ref[ids.shape[1] - 1 + i], **TOL)


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
    return calibrate(model, tok, RotateKVConfig.for_bits(4, sink_mode="first"), text=calib_text, num_sequences=1,
                     seq_len=256, progress=False)


def test_cache_errors(tiny_llama, tiny_calib):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="calibration="), rotkv_cache(model, None, RotateKVConfig()):
        pass
    with pytest.raises(ValueError, match="pre_rope=False"):
        with rotkv_cache(model, tiny_calib, dataclasses.replace(tiny_calib.config, pre_rope=False)):
            pass
    with pytest.raises(ValueError, match="sink_mode='topk'"):
        with rotkv_cache(model, tiny_calib, dataclasses.replace(tiny_calib.config, sink_mode="topk")):
            pass
    with pytest.raises(ValueError, match="recent_window=8"):
        with rotkv_cache(model, tiny_calib, dataclasses.replace(tiny_calib.config, recent_window=8)):
            pass
    with pytest.raises(ValueError, match="attention_impl='gpu'"):
        with rotkv_cache(model, tiny_calib, attention_impl="gpu"):
            pass
    ids = tok("a b c d", return_tensors="pt").input_ids
    # The cache without its attention: sdpa would read only the new tokens.
    with pytest.raises(ValueError, match="needs the model's attention to be 'rotkv'"):
        model(ids, past_key_values=RotateKVCache(model, tiny_calib), use_cache=True)
    register_rotkv_attention()
    with torch.no_grad(), rotkv_cache(model, tiny_calib) as cache:
        # The attention without its cache.
        with pytest.raises(ValueError, match="past_key_values=cache"):
            model(ids, use_cache=False)
        # A left-padded manual loop without position_ids: positions would count the padding.
        batch = tok(["a", "a b c d"], return_tensors="pt", padding=True, padding_side="left")
        with pytest.raises(ValueError, match="position_ids"):
            model(**batch, past_key_values=cache, use_cache=True)
    with torch.no_grad(), rotkv_cache(model, tiny_calib) as cache:
        right = tok(["a", "a b c d"], return_tensors="pt", padding=True, padding_side="right")
        with pytest.raises(ValueError, match="left padding only"):
            model(**right, past_key_values=cache, use_cache=True)
