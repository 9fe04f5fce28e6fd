"""What a RotateKV calibration resolves to for one served model and tensor-parallel rank (no vLLM import).

The vLLM backend (:mod:`rotkv_vllm.vllm_backend`) builds one :class:`RotateKVRuntime` per worker process and
hands its per-layer :class:`~rotkv_kernels.rotkv_paged.PagedCacheSpec` and :class:`KernelParams` to the kernels
of ``rotkv_kernels.rotkv_paged`` (write, reference), ``rotkv_paged_tiles`` (the CPU attention) and
``rotkv_paged_triton`` (the fused CUDA kernels). Everything here is plain PyTorch, so the Optimum side and the
tests import it without vLLM:

- :func:`effective_config` and :func:`check_servable`: the config the backend stores with, and the settings it
  refuses;
- :func:`check_served_model`: the model families it serves (:mod:`rotkv_vllm.model_support`);
- :func:`find_served_calibration`: the calibration of a model folder or Hub repo, checked against the model's
  config and weights (:mod:`rotkv_vllm.fingerprint`), or a refusal that names the command to run;
- :func:`select_attention_impl` / :func:`triton_precision`: the ``ROTKV_ATTENTION_IMPL`` and
  ``ROTKV_TRITON_PRECISION`` choices;
- :func:`install_runtime` / :func:`current_runtime`: the process-wide runtime.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import torch

from rotkv_kernels.rotkv_cache import interpret_requested, record_bytes, triton_available
from rotkv_kernels.rotkv_paged import PagedCacheSpec
from rotkv_kernels.rotkv_paged_tiles import CpuReadTables, interleave_order
from rotkv_kernels.rotkv_paged_triton import PRECISIONS
from rotkv_vllm.config import KV_CACHE_DTYPES, RotateKVConfig, RotateKVLayout
from rotkv_vllm.model_support import describe_model, vllm_refusal

__all__ = [
    "CALIBRATE_HINT",
    "ATTENTION_IMPL_ENV",
    "ATTENTION_IMPLS",
    "TRITON_PRECISION_ENV",
    "LayerCodec",
    "KernelParams",
    "RotateKVRuntime",
    "effective_config",
    "check_servable",
    "servable_reason",
    "check_served_model",
    "find_served_calibration",
    "rope_tables",
    "select_attention_impl",
    "check_attention_impl",
    "cpp_unavailable_reason",
    "triton_precision",
    "install_runtime",
    "installed_runtime",
    "current_runtime",
]

# Under vLLM's "vllm" logger, so these lines appear in `vllm serve` output with vLLM's own.
logger = logging.getLogger("vllm.rotkv_vllm.runtime")

CALIBRATE_HINT = "python -m rotkv_vllm.calibration {model} --calib-file YOUR_TEXT.txt --bits {bits}"
ATTENTION_IMPL_ENV = "ROTKV_ATTENTION_IMPL"
ATTENTION_IMPLS = ("auto", "cpp", "torch", "triton")
TRITON_PRECISION_ENV = "ROTKV_TRITON_PRECISION"
TRITON_PRECISIONS = PRECISIONS  # the fused attention's own product precisions


# ---- implementation choice ----------------------------------------------------------------------------------
def select_attention_impl(device: torch.device | str, specs: list[PagedCacheSpec] | None = None) -> str:
    """``"cpp"``, ``"torch"`` or ``"triton"``: the implementation that serves a cache on ``device``.

    ``ROTKV_ATTENTION_IMPL`` (default ``auto``) chooses: ``auto`` is ``triton`` on CUDA and, on the CPU, the
    fused C++ kernels (``cpp``, :mod:`rotkv_kernels.rotkv_paged_cpu`) when they are built and serve every
    layer's layout in ``specs``; otherwise ``torch``, announced by one warning that says why and names the
    build command (so a slow start is never silent). ``cpp``, ``torch`` and ``triton`` force one.

    Raises:
        ValueError: an unknown value of the variable, or a choice that cannot run on ``device``: ``torch``
            or ``cpp`` off the CPU, ``cpp`` without the built extension or for a layout outside its limits,
            ``triton`` without Triton, or on the CPU without ``TRITON_INTERPRET=1`` set before the kernels
            were imported.
    """
    raw = os.environ.get(ATTENTION_IMPL_ENV, "auto")
    choice = raw.strip().lower() or "auto"
    if choice not in ATTENTION_IMPLS:
        raise ValueError(f"{ATTENTION_IMPL_ENV}={raw!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
    dev = torch.device(device)
    if choice == "auto":
        if dev.type == "cuda":
            choice = "triton"
        elif dev.type == "cpu":
            why = cpp_unavailable_reason(specs)
            if why is None:
                choice = "cpp"
            else:
                choice = "torch"
                _warn_once(f"rotkv: the fused C++ CPU attention is not used, RotateKV attention runs on the PyTorch "
                           f"path (tens of times slower): {why}. Set {ATTENTION_IMPL_ENV}=torch to silence this, "
                           f"or {ATTENTION_IMPL_ENV}=cpp to refuse to start without the kernels")
    check_attention_impl(choice, dev, specs)
    return choice


def cpp_unavailable_reason(specs: list[PagedCacheSpec] | None = None) -> str | None:
    """None when the fused C++ CPU kernels are loaded and serve every layout in ``specs``; else one line
    saying why not (for a missing build it names the command that builds them)."""
    from rotkv_kernels.rotkv_paged_cpu import check_cpu_limits, cpu_kernels_status

    why = cpu_kernels_status()
    if why is not None:
        return why
    for spec in {id(s): s for s in specs or []}.values():
        try:
            check_cpu_limits(spec)
        except ValueError as e:
            return f"this model's cache layout is outside the CPU kernels' limits ({e})"
    return None


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def check_attention_impl(choice: str, device: torch.device | str, specs: list[PagedCacheSpec] | None = None) -> None:
    """Raise ``ValueError`` unless implementation ``choice`` can serve a cache on ``device`` with the layouts in
    ``specs`` (see :func:`select_attention_impl`)."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"RotateKV attention runs on CPU and CUDA caches, not on {dev.type}")
    if choice in ("torch", "cpp") and dev.type != "cpu":
        what = "the PyTorch path serves" if choice == "torch" else "the C++ kernels serve"
        raise ValueError(f"{ATTENTION_IMPL_ENV}={choice}: {what} CPU caches only; this cache is on {dev}. Use "
                         f"{ATTENTION_IMPL_ENV}=auto or triton")
    if choice == "cpp":
        why = cpp_unavailable_reason(specs)
        if why is not None:
            raise ValueError(f"{ATTENTION_IMPL_ENV}=cpp: {why}")
    if choice == "triton":
        if not triton_available():
            raise ValueError(f"{ATTENTION_IMPL_ENV}={choice} (the default on CUDA) needs Triton, which is not "
                             "installed: pip install triton, or serve on the CPU")
        from rotkv_kernels.hadamard_triton import is_interpreted

        if dev.type == "cpu" and not (interpret_requested() and is_interpreted()):
            raise ValueError(f"{ATTENTION_IMPL_ENV}=triton on the CPU runs the kernels in Triton's interpreter "
                             "(for tests): set TRITON_INTERPRET=1 before starting Python, or use "
                             f"{ATTENTION_IMPL_ENV}=auto/cpp/torch")


