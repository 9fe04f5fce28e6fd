"""The RotateKV cache layout: a token's record, a paged cache of records, and the argument contracts of the
functions that write and read them.

Record (``record_bytes(width, bits, group_size, scale_format)`` bytes, ``width = H * D``)::

    record = [ packed codes (width * bits / 8 bytes) | scales of all groups (raw LE bytes) | zeros of all groups ]

Paged cache (one layer; a page per block of ``block_size`` tokens, pages ``page_bytes`` apart)::

    page  = [ block_size slots of C bytes | full-precision area: S sink tokens, then R - 1 ring slots,
              each (K, V) x H x D in the model dtype ]
    slot  = K record (key_bytes) | V record (value_bytes) | padding up to C (= spec.record_bytes)

Recent window (``R = spec.recent_window``): a query at position ``t`` reads keys ``t - R + 1 .. t`` in full
precision. Its own step's tokens come from the step's K/V as given; older ones from the rings: the token at
in-block offset ``o`` also stores its K/V in its page's ring slot ``o % (R - 1)``, so the last ``R - 1`` positions
of every block (and hence the last ``R - 1`` positions before any step) are in the rings of the sequence's last
one or two blocks. Every token is stored packed as well: a token that leaves the window reads its record.

The maths that fills them is in ``rotkv_cache`` (records: ``rotkv_write_ref`` / ``rotkv_read_ref``) and
``rotkv_paged`` (pages: ``paged_write_ref`` / ``paged_attention_ref``), with the Triton kernels beside them
(``rotkv_cache_triton``, ``rotkv_paged_triton``) and the CPU attention in ``rotkv_paged_tiles``. This module is
what all of them share, so that none of them imports another's private names (and no reference module and its
Triton module import each other). It imports neither Triton nor vLLM; ``rotkv_cache`` and ``rotkv_paged``
re-export its public names.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from rotkv_kernels.hadamard import has_hadamard
from rotkv_kernels.quant import SCALE_FORMATS, SUPPORTED_BITS, scale_dtypes

__all__ = [
    "record_bytes",
    "check_perm",
    "check_record_write_args",
    "check_record_read_args",
    "PAGED_SPEC_VERSION",
    "PagedCacheSpec",
    "PagedCache",
    "paged_cache_views",
    "alloc_paged_cache",
    "check_paged_write_args",
    "check_paged_attention_args",
    "check_block_size",
    "check_recent_args",
    "token_positions",
    "recent_window_kv",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def record_bytes(width: int, bits: int, group_size: int, scale_format: str) -> int:
    """Bytes of one token's record: ``width*bits//8 + (width//group_size) * (scale bytes + zero bytes)``.

    Raises:
        ValueError: unsupported ``bits``/``scale_format``, ``group_size`` not dividing ``width``, or a
            ``width`` that is not a multiple of 8 (8 codes pack into ``bits`` bytes).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: supported are {SUPPORTED_BITS}")
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format={scale_format!r}: expected one of {SCALE_FORMATS}")
    if width < 8 or width % 8:
        raise ValueError(f"width={width}: must be a positive multiple of 8 to pack codes")
    if group_size < 1 or width % group_size:
        raise ValueError(f"group_size={group_size} must divide the KV width {width}")
    sd, zd = scale_dtypes(scale_format)
    return width * bits // 8 + (width // group_size) * (sd.itemsize + zd.itemsize)


