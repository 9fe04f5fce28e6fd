"""A transformers KV cache that holds RotateKV's packed pages, for ``model.generate`` and manual forward loops.

    with rotkv_cache(model, calibration) as cache:            # what `vllm serve --kv-cache-dtype rotkv2` stores
        out = model.generate(input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=32)

Which config. Without ``config=`` or ``kv_cache_dtype=`` the cache stores what vLLM stores for the preset whose
bits are the calibration's (``rotkv2`` for a 2-bit calibration): :func:`rotkv_vllm.runtime.effective_config`, the
calibration's settings with the preset's key/value bits and its recent window ``R = 4``, in pages of
``config.DEFAULT_BLOCK_SIZE = 256`` tokens (:func:`resolve_config`). ``kv_cache_dtype="rotkv_k3v2"`` picks another
preset; ``config=`` stores exactly that config (``recent_window=0`` included). (Before the window was wired here the
default was the calibration's own config, usually without a window, in pages of 128.)

What the cache holds (every tensor it owns; :meth:`RotateKVCache.quantized_nbytes` sums exactly these):

- per layer, one pool of pages in the vLLM backend's layout (``rotkv_kernels.rotkv_paged``)::

      page = [ block_size slots of C bytes | S sink tokens, then R - 1 ring slots: (K, V) x H x D, model dtype ]
      slot = K record (pre-RoPE key, grouped-head Hadamard, calibrated channel order, 2-4 bit groups)
             | V record (per-head Hadamard) | padding up to C

  so ``C + (S + R - 1) * 4 * H * D / block_size`` bytes per token in bf16 (104 + 12 = 116 at 2 bits with the
  ``rotkv2`` preset, S = 1, R = 4, 256-token pages, for SmolLM2-135M, against 768 for a bf16 ``DynamicCache``);
  pools hold exactly the pages handed out (a row's last page is partly used);
- per batch row: its length and its count of left-padding columns, and the block table (``int64 [B, blocks]``),
  which together give every stored token's position, i.e. what RoPE is re-applied at on read.

Nothing else is kept between steps: no full-precision copy of any token beyond the sink tokens and the rings, no
cos/sin per token, no dequantized K/V.

Recent window (``R``, as in the vLLM backend, :mod:`rotkv_vllm.vllm_backend`): each query reads its last ``R``
positions, itself included, in full precision. The token at in-page offset ``o`` stores its K/V (as the model gave
them) in ring slot ``o % (R - 1)`` of its page as well as its record (the writers below do both), so the ``R - 1``
positions before a step are in the rings of the row's last one or two pages: ``rotkv_paged.recent_prev_ref`` reads
them before the step's write and again after it, and the step's own positions come from its K/V. Ring slots are
part of each page, so they move with the pages in ``reorder_cache`` and friends and are counted in the bytes. A
``crop`` to a length ``L`` needs positions ``L - R + 1 .. L - 1`` in the rings, but the removed tokens' ring writes
have replaced some of them unless the cut is at (or just after) a page start: such a crop is refused, the cache
unchanged (:meth:`RotateKVCache.crop` derives the condition); build the cache with ``recent_window=0`` for
assisted generation, which crops rejected candidates.

How attention reads it. ``rotkv_cache`` switches the model to the attention function ``"rotkv"``
(:func:`rotkv_attention`, registered with ``transformers.AttentionInterface`` and a 2-D padding mask with
``AttentionMaskInterface``) for the duration of the ``with`` block. Per layer and step the model's attention
hands :meth:`RotateKVCache.update` the step's post-RoPE K/V, which returns them untouched, and then calls
``rotkv_attention`` with the queries, which writes that K/V into the layer's pages and attends over the pages,
with the same ops as the vLLM backend (:mod:`rotkv_vllm.vllm_backend`), picked by ``attention_impl``:

- ``"cpu"``: the fused C++ kernels ``rotkv_paged_cpu.paged_write_cpu`` / ``paged_attention_cpu`` (the vLLM
  backend's ``cpp`` path; the CPU default when built, ``python setup.py build_ext --inplace``). They agree with
  the references to fp32 rounding per call, but at 2 bits a rounding difference can flip a code, so a greedy
  decode can part from the ``"torch"`` path's at a near tie (as in the vLLM backend);
- ``"torch"``: ``rotkv_paged.paged_write_ref`` and ``rotkv_paged_tiles.attend_tiles`` (the vLLM backend's ``torch``
  path; the CPU default when the C++ kernels are not built);
- ``"triton"``: ``rotkv_paged_triton.paged_write_triton`` / ``paged_attention_triton`` (the CUDA default; the
  product precision from ``ROTKV_TRITON_PRECISION`` as in the vLLM backend, ``fp16`` by default).

With a recent window every path passes the window's K/V (``recent_key/recent_value/recent_prev``) to its attention
op, as the vLLM backend does; the ``"torch"`` path gathers it with ``rotkv_paged.recent_window_kv``.

Per-layer parameters (spec with the layer's sliding window, key order, key mean, the layer's RoPE tables: Gemma 3's
local layers their own base) come from one
:class:`rotkv_vllm.runtime.RotateKVRuntime`, shared by every cache of the same model and calibration (it is a
model constant like the weights and is not counted in the cache's bytes). Prefill attends over the packed
records too (the tokens of the step are written before the read, as in the vLLM backend), so a prefill and a
decode see exactly what the cache holds.

Batches and positions. Rows may be left-padded (``generate`` with a tokenizer's ``padding_side="left"``):
padding columns are not stored, and a row's ``i``-th stored token sits at position ``i``, which is what the
model's ``position_ids`` are in ``generate`` (``cumsum(attention_mask) - 1``). A step whose ``position_ids``
disagree (a manual loop over left-padded rows without ``position_ids``) is refused with a ``ValueError``, as is
padding after a row's first token. ``crop``, ``reorder_cache`` (beam search), ``batch_select_indices`` and
``batch_repeat_interleave`` work on whole rows (their pages, rings included, are gathered into a fresh pool).

``generate(..., cache_implementation="rotkv")`` is not offered: transformers 5.19 validates
``cache_implementation`` against a fixed tuple (``generation.configuration_utils.ALL_CACHE_IMPLEMENTATIONS``)
and builds the cache in ``GenerationMixin._prepare_cache_for_generation`` from a fixed ``if`` chain, with no
registry a package can add to; doing it would mean patching both. Pass ``past_key_values=cache`` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from rotkv_kernels.rotkv_layout import check_block_size
from rotkv_kernels.rotkv_paged import PagedCache, alloc_paged_cache, paged_write_ref, recent_prev_ref, recent_window_kv
from rotkv_kernels.rotkv_paged_tiles import AttentionTile, attend_tiles, step_tiles
from rotkv_vllm.calibration import RotateKVCalibration
from rotkv_vllm.config import (
    DEFAULT_BLOCK_SIZE,
    KV_CACHE_DTYPES,
    RotateKVConfig,
    RotateKVLayout,
    config_for_cache_dtype,
)
from rotkv_vllm.model_support import describe_model, layer_attention
from rotkv_vllm.runtime import RotateKVRuntime, effective_config, servable_reason, triton_precision

__all__ = [
    "ATTENTION_IMPLS",
    "ATTENTION_NAME",
    "RotateKVCache",
    "RotateKVLayer",
    "register_rotkv_attention",
    "resolve_config",
    "rotkv_attention",
    "rotkv_cache",
    "tensor_nbytes",
]

ATTENTION_NAME = "rotkv"
ATTENTION_IMPLS = ("auto", "cpu", "torch", "triton")


def tensor_nbytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


# ---- the step: what every layer of one forward shares ---------------------------------------------------------


@dataclass
class _Step:
    """The bookkeeping of one forward (built by layer 0's attention call, shared by every layer).

    Attributes:
        q_len: columns of the step (padding included); batch: rows.
        tok: ``int64 [T]`` index of each stored token in the step's ``[B * q_len]`` tokens, or None when all are
            stored (no padding).
        slot_mapping / positions: ``int64 [T]`` (on the cache's device); query_start_loc ``[B + 1]``,
        seq_lens ``[B]``, block_table ``[B, blocks]`` (device copies for the kernels, CPU ones for planning).
        tiles: the ``"torch"`` path's attention tiles per sliding window (0: none), built by the first layer with
            that window; plans: the ``"triton"`` path's work lists.
    """

    q_len: int
    batch: int
    num_tokens: int
    tok: torch.Tensor | None
    slot_mapping: torch.Tensor
    positions: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    tiles: dict[int, list[AttentionTile]] | None = None
    plans: dict | None = None
    next_layer: int = 0


_PENDING = threading.local()  # (cache, layer index, key tensor) of the last ``update``, consumed by the attention


class RotateKVLayer(DynamicLayer):
    """One layer's pages (``pages``: a :class:`rotkv_kernels.rotkv_paged.PagedCache`, or None before the first
    write). ``keys``/``values`` stay None: nothing in full precision is kept per token."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.pages: PagedCache | None = None

    def nbytes(self) -> int:
        """Bytes of this layer's pool (records, sink areas and unused slots of allocated pages)."""
        return 0 if self.pages is None else self.pages.raw.numel()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("RotateKVLayer is updated through RotateKVCache.update")

    def ensure_pages(self, cache: RotateKVCache, num_blocks: int) -> PagedCache:
        """Grow the pool to ``num_blocks`` pages, keeping the bytes of the existing ones."""
        if self.pages is None or self.pages.records.shape[0] < num_blocks:
            spec = cache.runtime.paged_spec(self.layer_idx)
            new = alloc_paged_cache(spec, num_blocks, cache.block_size, cache.runtime.dtype, device=cache.device)
            if self.pages is not None:
                new.raw[: self.pages.raw.numel()].copy_(self.pages.raw)
            self.pages = new
        return self.pages

    def gather_pages(self, cache: RotateKVCache, block_ids: torch.Tensor) -> None:
        """Replace the pool by its pages ``block_ids`` (in that order)."""
        if self.pages is None:
            return
        spec = cache.runtime.paged_spec(self.layer_idx)
        page = spec.page_bytes(cache.block_size, cache.runtime.dtype)
        old = self.pages.raw.view(-1, page)
        new = alloc_paged_cache(spec, max(1, block_ids.numel()), cache.block_size, cache.runtime.dtype,
                                device=cache.device)
        if block_ids.numel():
            new.raw.view(-1, page).copy_(old.index_select(0, block_ids.to(old.device)))
        self.pages = new

    def get_seq_length(self) -> int:
        raise RuntimeError("ask RotateKVCache.get_seq_length (the lengths are kept per cache)")

    def reset(self) -> None:
        self.pages = None
        self.is_initialized = False


class RotateKVCache(Cache):
    """A transformers ``Cache`` whose layers hold RotateKV pages (see the module docstring).

    Build it with :func:`rotkv_cache` (which also switches the model's attention to ``"rotkv"``), or directly
    and then run the model with ``attn_implementation="rotkv"`` (:func:`register_rotkv_attention` first).

    Args:
        model: a transformers causal LM of a supported family (:mod:`rotkv_vllm.model_support`).
        calibration: from :func:`rotkv_vllm.calibration.calibrate` / ``load_calibration``; required when the
            config reorders or centres keys.
        config: the exact config to store with (its recent window included); exclusive with ``kv_cache_dtype``.
        kv_cache_dtype: a vLLM ``--kv-cache-dtype`` preset name (``"rotkv2"``, ``"rotkv_k3v2"``, ...): the
            calibration's config with the preset's bits and recent window, exactly what vLLM stores
            (:func:`rotkv_vllm.runtime.effective_config`). Default (neither given): the preset whose key/value bits
            are the calibration's, e.g. ``rotkv2`` (recent window 4) for a 2-bit calibration.
        block_size: tokens per page (a page also carries the sink area and the window's ``R - 1`` ring slots, so
            larger pages cost less per token); default the vLLM presets' 256 (``config.DEFAULT_BLOCK_SIZE``).
        attention_impl: ``"auto"`` (``"triton"`` on CUDA; ``"cpu"`` when the C++ kernels are built, else
            ``"torch"``), ``"cpu"``, ``"torch"`` or ``"triton"``.
        runtime: a runtime to share (:meth:`runtime_for`); built from the other arguments when None.
    Raises:
        ValueError: an unsupported model or setting (named), a calibration for another model, an unknown or
            impossible ``attention_impl``.
    """

    def __init__(self, model, calibration: RotateKVCalibration | None = None, config: RotateKVConfig | None = None,
                 *, kv_cache_dtype: str | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 attention_impl: str = "auto", runtime: RotateKVRuntime | None = None):
        info = describe_model(model)
        n_layers = info["num_hidden_layers"]
        super().__init__(layers=[RotateKVLayer(i) for i in range(n_layers)])
        if not isinstance(block_size, int) or block_size < 16 or block_size % 16:
            raise ValueError(f"block_size={block_size!r}: must be a positive multiple of 16")
        self.block_size = block_size
        self.model_config = model.config
        self.device = next(model.parameters()).device
        if runtime is None:
            runtime = self.runtime_for(model, calibration, config, kv_cache_dtype=kv_cache_dtype)
        self.runtime = runtime
        try:
            check_block_size(runtime.paged_spec(0), block_size)
        except ValueError as e:
            raise ValueError(f"block_size={block_size}: {e}") from None
        self.attention_impl = _select_impl(attention_impl, self.device, self.runtime)
        # The fused attention's product precision, as the vLLM backend's (ROTKV_TRITON_PRECISION, default fp16).
        self.triton_precision = triton_precision() if self.attention_impl == "triton" else None
        self._rotary = _rotary_module(model)
        # Per-row state: real tokens stored, left-padding columns seen, block table; and columns seen in all.
        self.lengths: torch.Tensor | None = None  # int64 [B] (CPU)
        self.left_padding: torch.Tensor | None = None  # int64 [B] (CPU)
        self.block_table: torch.Tensor | None = None  # int64 [B, blocks] (CPU)
        self.seen = 0
        self.num_blocks = 0  # pages handed out (every layer's pool has at least this many)
        self._step: _Step | None = None

    # ---- construction ---------------------------------------------------------------------------------------
    @staticmethod
    def runtime_for(model, calibration: RotateKVCalibration | None = None, config: RotateKVConfig | None = None,
                    max_position: int | None = None, *, kv_cache_dtype: str | None = None) -> RotateKVRuntime:
        """The :class:`RotateKVRuntime` of ``model`` + ``calibration`` + the config (:func:`resolve_config`), with
        the model's own RoPE tables (``fp32 [max_position, D]``, attention scaling folded in).

        Raises:
            ValueError: an unsupported model or setting, a calibration for another model, a config that needs
                calibrated statistics without a calibration, both ``config`` and ``kv_cache_dtype``.
        """
        info = describe_model(model)
        if calibration is not None:
            calibration.check_model(model)
        config = resolve_config(calibration, config, kv_cache_dtype)
        if (config.reorder or config.center_keys) and calibration is None:
            raise ValueError("this RotateKV config uses calibrated key statistics: pass "
                             "calibration=load_calibration(MODEL_DIR)")
        if not config.pre_rope:
            raise ValueError("the RotateKV cache stores pre-RoPE keys: pre_rope=False is only for the reference "
                             "ablation")
        _check_storable(config)
        layout = RotateKVLayout.resolve(config, info["num_key_value_heads"], info["head_dim"])
        n_layers = info["num_hidden_layers"]
        device = next(model.parameters()).device
        orders = means = None
        if config.reorder:
            orders = [calibration.key_orders[i].to(torch.int64) for i in range(n_layers)]
        if config.center_keys:
            means = [m.to(torch.float32).reshape(-1).contiguous() for m in calibration.key_means]
        n = max_position or int(getattr(model.config, "max_position_embeddings", 0) or 4096)
        ropes = _layer_rope_tables(model, _rotary_module(model), n, device)
        dtype = next(model.parameters()).dtype
        # Each layer's sliding window (the model's mask function is replaced by a padding mask: the kernels apply
        # the window, t - SW < j <= t in stored positions, which left padding does not shift).
        windows = [layer_attention(model, i).sliding_window or 0 for i in range(n_layers)]
        return RotateKVRuntime(config=config, layout=layout, num_layers=n_layers, key_orders=orders, dtype=dtype,
                               key_means=means, layer_ropes=ropes, sliding_windows=windows if any(windows) else None)

    # ---- sizes ----------------------------------------------------------------------------------------------
    @property
    def config(self) -> RotateKVConfig:
        return self.runtime.config

    def owned_tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds between steps (pools and per-row state)."""
        out = [t for t in (self.lengths, self.left_padding, self.block_table) if t is not None]
        out += [layer.pages.raw for layer in self.layers if layer.pages is not None]
        return out

    def quantized_nbytes(self) -> int:
        """Bytes of every tensor the cache holds: the layers' pools (records, sink areas, unused slots of the last
        pages) and the per-row lengths, left padding and block table. The runtime's tables are model constants
        shared by all caches of a model (:meth:`runtime_for`) and not counted."""
        return tensor_nbytes(self.owned_tensors())

    def bits_per_element(self) -> float:
        """Stored bits per cached K/V element of the tokens held: their records, with the sink tokens at the model
        dtype's width, plus the recent window's filled ring slots (``min(R - 1, tokens in the page)`` full-precision
        copies per page in use; every token keeps its record too). Unused slots of the last pages and the per-row
        state are not counted."""
        if self.lengths is None or int(self.lengths.sum()) == 0:
            return 0.0
        rt = self.runtime
        lay = rt.layout
        n_tok = int(self.lengths.sum())
        n_sink = int(self.lengths.clamp(max=rt.sink_tokens).sum())
        bs, n = self.block_size, rt.ring_slots
        n_ring = int((self.lengths // bs * n + (self.lengths % bs).clamp(max=n)).sum())
        itemsize = torch.empty((), dtype=rt.dtype).element_size()
        fp_token_bits = 2 * lay.kv_width * itemsize * 8
        bits = 0.0
        for i in range(rt.num_layers):
            c = rt.codec(i)
            bits += (n_tok - n_sink) * (c.key_bytes + c.value_bytes) * 8 + (n_sink + n_ring) * fp_token_bits
        return bits / (n_tok * 2 * lay.kv_width * rt.num_layers)

    # ---- transformers Cache API -------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Hand the step's K/V (``[B, H, T, D]``, K post-RoPE) to the ``"rotkv"`` attention, which stores them and
        attends over the pages; returns them unchanged.

        Raises:
            ValueError: the model's attention is not ``"rotkv"`` (another attention would read only the new
                tokens); RuntimeError: the previous layer's K/V were never consumed.
        """
        impl = getattr(self.model_config, "_attn_implementation", None)
        if impl != ATTENTION_NAME:
            raise ValueError(f"RotateKVCache needs the model's attention to be {ATTENTION_NAME!r}, not {impl!r}: use "
                             "`with rotkv_cache(model, calibration) as cache:` or "
                             f"model.set_attn_implementation({ATTENTION_NAME!r}) after register_rotkv_attention()")
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        _PENDING.value = (self, layer_idx, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns seen (left padding included): what transformers' positions and masks count."""
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return -1 if self.lengths is None else int(self.lengths.numel())

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.lengths = self.left_padding = self.block_table = None
        self.seen = self.num_blocks = 0
        self._step = None

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` columns (a positive value is the length to keep, the legacy
        convention of ``DynamicLayer.crop``).

        With a recent window the next query at position ``L`` (the new length) reads positions ``L - R + 1 ..
        L - 1`` from the rings, but a removed position ``p >= L`` has overwritten ring slot ``(p % bs) % (R - 1)``
        of its page, which position ``p - (R - 1)`` held. So position ``q`` of the window is lost iff
        ``q + R - 1`` was stored (``< old length``) in the same page (``q % bs + R - 1 < bs``); its full-precision
        K/V exist nowhere else, and such a crop is refused (:meth:`lost_ring_positions`), the cache unchanged.

        Raises:
            ValueError: a crop that loses window positions (see above).
        """
        if tokens_to_remove > 0:
            tokens_to_remove = max(0, self.seen - tokens_to_remove)
        k = abs(tokens_to_remove)
        if k == 0 or self.lengths is None:
            return
        seen = max(0, self.seen - k)
        left_padding = self.left_padding.clamp(max=seen)
        lengths = (seen - left_padding).clamp(min=0)
        lost = self.lost_ring_positions(lengths)
        if lost:
            r, q = lost[0]
            raise ValueError(
                f"crop({tokens_to_remove}): row {r} would keep {int(lengths[r])} tokens, but the removed tokens' ring "
                f"writes replaced the full-precision K/V of position(s) {q} that the recent window "
                f"(recent_window={self.runtime.recent_window}) reads next; only its {self.runtime.ring_slots} "
                "ring slots per page held them. Crop only to lengths whose window is intact, or build the cache "
                "with a config of recent_window=0 for assisted generation")
        self.seen, self.left_padding, self.lengths = seen, left_padding, lengths
        self._regather(torch.arange(self.lengths.numel()))

    def lost_ring_positions(self, lengths: torch.Tensor) -> list[tuple[int, list[int]]]:
        """``[(row, positions)]``: for a crop to ``lengths`` (``int64 [B]``, at most the current ones), the
        positions ``L - R + 1 .. L - 1`` of each row whose ring slot a removed position has overwritten (see
        :meth:`crop`); empty without ring slots or when every window is intact."""
        n, bs = self.runtime.ring_slots, self.block_size
        out = []
        if n == 0 or self.lengths is None:
            return out
        for r, (new, old) in enumerate(zip(lengths.tolist(), self.lengths.tolist())):
            lost = [q for q in range(max(0, new - n), new) if q + n < old and q % bs + n < bs]
            if lost:
                out.append((r, lost))
        return out

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row ``i`` becomes row ``beam_idx[i]`` (beam search)."""
        if self.lengths is not None:
            self._regather(beam_idx.to("cpu", torch.int64))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.lengths is not None:
            self._regather(indices.to("cpu", torch.int64))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.lengths is not None:
            self._regather(torch.arange(self.lengths.numel()).repeat_interleave(repeats))

    def _regather(self, rows: torch.Tensor) -> None:
        """Rebuild every pool with the pages of ``rows`` (in that order), exactly as many as their lengths need."""
        bs = self.block_size
        lengths, pad = self.lengths[rows], self.left_padding[rows]
        need = (lengths + bs - 1) // bs
        ids = [self.block_table[r, : int(n)] for r, n in zip(rows.tolist(), need.tolist())]
        ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
        for layer in self.layers:
            layer.gather_pages(self, ids)
        width = max(1, int(need.max()) if need.numel() else 1)
        starts = torch.cumsum(need, 0) - need
        table = starts.unsqueeze(1) + torch.arange(width).unsqueeze(0)
        self.block_table = torch.where(torch.arange(width).unsqueeze(0) < need.unsqueeze(1), table, 0)
        self.lengths, self.left_padding = lengths.clone(), pad.clone()
        self.num_blocks = int(need.sum())
        self._step = None

    # ---- one step ---------------------------------------------------------------------------------------------
    def _begin_step(self, batch: int, q_len: int, attention_mask: torch.Tensor | None,
                    position_ids: torch.Tensor | None) -> _Step:
        """Account the step's columns, allocate its pages and build what every layer's write and read share."""
        if self.lengths is None:
            self.lengths = torch.zeros(batch, dtype=torch.int64)
            self.left_padding = torch.zeros(batch, dtype=torch.int64)
            self.block_table = torch.zeros(batch, 1, dtype=torch.int64)
        if batch != self.lengths.numel():
            raise ValueError(f"a step of {batch} rows on a cache of {self.lengths.numel()} rows")
        valid = _new_columns(attention_mask, batch, q_len)  # bool [B, q_len] (CPU)
        n_pad = q_len - valid.sum(1)
        cols = torch.arange(q_len)
        if not torch.equal(valid, cols.unsqueeze(0) >= n_pad.unsqueeze(1)):
            raise ValueError("attention_mask: RotateKVCache takes left padding only (a row's padding before its first "
                             "token); tokenize with padding_side='left'")
        if bool(((n_pad > 0) & (self.lengths > 0)).any()):
            raise ValueError("attention_mask: padding after a row's first token (RotateKVCache takes left padding "
                             "only)")
        before = self.lengths
        pos = before.unsqueeze(1) + cols.unsqueeze(0) - n_pad.unsqueeze(1)  # position of each stored token
        if position_ids is not None:
            given = position_ids.to("cpu", torch.int64).expand(batch, q_len)
            if not torch.equal(given[valid], pos[valid]):
                raise ValueError(
                    "position_ids: RotateKVCache re-applies RoPE at each token's index among its row's stored "
                    "(non-padding) tokens; pass position_ids = attention_mask.cumsum(-1) - 1 (what generate does)")
        lengths = before + (q_len - n_pad)
        self._ensure_blocks(lengths)
        self.lengths = lengths
        self.left_padding = self.left_padding + n_pad
        self.seen += q_len
        if self.seen > self.runtime.rope(0)[0].shape[0]:
            self._grow_rope(self.seen)

        flat_valid = valid.reshape(-1)
        tok = None if bool(flat_valid.all()) else flat_valid.nonzero().squeeze(1)
        rows = torch.arange(batch).unsqueeze(1).expand(batch, q_len).reshape(-1)
        p = pos.reshape(-1)
        if tok is not None:
            rows, p = rows[tok], p[tok]
        bs = self.block_size
        slots = self.block_table[rows, p // bs] * bs + p % bs
        q_real = q_len - n_pad
        qsl = torch.zeros(batch + 1, dtype=torch.int64)
        qsl[1:] = torch.cumsum(q_real, 0)
        dev = self.device
        step = _Step(q_len=q_len, batch=batch, num_tokens=int(p.numel()), tok=None if tok is None else tok.to(dev),
                     slot_mapping=slots.to(dev), positions=p.to(dev), query_start_loc=qsl.to(dev),
                     seq_lens=lengths.to(dev), block_table=self.block_table.to(dev), query_start_loc_cpu=qsl,
                     seq_lens_cpu=lengths.clone())
        if self.attention_impl == "torch":
            step.tiles = {}
        elif self.attention_impl == "triton":
            step.plans = {}
        return step

    def _tiles(self, step: _Step, sliding_window: int) -> list[AttentionTile]:
        """The step's ``"torch"`` tiles for layers with ``sliding_window`` (0: none), planned once per window."""
        if sliding_window not in step.tiles:
            step.tiles[sliding_window] = step_tiles(step.query_start_loc_cpu, step.seq_lens_cpu, self.block_table,
                                                    self.block_size, sliding_window=sliding_window)
        return step.tiles[sliding_window]

    def _ensure_blocks(self, lengths: torch.Tensor) -> None:
        """Give every row the pages its new length needs (the layers' pools grow when they next write)."""
        bs = self.block_size
        need = (lengths + bs - 1) // bs
        have = (self.lengths + bs - 1) // bs
        width = max(int(need.max()), self.block_table.shape[1])
        if width > self.block_table.shape[1]:
            pad = torch.zeros(self.block_table.shape[0], width - self.block_table.shape[1], dtype=torch.int64)
            self.block_table = torch.cat([self.block_table, pad], dim=1)
        for r in (need > have).nonzero().squeeze(1).tolist():
            n_new = int(need[r] - have[r])
            self.block_table[r, int(have[r]): int(need[r])] = torch.arange(self.num_blocks, self.num_blocks + n_new)
            self.num_blocks += n_new

    def _recent_prev(self, pages: PagedCache, step: _Step, before: torch.Tensor | None = None
                     ) -> torch.Tensor | None:
        """``[B, R - 1, 2, H, D]``: the full-precision K/V of the ``R - 1`` positions before each row's step, read
        from the rings (``rotkv_paged.recent_prev_ref``, or ``rotkv_paged_cpu.recent_prev_cpu`` on the ``"cpu"``
        path, as the vLLM backend's ``_recent_prev``); None without ring slots."""
        if self.runtime.ring_slots == 0:
            return None
        read = recent_prev_ref
        if self.attention_impl == "cpu":
            from rotkv_kernels.rotkv_paged_cpu import recent_prev_cpu as read
        return read(pages.sinks, step.block_table, step.seq_lens, step.query_start_loc,
                    spec=self.runtime.paged_spec(0), block_size=self.block_size, before=before)

    def _grow_rope(self, needed: int) -> None:
        """Rebuild the runtime with RoPE tables covering ``needed`` positions (doubling)."""
        n = self.runtime.rope(0)[0].shape[0]
        while n < needed:
            n *= 2
        ropes = _layer_rope_tables(self.model_config, self._rotary, n, self.device)
        self.runtime = dataclasses.replace(self.runtime, layer_ropes=ropes)

    def _attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float, position_ids: torch.Tensor | None
                ) -> torch.Tensor:
        """Write layer ``layer_idx``'s step K/V into its pages, then attend. ``query [B, Hq, T, D]``,
        ``key/value [B, H, T, D]`` (post-RoPE); returns ``[B, T, Hq, D]`` (zeros at padding columns)."""
        b, hq, t, d = query.shape
        if layer_idx == 0:
            self._step = self._begin_step(b, t, attention_mask, position_ids)
        step = self._step
        if step is None or step.next_layer != layer_idx or step.q_len != t or step.batch != b:
            raise RuntimeError(f"layer {layer_idx} attends out of order (the step began at layer 0 with "
                               f"{None if step is None else (step.batch, step.q_len)} rows x columns)")
        step.next_layer += 1
        if step.next_layer == len(self.layers):
            self._step = None  # per-step scratch: nothing of it is kept between steps
        layer = self.layers[layer_idx]
        pages = layer.pages
        if pages is None or pages.records.shape[0] < self.num_blocks:
            # Exactly the pages handed out: a pool is reallocated (one copy) when a row crosses into a new page,
            # every block_size steps of decoding, and holds no spare pages.
            pages = layer.ensure_pages(self, self.num_blocks)
        p = self.runtime.kernel_params(layer_idx, self.device)
        h = key.shape[1]

        def flat(x, heads):
            x = x.transpose(1, 2).reshape(b * t, heads, d)
            return x if step.tok is None else x.index_select(0, step.tok)

        k, v = flat(key, h), flat(value, h)
        q = flat(query, hq).contiguous()
        common = dict(rope_cos=p.rope_cos, rope_sin=p.rope_sin, key_perm=p.key_perm, key_mean=p.key_mean)
        out = torch.zeros(step.num_tokens, hq, d, dtype=query.dtype, device=query.device)
        if step.num_tokens:
            impl = self.attention_impl
            if impl == "cpu":
                from rotkv_kernels.rotkv_paged_cpu import paged_attention_cpu, paged_write_cpu as write
            elif impl == "triton":
                from rotkv_kernels.rotkv_paged_triton import (
                    paged_attention_triton,
                    plan_paged_attention,
                )
                from rotkv_kernels.rotkv_paged_triton import paged_write_triton as write
            else:
                write = paged_write_ref
            # The recent window (as the vLLM backend's forward): the R - 1 positions before each row's step come
            # from the rings, read before the write (the step's own ring writes may replace those in the block it
            # continues) and after it; the step's own positions come from its K/V as given.
            before = self._recent_prev(pages, step)
            write(k, v, step.slot_mapping, pages.records, spec=p.spec, positions=step.positions, sinks=pages.sinks,
                  **common)
            wkw = {}
            if self.runtime.recent_window:
                wkw = dict(recent_key=k, recent_value=v, recent_prev=self._recent_prev(pages, step, before))
            if impl == "cpu":
                paged_attention_cpu(q, pages.records, step.block_table, step.seq_lens, step.query_start_loc,
                                    spec=p.spec, scale=scaling, sinks=pages.sinks, out=out, **common, **wkw)
            elif impl == "triton":
                key_ = (hq, p.spec.num_kv_heads, p.spec.key_rot_width, p.spec.sink_tokens, p.spec.sliding_window)
                if key_ not in step.plans:
                    step.plans[key_] = plan_paged_attention(step.query_start_loc_cpu, step.seq_lens_cpu, spec=p.spec,
                                                            num_query_heads=hq, device=query.device)
                paged_attention_triton(q, pages.records, step.block_table, step.seq_lens, step.query_start_loc,
                                       spec=p.spec, scale=scaling, sinks=pages.sinks, out_dtype=query.dtype, out=out,
                                       plan=step.plans[key_], inv_perm=p.inv_perm, precision=self.triton_precision,
                                       **common, **wkw)
            else:
                recent = None
                if wkw:
                    recent = recent_window_kv(k, v, wkw["recent_prev"], step.query_start_loc, step.seq_lens,
                                              step.num_tokens, self.runtime.recent_window)
                attend_tiles(q, pages.records, pages.sinks, self._tiles(step, p.spec.sliding_window),
                             self.runtime.cpu_tables(layer_idx), scale=scaling, output=out, recent=recent)
        if step.tok is None:
            return out.view(b, t, hq, d)
        full = torch.zeros(b * t, hq, d, dtype=query.dtype, device=query.device)
        full.index_copy_(0, step.tok, out)
        return full.view(b, t, hq, d)


# ---- the attention function -----------------------------------------------------------------------------------


def rotkv_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function ``"rotkv"``: store the step's K/V in the :class:`RotateKVCache` that just
    received them (:meth:`RotateKVCache.update`) and attend over its pages.

    Args:
        query: ``[B, Hq, T, D]`` post-RoPE; key / value: ``[B, H, T, D]`` as returned by ``update``.
        attention_mask: the 2-D padding mask ``[B, >= T]`` (bool), or None (no padding).
        scaling: softmax scale (``D ** -0.5`` by default).
    Returns:
        ``([B, T, Hq, D], None)``.
    Raises:
        ValueError: the model ran without a RotateKVCache, with dropout, or with a mask this cache cannot take.
    """
    pending = getattr(_PENDING, "value", None)
    if pending is None or pending[2] is not key:
        raise ValueError(f"attn_implementation={ATTENTION_NAME!r} attends over a RotateKVCache: pass "
                         "past_key_values=cache (from rotkv_cache(...)) and use_cache=True")
    _PENDING.value = None
    cache, layer_idx = pending[0], pending[1]
    if dropout:
        raise ValueError(f"dropout={dropout}: RotateKV attention is for inference (model.eval())")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected the 2-D padding mask of the {ATTENTION_NAME!r} mask function, "
                         f"got {tuple(attention_mask.shape)}")
    sw = int(kwargs.get("sliding_window") or 0)
    if sw != cache.runtime.sliding_window(layer_idx):
        raise ValueError(f"layer {layer_idx}: the model attends over a sliding window of {sw or 'none'}, the cache's "
                         f"runtime (rotkv_vllm.model_support.layer_attention) has "
                         f"{cache.runtime.sliding_window(layer_idx) or 'none'}")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    out = cache._attend(layer_idx, query, key, value, attention_mask, scale, kwargs.get("position_ids"))
    return out, None


def _padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """Mask function of ``"rotkv"``: the 2-D padding mask ``[B, kv_length]`` (bool), or None without padding
    (the attention is causal over each row's stored tokens by construction)."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    return None if bool(attention_mask.all()) else attention_mask


def register_rotkv_attention() -> None:
    """Register ``"rotkv"`` with ``transformers.AttentionInterface`` and ``AttentionMaskInterface`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, rotkv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _padding_mask)