def triton_precision() -> str:
    """The fused attention's ``precision`` from ``ROTKV_TRITON_PRECISION`` (default ``fp16``).

    Raises:
        ValueError: a value other than ``fp16`` or ``fp32``.
    """
    raw = os.environ.get(TRITON_PRECISION_ENV, "fp16")
    value = raw.strip().lower() or "fp16"
    if value not in TRITON_PRECISIONS:
        raise ValueError(f"{TRITON_PRECISION_ENV}={raw!r}: expected one of {', '.join(TRITON_PRECISIONS)}")
    return value


# ---- the runtime --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCodec:
    """How one layer's K and V are packed.

    Attributes:
        key_order: this rank's channel order for keys, ``int64 [W]`` local indices, or None (no reorder).
        key_mean: this rank's calibrated pre-RoPE key mean ``fp32 [W]`` (``center_keys``), or None.
    """

    key_bits: int
    value_bits: int
    key_clip: float
    value_clip: float
    key_bytes: int
    value_bytes: int
    key_order: torch.Tensor | None
    key_mean: torch.Tensor | None = None


@dataclass(frozen=True)
class KernelParams:
    """One layer's arguments of the paged-cache kernels, on the cache's device (:meth:`RotateKVRuntime.kernel_params`).

    Attributes:
        spec: the layer's :class:`PagedCacheSpec` (:meth:`RotateKVRuntime.paged_spec`).
        key_perm / inv_perm: ``int64 [W]`` calibrated key channel order and its inverse, or None.
        key_mean: ``fp32 [W]`` calibrated pre-RoPE key mean, or None.
        rope_cos / rope_sin: ``fp32 [max_position, D]`` HF-convention tables of the layer (shared by the layers
            with the same RoPE parameters), or None when keys are stored post-RoPE.
    """

    spec: PagedCacheSpec
    key_perm: torch.Tensor | None
    inv_perm: torch.Tensor | None
    key_mean: torch.Tensor | None
    rope_cos: torch.Tensor | None
    rope_sin: torch.Tensor | None


