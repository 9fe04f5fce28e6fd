"""The transformers RotateKV cache: generate, padding, beam search, crop and its byte count, with the vLLM presets'
recent window (the default) and without it.

Oracle: ``rotkv_vllm.reference.quantized_kv`` (teacher-forced, the same records' maths in PyTorch, every K/V
dequantized each forward, the last ``R`` keys of each query in full precision) given the cache's own config. The
cache computes the same attention through the paged kernels, so logits agree to fp32 rounding: the bound 2e-3 on
logits of size ~10 is ~1e3 times the observed differences (~1e-6) and far below what one wrong token's K/V moves
them (a changed sink, a record read at a wrong position or a ring slot holding another position's K/V moves logits
by >1e-2 on this random model, checked by ``test_a_wrong_position_is_seen`` and ``test_a_wrong_ring_slot_is_seen``;
dropping the window moves them by ~0.26).

The fused Triton path runs here only in Triton's interpreter (``TRITON_INTERPRET=1``), with fp32 products
(``ROTKV_TRITON_PRECISION=fp32``) so that the same fp32-rounding bound applies.
"""

import dataclasses
import math

import pytest
import torch

from rotkv_kernels.hadamard_triton import is_interpreted
from rotkv_kernels.rotkv_cache import record_bytes
from rotkv_kernels.rotkv_paged_cpu import cpu_kernels_available
from rotkv_vllm.calibration import calibrate
from rotkv_vllm.config import DEFAULT_BLOCK_SIZE, RotateKVConfig
from rotkv_vllm.hf_cache import RotateKVCache, register_rotkv_attention, rotkv_cache
from rotkv_vllm.reference import KVMethod, quantized_kv
from rotkv_vllm.runtime import TRITON_PRECISION_ENV, effective_config

# The C++ kernels are built by scripts/setup.sh; "torch" is the vLLM backend's PyTorch CPU path.
IMPLS = ["cpu", "torch"] if cpu_kernels_available() else ["torch"]
# ... and the fused Triton path where it can run on the CPU (the interpreter).
IMPLS_TRITON = IMPLS + (["triton"] if is_interpreted() else [])
TOL = dict(rtol=2e-3, atol=2e-3)


@pytest.fixture
def fp32_triton(monkeypatch):
    monkeypatch.setenv(TRITON_PRECISION_ENV, "fp32")


@pytest.fixture(scope="module")
def tiny_calib(tiny_llama, calib_text):
    model, tok = tiny_llama
    cfg = RotateKVConfig(sink_mode="first", max_sink_tokens=1, center_keys=True, group_size=32)
    return calibrate(model, tok, cfg, text=calib_text, num_sequences=2, seq_len=64, progress=False)


def _reference_logits(model, config, calib, ids, attention_mask=None):
    with torch.no_grad(), quantized_kv(model, KVMethod.from_config(config), calib):
        return model(ids, attention_mask=attention_mask).logits


def test_default_is_the_vllm_preset(tiny_llama, tiny_calib):
    """Without config=/kv_cache_dtype= the cache stores what `--kv-cache-dtype rotkv2` stores with this 2-bit
    calibration (recent window 4, 256-token pages); kv_cache_dtype picks another preset; config= is taken as is."""
    model, _ = tiny_llama
    with rotkv_cache(model, tiny_calib) as cache:
        assert cache.config == effective_config(tiny_calib, "rotkv2")
        assert cache.config.recent_window == 4 and cache.block_size == DEFAULT_BLOCK_SIZE == 256
    with rotkv_cache(model, tiny_calib, kv_cache_dtype="rotkv_k3v2") as cache:
        assert cache.config == effective_config(tiny_calib, "rotkv_k3v2")
        assert (cache.config.key_bits, cache.config.value_bits, cache.config.recent_window) == (3, 2, 4)
    with rotkv_cache(model, tiny_calib, tiny_calib.config) as cache:
        assert cache.config.recent_window == 0
    with pytest.raises(ValueError, match="pass one"):
        with rotkv_cache(model, tiny_calib, tiny_calib.config, kv_cache_dtype="rotkv2"):
            pass
    odd = dataclasses.replace(tiny_calib, config=dataclasses.replace(tiny_calib.config, value_bits=4))
    with pytest.raises(ValueError, match="no --kv-cache-dtype preset"):
        with rotkv_cache(model, odd):
            pass


