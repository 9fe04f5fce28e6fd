"""Fused C++ CPU kernels of the RotateKV paged cache: attention over the packed pages and the write.

Entry points (same contracts as the references in ``rotkv_paged``, same signature style as
``rotkv_paged_triton``): :func:`paged_attention_cpu`, :func:`paged_decode_cpu`, :func:`paged_write_cpu`.
They call the ``torch.library`` ops ``rotkv::paged_attention_cpu`` and ``rotkv::paged_write_cpu``
(C++ in ``kernels/csrc``, built into ``rotkv_kernels._paged_cpu`` by :data:`BUILD_COMMAND`); fake
implementations are registered here, so ``torch.compile`` and vLLM's graphs see each as one op.

**Attention** (``kernels/csrc/rotkv_paged_cpu_kernel.h``). One OpenMP region over work items (request, query
block, rotation block of ``g`` KV heads, context split); per tile of ``N`` cached positions (16 with AVX-512,
8 with AVX2, 1 for the scalar reference) an item reads the ``N`` slots in place (copied first when the block
size is not a multiple of ``N``) while prefetching the next tile's, then

- keys with lanes over positions: the tile's code words come in by register transposes (gathers at 3 bits),
  are unpacked and dequantized ``(q - z) * s / sqrt(g D)`` (scales and zeros of 4 fp8 or 2 fp16 groups per
  gather), stored channel ``i`` goes to its natural index ``key_perm[i]`` (free), and the inverse
  ``kron(H_m, H_p)`` runs on all ``N`` keys at once (butterflies on whole vectors, 3-4 stages per pass over
  memory, then the small core ``H_m^T`` for orders like 192 = 12 * 16); then the key mean and RoPE at each
  position. RoPE sits between the Hadamard and the dot product, so the query cannot absorb the rotation:
  one fast transform per cached key is the kernel's main cost;
- scores of all query heads of the block (a register block of up to 8 rows per KV head), online softmax in
  base 2 (the query is pre-multiplied by ``scale * log2 e``); cos/sin come from tile-shaped tables built once
  and cached across calls (keyed on the table tensors and their version counters; one half for ``[c | c]``
  tables);
- values with lanes over channels: unpack, subtract the zero, accumulate ``p_t s_t (q - z)`` per row *in
  the values' rotated basis*; the item that completes a row's splits merges them (a ticket per item, so a
  call has one barrier) and applies one inverse per-head Hadamard per output row.

Sinks (``spec.sink_tokens``) come from the page's full-precision area in split 0. Bytes read per cached
token and layer: the K and V records (``spec.key_bytes + spec.value_bytes``), e.g. 560 for Llama-3-8B at
2 bits (fp8 scales, key groups of 64, value groups of 128) and 104 for SmolLM2-135M, against 4096 and 768
for bf16 K/V.

**Write**: per token (parallel), the reference's fp32 operations in the same order (inverse RoPE, key
mean, butterflies then core then ``1/sqrt(n)``, channel order, min/max quantization with the stored scale,
packing), so records are byte-identical to ``paged_write_ref`` wherever the rotation's sums are exact.

ISA: AVX-512 (F/BW/VL/DQ), AVX2 + FMA, or the scalar reference, chosen once from the CPU's features;
``isa=`` or ``ROTKV_CPU_ISA=avx512|avx2|scalar`` forces one (tests; asking for more than the CPU has is a
``ValueError``).

Recent window (``spec.recent_window = R``): the write stores each token's K/V in its page's ring as well
(``rotkv_paged.ring_write_mask``'s rule, per token); :func:`recent_prev_cpu` reads the ``R - 1`` positions before
each request's step from the rings (``rotkv_paged.recent_prev_ref``); the attention takes each query's last ``R``
positions in full precision, from the step's own K/V or from those, as one more source of keys and values in
split 0, like the sinks (values rotated into the accumulators' basis once per call), and leaves those positions
out of the packed tiles. All of it in C++: no per-layer tensor work in Python on the serving path.

Sliding window (``spec.sliding_window = SW``, layout entry 13): a work item's context and its splits start at its
first query's window (``max(0, pos - SW + 1)``), each row's scores are masked below its own first key, and the sinks
are read only while inside the window, so no page before the window (vLLM's null block) is touched.

Limits (``ValueError`` otherwise): ``head_dim`` a multiple of 16, quantization groups multiples of 8,
Hadamard cores of order <= 64 (all orders ``m * 2^k`` that ``rotkv_kernels.hadamard`` generates up to 64).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import weakref

import torch

from rotkv_kernels.hadamard import _core_matrix, hadamard_factors
from rotkv_kernels.rotkv_layout import (
    PagedCacheSpec,
    _check_key_params,
    _check_rope,
    check_paged_attention_args,
    check_paged_write_args,
    check_perm,
    check_recent_args,
)

__all__ = [
    "BUILD_COMMAND",
    "CpuLayerKernels",
    "ISAS",
    "cpu_kernels_available",
    "cpu_kernels_status",
    "cpu_isa",
    "paged_attention_cpu",
    "paged_decode_cpu",
    "paged_write_cpu",
    "recent_prev_cpu",
]

logger = logging.getLogger(__name__)

BUILD_COMMAND = "MAX_JOBS=1 python setup.py build_ext --inplace   (from the rotkv checkout; scripts/setup.sh runs it)"
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
_ISA_NAMES = {v: k for k, v in ISAS.items()}
ISA_ENV = "ROTKV_CPU_ISA"
MAX_CORE_ORDER = 64


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Load the extension (registers the ops); None when loaded, else why not."""
    spec = importlib.util.find_spec("rotkv_kernels._paged_cpu")
    if spec is None or spec.origin is None:
        return f"the rotkv CPU kernels are not built: run {BUILD_COMMAND}"
    try:
        torch.ops.load_library(spec.origin)
    except Exception as e:  # a stale build (another torch) is reported, not hidden
        return f"the rotkv CPU kernels failed to load ({e}): rebuild with {BUILD_COMMAND}"
    return None