@contextlib.contextmanager
def rotkv_cache(model, calibration: RotateKVCalibration | None = None, config: RotateKVConfig | None = None, *,
                kv_cache_dtype: str | None = None, block_size: int = DEFAULT_BLOCK_SIZE, attention_impl: str = "auto",
                runtime: RotateKVRuntime | None = None) -> Iterator[RotateKVCache]:
    """Yield a fresh :class:`RotateKVCache` for ``model`` and run the model's attention as ``"rotkv"`` until the
    block ends (the previous attention implementation is restored after).

    Without ``config``/``kv_cache_dtype`` the cache stores what ``vllm serve --kv-cache-dtype rotkv{bits}`` stores
    with this calibration (:func:`resolve_config`): the preset's bits and its recent window of 4 full-precision
    tokens, in pages of 256 tokens.

    Args: as :class:`RotateKVCache`.
    Raises:
        ValueError: an unsupported model, a calibration for another model, reordering without one, a setting
            the paged layout does not store (``sink_mode="topk"``), a block size below the window's ring.
    """
    cache = RotateKVCache(model, calibration, config, kv_cache_dtype=kv_cache_dtype, block_size=block_size,
                          attention_impl=attention_impl, runtime=runtime)
    register_rotkv_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield cache
    finally:
        _PENDING.value = None
        model.set_attn_implementation(previous)


