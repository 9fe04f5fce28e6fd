"""RotateKV paged KV cache: write by slot mapping and attention over the packed cache (pure-PyTorch references).

This is the cache of ``rotkv_vllm.vllm_backend`` (vLLM's paged layout with one packed record per token),
described without vLLM: every function here takes plain tensors and a :class:`PagedCacheSpec`. The Triton
kernels that must match these references are in ``rotkv_paged_triton``; :func:`paged_write` and
:func:`paged_attention` dispatch to them on CUDA (or on the CPU under ``TRITON_INTERPRET=1``) and to the
references otherwise. This module imports neither Triton nor vLLM.

Layout (one layer). A page per block of ``block_size`` tokens, pages ``page_bytes`` apart::

    page  = [ block_size slots of C bytes | sink area: S tokens x (K, V) x H x D in the model dtype ]
    slot  = K record (key_bytes) | V record (value_bytes) | padding up to C (= spec.record_bytes)
    record = packed codes (W * bits / 8 bytes) | scales of all groups | zeros of all groups   (rotkv_cache)

Two views of that memory are what the functions take: ``records`` ``uint8 [num_blocks, block_size, C]``
(``stride(0) == page_bytes``, slots contiguous) and ``sinks`` ``[num_blocks, S, 2, H, D]`` in the model
dtype (or None when ``S == 0``). :func:`paged_cache_views` builds both from vLLM's
``uint8 [num_blocks, 1, block_size, C]`` cache tensor; :func:`alloc_paged_cache` allocates such a cache.

Write (token ``t`` with ``slot_mapping[t] = s >= 0``, ``blk, off = divmod(s, block_size)``)::

    k   = key[t]                      post-RoPE keys [H, D]; with rope tables the pre-RoPE key is recovered:
    k   = (k cos_p - rotate_half(k) sin_p) / (cos_p^2 + sin_p^2)        p = positions[t], fp32
    k   = k - key_mean                 (calibrated per-channel mean, optional)
    records[blk, off] = rotkv_write(k, rot_width = key_rot_width, perm = key_perm)
                      | rotkv_write(value[t], rot_width = value_rot_width)
    if p < S: sinks[blk, p] = (key[t], value[t])                        (the model's own K/V, as given)

Attention (request ``r`` owns query tokens ``query_start_loc[r] .. query_start_loc[r+1]-1``; it has
``L = seq_lens[r]`` cached tokens including its new ones, so query ``i`` sits at position
``L - q_len + i`` and attends to positions ``0 .. its own``)::

    K_j = RoPE_j(read(K record of position j) + key_mean)      V_j = read(V record of position j)
    K_j, V_j = sinks[block_tables[r, 0], j]                       for j < S (full precision)
    out[t, h] = softmax_j(scale * q[t, h] . K_j[h // (Hq / H)]) V_j[h // (Hq / H)]

Decode is the case ``q_len = 1``; chunked prefill reads the earlier chunks from the packed cache like any
other cached token (and the current chunk too: it was written before the read, as in the vLLM backend).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from rotkv_kernels.hadamard import has_hadamard
from rotkv_kernels.quant import SCALE_FORMATS, SUPPORTED_BITS
from rotkv_kernels.rotkv_cache import (
    apply_rope,
    check_perm,
    record_bytes,
    rotate_half,
    rotkv_read_ref,
    rotkv_write_ref,
    use_triton,
)

__all__ = [
    "PAGED_SPEC_VERSION",
    "PagedCacheSpec",
    "PagedCache",
    "alloc_paged_cache",
    "paged_cache_views",
    "inverse_rope_ref",
    "paged_write_ref",
    "paged_attention_ref",
    "paged_decode_ref",
    "token_positions",
    "paged_write",
    "paged_attention",
]

PAGED_SPEC_VERSION = 1
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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

    def sink_token_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one sink token: K and V of all heads in ``dtype``."""
        return 2 * self.width * torch.empty((), dtype=dtype).element_size()

    def page_bytes(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one page: ``block_size * C`` plus the sink area (``S`` tokens of K and V in ``dtype``)."""
        return block_size * self.record_bytes + self.sink_tokens * self.sink_token_bytes(dtype)

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
    sinks: torch.Tensor | None  # [num_blocks, S, 2, H, D] model dtype, or None


def paged_cache_views(kv_cache: torch.Tensor, spec: PagedCacheSpec, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``records`` and ``sinks`` views of vLLM's ``uint8 [num_blocks, 1, block_size, C]`` cache tensor.

    The sink area of a page starts right after its ``block_size * C`` record bytes (page padding).

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
    if spec.sink_tokens == 0:
        return records, None
    s = spec.sink_tokens
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
    if block_size < spec.sink_tokens:
        raise ValueError(f"block_size={block_size} is smaller than sink_tokens={spec.sink_tokens}: the sinks live "
                         "in each sequence's first block")
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


# ---- argument checks shared with the Triton entry points ----------------------------------------------


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
    if spec.sink_tokens:
        want = (records.shape[0], spec.sink_tokens, 2, spec.num_kv_heads, spec.head_dim)
        if not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != want or sinks.dtype not in _FLOAT_DTYPES \
                or sinks.device != records.device:
            raise ValueError(f"sinks: spec.sink_tokens={spec.sink_tokens} needs a float tensor {want} on "
                             f"{records.device} (paged_cache_views), got {_tensor_desc(sinks)}")
    elif sinks is not None:
        raise ValueError("sinks: given, but spec.sink_tokens == 0; pass sinks=None")


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


def _check_write(spec, key, value, slot_mapping, positions, records, sinks, rope_cos, rope_sin, key_perm,
                 key_mean) -> None:
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
    need_pos = rope_cos is not None or spec.sink_tokens > 0
    if need_pos and (not isinstance(positions, torch.Tensor) or positions.shape != (t,)
                     or positions.dtype not in _INT_DTYPES or positions.device != dev):
        raise ValueError(f"positions: expected int32/int64 [{t}] on {dev} (needed for RoPE and sinks), got "
                         f"{_tensor_desc(positions)}")
    _check_rope(rope_cos, rope_sin, d, dev)
    _check_key_params(spec, key_perm, key_mean, dev)


def _check_attention(spec, query, records, block_tables, seq_lens, query_start_loc, sinks, scale, rope_cos,
                     rope_sin, key_perm, key_mean, out_dtype) -> None:
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


# ---- references ---------------------------------------------------------------------------------------


def inverse_rope_ref(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo Hugging Face-convention RoPE: ``k [T, H, D]`` post-RoPE, ``cos/sin [T, D]`` -> pre-RoPE keys (fp32).

    RoPE turns each channel pair ``(i, i + D/2)`` by ``theta`` and scales it by ``m`` (``cos = m cos theta``,
    ``sin = m sin theta``); the inverse is the turn by ``-theta`` divided by ``m^2 = cos^2 + sin^2``:
    ``(k cos - rotate_half(k) sin) / (cos^2 + sin^2)``, evaluated in fp32 in exactly this order (the Triton
    write kernel does the same operations, so quarter-turn tables give bit-identical records).
    """
    k = k.to(torch.float32)
    c, s = cos.to(torch.float32).unsqueeze(1), sin.to(torch.float32).unsqueeze(1)
    return (k * c - rotate_half(k) * s) / (c * c + s * s)


def paged_write_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    records: torch.Tensor,
    *,
    spec: PagedCacheSpec,
    positions: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    key_perm: torch.Tensor | None = None,
    key_mean: torch.Tensor | None = None,
) -> None:
    """Write the step's K/V into the paged cache (reference; in place).

    Args:
        key: ``[T, H, D]`` float. Post-RoPE when ``rope_cos``/``rope_sin`` are given (the pre-RoPE key is
            recovered at ``positions``), else stored as given.
        value: ``[T, H, D]`` float.
        slot_mapping: int ``[T]``: slot ``blk * block_size + off`` of each token; ``-1`` skips it (padding).
        records: uint8 ``[num_blocks, block_size, C]`` (written at the tokens' slots, ``[:key_bytes +
            value_bytes]`` only; the slot padding is left alone).
        positions: int ``[T]``: each token's position in its sequence (needed with RoPE or sinks).
        sinks: ``[num_blocks, S, 2, H, D]`` (``spec.sink_tokens > 0``): tokens at positions ``< S`` also store
            their K (as given) and V there, cast to its dtype.
        rope_cos, rope_sin: fp32 ``[max_position, D]`` Hugging Face-convention tables, or None.
        key_perm: int64 ``[W]`` calibrated channel order of keys (block-preserving), or None.
        key_mean: fp32 ``[W]`` calibrated pre-RoPE key mean (subtracted before encoding), or None.
    Raises:
        ValueError: any argument that does not fit the spec (see the messages).
    """
    _check_write(spec, key, value, slot_mapping, positions, records, sinks, rope_cos, rope_sin, key_perm, key_mean)
    bs = records.shape[1]
    tok = (slot_mapping >= 0).nonzero().squeeze(1)
    if tok.numel() == 0:
        return
    slots = slot_mapping[tok].to(torch.int64)
    blk, off = slots // bs, slots % bs
    k = key[tok]
    if rope_cos is not None:
        pos = positions[tok].to(torch.int64)
        k = inverse_rope_ref(k, rope_cos[pos], rope_sin[pos])
    k = k.to(torch.float32)
    if key_mean is not None:
        k = k - key_mean.view(spec.num_kv_heads, spec.head_dim)
    krec = rotkv_write_ref(k, bits=spec.key_bits, group_size=spec.key_group_size, rot_width=spec.key_rot_width,
                           perm=key_perm, clip_ratio=spec.key_clip, scale_format=spec.scale_format)
    vrec = rotkv_write_ref(value[tok].to(torch.float32), bits=spec.value_bits, group_size=spec.value_group_size,
                           rot_width=spec.value_rot_width, clip_ratio=spec.value_clip, scale_format=spec.scale_format)
    records[blk, off, : spec.key_bytes + spec.value_bytes] = torch.cat((krec, vrec), dim=1)
    if spec.sink_tokens:
        pos = positions[tok].to(torch.int64)
        is_sink = pos < spec.sink_tokens
        if is_sink.any():
            kv = torch.stack((key[tok][is_sink], value[tok][is_sink]), dim=1).to(sinks.dtype)
            sinks[blk[is_sink], pos[is_sink]] = kv


