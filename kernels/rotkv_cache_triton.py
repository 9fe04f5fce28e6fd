"""Fused RotateKV cache kernels in Triton: one write kernel and one read kernel.

Entry points :func:`rotkv_write_triton` / :func:`rotkv_read_triton`, same contract as
``rotkv_cache.rotkv_write_ref`` / ``rotkv_read_ref`` (the dispatching ``rotkv_write``/``rotkv_read`` call
these on CUDA, or on the CPU under ``TRITON_INTERPRET=1``).

Write, one program per tile of ``BLOCK_T`` tokens (all ``H*D`` channels of each):

1. load ``x[t, h, d]`` (any strides) into a ``[BLOCK_T * nb, a_pad, b_pad]`` fp32 tile, one row per
   rotation block (``nb = H*D / rot_width`` blocks of ``rot_width = a*b`` channels);
2. block Hadamard by two ``tl.dot`` (``hadamard_triton._hadamard_tile``: ``A X B^T``), times ``1/sqrt(rw)``;
3. permute and regroup in registers with one ``tl.gather``: output position ``p = k*group_size + e`` takes
   channel ``perm[p]`` (or ``p``), giving a ``[BLOCK_T, groups, group_size]`` tile;
4. group min/max quantization (``quant_triton._quantize_groups``) and packed byte stores of codes, scales
   and zeros straight into the records.

Read, one program per tile of tokens: for each channel ``c`` (in the rotation tile's layout) it loads the
code at position ``inv_perm[c]`` and that group's scale and zero by address (un-permuting costs no
register shuffle), dequantizes, applies the inverse block Hadamard (two ``tl.dot``), then RoPE with the
``rotate_half`` partner taken by one ``tl.gather``, and stores ``[T, H, D]``.

Exactness against the reference (``TRITON_INTERPRET=1`` tests):

- quantization, packing, scales, zeros and dequantization are bit-identical for identical rotated values
  (``quant_triton`` explains how);
- the rotation sums in a different order than the reference's butterflies, so rotated values can differ
  by a few fp32 ulps. A code then differs only where ``y / s`` sits within that distance of a rounding
  boundary (.5), or where a group's max/min moves its fp16/fp8 scale across a rounding boundary; both
  are rare and bounded in the tests. With inputs whose sums are exact in fp32 (e.g. dyadic values with
  few significant bits) the records are bit-identical;
- the read output differs from the reference by the fp32 rounding of the two inverse rotations (bounded
  by ``gamma_k * ||y||_1 / sqrt(rw)`` per element) and the RoPE multiply-adds.
"""

from __future__ import annotations

import math

import torch

from rotkv_kernels.hadamard_triton import (
    _next_pow2,
    _tokens_per_program,
    check_launchable,
    hadamard_operands,
    hadamard_plan,
)
from rotkv_kernels.quant_triton import check_triton_group_size
from rotkv_kernels.rotkv_layout import check_record_read_args, check_record_write_args, record_bytes

try:  # Triton is optional: the module must import without it (the stubs below raise instead).
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by tests/kernels/test_import_guard.py in a subprocess
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "rotkv_write_triton", "rotkv_read_triton"]


class _Layout:
    """Static tile sizes of one (width, rot_width, group_size) layout."""

    def __init__(self, width: int, rot_width: int, group_size: int) -> None:
        plan = hadamard_plan(rot_width)
        self.plan = plan
        self.nb = width // rot_width
        self.nb_pad = _next_pow2(self.nb)
        self.groups = width // group_size
        self.g_pad = _next_pow2(self.groups)
        self.gs_pad = max(8, _next_pow2(group_size))
        rot_tile = self.nb_pad * plan.a_pad * plan.b_pad
        quant_tile = self.g_pad * self.gs_pad
        self.block_t = _tokens_per_program(max(rot_tile, quant_tile), self.nb_pad * plan.a_pad)


