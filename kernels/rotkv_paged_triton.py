"""Triton kernels of the RotateKV paged cache: fused write + scatter, and split-K paged attention.

Entry points (same contracts as the references in ``rotkv_paged``): :func:`paged_write_triton`,
:func:`paged_attention_triton` (decode, chunked prefill and mixed batches) and :func:`paged_decode_triton`;
:func:`plan_paged_attention` builds the per-step work list the attention kernel reads (a vLLM metadata
builder builds it once per step and shares it across layers).

**Write** (``_paged_write_fwd_kernel``, one program per ``BLOCK_T`` tokens, one pass): load post-RoPE keys
(any strides), undo RoPE at each token's position (``(k cos - rotate_half(k) sin) / (cos^2 + sin^2)``,
fp32, IEEE division, no FMA contraction: the reference's operations), subtract the calibrated key mean,
block Hadamard of width ``g * D`` by two ``tl.dot`` (``hadamard_triton``), permute and regroup with one
``tl.gather``, group min/max quantization, pack, and store codes, scales and zeros straight into the
token's slot ``records[slot // block_size, slot % block_size]``; values likewise with the per-head
Hadamard; tokens at positions ``< S`` also store their K/V in the block's sink area, and with a recent window
every token its K/V in its page's ring (``rotkv_paged.ring_write_mask``). Slot ``-1`` skips a token.
Records are the bytes ``rotkv_write_ref`` produces (bit-identical when the fp32 sums of the rotation are exact,
e.g. dyadic inputs; see ``rotkv_cache_triton``).

**Attention** (``_paged_attn_fwd_kernel``), grid ``(query blocks, rotation blocks, splits)``. A query block
is ``M`` consecutive query tokens of one request (``M = 1`` for decode); a rotation block is the ``g`` KV
heads one key Hadamard spans and their ``g * Hq / H`` query heads; a split is a range of ``split_size``
context positions. Per tile of ``BLOCK_N`` cached positions a program:

1. looks the physical blocks up in the block table and addresses the slots with int64 offsets;
2. loads the packed key codes as 8-code words (``bits`` bytes each), unpacks them with shifts, and
   dequantizes ``(q - z) * s`` in the stored (permuted) order, groups broadcast from one scale/zero load;
3. un-permutes with one ``tl.gather`` (``inv_perm``), then applies the inverse block Hadamard as two
   ``tl.dot`` against the small Hadamard factors (``H_{g D} = A (x) B``, e.g. 32 x 32 for ``g D = 1024``):
   tensor-core work, not scalar butterflies;
4. adds the key mean and applies RoPE at each key's own position (channel halves split with
   ``tl.split``, so ``rotate_half`` costs no data movement);
5. computes the scores of every query head of the rotation block against these decoded keys (a batched
   ``tl.dot`` per KV head: the dequantized keys are shared by the ``Hq / H`` query heads of each GQA group
   and by the ``M`` query tokens), masks causally, and updates an online softmax (base 2);
6. dequantizes the values and accumulates ``p V`` *in the values' rotated basis*:
   ``sum_j p_j H^T v_j = H^T sum_j p_j v_j``, so the value Hadamard runs once per output row, in the reduce
   pass, not once per cached token.

With a sliding window ``SW`` (``spec.sliding_window``) a query block's splits start at its first query's window
(``max(0, pos - SW + 1)``) and the mask also drops keys at or before ``row_pos - SW``: no position before the window
is loaded (vLLM frees those blocks to its null block), the sinks included once they leave it.

The split owning position 0 also attends the sink tokens from the full-precision side store (keys used
as stored; values rotated into the same basis by a forward per-head Hadamard). With a recent window of ``R``
the splits leave each query's last ``R`` positions out (causal mask shifted by ``R``) and the window's
full-precision keys (``rotkv_paged.recent_window_kv``) are one more split whose partial a few PyTorch
operations compute (``_window_partial``); the reduce merges it like any other. Each program writes its
partial ``(m, l, acc)`` per (token, query head, split); ``_paged_reduce_kernel`` (second pass, one program
per token) merges the splits (``O = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s``), applies the inverse
value Hadamard and stores ``[T, Hq, D]``.

**Arithmetic intensity of decode** (per cached token and step, one rotation block; Llama-3-8B shapes:
``H = 8``, ``D = 128``, ``g = 8``, ``Hq = 32``, 2-bit K/V, group 128, fp16 scale+zero). Bytes: the two
records, ``2 * (1024 * 2 / 8 + 8 * 4) = 576`` (bf16 K/V: 4096). Tensor-core flops: the inverse Hadamard
``2 * (a_pad + b) * a_pad / a`` per element (``hadamard_triton``'s table: 32 x 32 gives 128) times 1024 =
131,072; scores and ``p V`` ``2 * 2 * g * R * D`` with ``R = 16`` query rows per KV head (4 used, padded to
the 16 rows ``tl.dot`` needs) = 65,536 (16,384 useful). About 197 K flops per 576 bytes: **340 flops/byte**,
against an H200 ridge of about 206 (990 TFLOP/s dense fp16 over 4.8 TB/s), so with ``precision="fp16"``
the kernel is compute-bound by ~1.7x at peak rates: the floor is ~0.2 ns per cached token, vs ~0.85 ns
for reading bf16 K/V at full bandwidth (the bf16 kernel's floor), a ceiling of ~4x. With
``precision="fp32"`` (fp32 "ieee" dots, 67 TFLOP/s) the same work is ~20x compute-bound: that mode is
for checking numerics, not for speed. No GPU was available when this was written: the figures above are
counts, not measurements (``benchmarks/gpu_decode.py`` measures them).

Precision. ``"fp32"``: every product in fp32 (``input_precision="ieee"``). ``"fp16"``: the Hadamard, score
and ``p V`` products take fp16 operands with fp32 accumulation (Hadamard operands are pre-scaled by
``1/sqrt(g D)`` so intermediates stay within fp16 range); dequantization, RoPE, softmax and the reduce
are fp32. It needs ``|q| * scale``, keys and values below fp16's 65504. The tests bound both modes against
the reference (``tests/kernels/test_rotkv_paged_triton.py``).

Limits of the attention kernel (``ValueError`` otherwise): ``head_dim`` a power of two in ``[32, 256]``;
quantization groups multiples of 8; key Hadamard orders within ``hadamard_plan``'s tile limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rotkv_kernels.hadamard_triton import _next_pow2, check_launchable, hadamard_operands, hadamard_plan
from rotkv_kernels.quant_triton import check_triton_group_size
from rotkv_kernels.rotkv_layout import (
    PagedCacheSpec,
    check_paged_attention_args,
    check_paged_write_args,
    check_recent_args,
)

try:  # Triton is optional: the module must import without it (the stubs below raise instead).
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by tests/kernels/test_import_guard.py in a subprocess
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "PRECISIONS",
    "PagedAttentionPlan",
    "plan_paged_attention",
    "check_attention_head_dim",
    "check_attention_limits",
    "paged_write_triton",
    "paged_attention_triton",
    "paged_decode_triton",
]

PRECISIONS = ("fp16", "fp32")
_TILE_ELEMS = 4096
_MIN_DOT = 16


# ---- host-side planning (no Triton needed) -------------------------------------------------------------


@dataclass(frozen=True)
class PagedAttentionPlan:
    """The attention kernel's work list for one step (shared by all layers of a model).

    Attributes:
        qb_req: int32 ``[NQB]`` (device): request of each query block.
        qb_start: int32 ``[NQB]`` (device): index of the block's first query within its request.
        tokens_per_block: ``M``, query tokens per block (1 for a pure decode step).
        num_splits: context splits per query block (split-K); the reduce pass merges them.
        split_size: context positions per split (a multiple of ``block_n``).
        block_n: cached positions per tile.
        num_tokens: query tokens covered (``query_start_loc[-1]``).
        sliding_window: the spec's sliding window the splits were sized for (0: none; the attention checks it).
    """

    qb_req: torch.Tensor
    qb_start: torch.Tensor
    tokens_per_block: int
    num_splits: int
    split_size: int
    block_n: int
    num_tokens: int
    sliding_window: int = 0


def _default_target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        # Several programs per SM hide the latency of the block-table lookups and record loads.
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs keep the CPU tests short


def plan_paged_attention(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    spec: PagedCacheSpec,
    num_query_heads: int,
    device: torch.device | str | None = None,
    block_n: int = 16,
    tokens_per_block: int | None = None,
    num_splits: int | None = None,
    target_programs: int | None = None,
    min_split_tokens: int = 64,
) -> PagedAttentionPlan:
    """Split the step's queries into blocks of ``M`` tokens and the context into ``num_splits`` ranges.

    Args:
        query_start_loc / seq_lens: as for the attention (read on the host: pass CPU copies to avoid a sync).
        tokens_per_block: ``M``; default 1 when every request has one query (decode), else
            ``max(1, 16 // (Hq / H))`` so one query block fills the 16 rows a ``tl.dot`` needs.
        num_splits: default: enough programs to reach ``target_programs`` (4 per SM on CUDA), with at least
            ``min_split_tokens`` positions per split. With ``spec.sliding_window = SW`` a query block's context
            starts at its first query's window, so the splits cover at most ``M + SW - 1`` positions.
    Raises:
        ValueError: bad sizes, or more queries than cached tokens in a request.
    """
    if num_query_heads < 1 or num_query_heads % spec.num_kv_heads:
        raise ValueError(f"num_query_heads={num_query_heads}: must be a positive multiple of "
                         f"num_kv_heads={spec.num_kv_heads}")
    if block_n < _MIN_DOT or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n}: must be a power of two >= {_MIN_DOT} (tl.dot tiles)")
    qsl = query_start_loc.to("cpu", torch.int64)
    seq = seq_lens.to("cpu", torch.int64)
    q_lens = qsl[1:] - qsl[:-1]
    if (q_lens < 0).any() or (q_lens > seq).any():
        raise ValueError("query_start_loc/seq_lens: every request needs 0 <= q_len <= seq_len")
    qpk = num_query_heads // spec.num_kv_heads
    max_q = int(q_lens.max()) if q_lens.numel() else 0
    if tokens_per_block is None:
        tokens_per_block = 1 if max_q <= 1 else max(1, _MIN_DOT // qpk)
    if tokens_per_block < 1:
        raise ValueError(f"tokens_per_block={tokens_per_block}: must be positive")
    nqb = (q_lens + tokens_per_block - 1) // tokens_per_block
    total = int(nqb.sum())
    qb_req = torch.repeat_interleave(torch.arange(len(q_lens)), nqb)
    first = torch.cumsum(nqb, 0) - nqb
    qb_start = (torch.arange(total) - first[qb_req]) * tokens_per_block
    if spec.sliding_window:
        seq = torch.minimum(seq, torch.full_like(seq, tokens_per_block + spec.sliding_window - 1))
    max_ctx = int(seq.max()) if seq.numel() else 0
    dev = torch.device(device) if device is not None else query_start_loc.device
    n_rot = spec.width // spec.key_rot_width
    if num_splits is None:
        target = target_programs if target_programs is not None else _default_target_programs(dev)
        want = -(-target // max(1, total * n_rot))
        num_splits = max(1, min(want, -(-max_ctx // max(min_split_tokens, block_n))))
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits}: must be positive")
    split = -(-max(max_ctx, 1) // num_splits)
    split = max(split, spec.sink_tokens)  # the sink tile belongs to split 0
    split = -(-split // block_n) * block_n
    num_splits = max(1, -(-max_ctx // split))
    return PagedAttentionPlan(
        qb_req=qb_req.to(dev, torch.int32), qb_start=qb_start.to(dev, torch.int32),
        tokens_per_block=int(tokens_per_block), num_splits=int(num_splits), split_size=int(split),
        block_n=int(block_n), num_tokens=int(qsl[-1]) if qsl.numel() else 0,
        sliding_window=spec.sliding_window,
    )


def check_attention_head_dim(head_dim: int) -> None:
    """Raise ``ValueError`` unless the attention kernel can serve heads of ``head_dim`` (a power of two in
    ``[32, 256]``: whole ``tl.dot`` tiles, one head per tile row)."""
    d = head_dim
    if d < 32 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim={d}: the Triton paged attention needs a power of two in [32, 256]; use "
                         "rotkv_kernels.rotkv_paged.paged_attention_ref")


def check_attention_limits(spec: PagedCacheSpec) -> None:
    """Raise ``ValueError`` unless the fused attention can serve ``spec``'s layout: its head width
    (:func:`check_attention_head_dim`), its quantization groups inside whole tiles, and a key rotation width
    the tiled Hadamard covers."""
    check_attention_head_dim(spec.head_dim)
    check_triton_group_size(spec.key_group_size, spec.key_rot_width)
    check_triton_group_size(spec.value_group_size, spec.width)
    hadamard_plan(spec.key_rot_width)  # raises for orders outside the tile limits


def _window_partial(query, recent_key, recent_value, recent_prev, query_start_loc, seq_lens, spec: PagedCacheSpec,
                    scale: float, num_tokens: int, pm: torch.Tensor, pl: torch.Tensor, pacc: torch.Tensor) -> None:
    """The recent window's split partial ``(m, l, acc)`` of every query token, in the attention kernel's
    conventions (scores in log2, ``acc`` in the values' rotated basis), written into ``pm/pl [T, Hq]`` and
    ``pacc [T, Hq, D]``: ``R`` full-precision keys per query, a few PyTorch operations on the device."""
    from rotkv_kernels.hadamard import hadamard_transform
    from rotkv_kernels.rotkv_layout import recent_window_kv

    kv, valid = recent_window_kv(recent_key, recent_value, recent_prev, query_start_loc, seq_lens, num_tokens,
                                 spec.recent_window)
    rep = query.shape[1] // spec.num_kv_heads
    k = kv[:, :, 0].repeat_interleave(rep, dim=2)  # [T, R, Hq, D]
    v = kv[:, :, 1]
    if spec.value_rot_width > 1:
        v = hadamard_transform(v, block_size=spec.value_rot_width)
    v = v.repeat_interleave(rep, dim=2)
    q = query[:num_tokens].to(torch.float32)
    s = torch.einsum("thd,trhd->thr", q, k) * (float(scale) * math.log2(math.e))
    s = s.masked_fill(~valid.unsqueeze(1), float("-inf"))
    m = s.amax(-1)
    m = torch.where(torch.isfinite(m), m, -1.0e30)  # padding tokens: a neutral partial
    p = torch.exp2(s - m.unsqueeze(-1))
    pm.copy_(m)
    pl.copy_(p.sum(-1))
    pacc.copy_(torch.einsum("thr,trhd->thd", p, v))


def _tile_layout(width: int, rot_width: int, group_size: int):
    from rotkv_kernels.rotkv_cache_triton import _Layout

    return _Layout(width, rot_width, group_size)


if HAS_TRITON:
    from rotkv_kernels.hadamard_triton import _cast_rne, _hadamard_tile
    from rotkv_kernels.quant_triton import _load_scale_zero, _quantize_groups, _store_le, _store_packed
    from rotkv_kernels.rotkv_cache_triton import _flat_pos, _tile_channels

    # ================================================================================================
    # write
    # ================================================================================================
    @triton.jit
    def _encode_store(x, row_ptr, tvalid, perm_ptr, m1_ptr, m2_ptr, rot_scale, clip, eps,
                      BLOCK_T: tl.constexpr, N: tl.constexpr, RW: tl.constexpr, B: tl.constexpr,
                      A_PAD: tl.constexpr, B_PAD: tl.constexpr, NB_PAD: tl.constexpr, GS: tl.constexpr,
                      G_PAD: tl.constexpr, GS_PAD: tl.constexpr, BITS: tl.constexpr, SCALE_FP8: tl.constexpr,
                      HAS_PERM: tl.constexpr, ROTATE: tl.constexpr, TWO_STAGE: tl.constexpr):
        """Rotate, permute, quantize, pack a ``[BLOCK_T * NB_PAD, A_PAD, B_PAD]`` tile into records at ``row_ptr``."""
        G: tl.constexpr = N // GS
        SB: tl.constexpr = 1 if SCALE_FP8 else 2
        CB: tl.constexpr = N * BITS // 8
        NF: tl.constexpr = NB_PAD * A_PAD * B_PAD
        ROWS: tl.constexpr = BLOCK_T * NB_PAD
        if ROTATE:
            y = _hadamard_tile(x, m1_ptr, m2_ptr, ROWS, A_PAD, B_PAD, TWO_STAGE) * rot_scale
        else:
            y = x
        # Output position p = k*GS + e holds channel perm[p]: gather it from the flattened rotation tile.
        k = tl.arange(0, G_PAD)
        e = tl.arange(0, GS_PAD)
        p = k[:, None] * GS + e[None, :]
        pvalid = (k[:, None] < G) & (e[None, :] < GS)
        if HAS_PERM:
            src = tl.load(perm_ptr + p, mask=pvalid, other=0).to(tl.int32)
        else:
            src = p
        f = tl.where(pvalid, _flat_pos(src, RW, B, A_PAD, B_PAD), 0)
        idx = tl.broadcast_to(tl.reshape(f, (1, G_PAD * GS_PAD)), (BLOCK_T, G_PAD * GS_PAD))
        yq = tl.reshape(tl.gather(tl.reshape(y, (BLOCK_T, NF)), idx, 1), (BLOCK_T, G_PAD, GS_PAD))
        qvalid = tvalid[:, None, None] & pvalid[None, :, :]
        q, s_bits, z_bits = _quantize_groups(yq, qvalid, clip, eps, (1 << BITS) - 1, SCALE_FP8)
        _store_packed(q, row_ptr, tvalid, GS, G, BLOCK_T, G_PAD, GS_PAD, BITS)
        _store_le(s_bits, row_ptr + CB, tvalid, G, G_PAD, SB)
        _store_le(z_bits, row_ptr + CB + G * SB, tvalid, G, G_PAD, SB)

    @triton.jit
    def _paged_write_fwd_kernel(
        k_ptr, sk_t, sk_h, sk_d, v_ptr, sv_t, sv_h, sv_d, slot_ptr, pos_ptr,
        rec_ptr, rec_sb, rec_ss, sink_ptr, sn_b, sn_p, sn_kv, sn_h, sn_d,
        cos_ptr, sin_ptr, rope_st, mean_ptr, kperm_ptr, km1_ptr, km2_ptr, vm1_ptr, vm2_ptr,
        n_tokens, k_rot_scale, v_rot_scale, k_clip, v_clip, eps,
        H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, KB: tl.constexpr,
        K_RW: tl.constexpr, K_A: tl.constexpr, K_B: tl.constexpr, K_A_PAD: tl.constexpr, K_B_PAD: tl.constexpr,
        K_NB_PAD: tl.constexpr, K_GS: tl.constexpr, K_G_PAD: tl.constexpr, K_GS_PAD: tl.constexpr,
        K_BITS: tl.constexpr, K_TWO_STAGE: tl.constexpr, HAS_PERM: tl.constexpr,
        V_A: tl.constexpr, V_B: tl.constexpr, V_A_PAD: tl.constexpr, V_B_PAD: tl.constexpr,
        V_NB_PAD: tl.constexpr, V_GS: tl.constexpr, V_G_PAD: tl.constexpr, V_GS_PAD: tl.constexpr,
        V_BITS: tl.constexpr, V_TWO_STAGE: tl.constexpr, V_ROTATE: tl.constexpr,
        SCALE_FP8: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_MEAN: tl.constexpr, S_SINK: tl.constexpr,
        S_SINK_ALL: tl.constexpr, N_RING: tl.constexpr, W_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Encode ``BLOCK_T`` tokens' K and V and scatter them into their slots (and sinks) in one pass."""
        N: tl.constexpr = H * D
        pid = tl.program_id(0)
        t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        tin = t < n_tokens
        slot = tl.load(slot_ptr + t, mask=tin, other=-1).to(tl.int64)
        tvalid = tin & (slot >= 0)
        blk = tl.where(tvalid, slot // BS, 0)
        off = tl.where(tvalid, slot % BS, 0)
        # int64: block ids times the page stride pass 2^31 bytes in large caches.
        row_ptr = rec_ptr + blk * rec_sb + off * rec_ss

        # ---- keys: undo RoPE, subtract the mean, rotate by g*D, permute, quantize ----
        tok, c, valid = _tile_channels(pid, n_tokens, BLOCK_T, N // K_RW, K_NB_PAD, K_RW, K_A, K_B, K_A_PAD,
                                       K_B_PAD)
        tslot = tl.load(slot_ptr + tok, mask=tok < n_tokens, other=-1)
        valid = valid & (tslot >= 0)[:, None, None]
        tok64 = tok.to(tl.int64)[:, None, None]
        x = tl.load(k_ptr + tok64 * sk_t + (c // D) * sk_h + (c % D) * sk_d, mask=valid, other=0.0).to(tl.float32)
        if HAS_ROPE:
            d = c % D
            first = d < D // 2
            partner = tl.where(first, c + D // 2, c - D // 2)
            kp = tl.load(k_ptr + tok64 * sk_t + (partner // D) * sk_h + (partner % D) * sk_d, mask=valid,
                         other=0.0).to(tl.float32)
            rh = tl.where(first, -kp, kp)
            p = tl.load(pos_ptr + tok, mask=tok < n_tokens, other=0).to(tl.int64)[:, None, None]
            cs = tl.load(cos_ptr + p * rope_st + d, mask=valid, other=1.0)
            sn = tl.load(sin_ptr + p * rope_st + d, mask=valid, other=0.0)
            x = tl.math.div_rn(x * cs - rh * sn, cs * cs + sn * sn)
        if HAS_MEAN:
            x = x - tl.load(mean_ptr + c, mask=valid, other=0.0)
        x = tl.where(valid, x, 0.0)
        _encode_store(x, row_ptr, tvalid, kperm_ptr, km1_ptr, km2_ptr, k_rot_scale, k_clip, eps,
                      BLOCK_T, N, K_RW, K_B, K_A_PAD, K_B_PAD, K_NB_PAD, K_GS, K_G_PAD, K_GS_PAD, K_BITS,
                      SCALE_FP8, HAS_PERM, True, K_TWO_STAGE)

        # ---- values: per-head Hadamard (or none), no permutation ----
        tok, c, valid = _tile_channels(pid, n_tokens, BLOCK_T, H, V_NB_PAD, D, V_A, V_B, V_A_PAD, V_B_PAD)
        # (rows are tokens x head blocks of D here, so the slots are looked up again for this tiling)
        valid = valid & (tl.load(slot_ptr + tok, mask=tok < n_tokens, other=-1) >= 0)[:, None, None]
        tok64 = tok.to(tl.int64)[:, None, None]
        x = tl.load(v_ptr + tok64 * sv_t + (c // D) * sv_h + (c % D) * sv_d, mask=valid, other=0.0).to(tl.float32)
        _encode_store(x, row_ptr + KB, tvalid, kperm_ptr, vm1_ptr, vm2_ptr, v_rot_scale, v_clip, eps,
                      BLOCK_T, N, D, V_B, V_A_PAD, V_B_PAD, V_NB_PAD, V_GS, V_G_PAD, V_GS_PAD, V_BITS,
                      SCALE_FP8, False, V_ROTATE, V_TWO_STAGE)

        # ---- sinks: the model's own K/V of positions < S, in the first block's side store ----
        if S_SINK > 0:
            pt = tl.load(pos_ptr + t, mask=tvalid, other=S_SINK).to(tl.int64)
            is_sink = tvalid & (pt < S_SINK)
            cc = tl.arange(0, W_PAD)
            h = cc // D
            d2 = cc % D
            m = is_sink[:, None] & (cc < N)[None, :]
            t64 = t.to(tl.int64)[:, None]
            kx = tl.load(k_ptr + t64 * sk_t + h * sk_h + d2 * sk_d, mask=m, other=0.0)
            vx = tl.load(v_ptr + t64 * sv_t + h * sv_h + d2 * sv_d, mask=m, other=0.0)
            base = sink_ptr + (blk * sn_b + tl.where(is_sink, pt, 0) * sn_p)[:, None] + h * sn_h + d2 * sn_d
            sdt = sink_ptr.dtype.element_ty
            tl.store(base, _cast_rne(kx.to(tl.float32), sdt), mask=m)
            tl.store(base + sn_kv, _cast_rne(vx.to(tl.float32), sdt), mask=m)

        # ---- recent-window ring: slot S + off % (R - 1), unless token t + R - 1 overwrites it in this step ----
        if N_RING > 0:
            later = tl.load(slot_ptr + t + N_RING, mask=tin & (t + N_RING < n_tokens), other=-1).to(tl.int64)
            is_ring = tvalid & ~((later == slot + N_RING) & (off + N_RING < BS))
            cc = tl.arange(0, W_PAD)
            h = cc // D
            d2 = cc % D
            m = is_ring[:, None] & (cc < N)[None, :]
            t64 = t.to(tl.int64)[:, None]
            kx = tl.load(k_ptr + t64 * sk_t + h * sk_h + d2 * sk_d, mask=m, other=0.0)
            vx = tl.load(v_ptr + t64 * sv_t + h * sv_h + d2 * sv_d, mask=m, other=0.0)
            base = sink_ptr + (blk * sn_b + (S_SINK_ALL + off % N_RING) * sn_p)[:, None] + h * sn_h + d2 * sn_d
            sdt = sink_ptr.dtype.element_ty
            tl.store(base, _cast_rne(kx.to(tl.float32), sdt), mask=m)
            tl.store(base + sn_kv, _cast_rne(vx.to(tl.float32), sdt), mask=m)

    def _write_block_t(lk, lv) -> int:
        bt = min(lk.block_t, lv.block_t)
        rows = min(lk.nb_pad * lk.plan.a_pad, lv.nb_pad * lv.plan.a_pad)
        while bt * rows < _MIN_DOT:
            bt *= 2
        return bt

    def paged_write_triton(
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
        """Triton :func:`rotkv_paged.paged_write_ref` (same arguments, writes ``records``/``sinks`` in place).

        Extra limits: group sizes multiples of 8; Hadamard orders within ``hadamard_plan``'s tile limits.
        Raises ``ValueError`` like the reference.
        """
        check_paged_write_args(spec, key, value, slot_mapping, positions, records, sinks, rope_cos, rope_sin,
                               key_perm, key_mean)
        check_triton_group_size(spec.key_group_size, spec.width)
        check_triton_group_size(spec.value_group_size, spec.width)
        check_launchable(records, "paged_write_triton")
        t = key.shape[0]
        if t == 0:
            return
        h, d, w = spec.num_kv_heads, spec.head_dim, spec.width
        lk = _tile_layout(w, spec.key_rot_width, spec.key_group_size)
        lv = _tile_layout(w, d, spec.value_group_size)
        bt = _write_block_t(lk, lv)
        dev = records.device
        km1, km2 = hadamard_operands(spec.key_rot_width, False, dev)
        vm1, vm2 = hadamard_operands(d, False, dev)
        eps = {"fp16": torch.finfo(torch.float16).tiny, "fp8": torch.finfo(torch.float8_e4m3fn).tiny}
        has_rope = rope_cos is not None
        dummy = records
        sn = sinks.stride() if sinks is not None else (0, 0, 0, 0, 0)
        _paged_write_fwd_kernel[(triton.cdiv(t, bt),)](
            key, key.stride(0), key.stride(1), key.stride(2), value, value.stride(0), value.stride(1),
            value.stride(2), slot_mapping, positions if positions is not None else slot_mapping,
            records, records.stride(0), records.stride(1), sinks if sinks is not None else dummy, *sn,
            rope_cos if has_rope else dummy, rope_sin if has_rope else dummy,
            rope_cos.stride(0) if has_rope else 0, key_mean if key_mean is not None else dummy,
            key_perm if key_perm is not None else dummy, km1, km2, vm1, vm2,
            t, 1.0 / math.sqrt(spec.key_rot_width), 1.0 / math.sqrt(d), float(spec.key_clip),
            float(spec.value_clip), float(eps[spec.scale_format]),
            H=h, D=d, BS=records.shape[1], KB=spec.key_bytes,
            K_RW=spec.key_rot_width, K_A=lk.plan.a, K_B=lk.plan.b, K_A_PAD=lk.plan.a_pad, K_B_PAD=lk.plan.b_pad,
            K_NB_PAD=lk.nb_pad, K_GS=spec.key_group_size, K_G_PAD=lk.g_pad, K_GS_PAD=lk.gs_pad,
            K_BITS=spec.key_bits, K_TWO_STAGE=lk.plan.two_stage, HAS_PERM=key_perm is not None,
            V_A=lv.plan.a, V_B=lv.plan.b, V_A_PAD=lv.plan.a_pad, V_B_PAD=lv.plan.b_pad, V_NB_PAD=lv.nb_pad,
            V_GS=spec.value_group_size, V_G_PAD=lv.g_pad, V_GS_PAD=lv.gs_pad, V_BITS=spec.value_bits,
            V_TWO_STAGE=lv.plan.two_stage, V_ROTATE=spec.value_rot_width != 1,
            SCALE_FP8=spec.scale_format == "fp8", HAS_ROPE=has_rope, HAS_MEAN=key_mean is not None,
            S_SINK=spec.sink_tokens if sinks is not None else 0, S_SINK_ALL=spec.sink_tokens,
            N_RING=spec.ring_slots, W_PAD=_next_pow2(w), BLOCK_T=bt,
            # No FMA contraction: the inverse RoPE must round like the reference's separate operations.
            enable_fp_fusion=False,
        )

    # ================================================================================================
    # attention
    # ================================================================================================
    @triton.jit
    def _load_code_words(row_ptr, rvalid, WORD0, BLOCK_N: tl.constexpr, WP: tl.constexpr, NWORDS: tl.constexpr,
                         BITS: tl.constexpr):
        """Codes ``[BLOCK_N, WP * 8]`` (int32) of ``NWORDS`` 8-code words from word ``WORD0`` of each row.

        Word ``w`` is ``BITS`` little-endian bytes at ``row + w * BITS``; code ``e`` sits at bit ``e * BITS``.
        """
        w = tl.arange(0, WP)
        m = rvalid[:, None] & (w < NWORDS)[None, :]
        base = row_ptr[:, None] + (WORD0 + w)[None, :] * BITS
        word = tl.load(base, mask=m, other=0).to(tl.int32)
        for b in tl.static_range(1, BITS):
            word = word | (tl.load(base + b, mask=m, other=0).to(tl.int32) << (8 * b))
        e = tl.arange(0, 8)
        codes = (word[:, :, None] >> (e * BITS)[None, None, :]) & ((1 << BITS) - 1)
        return tl.reshape(codes, (BLOCK_N, WP * 8))

    @triton.jit
    def _dequant_rows(row_ptr, rvalid, P0, BLOCK_N: tl.constexpr, F: tl.constexpr, RW: tl.constexpr,
                      N: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr, SCALE_FP8: tl.constexpr,
                      ALIGNED: tl.constexpr):
        """``(q - z) * s``, fp32 ``[BLOCK_N, F]``, of stored positions ``P0 .. P0 + RW`` of each record (0 elsewhere).

        ``ALIGNED`` (power-of-two group dividing ``RW``): one scale/zero load per group, broadcast over the
        group; otherwise one per position.
        """
        SB: tl.constexpr = 1 if SCALE_FP8 else 2
        CB: tl.constexpr = N * BITS // 8
        NG: tl.constexpr = N // GS
        q = _load_code_words(row_ptr, rvalid, P0 // 8, BLOCK_N, F // 8, RW // 8, BITS).to(tl.float32)
        sp = (row_ptr + CB)[:, None]
        zp = (row_ptr + CB + NG * SB)[:, None]
        if ALIGNED:
            NGP: tl.constexpr = F // GS
            k = tl.arange(0, NGP)
            km = rvalid[:, None] & (k < RW // GS)[None, :]
            s, z = _load_scale_zero(sp, zp, tl.broadcast_to((P0 // GS + k)[None, :], (BLOCK_N, NGP)), km,
                                    SCALE_FP8)
            y = (tl.reshape(q, (BLOCK_N, NGP, GS)) - z[:, :, None]) * s[:, :, None]
            y = tl.reshape(y, (BLOCK_N, F))
        else:
            p = tl.arange(0, F)
            pm = rvalid[:, None] & (p < RW)[None, :]
            s, z = _load_scale_zero(sp, zp, tl.broadcast_to(((P0 + p) // GS)[None, :], (BLOCK_N, F)), pm,
                                    SCALE_FP8)
            y = (q - z) * s
        p = tl.arange(0, F)
        return tl.where(rvalid[:, None] & (p < RW)[None, :], y, 0.0)

    @triton.jit
    def _hadamard_pre(x, m1, m2, ROWS: tl.constexpr, A_PAD: tl.constexpr, B_PAD: tl.constexpr,
                      TWO_STAGE: tl.constexpr, LOWP: tl.constexpr):
        """``A X B^T`` of ``x [ROWS, A_PAD * B_PAD]`` with preloaded operands (``m1 = B^T``, ``m2 = A^T``)."""
        xx = tl.reshape(x, (ROWS * A_PAD, B_PAD))
        if LOWP:
            z = tl.dot(xx.to(tl.float16), m1)
        else:
            z = tl.dot(xx, m1, input_precision="ieee")
        z = tl.reshape(z, (ROWS, A_PAD, B_PAD))
        if TWO_STAGE:
            zt = tl.reshape(tl.permute(z, (0, 2, 1)), (ROWS * B_PAD, A_PAD))
            if LOWP:
                y = tl.dot(zt.to(tl.float16), m2)
            else:
                y = tl.dot(zt, m2, input_precision="ieee")
            z = tl.permute(tl.reshape(y, (ROWS, B_PAD, A_PAD)), (0, 2, 1))
        return z

    @triton.jit
    def _attend(q1, q2, k1, k2, v, pos, kvalid, row_pos, m_i, l_i, acc, LOWP: tl.constexpr, WIN: tl.constexpr,
                SW: tl.constexpr):
        """Online-softmax update with one tile: ``k1/k2 [G, N, D/2]`` (halves), ``v [G, N, D]``, scores in log2.
        Keys of a row's last ``WIN`` positions are left to the recent window's partial; with a sliding window
        ``SW > 0`` keys at or before ``row_pos - SW`` are masked."""
        if LOWP:
            s = tl.dot(q1, tl.permute(k1.to(tl.float16), (0, 2, 1)))
            s += tl.dot(q2, tl.permute(k2.to(tl.float16), (0, 2, 1)))
        else:
            s = tl.dot(q1, tl.permute(k1, (0, 2, 1)), input_precision="ieee")
            s += tl.dot(q2, tl.permute(k2, (0, 2, 1)), input_precision="ieee")
        mask = kvalid[None, :] & (pos[None, :] <= row_pos[:, None] - WIN)
        if SW > 0:
            mask = mask & (pos[None, :] > row_pos[:, None] - SW)
        s = tl.where(mask[None, :, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 2))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, :, None])
        l_i = l_i * alpha + tl.sum(p, 2)
        if LOWP:
            pv = tl.dot(p.to(tl.float16), v.to(tl.float16))
        else:
            pv = tl.dot(p, v, input_precision="ieee")
        acc = acc * alpha[:, :, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def _paged_attn_fwd_kernel(
        q_ptr, sq_t, sq_h, sq_d, rec_ptr, rec_sb, rec_ss, sink_ptr, sn_b, sn_p, sn_kv, sn_h, sn_d,
        bt_ptr, bt_s, seq_ptr, qsl_ptr, qb_req_ptr, qb_start_ptr, inv_ptr, mean_ptr, cos_ptr, sin_ptr, rope_st,
        km1_ptr, km2_ptr, vf1_ptr, vf2_ptr, pm_ptr, pl_ptr, pacc_ptr,
        qk_scale, k_rot_scale, v_rot_scale, split_size, n_split,
        HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
        QPK: tl.constexpr, M_TOK: tl.constexpr, R_PAD: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
        KB: tl.constexpr,
        K_BITS: tl.constexpr, K_GS: tl.constexpr, K_ALIGNED: tl.constexpr,
        V_BITS: tl.constexpr, V_GS: tl.constexpr, V_ALIGNED: tl.constexpr,
        A_PAD: tl.constexpr, B_PAD: tl.constexpr, TWO_STAGE: tl.constexpr,
        VA_PAD: tl.constexpr, VB_PAD: tl.constexpr, V_TWO_STAGE: tl.constexpr, V_ROT: tl.constexpr,
        SCALE_FP8: tl.constexpr, HAS_PERM: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_ROPE: tl.constexpr,
        S_SINK: tl.constexpr, S_PAD: tl.constexpr, LOWP: tl.constexpr, WIN: tl.constexpr, SW: tl.constexpr,
    ):
        """Partial attention of one query block x rotation block x context split (see the module docstring)."""
        N: tl.constexpr = H * D
        RW: tl.constexpr = G * D
        F: tl.constexpr = G_PAD * D
        HALF: tl.constexpr = D // 2
        qb = tl.program_id(0)
        nb = tl.program_id(1)
        sp = tl.program_id(2)
        r = tl.load(qb_req_ptr + qb)
        i0 = tl.load(qb_start_ptr + qb)
        q0 = tl.load(qsl_ptr + r).to(tl.int64)
        q_len = tl.load(qsl_ptr + r + 1).to(tl.int32) - q0.to(tl.int32)
        seq_len = tl.load(seq_ptr + r).to(tl.int32)
        before = seq_len - q_len
        n_tok = tl.minimum(M_TOK, q_len - i0)
        ctx_end = before + i0 + n_tok
        # With a sliding window the block's context starts at its first query's window: no earlier position is
        # read (its block may be vLLM's null block).
        ctx_start = 0
        if SW > 0:
            ctx_start = tl.maximum(before + i0 - SW + 1, 0)
        lo = ctx_start + sp * split_size
        hi = tl.minimum(lo + split_size, ctx_end)

        # Rows of each KV head: (query token mt, query head j of its GQA group).
        rows = tl.arange(0, R_PAD)
        mt = rows // QPK
        j = rows % QPK
        row_valid = (rows < M_TOK * QPK) & (mt < n_tok)
        row_pos = before + i0 + mt
        tok = q0 + (i0 + mt).to(tl.int64)
        g = tl.arange(0, G_PAD)
        gv = g < G
        hq = (nb * G + g)[:, None] * QPK + j[None, :]
        qmask = (gv[:, None] & row_valid[None, :])[:, :, None]
        dh = tl.arange(0, HALF)
        qbase = (q_ptr + tok[None, :] * sq_t + hq * sq_h)[:, :, None]
        q1 = tl.load(qbase + dh[None, None, :] * sq_d, mask=qmask, other=0.0).to(tl.float32) * qk_scale
        q2 = tl.load(qbase + (dh + HALF)[None, None, :] * sq_d, mask=qmask, other=0.0).to(tl.float32) * qk_scale
        if LOWP:
            q1 = q1.to(tl.float16)
            q2 = q2.to(tl.float16)

        # Loop invariants: Hadamard factors, inverse permutation, key mean.
        ob = tl.arange(0, B_PAD)
        km1 = tl.load(km1_ptr + ob[:, None] * B_PAD + ob[None, :])
        oa = tl.arange(0, A_PAD)
        km2 = tl.load(km2_ptr + oa[:, None] * A_PAD + oa[None, :])
        if LOWP:
            km1 = km1.to(tl.float16)
            km2 = km2.to(tl.float16)
        pf = tl.arange(0, F)
        P0 = nb * RW
        if HAS_PERM:
            inv = tl.load(inv_ptr + P0 + pf, mask=pf < RW, other=0).to(tl.int32) - P0
            inv = tl.broadcast_to(tl.where(pf < RW, inv, 0)[None, :], (BLOCK_N, F))
        if HAS_MEAN:
            mb = mean_ptr + P0 + g[:, None, None] * D + dh[None, None, :]
            mean1 = tl.load(mb, mask=gv[:, None, None], other=0.0)
            mean2 = tl.load(mb + HALF, mask=gv[:, None, None], other=0.0)
        first_blk = tl.load(bt_ptr + r.to(tl.int64) * bt_s).to(tl.int64)

        m_i = tl.full((G_PAD, R_PAD), -1.0e30, tl.float32)
        l_i = tl.zeros((G_PAD, R_PAD), tl.float32)
        acc = tl.zeros((G_PAD, R_PAD, D), tl.float32)

        if S_SINK > 0:
            if sp == 0:
                # Sinks: full-precision K (post-RoPE, as stored) and V (rotated here into V's stored basis).
                sp_ = tl.arange(0, S_PAD)
                svalid = (sp_ < S_SINK) & (sp_ < ctx_end) & (sp_ >= ctx_start)
                sbase = sink_ptr + first_blk * sn_b + sp_.to(tl.int64) * sn_p
                hoff = (nb * G + g).to(tl.int64) * sn_h
                smask = gv[:, None, None] & svalid[None, :, None]
                ka = sbase[None, :, None] + hoff[:, None, None] + dh[None, None, :] * sn_d
                sk1 = tl.load(ka, mask=smask, other=0.0).to(tl.float32)
                sk2 = tl.load(ka + HALF * sn_d, mask=smask, other=0.0).to(tl.float32)
                dd = tl.arange(0, D)
                sv = tl.load(sbase[None, :, None] + sn_kv + hoff[:, None, None] + dd[None, None, :] * sn_d,
                             mask=smask, other=0.0).to(tl.float32)
                if V_ROT:
                    svr = _hadamard_tile(tl.reshape(sv, (G_PAD * S_PAD, VA_PAD, VB_PAD)), vf1_ptr, vf2_ptr,
                                         G_PAD * S_PAD, VA_PAD, VB_PAD, V_TWO_STAGE) * v_rot_scale
                    sv = tl.reshape(svr, (G_PAD, S_PAD, D))
                m_i, l_i, acc = _attend(q1, q2, sk1, sk2, sv, sp_, svalid, row_pos, m_i, l_i, acc, LOWP, WIN, SW)

        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            kvalid = (pos < hi) & (pos >= S_SINK)
            pblk = tl.load(bt_ptr + r.to(tl.int64) * bt_s + pos // BS, mask=kvalid, other=0).to(tl.int64)
            row_ptr = rec_ptr + pblk * rec_sb + (pos % BS).to(tl.int64) * rec_ss

            # keys: unpack + dequantize (stored order) -> un-permute -> inverse Hadamard -> + mean -> RoPE
            y = _dequant_rows(row_ptr, kvalid, P0, BLOCK_N, F, RW, N, K_GS, K_BITS, SCALE_FP8, K_ALIGNED)
            if LOWP:
                # Scale first (keeps the fp16 intermediates of the two products in range), then cast: the
                # un-permuting gather then moves half the bytes through shared memory.
                y = (y * k_rot_scale).to(tl.float16)
            if HAS_PERM:
                y = tl.gather(y, inv, 1)  # inv maps padding positions to 0: zeroed inside the product below
            k = _hadamard_pre(y, km1, km2, BLOCK_N, A_PAD, B_PAD, TWO_STAGE, LOWP)
            if not LOWP:
                k = k * k_rot_scale
            k = tl.permute(tl.reshape(k, (BLOCK_N, G_PAD, 2, HALF)), (1, 0, 3, 2))
            k1, k2 = tl.split(k)  # [G_PAD, BLOCK_N, HALF]: channels d and d + D/2
            if HAS_MEAN:
                k1 = k1 + mean1
                k2 = k2 + mean2
            if HAS_ROPE:
                pr = (pos.to(tl.int64) * rope_st)[:, None] + dh[None, :]
                pmk = kvalid[:, None]
                c1 = tl.load(cos_ptr + pr, mask=pmk, other=0.0)[None, :, :]
                c2 = tl.load(cos_ptr + pr + HALF, mask=pmk, other=0.0)[None, :, :]
                s1 = tl.load(sin_ptr + pr, mask=pmk, other=0.0)[None, :, :]
                s2 = tl.load(sin_ptr + pr + HALF, mask=pmk, other=0.0)[None, :, :]
                k1, k2 = k1 * c1 - k2 * s1, k2 * c2 + k1 * s2

            # values: dequantize in their rotated basis (the reduce pass rotates the output back)
            v = _dequant_rows(row_ptr + KB, kvalid, P0, BLOCK_N, F, RW, N, V_GS, V_BITS, SCALE_FP8, V_ALIGNED)
            v = tl.permute(tl.reshape(v, (BLOCK_N, G_PAD, D)), (1, 0, 2))
            m_i, l_i, acc = _attend(q1, q2, k1, k2, v, pos, kvalid, row_pos, m_i, l_i, acc, LOWP, WIN, SW)

        # Partials of every (token, head) row of this block for split sp (neutral when the split is empty).
        pidx = (tok[None, :] * HQ + hq) * n_split + sp  # [G_PAD, R_PAD], int64 (tok is)
        pmask = gv[:, None] & row_valid[None, :]
        tl.store(pm_ptr + pidx, m_i, mask=pmask)
        tl.store(pl_ptr + pidx, l_i, mask=pmask)
        dd2 = tl.arange(0, D)
        tl.store(pacc_ptr + pidx[:, :, None] * D + dd2[None, None, :], acc, mask=pmask[:, :, None])

    @triton.jit
    def _paged_reduce_kernel(pm_ptr, pl_ptr, pacc_ptr, out_ptr, so_t, so_h, so_d, vi1_ptr, vi2_ptr, v_rot_scale,
                             n_split, HQ: tl.constexpr, HQ_PAD: tl.constexpr, D: tl.constexpr, VA_PAD: tl.constexpr,
                             VB_PAD: tl.constexpr, V_TWO_STAGE: tl.constexpr, V_ROT: tl.constexpr):
        """Merge the splits of one token's heads, rotate values back, store ``out[t]``."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, HQ_PAD)
        hv = h < HQ
        base = (t * HQ + h) * n_split  # [HQ_PAD] int64
        mx = tl.full((HQ_PAD,), -float("inf"), tl.float32)
        for i in range(n_split):
            mx = tl.maximum(mx, tl.load(pm_ptr + base + i, mask=hv, other=-float("inf")))
        mx = tl.where(hv, mx, 0.0)
        d = tl.arange(0, D)
        den = tl.zeros((HQ_PAD,), tl.float32)
        acc = tl.zeros((HQ_PAD, D), tl.float32)
        for i in range(n_split):
            wi = tl.exp2(tl.load(pm_ptr + base + i, mask=hv, other=-float("inf")) - mx)
            den += wi * tl.load(pl_ptr + base + i, mask=hv, other=0.0)
            ai = tl.load(pacc_ptr + (base + i)[:, None] * D + d[None, :], mask=hv[:, None], other=0.0)
            acc += ai * wi[:, None]
        o = acc / tl.where(den > 0, den, 1.0)[:, None]
        if V_ROT:
            o = tl.reshape(_hadamard_tile(tl.reshape(o, (HQ_PAD, VA_PAD, VB_PAD)), vi1_ptr, vi2_ptr, HQ_PAD, VA_PAD,
                                          VB_PAD, V_TWO_STAGE), (HQ_PAD, D)) * v_rot_scale
        tl.store(out_ptr + t * so_t + h[:, None] * so_h + d[None, :] * so_d, _cast_rne(o, out_ptr.dtype.element_ty),
                 mask=hv[:, None])

    def paged_attention_triton(
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
        precision: str = "fp16",
        plan: PagedAttentionPlan | None = None,
        inv_perm: torch.Tensor | None = None,
        num_warps: int | None = None,
        recent_key: torch.Tensor | None = None,
        recent_value: torch.Tensor | None = None,
        recent_prev: torch.Tensor | None = None,
        **plan_kw,
    ) -> torch.Tensor:
        """Triton :func:`rotkv_paged.paged_attention_ref`: split-K paged attention over the packed cache.

        Extra arguments:
            out: ``[T, Hq, D]`` buffer to write (rows of padding tokens are left untouched); default a new
                zero-filled tensor of ``out_dtype``.
            precision: ``"fp16"`` (tensor-core products, fp32 accumulation) or ``"fp32"`` (see the module
                docstring for what each guarantees).
            plan: a :class:`PagedAttentionPlan` for this step (default: :func:`plan_paged_attention` with
                ``plan_kw``: ``block_n``, ``tokens_per_block``, ``num_splits``, ``target_programs``).
            inv_perm: the inverse of ``key_perm`` (int32/int64 ``[W]``), to skip recomputing it every call.
        Returns:
            ``[T, Hq, D]`` of ``out_dtype`` (default ``query.dtype``).
        Raises:
            ValueError: like the reference, plus the kernel's limits (module docstring) and a bad
                ``precision``/``out``.
        """
        check_paged_attention_args(spec, query, records, block_tables, seq_lens, query_start_loc, sinks, scale,
                                   rope_cos, rope_sin, key_perm, key_mean, out_dtype)
        check_recent_args(spec, recent_key, recent_value, recent_prev, query.shape[0], seq_lens.shape[0],
                          records.device)
        check_attention_limits(spec)
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
        check_launchable(records, "paged_attention_triton")
        t, hq, d = query.shape
        h = spec.num_kv_heads
        out_dtype = out_dtype or query.dtype
        if out is None:
            out = torch.zeros(t, hq, d, dtype=out_dtype, device=query.device)
        elif out.shape != (t, hq, d) or out.dtype != out_dtype or out.device != query.device:
            raise ValueError(f"out: expected {out_dtype} {(t, hq, d)} on {query.device}, got {_desc(out)}")
        if plan is None:
            plan = plan_paged_attention(query_start_loc, seq_lens, spec=spec, num_query_heads=hq,
                                        device=query.device, **plan_kw)
        elif plan_kw:
            raise ValueError(f"pass either plan or planning arguments {sorted(plan_kw)}, not both")
        elif plan.sliding_window != spec.sliding_window:
            raise ValueError(f"plan: made for sliding_window={plan.sliding_window}, the spec has "
                             f"{spec.sliding_window} (plan_paged_attention with this layer's spec)")
        nqb = plan.qb_req.numel()
        if nqb == 0 or plan.num_tokens == 0:
            return out
        dev = records.device
        g = spec.key_rot_width // d
        n_rot = h // g
        kplan = hadamard_plan(spec.key_rot_width)
        km1, km2 = hadamard_operands(spec.key_rot_width, True, dev)
        vplan = hadamard_plan(d)
        vf1, vf2 = hadamard_operands(d, False, dev)
        vi1, vi2 = hadamard_operands(d, True, dev)
        if key_perm is not None and inv_perm is None:
            inv_perm = torch.empty_like(key_perm)
            inv_perm[key_perm] = torch.arange(spec.width, device=dev, dtype=key_perm.dtype)
        qpk = hq // h
        m_tok = plan.tokens_per_block
        r_pad = max(_MIN_DOT, _next_pow2(m_tok * qpk))
        ns = plan.num_splits
        win = spec.recent_window
        ns_all = ns + (1 if win else 0)  # the recent window's partial is one more split, merged by the reduce
        pm = torch.empty(plan.num_tokens, hq, ns_all, dtype=torch.float32, device=dev)
        pl = torch.empty_like(pm)
        pacc = torch.empty(plan.num_tokens, hq, ns_all, d, dtype=torch.float32, device=dev)
        if win:
            _window_partial(query, recent_key, recent_value, recent_prev, query_start_loc, seq_lens, spec, scale,
                            plan.num_tokens, pm[:, :, ns], pl[:, :, ns], pacc[:, :, ns])
        has_rope = rope_cos is not None
        dummy = records
        sn = sinks.stride() if sinks is not None else (0, 0, 0, 0, 0)
        s_sink = spec.sink_tokens if sinks is not None else 0
        if num_warps is None:
            # The accumulator alone is G_PAD * R_PAD * D fp32 values per program (16 K at Llama-3-8B shapes):
            # spread it over 8 warps when it is that large (a lead, not a measurement: no GPU was at hand).
            num_warps = 8 if _next_pow2(g) * r_pad * d >= 8192 else 4
        kw = {"num_warps": num_warps}
        _paged_attn_fwd_kernel[(nqb, n_rot, ns)](
            query, query.stride(0), query.stride(1), query.stride(2), records, records.stride(0),
            records.stride(1), sinks if sinks is not None else dummy, *sn, block_tables, block_tables.stride(0),
            seq_lens, query_start_loc, plan.qb_req, plan.qb_start, inv_perm if inv_perm is not None else dummy,
            key_mean if key_mean is not None else dummy, rope_cos if has_rope else dummy,
            rope_sin if has_rope else dummy, rope_cos.stride(0) if has_rope else 0, km1, km2, vf1, vf2, pm, pl, pacc,
            float(scale) * math.log2(math.e), 1.0 / math.sqrt(spec.key_rot_width), 1.0 / math.sqrt(d),
            plan.split_size, ns_all,
            HQ=hq, H=h, D=d, G=g, G_PAD=_next_pow2(g), QPK=qpk, M_TOK=m_tok, R_PAD=r_pad, BS=records.shape[1],
            BLOCK_N=plan.block_n, KB=spec.key_bytes,
            K_BITS=spec.key_bits, K_GS=spec.key_group_size,
            K_ALIGNED=_aligned(spec.key_group_size, spec.key_rot_width),
            V_BITS=spec.value_bits, V_GS=spec.value_group_size,
            V_ALIGNED=_aligned(spec.value_group_size, spec.key_rot_width),
            A_PAD=kplan.a_pad, B_PAD=kplan.b_pad, TWO_STAGE=kplan.two_stage,
            VA_PAD=vplan.a_pad, VB_PAD=vplan.b_pad, V_TWO_STAGE=vplan.two_stage, V_ROT=spec.value_rot_width != 1,
            SCALE_FP8=spec.scale_format == "fp8", HAS_PERM=key_perm is not None, HAS_MEAN=key_mean is not None,
            HAS_ROPE=has_rope, S_SINK=s_sink, S_PAD=max(_MIN_DOT, _next_pow2(max(s_sink, 1))),
            LOWP=precision == "fp16", WIN=win, SW=spec.sliding_window, **kw,
        )
        _paged_reduce_kernel[(plan.num_tokens,)](
            pm, pl, pacc, out, out.stride(0), out.stride(1), out.stride(2), vi1, vi2, 1.0 / math.sqrt(d), ns_all,
            HQ=hq, HQ_PAD=max(_MIN_DOT, _next_pow2(hq)), D=d, VA_PAD=vplan.a_pad, VB_PAD=vplan.b_pad,
            V_TWO_STAGE=vplan.two_stage, V_ROT=spec.value_rot_width != 1,
        )
        return out

else:

    def paged_write_triton(key, value, slot_mapping, records, *, spec, positions=None, sinks=None, rope_cos=None,
                           rope_sin=None, key_perm=None, key_mean=None) -> None:
        """Stub: Triton is not installed."""
        raise NotImplementedError(
            "paged_write_triton needs Triton, which is not installed: pip install 'rotkv[triton]' or use "
            "rotkv_kernels.rotkv_paged.paged_write_ref"
        )

    def paged_attention_triton(query, records, block_tables, seq_lens, query_start_loc, *, spec, scale, sinks=None,
                               rope_cos=None, rope_sin=None, key_perm=None, key_mean=None, out_dtype=None, out=None,
                               precision="fp16", plan=None, inv_perm=None, num_warps=None, **plan_kw) -> torch.Tensor:
        """Stub: Triton is not installed."""
        raise NotImplementedError(
            "paged_attention_triton needs Triton, which is not installed: pip install 'rotkv[triton]' or use "
            "rotkv_kernels.rotkv_paged.paged_attention_ref"
        )


def _aligned(group_size: int, rot_width: int) -> bool:
    """Groups a power of two that tile a rotation block: one scale load per group in the attention kernel."""
    return group_size & (group_size - 1) == 0 and rot_width % group_size == 0


def _desc(t) -> str:
    return f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def paged_decode_triton(query: torch.Tensor, records: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, *, spec: PagedCacheSpec, scale: float, **kw) -> torch.Tensor:
    """Decode (one query per sequence, ``query [B, Hq, D]``): :func:`paged_attention_triton` with ``q_len = 1``."""
    qsl = torch.arange(seq_lens.shape[0] + 1, device=seq_lens.device, dtype=torch.int32)
    return paged_attention_triton(query, records, block_tables, seq_lens, qsl, spec=spec, scale=scale, **kw)

