"""HALO under PyTorch FSDP2 with two CPU processes (gloo), with and without HQ-FSDP.

Both ranks train on the same batch, so FSDP's averaged gradient equals the single-process gradient
and the sharded run must reproduce an unsharded HALO run step for step. HQ-FSDP quantizes each
rank's rows before the all-gather; row scales and the Hadamard over input features are row-local
and tensor scales are all-reduced first, so the gathered Q(rot W) equals the unsharded one and the
losses must match too. The gathered byte count is checked against the shapes: int8 codes plus one
float32 scale per row, for a forward and a backward all-gather per step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("halo_fsdp_worker.py")
WORLD = 2
STEPS = 3
# (out_features, in_features) of the HALO layers of one decoder layer of the worker's tiny Llama
LAYER_SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (192, 64), (192, 64), (64, 192)]
N_LAYERS = 2


@pytest.fixture(scope="module")
def fsdp_result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    out = tmp / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(r), str(WORLD), str(tmp / "store"), str(out)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(err)
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in logs)
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["fsdp", "hq_row", "hq_tensor"])
def test_sharded_training_matches_single_process(fsdp_result, mode):
    r = fsdp_result[mode]
    assert len(r["losses"]) == STEPS
    for a, b in zip(r["losses"], r["single_losses"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert r["losses"][-1] < r["losses"][0]  # it trains


def test_hq_fsdp_gathers_quantized_bytes(fsdp_result):
    assert fsdp_result["fsdp"]["gathered_bytes"] == 0  # plain FSDP gathers float weights
    per_gather = N_LAYERS * sum((n // WORLD) * (k * 1 + 4) for n, k in LAYER_SHAPES)
    for mode in ("hq_row", "hq_tensor"):
        assert fsdp_result[mode]["gathered_bytes"] == STEPS * 2 * per_gather
    float32_bytes = N_LAYERS * sum((n // WORLD) * k * 4 for n, k in LAYER_SHAPES)
    assert per_gather < 0.3 * float32_bytes
