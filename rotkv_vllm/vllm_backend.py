"""RotateKV attention backend for vLLM 0.32: a packed uint8 paged KV cache, served by the fused C++ kernels of
``rotkv_kernels.rotkv_paged_cpu`` on the CPU (the PyTorch path where they are not built) and by the fused Triton
kernels of ``rotkv_kernels.rotkv_paged_triton`` on CUDA (same four classes).

Cache layout. Every layer's cache is one page per block of ``block_size`` tokens, declared to vLLM's
planner through :meth:`RotateKVAttentionBackend.customize_spec` (one head slot, ``C`` bytes per token),
so ``num_blocks`` is computed from the packed size and the engine reports the real capacity::

    page = [ block_size token records of C bytes | S sink tokens, then R - 1 ring slots: (K, V) in the model dtype ]
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
attention backend never sees, and is refused at start-up.

Recent window (``R``, part of every ``--kv-cache-dtype`` preset): each query reads the keys of its last ``R``
positions, itself included, in full precision, as the transformers reference does. The step's own tokens
come from the K/V the layer was given; the ``R - 1`` positions before the step from per-page rings: the token
at in-block offset ``o`` also stores its K/V in ring slot ``o % (R - 1)`` of its page, so the last ``R - 1``
positions of any sequence are in the rings of its last one or two blocks, and a full page's ring holds its own
last ``R - 1`` tokens (prefix-shared pages stay consistent; preemption recomputes them like the records).
Every token is stored packed as well: a token leaving the window reads its record. The rings are counted in
the page size, so vLLM's capacity report stays true (``R = 2`` costs one model-dtype token per page).

Sliding-window layers (Gemma 3's local layers, Mistral's ``sliding_window``): vLLM puts them in their own KV-cache
group (``SlidingWindowSpec``, customized here like any other spec, so both groups' pages have the same size) and
frees the blocks that left every future window to its null block. Each layer's
:class:`~rotkv_kernels.rotkv_paged.PagedCacheSpec` carries its window (``RotateKVRuntime.sliding_windows``, from
:func:`rotkv_vllm.model_support.layer_attention`, checked against the window vLLM gives the layer); every
implementation attends over ``t - SW < j <= t`` and starts reading at the first query's window, so no null block
is read. Sinks leave the window like any other position; the recent window (``R <= SW``) lies inside it. Each layer
undoes and re-applies RoPE with its own tables (Gemma 3's local base, or its global base and scaling).

Every other attention read goes through the packed cache, including the tokens written in the same step, so
prefill, chunked prefill and decode all attend over exactly what the cache holds (as the transformers
reference in :mod:`rotkv_vllm.reference` does).

Three implementations read and write the same bytes (``runtime.select_attention_impl`` picks one per
engine); the maths of all lives in ``rotkv_kernels``, this module only plans the step and calls it:

- ``"cpp"`` (the CPU default when ``scripts/setup.sh`` built the extension): ``store`` is ``paged_write_cpu``
  and ``attend`` is ``paged_attention_cpu``, one OpenMP op each per layer over vLLM's block table, sequence
  lengths and query starts (made int64 on the host once per step by the builder); with the recent window two
  ``recent_prev_cpu`` reads of the rings around the write. ``forward`` calls them through the layer's
  ``CpuLayerKernels`` (its constants checked once, not per step: the per-call Python checks cost more than a
  short decode's attention).
- ``"torch"`` (the readable reference path; the CPU fallback, announced by one warning at start-up, when the
  extension is not built): the builder plans tiles (``rotkv_paged_tiles.step_tiles``); ``store`` is
  ``rotkv_paged.paged_write_ref`` and ``attend`` is ``rotkv_paged_tiles.attend_tiles`` (one gather, one
  dequantization and one SDPA call per tile). CPU caches only.
- ``"triton"`` (the CUDA default): ``store`` is one ``paged_write_triton`` launch (inverse RoPE, key mean,
  Hadamard, permutation, quantization, packing and the scatter by slot mapping, sinks included) and
  ``attend`` is ``paged_attention_triton`` (split-K paged attention over the packed cache plus its reduce
  pass) over vLLM's own block table, ``seq_lens`` and ``query_start_loc``. Per-layer parameters (the
  :class:`rotkv_kernels.rotkv_paged.PagedCacheSpec`, key permutation and its inverse, key mean, RoPE
  tables) are moved to the device once (``RotateKVRuntime.kernel_params``); the kernels' work list is
  planned once per step and shared by all layers. On the CPU it runs only under ``TRITON_INTERPRET=1``
  (tests).

``ROTKV_ATTENTION_IMPL`` (``auto``, ``cpp``, ``torch`` or ``triton``) overrides the choice; an impossible
choice raises ``ValueError`` (``cpp`` without the built extension included: no silent fallback). ``ROTKV_TRITON_PRECISION`` (``fp16``, the default, or ``fp32``)
sets the fused attention's product precision (see ``rotkv_kernels.rotkv_paged_triton``).

Calibration: the backend loads ``rotkv_config.json`` + ``rotkv.safetensors`` from the model folder (or
its Hugging Face cache snapshot). Without them it refuses to start and names the calibration command:
an uncalibrated cache would silently lose the channel reordering the accuracy depends on. A calibration made
for other weights of the same shapes is refused too (:mod:`rotkv_vllm.fingerprint`). What the calibration
resolves to on this rank is :class:`rotkv_vllm.runtime.RotateKVRuntime` (no vLLM import there).

The module holds vLLM's four classes in vLLM's own order (metadata, its builder, the backend, the
implementation) and :func:`resolve_runtime`, which reads the engine's config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
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
from rotkv_kernels.rotkv_layout import check_block_size
from rotkv_kernels.rotkv_paged import (
    PagedCacheSpec,
    paged_cache_views,
    paged_write_ref,
    recent_prev_ref,
    recent_window_kv,
    token_positions,
)
from rotkv_kernels.rotkv_paged_cpu import CpuLayerKernels, paged_attention_cpu, paged_write_cpu, recent_prev_cpu
from rotkv_kernels.rotkv_paged_tiles import AttentionTile, attend_tiles, step_tiles
from rotkv_kernels.rotkv_paged_triton import (
    check_attention_limits,
    paged_attention_triton,
    paged_write_triton,
    plan_paged_attention,
)
from rotkv_vllm.config import DEFAULT_BLOCK_SIZE, KV_CACHE_DTYPES
from rotkv_vllm.model_support import layer_attention
from rotkv_vllm.runtime import (
    ATTENTION_IMPL_ENV,
    TRITON_PRECISION_ENV,  # noqa: F401  (re-exported: the backend's environment variables)
    RotateKVRuntime,
    check_attention_impl,
    check_served_model,
    current_runtime,
    find_served_calibration,
    install_runtime,
    installed_runtime,
    rope_tables,
    select_attention_impl,
    triton_precision,
)

__all__ = [
    "resolve_runtime",
    "RotateKVAttentionMetadata",
    "RotateKVAttentionMetadataBuilder",
    "RotateKVAttentionBackend",
    "RotateKVAttentionImpl",
]

# Under vLLM's "vllm" logger, so these lines appear in `vllm serve` output with vLLM's own.
logger = logging.getLogger(f"vllm.{__name__}")


def resolve_runtime(vllm_config, kv_cache_dtype: str) -> RotateKVRuntime:
    """Build (or reuse) the runtime for the model in ``vllm_config`` on this process's TP rank.

    Raises:
        ValueError: unsupported model, missing calibration, or a calibration for another model (its shapes or
            its weights: :func:`rotkv_vllm.runtime.find_served_calibration`).
    """
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.rotary_embedding import get_rope

    mc = vllm_config.model_config
    try:
        tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    except AssertionError:  # no distributed state (unit tests): a single rank
        tp_size, tp_rank = 1, 0
    key = (str(mc.model), str(mc.revision), kv_cache_dtype, tp_rank, tp_size, str(mc.dtype))
    installed = installed_runtime()
    if installed is not None and installed.key == key:
        return installed
    hf = mc.hf_text_config
    check_served_model(hf, kv_cache_dtype)
    window = KV_CACHE_DTYPES[kv_cache_dtype].recent_window
    if window and getattr(vllm_config, "speculative_config", None) is not None:
        # A draft token writes its K/V into ring slot (position % (R - 1)) of its page before it is verified;
        # a rejected draft at position p overwrites the slot of accepted position p - (R - 1), which the next
        # step reads as full-precision K/V.
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} keeps the last {window} tokens in per-page ring slots "
                         "that rejected speculative tokens would overwrite: speculative decoding is not supported "
                         "with RotateKV's recent window (serve without --speculative-config)")
    calib = find_served_calibration(str(mc.model), mc.revision, hf, kv_cache_dtype)
    head_dim = calib.model_info["head_dim"]
    # Each layer's RoPE parameters and sliding window, as model_support describes the family (Gemma 3: local
    # layers slide and have their own base); layers with the same parameters share one table.
    layers = [layer_attention(hf, i) for i in range(int(calib.model_info["num_hidden_layers"]))]
    rope = None
    if calib.config.pre_rope:
        max_pos = mc.max_model_len if not hasattr(hf, "max_position_embeddings") \
            else max(hf.max_position_embeddings, mc.max_model_len)
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        rope = []
        for a in layers:
            k = json.dumps(a.rope_parameters, sort_keys=True, default=str)
            if k not in tables:
                tables[k] = rope_tables(get_rope(head_dim, max_position=max_pos, rope_parameters=a.rope_parameters,
                                                 is_neox_style=True, dtype=torch.float32))
            rope.append(tables[k])
    windows = [a.sliding_window or 0 for a in layers]
    rt = RotateKVRuntime.from_calibration(calib, kv_cache_dtype, dtype=mc.dtype, rope=rope,
                                          tp_rank=tp_rank, tp_size=tp_size, key=key,
                                          sliding_windows=windows if any(windows) else None)
    logger.info(
        "rotkv: %s on rank %d/%d: %d KV heads x %d, head groups of %d, quantization group %d, K%d/V%d, "
        "%d sink tokens, %d bytes per token record (bf16 would be %d); sliding windows by layer %s",
        kv_cache_dtype, tp_rank, tp_size, rt.layout.num_kv_heads, head_dim, rt.layout.head_group_size,
        rt.layout.group_size, rt.config.key_bits, rt.config.value_bits, rt.sink_tokens, rt.record_bytes,
        4 * rt.layout.kv_width, windows if any(windows) else "none",
    )
    install_runtime(rt)
    return rt


# ================================================================================================
# Metadata
# ================================================================================================
@dataclass
class RotateKVAttentionMetadata:
    """Per-step metadata shared by all layers.

    The first eight fields serve both implementations and live where the cache lives (int64 on the CPU
    for ``"torch"``; vLLM's own device tensors, int32 usually, for ``"triton"``).

    Attributes:
        query_start_loc: ``int [R + 1]``; seq_lens: ``int [R]`` (new tokens included); block_table:
            ``int [R, max_blocks]``; slot_mapping: ``int [T]`` (``-1``: no slot).
        positions: ``int64 [T]`` position of each query token in its sequence (0 for padding tokens).
        attention_impl: ``"cpp"``, ``"torch"`` or ``"triton"`` (:func:`select_attention_impl` for the builder's
            device).
        query_start_loc_cpu / seq_lens_cpu: host copies (``"triton"``: for planning the kernels' work; the
            sequence lengths may be vLLM's upper bound, which only enlarges the planned context splits).
        tiles: the attention work of the step (``rotkv_paged_tiles.AttentionTile``; ``"torch"`` only).
    """

    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    positions: torch.Tensor
    tiles: list[AttentionTile] = field(default_factory=list)
    attention_impl: str = "torch"
    query_start_loc_cpu: torch.Tensor | None = None
    seq_lens_cpu: torch.Tensor | None = None
    _plans: dict = field(default_factory=dict, repr=False)

    def paged_plan(self, spec: PagedCacheSpec, num_query_heads: int):
        """The fused attention's work list for this step (``rotkv_paged_triton.plan_paged_attention``), built
        by the first layer that asks and shared by the others (it depends on the step's lengths and on the
        spec's head grouping, sink count and sliding window only, which all layers of a KV-cache group share)."""
        key = (num_query_heads, spec.num_kv_heads, spec.key_rot_width, spec.sink_tokens, spec.sliding_window)
        if key not in self._plans:
            self._plans[key] = plan_paged_attention(self.query_start_loc_cpu, self.seq_lens_cpu, spec=spec,
                                                    num_query_heads=num_query_heads,
                                                    device=self.query_start_loc.device)
        return self._plans[key]


# ================================================================================================
# Metadata builder
# ================================================================================================
class RotateKVAttentionMetadataBuilder(AttentionMetadataBuilder[RotateKVAttentionMetadata]):
    """Builds :class:`RotateKVAttentionMetadata` once per step and KV-cache group (CPU index arithmetic, no
    kernels). A sliding-window group (vLLM's ``SlidingWindowSpec``: its own block tables, whose blocks before the
    window are the null block) plans its tiles for that window; its layers' specs must carry the same window."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config, device: torch.device,
                 runtime: RotateKVRuntime | None = None) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.runtime = runtime if runtime is not None else current_runtime()
        self.block_size = kv_cache_spec.block_size
        self.attention_impl = select_attention_impl(device, self.runtime.paged_specs())
        logger.info("rotkv: attention implementation %s on %s", self.attention_impl, device)
        try:
            check_block_size(self.runtime.paged_spec(0), self.block_size)
        except ValueError as e:
            raise ValueError(f"--block-size {self.block_size}: {e}; use a larger --block-size") from None
        self.sliding_window = int(getattr(kv_cache_spec, "sliding_window", 0) or 0)
        from vllm.model_executor.models.utils import extract_layer_index

        windowed = self.sliding_window or self.runtime.sliding_windows is not None
        for name in layer_names if windowed else []:
            mine = self.runtime.sliding_window(extract_layer_index(name))
            if mine != self.sliding_window:
                raise ValueError(f"layer {name}: vLLM gives its KV-cache group a sliding window of "
                                 f"{self.sliding_window or 'none'}, the model's description "
                                 f"(rotkv_vllm.model_support.layer_attention) says {mine or 'none'}")

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> RotateKVAttentionMetadata:
        cm = common_attn_metadata
        if isinstance(cm.causal, torch.Tensor) or not cm.causal:
            raise NotImplementedError("RotateKV attention is causal decoder attention only")
        r, t = cm.num_reqs, cm.num_actual_tokens
        if self.attention_impl == "triton":
            return self._build_fused(cm)
        qsl = cm.query_start_loc_cpu[: r + 1].to(torch.int64)
        seq = cm.seq_lens[:r].to("cpu", torch.int64)
        table = cm.block_table_tensor[:r].to("cpu", torch.int64)
        tiles = [] if self.attention_impl == "cpp" else step_tiles(qsl, seq, table, self.block_size,
                                                                    sliding_window=self.sliding_window)
        slots = cm.slot_mapping[:t].to("cpu", torch.int64)
        return RotateKVAttentionMetadata(
            num_actual_tokens=t, max_query_len=cm.max_query_len, max_seq_len=cm.max_seq_len,
            query_start_loc=qsl, seq_lens=seq, block_table=table, slot_mapping=slots,
            positions=token_positions(qsl, seq, t),  # t may include padding tokens (position 0, slot -1)
            tiles=tiles, attention_impl=self.attention_impl,
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


# ================================================================================================
# Backend
# ================================================================================================
_WRITERS = {"cpp": paged_write_cpu, "torch": paged_write_ref, "triton": paged_write_triton}


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
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        """:data:`rotkv_vllm.config.DEFAULT_BLOCK_SIZE` tokens per page (the recent window's ring is per page;
        the CPU platform gets the same default from ``vllm_plugin``)."""
        return DEFAULT_BLOCK_SIZE

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size > 0 and head_size % 8 == 0 and has_hadamard(head_size)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        """Sliding-window layers: every implementation attends over ``t - SW < j <= t`` and never reads the blocks
        vLLM has freed before the window (``PagedCacheSpec.sliding_window``)."""
        return True

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # One head slot per token: head-major and token-major interiors coincide.
        return (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """One ``C``-byte record per token (one head slot), plus each block's sink area as page padding. A
        ``SlidingWindowSpec`` keeps its type and window (``dataclasses.replace``); every layer shares ``C`` and the
        sink area, so full-attention and sliding-window groups have the same page size."""
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


# ================================================================================================
# Implementation
# ================================================================================================
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
        self.sliding_window = int(sliding_window or 0)
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
        self._cpu_ops: CpuLayerKernels | None = None
        self._views: tuple[int, torch.Tensor, torch.Tensor | None] | None = None
        self.triton_precision = triton_precision()
        self._impl_checked: tuple[str, str] | None = None

    # ---- cache views ----------------------------------------------------------------------------
    def _cache_views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``records uint8 [num_blocks, block_size, C]`` and ``sinks [num_blocks, S, 2, H, D]`` (model dtype) of
        vLLM's ``uint8 [num_blocks, 1, block_size, C]`` cache (``rotkv_paged.paged_cache_views``; kept while vLLM
        hands the same tensor)."""
        if self._views is not None and self._views[0] == kv_cache.data_ptr():
            return self._views[1], self._views[2]
        # Every layer shares the slot size and sink count, so layer 0's spec describes any layer's pages.
        records, sinks = paged_cache_views(kv_cache, self.runtime.paged_spec(0), self.runtime.dtype)
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
            mine = self.runtime.paged_spec(layer_idx).sliding_window
            if mine != self.sliding_window:
                raise ValueError(f"layer {layer_idx}: vLLM attends over a sliding window of {self.sliding_window or 'none'}, "
                                 f"the model's description (rotkv_vllm.model_support.layer_attention) says "
                                 f"{mine or 'none'}")
            check_attention_impl(md.attention_impl, kv_cache.device, [self.runtime.paged_spec(layer_idx)])
            if md.attention_impl == "triton":
                self._check_fused_limits(self.runtime.paged_spec(layer_idx))
            self._impl_checked = key

    def _check_fused_limits(self, spec: PagedCacheSpec) -> None:
        try:
            check_attention_limits(spec)
        except ValueError as e:
            raise ValueError(f"the fused RotateKV kernels cannot serve this model's layout ({e}); the PyTorch path "
                             f"serves CPU caches only ({ATTENTION_IMPL_ENV})") from e

    # ---- store and attend ------------------------------------------------------------------------
    def store(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
              md: RotateKVAttentionMetadata) -> None:
        """Write the step's K/V (``[T, H, D]``, K post-RoPE, ``T = md.num_actual_tokens``) into the packed cache:
        one fused ``paged_write_triton`` launch (``"triton"``), the C++ ``paged_write_cpu`` (``"cpp"``), or their
        reference ``paged_write_ref`` (the same bytes; slot mapping ``-1`` skips padding tokens)."""
        p = self.runtime.kernel_params(layer_idx, kv_cache.device)
        records, sinks = self._cache_views(kv_cache)
        write = _WRITERS[md.attention_impl]
        write(key, value, md.slot_mapping, records, spec=p.spec, positions=md.positions, sinks=sinks,
              rope_cos=p.rope_cos, rope_sin=p.rope_sin, key_perm=p.key_perm, key_mean=p.key_mean)

    def attend(self, layer_idx: int, query: torch.Tensor, kv_cache: torch.Tensor, md: RotateKVAttentionMetadata,
               output: torch.Tensor, window: tuple | None = None) -> None:
        """``output[t] = softmax(q_t K^T * scale) V`` over each query's causal context (``query [T, Hq, D]``,
        ``output [>= T, Hq, D]`` written in rows ``< query_start_loc[R]`` only): the fused split-K
        ``paged_attention_triton`` (``"triton"``), the C++ ``paged_attention_cpu`` (``"cpp"``), or
        ``rotkv_paged_tiles.attend_tiles`` over the step's tiles (``"torch"``). ``window`` (with a recent window):
        ``(key, value, prev)``, the step's own K/V and the ``R - 1`` positions before each request's step
        (:meth:`_recent_prev`)."""
        wkw = {}
        if window is not None:
            wkw = dict(recent_key=window[0], recent_value=window[1], recent_prev=window[2])
        records, sinks = self._cache_views(kv_cache)
        if md.attention_impl == "cpp":
            p = self.runtime.kernel_params(layer_idx, kv_cache.device)
            t = query.shape[0]
            paged_attention_cpu(query, records, md.block_table, md.seq_lens, md.query_start_loc, spec=p.spec,
                                scale=self.scale, sinks=sinks, rope_cos=p.rope_cos, rope_sin=p.rope_sin,
                                key_perm=p.key_perm, key_mean=p.key_mean, out_dtype=output.dtype, out=output[:t],
                                **wkw)
            return
        if md.attention_impl == "triton":
            p = self.runtime.kernel_params(layer_idx, kv_cache.device)
            t = query.shape[0]
            paged_attention_triton(query, records, md.block_table, md.seq_lens, md.query_start_loc, spec=p.spec,
                                   scale=self.scale, sinks=sinks, rope_cos=p.rope_cos, rope_sin=p.rope_sin,
                                   key_perm=p.key_perm, key_mean=p.key_mean, out_dtype=output.dtype, out=output[:t],
                                   precision=self.triton_precision, plan=md.paged_plan(p.spec, self.num_heads),
                                   inv_perm=p.inv_perm, **wkw)
            return
        recent = None
        if window is not None:
            key, value, prev = window
            recent = recent_window_kv(key, value, prev, md.query_start_loc, md.seq_lens, query.shape[0],
                                      self.runtime.recent_window)
        attend_tiles(query, records, sinks, md.tiles, self.runtime.cpu_tables(layer_idx), scale=self.scale,
                     output=output, recent=recent)

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
        if attn_metadata.attention_impl == "cpp" and key is not None and value is not None:
            self._forward_cpp(layer_idx, query[:t], key[:t], value[:t], kv_cache, attn_metadata, output)
            return output
        window = None
        if self.runtime.recent_window:
            if key is None or value is None:
                raise NotImplementedError("RotateKV's recent window reads the step's own K/V: this layer passes none")
            before = self._recent_prev(kv_cache, attn_metadata)
            self.store(layer_idx, key[:t], value[:t], kv_cache, attn_metadata)
            window = (key[:t], value[:t], self._recent_prev(kv_cache, attn_metadata, before))
        elif key is not None and value is not None:
            self.store(layer_idx, key[:t], value[:t], kv_cache, attn_metadata)
        self.attend(layer_idx, query[:t], kv_cache, attn_metadata, output, window)
        return output

    def _forward_cpp(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     kv_cache: torch.Tensor, md: RotateKVAttentionMetadata, output: torch.Tensor) -> None:
        """:meth:`forward` on the ``"cpp"`` path: the same calls as ``store`` / ``_recent_prev`` / ``attend``
        through the layer's :class:`CpuLayerKernels` (made on first use)."""
        ops = self._cpu_ops
        if ops is None:
            p = self.runtime.kernel_params(layer_idx, "cpu")
            ops = self._cpu_ops = CpuLayerKernels(p.spec, scale=self.scale, rope_cos=p.rope_cos, rope_sin=p.rope_sin,
                                                  key_perm=p.key_perm, key_mean=p.key_mean)
        records, sinks = self._cache_views(kv_cache)
        bs = kv_cache.shape[2]
        ring = ops.spec.ring_slots > 0
        before = ops.recent_prev(sinks, md.block_table, md.seq_lens, md.query_start_loc, bs) if ring else None
        ops.write(key, value, md.slot_mapping, md.positions, records, sinks)
        window = {}
        if ops.spec.recent_window:
            prev = ops.recent_prev(sinks, md.block_table, md.seq_lens, md.query_start_loc, bs, before) if ring else None
            window = dict(recent_key=key, recent_value=value, recent_prev=prev)
        ops.attend(query, records, md.block_table, md.seq_lens, md.query_start_loc, sinks, output[: query.shape[0]],
                   **window)

    def _recent_prev(self, kv_cache: torch.Tensor, md: RotateKVAttentionMetadata,
                     before: torch.Tensor | None = None) -> torch.Tensor | None:
        """The full-precision K/V of the ``R - 1`` positions before each request's step, read from the rings
        (``rotkv_paged.recent_prev_ref``, or its C++ twin ``recent_prev_cpu`` on the ``"cpp"`` path): called before the
        step's write and again after it, so the positions in
        the block the step continues come from before its own ring writes and older blocks from after the
        writes of the whole step (a block another request of this step fills, reached through prefix caching).
        None without ring slots (a window of 1 reads the step's own token only)."""
        if self.runtime.ring_slots == 0:
            return None
        _, sinks = self._cache_views(kv_cache)
        read = recent_prev_cpu if md.attention_impl == "cpp" else recent_prev_ref
        return read(sinks, md.block_table, md.seq_lens, md.query_start_loc, spec=self.runtime.paged_spec(0),
                    block_size=kv_cache.shape[2], before=before)
