"""`RotateKVConfig`: the validated, versioned, JSON round-trippable description of a RotateKV cache.

The config says *how* K/V are stored; :class:`RotateKVLayout` resolves it against one model's shapes
(number of KV heads, head width, tensor-parallel size) into the concrete sizes the kernels use.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from rotkv_kernels.hadamard import has_hadamard
from rotkv_kernels.quant import SCALE_FORMATS, SUPPORTED_BITS, bits_per_element, default_clip_ratio

__all__ = ["RotateKVConfig", "RotateKVLayout", "CONFIG_VERSION", "KVCachePreset", "KV_CACHE_DTYPES",
           "DEFAULT_RECENT_WINDOW", "DEFAULT_BLOCK_SIZE", "config_for_cache_dtype"]

CONFIG_VERSION = 1

# The full-precision recent window every --kv-cache-dtype preset keeps: each query reads its last 4 keys (itself
# and the 3 tokens before it) in full precision. The vLLM cache pays R - 1 = 3 model-dtype K/V tokens per page
# for it, so the presets default to pages of DEFAULT_BLOCK_SIZE = 256 tokens (vLLM's CPU default is 128): on
# SmolLM2 (W = 192, 104-byte records, 1 sink) a page is 256 * 104 + (1 + 3) * 768 bytes, 116 bytes per token,
# 6.62x the tokens of a bf16 cache (768 bytes per token); at 128 tokens per page only a window of 2 fits above
# 6.5x. Measured with benchmarks/kv_ppl.py (rotkv2+recentR) and benchmarks/vllm_ppl.py: a window of 2 leaves
# rotkv2 at 1.26x auto's perplexity through vLLM, 4 brings it to the reference's 1.23x.
DEFAULT_RECENT_WINDOW = 4
DEFAULT_BLOCK_SIZE = 256


@dataclass(frozen=True)
class KVCachePreset:
    """What a ``--kv-cache-dtype`` name stores: key and value bits and the full-precision recent window (the
    calibration supplies everything else, so one calibration serves every preset)."""

    key_bits: int
    value_bits: int
    recent_window: int = DEFAULT_RECENT_WINDOW

    @property
    def bits(self) -> int:
        """The bits a calibration for this preset is made with (the key bits: keys are the sensitive half)."""
        return self.key_bits


# vLLM --kv-cache-dtype names (vLLM's own style: lower case, underscores) and what they store. rotkv2/3/4 keep
# K and V at the same bits; rotkv_k3v2 and rotkv_k4v2 spend the extra bits on keys only, the presets on the
# accuracy-per-bit frontier of benchmarks/kv_ppl.py (K3V2 + a window beats K3V3 at fewer bits).
KV_CACHE_DTYPES: dict[str, KVCachePreset] = {
    "rotkv2": KVCachePreset(2, 2),
    "rotkv3": KVCachePreset(3, 3),
    "rotkv4": KVCachePreset(4, 4),
    "rotkv_k3v2": KVCachePreset(3, 2),
    "rotkv_k4v2": KVCachePreset(4, 2),
}
SINK_MODES = ("topk", "first", "none")


@dataclass(frozen=True)
class RotateKVConfig:
    """How RotateKV quantizes the KV cache.

    Attributes:
        key_bits / value_bits: integer bits per stored element (2, 3 or 4).
        group_size: channels per key quantization group along the (reordered) channel dim of one
            rotated head group. ``None``: 64 when it divides the group width (so the calibrated order
            matters: it decides which channels share a scale), else the whole group up to 256, else 128.
        value_group_size: channels per value quantization group along ``H * D``; ``None``: the whole
            rotated head-group width if at most 256, else 128 (values tolerate coarser groups).
        center_keys: subtract the calibrated per-channel mean of the pre-RoPE keys before rotating and
            add it back after dequantizing (free at run time; removes the channel offsets that make
            per-token key quantization hard).
        key_clip_ratio / value_clip_ratio: min-max clip ratio; ``None`` = 0.8 at 2 bits, 1.0 otherwise.
        head_group_size: KV heads rotated together by one Hadamard of width ``g * head_dim``.
            ``None``: the largest ``g`` dividing the per-rank KV head count whose width has a Hadamard.
        pre_rope: rotate/quantize keys before RoPE (RotateKV); ``False`` quantizes post-RoPE keys.
        reorder: apply the calibrated channel order (outlier-aware reordering) to keys.
        rotate_values: per-head Hadamard on values.
        sink_mode: which tokens are attention sinks kept in full precision.
            ``"topk"`` (the paper): at prefill, tokens holding any of the top-``sink_topk``
            |activations| of the layer's input residual (over tokens x hidden), at most
            ``max_sink_tokens`` of them, chosen per layer. ``"first"``: the first ``max_sink_tokens``
            positions of every sequence (no activation statistics needed). ``"none"``: no sinks.
        sink_topk: activations looked at by ``sink_mode="topk"``.
        max_sink_tokens: at most this many sink tokens per sequence (the side store's size).
        recent_window: the last ``recent_window`` tokens stay in full precision (0: none).
        boosted_layers: layer indices whose K/V use ``boost_bits`` instead.
        boost_bits: bits for boosted layers.
        scale_format: ``"fp16"`` (fp16 scale + fp16 zero) or ``"fp8"`` (e4m3 scale + uint8 zero).
        version: schema version of this config.
    """

    key_bits: int = 2
    value_bits: int = 2
    group_size: int | None = None
    value_group_size: int | None = None
    center_keys: bool = True
    key_clip_ratio: float | None = None
    value_clip_ratio: float | None = None
    head_group_size: int | None = None
    pre_rope: bool = True
    reorder: bool = True
    rotate_values: bool = True
    sink_mode: str = "first"
    sink_topk: int = 20
    max_sink_tokens: int = 1
    recent_window: int = 0
    boosted_layers: tuple[int, ...] = field(default_factory=tuple)
    boost_bits: int = 4
    scale_format: str = "fp8"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        for name in ("key_bits", "value_bits", "boost_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or v not in SUPPORTED_BITS:
                raise ValueError(f"{name}={v!r}: supported bit widths are {SUPPORTED_BITS}")
        for name in ("group_size", "value_group_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 8 or v % 8):
                raise ValueError(f"{name}={v!r}: must be a positive multiple of 8 (or None)")
        for name in ("key_clip_ratio", "value_clip_ratio"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0.0 < v <= 1.0):
                raise ValueError(f"{name}={v!r}: must be in (0, 1] or None")
        if self.head_group_size is not None and (not isinstance(self.head_group_size, int) or self.head_group_size < 1):
            raise ValueError(f"head_group_size={self.head_group_size!r}: must be a positive int or None")
        for name in ("sink_topk", "max_sink_tokens", "recent_window"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r}: must be a non-negative int")
        if self.sink_mode not in SINK_MODES:
            raise ValueError(f"sink_mode={self.sink_mode!r}: expected one of {SINK_MODES}")
        if self.sink_mode != "none" and self.max_sink_tokens == 0:
            raise ValueError(f"max_sink_tokens=0 with sink_mode={self.sink_mode!r}: use sink_mode='none'")
        if self.sink_mode == "topk" and self.sink_topk == 0:
            raise ValueError("sink_topk=0 with sink_mode='topk': use sink_mode='none'")
        object.__setattr__(self, "boosted_layers", tuple(int(i) for i in self.boosted_layers))
        if any(i < 0 for i in self.boosted_layers) or len(set(self.boosted_layers)) != len(self.boosted_layers):
            raise ValueError(f"boosted_layers={self.boosted_layers}: must be distinct non-negative layer indices")
        if self.scale_format not in SCALE_FORMATS:
            raise ValueError(f"scale_format={self.scale_format!r}: expected one of {SCALE_FORMATS}")
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"RotateKVConfig version {self.version} is not supported by this rotkv (expects {CONFIG_VERSION}); "
                "re-run calibration with this version"
            )

    # ---- derived values -------------------------------------------------------------------------
    def bits_for_layer(self, layer: int) -> tuple[int, int]:
        """(key bits, value bits) of one layer."""
        if layer in self.boosted_layers:
            return max(self.boost_bits, self.key_bits), max(self.boost_bits, self.value_bits)
        return self.key_bits, self.value_bits

    def clip_ratios(self, key_bits: int, value_bits: int) -> tuple[float, float]:
        kc = self.key_clip_ratio if self.key_clip_ratio is not None else default_clip_ratio(key_bits)
        vc = self.value_clip_ratio if self.value_clip_ratio is not None else default_clip_ratio(value_bits)
        return float(kc), float(vc)

    # ---- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["boosted_layers"] = list(self.boosted_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RotateKVConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown RotateKVConfig fields {sorted(unknown)}")
        d = dict(d)
        if "boosted_layers" in d:
            d["boosted_layers"] = tuple(d["boosted_layers"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "RotateKVConfig":
        return cls.from_dict(json.loads(s))

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> "RotateKVConfig":
        """The default config of ``rotkv{bits}``."""
        return cls(key_bits=bits, value_bits=bits, **overrides)


def config_for_cache_dtype(name: str, **overrides: Any) -> RotateKVConfig:
    """The default config behind a ``--kv-cache-dtype`` name such as ``"rotkv2"``: its preset's key/value bits
    and recent window on the defaults of :class:`RotateKVConfig` (what the vLLM backend serves with a default
    calibration; ``overrides`` replace any field)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv cache dtype {name!r}: expected one of {sorted(KV_CACHE_DTYPES)}")
    p = KV_CACHE_DTYPES[name]
    kw = dict(key_bits=p.key_bits, value_bits=p.value_bits, recent_window=p.recent_window)
    kw.update(overrides)
    return RotateKVConfig(**kw)


@dataclass(frozen=True)
class RotateKVLayout:
    """A config resolved against one model's (per-rank) KV shapes.

    Attributes:
        num_kv_heads: KV heads on this rank.
        head_dim: width of one head.
        head_group_size: heads per rotated group; ``group_width = head_group_size * head_dim``.
        group_size: key quantization group (divides ``group_width``).
        value_group_size: value quantization group (divides ``kv_width``).
    """

    num_kv_heads: int
    head_dim: int
    head_group_size: int
    group_size: int
    value_group_size: int = 0

    def __post_init__(self) -> None:
        if self.value_group_size == 0:
            object.__setattr__(self, "value_group_size", self.group_size)

    @property
    def group_width(self) -> int:
        return self.head_group_size * self.head_dim

    @property
    def num_head_groups(self) -> int:
        return self.num_kv_heads // self.head_group_size

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def resolve(cls, config: RotateKVConfig, num_kv_heads: int, head_dim: int, tp_size: int = 1) -> "RotateKVLayout":
        """Pick head grouping and group size for a model; groups never straddle a tensor-parallel rank.

        Raises:
            ValueError: KV heads that do not split evenly over ``tp_size``, a head width with no
                Hadamard matrix, or a ``group_size``/``head_group_size`` that does not fit.
        """
        if num_kv_heads < 1 or head_dim < 1:
            raise ValueError(f"num_kv_heads={num_kv_heads}, head_dim={head_dim}: must be positive")
        if tp_size < 1 or num_kv_heads % tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} does not divide num_key_value_heads={num_kv_heads}: "
                "RotateKV keeps each rotated head group on one rank"
            )
        heads = num_kv_heads // tp_size
        if not has_hadamard(head_dim):
            raise ValueError(
                f"head_dim={head_dim} has no Hadamard matrix (need m * 2**k with m in 1, 12, 20, 28, 36, ...): "
                "RotateKV cannot rotate this model's keys"
            )
        if config.head_group_size is not None:
            g = config.head_group_size
            if heads % g:
                raise ValueError(f"head_group_size={g} does not divide the {heads} KV heads per rank")
            if not has_hadamard(g * head_dim):
                raise ValueError(f"head_group_size={g}: width {g * head_dim} has no Hadamard matrix")
        else:
            g = max(d for d in range(1, heads + 1) if heads % d == 0 and has_hadamard(d * head_dim))
        width = g * head_dim
        if config.group_size is None:
            gs = 64 if width % 64 == 0 else (width if width <= 256 else 128)
            if width % gs:
                raise ValueError(f"no default quantization group fits width {width}: set group_size")
        else:
            gs = config.group_size
            if width % gs:
                raise ValueError(
                    f"group_size={gs} does not divide the rotated head-group width {width} "
                    f"({g} heads x {head_dim}); choose a divisor of {width}"
                )
        kv_width = heads * head_dim
        if config.value_group_size is None:
            vgs = width if width <= 256 else 128
        else:
            vgs = config.value_group_size
            if kv_width % vgs:
                raise ValueError(f"value_group_size={vgs} does not divide the per-rank KV width {kv_width}")
        return cls(num_kv_heads=heads, head_dim=head_dim, head_group_size=g, group_size=gs, value_group_size=vgs)

    def bits_per_element(self, bits: int, scale_format: str, key: bool = True) -> float:
        return bits_per_element(bits, self.group_size if key else self.value_group_size, scale_format)

    def packed_bytes_per_token(self, bits: int, scale_format: str, key: bool = True) -> int:
        """Bytes of one token's K (``key=True``) or V on this rank: packed codes plus scales and zeros."""
        from rotkv_kernels.rotkv_cache import record_bytes

        return record_bytes(self.kv_width, bits, self.group_size if key else self.value_group_size, scale_format)
