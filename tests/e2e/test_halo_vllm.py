"""HALO's W8A8 export served by the real vLLM engine (CPU): WikiText-2 perplexity through vLLM vs the same
checkpoint evaluated in transformers (:func:`load_w8a8`), within 2%.

The checkpoint is SmolLM2-135M with HALO-1 int8 layers exported as compressed-tensors W8A8 with online
576- and 1536-wide Hadamard input transforms (no fine-tuning: the export path is what is under test;
``benchmarks/halo_vllm_ppl.py`` does the same for a fine-tuned model). Both sides score the same token
chunks of ``wikitext2_test.txt`` at the same positions.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

from rotkv_data import EVAL_TEXT, data_path

DATA = data_path(EVAL_TEXT)
CHUNKS, SEQ = 4, 256  # 1,020 scored tokens: both sides compute the same integer maths


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_plugin.halo import HALOConfig, apply_halo, save_w8a8
    from optimum_plugin.halo.data import token_chunks
    from rotkv_vllm.bundled_model import ensure_smollm2

    src = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    chunks = token_chunks(tok, DATA, SEQ, max_chunks=CHUNKS)
    from optimum_plugin.halo.data import causal_lm_nll

    base_nll, base_n = causal_lm_nll(model.eval(), chunks)
    apply_halo(model, HALOConfig(level=1))
    out = save_w8a8(model, tmp_path_factory.mktemp("halo") / "w8a8", tok)
    return out, chunks, math.exp(base_nll / base_n)


def test_vllm_serves_halo_w8a8_with_transformers_perplexity(exported, monkeypatch):
    from optimum_plugin.halo import load_w8a8
    from optimum_plugin.halo.data import causal_lm_nll
    from optimum_plugin.halo.vllm_eval import run_vllm_nll

    path, chunks, base_ppl = exported
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in the eval's process: a faster start
    got = run_vllm_nll(path, chunks, dtype="float32", plugins="halo")
    assert got["quantization"] == "halo_compressed_tensors"
    assert got["tokens"] == CHUNKS * (SEQ - 1)
    vllm_ppl = math.exp(got["nll"] / got["tokens"])
    nll, n = causal_lm_nll(load_w8a8(path), chunks)
    hf_ppl = math.exp(nll / n)
    assert n == got["tokens"]
    assert abs(vllm_ppl / hf_ppl - 1) < 0.02, (vllm_ppl, hf_ppl)
    # and it is still the model: W8A8 costs a few percent of perplexity at most
    assert abs(hf_ppl / base_ppl - 1) < 0.05, (hf_ppl, base_ppl)