def check_perm(perm: torch.Tensor, width: int, rot_width: int, check_values: bool = True) -> None:
    """Validate a channel permutation: int64 ``[width]``, a permutation, mapping each ``rot_width`` block onto itself.

    ``check_values=False`` checks only dtype and shape (no device sync); callers on a GPU hot path should
    validate once with ``check_values=True`` when they load the permutation.

    Raises:
        ValueError: wrong dtype/shape, not a permutation, or an index leaving its rotation block.
    """
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or perm.shape != (width,):
        got = f"{perm.dtype} {tuple(perm.shape)}" if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise ValueError(f"perm: expected an int64 tensor of shape ({width},), got {got}")
    if not check_values:
        return
    ar = torch.arange(width, device=perm.device)
    if not torch.equal(torch.sort(perm).values, ar):
        raise ValueError("perm is not a permutation of range(H*D)")
    if not torch.equal(perm // rot_width, ar // rot_width):
        raise ValueError(
            f"perm moves channels across rotation blocks of rot_width={rot_width}: each block must map onto itself"
        )


def _check_args(width: int, bits: int, group_size: int, rot_width: int, scale_format: str) -> None:
    record_bytes(width, bits, group_size, scale_format)
    if rot_width < 1 or width % rot_width:
        raise ValueError(f"rot_width={rot_width} must divide the KV width H*D={width}")
    if not has_hadamard(rot_width):
        raise ValueError(
            f"rot_width={rot_width} has no Hadamard matrix (need m * 2**k with m in 1, 12, 20, 28, 36, 44, ...)"
        )


def _check_perm_arg(perm: torch.Tensor | None, width: int, rot_width: int, device: torch.device) -> None:
    if perm is None:
        return
    # Full value checks need a device sync; on a GPU only the metadata is checked (see check_perm).
    check_perm(perm, width, rot_width, check_values=perm.device.type == "cpu")
    if perm.device != device:
        raise ValueError(f"perm is on {perm.device}, the data on {device}: move perm to the same device")


def check_record_write_args(x: torch.Tensor, bits, group_size, rot_width, perm, clip_ratio, scale_format) -> None:
    """Raise ``ValueError`` unless ``rotkv_write_ref``'s arguments fit (its Triton kernel checks the same)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype not in _FLOAT_DTYPES:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a [T, H, D] float32/float16/bfloat16 tensor, got {got}")
    width = x.shape[1] * x.shape[2]
    _check_args(width, bits, group_size, rot_width, scale_format)
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio={clip_ratio} must be in (0, 1]")
    _check_perm_arg(perm, width, rot_width, x.device)


def check_record_read_args(record, num_heads, head_dim, bits, group_size, rot_width, perm, scale_format, cos, sin,
                out_dtype) -> None:
    """Raise ``ValueError`` unless ``rotkv_read_ref``'s arguments fit (its Triton kernel checks the same)."""
    if num_heads < 1 or head_dim < 1:
        raise ValueError(f"num_heads={num_heads}, head_dim={head_dim}: must be positive")
    width = num_heads * head_dim
    _check_args(width, bits, group_size, rot_width, scale_format)
    rb = record_bytes(width, bits, group_size, scale_format)
    if not isinstance(record, torch.Tensor) or record.dtype != torch.uint8 or record.dim() != 2 \
            or record.shape[1] != rb:
        got = f"{record.dtype} {tuple(record.shape)}" if isinstance(record, torch.Tensor) else type(record).__name__
        raise ValueError(f"record: expected uint8 [T, {rb}] (record_bytes of this layout), got {got}")
    _check_perm_arg(perm, width, rot_width, record.device)
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin: pass both (to apply RoPE) or neither")
    if cos is not None:
        t = record.shape[0]
        for name, v in (("cos", cos), ("sin", sin)):
            if v.shape != (t, head_dim) or v.dtype not in _FLOAT_DTYPES or v.device != record.device:
                raise ValueError(
                    f"{name}: expected a float tensor of shape ({t}, {head_dim}) on {record.device}, got "
                    f"{v.dtype} {tuple(v.shape)} on {v.device}"
                )
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even to apply RoPE")
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype}: expected float32, float16 or bfloat16")