def _decode_context(spec: PagedCacheSpec, records, sinks, table_row, length, rope_cos, rope_sin, key_perm,
                    key_mean) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[L, H, D]`` K (post-RoPE) and V of positions ``0..L-1`` of one sequence, sinks substituted."""
    h, d = spec.num_kv_heads, spec.head_dim
    bs = records.shape[1]
    pos = torch.arange(length, device=records.device)
    rec = records[table_row[pos // bs].to(torch.int64), pos % bs]
    k = rotkv_read_ref(rec[:, : spec.key_bytes], num_heads=h, head_dim=d, bits=spec.key_bits,
                       group_size=spec.key_group_size, rot_width=spec.key_rot_width, perm=key_perm,
                       scale_format=spec.scale_format)
    if key_mean is not None:
        k = k + key_mean.view(h, d)
    if rope_cos is not None:
        k = apply_rope(k, rope_cos[pos].unsqueeze(1), rope_sin[pos].unsqueeze(1))
    v = rotkv_read_ref(rec[:, spec.key_bytes: spec.key_bytes + spec.value_bytes], num_heads=h, head_dim=d,
                       bits=spec.value_bits, group_size=spec.value_group_size, rot_width=spec.value_rot_width,
                       scale_format=spec.scale_format)
    n_sink = min(spec.sink_tokens, length)
    if n_sink:
        full = sinks[int(table_row[0]), :n_sink].to(torch.float32)
        k[:n_sink] = full[:, 0]
        v[:n_sink] = full[:, 1]
    return k, v


def paged_attention_ref(
    query: torch.Tensor,
    records: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    *,
    spec: PagedCacheSpec,
    scale: float,
    sinks: torch.Tensor | None = None,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    key_perm: torch.Tensor | None = None,
    key_mean: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Causal attention of every query over its sequence's packed cache (reference).

    Args:
        query: ``[T, Hq, D]`` float, post-RoPE; ``Hq`` a multiple of ``H`` (query head ``h`` reads KV head
            ``h // (Hq / H)``). Tokens from ``query_start_loc[-1]`` on are padding.
        records, sinks: the cache views (see the module docstring).
        block_tables: int ``[R, max_blocks]``: physical block of each logical block of request ``r``.
        seq_lens: int ``[R]``: cached tokens of each request, its new tokens included.
        query_start_loc: int ``[R + 1]``: request ``r``'s queries are tokens ``[qsl[r], qsl[r + 1])``, the last
            ``q_len`` positions of its sequence.
        scale: softmax scale (``D ** -0.5`` usually).
        rope_cos, rope_sin, key_perm, key_mean: as for :func:`paged_write_ref`; RoPE is applied to each
            decoded key at its own position.
        out_dtype: output dtype (default ``query.dtype``).
    Returns:
        ``[T, Hq, D]``: each key decoded by ``rotkv_read_ref`` (fp32), sinks substituted, the softmax and
        the weighted sum in float64, one rounding to ``out_dtype`` at the end; zeros for padding tokens.
    Raises:
        ValueError: any argument that does not fit (see the messages).
    """
    _check_attention(spec, query, records, block_tables, seq_lens, query_start_loc, sinks, scale, rope_cos,
                     rope_sin, key_perm, key_mean, out_dtype)
    t, hq, d = query.shape
    rep = hq // spec.num_kv_heads
    out = torch.zeros(t, hq, d, dtype=torch.float64, device=query.device)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for r, length in enumerate(lens):
        q_lo, q_hi = qsl[r], qsl[r + 1]
        n_q = q_hi - q_lo
        if n_q <= 0:
            continue
        if n_q > length:
            raise ValueError(f"request {r}: {n_q} queries but seq_lens={length} (the queries' own tokens count)")
        k, v = _decode_context(spec, records, sinks, block_tables[r], length, rope_cos, rope_sin, key_perm,
                               key_mean)
        k = k.double().repeat_interleave(rep, dim=1)  # [L, Hq, D]
        v = v.double().repeat_interleave(rep, dim=1)
        q = query[q_lo:q_hi].double()  # [n_q, Hq, D]
        s = torch.einsum("qhd,lhd->hql", q, k) * scale
        q_pos = torch.arange(length - n_q, length, device=query.device)
        causal = torch.arange(length, device=query.device)[None, :] <= q_pos[:, None]  # [n_q, L]
        s = s.masked_fill(~causal, float("-inf"))
        out[q_lo:q_hi] = torch.einsum("hql,lhd->qhd", s.softmax(-1), v)
    return out.to(out_dtype or query.dtype)