@dataclass
class RotateKVRuntime:
    """Everything the backend needs about the model, resolved once per process.

    Attributes:
        config: the RotateKV config, with the bits of the ``--kv-cache-dtype`` name.
        layout: head grouping and quantization group on this rank.
        num_layers: decoder layers (one codec each).
        key_orders: per layer, this rank's key channel order (``int64 [W]``), or None without reorder.
        key_means: per layer, this rank's pre-RoPE key mean (``fp32 [W]``), or None without center_keys.
        dtype: activation dtype (sink tokens are stored in it).
        rope_cos / rope_sin: ``fp32 [max_position, D]`` in the HF convention, or None (pre_rope off): every
            layer's tables unless ``layer_ropes`` is given.
        layer_ropes: per layer, its own ``(rope_cos, rope_sin)`` (Gemma 3: local layers with their base, global
            layers with theirs; layers with the same parameters share the tensors), or None.
        sliding_windows: per layer, its sliding window (0: none; :func:`rotkv_vllm.model_support.layer_attention`),
            or None (no layer slides).
        tp_rank / tp_size: this rank among the tensor-parallel ranks.
        key: identifies the (model, dtype, rank) this runtime was built for.

    Per-layer tables are built on first use and kept in the private ``_``-fields below (one entry per layer,
    or per layer and device): the codecs, the kernels' specs and parameters, and the CPU read tables.
    """

    config: RotateKVConfig
    layout: RotateKVLayout
    num_layers: int
    key_orders: list[torch.Tensor] | None
    dtype: torch.dtype
    key_means: list[torch.Tensor] | None = None
    rope_cos: torch.Tensor | None = None
    rope_sin: torch.Tensor | None = None
    layer_ropes: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    sliding_windows: list[int] | None = None
    tp_rank: int = 0
    tp_size: int = 1
    key: tuple = ()
    _codecs: dict[int, LayerCodec] = field(default_factory=dict, init=False, repr=False)
    _specs: dict[int, PagedCacheSpec] = field(default_factory=dict, init=False, repr=False)
    _params: dict[tuple[int, str], KernelParams] = field(default_factory=dict, init=False, repr=False)
    _device_rope: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False,
                                                                                    repr=False)
    _cpu_tables: dict[int, CpuReadTables] = field(default_factory=dict, init=False, repr=False)
    _rope_complex: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_servable(self.config)
        if self.layer_ropes is not None:
            if len(self.layer_ropes) != self.num_layers:
                raise ValueError(f"{len(self.layer_ropes)} per-layer RoPE tables for {self.num_layers} layers")
        elif self.config.pre_rope and (self.rope_cos is None or self.rope_sin is None):
            raise ValueError("pre_rope=True needs the model's RoPE tables (rope_cos, rope_sin, or layer_ropes)")
        if self.sliding_windows is not None:
            if len(self.sliding_windows) != self.num_layers:
                raise ValueError(f"{len(self.sliding_windows)} sliding windows for {self.num_layers} layers")
            short = [i for i, w in enumerate(self.sliding_windows) if w and w < self.recent_window]
            if short:
                raise ValueError(f"layer {short[0]} has a sliding window of {self.sliding_windows[short[0]]} tokens, "
                                 f"shorter than the full-precision recent window of {self.recent_window}")
        if self.key_orders is not None and len(self.key_orders) != self.num_layers:
            raise ValueError(f"{len(self.key_orders)} key orders for {self.num_layers} layers")
        if self.config.reorder and self.key_orders is None:
            raise ValueError("reorder=True needs the calibrated key orders")
        if self.config.center_keys and (self.key_means is None or len(self.key_means) != self.num_layers):
            raise ValueError("center_keys=True needs the calibrated key means of every layer")
        bad = [i for i in self.config.boosted_layers if i >= self.num_layers]
        if bad:
            raise ValueError(f"boosted_layers {bad} do not exist in a model with {self.num_layers} layers")

    # ---- sizes ----------------------------------------------------------------------------------
    def codec(self, layer: int) -> LayerCodec:
        if layer not in self._codecs:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"layer {layer} out of range for {self.num_layers} layers")
            cfg, lay = self.config, self.layout
            kb, vb = cfg.bits_for_layer(layer)
            kc, vc = cfg.clip_ratios(kb, vb)
            order = self.key_orders[layer] if (cfg.reorder and self.key_orders is not None) else None
            self._codecs[layer] = LayerCodec(
                key_bits=kb, value_bits=vb, key_clip=kc, value_clip=vc,
                key_bytes=record_bytes(lay.kv_width, kb, lay.group_size, cfg.scale_format),
                value_bytes=record_bytes(lay.kv_width, vb, lay.value_group_size, cfg.scale_format),
                key_order=order,
                key_mean=self.key_means[layer] if cfg.center_keys else None,
            )
        return self._codecs[layer]

    @property
    def record_bytes(self) -> int:
        """``C``: bytes per token slot, the largest layer's K + V records, rounded up to an even count
        (so that the sink area that follows a page of records stays aligned for 16-bit dtypes)."""
        c = max(self.codec(i).key_bytes + self.codec(i).value_bytes for i in range(self.num_layers))
        return c + (c % 2)

    @property
    def sink_tokens(self) -> int:
        return self.config.max_sink_tokens if self.config.sink_mode == "first" else 0

    def sliding_window(self, layer: int) -> int:
        """``layer``'s sliding window (0: it attends over every earlier token)."""
        return self.sliding_windows[layer] if self.sliding_windows is not None else 0

    def rope(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """``layer``'s HF-convention ``(rope_cos, rope_sin)`` on the host, or ``(None, None)`` without pre_rope."""
        if not self.config.pre_rope:
            return None, None
        if self.layer_ropes is not None:
            return self.layer_ropes[layer]
        return self.rope_cos, self.rope_sin

    @property
    def recent_window(self) -> int:
        """``R``: each query reads its last ``R`` keys in full precision (the preset's window)."""
        return self.config.recent_window

    @property
    def ring_slots(self) -> int:
        """Full-precision ring slots per page for the recent window: ``R - 1`` (a query's own token comes from
        its step, the ``R - 1`` before it from the rings)."""
        return max(self.recent_window - 1, 0)

    @property
    def sink_token_bytes(self) -> int:
        """Bytes of one sink (or ring) token: K and V of all heads on this rank in the model dtype."""
        return 2 * self.layout.kv_width * torch.tensor([], dtype=self.dtype).element_size()

    def page_bytes(self, block_size: int) -> int:
        """Bytes of one block of one layer: the token records plus the full-precision area (sinks, then the
        recent window's ring), so vLLM's planner counts every byte the cache uses."""
        return block_size * self.record_bytes + (self.sink_tokens + self.ring_slots) * self.sink_token_bytes

    def bytes_per_token(self, block_size: int) -> float:
        return self.page_bytes(block_size) / block_size

    # ---- what the kernels take ------------------------------------------------------------------
    def paged_spec(self, layer: int) -> PagedCacheSpec:
        """The kernels' description of ``layer``'s slots: its codec's bits and clips, this rank's head
        grouping and quantization groups, the model-wide slot size ``C`` (:attr:`record_bytes`) and sink
        count. ``paged_spec(i).page_bytes(block_size, dtype)`` equals :meth:`page_bytes` for every layer.
        Values are rotated per head (``value_rot_width = D``), or not at all with ``rotate_values=False``."""
        if layer not in self._specs:
            codec, lay, cfg = self.codec(layer), self.layout, self.config
            self._specs[layer] = PagedCacheSpec(
                num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim, key_bits=codec.key_bits,
                value_bits=codec.value_bits, key_group_size=lay.group_size, value_group_size=lay.value_group_size,
                key_rot_width=lay.group_width, value_rot_width=lay.head_dim if cfg.rotate_values else 1,
                key_clip=codec.key_clip, value_clip=codec.value_clip, scale_format=cfg.scale_format,
                record_bytes=self.record_bytes, sink_tokens=self.sink_tokens, recent_window=self.recent_window,
                sliding_window=self.sliding_window(layer),
            )
        return self._specs[layer]

    def paged_specs(self) -> list[PagedCacheSpec]:
        """Every layer's :meth:`paged_spec` (what an implementation must serve)."""
        return [self.paged_spec(i) for i in range(self.num_layers)]

    def kernel_params(self, layer: int, device: torch.device | str) -> KernelParams:
        """``layer``'s kernel arguments on ``device``, built on first use and kept (one host-to-device copy per
        layer and device for the whole run; each distinct RoPE table once per device)."""
        device = torch.device(device)
        key = (layer, str(device))
        if key not in self._params:
            codec = self.codec(layer)
            perm = inv = None
            if codec.key_order is not None:
                perm = codec.key_order.to(device=device, dtype=torch.int64).contiguous()
                inv = torch.empty_like(perm)
                inv[perm] = torch.arange(perm.numel(), device=device, dtype=torch.int64)
            mean = None if codec.key_mean is None else codec.key_mean.to(device, torch.float32).contiguous()
            cos, sin = self.rope(layer)
            if cos is not None:
                rkey = (id(cos), str(device))
                if rkey not in self._device_rope:
                    self._device_rope[rkey] = (cos.to(device, torch.float32).contiguous(),
                                               sin.to(device, torch.float32).contiguous())
                cos, sin = self._device_rope[rkey]
            self._params[key] = KernelParams(spec=self.paged_spec(layer), key_perm=perm, inv_perm=inv, key_mean=mean,
                                             rope_cos=cos, rope_sin=sin)
        return self._params[key]

    def cpu_tables(self, layer: int) -> CpuReadTables:
        """``layer``'s read tables for the CPU attention (``rotkv_paged_tiles``): key channels come out with RoPE
        pairs interleaved when keys are stored pre-RoPE; a complex RoPE table is shared by the layers with the same
        RoPE tables."""
        if layer not in self._cpu_tables:
            lay = self.layout
            p = self.kernel_params(layer, "cpu")
            rope = None
            if self.config.pre_rope:
                order = interleave_order(lay.num_kv_heads, lay.head_dim)
                cos, sin = self.rope(layer)
                if id(cos) not in self._rope_complex:
                    self._rope_complex[id(cos)] = CpuReadTables.rope_table(cos, sin)
                rope = self._rope_complex[id(cos)]
            else:
                order = torch.arange(lay.kv_width)
            self._cpu_tables[layer] = CpuReadTables.build(p.spec, key_perm=p.key_perm, key_mean=p.key_mean,
                                                          channel_order=order, rope=rope)
        return self._cpu_tables[layer]

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_calibration(
        cls,
        calibration,
        kv_cache_dtype: str,
        *,
        dtype: torch.dtype,
        rope: tuple[torch.Tensor, torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]] | None,
        tp_rank: int = 0,
        tp_size: int = 1,
        key: tuple = (),
        sliding_windows: list[int] | None = None,
    ) -> "RotateKVRuntime":
        """Resolve a loaded calibration for ``--kv-cache-dtype kv_cache_dtype`` on one rank.

        The bits come from the dtype name (``rotkv2`` = 2 bits for K and V); every other setting and the
        key channel orders come from the calibration. ``rope`` is one ``(cos, sin)`` pair for every layer or a
        list of one per layer; ``sliding_windows`` one window per layer (0: none).

        Raises:
            ValueError: an unknown dtype name, a config this backend cannot serve, or head groups that
                would straddle tensor-parallel ranks.
        """
        cfg = effective_config(calibration, kv_cache_dtype)
        layout = calibration.layout(tp_size)
        n_layers = int(calibration.model_info["num_hidden_layers"])
        orders = None
        if cfg.reorder:
            orders = [calibration.key_order_for_rank(i, tp_rank, tp_size).to(torch.int64) for i in range(n_layers)]
        means = None
        if cfg.center_keys:
            w = layout.kv_width
            means = [m.to(torch.float32)[tp_rank * w:(tp_rank + 1) * w].contiguous() for m in calibration.key_means]
        cos = sin = layer_ropes = None
        if rope is not None and cfg.pre_rope:
            if isinstance(rope, list):
                layer_ropes = rope
            else:
                cos, sin = rope
        return cls(config=cfg, layout=layout, num_layers=n_layers, key_orders=orders, dtype=dtype, key_means=means,
                   rope_cos=cos, rope_sin=sin, layer_ropes=layer_ropes, sliding_windows=sliding_windows,
                   tp_rank=tp_rank, tp_size=tp_size, key=key)