def cpu_kernels_status() -> str | None:
    """None when the C++ ops are loaded; otherwise one line saying why not and naming the build command."""
    return _load()


def cpu_kernels_available() -> bool:
    return _load() is None


def _require() -> None:
    why = _load()
    if why is not None:
        raise NotImplementedError(why)


def cpu_isa(isa: str | None = None) -> str:
    """The kernel that runs for ``isa`` (``None``: ``$ROTKV_CPU_ISA`` or ``"auto"``): ``"avx512"``, ``"avx2"`` or
    ``"scalar"``. Raises ``ValueError`` for an unknown name or one this CPU cannot run."""
    _require()
    code = _isa_code(isa)
    try:
        return _ISA_NAMES[int(torch.ops.rotkv.paged_cpu_isa(code))]
    except RuntimeError as e:
        raise ValueError(f"isa={isa!r}: {e}") from None


def _isa_code(isa: str | None) -> int:
    name = isa if isa is not None else os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    if name not in ISAS:
        raise ValueError(f"isa={name!r} (argument or ${ISA_ENV}): expected one of {sorted(ISAS)}")
    return ISAS[name]


@functools.lru_cache(maxsize=None)
def _core(n: int) -> torch.Tensor:
    """fp32 ``[m, m]`` +-1 core of the order-``n`` Hadamard (``n = m * 2^k``)."""
    f = hadamard_factors(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n}")
    m, _ = f
    if m > MAX_CORE_ORDER:
        raise ValueError(f"Hadamard order {n} = {m} * {n // m}: the CPU kernel's cores are limited to order "
                         f"{MAX_CORE_ORDER}; use rotkv_kernels.rotkv_paged.paged_attention_ref")
    return _core_matrix(m).to(torch.float32).contiguous()


def check_cpu_limits(spec: PagedCacheSpec) -> None:
    """Raise ``ValueError`` unless the CPU kernels serve ``spec`` (module docstring: Limits)."""
    if spec.head_dim % 16:
        raise ValueError(f"head_dim={spec.head_dim}: the CPU kernels need a multiple of 16")
    for name in ("key_group_size", "value_group_size"):
        if getattr(spec, name) % 8:
            raise ValueError(f"{name}={getattr(spec, name)}: the CPU kernels need a multiple of 8")
    _core(spec.key_rot_width)
    if spec.value_rot_width != 1:
        _core(spec.value_rot_width)