def paged_decode_ref(
    query: torch.Tensor,
    records: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    spec: PagedCacheSpec,
    scale: float,
    **kw,
) -> torch.Tensor:
    """Decode: one query per sequence (``query [B, Hq, D]``); :func:`paged_attention_ref` with ``q_len = 1``."""
    qsl = torch.arange(seq_lens.shape[0] + 1, device=seq_lens.device, dtype=seq_lens.dtype)
    return paged_attention_ref(query, records, block_tables, seq_lens, qsl, spec=spec, scale=scale, **kw)


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


# ---- dispatch -----------------------------------------------------------------------------------------


def paged_write(key, value, slot_mapping, records, *, spec, **kw) -> None:
    """:func:`paged_write_ref`'s contract; the Triton kernel on CUDA (or the CPU under ``TRITON_INTERPRET=1``),
    else the reference."""
    if use_triton(records):
        from rotkv_kernels.rotkv_paged_triton import paged_write_triton

        return paged_write_triton(key, value, slot_mapping, records, spec=spec, **kw)
    return paged_write_ref(key, value, slot_mapping, records, spec=spec, **kw)


def paged_attention(query, records, block_tables, seq_lens, query_start_loc, *, spec, scale, **kw) -> torch.Tensor:
    """:func:`paged_attention_ref`'s contract; the Triton kernels on CUDA (or the CPU under
    ``TRITON_INTERPRET=1``), else the reference. Triton-only tuning arguments (``precision``, ``plan``, ...)
    are refused by the reference."""
    if use_triton(records):
        from rotkv_kernels.rotkv_paged_triton import paged_attention_triton

        return paged_attention_triton(query, records, block_tables, seq_lens, query_start_loc, spec=spec,
                                      scale=scale, **kw)
    return paged_attention_ref(query, records, block_tables, seq_lens, query_start_loc, spec=spec, scale=scale,
                               **kw)