def effective_config(calibration, kv_cache_dtype: str) -> RotateKVConfig:
    """The config the backend stores with: the calibration's, with the key/value bits and the recent window of
    the ``kv_cache_dtype`` preset (``rotkv2`` = 2-bit K and V, ``rotkv_k3v2`` = 3-bit K and 2-bit V; see
    :data:`rotkv_vllm.config.KV_CACHE_DTYPES`) and the calibrated head grouping. The transformers reference
    given this config and the same calibration computes what the backend computes.

    Raises:
        ValueError: an unknown dtype name.
    """
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: expected one of {sorted(KV_CACHE_DTYPES)}")
    p = KV_CACHE_DTYPES[kv_cache_dtype]
    cfg = calibration.config
    if (cfg.key_bits, cfg.value_bits) != (p.key_bits, p.value_bits):
        logger.info("rotkv: calibration made for K%d/V%d; --kv-cache-dtype %s stores K%d/V%d",
                    cfg.key_bits, cfg.value_bits, kv_cache_dtype, p.key_bits, p.value_bits)
    if cfg.recent_window != p.recent_window:
        logger.info("rotkv: calibration config has recent_window=%d; --kv-cache-dtype %s keeps the last %d tokens "
                    "in full precision", cfg.recent_window, kv_cache_dtype, p.recent_window)
    return dataclasses.replace(cfg, key_bits=p.key_bits, value_bits=p.value_bits, recent_window=p.recent_window,
                               head_group_size=calibration.head_group_size)