# ---- helpers ----------------------------------------------------------------------------------------------------


def resolve_config(calibration: RotateKVCalibration | None, config: RotateKVConfig | None = None,
                   kv_cache_dtype: str | None = None) -> RotateKVConfig:
    """The config a :class:`RotateKVCache` stores with.

    - ``config`` given: that config (with the calibration's head grouping), its ``recent_window`` as written;
    - ``kv_cache_dtype`` given: what vLLM's ``--kv-cache-dtype kv_cache_dtype`` stores with this calibration
      (:func:`rotkv_vllm.runtime.effective_config`: the preset's bits and recent window, R = 4);
    - neither: ``kv_cache_dtype`` is the preset whose (key, value) bits are the calibration's (``rotkv2`` for a
      2-bit calibration), so the default cache is the vLLM default, recent window included;
    - no calibration: ``config_for_cache_dtype(kv_cache_dtype or "rotkv2")`` (which needs a calibration unless
      it turns reordering and centring off).

    Raises:
        ValueError: both ``config`` and ``kv_cache_dtype``; an unknown preset; a calibration whose bits match no
            preset (pass ``config=`` then).
    """
    if config is not None and kv_cache_dtype is not None:
        raise ValueError(f"config and kv_cache_dtype={kv_cache_dtype!r}: pass one (the preset is a config)")
    if config is not None:
        if calibration is not None:
            config = dataclasses.replace(config, head_group_size=calibration.head_group_size)
        return config
    if calibration is None:
        return config_for_cache_dtype(kv_cache_dtype or "rotkv2")
    if kv_cache_dtype is None:
        cfg = calibration.config
        bits = (cfg.key_bits, cfg.value_bits)
        names = [n for n, p in KV_CACHE_DTYPES.items() if (p.key_bits, p.value_bits) == bits]
        if not names:
            raise ValueError(f"the calibration stores K{cfg.key_bits}/V{cfg.value_bits}, which no --kv-cache-dtype "
                             f"preset does ({sorted(KV_CACHE_DTYPES)}): pass kv_cache_dtype=NAME, or "
                             "config=calibration.config to store exactly its config")
        kv_cache_dtype = names[0]
    return effective_config(calibration, kv_cache_dtype)


