"""The vLLM plugin's registration: argument parsing, config validation, dtype map, backend selection,
version gate. No engine is started; these run vLLM's own parsing and validation code."""

from __future__ import annotations

import importlib.metadata
from typing import get_args

import pytest
import torch

pytest.importorskip("vllm")

from rotkv_vllm import vllm_plugin  # noqa: E402
from rotkv_vllm.config import DEFAULT_BLOCK_SIZE  # noqa: E402
from rotkv_vllm.vllm_backend import RotateKVAttentionBackend  # noqa: E402

ROTKV = ("rotkv2", "rotkv3", "rotkv4", "rotkv_k3v2", "rotkv_k4v2")


@pytest.fixture(scope="module", autouse=True)
def registered():
    vllm_plugin.register()
    yield


def test_entry_point_declared():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert eps.get("rotkv") == "rotkv_vllm.vllm_plugin:register"


def test_register_is_idempotent():
    import vllm.config.cache as cache_mod
    import vllm.v1.attention.selector as selector

    before = (cache_mod.CacheDType, selector._cached_get_attn_backend)
    vllm_plugin._registered = False  # force the whole body to run again
    vllm_plugin.register()
    vllm_plugin.register()
    assert (cache_mod.CacheDType, selector._cached_get_attn_backend) == before
    names = get_args(cache_mod.CacheDType)
    assert all(names.count(n) == 1 for n in ROTKV)
    assert getattr(selector._cached_get_attn_backend, "_rotkv_wrapped", False)
    assert not getattr(selector._cached_get_attn_backend._rotkv_original, "_rotkv_wrapped", False)


def _parser():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())


@pytest.mark.parametrize("name", ROTKV)
def test_argparse_accepts_rotkv(name):
    args = _parser().parse_args(["--model", "m", "--kv-cache-dtype", name])
    assert args.kv_cache_dtype == name


