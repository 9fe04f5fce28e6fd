"""RotateKV attention backend for vLLM 0.32: a packed uint8 paged KV cache, served by the PyTorch path on
the CPU and by the fused Triton kernels of ``rotkv_kernels.rotkv_paged`` on CUDA (same four classes).

Cache layout. Every layer's cache is one page per block of ``block_size`` tokens, declared to vLLM's
planner through :meth:`RotateKVAttentionBackend.customize_spec` (one head slot, ``C`` bytes per token),
so ``num_blocks`` is computed from the packed size and the engine reports the real capacity::

    page = [ block_size token records of C bytes | sink area: S tokens x (K, V) in the model dtype ]
    token record (C bytes) = K record | V record | zero padding up to the largest layer's K+V
    K record = rotkv_write(pre-RoPE K [H, D], rot_width = g * D, perm = calibrated key order)
    V record = rotkv_write(V [H, D], rot_width = D (per-head Hadamard; 1 with rotate_values=False))
    a record = packed codes (W * bits / 8 bytes) | scales of all groups | zeros of all groups

with ``W = H * D`` the KV width on this tensor-parallel rank. For 2 bits, fp16 scale + fp16 zero and a
quantization group of ``G`` channels a record stores ``2 + 32 / G`` bits per element (2.25 at G=128).

Keys arrive post-RoPE (the model applies RoPE before the attention layer); with ``pre_rope`` the store
undoes RoPE at each token's position in fp32 (``k = (k' cos - rot(k') sin) / (cos^2 + sin^2)``) and the
read applies it again at each cached key's position after the inverse permutation and Hadamard.

Attention sinks (``sink_mode="first"``): the first ``S = max_sink_tokens`` positions of a sequence live
in its first block, so the block's sink area keeps their K (post-RoPE) and V exactly as the model produced
them; reads use them instead of the dequantized records. Because the sink area belongs to the block,
prefix caching (which shares whole blocks between sequences with the same prefix), preemption and
recomputation need no extra bookkeeping. ``sink_mode="topk"`` needs the layer's input residual, which an
attention backend never sees, and is refused at start-up, as is ``recent_window > 0``.

Every attention read goes through the packed cache, including the tokens written in the same step, so
prefill, chunked prefill and decode all attend over exactly what the cache holds (as the transformers
reference in :mod:`rotkv_vllm.reference` does). Per step the builder plans *tiles* (requests with similar
lengths, padded to a common query and context length, within a memory budget); per layer each tile is one
gather of records over the blocks its sequences use, one dequantization and one SDPA call. Nothing loops
over tokens.

Two implementations read and write the same bytes (:func:`select_attention_impl` picks one per step):

- ``"torch"`` (the CPU default): the builder plans tiles; ``store`` encodes with ``rotkv_write_ref`` and
  scatters, ``attend`` gathers, dequantizes and runs SDPA per tile (below). CPU caches only.
- ``"triton"`` (the CUDA default): ``store`` is one ``paged_write_triton`` launch (inverse RoPE, key mean,
  Hadamard, permutation, quantization, packing and the scatter by slot mapping, sinks included) and
  ``attend`` is ``paged_attention_triton`` (split-K paged attention over the packed cache plus its reduce
  pass) over vLLM's own block table, ``seq_lens`` and ``query_start_loc``. Per-layer parameters (the
  :class:`rotkv_kernels.rotkv_paged.PagedCacheSpec`, key permutation and its inverse, key mean, RoPE
  tables) are moved to the device once (:meth:`RotateKVRuntime.fused_params`); the kernels' work list is
  planned once per step and shared by all layers. On the CPU it runs only under ``TRITON_INTERPRET=1``
  (tests).

``ROTKV_ATTENTION_IMPL`` (``auto``, ``torch`` or ``triton``) overrides the choice; an impossible choice
raises ``ValueError`` (no silent fallback). ``ROTKV_TRITON_PRECISION`` (``fp16``, the default, or ``fp32``)
sets the fused attention's product precision (see ``rotkv_kernels.rotkv_paged_triton``).

Calibration: the backend loads ``rotkv_config.json`` + ``rotkv.safetensors`` from the model folder (or
its Hugging Face cache snapshot). Without them it refuses to start and names the calibration command:
an uncalibrated cache would silently lose the channel reordering the accuracy depends on.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from rotkv_kernels.hadamard import has_hadamard
from rotkv_kernels.rotkv_paged import PagedCacheSpec
from rotkv_kernels.rotkv_paged_triton import PRECISIONS
from rotkv_vllm.config import KV_CACHE_DTYPES, RotateKVConfig, RotateKVLayout

__all__ = [
    "RotateKVRuntime",
    "LayerCodec",
    "resolve_runtime",
    "effective_config",
    "check_servable",
    "current_runtime",
    "install_runtime",
    "rope_tables",
    "ATTENTION_IMPL_ENV",
    "ATTENTION_IMPLS",
    "TRITON_PRECISION_ENV",
    "select_attention_impl",
    "check_attention_impl",
    "triton_precision",
    "FusedLayerParams",
    "RotateKVAttentionMetadata",
    "RotateKVAttentionMetadataBuilder",
    "RotateKVAttentionBackend",
    "RotateKVAttentionImpl",
]

# Under vLLM's "vllm" logger, so these lines appear in `vllm serve` output with vLLM's own.
logger = logging.getLogger(f"vllm.{__name__}")

CALIBRATE_HINT = "python -m rotkv_vllm.calibration {model} --calib-file YOUR_TEXT.txt --bits {bits}"
# Model types whose vLLM attention receives RoPE(k_proj(x)) keys (no per-head key norm), so the
# calibrated pre-RoPE statistics (taken at k_proj's output) describe what the backend quantizes.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Memory budgets of one attention tile (elements): gathered context tokens x KV width, and scores.
_TILE_CONTEXT_TOKENS = 16384
_TILE_SCORES = 1 << 22


ATTENTION_IMPL_ENV = "ROTKV_ATTENTION_IMPL"
ATTENTION_IMPLS = ("auto", "torch", "triton")
TRITON_PRECISION_ENV = "ROTKV_TRITON_PRECISION"
TRITON_PRECISIONS = PRECISIONS  # the fused attention's own product precisions


def select_attention_impl(device: torch.device | str) -> str:
    """``"torch"`` or ``"triton"``: the implementation that serves a cache on ``device``.

    ``ROTKV_ATTENTION_IMPL`` (default ``auto``) chooses: ``auto`` is ``triton`` on CUDA and ``torch`` on
    the CPU; ``torch`` and ``triton`` force one.

    Raises:
        ValueError: an unknown value of the variable, or a choice that cannot run on ``device``: ``torch``
            off the CPU (its tile planning and tables live on the host), ``triton`` without Triton, or on
            the CPU without ``TRITON_INTERPRET=1`` set before the kernels were imported.
    """
    raw = os.environ.get(ATTENTION_IMPL_ENV, "auto")
    choice = raw.strip().lower() or "auto"
    if choice not in ATTENTION_IMPLS:
        raise ValueError(f"{ATTENTION_IMPL_ENV}={raw!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
    dev = torch.device(device)
    if choice == "auto":
        choice = "triton" if dev.type == "cuda" else "torch"
    check_attention_impl(choice, dev)
    return choice


def check_attention_impl(choice: str, device: torch.device | str) -> None:
    """Raise ``ValueError`` unless implementation ``choice`` can serve a cache on ``device`` (see
    :func:`select_attention_impl`)."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"RotateKV attention runs on CPU and CUDA caches, not on {dev.type}")
    if choice == "torch" and dev.type != "cpu":
        raise ValueError(f"{ATTENTION_IMPL_ENV}=torch: the PyTorch path serves CPU caches only; this cache is on "
                         f"{dev}. Use {ATTENTION_IMPL_ENV}=auto or triton")
    if choice == "triton":
        from rotkv_kernels.hadamard_triton import is_interpreted
        from rotkv_kernels.rotkv_cache import _interpret_env, triton_available

        if not triton_available():
            raise ValueError(f"{ATTENTION_IMPL_ENV}={choice} (the default on CUDA) needs Triton, which is not "
                             "installed: pip install triton, or serve on the CPU")
        if dev.type == "cpu" and not (_interpret_env() and is_interpreted()):
            raise ValueError(f"{ATTENTION_IMPL_ENV}=triton on the CPU runs the kernels in Triton's interpreter "
                             "(for tests): set TRITON_INTERPRET=1 before starting Python, or use "
                             f"{ATTENTION_IMPL_ENV}=auto/torch")


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