def _check_storable(config: RotateKVConfig) -> None:
    """The settings the paged layout (the vLLM backend's) stores; the others are refused with the reason."""
    why = servable_reason(config)
    if why is None:
        return
    if config.sink_mode == "topk":
        raise ValueError("sink_mode='topk': the RotateKV cache stores the vLLM backend's pages, whose sinks are the "
                         "first max_sink_tokens positions; use a calibration with sink_mode='first' (the reference "
                         "harness, rotkv_vllm.reference.quantized_kv, evaluates topk sinks)")
    raise ValueError(f"this RotateKV config is not stored by the paged layout: {why}")


def _select_impl(choice: str, device: torch.device, runtime: RotateKVRuntime) -> str:
    if choice not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={choice!r}: expected one of {ATTENTION_IMPLS}")
    from rotkv_kernels.rotkv_paged_cpu import check_cpu_limits, cpu_kernels_status

    if choice == "auto":
        if device.type == "cuda":
            choice = "triton"
        else:
            try:
                check_cpu_limits(runtime.paged_spec(0))
                ok = cpu_kernels_status() is None
            except ValueError:
                ok = False
            choice = "cpu" if ok else "torch"
    if choice == "cpu":
        if device.type != "cpu":
            raise ValueError(f"attention_impl='cpu': the C++ kernels take CPU tensors, the model is on {device}")
        why = cpu_kernels_status()
        if why is not None:
            raise ValueError(f"attention_impl='cpu': {why}")
        for i in range(runtime.num_layers):
            check_cpu_limits(runtime.paged_spec(i))
    elif choice == "torch":
        if device.type != "cpu":
            raise ValueError(f"attention_impl='torch': the tiled PyTorch path serves CPU caches only, not {device}")
    else:
        from rotkv_vllm.runtime import check_attention_impl

        check_attention_impl("triton", device)
    return choice