def _page_bytes(calib, key_bits, value_bits, block_size, fp_tokens, itemsize=4):
    """One page, by hand: block_size records of C bytes (K record + V record, padded to even) and ``fp_tokens``
    full-precision tokens (sinks and ring slots: K and V of all heads)."""
    lay, fmt = calib.layout(), calib.config.scale_format
    c = record_bytes(lay.kv_width, key_bits, lay.group_size, fmt)
    c += record_bytes(lay.kv_width, value_bits, lay.value_group_size, fmt)
    c += c % 2
    return block_size * c + fp_tokens * 2 * lay.kv_width * itemsize


@pytest.mark.parametrize("window", [4, 0])
@pytest.mark.parametrize("impl", IMPLS_TRITON)
def test_generate_matches_teacher_forced_reference(tiny_llama, tiny_calib, fp32_triton, impl, window):
    """Greedy decoding through the packed cache sees the same K/V as the teacher-forced harness, with the
    window (the default preset; 16-token pages so that decoding crosses pages and the window spans two rings)
    and without; the bytes are the pages' records, sinks and rings."""
    model, tok = tiny_llama
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    cfg = effective_config(tiny_calib, "rotkv2")
    cfg = dataclasses.replace(cfg, recent_window=window)
    with torch.no_grad(), rotkv_cache(model, tiny_calib, cfg, attention_impl=impl, block_size=16) as cache:
        out = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    assert model.config._attn_implementation != "rotkv"  # restored
    seq = out.sequences
    assert seq.shape[1] == ids.shape[1] + 12
    logits = _reference_logits(model, cfg, tiny_calib, seq)[0]
    n = ids.shape[1]
    for i, step_scores in enumerate(out.scores):
        torch.testing.assert_close(step_scores[0], logits[n - 1 + i], **TOL)
    # The pages: every layer holds ceil(L / block_size) pages of block_size records of C bytes + the sink token
    # + R - 1 ring slots (fp32 here, the model's dtype).
    stored = seq.shape[1] - 1  # the last token is never fed back
    pages = math.ceil(stored / cache.block_size)
    assert pages == 2
    page = _page_bytes(tiny_calib, 2, 2, 16, 1 + max(window - 1, 0))
    assert page == cache.runtime.page_bytes(16)
    rows = 2 * 8 + 8 * pages  # lengths, left padding (int64 [1]) and the block table (int64 [1, pages])
    assert cache.quantized_nbytes() == pages * page * model.config.num_hidden_layers + rows
    # bits per element: records of the non-sink tokens, full precision for the sink and the filled ring slots
    lay = tiny_calib.layout()
    ring = 2 * max(window - 1, 0)  # both pages' rings are full (16 and 5 tokens)
    want = ((stored - 1) * _record_kv_bytes(tiny_calib) * 8 + (1 + ring) * 2 * lay.kv_width * 32) \
        / (stored * 2 * lay.kv_width)
    assert cache.bits_per_element() == pytest.approx(want)