def servable_reason(config: RotateKVConfig) -> str | None:
    """Why the vLLM backend cannot serve ``config`` (one clause, for messages and model cards), or None."""
    if config.sink_mode == "topk":
        return ("sink_mode='topk' picks sinks from the layer's input residual stream, which a vLLM attention "
                "backend never sees")
    return None


def check_servable(config: RotateKVConfig) -> None:
    """Raise ``ValueError`` for the config settings the vLLM backend does not implement, naming the fix."""
    why = servable_reason(config)
    if why is None:
        return
    fix = ("sink_mode='first' (e.g. `python -m rotkv_vllm.calibration MODEL --calib-file FILE --config-json "
           "CFG.json` with \"sink_mode\": \"first\" in CFG.json)")
    raise ValueError(f"this RotateKV calibration cannot be served by vLLM: {why}. Recalibrate with {fix}")


def check_served_model(hf_config, kv_cache_dtype: str) -> None:
    """Raise ``ValueError`` unless the backend serves ``hf_config``'s model family (the shared list of
    :mod:`rotkv_vllm.model_support`, and its ``vllm_refusal``: a sliding window shorter than the preset's recent
    window), with the reason and ``--kv-cache-dtype auto`` as the way out."""
    try:
        describe_model(hf_config)
        win = KV_CACHE_DTYPES[kv_cache_dtype].recent_window if kv_cache_dtype in KV_CACHE_DTYPES else 0
        why = vllm_refusal(hf_config, win)
    except ValueError as e:
        why = str(e)
    if why is not None:
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype}: {why}; serve it with --kv-cache-dtype auto")