def test_argparse_still_rejects_unknown(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--model", "m", "--kv-cache-dtype", "rotkv9"])
    err = capsys.readouterr().err
    # vLLM's own argparse message, which now lists ours among the choices.
    assert "invalid choice: 'rotkv9'" in err and "rotkv2" in err and "fp8" in err


def test_cache_config_validation():
    from pydantic import ValidationError
    from vllm.config import CacheConfig

    assert CacheConfig(cache_dtype="rotkv3").cache_dtype == "rotkv3"
    with pytest.raises(ValidationError, match="rotkv4"):
        CacheConfig(cache_dtype="rotkv5")


def test_engine_args_path_used_by_llm(tmp_path):
    """``LLM(kv_cache_dtype=...)`` builds its config through EngineArgs.create_engine_config."""
    from vllm.engine.arg_utils import EngineArgs

    from rotkv_vllm.bundled_model import smollm2_path

    model = smollm2_path()
    if not (model / "config.json").exists():
        pytest.skip("bundled model not converted")
    cfg = EngineArgs(model=str(model), kv_cache_dtype="rotkv2", max_model_len=256).create_engine_config()
    assert cfg.cache_config.cache_dtype == "rotkv2"
    # rotkv pages default to DEFAULT_BLOCK_SIZE tokens (the recent window's ring is per page); --block-size wins
    assert cfg.cache_config.block_size == DEFAULT_BLOCK_SIZE != 128
    given = EngineArgs(model=str(model), kv_cache_dtype="rotkv2", max_model_len=256, block_size=128)
    assert given.create_engine_config().cache_config.block_size == 128
    auto = EngineArgs(model=str(model), kv_cache_dtype="auto", max_model_len=256).create_engine_config()
    assert auto.cache_config.block_size == 128  # other dtypes keep the platform's default
    with pytest.raises(Exception, match="rotkv2"):  # pydantic lists the valid values, ours included
        EngineArgs(model=str(model), kv_cache_dtype="rotkv1", max_model_len=256).create_engine_config()


def test_storage_dtype_is_uint8():
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE, kv_cache_dtype_str_to_dtype

    for n in ROTKV:
        assert STR_DTYPE_TO_TORCH_DTYPE[n] is torch.uint8
        assert kv_cache_dtype_str_to_dtype(n, None) is torch.uint8


def test_backend_registered_under_its_name():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert AttentionBackendEnum["ROTKV"].get_class() is RotateKVAttentionBackend
    assert RotateKVAttentionBackend.get_name() == "ROTKV"


def _select(**kw):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.v1.attention.selector import get_attn_backend

    with set_current_vllm_config(VllmConfig()):
        return get_attn_backend(64, torch.bfloat16, **kw)


def test_selection_routes_rotkv_and_leaves_others():
    assert _select(kv_cache_dtype="rotkv2") is RotateKVAttentionBackend
    assert _select(kv_cache_dtype="auto") is not RotateKVAttentionBackend


@pytest.mark.parametrize("kw,needle", [
    ({"use_mla": True}, "MLA not supported"),
    ({"has_sink": True}, "attention sinks not supported"),
])
def test_selection_refuses_unsupported_layers(kw, needle):
    with pytest.raises(ValueError, match=needle):
        _select(kv_cache_dtype="rotkv3", **kw)


def test_selection_takes_sliding_window_layers():
    """Sliding-window layers select the RotateKV backend (their window is attended, not refused)."""
    assert _select(kv_cache_dtype="rotkv3", has_sliding_window=True) is RotateKVAttentionBackend


def test_selection_refuses_head_size_without_hadamard():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.v1.attention.selector import get_attn_backend

    with set_current_vllm_config(VllmConfig()), pytest.raises(ValueError, match="head_size not supported"):
        get_attn_backend(184, torch.bfloat16, kv_cache_dtype="rotkv2")  # 184 = 23 * 8: no Hadamard construction


# ---- the CUDA platform (no GPU needed: a Platform subclass that says it is CUDA) ------------------------
def _fake_platform(kind: str):
    from vllm.platforms.interface import DeviceCapability, Platform, PlatformEnum

    class Fake(Platform):
        _enum = PlatformEnum[kind]
        device_name = kind.lower()
        device_type = "cuda" if kind in ("CUDA", "ROCM") else kind.lower()

        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            return DeviceCapability(9, 0)

        @classmethod
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            raise LookupError(f"{kind} platform's own selection reached")  # vLLM's priority list

    return Fake()


@pytest.fixture
def fake_platform(monkeypatch):
    import vllm.platforms
    import vllm.v1.attention.selector as selector

    def clear():  # selections are cached per argument tuple, by our wrapper and by vLLM's function
        selector._cached_get_attn_backend.cache_clear()
        selector._cached_get_attn_backend._rotkv_original.cache_clear()

    def install(kind: str):
        monkeypatch.setattr(vllm.platforms, "_current_platform", _fake_platform(kind))
        clear()

    yield install
    clear()


def test_cuda_platform_routes_rotkv_to_the_fused_backend(fake_platform, monkeypatch):
    from rotkv_kernels.rotkv_cache import triton_available

    monkeypatch.delenv("ROTKV_ATTENTION_IMPL", raising=False)
    fake_platform("CUDA")
    if not triton_available():
        with pytest.raises(ValueError, match="needs Triton"):
            _select(kv_cache_dtype="rotkv2")
        return
    assert _select(kv_cache_dtype="rotkv2") is RotateKVAttentionBackend  # CUDA's priority list never consulted
    with pytest.raises(LookupError, match="CUDA platform's own selection"):
        _select(kv_cache_dtype="auto")  # other dtypes: the platform's own choice, untouched


def test_cuda_platform_honours_and_checks_attention_backend(fake_platform):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import get_attn_backend

    fake_platform("CUDA")
    for requested, ok in ((AttentionBackendEnum.FLASH_ATTN, False), (AttentionBackendEnum["ROTKV"], True)):
        cfg = VllmConfig()
        cfg.attention_config.backend = requested
        with set_current_vllm_config(cfg):
            if ok:
                assert get_attn_backend(128, torch.bfloat16, "rotkv4") is RotateKVAttentionBackend
            else:
                with pytest.raises(ValueError, match="--attention-backend FLASH_ATTN cannot read"):
                    get_attn_backend(128, torch.bfloat16, "rotkv4")


@pytest.mark.parametrize("kind,head,env,needle", [
    ("CPU", 64, None, None),
    ("CUDA", 128, None, None),
    ("CUDA", 96, None, "head_size 96 not supported by the fused CUDA kernels"),
    ("CUDA", 512, None, "head_size 512 not supported by the fused CUDA kernels"),
    ("CUDA", 64, "torch", "ROTKV_ATTENTION_IMPL=torch: the PyTorch path serves CPU caches only"),
    ("CPU", 64, "bogus", "ROTKV_ATTENTION_IMPL='bogus'"),
    ("ROCM", 128, None, "platform rocm not supported"),
    ("XPU", 128, None, "platform xpu not supported"),
])
def test_platform_reasons(monkeypatch, kind, head, env, needle):
    from rotkv_kernels.rotkv_cache import triton_available

    if kind == "CUDA" and not triton_available():
        pytest.skip("the CUDA checks without Triton report that first")
    if env is None:
        monkeypatch.delenv("ROTKV_ATTENTION_IMPL", raising=False)
    else:
        monkeypatch.setenv("ROTKV_ATTENTION_IMPL", env)
    reasons = vllm_plugin.platform_reasons(_fake_platform(kind), head)
    if needle is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and needle in reasons[0]


def test_cuda_selection_refuses_head_size_the_kernels_lack(fake_platform):
    fake_platform("CUDA")
    with pytest.raises(ValueError, match="head_size 96 not supported by the fused CUDA kernels"):
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.v1.attention.selector import get_attn_backend

        with set_current_vllm_config(VllmConfig()):
            get_attn_backend(96, torch.bfloat16, "rotkv2")  # 96 = 12 * 8: a Hadamard order, not a power of two


def test_selector_signature_check():
    import vllm.v1.attention.selector as selector

    vllm_plugin._check_selector_signature(selector._cached_get_attn_backend._rotkv_original)

    def newer(backend, attn_selector_config, num_heads=None, *, _run_kv_cache_dtype=None, extra=None):
        pass

    with pytest.raises(RuntimeError, match="written for"):
        vllm_plugin._check_selector_signature(newer)


@pytest.mark.parametrize("version,ok", [
    ("0.32.0", True), ("0.32.0+cpu", True), ("0.31.2", False), ("0.32.1", False), ("0.33.0rc1", False),
    ("0.32.0.post1", False), ("dev", False),
])
def test_version_gate(version, ok):
    if ok:
        vllm_plugin._check_vllm_version(version)
    else:
        with pytest.raises(RuntimeError, match="written for vLLM 0.32.0"):
            vllm_plugin._check_vllm_version(version)


@pytest.mark.slow
def test_vllm_bench_cli_lists_rotkv():
    """The installed ``vllm`` command (entry point discovery, no explicit register call) offers the dtypes in
    ``vllm bench latency``, whose parser is built from EngineArgs (``vllm serve`` runs in the e2e tests)."""
    cmd = ["bench", "latency"]
    import re
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("vllm")
    if not exe.exists():
        pytest.skip("no vllm command next to this interpreter")
    out = subprocess.run([str(exe), *cmd, "--help=kv-cache-dtype"], capture_output=True, text=True, timeout=600)
    m = re.search(r"--kv-cache-dtype \{([^}]*)\}", out.stdout)
    assert m, out.stdout[-2000:] + out.stderr[-2000:]
    assert set(ROTKV) <= set(m.group(1).split(","))
