"""One model-support description per family (``rotkv_vllm.model_support``) behind every RotateKV entry point:
where each family's pre-RoPE key comes from, its RoPE, windows and query scale, what the vLLM backend refuses
and why; and ``rotate_values`` meaning the same thing in the reference, the transformers cache and the vLLM
runtime."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from rotkv_vllm.calibration import RotateKVCalibration, calibrate
from rotkv_vllm.config import RotateKVConfig
from rotkv_vllm.hf_cache import rotkv_cache
from rotkv_vllm.model_support import (
    FAMILIES,
    REFUSED_FAMILIES,
    SUPPORTED_MODEL_TYPES,
    decoder_layers,
    describe_model,
    layer_attention,
    pre_rope_key,
    register_pre_rope_key_hook,
    vllm_refusal,
)
from rotkv_vllm.reference import KVMethod, quantized_kv
from rotkv_vllm.runtime import RotateKVRuntime, check_served_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from family_models import FAMILY_NAMES, build_family_model  # noqa: E402


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_the_list():
    assert [f.name for f in FAMILIES] == ["llama", "mistral", "qwen2", "qwen3", "gemma3"]
    assert set(SUPPORTED_MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3"}
    assert {f.name: f.key_norm for f in FAMILIES} == {"llama": None, "mistral": None, "qwen2": None,
                                                      "qwen3": "k_norm", "gemma3": "k_norm"}
    assert {"deepseek_v3", "bloom", "gpt2"} <= set(REFUSED_FAMILIES)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_pre_rope_key_is_what_the_model_rotates(name, tok):
    """The hooked key (``register_pre_rope_key_hook``) and :func:`pre_rope_key` are the key the model's attention
    passes to RoPE: RoPE applied to it with the layer's own ``(cos, sin)`` gives the ``key`` transformers hands
    the attention function (captured there), for every layer of every family -- Gemma 3's local layer with its
    own RoPE base included (``window=``). The check fails when the key norm or the bias is skipped."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from rotkv_kernels.rotkv_cache import apply_rope

    model = build_family_model(name, tok, window=16)
    layers = decoder_layers(model)
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    hooked, post, rope, normed = {}, {}, {}, {}

    def attention(module, query, key, value, attention_mask, **kw):
        post[module.layer_idx] = key
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("family_spy", attention)
    handles = []
    for i, layer in enumerate(layers):
        handles.append(register_pre_rope_key_hook(layer, lambda k, i=i: hooked.__setitem__(i, k)))
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: rope.__setitem__(i, kw["position_embeddings"]), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: normed.__setitem__(i, kw["hidden_states"]), with_kwargs=True))
    previous = model.config._attn_implementation
    model.set_attn_implementation("family_spy")
    try:
        with torch.no_grad():
            model(ids)
    finally:
        model.set_attn_implementation(previous)
        for h in handles:
            h.remove()
    info = describe_model(model)
    h, d = info["num_key_value_heads"], info["head_dim"]
    for i, layer in enumerate(layers):
        with torch.no_grad():
            direct = pre_rope_key(layer.self_attn, normed[i])
        torch.testing.assert_close(hooked[i], direct, rtol=0, atol=0)
        k = hooked[i].unflatten(-1, (h, d)).transpose(1, 2)  # [B, H, T, D]
        cos, sin = rope[i]
        torch.testing.assert_close(apply_rope(k, cos.unsqueeze(1), sin.unsqueeze(1)), post[i], rtol=1e-5, atol=1e-5)
        # the part of the key the family adds is not negligible: without it the check above would fail
        bare = layer.self_attn.k_proj(normed[i]).detach()
        if name == "qwen2":
            bare = bare - layer.self_attn.k_proj.bias
        if name in ("qwen2", "qwen3", "gemma3"):
            assert float((bare - hooked[i]).norm() / hooked[i].norm()) > 0.1


@pytest.mark.parametrize("name,window,impl", [pytest.param(n, None, "auto", id=n) for n in FAMILY_NAMES] + [
    pytest.param(n, 8, impl, id=f"{n}-window" + ("-torch" if impl == "torch" else ""))
    for n in ("mistral", "gemma3") for impl in ("auto", "torch")])
