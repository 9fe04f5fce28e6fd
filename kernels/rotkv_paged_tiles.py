"""RotateKV paged attention on the CPU: the same records and maths as ``rotkv_paged.paged_attention_ref``,
arranged for a CPU serving many cached tokens per step (what ``rotkv_vllm``'s ``"torch"`` path runs).

The step's requests are grouped into *tiles* (:func:`plan_tiles`: requests of similar lengths, padded to a
common query count ``Q`` and context length ``L`` within a memory budget; :func:`build_tile` turns one group
into index tensors). Per layer each tile is one gather of records over the blocks its sequences use, one
dequantization and one SDPA call (:func:`attend_tiles`). Nothing loops over tokens.

Differences from the reference, all exact in real arithmetic (the results agree to fp32 rounding):

- codes of 2 and 4 bits are turned into floats by one gather from a 256-row byte table
  (:func:`dequantize_records`);
- the inverse permutation and inverse block Hadamard of keys are one fixed matrix per rotation block, a
  GEMM (:class:`KeyDecoder`);
- RoPE is one complex multiply: decoded key channels come out as interleaved ``(i, i + D/2)`` pairs
  (:func:`interleave_order`), and queries are put in the same order, which leaves ``q . k`` unchanged;
- values stay in their rotated basis until after attention: ``sum_j p_j (H^T v_j) = H^T sum_j p_j v_j``, so
  the inverse Hadamard runs once per query instead of once per cached token.

This module imports neither Triton nor vLLM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rotkv_kernels.hadamard import hadamard_transform
from rotkv_kernels.quant import scale_dtypes, unpack_codes
from rotkv_kernels.rotkv_paged import PagedCacheSpec

__all__ = [
    "TILE_CONTEXT_TOKENS",
    "TILE_SCORES",
    "AttentionTile",
    "KeyDecoder",
    "CpuReadTables",
    "dequantize_records",
    "interleave_order",
    "plan_tiles",
    "build_tile",
    "step_tiles",
    "read_tile",
    "attend_tiles",
    "window_in_read_basis",
]

# Memory budgets of one attention tile (elements): gathered context tokens x KV width, and scores.
TILE_CONTEXT_TOKENS = 16384
TILE_SCORES = 1 << 22


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
    n = record.shape[0]
    sd, zd = scale_dtypes(scale_format)
    ng, cb = width // group_size, width * bits // 8
    se = cb + ng * sd.itemsize
    if bits in (2, 4):
        # one gather from a 256-row table turns each byte into its codes as floats: no shifts, masks or casts
        lut = _code_table(bits, record.device)
        codes = lut.index_select(0, record[:, :cb].reshape(-1).to(torch.int32)).view(n, ng, group_size)
    else:
        codes = unpack_codes(record[:, :cb], bits).view(n, ng, group_size).to(torch.float32)
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


@dataclass(frozen=True)
class CpuReadTables:
    """One layer's read tables for :func:`read_tile` (build once per layer with :meth:`build`).

    Attributes:
        spec: the layer's slot layout.
        key_decoder: stored key channels -> pre-RoPE keys in :attr:`channel_order`.
        channel_order: ``int64 [W]`` order of decoded key channels (and of queries, within each head):
            RoPE pairs interleaved when RoPE is applied, else the identity.
        key_mean: ``fp32 [W]`` calibrated pre-RoPE key mean in :attr:`channel_order`, or None.
        rope: ``complex64 [max_position, D / 2]`` ``cos + i sin`` per position and frequency, or None (keys
            stored post-RoPE). Share one tensor between layers (it is large).
    """

    spec: PagedCacheSpec
    key_decoder: KeyDecoder
    channel_order: torch.Tensor
    key_mean: torch.Tensor | None
    rope: torch.Tensor | None

    @classmethod
    def build(cls, spec: PagedCacheSpec, *, key_perm: torch.Tensor | None, key_mean: torch.Tensor | None,
              channel_order: torch.Tensor, rope: torch.Tensor | None) -> "CpuReadTables":
        """``key_perm`` (``int64 [W]``) and ``key_mean`` (``fp32 [W]``) as for ``paged_write_ref``;
        ``channel_order`` from :func:`interleave_order` with RoPE, ``arange(W)`` without."""
        dec = KeyDecoder.build(spec.width, spec.key_rot_width, key_perm, channel_order)
        mean = None if key_mean is None else key_mean[channel_order]
        return cls(spec=spec, key_decoder=dec, channel_order=channel_order, key_mean=mean, rope=rope)

    @staticmethod
    def rope_table(rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        """``complex64 [max_position, D / 2]`` from Hugging Face-convention ``fp32 [max_position, D]`` tables."""
        half = rope_cos.shape[1] // 2
        return torch.complex(rope_cos[:, :half].contiguous(), rope_sin[:, :half].contiguous())


@dataclass
class AttentionTile:
    """A set of requests attended together, padded to ``Q`` queries and ``L`` context positions.

    Attributes:
        tok_idx: ``int64 [G, Q]`` index of each query in the step's token array (0 where padded).
        q_valid: ``bool [G, Q]``.
        ctx_blk / ctx_off: ``int64 [G, L]`` block id and offset of context column ``j`` (0 where padded).
        ctx_valid: ``bool [G, L]`` column ``j`` holds a position before the end of the tile's context.
        mask: ``bool [G, 1, Q, L]``: query attends key (causal, inside its sliding window and valid; padded
            queries see key 0).
        first_blk: ``int64 [G]`` the block holding each request's first positions (its sink area).
        q_pos: ``int64 [G, Q]`` position of each query in its sequence (for the recent window's band).
        ctx_start: with a sliding window, ``int64 [G]``: column ``j`` is position ``ctx_start + j`` (the window
            start of the tile's first query: earlier positions, whose blocks may be vLLM's null block, are not
            gathered); None: column ``j`` is position ``j``.
        sliding_window: the window the mask was built for (0: none); ``attend_tiles`` checks it against the spec.
    """

    tok_idx: torch.Tensor
    q_valid: torch.Tensor
    ctx_blk: torch.Tensor
    ctx_off: torch.Tensor
    ctx_valid: torch.Tensor
    mask: torch.Tensor
    first_blk: torch.Tensor
    q_pos: torch.Tensor | None = None
    ctx_start: torch.Tensor | None = None
    sliding_window: int = 0

    @property
    def length(self) -> int:
        return self.ctx_blk.shape[1]

    @property
    def ctx_pos(self) -> torch.Tensor:
        """``int64 [G, L]`` (or ``[1, L]`` without a sliding window): the position of each context column."""
        cols = torch.arange(self.length).unsqueeze(0)
        return cols if self.ctx_start is None else self.ctx_start.unsqueeze(1) + cols


def plan_tiles(q_lens: list[int], seq_lens: list[int], *, context_budget: int = TILE_CONTEXT_TOKENS,
               score_budget: int = TILE_SCORES, sliding_window: int = 0) -> list[tuple[list[int], int, int]]:
    """Group requests into tiles ``(request ids, q_lo, q_hi)``.

    Requests are sorted by (query length, sequence length) and packed greedily while
    ``G * L <= context_budget`` and ``G * Q * L <= score_budget`` (``G`` requests, ``Q`` padded query
    rows, ``L`` padded context). A request too large alone is split into query ranges ``[q_lo, q_hi)``
    (its queries beyond ``q_lo`` only, context up to the range's last position). With a sliding window ``SW``
    a request's context is at most ``q + SW - 1`` positions (:func:`build_tile` gathers no earlier ones).
    """
    if sliding_window:
        seq_lens = [min(s, q + sliding_window - 1) for q, s in zip(q_lens, seq_lens)]
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


def build_tile(reqs: torch.Tensor, q_lo: int, q_hi: int, query_start_loc: torch.Tensor, q_lens: torch.Tensor,
               seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int, sliding_window: int = 0
               ) -> AttentionTile:
    """The index tensors of one planned tile (``reqs`` ``int64 [G]``; the other tensors int64 on the CPU:
    ``query_start_loc [R + 1]``, ``q_lens [R]``, ``seq_lens [R]`` new tokens included, ``block_table
    [R, max_blocks]``). With ``sliding_window = SW > 0`` query ``t`` attends keys ``t - SW < j <= t`` and the
    tile's context starts at its first query's window (``AttentionTile.ctx_start``)."""
    before = seq_lens - q_lens
    n_q = q_hi - q_lo
    qi = torch.arange(n_q)
    q_valid = qi.unsqueeze(0) < (q_lens[reqs] - q_lo).unsqueeze(1)
    tok_idx = torch.where(q_valid, query_start_loc[reqs].unsqueeze(1) + q_lo + qi, 0)
    q_pos = before[reqs].unsqueeze(1) + q_lo + qi  # [G, Q]
    # Context needed: up to the last query's position (the whole sequence unless split), from the first query's
    # window start with a sliding window.
    ctx_end = torch.minimum(seq_lens[reqs], before[reqs] + q_hi)
    start = (before[reqs] + q_lo - sliding_window + 1).clamp(min=0) if sliding_window else None
    length = int((ctx_end if start is None else ctx_end - start).max())
    cols = torch.arange(length)
    kpos = cols.unsqueeze(0) if start is None else start.unsqueeze(1) + cols  # [G or 1, L] positions
    ctx_valid = kpos < ctx_end.unsqueeze(1)
    blk_col = (kpos // block_size).expand(len(reqs), -1)
    ctx_blk = torch.where(ctx_valid, block_table[reqs].gather(1, blk_col.clamp(max=block_table.shape[1] - 1)), 0)
    ctx_off = torch.where(ctx_valid, kpos % block_size, 0)
    mask = (kpos.unsqueeze(1) <= q_pos.unsqueeze(2)) & ctx_valid.unsqueeze(1) & q_valid.unsqueeze(2)
    if sliding_window:
        mask &= kpos.unsqueeze(1) > (q_pos - sliding_window).unsqueeze(2)
    # A padded query row attends key 0 only, so no row is all -inf (NaN-free softmax).
    mask |= (~q_valid).unsqueeze(2) & (cols == 0).view(1, 1, -1)
    return AttentionTile(tok_idx=tok_idx, q_valid=q_valid, ctx_blk=ctx_blk, ctx_off=ctx_off,
                         ctx_valid=ctx_valid, mask=mask.unsqueeze(1), first_blk=block_table[reqs, 0], q_pos=q_pos,
                         ctx_start=start, sliding_window=sliding_window)


def step_tiles(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int,
               sliding_window: int = 0) -> list[AttentionTile]:
    """Every tile of one step: :func:`plan_tiles` over the step's query and sequence lengths, then
    :func:`build_tile` for each (``query_start_loc [R + 1]``, ``seq_lens [R]``, ``block_table [R, max_blocks]``,
    int64 on the CPU)."""
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    return [build_tile(torch.tensor(reqs), q_lo, q_hi, query_start_loc, q_lens, seq_lens, block_table, block_size,
                       sliding_window=sliding_window)
            for reqs, q_lo, q_hi in plan_tiles(q_lens.tolist(), seq_lens.tolist(), sliding_window=sliding_window)]


def read_tile(records: torch.Tensor, sinks: torch.Tensor | None, tile: AttentionTile, tables: CpuReadTables
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized context of a tile, ``fp32 [G, L, H, D]`` each, zero where invalid: K with RoPE applied,
    channels in ``tables.channel_order`` within each head; V in its stored (rotated) basis.

    ``records`` ``uint8 [num_blocks, block_size, C]`` and ``sinks`` ``[num_blocks, S + R - 1, 2, H, D]`` (or None)
    are the views of ``rotkv_paged.paged_cache_views``; sink positions read their full-precision K/V.
    """
    spec = tables.spec
    g, length = tile.ctx_blk.shape
    h, d, w = spec.num_kv_heads, spec.head_dim, spec.width
    rec = records[tile.ctx_blk, tile.ctx_off].reshape(g * length, -1)
    valid = tile.ctx_valid.reshape(-1)
    y = dequantize_records(rec[:, : spec.key_bytes], spec.key_bits, w, spec.key_group_size, spec.scale_format, valid)
    k = tables.key_decoder(y)
    if tables.key_mean is not None:
        k = k + tables.key_mean
    k = k.view(g, length, h, d)
    if tables.rope is not None:
        kc = torch.view_as_complex(k.view(g, length, h, d // 2, 2))
        if tile.ctx_start is None:
            rope = tables.rope[:length].view(1, length, 1, d // 2)
        else:  # columns past the context clamp to a valid row (their keys are exact zeros)
            rope = tables.rope[tile.ctx_pos.clamp(max=tables.rope.shape[0] - 1)].view(g, length, 1, d // 2)
        k = torch.view_as_real(kc * rope).view(g, length, h, d)
    vrec = rec[:, spec.key_bytes: spec.key_bytes + spec.value_bytes]
    v = dequantize_records(vrec, spec.value_bits, w, spec.value_group_size, spec.scale_format, valid)
    v = v.view(g, length, h, d)
    if spec.sink_tokens:
        s = min(spec.sink_tokens, length)
        if tile.ctx_start is None:
            full = sinks[tile.first_blk, :s]
            keep = tile.ctx_valid[:, :s, None, None]
        else:
            # sink positions start .. S - 1 sit in the first columns; a request whose window has left the sinks
            # keeps none (its first block may be the null block: its bytes are read but never selected)
            pos = tile.ctx_pos[:, :s]
            full = sinks[tile.first_blk.unsqueeze(1), pos.clamp(max=spec.sink_tokens - 1)]
            keep = (tile.ctx_valid[:, :s] & (pos < spec.sink_tokens))[:, :, None, None]
        full = full.to(torch.float32)  # [G, s, 2, H, D], K post-RoPE, V original
        sk = full[:, :, 0].reshape(g, s, w)[..., tables.channel_order].view(g, s, h, d)
        sv = full[:, :, 1]
        if spec.value_rot_width > 1:
            sv = hadamard_transform(sv, block_size=spec.value_rot_width)
        k[:, :s] = torch.where(keep, sk, k[:, :s])
        v[:, :s] = torch.where(keep, sv, v[:, :s])
    return k, v


def window_in_read_basis(kv: torch.Tensor, tables: CpuReadTables) -> tuple[torch.Tensor, torch.Tensor]:
    """The recent window ``kv [T, R, 2, H, D]`` (``rotkv_paged.recent_window_kv``) in :func:`read_tile`'s bases:
    K channels in ``tables.channel_order`` within each head, V rotated like the stored values."""
    spec = tables.spec
    t, r, _, h, d = kv.shape
    wk = kv[:, :, 0].reshape(t, r, h * d)[..., tables.channel_order].view(t, r, h, d)
    wv = kv[:, :, 1]
    if spec.value_rot_width > 1:
        wv = hadamard_transform(wv, block_size=spec.value_rot_width)
    return wk, wv


def _attend_with_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: AttentionTile, wk: torch.Tensor,
                        wv: torch.Tensor, wvalid: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention whose last ``R`` keys per query are read in full precision: the packed context up to position
    ``pos - R`` and the window's ``R`` keys share one softmax. ``q [G, Hq, Q, D]``, ``k/v [G, L, H, D]``,
    ``wk/wv [G, Q, R, H, D]``, ``wvalid bool [G, Q, R]`` -> ``[G, Hq, Q, D]``."""
    g, hq, nq, d = q.shape
    h, r = k.shape[2], wk.shape[2]
    rep = hq // h
    # Packed keys older than the window; a padded query keeps its key 0 (no all -inf row).
    older = (tile.ctx_pos.unsqueeze(1) <= (tile.q_pos - r).unsqueeze(2)) | ~tile.q_valid.unsqueeze(2)
    mask = tile.mask & older.unsqueeze(1)  # [G, 1, Q, L]
    kk = k.repeat_interleave(rep, dim=2).permute(0, 2, 3, 1)  # [G, Hq, D, L]
    s = (q @ kk) * scale
    s = s.masked_fill(~mask, float("-inf"))
    wkk = wk.repeat_interleave(rep, dim=3).permute(0, 3, 1, 2, 4)  # [G, Hq, Q, R, D]
    ws = (wkk @ q.unsqueeze(-1)).squeeze(-1) * scale  # [G, Hq, Q, R]
    ws = ws.masked_fill(~wvalid.unsqueeze(1), float("-inf"))
    p = torch.cat((s, ws), dim=-1).softmax(-1)
    o = p[..., : s.shape[-1]] @ v.repeat_interleave(rep, dim=2).transpose(1, 2)
    wvv = wv.repeat_interleave(rep, dim=3).permute(0, 3, 1, 2, 4)  # [G, Hq, Q, R, D]
    return o + (p[..., s.shape[-1]:].unsqueeze(-2) @ wvv).squeeze(-2)


def attend_tiles(query: torch.Tensor, records: torch.Tensor, sinks: torch.Tensor | None,
                 tiles: list[AttentionTile], tables: CpuReadTables, *, scale: float, output: torch.Tensor,
                 recent: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``output[t] = softmax(q_t K^T * scale) V`` over each query's causal context, tile by tile.

    Args:
        query: ``[T, Hq, D]`` post-RoPE, ``Hq`` a multiple of ``H`` (GQA).
        records, sinks: the cache views (as in :func:`read_tile`).
        tiles: the step's tiles (:func:`plan_tiles`, :func:`build_tile`).
        output: ``[>= T, Hq, D]``, written in the rows of valid queries only.
        recent: with a recent window (``spec.recent_window = R > 0``), ``(kv [T, R, 2, H, D], valid [T, R])``
            from ``rotkv_paged.recent_window_kv``: key ``j`` of query ``t`` is read from it when
            ``pos_t - R < j <= pos_t`` (as ``rotkv_paged.paged_attention_ref``).
    Raises:
        ValueError: ``recent`` missing with a window, or given without one; a tile built for another sliding
            window than ``spec.sliding_window``.
    """
    spec = tables.spec
    for tile in tiles:
        if tile.sliding_window != spec.sliding_window:
            raise ValueError(f"tiles: built for sliding_window={tile.sliding_window}, the layer's spec has "
                             f"{spec.sliding_window} (build_tile(..., sliding_window=spec.sliding_window))")
    d, hq = spec.head_dim, query.shape[1]
    if (recent is None) != (spec.recent_window == 0):
        raise ValueError(f"recent: recent_window={spec.recent_window} needs the step's window (recent_window_kv), "
                         "and no window takes none")
    if recent is not None:
        wk_all, wv_all = window_in_read_basis(recent[0], tables)
    q_order = tables.channel_order[:d]  # the same order within every head
    for tile in tiles:
        k, v = read_tile(records, sinks, tile, tables)
        q = query[tile.tok_idx].to(torch.float32)[..., q_order].transpose(1, 2)  # [G, Hq, Q, D]
        if recent is not None:
            wvalid = recent[1][tile.tok_idx] & tile.q_valid.unsqueeze(2)
            o = _attend_with_window(q, k, v, tile, wk_all[tile.tok_idx], wv_all[tile.tok_idx], wvalid, scale)
        else:
            o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=tile.mask,
                                               scale=scale, enable_gqa=hq != spec.num_kv_heads)
        o = o.transpose(1, 2)[tile.q_valid]  # [n, Hq, D], still in V's rotated basis
        if spec.value_rot_width > 1:
            o = hadamard_transform(o, block_size=spec.value_rot_width, inverse=True)
        output[tile.tok_idx[tile.q_valid]] = o.to(output.dtype)
