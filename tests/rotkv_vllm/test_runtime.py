"""``rotkv_vllm.runtime`` is the vLLM-free half of the backend: the Optimum side imports it without vLLM."""

from __future__ import annotations

import subprocess
import sys

BLOCK_VLLM = """
import sys

class NoVllm:
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError(f"{name} is blocked for this test")

sys.meta_path.insert(0, NoVllm())
import rotkv_vllm.runtime
import optimum_plugin.rotatekv.optimum_quantizer
from rotkv_vllm.runtime import RotateKVRuntime, check_servable, servable_reason
assert not any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)
print("imported without vllm")
"""


def test_runtime_and_the_rotkv_quantizer_import_without_vllm():
    p = subprocess.run([sys.executable, "-c", BLOCK_VLLM], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "imported without vllm" in p.stdout
