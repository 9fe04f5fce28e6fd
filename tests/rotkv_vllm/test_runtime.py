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


# ---- ROTKV_ATTENTION_IMPL on the CPU: the fused C++ kernels by default, loudly never silently replaced -----------
import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rotkv_kernels import rotkv_paged_cpu  # noqa: E402
from rotkv_kernels.rotkv_layout import PagedCacheSpec  # noqa: E402
from rotkv_vllm import runtime  # noqa: E402

SERVED = PagedCacheSpec(num_kv_heads=3, head_dim=64, key_rot_width=192, value_rot_width=64, key_group_size=64,
                        value_group_size=64)
# head_dim 24 has a Hadamard (12 * 2) the PyTorch path serves, but the C++ kernels need multiples of 16
OUTSIDE = PagedCacheSpec(num_kv_heads=2, head_dim=24, key_rot_width=24, value_rot_width=24, key_group_size=24,
                         value_group_size=24)


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.delenv(runtime.ATTENTION_IMPL_ENV, raising=False)
    monkeypatch.setattr(runtime, "_WARNED", set())


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "rotkv" in r.getMessage()]


def test_cpu_default_is_the_built_cpp_kernels(fresh_warnings, caplog):
    # scripts/setup.sh builds the extension; a suite run without it must fail here, not pass on the slow path
    assert rotkv_paged_cpu.cpu_kernels_available(), rotkv_paged_cpu.cpu_kernels_status()
    with caplog.at_level(logging.WARNING):
        assert runtime.select_attention_impl("cpu", [SERVED]) == "cpp"
    assert _warnings(caplog) == []


def test_unbuilt_kernels_auto_says_so_once_and_cpp_refuses(fresh_warnings, monkeypatch, caplog):
    why = f"the rotkv CPU kernels are not built: run {rotkv_paged_cpu.BUILD_COMMAND}"
    monkeypatch.setattr(rotkv_paged_cpu, "cpu_kernels_status", lambda: why)
    with caplog.at_level(logging.WARNING):
        assert runtime.select_attention_impl("cpu", [SERVED]) == "torch"
        assert runtime.select_attention_impl("cpu", [SERVED]) == "torch"
    lines = _warnings(caplog)
    assert len(lines) == 1 and "\n" not in lines[0], lines  # one line, once per process
    assert "setup.py build_ext --inplace" in lines[0] and "PyTorch path" in lines[0]
    monkeypatch.setenv(runtime.ATTENTION_IMPL_ENV, "cpp")
    with pytest.raises(ValueError, match=r"ROTKV_ATTENTION_IMPL=cpp: the rotkv CPU kernels are not built: run .*build_ext"):
        runtime.select_attention_impl("cpu", [SERVED])
    monkeypatch.setenv(runtime.ATTENTION_IMPL_ENV, "torch")
    assert runtime.select_attention_impl("cpu", [SERVED]) == "torch"


def test_layout_outside_the_cpp_limits(fresh_warnings, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        assert runtime.select_attention_impl("cpu", [SERVED, OUTSIDE]) == "torch"
    (line,) = _warnings(caplog)
    assert "head_dim=24" in line and "multiple of 16" in line
    monkeypatch.setenv(runtime.ATTENTION_IMPL_ENV, "cpp")
    with pytest.raises(ValueError, match="ROTKV_ATTENTION_IMPL=cpp: this model's cache layout is outside"):
        runtime.select_attention_impl("cpu", [OUTSIDE])
    with pytest.raises(ValueError, match="C.. kernels serve CPU caches only"):
        runtime.check_attention_impl("cpp", "cuda", [SERVED])


# ---- per-layer sliding windows and RoPE tables ------------------------------------------------------------------
def _tables(base: float, n: int = 64, d: int = 64):
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    f = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([f.cos(), f.cos()], -1).float(), torch.cat([f.sin(), f.sin()], -1).float()


def _runtime(**kw):
    from rotkv_vllm.config import RotateKVConfig, RotateKVLayout

    cfg = RotateKVConfig.for_bits(2, sink_mode="first", center_keys=False, reorder=False, recent_window=4)
    layout = RotateKVLayout.resolve(cfg, 2, 64)
    return runtime.RotateKVRuntime(config=cfg, layout=layout, num_layers=3, key_orders=None, dtype=torch.bfloat16,
                                   **kw)


def test_runtime_per_layer_windows_and_rope_tables():
    local, glob = _tables(1e4), _tables(1e6)
    rt = _runtime(layer_ropes=[local, glob, local], sliding_windows=[16, 0, 16])
    assert [rt.paged_spec(i).sliding_window for i in range(3)] == [16, 0, 16]
    assert rt.kernel_params(0, "cpu").rope_cos is rt.kernel_params(2, "cpu").rope_cos  # one copy per table
    assert torch.equal(rt.kernel_params(1, "cpu").rope_sin, glob[1])
    assert rt.cpu_tables(0).rope is rt.cpu_tables(2).rope and rt.cpu_tables(0).rope is not rt.cpu_tables(1).rope
    assert torch.equal(rt.cpu_tables(1).rope.imag, glob[1][:, :32])
    with pytest.raises(ValueError, match="shorter than the full-precision recent window of 4"):
        _runtime(layer_ropes=[local] * 3, sliding_windows=[3, 0, 0])
    with pytest.raises(ValueError, match="2 per-layer RoPE tables for 3 layers"):
        _runtime(layer_ropes=[local] * 2)
    with pytest.raises(ValueError, match="2 sliding windows for 3 layers"):
        _runtime(layer_ropes=[local] * 3, sliding_windows=[16, 0])