def _record_kv_bytes(calib, key_bits=2, value_bits=2):
    lay, fmt = calib.layout(), calib.config.scale_format
    return record_bytes(lay.kv_width, key_bits, lay.group_size, fmt) + \
        record_bytes(lay.kv_width, value_bits, lay.value_group_size, fmt)


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
    re-applied at each row's own positions; each row's window comes from its own rings, on 16-token pages that
    the long row crosses), and as the reference does for its tokens."""
    model, tok = tiny_llama
    prompts = ["Hello", "The tower is 324 metres tall, about the same height as"]
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), rotkv_cache(model, tiny_calib, attention_impl=impl, block_size=16) as cache:
        both = model.generate(**batch, past_key_values=cache, **greedy)
    assert cache.config.recent_window == 4 and int(cache.lengths.max()) > 16
    assert cache.left_padding.tolist() == (batch.attention_mask == 0).sum(1).tolist()
    width = batch.input_ids.shape[1]
    for r, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad(), rotkv_cache(model, tiny_calib, attention_impl=impl, block_size=16) as c1:
            alone = model.generate(ids, past_key_values=c1, **greedy)
        assert torch.equal(both.sequences[r, width:], alone.sequences[0, ids.shape[1]:])
        for s_both, s_alone in zip(both.scores, alone.scores):
            torch.testing.assert_close(s_both[r], s_alone[0], rtol=1e-4, atol=1e-4)
        ref = _reference_logits(model, cache.config, tiny_calib, alone.sequences)[0]
        for i, s_both in enumerate(both.scores):
            torch.testing.assert_close(s_both[r], ref[ids.shape[1] - 1 + i], **TOL)


def test_beam_search_scores_match_the_reference(tiny_llama, tiny_calib):
    """Beam search reorders the cache's rows every step; the returned beams' scores are the reference's
    log-probabilities of those exact sequences (a row holding another beam's history, or its rings, would not be;
    16-token pages, so the beams cross a page boundary and the window reads two pages' rings)."""
    model, tok = tiny_llama
    ids = tok("Beam search over a quantized cache", return_tensors="pt").input_ids
    n = ids.shape[1]
    with torch.no_grad(), rotkv_cache(model, tiny_calib, block_size=16) as cache:
        out = model.generate(ids, max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False,
                             early_stopping=False, length_penalty=0.0, pad_token_id=0, past_key_values=cache,
                             return_dict_in_generate=True, output_scores=True)
    assert cache.config.recent_window == 4
    for seq, score in zip(out.sequences, out.sequences_scores):
        logp = _reference_logits(model, cache.config, tiny_calib, seq[None])[0].log_softmax(-1)
        want = sum(float(logp[n - 1 + i, seq[n + i]]) for i in range(seq.shape[0] - n))
        assert score.item() == pytest.approx(want, abs=2e-3)


@pytest.mark.parametrize("window", [4, 0])
def test_crop_then_refeed_equals_one_pass_and_frees_pages(tiny_llama, tiny_calib, window):
    """Manual forward loop: prefill, crop the last k tokens, feed them again: the same logits as one pass; crop
    releases the pages past the new length. The cut is at a page start (128 of 150 tokens, 64-token pages), where
    the window's positions 125..127 are still in page 1's rings (the removed tokens wrote page 2's)."""
    model, tok = tiny_llama
    ids = tok("word " * 150, return_tensors="pt").input_ids[:, :150]
    k = 22
    cfg = dataclasses.replace(effective_config(tiny_calib, "rotkv2"), recent_window=window)
    with torch.no_grad(), rotkv_cache(model, tiny_calib, cfg, block_size=64) as cache:
        full = model(ids, past_key_values=cache, use_cache=True).logits
        before = cache.quantized_nbytes()
        cache.crop(-k)
        assert cache.get_seq_length() == 150 - k and cache.num_blocks == 2  # 128 tokens: 2 pages of 64
        assert cache.quantized_nbytes() < before
        again = model(ids[:, -k:], past_key_values=cache, use_cache=True).logits
        step = model(again[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(again, full[:, -k:], rtol=1e-5, atol=1e-5)
    ref = _reference_logits(model, cfg, tiny_calib, torch.cat([ids, again[:, -1:].argmax(-1)], 1))
    torch.testing.assert_close(step[0, -1], ref[0, -1], **TOL)


def test_crop_that_loses_window_positions_is_refused(tiny_llama, tiny_calib):
    """Crop to L keeps the window only if no removed position p overwrote ring slot (p % bs) % (R - 1) of a needed
    position q = p - (R - 1) in the same page. Derived cases on 64-token pages, R = 4, 100 tokens stored:

    - crop to 99 (remove position 99): q = 96 shares its slot with 99 -> lost, refused;
    - crop to 97 (remove 97..99): q = 94, 95, 96 are overwritten by 97, 98, 99 -> refused;
    - crop to 65 (remove 65..99): q = 62, 63 are in page 0 (intact), q = 64 lost to 67 -> refused;
    - crop to 64 (remove 64..99): q = 61..63 are in page 0, the removed tokens wrote page 1 -> allowed.

    A refused crop leaves the cache as it was: decoding on equals the reference."""
    model, tok = tiny_llama
    ids = tok("word " * 120, return_tensors="pt").input_ids[:, :101]
    with torch.no_grad(), rotkv_cache(model, tiny_calib, block_size=64) as cache:
        model(ids[:, :100], past_key_values=cache, use_cache=True)
        assert cache.lost_ring_positions(torch.tensor([99])) == [(0, [96])]
        assert cache.lost_ring_positions(torch.tensor([97])) == [(0, [94, 95, 96])]
        assert cache.lost_ring_positions(torch.tensor([65])) == [(0, [64])]
        assert cache.lost_ring_positions(torch.tensor([64])) == []
        for keep in (99, 97, 65):
            with pytest.raises(ValueError, match="recent window"):
                cache.crop(keep)
        assert cache.get_seq_length() == 100 and int(cache.lengths[0]) == 100
        step = model(ids[:, 100:101], past_key_values=cache, use_cache=True).logits
    ref = _reference_logits(model, cache.config, tiny_calib, ids)
    torch.testing.assert_close(step[0, -1], ref[0, -1], **TOL)


def test_a_wrong_ring_slot_is_seen(tiny_llama, tiny_calib):
    """The bound can fail on the window. After a prefill of 9 tokens (rings: positions 6, 7, 8 in slots 0, 1, 2)
    the next query reads positions 6..8 from the rings. A stale slot (slot 0 holding position 0's K/V instead of
    position 6's) moves the next step's logits by > 1e-2; keys rotated among the slots while the values stay
    (each key read with another position's value) leaves the bound too; the untouched cache stays inside. (Moving
    whole (K, V) pairs between slots is invisible by design: attention over post-RoPE pairs is a set function.)"""
    model, tok = tiny_llama
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    assert ids.shape[1] == 10
    ref = _reference_logits(model, effective_config(tiny_calib, "rotkv2"), tiny_calib, ids)[0, -1]
    for corrupt in ("none", "stale", "keys"):
        with torch.no_grad(), rotkv_cache(model, tiny_calib) as cache:
            model(ids[:, :-1], past_key_values=cache, use_cache=True)
            s, n = cache.runtime.sink_tokens, cache.runtime.ring_slots
            for layer in cache.layers:
                ring = layer.pages.sinks[:, s:s + n]  # [pages, R - 1, 2 (K, V), H, D]
                if corrupt == "stale":
                    ring[:, 0].copy_(layer.pages.sinks[:, 0])  # position 0's K/V (the sink)
                elif corrupt == "keys":
                    ring[:, :, 0].copy_(ring[:, :, 0].roll(1, dims=1))
            step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[0, -1]
        if corrupt == "none":
            torch.testing.assert_close(step, ref, **TOL)
        else:
            with pytest.raises(AssertionError):
                torch.testing.assert_close(step, ref, **TOL)
        if corrupt == "stale":
            assert (step - ref).abs().max() > 1e-2


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
    ref = _reference_logits(model, cache.config, tiny_calib, ids)
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
        ref = _reference_logits(model, cache.config, cal, out.sequences)[0]
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
    # The serving example's calibration (8 x 512 tokens): with the rotkv4 preset's window, a 1 x 256 calibration
    # answers "L'Étoile de la Cité" here, and so does the reference harness with that calibration (the cache
    # matches it); with 8 x 512 both answer Paris.
    return calibrate(model, tok, RotateKVConfig.for_bits(4, sink_mode="first"), text=calib_text, num_sequences=8,
                     seq_len=512, progress=False)


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
    with pytest.raises(ValueError, match="block_size=16: .* 19 ring slots"):
        with rotkv_cache(model, tiny_calib, dataclasses.replace(tiny_calib.config, recent_window=20), block_size=16):
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
