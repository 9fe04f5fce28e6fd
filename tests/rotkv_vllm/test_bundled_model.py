"""The Gemma 3 GGUF conversion of ``rotkv_vllm.bundled_model`` on a small random Gemma 3 written as a GGUF here
(llama.cpp's tensor names and its ``1 + w`` norms, ``gguf.GGUFWriter``), so that the suite downloads nothing: the
real Gemma 3 270M (``python -m rotkv_vllm.bundled_model gemma3-270m``, about 250 MB) is opt-in and runs the same
conversion and :func:`check_gemma3_config`, plus a perplexity check, when it is converted."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from rotkv_vllm.bundled_model import _convert_gguf, _gguf_metadata, check_gemma3_config

N_LAYERS = 7  # past one period of 6: layers 5 global, 0-4 and 6 local


def _tiny_gemma3(head_dim: int = 256):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # What llama.cpp assumes for a Gemma 3 GGUF: query_pre_attn_scalar = head_dim, local RoPE base 1e4.
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
                           query_pre_attn_scalar=head_dim,
                           sliding_window=16, max_position_embeddings=256, rms_norm_eps=1e-6,
                           rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's norms multiply by 1 + w: draw w around 0 so a missing -1 shows
                p.normal_(0.0, 0.3)
    return model


def _write_gguf(model, path, *, local_rope_base: float | None = None) -> None:
    """``model`` as llama.cpp's converter writes a Gemma 3 GGUF (F32): its tensor names, norms stored as 1 + w;
    ``local_rope_base``: also store ``rope.freq_base_swa`` (newer files do; transformers 5.19 does not read it)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(cfg.sliding_window)
    if local_rope_base is not None:
        w.add_rope_freq_base_swa(local_rope_base)
    # A SentencePiece vocabulary: 4 specials, the word-start marker, then letters.
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "\u2581"] + [chr(ord("a") + i) for i in range(26)]
    tokens += [f"\u2581{chr(ord('a') + i)}" for i in range(cfg.vocab_size - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3, 3, 3, 2] + [1] * (len(tokens) - 4))  # control x3, unknown, normal
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied to the embedding, as in the real file
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        assert name is not None, hf_name
        data = t.float().numpy()
        if "norm" in hf_name:
            data = data + 1.0
        w.add_tensor(name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(the random model, its GGUF, the folder _convert_gguf made from it with the config check)."""
    model = _tiny_gemma3()
    tmp = tmp_path_factory.mktemp("gemma3_gguf")
    path = tmp / "tiny-gemma3.gguf"
    _write_gguf(model, path)
    out = _convert_gguf(path, tmp / "converted", _checker(path))
    return model, path, out


def _checker(path):
    from transformers import AutoConfig

    return lambda folder: check_gemma3_config(AutoConfig.from_pretrained(folder), path)


def test_gemma3_gguf_converts_to_the_same_model(converted):
    from transformers import AutoModelForCausalLM

    model, _, out = converted
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert list(got.config.layer_types) == list(model.config.layer_types)
    assert got.config.layer_types[5] == "full_attention" and got.config.layer_types.count("full_attention") == 1
    # The folder holds bf16 weights: the original with its weights rounded to bf16 computes the same logits
    # (the same fp32 arithmetic on the same numbers, so up to summation-order rounding).
    want = copy.deepcopy(model)
    with torch.no_grad():
        for p in want.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = want(ids).logits, got(ids).logits
    # 40 tokens > the window of 16: the local layers' mask and RoPE base are part of what is compared.
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert (a - model(ids).logits).abs().max() > 1e-3  # the bf16 rounding is visible: the comparison is not vacuous


def test_config_check_names_each_disagreement(converted):
    from transformers import AutoConfig

    _, path, out = converted
    cfg = AutoConfig.from_pretrained(out)
    check_gemma3_config(cfg, path)
    bad = copy.deepcopy(cfg)
    bad.sliding_window = 4096
    bad.rope_parameters["sliding_attention"]["rope_theta"] = 1e6
    bad.query_pre_attn_scalar = 64
    with pytest.raises(ValueError, match=r"sliding_window: converted 4096, GGUF 16; "
                                         r"rope_parameters\[sliding_attention\]: converted 1000000.0, GGUF 10000.0; "
                                         r"query_pre_attn_scalar: converted 64, GGUF 256"):
        check_gemma3_config(bad, path)


@pytest.mark.parametrize("case", ["local-rope-base", "head-size-32"])
def test_what_transformers_converts_wrongly_is_refused(converted, tmp_path, case):
    """transformers 5.19 ignores ``rope.freq_base_swa`` (local layers get its default base 1e4) and keeps its
    default query_pre_attn_scalar of 256 whatever the head size: the check refuses both and keeps no folder."""
    path = tmp_path / f"{case}.gguf"
    if case == "local-rope-base":
        _write_gguf(converted[0], path, local_rope_base=5e4)
        meta = _gguf_metadata(path)
        assert meta["gemma3.rope.freq_base_swa"] == 5e4 and meta["gemma3.block_count"] == N_LAYERS
        expect = r"rope_parameters\[sliding_attention\]: converted 10000.0, GGUF 50000.0"
    else:
        _write_gguf(_tiny_gemma3(head_dim=32), path)
        expect = r"query_pre_attn_scalar: converted 256, GGUF 32"
    with pytest.raises(ValueError, match=expect):
        _convert_gguf(path, tmp_path / "out", _checker(path))
    assert not (tmp_path / "out").exists()