def find_served_calibration(model: str, revision: str | None, hf_config, kv_cache_dtype: str):
    """The loaded calibration of ``model`` (a folder or Hub repo id at ``revision``), checked against the model's
    config (shapes) and checkpoint weights (:func:`rotkv_vllm.fingerprint.check_checkpoint_fingerprint`).

    Raises:
        ValueError: no calibration (the message holds the command that makes one), one made for another
            model's shapes or weights (the message names the recalibration command and the override).
    """
    from rotkv_vllm.calibration import find_calibration, load_calibration
    from rotkv_vllm.fingerprint import check_checkpoint_fingerprint

    folder = find_calibration(model, revision)
    if folder is None:
        raise ValueError(
            f"--kv-cache-dtype {kv_cache_dtype}: no RotateKV calibration (rotkv_config.json + rotkv.safetensors) "
            f"in {model} or its Hugging Face cache snapshot. Calibrate first:\n    "
            + CALIBRATE_HINT.format(model=model, bits=KV_CACHE_DTYPES[kv_cache_dtype].bits
                                   if kv_cache_dtype in KV_CACHE_DTYPES else 2)
        )
    calib = load_calibration(folder)
    calib.check_model(hf_config)
    check_checkpoint_fingerprint(calib, model, revision)
    return calib