def _write(x: torch.Tensor, **kw) -> torch.Tensor:
    """``rotkv_write`` on CUDA (Triton); the PyTorch reference on the CPU, whatever ``TRITON_INTERPRET`` says
    (the interpreter is for testing kernels, far too slow to serve)."""
    from rotkv_kernels import rotkv_cache

    return (rotkv_cache.rotkv_write if x.is_cuda else rotkv_cache.rotkv_write_ref)(x, **kw)


# ================================================================================================
# Runtime: the calibration resolved against one model and one tensor-parallel rank
# ================================================================================================
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
class FusedLayerParams:
    """One layer's arguments of the fused kernels, on the cache's device (:meth:`RotateKVRuntime.fused_params`).

    Attributes:
        spec: the layer's :class:`PagedCacheSpec` (:meth:`RotateKVRuntime.paged_spec`).
        key_perm / inv_perm: ``int64 [W]`` calibrated key channel order and its inverse, or None.
        key_mean: ``fp32 [W]`` calibrated pre-RoPE key mean, or None.
        rope_cos / rope_sin: ``fp32 [max_position, D]`` HF-convention tables (shared by all layers), or None
            when keys are stored post-RoPE.
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
        rope_cos / rope_sin: ``fp32 [max_position, D]`` in the HF convention, or None (pre_rope off).
        tp_rank / tp_size: this rank among the tensor-parallel ranks.
        key: identifies the (model, dtype, rank) this runtime was built for.
    """

    config: RotateKVConfig
    layout: RotateKVLayout
    num_layers: int
    key_orders: list[torch.Tensor] | None
    dtype: torch.dtype
    key_means: list[torch.Tensor] | None = None
    rope_cos: torch.Tensor | None = None
    rope_sin: torch.Tensor | None = None
    tp_rank: int = 0
    tp_size: int = 1
    key: tuple = ()
    _codecs: dict[int, LayerCodec] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_servable(self.config)
        if self.config.pre_rope and (self.rope_cos is None or self.rope_sin is None):
            raise ValueError("pre_rope=True needs the model's RoPE tables (rope_cos, rope_sin)")
        if self.key_orders is not None and len(self.key_orders) != self.num_layers:
            raise ValueError(f"{len(self.key_orders)} key orders for {self.num_layers} layers")
        if self.config.reorder and self.key_orders is None:
            raise ValueError("reorder=True needs the calibrated key orders")
        if self.config.center_keys and (self.key_means is None or len(self.key_means) != self.num_layers):
            raise ValueError("center_keys=True needs the calibrated key means of every layer")
        bad = [i for i in self.config.boosted_layers if i >= self.num_layers]
        if bad:
            raise ValueError(f"boosted_layers {bad} do not exist in a model with {self.num_layers} layers")

    # ---- CPU read path ----------------------------------------------------------------------------
    @property
    def key_channel_order(self) -> torch.Tensor:
        """Order of decoded key channels (and of queries): RoPE pairs interleaved when RoPE is applied."""
        if "_korder" not in self.__dict__:
            lay = self.layout
            self.__dict__["_korder"] = (interleave_order(lay.num_kv_heads, lay.head_dim) if self.config.pre_rope
                                        else torch.arange(lay.kv_width))
        return self.__dict__["_korder"]

    def key_decoder(self, layer: int) -> KeyDecoder:
        cache = self.__dict__.setdefault("_decoders", {})
        if layer not in cache:
            lay = self.layout
            cache[layer] = KeyDecoder.build(lay.kv_width, lay.group_width, self.codec(layer).key_order,
                                            self.key_channel_order)
        return cache[layer]

    @property
    def rope_complex(self) -> torch.Tensor:
        """``complex64 [max_position, D/2]``: ``cos + i sin`` of each position and frequency."""
        if "_rope_c" not in self.__dict__:
            half = self.layout.head_dim // 2
            self.__dict__["_rope_c"] = torch.complex(self.rope_cos[:, :half].contiguous(),
                                                     self.rope_sin[:, :half].contiguous())
        return self.__dict__["_rope_c"]

    # ---- sizes ----------------------------------------------------------------------------------
    def codec(self, layer: int) -> LayerCodec:
        if layer not in self._codecs:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"layer {layer} out of range for {self.num_layers} layers")
            cfg, lay = self.config, self.layout
            kb, vb = cfg.bits_for_layer(layer)
            kc, vc = cfg.clip_ratios(kb, vb)
            from rotkv_kernels.rotkv_cache import record_bytes as rb

            order = self.key_orders[layer] if (cfg.reorder and self.key_orders is not None) else None
            self._codecs[layer] = LayerCodec(
                key_bits=kb, value_bits=vb, key_clip=kc, value_clip=vc,
                key_bytes=rb(lay.kv_width, kb, lay.group_size, cfg.scale_format),
                value_bytes=rb(lay.kv_width, vb, lay.value_group_size, cfg.scale_format),
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

    @property
    def sink_token_bytes(self) -> int:
        """Bytes of one sink token: K and V of all heads on this rank in the model dtype."""
        return 2 * self.layout.kv_width * torch.tensor([], dtype=self.dtype).element_size()

    def page_bytes(self, block_size: int) -> int:
        """Bytes of one block of one layer: the token records plus the sink area."""
        return block_size * self.record_bytes + self.sink_tokens * self.sink_token_bytes

    def bytes_per_token(self, block_size: int) -> float:
        return self.page_bytes(block_size) / block_size

    # ---- fused (Triton) path --------------------------------------------------------------------
    def paged_spec(self, layer: int) -> PagedCacheSpec:
        """The kernels' description of ``layer``'s slots: its codec's bits and clips, this rank's head
        grouping and quantization groups, the model-wide slot size ``C`` (:attr:`record_bytes`) and sink
        count. ``paged_spec(i).page_bytes(block_size, dtype)`` equals :meth:`page_bytes` for every layer."""
        cache = self.__dict__.setdefault("_paged_specs", {})
        if layer not in cache:
            codec, lay, cfg = self.codec(layer), self.layout, self.config
            cache[layer] = PagedCacheSpec(
                num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim, key_bits=codec.key_bits,
                value_bits=codec.value_bits, key_group_size=lay.group_size, value_group_size=lay.value_group_size,
                key_rot_width=lay.group_width, value_rot_width=lay.head_dim if cfg.rotate_values else 1,
                key_clip=codec.key_clip, value_clip=codec.value_clip, scale_format=cfg.scale_format,
                record_bytes=self.record_bytes, sink_tokens=self.sink_tokens,
            )
        return cache[layer]

    def fused_params(self, layer: int, device: torch.device) -> FusedLayerParams:
        """``layer``'s fused-kernel arguments on ``device``, built on first use and kept (one host-to-device
        copy per layer and device for the whole run; the RoPE tables once per device)."""
        device = torch.device(device)
        cache = self.__dict__.setdefault("_fused_params", {})
        key = (layer, str(device))
        if key not in cache:
            codec = self.codec(layer)
            perm = inv = None
            if codec.key_order is not None:
                perm = codec.key_order.to(device=device, dtype=torch.int64).contiguous()
                inv = torch.empty_like(perm)
                inv[perm] = torch.arange(perm.numel(), device=device, dtype=torch.int64)
            mean = None if codec.key_mean is None else codec.key_mean.to(device, torch.float32).contiguous()
            ropes = self.__dict__.setdefault("_device_rope", {})
            if self.config.pre_rope and str(device) not in ropes:
                ropes[str(device)] = (self.rope_cos.to(device, torch.float32).contiguous(),
                                      self.rope_sin.to(device, torch.float32).contiguous())
            cos, sin = ropes[str(device)] if self.config.pre_rope else (None, None)
            cache[key] = FusedLayerParams(spec=self.paged_spec(layer), key_perm=perm, inv_perm=inv, key_mean=mean,
                                          rope_cos=cos, rope_sin=sin)
        return cache[key]

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_calibration(
        cls,
        calibration,
        kv_cache_dtype: str,
        *,
        dtype: torch.dtype,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        tp_rank: int = 0,
        tp_size: int = 1,
        key: tuple = (),
    ) -> "RotateKVRuntime":
        """Resolve a loaded calibration for ``--kv-cache-dtype kv_cache_dtype`` on one rank.

        The bits come from the dtype name (``rotkv2`` = 2 bits for K and V); every other setting and the
        key channel orders come from the calibration.

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
        cos, sin = rope if (rope is not None and cfg.pre_rope) else (None, None)
        return cls(config=cfg, layout=layout, num_layers=n_layers, key_orders=orders, dtype=dtype, key_means=means,
                   rope_cos=cos, rope_sin=sin, tp_rank=tp_rank, tp_size=tp_size, key=key)


def effective_config(calibration, kv_cache_dtype: str) -> RotateKVConfig:
    """The config the backend stores with: the calibration's, with the bits of ``kv_cache_dtype``
    (``rotkv2`` = 2-bit K and V) and the calibrated head grouping. The transformers reference given this
    config and the same calibration computes what the backend computes.

    Raises:
        ValueError: an unknown dtype name.
    """
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: expected one of {sorted(KV_CACHE_DTYPES)}")
    bits = KV_CACHE_DTYPES[kv_cache_dtype]
    cfg = calibration.config
    if (cfg.key_bits, cfg.value_bits) != (bits, bits):
        logger.info("rotkv: calibration made for K%d/V%d; --kv-cache-dtype %s stores K%d/V%d",
                    cfg.key_bits, cfg.value_bits, kv_cache_dtype, bits, bits)
        cfg = dataclasses.replace(cfg, key_bits=bits, value_bits=bits)
    return dataclasses.replace(cfg, head_group_size=calibration.head_group_size)


def check_servable(config: RotateKVConfig) -> None:
    """Raise ``ValueError`` for the config settings the vLLM backend does not implement."""
    if config.sink_mode == "topk":
        raise ValueError(
            "this RotateKV calibration uses sink_mode='topk', which picks sinks from the layer's input residual "
            "stream; a vLLM attention backend never sees it. Recalibrate with sink_mode='first' (e.g. "
            "`python -m rotkv_vllm.calibration MODEL --calib-file FILE --config-json CFG.json` with "
            "\"sink_mode\": \"first\" in CFG.json)"
        )
    if config.recent_window > 0:
        raise ValueError(
            f"recent_window={config.recent_window}: the vLLM backend has no full-precision recent window; "
            "recalibrate with recent_window=0"
        )


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def inverse_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo HF-convention RoPE: ``k [T, H, D]`` post-RoPE, ``cos/sin [T, D]`` -> pre-RoPE keys (fp32).

    RoPE rotates each channel pair ``(i, i + D/2)`` by ``theta`` and scales it by ``m`` (``cos = m cos
    theta``); the inverse is the rotation by ``-theta`` divided by ``m^2 = cos^2 + sin^2``.
    """
    k = k.to(torch.float32)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return (k * c - _rotate_half(k) * s) / (c * c + s * s)


# ---- the CPU read path ---------------------------------------------------------------------------
# The same maths as ``rotkv_read_ref``, arranged for a CPU serving many cached tokens per step: codes are
# unpacked with byte shifts, the inverse permutation and inverse block Hadamard of keys are one fixed
# matrix per rotation block (a GEMM), RoPE is one complex multiply (key channels are stored as
# interleaved (i, i + D/2) pairs; queries get the same order, which leaves q.k unchanged), and values
# stay in their rotated basis until after attention: sum_j p_j (H^T v_j) = H^T sum_j p_j v_j, so the
# inverse Hadamard runs once per query instead of once per cached token.
def unpack_codes_fast(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """``quant.unpack_codes`` for ``uint8 [N, W * bits / 8]`` -> ``uint8 [N, W]`` (2 and 4 bits are byte
    aligned: code ``i`` of a byte sits at bit ``i * bits``; 3 bits: 8 codes in a 24-bit little-endian word)."""
    n, m = packed.shape
    if bits in (2, 4):
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).view(n, m * per)
    if bits == 3:
        p = packed.view(n, m // 3, 3).to(torch.int32)
        word = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
        return ((word.unsqueeze(-1) >> shifts) & 7).to(torch.uint8).view(n, m // 3 * 8)
    raise ValueError(f"bits={bits}: supported are 2, 3, 4")


@functools.lru_cache(maxsize=None)
def _code_table(bits: int, device: torch.device) -> torch.Tensor:
    """``fp32 [256, 8 / bits]``: row ``b`` holds the codes packed in byte ``b`` (code ``i`` at bit ``i * bits``)."""
    per, mask = 8 // bits, (1 << bits) - 1
    b = torch.arange(256, dtype=torch.int32).unsqueeze(1)
    return ((b >> (torch.arange(per, dtype=torch.int32) * bits)) & mask).to(device=device, dtype=torch.float32)


def dequantize_records(record: torch.Tensor, bits: int, width: int, group_size: int, scale_format: str,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(codes - zero) * scale`` of records ``uint8 [N, record_bytes]`` -> ``fp32 [N, width]``, in the stored
    (rotated, permuted) channel basis. Rows where ``valid`` (``bool [N]``) is False decode to exact zeros,
    whatever bytes they hold (unwritten slots may hold NaN scales)."""
    from rotkv_kernels.quant import scale_dtypes

    n = record.shape[0]
    sd, zd = scale_dtypes(scale_format)
    ng, cb = width // group_size, width * bits // 8
    se = cb + ng * sd.itemsize
    if bits in (2, 4):
        # one gather from a 256-row table turns each byte into its codes as floats: no shifts, masks or casts
        lut = _code_table(bits, record.device)
        codes = lut.index_select(0, record[:, :cb].reshape(-1).to(torch.int32)).view(n, ng, group_size)
    else:
        codes = unpack_codes_fast(record[:, :cb], bits).view(n, ng, group_size).to(torch.float32)
    scale = record[:, cb:se].contiguous().view(sd).to(torch.float32).unsqueeze(-1)
    zero = record[:, se: se + ng * zd.itemsize].contiguous().view(zd).to(torch.float32).unsqueeze(-1)
    if valid is not None:
        keep = valid.view(n, 1, 1)
        scale = torch.where(keep, scale, 0.0)
        zero = torch.where(keep, zero, 0.0)
    return torch.addcmul(-zero * scale, codes, scale).view(n, width)


def interleave_order(num_heads: int, head_dim: int) -> torch.Tensor:
    """``int64 [H * D]``: per head, channels ``0, D/2, 1, D/2 + 1, ...`` (RoPE pairs side by side)."""
    half = head_dim // 2
    one = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).reshape(-1)
    return (torch.arange(num_heads).unsqueeze(1) * head_dim + one).reshape(-1)


@dataclass(frozen=True)
class KeyDecoder:
    """Stored key channels -> pre-RoPE keys, as one matrix per rotation block.

    Attributes:
        blocks: ``fp32 [W / rw, rw, rw]``; ``k[:, b] = y[:, b] @ blocks[b]`` (``y`` dequantized).
        out_order: ``int64 [W]``: decoded channel ``j`` is original channel ``out_order[j]``.
    """

    blocks: torch.Tensor
    out_order: torch.Tensor

    @classmethod
    def build(cls, width: int, rot_width: int, perm: torch.Tensor | None, out_order: torch.Tensor) -> "KeyDecoder":
        from rotkv_kernels.hadamard import hadamard_transform

        eye = torch.eye(width, dtype=torch.float64)
        y = torch.empty_like(eye)
        if perm is not None:
            y[:, perm] = eye
        else:
            y = eye
        full = hadamard_transform(y, block_size=rot_width, inverse=True)[:, out_order]  # row j: image of e_j
        nb = width // rot_width
        blocks = torch.stack([full[b * rot_width:(b + 1) * rot_width, b * rot_width:(b + 1) * rot_width]
                              for b in range(nb)])
        off = full.clone()
        for b in range(nb):
            off[b * rot_width:(b + 1) * rot_width, b * rot_width:(b + 1) * rot_width] = 0
        assert not off.any(), "key decoding must be block diagonal (orders stay inside rotation blocks)"
        return cls(blocks=blocks.to(torch.float32).contiguous(), out_order=out_order)

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        n, w = y.shape
        nb, rw, _ = self.blocks.shape
        if nb == 1:
            return y @ self.blocks[0]
        return torch.einsum("nbi,bij->nbj", y.view(n, nb, rw), self.blocks).reshape(n, w)


# ---- process-wide runtime (one model per vLLM worker process) ------------------------------------
_RUNTIME: RotateKVRuntime | None = None


def install_runtime(runtime: RotateKVRuntime | None) -> None:
    """Make ``runtime`` the one :func:`current_runtime` returns (tests, and :func:`resolve_runtime`)."""
    global _RUNTIME
    _RUNTIME = runtime


def current_runtime() -> RotateKVRuntime:
    if _RUNTIME is None:
        raise RuntimeError("the RotateKV runtime is not resolved yet: no RotateKV attention layer was built")
    return _RUNTIME


def _check_model(hf_config) -> None:
    """Start-up checks of model features the backend cannot serve."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"--kv-cache-dtype rotkv*: model_type={model_type!r} is not supported; RotateKV's vLLM backend serves "
            f"Llama-architecture models with RoPE, full attention and no key norm: {SUPPORTED_MODEL_TYPES}"
        )
    if getattr(hf_config, "sliding_window", None) and getattr(hf_config, "use_sliding_window", True):
        raise ValueError(
            f"--kv-cache-dtype rotkv*: the model uses sliding-window attention (sliding_window="
            f"{hf_config.sliding_window}), which RotateKV does not support; use --kv-cache-dtype auto"
        )
    if getattr(hf_config, "kv_lora_rank", None):
        raise ValueError("--kv-cache-dtype rotkv*: MLA models have no per-head keys; use --kv-cache-dtype auto")


def resolve_runtime(vllm_config, kv_cache_dtype: str) -> RotateKVRuntime:
    """Build (or reuse) the runtime for the model in ``vllm_config`` on this process's TP rank.

    Raises:
        ValueError: unsupported model, missing calibration, or a calibration for another model.
    """
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from rotkv_vllm.calibration import find_calibration, load_calibration

    mc = vllm_config.model_config
    try:
        tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    except AssertionError:  # no distributed state (unit tests): a single rank
        tp_size, tp_rank = 1, 0
    key = (str(mc.model), str(mc.revision), kv_cache_dtype, tp_rank, tp_size, str(mc.dtype))
    if _RUNTIME is not None and _RUNTIME.key == key:
        return _RUNTIME
    hf = mc.hf_text_config
    _check_model(hf)
    folder = find_calibration(mc.model, mc.revision)
    if folder is None:
        raise ValueError(
            f"--kv-cache-dtype {kv_cache_dtype}: no RotateKV calibration (rotkv_config.json + rotkv.safetensors) "
            f"in {mc.model} or its Hugging Face cache snapshot. Calibrate first:\n    "
            + CALIBRATE_HINT.format(model=mc.model, bits=KV_CACHE_DTYPES.get(kv_cache_dtype, 2))
        )
    calib = load_calibration(folder)
    calib.check_model(hf)
    head_dim = calib.model_info["head_dim"]
    rope = None
    if calib.config.pre_rope:
        rot = get_rope(head_dim, max_position=mc.max_model_len if not hasattr(hf, "max_position_embeddings")
                       else max(hf.max_position_embeddings, mc.max_model_len),
                       rope_parameters=getattr(hf, "rope_parameters", None), is_neox_style=True, dtype=torch.float32)
        rope = rope_tables(rot)
    rt = RotateKVRuntime.from_calibration(calib, kv_cache_dtype, dtype=mc.dtype, rope=rope,
                                          tp_rank=tp_rank, tp_size=tp_size, key=key)
    logger.info(
        "rotkv: %s on rank %d/%d: %d KV heads x %d, head groups of %d, quantization group %d, K%d/V%d, "
        "%d sink tokens, %d bytes per token record (bf16 would be %d)",
        kv_cache_dtype, tp_rank, tp_size, rt.layout.num_kv_heads, head_dim, rt.layout.head_group_size,
        rt.layout.group_size, rt.config.key_bits, rt.config.value_bits, rt.sink_tokens, rt.record_bytes,
        4 * rt.layout.kv_width,
    )
    install_runtime(rt)
    return rt


# ================================================================================================
# Metadata
# ================================================================================================
@dataclass
class AttentionTile:
    """A set of requests attended together, padded to ``Q`` queries and ``L`` context positions.

    Attributes:
        tok_idx: ``int64 [G, Q]`` index of each query in the step's token array (0 where padded).
        q_valid: ``bool [G, Q]``.
        ctx_blk / ctx_off: ``int64 [G, L]`` block id and offset of context position ``j`` (0 where padded).
        ctx_valid: ``bool [G, L]`` position ``j`` < the request's sequence length.
        mask: ``bool [G, 1, Q, L]``: query attends key (causal and valid; padded queries see key 0).
        first_blk: ``int64 [G]`` the block holding each request's first positions (its sink area).
    """

    tok_idx: torch.Tensor
    q_valid: torch.Tensor
    ctx_blk: torch.Tensor
    ctx_off: torch.Tensor
    ctx_valid: torch.Tensor
    mask: torch.Tensor
    first_blk: torch.Tensor

    @property
    def length(self) -> int:
        return self.ctx_blk.shape[1]


@dataclass
class RotateKVAttentionMetadata:
    """Per-step metadata shared by all layers.

    The first eight fields serve both implementations and live where the cache lives (int64 on the CPU
    for ``"torch"``; vLLM's own device tensors, int32 usually, for ``"triton"``).

    Attributes:
        query_start_loc: ``int [R + 1]``; seq_lens: ``int [R]`` (new tokens included); block_table:
            ``int [R, max_blocks]``; slot_mapping: ``int [T]`` (``-1``: no slot).
        positions: ``int64 [T]`` position of each query token in its sequence (0 for padding tokens).
        attention_impl: ``"torch"`` or ``"triton"`` (:func:`select_attention_impl` for the builder's device).
        query_start_loc_cpu / seq_lens_cpu: host copies (``"triton"``: for planning the kernels' work; the
            sequence lengths may be vLLM's upper bound, which only enlarges the planned context splits).
        store_tok / store_blk / store_off: tokens with a cache slot, and where their record goes (``"torch"``).
        sink_tok / sink_blk / sink_pos: tokens at positions < S, and their sink-area entry (``"torch"``).
        tiles: the attention work of the step (see :class:`AttentionTile`; ``"torch"``).
    """

    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    positions: torch.Tensor
    store_tok: torch.Tensor | None = None
    store_blk: torch.Tensor | None = None
    store_off: torch.Tensor | None = None
    sink_tok: torch.Tensor | None = None
    sink_blk: torch.Tensor | None = None
    sink_pos: torch.Tensor | None = None
    tiles: list[AttentionTile] = field(default_factory=list)
    attention_impl: str = "torch"
    query_start_loc_cpu: torch.Tensor | None = None
    seq_lens_cpu: torch.Tensor | None = None
    _plans: dict = field(default_factory=dict, repr=False)

    def paged_plan(self, spec: PagedCacheSpec, num_query_heads: int):
        """The fused attention's work list for this step (``rotkv_paged_triton.plan_paged_attention``), built
        by the first layer that asks and shared by the others (it depends on the step's lengths and on the
        spec's head grouping and sink count only, which all layers share)."""
        key = (num_query_heads, spec.num_kv_heads, spec.key_rot_width, spec.sink_tokens)
        if key not in self._plans:
            from rotkv_kernels.rotkv_paged_triton import plan_paged_attention

            self._plans[key] = plan_paged_attention(self.query_start_loc_cpu, self.seq_lens_cpu, spec=spec,
                                                    num_query_heads=num_query_heads,
                                                    device=self.query_start_loc.device)
        return self._plans[key]


def token_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``int64 [num_tokens]``: position of each token in its sequence, computed where the inputs live (no
    host synchronization on CUDA).

    Token ``t`` of request ``r`` (``qsl[r] <= t < qsl[r + 1]``) sits at ``seq_lens[r] - q_len[r] + t -
    qsl[r]``; padding tokens (``t >= qsl[R]``) get 0, a valid row of any RoPE table.
    """
    qsl = query_start_loc.to(torch.int64)
    seq = seq_lens.to(torch.int64)
    r = seq.shape[0]
    tok = torch.arange(num_tokens, device=qsl.device, dtype=torch.int64)
    if r == 0:
        return torch.zeros_like(tok)
    req = torch.searchsorted(qsl[1:], tok, right=True).clamp_(max=r - 1)
    before = seq - (qsl[1:] - qsl[:-1])
    pos = before[req] + tok - qsl[req]
    return torch.where(tok < qsl[r], pos, 0)


def plan_tiles(q_lens: list[int], seq_lens: list[int], *, context_budget: int = _TILE_CONTEXT_TOKENS,
               score_budget: int = _TILE_SCORES) -> list[tuple[list[int], int, int]]:
    """Group requests into tiles ``(request ids, q_lo, q_hi)``.

    Requests are sorted by (query length, sequence length) and packed greedily while
    ``G * L <= context_budget`` and ``G * Q * L <= score_budget`` (``G`` requests, ``Q`` padded query
    rows, ``L`` padded context). A request too large alone is split into query ranges ``[q_lo, q_hi)``
    (its queries beyond ``q_lo`` only, context up to the range's last position).
    """
    order = sorted(range(len(q_lens)), key=lambda r: (q_lens[r] > 1, q_lens[r], seq_lens[r]))
    tiles: list[tuple[list[int], int, int]] = []
    cur: list[int] = []
    cq = cl = 0
    for r in order:
        q, s = q_lens[r], seq_lens[r]
        if q == 0:
            continue
        if q * s > score_budget or s > context_budget:
            if cur:
                tiles.append((cur, 0, cq))
                cur, cq, cl = [], 0, 0
            step = max(1, min(q, score_budget // max(s, 1)))
            for lo in range(0, q, step):
                tiles.append(([r], lo, min(q, lo + step)))
            continue
        nq, nl = max(cq, q), max(cl, s)
        if cur and ((len(cur) + 1) * nl > context_budget or (len(cur) + 1) * nq * nl > score_budget):
            tiles.append((cur, 0, cq))
            cur, nq, nl = [], q, s
        cur.append(r)
        cq, cl = nq, nl
    if cur:
        tiles.append((cur, 0, cq))
    return tiles


class RotateKVAttentionMetadataBuilder(AttentionMetadataBuilder[RotateKVAttentionMetadata]):
    """Builds :class:`RotateKVAttentionMetadata` once per step (CPU index arithmetic, no kernels)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config, device: torch.device,
                 runtime: RotateKVRuntime | None = None) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.runtime = runtime if runtime is not None else current_runtime()
        self.block_size = kv_cache_spec.block_size
        self.attention_impl = select_attention_impl(device)
        if self.block_size < self.runtime.sink_tokens:
            raise ValueError(
                f"--block-size {self.block_size} is smaller than the {self.runtime.sink_tokens} sink tokens kept "
                "in each sequence's first block; use a larger --block-size"
            )

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> RotateKVAttentionMetadata:
        cm = common_attn_metadata
        if isinstance(cm.causal, torch.Tensor) or not cm.causal:
            raise NotImplementedError("RotateKV attention is causal decoder attention only")
        r, t = cm.num_reqs, cm.num_actual_tokens
        if self.attention_impl == "triton":
            return self._build_fused(cm)
        bs = self.block_size
        qsl = cm.query_start_loc_cpu[: r + 1].to(torch.int64)
        seq = cm.seq_lens[:r].to("cpu", torch.int64)
        q_lens = qsl[1:] - qsl[:-1]
        before = seq - q_lens
        table = cm.block_table_tensor[:r].to("cpu", torch.int64)
        positions = token_positions(qsl, seq, t)  # t may include padding tokens (position 0, slot -1)
        slots = cm.slot_mapping[:t].to("cpu", torch.int64)
        has_slot = slots >= 0
        store_tok = has_slot.nonzero().squeeze(1)
        s_sink = self.runtime.sink_tokens
        sink_tok = (has_slot & (positions < s_sink)).nonzero().squeeze(1)
        tiles = []
        for reqs, q_lo, q_hi in plan_tiles(q_lens.tolist(), seq.tolist()):
            tiles.append(self._tile(torch.tensor(reqs), q_lo, q_hi, qsl, q_lens, before, seq, table, bs))
        return RotateKVAttentionMetadata(
            num_actual_tokens=t, max_query_len=cm.max_query_len, max_seq_len=cm.max_seq_len,
            query_start_loc=qsl, seq_lens=seq, block_table=table, slot_mapping=slots, positions=positions,
            store_tok=store_tok, store_blk=slots[store_tok] // bs, store_off=slots[store_tok] % bs,
            sink_tok=sink_tok, sink_blk=slots[sink_tok] // bs, sink_pos=positions[sink_tok],
            tiles=tiles,
        )

    def _build_fused(self, cm: CommonAttentionMetadata) -> RotateKVAttentionMetadata:
        """The fused kernels take vLLM's device tensors as they are; only the positions are computed (on
        the device) and the host lengths kept for planning. No tiles, no per-token host work."""
        r, t = cm.num_reqs, cm.num_actual_tokens
        qsl, seq = cm.query_start_loc[: r + 1], cm.seq_lens[:r]
        seq_cpu = cm.seq_lens_cpu_upper_bound
        seq_cpu = seq.to("cpu") if seq_cpu is None else seq_cpu[:r]
        return RotateKVAttentionMetadata(
            num_actual_tokens=t, max_query_len=cm.max_query_len, max_seq_len=cm.max_seq_len,
            query_start_loc=qsl, seq_lens=seq, block_table=cm.block_table_tensor[:r],
            slot_mapping=cm.slot_mapping[:t], positions=token_positions(qsl, seq, t), attention_impl="triton",
            query_start_loc_cpu=cm.query_start_loc_cpu[: r + 1], seq_lens_cpu=seq_cpu,
        )

    @staticmethod
    def _tile(reqs, q_lo, q_hi, qsl, q_lens, before, seq, table, bs) -> AttentionTile:
        n_q = q_hi - q_lo
        qi = torch.arange(n_q)
        q_valid = qi.unsqueeze(0) < (q_lens[reqs] - q_lo).unsqueeze(1)
        tok_idx = torch.where(q_valid, qsl[reqs].unsqueeze(1) + q_lo + qi, 0)
        q_pos = before[reqs].unsqueeze(1) + q_lo + qi  # [G, Q]
        # Context needed: up to the last query's position (the whole sequence unless split).
        ctx_len = torch.minimum(seq[reqs], before[reqs] + q_hi)
        length = int(ctx_len.max())
        kpos = torch.arange(length)
        ctx_valid = kpos.unsqueeze(0) < ctx_len.unsqueeze(1)
        blk_col = (kpos // bs).unsqueeze(0).expand(len(reqs), -1)
        ctx_blk = torch.where(ctx_valid, table[reqs].gather(1, blk_col.clamp(max=table.shape[1] - 1)), 0)
        ctx_off = torch.where(ctx_valid, (kpos % bs).unsqueeze(0), 0)
        mask = (kpos.view(1, 1, -1) <= q_pos.unsqueeze(2)) & ctx_valid.unsqueeze(1) & q_valid.unsqueeze(2)
        # A padded query row attends key 0 only, so no row is all -inf (NaN-free softmax).
        mask |= (~q_valid).unsqueeze(2) & (kpos == 0).view(1, 1, -1)
        return AttentionTile(tok_idx=tok_idx, q_valid=q_valid, ctx_blk=ctx_blk, ctx_off=ctx_off,
                             ctx_valid=ctx_valid, mask=mask.unsqueeze(1), first_blk=table[reqs, 0])


# ================================================================================================
# Backend
# ================================================================================================
class RotateKVAttentionBackend(AttentionBackend):
    """``--kv-cache-dtype rotkv2/3/4``: RotateKV's packed KV cache (see the module docstring)."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(KV_CACHE_DTYPES)

    @staticmethod
    def get_name() -> str:
        return "ROTKV"

    @staticmethod
    def get_impl_cls() -> type["RotateKVAttentionImpl"]:
        return RotateKVAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[RotateKVAttentionMetadataBuilder]:
        return RotateKVAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size > 0 and head_size % 8 == 0 and has_hadamard(head_size)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # One head slot per token: head-major and token-major interiors coincide.
        return (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """One ``C``-byte record per token (one head slot), plus each block's sink area as page padding."""
        rt = current_runtime()
        if spec.num_kv_heads != rt.layout.num_kv_heads or spec.head_size != rt.layout.head_dim:
            raise ValueError(
                f"attention layer has {spec.num_kv_heads} KV heads x {spec.head_size} on this rank, the RotateKV "
                f"calibration resolves to {rt.layout.num_kv_heads} x {rt.layout.head_dim}"
            )
        page = rt.page_bytes(spec.block_size)
        unpadded = spec.block_size * rt.record_bytes
        return dataclasses.replace(
            spec, num_head_slots=1, state_content_bytes=rt.record_bytes,
            page_size_padded=page if page != unpadded else None,
        )


class RotateKVAttentionImpl(AttentionImpl[RotateKVAttentionMetadata]):
    """Stores K/V as RotateKV records and attends over the dequantized cache."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "rotkv2", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 runtime: RotateKVRuntime | None = None, **unsupported: Any) -> None:
        problems = []
        if alibi_slopes is not None:
            problems.append("ALiBi")
        if sliding_window is not None:
            problems.append(f"sliding window {sliding_window}")
        if logits_soft_cap:
            problems.append("logits soft-capping")
        if attn_type != AttentionType.DECODER:
            problems.append(f"attention type {attn_type}")
        if kv_sharing_target_layer_name is not None:
            problems.append("cross-layer KV sharing")
        if unsupported.get("sinks") is not None:
            problems.append("learned attention sinks")
        if problems:
            raise ValueError(f"--kv-cache-dtype {kv_cache_dtype}: RotateKV attention does not support "
                             f"{', '.join(problems)}; use --kv-cache-dtype auto for this model")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        if runtime is None:
            from vllm.config import get_current_vllm_config

            runtime = resolve_runtime(get_current_vllm_config(), kv_cache_dtype)
        self.runtime = runtime
        lay = runtime.layout
        if (self.num_kv_heads, head_size) != (lay.num_kv_heads, lay.head_dim):
            raise ValueError(
                f"attention layer has {self.num_kv_heads} KV heads x {head_size} on this rank; the RotateKV "
                f"calibration resolves to {lay.num_kv_heads} x {lay.head_dim} (tensor-parallel size "
                f"{runtime.tp_size}); recalibrate for this model and tensor-parallel size"
            )
        self._layer: int | None = None
        self._views: tuple[int, torch.Tensor, torch.Tensor | None] | None = None
        self.triton_precision = triton_precision()
        self._impl_checked: tuple[str, str] | None = None

    # ---- cache views ----------------------------------------------------------------------------
    def _cache_views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``records uint8 [num_blocks, block_size, C]`` and ``sinks [num_blocks, S, 2, H, D]`` (model dtype)."""
        if self._views is not None and self._views[0] == kv_cache.data_ptr():
            return self._views[1], self._views[2]
        rt = self.runtime
        nb, slots, bs, c = kv_cache.shape
        if slots != 1 or c != rt.record_bytes or kv_cache.dtype != torch.uint8:
            raise RuntimeError(f"unexpected RotateKV cache view {tuple(kv_cache.shape)} {kv_cache.dtype}: "
                               f"expected [blocks, 1, block_size, {rt.record_bytes}] uint8")
        page = rt.page_bytes(bs)
        if nb > 1 and kv_cache.stride(0) < page:
            raise RuntimeError(f"RotateKV pages are {kv_cache.stride(0)} bytes apart, need {page}: the planner "
                               "did not keep the spec's page size")
        records = kv_cache[:, 0]
        sinks = None
        s = rt.sink_tokens
        if s:
            raw = torch.as_strided(kv_cache, (nb, s * rt.sink_token_bytes), (kv_cache.stride(0), 1),
                                   kv_cache.storage_offset() + bs * c)
            sinks = raw.view(rt.dtype).view(nb, s, 2, rt.layout.num_kv_heads, rt.layout.head_dim)
        self._views = (kv_cache.data_ptr(), records, sinks)
        return records, sinks

    def _layer_index(self, layer: AttentionLayer) -> int:
        if self._layer is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self._layer = extract_layer_index(getattr(layer, "layer_name"))
        return self._layer

    def _check_impl(self, layer_idx: int, kv_cache: torch.Tensor, md: RotateKVAttentionMetadata) -> None:
        """Check once per implementation and device that the builder's choice can serve this cache (vLLM
        builds the metadata on the cache's device, so this fails only on a misconfiguration)."""
        key = (md.attention_impl, str(kv_cache.device))
        if self._impl_checked != key:
            check_attention_impl(md.attention_impl, kv_cache.device)
            if md.attention_impl == "triton":
                self._check_fused_limits(self.runtime.paged_spec(layer_idx))
            self._impl_checked = key

    def _check_fused_limits(self, spec: PagedCacheSpec) -> None:
        from rotkv_kernels.rotkv_paged_triton import _check_attention_limits

        try:
            _check_attention_limits(spec)
        except ValueError as e:
            raise ValueError(f"the fused RotateKV kernels cannot serve this model's layout ({e}); the PyTorch path "
                             f"serves CPU caches only ({ATTENTION_IMPL_ENV})") from e

    # ---- store ----------------------------------------------------------------------------------
    def store(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
              md: RotateKVAttentionMetadata) -> None:
        """Write the step's K/V (``[T, H, D]``, K post-RoPE, ``T = md.num_actual_tokens``) into the packed cache:
        one fused ``paged_write_triton`` launch (``"triton"``), or the PyTorch encode and scatter."""
        if md.attention_impl == "triton":
            from rotkv_kernels.rotkv_paged_triton import paged_write_triton

            p = self.runtime.fused_params(layer_idx, kv_cache.device)
            records, sinks = self._cache_views(kv_cache)
            paged_write_triton(key, value, md.slot_mapping, records, spec=p.spec, positions=md.positions,
                               sinks=sinks, rope_cos=p.rope_cos, rope_sin=p.rope_sin, key_perm=p.key_perm,
                               key_mean=p.key_mean)
            return
        if md.store_tok.numel() == 0:
            return
        rt, lay, cfg = self.runtime, self.runtime.layout, self.runtime.config
        codec = rt.codec(layer_idx)
        records, sinks = self._cache_views(kv_cache)
        tok = md.store_tok
        k = key[tok]
        v = value[tok]
        if cfg.pre_rope:
            pos = md.positions[tok]
            k = inverse_rope(k, rt.rope_cos[pos], rt.rope_sin[pos])
        k = k.to(torch.float32)
        if codec.key_mean is not None:
            k = k - codec.key_mean.view(lay.num_kv_heads, lay.head_dim)
        krec = _write(k, bits=codec.key_bits, group_size=lay.group_size,
                                 rot_width=lay.group_width, perm=codec.key_order, clip_ratio=codec.key_clip,
                                 scale_format=cfg.scale_format)
        vrec = _write(v.to(torch.float32), bits=codec.value_bits, group_size=lay.value_group_size,
                                 rot_width=lay.head_dim if cfg.rotate_values else 1, perm=None,
                                 clip_ratio=codec.value_clip, scale_format=cfg.scale_format)
        records[md.store_blk, md.store_off, : codec.key_bytes + codec.value_bytes] = torch.cat((krec, vrec), dim=1)
        if sinks is not None and md.sink_tok.numel():
            kv = torch.stack((key[md.sink_tok], value[md.sink_tok]), dim=1).to(rt.dtype)  # [Ns, 2, H, D]
            sinks[md.sink_blk, md.sink_pos] = kv

    # ---- read -----------------------------------------------------------------------------------
    def read_context(self, layer_idx: int, kv_cache: torch.Tensor, tile: AttentionTile
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized context of a tile, ``fp32 [G, L, H, D]`` each, zero where invalid:
        K with RoPE applied, channels in ``runtime.key_channel_order`` within each head; V in its stored
        (per-head Hadamard-rotated) basis. The ``"torch"`` path only; the fused attention decodes the same
        records inside its kernel."""
        rt, lay, cfg = self.runtime, self.runtime.layout, self.runtime.config
        codec = rt.codec(layer_idx)
        records, sinks = self._cache_views(kv_cache)
        g, length = tile.ctx_blk.shape
        h, d, w = lay.num_kv_heads, lay.head_dim, lay.kv_width
        rec = records[tile.ctx_blk, tile.ctx_off].reshape(g * length, -1)
        valid = tile.ctx_valid.reshape(-1)
        y = dequantize_records(rec[:, : codec.key_bytes], codec.key_bits, w, lay.group_size, cfg.scale_format, valid)
        k = rt.key_decoder(layer_idx)(y)
        if codec.key_mean is not None:
            k = k + codec.key_mean[rt.key_channel_order]
        k = k.view(g, length, h, d)
        if cfg.pre_rope:
            kc = torch.view_as_complex(k.view(g, length, h, d // 2, 2))
            k = torch.view_as_real(kc * rt.rope_complex[:length].view(1, length, 1, d // 2)).view(g, length, h, d)
        vrec = rec[:, codec.key_bytes: codec.key_bytes + codec.value_bytes]
        v = dequantize_records(vrec, codec.value_bits, w, lay.value_group_size, cfg.scale_format, valid)
        v = v.view(g, length, h, d)
        if sinks is not None:
            s = min(rt.sink_tokens, length)
            full = sinks[tile.first_blk, :s].to(torch.float32)  # [G, s, 2, H, D], K post-RoPE, V original
            sk = full[:, :, 0].reshape(g, s, w)[..., rt.key_channel_order].view(g, s, h, d)
            sv = full[:, :, 1]
            if cfg.rotate_values:
                from rotkv_kernels.hadamard import hadamard_transform

                sv = hadamard_transform(sv, block_size=d)
            keep = tile.ctx_valid[:, :s, None, None]
            k[:, :s] = torch.where(keep, sk, k[:, :s])
            v[:, :s] = torch.where(keep, sv, v[:, :s])
        return k, v

    def attend(self, layer_idx: int, query: torch.Tensor, kv_cache: torch.Tensor, md: RotateKVAttentionMetadata,
               output: torch.Tensor) -> None:
        """``output[t] = softmax(q_t K^T * scale) V`` over each query's causal context (``query [T, Hq, D]``,
        ``output [>= T, Hq, D]`` written in rows ``< query_start_loc[R]`` only): the fused split-K
        ``paged_attention_triton`` (``"triton"``), or dequantize and SDPA per tile."""
        if md.attention_impl == "triton":
            from rotkv_kernels.rotkv_paged_triton import paged_attention_triton

            p = self.runtime.fused_params(layer_idx, kv_cache.device)
            records, sinks = self._cache_views(kv_cache)
            t = query.shape[0]
            paged_attention_triton(query, records, md.block_table, md.seq_lens, md.query_start_loc, spec=p.spec,
                                   scale=self.scale, sinks=sinks, rope_cos=p.rope_cos, rope_sin=p.rope_sin,
                                   key_perm=p.key_perm, key_mean=p.key_mean, out_dtype=output.dtype, out=output[:t],
                                   precision=self.triton_precision, plan=md.paged_plan(p.spec, self.num_heads),
                                   inv_perm=p.inv_perm)
            return
        from rotkv_kernels.hadamard import hadamard_transform

        rt, cfg, d = self.runtime, self.runtime.config, self.head_size
        q_order = rt.key_channel_order[:d]  # the same order within every head
        for tile in md.tiles:
            k, v = self.read_context(layer_idx, kv_cache, tile)
            q = query[tile.tok_idx].to(torch.float32)[..., q_order].transpose(1, 2)  # [G, Hq, Q, D]
            o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=tile.mask,
                                               scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
            o = o.transpose(1, 2)[tile.q_valid]  # [n, Hq, D], still in V's rotated basis
            if cfg.rotate_values:
                o = hadamard_transform(o, block_size=d, inverse=True)
            output[tile.tok_idx[tile.q_valid]] = o.to(output.dtype)

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: RotateKVAttentionMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Store this step's K/V, then attend.

        Args:
            query: ``[T, Hq, D]``; key / value: ``[T, Hkv, D]`` (key after RoPE).
            kv_cache: ``uint8 [num_blocks, 1, block_size, C]`` (pages include the sink area after it).
            output: ``[T, Hq, D]``, written in place.
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by RotateKV attention")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        layer_idx = self._layer_index(layer)
        self._check_impl(layer_idx, kv_cache, attn_metadata)
        t = attn_metadata.num_actual_tokens
        if key is not None and value is not None:
            self.store(layer_idx, key[:t], value[:t], kv_cache, attn_metadata)
        self.attend(layer_idx, query[:t], kv_cache, attn_metadata, output)
        return output
