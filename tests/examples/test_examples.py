"""The examples run, on the bundled assets, and do what their docstrings say (the checks read their outputs).

The ones that start vLLM are in ``tests/e2e/test_examples_vllm.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TESTS_DIR = Path(__file__).resolve().parents[1]


def load_example(name: str):
    """An example script as a module (its ``main`` runs in this process)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generate_rotkv_answers_like_the_full_precision_cache(capsys):
    # The vLLM backend's PyTorch path (paged_write_ref + attend_tiles): it agrees with the reference harness to ~5e-5
    # on this prompt. With the C++ kernels (attention within 2e-6 of the reference per call, checked on this
    # prompt's layer-9 inputs) the 2-bit answer parts here: a ~1e-6 rounding difference upstream flips a 2-bit code.
    res = load_example("generate_rotkv").main(["--bits", "2", "--max-new-tokens", "8", "--attention-impl", "torch"])
    assert "Paris" in res["full_precision"] and "Paris" in res["rotkv"]
    # the rotkv2 preset: 2-bit records with fp8 scales (2.17 bits) for every token but the sink, plus one fp32 sink
    # token and the recent window's 3 fp32 ring tokens (32 bits each) among the ~44 tokens held: (40 * 2.17 +
    # 4 * 32) / 44 ~ 4.9 bits
    assert 4.0 < res["bits_per_element"] < 6.0
    # one page of 256 slots of 104 bytes + 4 fp32 tokens (1536 bytes each) per layer, against ~44 fp32 K/V
    # tokens: ~0.48x (a short prompt fills little of a page; at long contexts it is 116 / 768 bytes per token)
    assert 0 < res["cache_bytes"] < 0.5 * res["dynamic_cache_bytes"]
    assert "rotkv2 cache" in capsys.readouterr().out


def test_lrq_dit_quantize_publish_load_locally(tmp_path):
    res = load_example("lrq_dit_quantize_push_load").main(
        ["--out", str(tmp_path / "out"), "--labels", "0,1,2,3", "--steps", "4"])
    assert res["source"] == tmp_path / "hub" / "you/digits-dit-lrq-w4a8"
    assert (res["source"] / "README.md").is_file() and (res["source"] / "transformer" / "config.json").is_file()
    assert res["packed_layers"] > 0
    assert res["psnr_db"] > 10  # W4A8 samples close to the float pipeline's (a broken quantizer gives ~5 dB)
    pipe = res["quantized_pipeline"]
    pipe.set_progress_bar_config(disable=True)
    again = pipe(class_labels=[0, 1, 2, 3], num_inference_steps=4, guidance_scale=1.5,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(res["images"], again, rtol=0, atol=1e-5)  # what was loaded is what was quantized


@pytest.mark.slow
def test_lrq_dit_push_to_the_loopback_hub_and_load_by_repo_id(tmp_path):
    """The same example in a fresh process against the loopback Hub (tests/hub_server.py)."""
    import subprocess

    if str(TESTS_DIR / "optimum_plugin") not in sys.path:
        sys.path.insert(0, str(TESTS_DIR / "optimum_plugin"))
    from hub_helpers import TOKENS, WRITE, HubServer, hub_env

    with HubServer(tmp_path / "server", TOKENS) as hub:
        env = hub_env(hub, tmp_path / "hf_home", token=WRITE)
        p = subprocess.run([sys.executable, str(EXAMPLES / "lrq_dit_quantize_push_load.py"), "--out",
                            str(tmp_path / "out"), "--labels", "0,1,2,3", "--steps", "4", "--repo-id",
                            "alice/digits-lrq", "--endpoint", hub.url], env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-4000:]
        assert f"pushed alice/digits-lrq to {hub.url}: commit " in p.stdout
        assert "loaded alice/digits-lrq:" in p.stdout and "packed LRQLinear layers" in p.stdout


def test_halo_example_without_serving_stops_before_vllm(tmp_path):
    # --no-serve: export and transformers answer only (one short step: the fine-tuning itself is checked with
    # vLLM in tests/e2e/test_examples_vllm.py)
    res = load_example("halo_finetune_export_serve").main(
        ["--steps", "1", "--seq-len", "32", "--eval-chunks", "1", "--out", str(tmp_path / "w8a8"), "--no-serve"])
    assert (tmp_path / "w8a8" / "model.safetensors").is_file()
    assert len(res["transformers_tokens"]) == 8 and res["vllm_tokens"] is None