def rope_tables(rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-convention ``(cos, sin)``, ``fp32 [max_position, D]``, from a vLLM ``RotaryEmbedding``.

    vLLM's neox-style cache row is ``[cos(p f_i) | sin(p f_i)]`` over ``i < D/2`` (any scaling factor
    folded in); HF's convention repeats each half: ``cos = [c | c]``, ``sin = [s | s]``.

    Raises:
        ValueError: partial rotary embeddings or GPT-J (non-neox) style, which the kernels do not apply.
    """
    if not getattr(rotary_emb, "is_neox_style", False):
        raise ValueError("RotateKV supports neox-style (rotate_half) RoPE only; this model uses GPT-J style")
    if rotary_emb.rotary_dim != rotary_emb.head_size:
        raise ValueError(
            f"partial rotary embeddings (rotary_dim={rotary_emb.rotary_dim} < head_size={rotary_emb.head_size}) "
            "are not supported by RotateKV"
        )
    cache = rotary_emb._compute_cos_sin_cache().to(torch.float32)
    c, s = cache.chunk(2, dim=-1)
    return torch.cat((c, c), dim=-1).contiguous(), torch.cat((s, s), dim=-1).contiguous()


# ---- process-wide runtime (one model per vLLM worker process) ------------------------------------------------
_RUNTIME: RotateKVRuntime | None = None


def install_runtime(runtime: RotateKVRuntime | None) -> None:
    """Make ``runtime`` the one :func:`current_runtime` returns (tests, and the backend's ``resolve_runtime``)."""
    global _RUNTIME
    _RUNTIME = runtime


def installed_runtime() -> RotateKVRuntime | None:
    """The runtime :func:`install_runtime` made current in this process, or None."""
    return _RUNTIME


def current_runtime() -> RotateKVRuntime:
    """The installed runtime (what the backend's classes use once the first attention layer resolved it).

    Raises:
        RuntimeError: none is installed yet.
    """
    if _RUNTIME is None:
        raise RuntimeError("the RotateKV runtime is not resolved yet: no RotateKV attention layer was built")
    return _RUNTIME