def test_transformers_cache_agrees_with_the_reference(name, window, impl, tok, calib_text):
    """The transformers cache (``rotkv_cache``, records) and the reference (fake quantization) give the same logits
    for each family: fp32, the same calibration; measured 6e-7 relative where both read the same key, 0.4-0.9 where
    the cache reads keys before k_norm. Bound 1e-4. With ``window=8`` (mistral: every layer; gemma3: its local layer
    with its own RoPE base) the ~18-token prompt and the decode steps after it attend over the window only (the
    cache's kernels apply it, with each layer's RoPE tables); ``impl`` covers the C++ (auto) and PyTorch paths."""
    model = build_family_model(name, tok, window=window)
    cal = calibrate(model, tok, RotateKVConfig(sink_mode="first", max_sink_tokens=1, center_keys=True),
                    text=calib_text, num_sequences=2, seq_len=64, progress=False)
    ids = tok("The quick brown fox jumps over the lazy dog because it was bored of the same old",
              return_tensors="pt").input_ids
    nxt = torch.tensor([[11, 22, 33]])
    with torch.no_grad(), rotkv_cache(model, cal, attention_impl=impl) as cache:  # the rotkv2 preset: window 4
        cached = model(ids, past_key_values=cache, use_cache=True).logits[0]
        steps = [model(nxt[:, i:i + 1], past_key_values=cache, use_cache=True).logits[0, -1] for i in range(3)]
    with torch.no_grad(), quantized_kv(model, KVMethod.from_config(cache.config), cal):
        ref = model(ids).logits[0]
        ref_steps = model(torch.cat([ids, nxt], 1)).logits[0, -3:]
    assert float((cached - ref).norm() / ref.norm()) < 1e-4
    assert float((torch.stack(steps) - ref_steps).norm() / ref_steps.norm()) < 1e-4
    if window is not None:  # the window matters here: the same weights without it differ by far more
        unwindowed = build_family_model(name, tok)
        with torch.no_grad(), quantized_kv(unwindowed, KVMethod.from_config(cache.config), cal):
            plain = unwindowed(ids).logits[0]
        assert float((plain - ref).norm() / ref.norm()) > 1e-2


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_layer_attention_describes_each_family(name, tok):
    model = build_family_model(name, tok)
    full, windowed = layer_attention(model, 0), layer_attention(build_family_model(name, tok, window=16), 0)
    assert full.sliding_window is None
    assert full.query_scale == pytest.approx(64 ** -0.5 if name == "gemma3" else 32 ** -0.5)
    assert layer_attention(model, 1).rope_parameters == full.rope_parameters  # one RoPE without local layers
    assert vllm_refusal(model.config) is None
    if name == "llama":
        assert full.rope_parameters["rope_type"] == "llama3" and windowed.sliding_window is None
        assert vllm_refusal(build_family_model(name, tok, window=16).config) is None  # llama has no windows
        return
    sliding_layer = 1 if name in ("qwen2", "qwen3") else 0  # qwen: max_window_layers=1; gemma3: even layers
    assert layer_attention(build_family_model(name, tok, window=16), sliding_layer).sliding_window == 16
    if name == "gemma3":
        assert (windowed.rope_parameters["rope_theta"], full.rope_parameters["rope_theta"]) == (10000.0, 1e6)
        assert full.rope_parameters["rope_type"] == "linear"


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3", "gemma3"])
def test_vllm_serves_sliding_windows_and_refuses_one_shorter_than_the_recent_window(name, tok):
    """The vLLM backend serves sliding-window layers (their own KV-cache group and window); it refuses at start-up
    (``check_served_model``, called by ``vllm_backend.resolve_runtime`` before anything is loaded) a window shorter
    than the preset's full-precision recent window (4 for the rotkv presets), naming the layers and the way out."""
    check_served_model(build_family_model(name, tok, window=16).config, "rotkv2")
    cfg = build_family_model(name, tok, window=3).config
    describe_model(cfg)
    layers = {"mistral": r"2 of 2 layers \(0, 1\)", "gemma3": r"1 of 2 layers \(0\)"}.get(name, r"1 of 2 layers \(1\)")
    with pytest.raises(ValueError, match=rf"--kv-cache-dtype rotkv2: {name}: {layers} attend over a sliding window "
                                         r"of 3 tokens, shorter than[\s\S]*--kv-cache-dtype auto"):
        check_served_model(cfg, "rotkv2")


def test_per_layer_rope_is_served(tok):
    """Gemma 3's local layers have their own RoPE base: served by vLLM (one table per layer: test_vllm_backend's
    test_resolve_gemma3_local_layers_get_their_window_and_rope_base) even where their window is longer than any
    context."""
    cfg = build_family_model("gemma3", tok).config
    check_served_model(cfg, "rotkv2")  # all layers global: one RoPE
    cfg.layer_types = ["full_attention", "sliding_attention"]
    cfg.sliding_window = 100_000
    assert layer_attention(cfg, 0).rope_parameters["rope_theta"] == 1e6
    assert layer_attention(cfg, 1).rope_parameters["rope_theta"] == 1e4
    assert vllm_refusal(cfg, 4) is None
    check_served_model(cfg, "rotkv2")


@pytest.mark.parametrize("model_type,extra,needle", [
    ("deepseek_v3", {}, "multi-head latent attention"),
    ("llama", {"kv_lora_rank": 512}, "multi-head latent attention"),
    ("bloom", {}, "ALiBi"),
    ("gpt2", {}, "no RoPE"),
    ("gemma2", {}, "soft-caps"),
    ("gemma3_text", {"attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 16}, "attn_logit_softcapping"),
    ("gemma", {}, "model_type='gemma' is not supported: RotateKV knows where the pre-RoPE key"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
])
def test_out_of_reach_families_refused_everywhere_with_the_reason(model_type, extra, needle):
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    hf.model_type = model_type
    for k, v in extra.items():
        setattr(hf, k, v)
    with pytest.raises(ValueError, match=needle):
        describe_model(hf)
    with pytest.raises(ValueError, match=r"--kv-cache-dtype rotkv2: [\s\S]*" + needle):
        check_served_model(hf, "rotkv2")


def test_qwen3_refused_by_the_optimum_quantizer_no_more(tok, tmp_path):
    """The Optimum quantizer takes the family list from the same place: a Qwen3 is accepted now."""
    pytest.importorskip("optimum")
    from optimum_plugin.quantizers import RotateKVQuantizer

    build_family_model("qwen3", tok).save_pretrained(tmp_path)
    RotateKVQuantizer.from_pretrained(tmp_path)


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
    with torch.no_grad(), rotkv_cache(model, calib_rv, calib_rv.config) as cache:  # its own config: no window
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