PAGED_SPEC_VERSION = 1
_INT_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class PagedCacheSpec:
    """How one layer's K and V are packed into a paged cache slot.

    Attributes:
        num_kv_heads / head_dim: ``H`` and ``D`` of this layer on this rank (``W = H * D``).
        key_bits / value_bits: 2, 3 or 4.
        key_group_size / value_group_size: quantization group along the stored channels; the key group
            must divide ``key_rot_width`` (groups never straddle a rotation block).
        key_rot_width: block Hadamard width of keys (``g * D``, ``g`` KV heads rotated together).
        value_rot_width: ``D`` (per-head Hadamard on values) or ``1`` (no value rotation).
        key_clip / value_clip: min-max clip ratios in (0, 1].
        scale_format: ``"fp16"`` or ``"fp8"``.
        record_bytes: ``C``, the slot size (at least ``key_bytes + value_bytes``); 0 means exactly that
            sum rounded up to an even count (what the vLLM backend uses for a model with one bit width).
        sink_tokens: ``S``, positions kept in full precision in each sequence's first block (0: none).
        recent_window: ``R``, each query reads its last ``R`` keys (itself included) in full precision; every
            page keeps ``R - 1`` ring slots after its sinks (0: no window; 1: the step's own token only).
        sliding_window: ``SW``, the layer's attention window: a query at position ``t`` attends keys
            ``t - SW < j <= t`` only (vLLM's and transformers' convention; 0: every earlier key). The sinks fall
            out of the window like any other position; ``SW >= R`` (the recent window lies inside it). Blocks
            wholly before the window of a step's first query may be vLLM's null block: no path reads them.
        version: schema version.
    """

    num_kv_heads: int
    head_dim: int
    key_bits: int = 2
    value_bits: int = 2
    key_group_size: int = 128
    value_group_size: int = 128
    key_rot_width: int = 0
    value_rot_width: int = 0
    key_clip: float = 0.8
    value_clip: float = 0.8
    scale_format: str = "fp16"
    record_bytes: int = 0
    sink_tokens: int = 0
    recent_window: int = 0
    sliding_window: int = 0
    version: int = PAGED_SPEC_VERSION

    def __post_init__(self) -> None:
        for name in ("num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: must be a positive int")
        h, d = self.num_kv_heads, self.head_dim
        w = h * d
        if self.key_rot_width == 0:
            object.__setattr__(self, "key_rot_width", d)
        if self.value_rot_width == 0:
            object.__setattr__(self, "value_rot_width", d)
        for name in ("key_bits", "value_bits"):
            if getattr(self, name) not in SUPPORTED_BITS:
                raise ValueError(f"{name}={getattr(self, name)!r}: supported bit widths are {SUPPORTED_BITS}")
        if self.scale_format not in SCALE_FORMATS:
            raise ValueError(f"scale_format={self.scale_format!r}: expected one of {SCALE_FORMATS}")
        krw = self.key_rot_width
        if not isinstance(krw, int) or krw < 1 or krw % d or w % krw or not has_hadamard(krw):
            raise ValueError(
                f"key_rot_width={krw!r}: must be g * head_dim for a g dividing num_kv_heads={h}, with a Hadamard "
                f"matrix of that order (e.g. {d})"
            )
        if self.value_rot_width not in (1, d) or not has_hadamard(self.value_rot_width):
            raise ValueError(f"value_rot_width={self.value_rot_width!r}: must be head_dim={d} (per-head Hadamard) "
                             "or 1 (no value rotation)")
        if not isinstance(self.key_group_size, int) or self.key_group_size < 1 or krw % self.key_group_size:
            raise ValueError(f"key_group_size={self.key_group_size!r} must divide key_rot_width={krw}")
        if not isinstance(self.value_group_size, int) or self.value_group_size < 1 or w % self.value_group_size:
            raise ValueError(f"value_group_size={self.value_group_size!r} must divide the KV width {w}")
        for name in ("key_clip", "value_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
                raise ValueError(f"{name}={v!r}: must be in (0, 1]")
        # record_bytes validates bits/width/group sizes once more (and the 8-codes packing rule).
        need = self.key_bytes + self.value_bytes
        if self.record_bytes == 0:
            object.__setattr__(self, "record_bytes", need + need % 2)
        if not isinstance(self.record_bytes, int) or self.record_bytes < need:
            raise ValueError(f"record_bytes={self.record_bytes!r}: a slot needs at least key_bytes + value_bytes "
                             f"= {need} bytes (0 picks that)")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(f"sink_tokens={self.sink_tokens!r}: must be a non-negative int")
        if not isinstance(self.recent_window, int) or self.recent_window < 0:
            raise ValueError(f"recent_window={self.recent_window!r}: must be a non-negative int")
        if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
            raise ValueError(f"sliding_window={self.sliding_window!r}: must be a non-negative int (0: no window)")
        if self.sliding_window and self.sliding_window < self.recent_window:
            raise ValueError(f"sliding_window={self.sliding_window} is shorter than recent_window="
                             f"{self.recent_window}: the full-precision recent window must lie inside the layer's "
                             "attention window")
        if self.version != PAGED_SPEC_VERSION:
            raise ValueError(f"PagedCacheSpec version {self.version} is not supported (expects {PAGED_SPEC_VERSION})")

    # ---- derived sizes ----------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def key_bytes(self) -> int:
        return record_bytes(self.width, self.key_bits, self.key_group_size, self.scale_format)

    @property
    def value_bytes(self) -> int:
        return record_bytes(self.width, self.value_bits, self.value_group_size, self.scale_format)

    @property
    def ring_slots(self) -> int:
        """Full-precision ring slots per page: ``R - 1`` (a query's own token comes from its step)."""
        return max(self.recent_window - 1, 0)

    @property
    def fp_slots(self) -> int:
        """Tokens of a page's full-precision area: ``S`` sinks, then the ring."""
        return self.sink_tokens + self.ring_slots

    def sink_token_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one sink (or ring) token: K and V of all heads in ``dtype``."""
        return 2 * self.width * torch.empty((), dtype=dtype).element_size()

    def page_bytes(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one page: ``block_size * C`` plus the full-precision area (``S + R - 1`` tokens of K and V
        in ``dtype``)."""
        return block_size * self.record_bytes + self.fp_slots * self.sink_token_bytes(dtype)

    # ---- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PagedCacheSpec":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown PagedCacheSpec fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "PagedCacheSpec":
        return cls.from_dict(json.loads(s))


class PagedCache(NamedTuple):
    """A cache allocated like vLLM allocates one layer: ``raw`` bytes and the two views the kernels take."""

    raw: torch.Tensor  # uint8 [num_blocks * page_bytes]
    kv_cache: torch.Tensor  # uint8 [num_blocks, 1, block_size, C]: what vLLM hands the backend
    records: torch.Tensor  # uint8 [num_blocks, block_size, C], stride(0) == page_bytes
    sinks: torch.Tensor | None  # [num_blocks, S + R - 1, 2, H, D] model dtype (sinks, then ring), or None


def paged_cache_views(kv_cache: torch.Tensor, spec: PagedCacheSpec, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``records`` and ``sinks`` views of vLLM's ``uint8 [num_blocks, 1, block_size, C]`` cache tensor.

    The full-precision area of a page starts right after its ``block_size * C`` record bytes (page padding):
    ``sinks [num_blocks, S + R - 1, 2, H, D]``, the ``S`` sink tokens then the ``R - 1`` ring slots (None when
    both are empty).

    Raises:
        ValueError: a tensor that is not this spec's page layout.
    """
    if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 4 or kv_cache.shape[1] != 1 \
            or kv_cache.shape[3] != spec.record_bytes or kv_cache.stride(3) != 1 \
            or kv_cache.stride(2) != spec.record_bytes:
        raise ValueError(f"kv_cache: expected uint8 [num_blocks, 1, block_size, {spec.record_bytes}] with contiguous "
                         f"slots, got {kv_cache.dtype} {tuple(kv_cache.shape)} strides {kv_cache.stride()}")
    nb, _, bs, c = kv_cache.shape
    page = spec.page_bytes(bs, dtype)
    if nb > 1 and kv_cache.stride(0) < page:
        raise ValueError(f"kv_cache pages are {kv_cache.stride(0)} bytes apart, this spec needs {page}")
    records = kv_cache[:, 0]
    if spec.fp_slots == 0:
        return records, None
    s = spec.fp_slots
    itemsize = torch.empty((), dtype=dtype).element_size()
    off = kv_cache.storage_offset() + bs * c
    if off % itemsize or kv_cache.stride(0) % itemsize:
        raise ValueError(f"the sink area is not aligned for {dtype}: page stride {kv_cache.stride(0)}, offset {off}")
    raw = torch.as_strided(kv_cache, (nb, s * spec.sink_token_bytes(dtype)), (kv_cache.stride(0), 1), off)
    sinks = raw.view(dtype).view(nb, s, 2, spec.num_kv_heads, spec.head_dim)
    return records, sinks


def alloc_paged_cache(spec: PagedCacheSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str = "cpu", fill: int | None = None) -> PagedCache:
    """Allocate one layer's cache (pages of :meth:`PagedCacheSpec.page_bytes`) and its views.

    ``fill=None`` leaves the bytes uninitialized (``torch.empty``: the pages of a large CPU cache are not
    committed until touched); an int fills every byte with it.

    Raises:
        ValueError: non-positive sizes, a block smaller than the sink count, or a dtype that is not float.
    """
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"num_blocks={num_blocks}, block_size={block_size}: must be positive")
    check_block_size(spec, block_size)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype}: the sink store's dtype must be float32, float16 or bfloat16")
    page = spec.page_bytes(block_size, dtype)
    raw = torch.empty(num_blocks * page, dtype=torch.uint8, device=device)
    if fill is not None:
        raw.fill_(fill)
    c = spec.record_bytes
    kv = torch.as_strided(raw, (num_blocks, 1, block_size, c), (page, block_size * c, c, 1))
    records, sinks = paged_cache_views(kv, spec, dtype)
    return PagedCache(raw=raw, kv_cache=kv, records=records, sinks=sinks)


def check_block_size(spec: PagedCacheSpec, block_size: int) -> None:
    """Raise ``ValueError`` unless pages of ``block_size`` tokens can hold ``spec``'s sinks (all in a sequence's
    first block) and its recent window (the last ``R - 1`` positions must span at most two blocks)."""
    if block_size < spec.sink_tokens:
        raise ValueError(f"block_size={block_size} is smaller than sink_tokens={spec.sink_tokens}: the sinks live "
                         "in each sequence's first block")
    if block_size < spec.ring_slots:
        raise ValueError(f"block_size={block_size} is smaller than the recent window's {spec.ring_slots} ring slots "
                         f"(recent_window={spec.recent_window}): use a larger block size or a smaller window")


# ---- argument contracts (the references and the Triton entry points check the same) -------------------


def _tensor_desc(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_cache(spec: PagedCacheSpec, records: torch.Tensor, sinks: torch.Tensor | None) -> None:
    if not isinstance(spec, PagedCacheSpec):
        raise ValueError(f"spec: expected a PagedCacheSpec, got {type(spec).__name__}")
    if not isinstance(records, torch.Tensor) or records.dtype != torch.uint8 or records.dim() != 3 \
            or records.shape[2] != spec.record_bytes or records.stride(2) != 1 \
            or records.stride(1) != spec.record_bytes:
        raise ValueError(f"records: expected uint8 [num_blocks, block_size, {spec.record_bytes}] with contiguous "
                         f"slots (paged_cache_views), got {_tensor_desc(records)}")
    if spec.fp_slots:
        want = (records.shape[0], spec.fp_slots, 2, spec.num_kv_heads, spec.head_dim)
        if not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != want or sinks.dtype not in _FLOAT_DTYPES \
                or sinks.device != records.device:
            raise ValueError(f"sinks: spec.sink_tokens={spec.sink_tokens} and recent_window={spec.recent_window} need "
                             f"a float tensor {want} on {records.device} (paged_cache_views), got "
                             f"{_tensor_desc(sinks)}")
        check_block_size(spec, records.shape[1])
    elif sinks is not None:
        raise ValueError("sinks: given, but the spec has no sinks and no recent window ring; pass sinks=None")


def _check_rope(rope_cos, rope_sin, d: int, device) -> None:
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError("rope_cos and rope_sin: pass both (keys are post-RoPE) or neither")
    if rope_cos is None:
        return
    for name, v in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[1] != d or v.dtype != torch.float32 \
                or v.device != device or v.stride(1) != 1:
            raise ValueError(f"{name}: expected fp32 [max_position, {d}] (last dim contiguous) on {device}, got "
                             f"{_tensor_desc(v)}")
    if rope_cos.shape != rope_sin.shape:
        raise ValueError(f"rope_cos {tuple(rope_cos.shape)} and rope_sin {tuple(rope_sin.shape)} differ in shape")
    if d % 2:
        raise ValueError(f"head_dim={d} must be even to apply RoPE")


def _check_key_params(spec: PagedCacheSpec, key_perm, key_mean, device) -> None:
    w = spec.width
    if key_perm is not None:
        check_perm(key_perm, w, spec.key_rot_width, check_values=key_perm.device.type == "cpu")
        if key_perm.device != device:
            raise ValueError(f"key_perm is on {key_perm.device}, the cache on {device}: move it")
    if key_mean is not None:
        if not isinstance(key_mean, torch.Tensor) or key_mean.shape != (w,) or key_mean.dtype != torch.float32 \
                or key_mean.device != device:
            raise ValueError(f"key_mean: expected fp32 [{w}] on {device}, got {_tensor_desc(key_mean)}")


def check_paged_write_args(spec, key, value, slot_mapping, positions, records, sinks, rope_cos, rope_sin, key_perm,
                           key_mean) -> None:
    """Raise ``ValueError`` unless ``paged_write_ref``'s arguments fit (its Triton kernel checks the same)."""
    _check_cache(spec, records, sinks)
    h, d = spec.num_kv_heads, spec.head_dim
    dev = records.device
    for name, v in (("key", key), ("value", value)):
        if not isinstance(v, torch.Tensor) or v.dim() != 3 or v.shape[1:] != (h, d) or v.dtype not in _FLOAT_DTYPES \
                or v.device != dev:
            raise ValueError(f"{name}: expected float [T, {h}, {d}] on {dev}, got {_tensor_desc(v)}")
    t = key.shape[0]
    if value.shape[0] != t:
        raise ValueError(f"key has {t} tokens, value {value.shape[0]}")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.shape != (t,) \
            or slot_mapping.dtype not in _INT_DTYPES or slot_mapping.device != dev:
        raise ValueError(f"slot_mapping: expected int32/int64 [{t}] on {dev}, got {_tensor_desc(slot_mapping)}")
    need_pos = rope_cos is not None or spec.sink_tokens > 0 or spec.ring_slots > 0
    if need_pos and (not isinstance(positions, torch.Tensor) or positions.shape != (t,)
                     or positions.dtype not in _INT_DTYPES or positions.device != dev):
        raise ValueError(f"positions: expected int32/int64 [{t}] on {dev} (needed for RoPE and sinks), got "
                         f"{_tensor_desc(positions)}")
    _check_rope(rope_cos, rope_sin, d, dev)
    _check_key_params(spec, key_perm, key_mean, dev)


def check_paged_attention_args(spec, query, records, block_tables, seq_lens, query_start_loc, sinks, scale,
                               rope_cos, rope_sin, key_perm, key_mean, out_dtype) -> None:
    """Raise ``ValueError`` unless ``paged_attention_ref``'s arguments fit (its Triton kernels check the same)."""
    _check_cache(spec, records, sinks)
    h, d = spec.num_kv_heads, spec.head_dim
    dev = records.device
    if not isinstance(query, torch.Tensor) or query.dim() != 3 or query.shape[2] != d \
            or query.dtype not in _FLOAT_DTYPES or query.device != dev:
        raise ValueError(f"query: expected float [T, Hq, {d}] on {dev}, got {_tensor_desc(query)}")
    if query.shape[1] % h:
        raise ValueError(f"query has {query.shape[1]} heads, not a multiple of num_kv_heads={h} (GQA)")
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dim() != 1 or seq_lens.dtype not in _INT_DTYPES:
        raise ValueError(f"seq_lens: expected int32/int64 [R], got {_tensor_desc(seq_lens)}")
    r = seq_lens.shape[0]
    if not isinstance(query_start_loc, torch.Tensor) or query_start_loc.shape != (r + 1,) \
            or query_start_loc.dtype not in _INT_DTYPES:
        raise ValueError(f"query_start_loc: expected int32/int64 [{r + 1}], got {_tensor_desc(query_start_loc)}")
    if not isinstance(block_tables, torch.Tensor) or block_tables.dim() != 2 or block_tables.shape[0] < r \
            or block_tables.dtype not in _INT_DTYPES:
        raise ValueError(f"block_tables: expected int32/int64 [>= {r}, max_blocks], got {_tensor_desc(block_tables)}")
    for name, v in (("seq_lens", seq_lens), ("query_start_loc", query_start_loc), ("block_tables", block_tables)):
        if v.device != dev:
            raise ValueError(f"{name} is on {v.device}, the cache on {dev}: move it")
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale={scale!r}: must be a positive float (usually head_dim ** -0.5)")
    _check_rope(rope_cos, rope_sin, d, dev)
    _check_key_params(spec, key_perm, key_mean, dev)
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype}: expected float32, float16 or bfloat16")