def _new_columns(attention_mask: torch.Tensor | None, batch: int, q_len: int) -> torch.Tensor:
    """``bool [B, q_len]``: which of the step's columns are tokens (not padding), on the CPU."""
    if attention_mask is None:
        return torch.ones(batch, q_len, dtype=torch.bool)
    m = attention_mask[:, -q_len:].to("cpu", torch.bool)
    if m.shape != (batch, q_len):
        raise ValueError(f"attention_mask: expected [{batch}, >= {q_len}], got {tuple(attention_mask.shape)}")
    return m


def _rotary_module(model):
    inner = getattr(model, "model", model)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"{type(model).__name__} has no model.rotary_emb: RotateKV re-applies the model's RoPE")
    return rotary


@torch.no_grad()
def _rope_tables(rotary, n: int, device, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own Hugging Face-convention RoPE tables, ``fp32 [n, D]`` (its attention scaling folded in), of
    ``layer_type`` for a rotary embedding that keeps one table per layer type (Gemma 3)."""
    x = torch.zeros(1, 1, dtype=torch.float32, device=device)
    pos = torch.arange(n, device=device).unsqueeze(0)
    if layer_type is not None:
        cos, sin = rotary(x, pos, layer_type=layer_type)
    else:
        cos, sin = rotary(x, pos)
    return cos[0].to(torch.float32).contiguous(), sin[0].to(torch.float32).contiguous()


def _layer_rope_tables(model_or_config, rotary, n: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, its RoPE tables on the CPU (``fp32 [n, D]`` each): one table shared by every layer, or
    with a rotary embedding that takes a ``layer_type`` (Gemma 3: local layers with their own base) the table of
    each layer's type (``config.layer_types``), shared by the layers of that type. The same tables the
    transformers model applies (``model_support.layer_attention`` describes the same parameters for vLLM)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_layers = int(cfg.num_hidden_layers)
    if "layer_type" not in inspect.signature(rotary.forward).parameters:
        cos, sin = _rope_tables(rotary, n, device)
        return [(cos.cpu(), sin.cpu())] * n_layers
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers)
    tables = {}
    for t in dict.fromkeys(types):
        cos, sin = _rope_tables(rotary, n, device, layer_type=t)
        tables[t] = (cos.cpu(), sin.cpu())
    return [tables[t] for t in types]