def _layout(spec: PagedCacheSpec) -> list[int]:
    return [spec.num_kv_heads, spec.head_dim, spec.key_bits, spec.value_bits, spec.key_group_size,
            spec.value_group_size, spec.key_rot_width, int(spec.value_rot_width != 1),
            int(spec.scale_format == "fp8"), spec.sink_tokens, spec.key_bytes, spec.value_bytes, spec.sliding_window,
            spec.recent_window]


def _value_core(spec: PagedCacheSpec) -> torch.Tensor:
    return _core(spec.value_rot_width) if spec.value_rot_width != 1 else _core(1)


# Key orders whose values were checked (a permutation mapping each rotation block onto itself), by id(),
# with a weak reference (an id is reused once its tensor is freed), the tensor's version counter and the
# (width, rotation width) they were checked for. The checks sort the order on every call otherwise: tens of
# microseconds, per layer and step. An in-place edit bumps the version, so an edited order is checked again.
_CHECKED_PERMS: dict[int, tuple] = {}


def _perm_to_check(key_perm: torch.Tensor | None, spec: PagedCacheSpec) -> torch.Tensor | None:
    """``key_perm`` for the full argument checks, or None when its values were checked before (then only its
    dtype and shape are checked here)."""
    if not isinstance(key_perm, torch.Tensor) or key_perm.device.type != "cpu":
        return key_perm
    seen = _CHECKED_PERMS.get(id(key_perm))
    if seen is not None and seen[0]() is key_perm and seen[1:] == (key_perm._version, spec.width,
                                                                   spec.key_rot_width):
        check_perm(key_perm, spec.width, spec.key_rot_width, check_values=False)
        return None
    return key_perm


def _perm_checked(key_perm: torch.Tensor | None, spec: PagedCacheSpec) -> None:
    if isinstance(key_perm, torch.Tensor) and key_perm.device.type == "cpu":
        if len(_CHECKED_PERMS) > 1024:  # freed orders leave dead entries behind
            for k in [k for k, v in _CHECKED_PERMS.items() if v[0]() is None]:
                del _CHECKED_PERMS[k]
        _CHECKED_PERMS[id(key_perm)] = (weakref.ref(key_perm), key_perm._version, spec.width, spec.key_rot_width)


def _on_cpu(records: torch.Tensor) -> None:
    if records.device.type != "cpu":
        raise ValueError(f"records is on {records.device}: the CPU kernels take CPU tensors")


def paged_write_cpu(
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
    isa: str | None = None,
) -> None:
    """C++ :func:`rotkv_paged.paged_write_ref` (same arguments; writes ``records``/``sinks`` in place).
    Op ``rotkv::paged_write_cpu``: the tokens are encoded ``lanes`` at a time (16 on AVX-512, 8 on AVX2, 1 in the
    scalar kernel), the same fp32 operations per value as the reference, so the same bytes. ``isa``: as for
    :func:`paged_attention_cpu`.

    Raises:
        ValueError: like the reference, plus the kernels' limits (module docstring).
        NotImplementedError: the extension is not built (the message names the build command).
    """
    check_paged_write_args(spec, key, value, slot_mapping, positions, records, sinks, rope_cos, rope_sin,
                           _perm_to_check(key_perm, spec), key_mean)
    _perm_checked(key_perm, spec)
    _on_cpu(records)
    check_cpu_limits(spec)
    _require()
    torch.ops.rotkv.paged_write_cpu(key, value, slot_mapping, records, positions,
                                    sinks if spec.fp_slots else None, rope_cos, rope_sin, key_perm, key_mean,
                                    _core(spec.key_rot_width), _value_core(spec), _layout(spec),
                                    float(spec.key_clip), float(spec.value_clip), _isa_code(isa))


