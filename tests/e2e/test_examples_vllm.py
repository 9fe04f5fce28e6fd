"""The examples that start vLLM, each in its own process as a user runs it (``python examples/NAME.py``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, *args: str, timeout: float = 900) -> str:
    # the engine core in the example's own process (as rotkv_engine_job.py runs it): a start of seconds
    # instead of about a minute on 2 cores; the example's code is the same either way
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    p = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p.stdout


def test_serve_rotkv_answers_through_the_packed_cache(tmp_path):
    # a fresh serving folder: the example's own calibration (8 x 512 tokens), not one cached by an earlier run
    out = run_example("serve_rotkv", "--bits", "4", "--prompt", "What is the capital of France?", "--max-tokens",
                      "12", "--work-dir", str(tmp_path / "serve"))
    answer = out.split("What is the capital of France?\n  -> ", 1)[1].splitlines()[0]
    assert "Paris" in answer


def test_halo_finetune_export_serve_agrees_with_transformers(tmp_path):
    # the whole example as a user runs it: fine-tune, export, check the export in PyTorch, serve it
    out = run_example("halo_finetune_export_serve", "--steps", "4", "--seq-len", "64", "--eval-chunks", "2",
                      "--out", str(tmp_path / "w8a8"))
    assert (tmp_path / "w8a8" / "model.safetensors").is_file()
    m = re.search(r"held-out loss: ([\d.]+) before, ([\d.]+) after HALO-1 fine-tuning, ([\d.]+) for the W8A8", out)
    assert m, out[-2000:]
    before, after, w8a8 = map(float, m.groups())
    assert after < before  # fine-tuning on the text lowers its held-out loss
    # the export is HALO's INT8 forward with row scales: the same loss up to quantization of the weights
    assert abs(w8a8 - after) < 0.02 * after
    hf = out.split("transformers (W8A8): ", 1)[1].splitlines()[0]
    served = out.split("vLLM (W8A8):         ", 1)[1].splitlines()[0]
    # the same integer maths in both: greedy decoding starts the same way
    assert served.strip() and hf.strip()
    assert served.split()[:2] == hf.split()[:2]