def check_recent_args(spec: PagedCacheSpec, recent_key, recent_value, recent_prev, num_tokens: int, num_reqs: int,
                      device) -> None:
    """Raise ``ValueError`` unless the recent-window arguments of the attention fit ``spec``: with
    ``recent_window = R > 0``, ``recent_key``/``recent_value`` are the step's K (post-RoPE) and V, float
    ``[>= T, H, D]``, and for ``R > 1`` ``recent_prev`` is float ``[num_reqs, R - 1, 2, H, D]``
    (:func:`rotkv_paged.recent_prev_ref`); with ``R = 0`` all three are None."""
    h, d = spec.num_kv_heads, spec.head_dim
    if spec.recent_window == 0:
        if recent_key is not None or recent_value is not None or recent_prev is not None:
            raise ValueError("recent_key/recent_value/recent_prev: given, but spec.recent_window == 0")
        return
    for name, v in (("recent_key", recent_key), ("recent_value", recent_value)):
        if not isinstance(v, torch.Tensor) or v.dim() != 3 or v.shape[0] < num_tokens or v.shape[1:] != (h, d) \
                or v.dtype not in _FLOAT_DTYPES or v.device != device:
            raise ValueError(f"{name}: recent_window={spec.recent_window} needs the step's float [>= {num_tokens}, "
                             f"{h}, {d}] on {device}, got {_tensor_desc(v)}")
    if spec.ring_slots:
        want = (num_reqs, spec.ring_slots, 2, h, d)
        if not isinstance(recent_prev, torch.Tensor) or tuple(recent_prev.shape) != want \
                or recent_prev.dtype not in _FLOAT_DTYPES or recent_prev.device != device:
            raise ValueError(f"recent_prev: recent_window={spec.recent_window} needs a float tensor {want} on "
                             f"{device} (rotkv_paged.recent_prev_ref), got {_tensor_desc(recent_prev)}")
    elif recent_prev is not None:
        raise ValueError("recent_prev: given, but recent_window=1 has no ring; pass None")