if HAS_TRITON:
    from rotkv_kernels.hadamard_triton import _cast_rne, _hadamard_tile
    from rotkv_kernels.quant_triton import (
        _load_codes,
        _load_scale_zero,
        _quantize_groups,
        _store_le,
        _store_packed,
    )

    @triton.jit
    def _tile_channels(pid, n_tokens, BLOCK_T: tl.constexpr, NB: tl.constexpr, NB_PAD: tl.constexpr,
                       RW: tl.constexpr, A: tl.constexpr, B: tl.constexpr, A_PAD: tl.constexpr,
                       B_PAD: tl.constexpr):
        """Token index ``[ROWS]``, channel ``[ROWS, A_PAD, B_PAD]`` and validity of a rotation tile."""
        row = tl.arange(0, BLOCK_T * NB_PAD)
        tok = pid * BLOCK_T + row // NB_PAD
        blk = row % NB_PAD
        i = tl.arange(0, A_PAD)
        j = tl.arange(0, B_PAD)
        c = blk[:, None, None] * RW + i[None, :, None] * B + j[None, None, :]
        valid = ((tok < n_tokens) & (blk < NB))[:, None, None] & (i[None, :, None] < A) & (j[None, None, :] < B)
        return tok, c, valid

    @triton.jit
    def _flat_pos(c, RW: tl.constexpr, B: tl.constexpr, A_PAD: tl.constexpr, B_PAD: tl.constexpr):
        """Position of channel ``c`` inside one token's flattened ``[NB_PAD, A_PAD, B_PAD]`` rotation tile."""
        r = c % RW
        return ((c // RW) * A_PAD + r // B) * B_PAD + r % B

    @triton.jit
    def _rotkv_write_fwd_kernel(
        x_ptr, sx_t, sx_h, sx_d, perm_ptr, rec_ptr, rec_stride, m1_ptr, m2_ptr, n_tokens, rot_scale, clip, eps,
        H: tl.constexpr, D: tl.constexpr, RW: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
        A_PAD: tl.constexpr, B_PAD: tl.constexpr, NB_PAD: tl.constexpr, GS: tl.constexpr, G_PAD: tl.constexpr,
        GS_PAD: tl.constexpr, BITS: tl.constexpr, SCALE_FP8: tl.constexpr, HAS_PERM: tl.constexpr,
        TWO_STAGE: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Rotate + permute + quantize + pack ``BLOCK_T`` tokens into their records."""
        N: tl.constexpr = H * D
        NB: tl.constexpr = N // RW
        G: tl.constexpr = N // GS
        SB: tl.constexpr = 1 if SCALE_FP8 else 2
        CB: tl.constexpr = N * BITS // 8
        NF: tl.constexpr = NB_PAD * A_PAD * B_PAD
        ROWS: tl.constexpr = BLOCK_T * NB_PAD
        pid = tl.program_id(0)

        tok, c, valid = _tile_channels(pid, n_tokens, BLOCK_T, NB, NB_PAD, RW, A, B, A_PAD, B_PAD)
        x_off = tok.to(tl.int64)[:, None, None] * sx_t + (c // D) * sx_h + (c % D) * sx_d
        x = tl.load(x_ptr + x_off, mask=valid, other=0.0).to(tl.float32)
        y = _hadamard_tile(x, m1_ptr, m2_ptr, ROWS, A_PAD, B_PAD, TWO_STAGE) * rot_scale

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

        t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        tvalid = t < n_tokens
        qvalid = tvalid[:, None, None] & pvalid[None, :, :]
        q, s_bits, z_bits = _quantize_groups(yq, qvalid, clip, eps, (1 << BITS) - 1, SCALE_FP8)
        row_ptr = rec_ptr + t.to(tl.int64) * rec_stride
        _store_packed(q, row_ptr, tvalid, GS, G, BLOCK_T, G_PAD, GS_PAD, BITS)
        _store_le(s_bits, row_ptr + CB, tvalid, G, G_PAD, SB)
        _store_le(z_bits, row_ptr + CB + G * SB, tvalid, G, G_PAD, SB)

    @triton.jit
    def _rotkv_read_fwd_kernel(
        rec_ptr, rec_stride, inv_ptr, cos_ptr, sin_ptr, cos_st, cos_sd, sin_st, sin_sd, out_ptr, m1_ptr, m2_ptr,
        n_tokens, rot_scale,
        H: tl.constexpr, D: tl.constexpr, RW: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
        A_PAD: tl.constexpr, B_PAD: tl.constexpr, NB_PAD: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr,
        SCALE_FP8: tl.constexpr, HAS_PERM: tl.constexpr, HAS_ROPE: tl.constexpr, TWO_STAGE: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """Unpack + dequantize + un-permute + inverse rotate + RoPE ``BLOCK_T`` tokens into ``[T, H, D]``."""
        N: tl.constexpr = H * D
        NB: tl.constexpr = N // RW
        G: tl.constexpr = N // GS
        SB: tl.constexpr = 1 if SCALE_FP8 else 2
        CB: tl.constexpr = N * BITS // 8
        NF: tl.constexpr = NB_PAD * A_PAD * B_PAD
        ROWS: tl.constexpr = BLOCK_T * NB_PAD
        pid = tl.program_id(0)

        tok, c, valid = _tile_channels(pid, n_tokens, BLOCK_T, NB, NB_PAD, RW, A, B, A_PAD, B_PAD)
        tok64 = tok.to(tl.int64)
        # Channel c was stored at position inv_perm[c]: load its code and group parameters by address.
        if HAS_PERM:
            p = tl.load(inv_ptr + c, mask=valid, other=0).to(tl.int32)
        else:
            p = c
        row_ptr = (rec_ptr + tok64 * rec_stride)[:, None, None]
        q = _load_codes(row_ptr, p, valid, BITS)
        s, z = _load_scale_zero(row_ptr + CB, row_ptr + CB + G * SB, p // GS, valid, SCALE_FP8)
        # Padding must be exactly zero: it meets the zero rows/columns of the padded Hadamard factors.
        y = tl.where(valid, (q.to(tl.float32) - z) * s, 0.0)
        y = _hadamard_tile(y, m1_ptr, m2_ptr, ROWS, A_PAD, B_PAD, TWO_STAGE) * rot_scale

        d = c % D
        if HAS_ROPE:
            first = d < D // 2
            partner = tl.where(first, c + D // 2, c - D // 2)
            f2 = tl.where(valid, _flat_pos(partner, RW, B, A_PAD, B_PAD), 0)
            rh = tl.gather(tl.reshape(y, (BLOCK_T, NF)), tl.reshape(f2, (BLOCK_T, NF)), 1)
            rh = tl.reshape(rh, (ROWS, A_PAD, B_PAD))
            rh = tl.where(first, -rh, rh)
            cs = tl.load(cos_ptr + tok64[:, None, None] * cos_st + d * cos_sd, mask=valid, other=0.0)
            sn = tl.load(sin_ptr + tok64[:, None, None] * sin_st + d * sin_sd, mask=valid, other=0.0)
            y = y * cs.to(tl.float32) + rh * sn.to(tl.float32)
        tl.store(out_ptr + tok64[:, None, None] * N + c, _cast_rne(y, out_ptr.dtype.element_ty), mask=valid)

    def rotkv_write_triton(
        x: torch.Tensor,
        *,
        bits: int,
        group_size: int,
        rot_width: int,
        perm: torch.Tensor | None = None,
        clip_ratio: float = 1.0,
        scale_format: str = "fp16",
    ) -> torch.Tensor:
        """Triton :func:`rotkv_cache.rotkv_write_ref`: ``[T, H, D]`` -> uint8 ``[T, record_bytes]``.

        Extra limits: ``group_size % 8 == 0``; ``rot_width`` within ``hadamard_plan``'s tile limits.
        ``x`` may have any strides. Raises ``ValueError`` like the reference.
        """
        check_record_write_args(x, bits, group_size, rot_width, perm, clip_ratio, scale_format)
        t, h, d = x.shape
        width = h * d
        check_triton_group_size(group_size, width)
        check_launchable(x, "rotkv_write_triton")
        lay = _Layout(width, rot_width, group_size)
        out = torch.empty(t, record_bytes(width, bits, group_size, scale_format), dtype=torch.uint8,
                          device=x.device)
        if t == 0:
            return out
        m1, m2 = hadamard_operands(rot_width, False, x.device)
        sdt_tiny = {"fp16": torch.finfo(torch.float16).tiny, "fp8": torch.finfo(torch.float8_e4m3fn).tiny}
        plan = lay.plan
        _rotkv_write_fwd_kernel[(triton.cdiv(t, lay.block_t),)](
            x, x.stride(0), x.stride(1), x.stride(2), perm if perm is not None else out, out, out.stride(0),
            m1, m2, t, 1.0 / math.sqrt(rot_width), float(clip_ratio), float(sdt_tiny[scale_format]),
            H=h, D=d, RW=rot_width, A=plan.a, B=plan.b, A_PAD=plan.a_pad, B_PAD=plan.b_pad, NB_PAD=lay.nb_pad,
            GS=group_size, G_PAD=lay.g_pad, GS_PAD=lay.gs_pad, BITS=bits, SCALE_FP8=scale_format == "fp8",
            HAS_PERM=perm is not None, TWO_STAGE=plan.two_stage, BLOCK_T=lay.block_t,
        )
        return out

    def rotkv_read_triton(
        record: torch.Tensor,
        *,
        num_heads: int,
        head_dim: int,
        bits: int,
        group_size: int,
        rot_width: int,
        perm: torch.Tensor | None = None,
        scale_format: str = "fp16",
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Triton :func:`rotkv_cache.rotkv_read_ref`: uint8 ``[T, record_bytes]`` -> ``[T, H, D]``.

        Extra limits as :func:`rotkv_write_triton`; ``record`` rows may be strided (last dim contiguous).
        """
        check_record_read_args(record, num_heads, head_dim, bits, group_size, rot_width, perm, scale_format, cos,
                               sin, out_dtype)
        width = num_heads * head_dim
        check_triton_group_size(group_size, width)
        check_launchable(record, "rotkv_read_triton")
        if record.stride(1) != 1:
            record = record.contiguous()
        t = record.shape[0]
        lay = _Layout(width, rot_width, group_size)
        out = torch.empty(t, num_heads, head_dim, dtype=out_dtype, device=record.device)
        if t == 0:
            return out
        inv = None
        if perm is not None:
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(width, device=perm.device)
        m1, m2 = hadamard_operands(rot_width, True, record.device)
        has_rope = cos is not None
        cs = cos if has_rope else out
        sn = sin if has_rope else out
        plan = lay.plan
        _rotkv_read_fwd_kernel[(triton.cdiv(t, lay.block_t),)](
            record, record.stride(0), inv if inv is not None else record, cs, sn,
            cs.stride(0) if has_rope else 0, cs.stride(1) if has_rope else 0,
            sn.stride(0) if has_rope else 0, sn.stride(1) if has_rope else 0,
            out, m1, m2, t, 1.0 / math.sqrt(rot_width),
            H=num_heads, D=head_dim, RW=rot_width, A=plan.a, B=plan.b, A_PAD=plan.a_pad, B_PAD=plan.b_pad,
            NB_PAD=lay.nb_pad, GS=group_size, BITS=bits, SCALE_FP8=scale_format == "fp8", HAS_PERM=perm is not None,
            HAS_ROPE=has_rope, TWO_STAGE=plan.two_stage, BLOCK_T=lay.block_t,
        )
        return out

else:

    def rotkv_write_triton(
        x: torch.Tensor,
        *,
        bits: int,
        group_size: int,
        rot_width: int,
        perm: torch.Tensor | None = None,
        clip_ratio: float = 1.0,
        scale_format: str = "fp16",
    ) -> torch.Tensor:
        """Stub: Triton is not installed."""
        raise NotImplementedError(
            "rotkv_write_triton needs Triton, which is not installed: pip install 'rotkv[triton]' or use "
            "rotkv_kernels.rotkv_cache.rotkv_write_ref"
        )

    def rotkv_read_triton(
        record: torch.Tensor,
        *,
        num_heads: int,
        head_dim: int,
        bits: int,
        group_size: int,
        rot_width: int,
        perm: torch.Tensor | None = None,
        scale_format: str = "fp16",
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Stub: Triton is not installed."""
        raise NotImplementedError(
            "rotkv_read_triton needs Triton, which is not installed: pip install 'rotkv[triton]' or use "
            "rotkv_kernels.rotkv_cache.rotkv_read_ref"
        )