def paged_attention_cpu(
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
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    isa: str | None = None,
    recent_key: torch.Tensor | None = None,
    recent_value: torch.Tensor | None = None,
    recent_prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """C++ :func:`rotkv_paged.paged_attention_ref`: causal attention of every query over its request's packed
    cache (decode, chunked prefill, mixed batches). Op ``rotkv::paged_attention_cpu``.

    Extra arguments:
        out: ``[T, Hq, D]`` buffer to write (rows of padding tokens, ``>= query_start_loc[-1]``, are left
            untouched); default a new zero-filled tensor of ``out_dtype``.
        num_splits: context splits per work item (default: enough items for the threads, >= 256 positions
            per split); the splits are merged exactly like split-K on a GPU.
        isa: ``"auto"``, ``"avx512"``, ``"avx2"`` or ``"scalar"`` (default ``$ROTKV_CPU_ISA`` or auto).
    Returns:
        ``[T, Hq, D]`` of ``out_dtype`` (default ``query.dtype``); fp32 arithmetic throughout, one rounding at
        the end.
    Raises:
        ValueError: like the reference, plus the kernels' limits, a bad ``out``/``num_splits``/``isa``.
        NotImplementedError: the extension is not built (the message names the build command).
    """
    check_paged_attention_args(spec, query, records, block_tables, seq_lens, query_start_loc, sinks, scale, rope_cos,
                               rope_sin, _perm_to_check(key_perm, spec), key_mean, out_dtype)
    _perm_checked(key_perm, spec)
    check_recent_args(spec, recent_key, recent_value, recent_prev, query.shape[0], seq_lens.shape[0], records.device)
    _on_cpu(records)
    check_cpu_limits(spec)
    _require()
    code = _isa_code(isa)
    out_dtype = out_dtype or query.dtype
    if out is None:
        out = torch.zeros(query.shape, dtype=out_dtype)
    elif out.shape != query.shape or out.dtype != out_dtype or out.device.type != "cpu":
        raise ValueError(f"out: expected {out_dtype} {tuple(query.shape)} on cpu, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits={num_splits!r}: must be a positive int or None")
    if seq_lens.shape[0] == 0:
        return out
    torch.ops.rotkv.paged_attention_cpu(query, records, block_tables, seq_lens, query_start_loc,
                                        sinks if spec.sink_tokens else None, rope_cos, rope_sin, key_perm, key_mean,
                                        _core(spec.key_rot_width), _value_core(spec), _layout(spec), float(scale),
                                        int(num_splits or 0), code, out, recent_key, recent_value, recent_prev)
    return out


def recent_prev_cpu(sinks: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, *, spec: PagedCacheSpec, block_size: int,
                    before: torch.Tensor | None = None) -> torch.Tensor:
    """C++ :func:`rotkv_paged.recent_prev_ref` (same arguments and result; CPU tensors, ``sinks`` with each slot's
    ``[2, H, D]`` contiguous as ``paged_cache_views`` makes it). Op ``rotkv::ring_prev_cpu``.

    Raises:
        ValueError: ``spec`` has no ring slots, or ``before`` is not a previous result for the same step.
        NotImplementedError: the extension is not built (the message names the build command).
    """
    if not spec.ring_slots:
        raise ValueError(f"recent_window={spec.recent_window}: no ring slots to read")
    want = (seq_lens.shape[0], spec.ring_slots, 2, spec.num_kv_heads, spec.head_dim)
    if before is not None and (tuple(before.shape) != want or before.dtype != sinks.dtype):
        raise ValueError(f"before: expected {sinks.dtype} {want} (a previous result for this step), got "
                         f"{before.dtype} {tuple(before.shape)}")
    _require()
    return torch.ops.rotkv.ring_prev_cpu(sinks, block_tables, seq_lens, query_start_loc, spec.sink_tokens,
                                         spec.ring_slots, block_size, before)


def paged_decode_cpu(query: torch.Tensor, records: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     *, spec: PagedCacheSpec, scale: float, **kw) -> torch.Tensor:
    """Decode (one query per sequence, ``query [B, Hq, D]``): :func:`paged_attention_cpu` with ``q_len = 1``."""
    qsl = torch.arange(seq_lens.shape[0] + 1, dtype=torch.int32)
    return paged_attention_cpu(query, records, block_tables, seq_lens, qsl, spec=spec, scale=scale, **kw)


class CpuLayerKernels:
    """One layer's C++ ops (write, ring reads, attention) with the layer's constants checked once.

    The serving path calls three or four ops per layer and step. :func:`paged_write_cpu`, :func:`recent_prev_cpu`
    and :func:`paged_attention_cpu` check every argument in Python on every call (about 0.1 ms per layer on 2 cores:
    3 ms of a 30-layer model's decode step); here the layer's spec, key order, key mean and RoPE tables are checked
    once, by the same checks, when the object is made, and each step's tensors only by the ops (shapes, dtypes and
    index bounds: ``RuntimeError``). For callers that build the step's tensors themselves (the vLLM backend's
    metadata builder); the functions above stay the checked public entry points, with the same maths.

    Args:
        spec: the layer's layout; ``scale``: the attention's softmax scale.
        rope_cos, rope_sin, key_perm, key_mean: as for :func:`paged_attention_cpu` (CPU tensors).
        isa: as for :func:`paged_attention_cpu`.
    Raises:
        ValueError: what the checked functions raise for these arguments.
        NotImplementedError: the extension is not built.
    """

    def __init__(self, spec: PagedCacheSpec, *, scale: float, rope_cos: torch.Tensor | None = None,
                 rope_sin: torch.Tensor | None = None, key_perm: torch.Tensor | None = None,
                 key_mean: torch.Tensor | None = None, isa: str | None = None) -> None:
        _require()
        if not isinstance(spec, PagedCacheSpec):
            raise ValueError(f"spec: expected a PagedCacheSpec, got {type(spec).__name__}")
        if not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale={scale!r}: must be a positive float (usually head_dim ** -0.5)")
        cpu = torch.device("cpu")
        _check_rope(rope_cos, rope_sin, spec.head_dim, cpu)
        _check_key_params(spec, key_perm, key_mean, cpu)
        check_cpu_limits(spec)
        self.spec, self.scale = spec, float(scale)
        self.rope_cos, self.rope_sin, self.key_perm, self.key_mean = rope_cos, rope_sin, key_perm, key_mean
        self._isa = _isa_code(isa)
        self._layout = _layout(spec)
        self._key_core, self._value_core = _core(spec.key_rot_width), _value_core(spec)
        self._clips = (float(spec.key_clip), float(spec.value_clip))

    def write(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
              records: torch.Tensor, sinks: torch.Tensor | None) -> None:
        """:func:`paged_write_cpu` with this layer's constants."""
        torch.ops.rotkv.paged_write_cpu(key, value, slot_mapping, records, positions,
                                        sinks if self.spec.fp_slots else None, self.rope_cos, self.rope_sin,
                                        self.key_perm, self.key_mean, self._key_core, self._value_core, self._layout,
                                        *self._clips, self._isa)

    def recent_prev(self, sinks: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, block_size: int, before: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """:func:`recent_prev_cpu` (the spec must have ring slots)."""
        return torch.ops.rotkv.ring_prev_cpu(sinks, block_tables, seq_lens, query_start_loc, self.spec.sink_tokens,
                                             self.spec.ring_slots, block_size, before)

    def attend(self, query: torch.Tensor, records: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               query_start_loc: torch.Tensor, sinks: torch.Tensor | None, out: torch.Tensor,
               recent_key: torch.Tensor | None = None, recent_value: torch.Tensor | None = None,
               recent_prev: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`paged_attention_cpu` into ``out`` (``[T, Hq, D]``, any float dtype) with this layer's constants."""
        if seq_lens.shape[0]:
            torch.ops.rotkv.paged_attention_cpu(query, records, block_tables, seq_lens, query_start_loc,
                                                sinks if self.spec.sink_tokens else None, self.rope_cos,
                                                self.rope_sin, self.key_perm, self.key_mean, self._key_core,
                                                self._value_core, self._layout, self.scale, 0, self._isa, out,
                                                recent_key, recent_value, recent_prev)
        return out


# ---- fake implementations (torch.compile / vLLM graphs: the ops only write their outputs in place) ----------

if _load() is None:

    @torch.library.register_fake("rotkv::paged_attention_cpu")
    def _(query, records, block_tables, seq_lens, query_start_loc, sinks, rope_cos, rope_sin, key_perm, key_mean,
          key_core, value_core, layout, scale, num_splits, isa, out, recent_key=None, recent_value=None,
          recent_prev=None):
        return None

    @torch.library.register_fake("rotkv::ring_prev_cpu")
    def _(sinks, block_tables, seq_lens, query_start_loc, sink_tokens, ring_slots, block_size, before=None):
        return sinks.new_empty((seq_lens.shape[0], ring_slots, 2, sinks.shape[3], sinks.shape[4]))

    @torch.library.register_fake("rotkv::paged_write_cpu")
    def _(key, value, slot_mapping, records, positions, sinks, rope_cos, rope_sin, key_perm, key_mean, key_core,
          value_core, layout, key_clip, value_clip, isa=0):
        return None
else:
    logger.debug("%s", _load())
