"""Shared fixtures for the RotateKV tests: a tiny random Llama, and the bundled SmolLM2."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_dir():
    from rotkv_vllm.bundled_model import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="session")
def tiny_llama(smollm2_dir):
    """A 2-layer random Llama with GQA (4 query heads, 2 KV heads of 32) and SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


@pytest.fixture(scope="session")
def calib_text():
    from rotkv_data import data_path

    return data_path("calib_wikitext2_valid.txt").read_text(encoding="utf-8")[:200_000]


@pytest.fixture(scope="session")
def eval_ids(smollm2):
    from rotkv_data import data_path

    _, tok = smollm2
    p = data_path("wikitext2_test.txt")
    return tok(p.read_text(encoding="utf-8")[:20_000], return_tensors="pt").input_ids[0]
