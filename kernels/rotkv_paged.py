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
    if R > 1: sinks[blk, S + off % (R - 1)] = (key[t], value[t])         (ring; the last writer of a ring slot in
              the step wins: ring_write_mask)

Attention (request ``r`` owns query tokens ``query_start_loc[r] .. query_start_loc[r+1]-1``; it has
``L = seq_lens[r]`` cached tokens including its new ones, so query ``i`` sits at position
``L - q_len + i`` and attends to positions ``0 .. its own``, or with ``spec.sliding_window = SW`` to
``its own - SW + 1 .. its own``)::

    K_j = RoPE_j(read(K record of position j) + key_mean)      V_j = read(V record of position j)
    K_j, V_j = sinks[block_tables[r, 0], j]                       for j < S (full precision)
    K_j, V_j = the step's own key/value of position j              for j > pos - R, j in the step  (recent window)
             = recent_prev[r, j - (L - q_len) + R - 1]             for j > pos - R, j before the step
    out[t, h] = softmax_j(scale * q[t, h] . K_j[h // (Hq / H)]) V_j[h // (Hq / H)]

The recent window ``R = spec.recent_window`` (each query reads its last ``R`` keys, itself included, in full
precision) takes the step's own tokens from the step's K/V and the ``R - 1`` positions before the step from
the rings: ``recent_prev_ref`` gathers them, from a copy taken before the step's write for the positions that
share a block with the step's first token (the step's own ring writes may overwrite them) and after the write
for older blocks (a block another request of the same step fills, reached through prefix caching).

Decode is the case ``q_len = 1``; chunked prefill reads the earlier chunks from the packed cache like any
other cached token (and the current chunk too: it was written before the read, as in the vLLM backend).
"""

from __future__ import annotations

import torch

from rotkv_kernels.rotkv_cache import apply_rope, rotate_half, rotkv_read_ref, rotkv_write_ref, use_triton
from rotkv_kernels.rotkv_layout import (  # the layout's public names are re-exported here
    PAGED_SPEC_VERSION,
    PagedCache,
    PagedCacheSpec,
    alloc_paged_cache,
    check_paged_attention_args,
    check_paged_write_args,
    check_recent_args,
    paged_cache_views,
    recent_window_kv,
    token_positions,
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
    "ring_write_mask",
    "ring_write_ref",
    "recent_prev_ref",
    "recent_window_kv",
    "token_positions",
    "paged_write",
    "paged_attention",
]

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
        sinks: ``[num_blocks, S + R - 1, 2, H, D]`` (``spec.fp_slots > 0``): tokens at positions ``< S`` also
            store their K (as given) and V there, cast to its dtype; with a recent window ``R > 1`` every token
            also stores them in ring slot ``S + off % (R - 1)`` of its page (:func:`ring_write_mask` says which
            token of the step writes a slot that several would).
        rope_cos, rope_sin: fp32 ``[max_position, D]`` Hugging Face-convention tables, or None.
        key_perm: int64 ``[W]`` calibrated channel order of keys (block-preserving), or None.
        key_mean: fp32 ``[W]`` calibrated pre-RoPE key mean (subtracted before encoding), or None.
    Raises:
        ValueError: any argument that does not fit the spec (see the messages).
    """
    check_paged_write_args(spec, key, value, slot_mapping, positions, records, sinks, rope_cos, rope_sin, key_perm,
                           key_mean)
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
    if spec.ring_slots:
        ring_write_ref(key, value, slot_mapping, sinks, spec=spec, block_size=bs)


def ring_write_ref(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, sinks: torch.Tensor, *,
                   spec: PagedCacheSpec, block_size: int) -> None:
    """The recent window's part of the write: each token's K (as given) and V into ring slot
    ``S + off % (R - 1)`` of its page, for the tokens :func:`ring_write_mask` selects (in place; a no-op
    without ring slots). ``paged_write_ref`` calls it; so do kernels that write only the records."""
    n = spec.ring_slots
    if n == 0:
        return
    last = ring_write_mask(slot_mapping, block_size, n).nonzero().squeeze(1)
    if last.numel() == 0:
        return
    slots = slot_mapping[last].to(torch.int64)
    kv = torch.stack((key[last], value[last]), dim=1).to(sinks.dtype)
    sinks[slots // block_size, spec.sink_tokens + (slots % block_size) % n] = kv


def ring_write_mask(slot_mapping: torch.Tensor, block_size: int, ring_slots: int) -> torch.Tensor:
    """``bool [T]``: the tokens whose K/V a step writes into their page's ring (the last writer of each slot).

    Token ``t`` (slot ``s``, in-block offset ``o``) shares ring slot ``o % n`` (``n = ring_slots``) with the
    token ``n`` positions later in its block; a request's tokens are consecutive in the step with consecutive
    slots, so that token, if this step writes it, is token ``t + n`` at slot ``s + n``. ``t`` writes unless it
    is there: an order-free rule that every implementation evaluates per token.
    """
    t = slot_mapping.shape[0]
    s = slot_mapping.to(torch.int64)
    later = torch.full_like(s, -1)
    if t > ring_slots:
        later[: t - ring_slots] = s[ring_slots:]
    overwritten = (later == s + ring_slots) & (s % block_size + ring_slots < block_size)
    return (s >= 0) & ~overwritten


def _prev_positions(seq_lens: torch.Tensor, query_start_loc: torch.Tensor, n: int) -> torch.Tensor:
    """``int64 [R_req, n]``: positions ``p0 - n .. p0 - 1`` before each request's step (``p0 = L - q_len``)."""
    seq = seq_lens.to(torch.int64)
    qsl = query_start_loc.to(torch.int64)
    p0 = seq - (qsl[1:] - qsl[:-1])
    return p0.unsqueeze(1) - n + torch.arange(n, device=seq.device)


def recent_prev_ref(
    sinks: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    *,
    spec: PagedCacheSpec,
    block_size: int,
    before: torch.Tensor | None = None,
) -> torch.Tensor:
    """The full-precision K/V of the ``R - 1`` positions before each request's step, from the rings.

    Call it twice around the step's write: ``before = recent_prev_ref(...)`` before the write, then
    ``recent_prev_ref(..., before=before)`` after it. The positions in the block of the step's first token come
    from ``before`` (the step's own ring writes may have replaced them), older blocks from the cache as it is
    after the write (another request of the step may have just filled them: prefix caching shares a block as soon
    as it is scheduled). Pure tensor indexing, no host synchronization (any device).

    Args:
        sinks: ``[num_blocks, S + R - 1, 2, H, D]`` (the full-precision area, ``paged_cache_views``).
        block_tables, seq_lens, query_start_loc: as for :func:`paged_attention_ref` (``R_req`` requests).
        block_size: tokens per page.
        before: a previous result of this function for the same step, or None.
    Returns:
        ``[R_req, R - 1, 2, H, D]`` in ``sinks.dtype``; entry ``j`` is position ``L - q_len - (R - 1) + j``
        (K post-RoPE as given, V), zeros for negative positions.
    """
    n, bs = spec.ring_slots, block_size
    r = seq_lens.shape[0]
    pos = _prev_positions(seq_lens, query_start_loc, n)  # [R_req, n]
    valid = pos >= 0
    p = pos.clamp(min=0)
    blk = block_tables[:r].to(torch.int64).gather(1, (p // bs).clamp(max=block_tables.shape[1] - 1))
    out = sinks[blk, spec.sink_tokens + (p % bs) % n]  # [R_req, n, 2, H, D]
    out = torch.where(valid[..., None, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    if before is not None:
        p0 = pos[:, -1:] + 1
        own = (p // bs) == (p0 // bs)
        out = torch.where(own[..., None, None, None], before, out)
    return out


def _decode_context(spec: PagedCacheSpec, records, sinks, table_row, length, rope_cos, rope_sin, key_perm,
                    key_mean, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[L - start, H, D]`` K (post-RoPE) and V of positions ``start..L-1`` of one sequence, sinks
    substituted. Positions before ``start`` (out of every query's sliding window) are never read: their blocks
    may be vLLM's null block."""
    h, d = spec.num_kv_heads, spec.head_dim
    bs = records.shape[1]
    pos = torch.arange(start, length, device=records.device)
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
    if n_sink > start:
        full = sinks[int(table_row[0]), start:n_sink].to(torch.float32)
        k[: n_sink - start] = full[:, 0]
        v[: n_sink - start] = full[:, 1]
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
    recent_key: torch.Tensor | None = None,
    recent_value: torch.Tensor | None = None,
    recent_prev: torch.Tensor | None = None,
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
        recent_key, recent_value: with ``spec.recent_window = R > 0``, the step's own K (post-RoPE, as given
            to the write) and V, ``[>= T, H, D]``: each query reads the keys of its last ``R`` positions in this
            step from them.
        recent_prev: with ``R > 1``, ``[R_req, R - 1, 2, H, D]`` from :func:`recent_prev_ref`: the K/V of the
            ``R - 1`` positions before each request's step.
    Returns:
        ``[T, Hq, D]``: each key decoded by ``rotkv_read_ref`` (fp32), sinks and the recent window in full
        precision (the window per query: score and value of key ``j`` of query ``t`` are full precision when
        ``t - R < j <= t``), the softmax and
        the weighted sum in float64, one rounding to ``out_dtype`` at the end; zeros for padding tokens. With
        ``spec.sliding_window = SW > 0`` query ``t`` attends keys ``t - SW < j <= t`` only, and positions before
        the first query's window are not read at all.
    Raises:
        ValueError: any argument that does not fit (see the messages).
    """
    check_paged_attention_args(spec, query, records, block_tables, seq_lens, query_start_loc, sinks, scale, rope_cos,
                               rope_sin, key_perm, key_mean, out_dtype)
    check_recent_args(spec, recent_key, recent_value, recent_prev, query.shape[0], seq_lens.shape[0],
                      records.device)
    win = spec.recent_window
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
        p0 = length - n_q
        # the first position any query of the request attends (its first query's window start)
        lo = max(0, p0 - spec.sliding_window + 1) if spec.sliding_window else 0
        k, v = _decode_context(spec, records, sinks, block_tables[r], length, rope_cos, rope_sin, key_perm,
                               key_mean, lo)
        k = k.double().repeat_interleave(rep, dim=1)  # [L - lo, Hq, D]
        v = v.double().repeat_interleave(rep, dim=1)
        q = query[q_lo:q_hi].double()  # [n_q, Hq, D]
        s = torch.einsum("qhd,lhd->hql", q, k) * scale
        q_pos = torch.arange(p0, length, device=query.device)
        kpos = torch.arange(lo, length, device=query.device)
        causal = kpos[None, :] <= q_pos[:, None]  # [n_q, L - lo]
        if spec.sliding_window:
            causal &= kpos[None, :] > q_pos[:, None] - spec.sliding_window
        if win:
            # The full-precision keys of positions p0 - (R - 1) .. L - 1: before the step, then the step's own
            # (all at or after lo: the sliding window is at least R long).
            k_fp, v_fp = k.clone(), v.clone()
            k_fp[p0 - lo:] = recent_key[q_lo:q_hi].double().repeat_interleave(rep, dim=1)
            v_fp[p0 - lo:] = recent_value[q_lo:q_hi].double().repeat_interleave(rep, dim=1)
            n_prev = min(win - 1, p0)
            if n_prev:
                prev = recent_prev[r, win - 1 - n_prev:].double()  # positions p0 - n_prev .. p0 - 1
                k_fp[p0 - n_prev - lo: p0 - lo] = prev[:, 0].repeat_interleave(rep, dim=1)
                v_fp[p0 - n_prev - lo: p0 - lo] = prev[:, 1].repeat_interleave(rep, dim=1)
            band = causal & (kpos[None, :] > q_pos[:, None] - win)  # [n_q, L]
            s = torch.where(band, torch.einsum("qhd,lhd->hql", q, k_fp) * scale, s)
            p = s.masked_fill(~causal, float("-inf")).softmax(-1)
            out[q_lo:q_hi] = torch.einsum("hql,lhd->qhd", p * ~band, v) + torch.einsum("hql,lhd->qhd", p * band, v_fp)
            continue
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