# ---- a step's token positions and recent window (shared by the reference and every kernel) ----------------


def token_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``int64 [num_tokens]``: position of each token in its sequence, computed where the inputs live (no
    host synchronization on CUDA).

    Token ``t`` of request ``r`` (``qsl[r] <= t < qsl[r + 1]``) sits at ``seq_lens[r] - q_len[r] + t -
    qsl[r]`` (the attention's convention above); padding tokens (``t >= qsl[R]``) get 0, a valid row of any
    RoPE table.
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


def recent_window_kv(recent_key: torch.Tensor, recent_value: torch.Tensor, recent_prev: torch.Tensor | None,
                     query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int, window: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's recent window in full precision, gathered from the step's K/V and ``recent_prev``.

    Returns:
        ``kv [T, R, 2, H, D]`` (fp32; entry ``i`` of query ``t`` at position ``pos_t`` is position
        ``pos_t - R + 1 + i``: K post-RoPE as given, V) and ``valid bool [T, R]`` (the position exists, and the
        token is a real query, not padding).
    """
    dev = recent_key.device
    qsl = query_start_loc.to(torch.int64)
    seq = seq_lens.to(torch.int64)
    nreq = seq.shape[0]
    pos = token_positions(qsl, seq, num_tokens)  # [T]
    tok = torch.arange(num_tokens, device=dev)
    req = torch.searchsorted(qsl[1:], tok, right=True).clamp_(max=max(nreq - 1, 0))
    is_query = tok < qsl[nreq] if nreq else torch.zeros_like(tok, dtype=torch.bool)
    p0 = (seq - (qsl[1:] - qsl[:-1]))[req] if nreq else torch.zeros_like(tok)
    kpos = pos.unsqueeze(1) - window + 1 + torch.arange(window, device=dev)  # [T, R]
    valid = (kpos >= 0) & is_query.unsqueeze(1)
    in_step = kpos >= p0.unsqueeze(1)
    step_idx = (qsl[req].unsqueeze(1) + kpos - p0.unsqueeze(1)).clamp(0, max(num_tokens - 1, 0))
    step_kv = torch.stack((recent_key[:num_tokens], recent_value[:num_tokens]), dim=1).to(torch.float32)
    kv = step_kv[step_idx]  # [T, R, 2, H, D]
    if recent_prev is not None and window > 1:
        prev_idx = (kpos - p0.unsqueeze(1) + window - 1).clamp(0, window - 2)
        prev = recent_prev.to(torch.float32)[req.unsqueeze(1), prev_idx]
        kv = torch.where(in_step[..., None, None, None], kv, prev)
    elif window > 1:
        raise ValueError("recent_prev is needed for a recent window longer than 1")
    kv = torch.where(valid[..., None, None, None], kv, 0.0)
    return kv, valid
