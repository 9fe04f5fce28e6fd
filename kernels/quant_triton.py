"""Group-wise quantize + pack and unpack + dequantize in Triton, bit-identical to ``rotkv_kernels.quant``.

Entry points: :func:`quantize_pack_triton` and :func:`unpack_dequantize_triton` (custom ops
``rotkv::quantize_pack_triton`` / ``rotkv::unpack_dequantize_triton``). The ``@triton.jit`` helpers here
(rounding, fp8 encode/decode, group quantization, packed stores and loads) are also the building blocks
of the fused KV-cache kernels in ``rotkv_cache_triton``.

The maths is the reference's (``quant.py``), step for step, in fp32:

    hi = max(group) * clip,  lo = min(group) * clip
    s  = max((hi - lo) / (2^b - 1), eps)  ->  cast to the scale format and back (codes use the stored s)
    z  = clamp(rint(-lo / s), 0, 2^b - 1)
    q  = clamp(rint(x / s) + z, 0, 2^b - 1)

What makes it bit-identical on every backend (tested under ``TRITON_INTERPRET=1``):

- divisions use ``tl.math.div_rn`` (IEEE round-to-nearest; Triton's ``/`` on GPU is an approximate
  ``div.full.f32``), never a multiply by a reciprocal;
- ``rint`` is round-half-to-even like ``torch.round``, written with ``floor`` (libdevice is not available
  in the interpreter): ``r = floor(v + 0.5)``, minus one on an exact tie with ``r`` odd; ``v + 0.5`` is exact
  for ``|v| < 2^23`` and larger values are already integers;
- fp32 -> fp16 is Triton's round-to-nearest-even cast, like torch's;
- fp32 -> float8_e4m3fn is done on the bits, like c10's ``fp8e4m3fn_from_fp32_value`` for the normal
  range (the scale is at least ``eps = 2^-6``, the smallest e4m3 normal): round the mantissa to 3 bits to
  nearest-even, and saturate everything that rounds above 448 (inf included) to 448 (``0x7E``), which is
  what torch 2.13's CPU cast does (its scalar header would give NaN for inputs in ``(464, 480)``; the
  tests pin the CPU behaviour).

Byte layout (same as ``pack_codes`` and ``Tensor.view(torch.uint8)``): per row, the packed codes (8 codes
in ``bits`` bytes, little-endian bit stream), then the scales of all groups (2 bytes for fp16, 1 for fp8,
little-endian), then the zeros (fp16: 2 bytes; fp8 format: uint8). Groups must be a multiple of 8 wide
here so that no 8-code word straddles two groups.
"""

from __future__ import annotations

import torch

from rotkv_kernels.hadamard_triton import _next_pow2, check_launchable
from rotkv_kernels.quant import SUPPORTED_BITS, scale_dtypes

try:  # Triton is optional: the module must import without it (the stubs below raise instead).
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by tests/kernels/test_import_guard.py in a subprocess
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "quantize_pack_triton", "unpack_dequantize_triton", "check_triton_group_size"]

_TILE_ELEMS = 4096


def check_triton_group_size(group_size: int, n: int) -> None:
    """The Triton kernels pack 8 codes per word inside one group: ``group_size % 8 == 0`` is required."""
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size={group_size} must divide the last dimension {n}")
    if group_size % 8:
        raise ValueError(
            f"group_size={group_size}: the Triton kernels need a multiple of 8 (8 codes share a packed word); "
            "use the reference for other group sizes"
        )


def scale_bytes(scale_format: str) -> tuple[int, int]:
    """(bytes per scale, bytes per zero) of a scale format."""
    sd, zd = scale_dtypes(scale_format)
    return sd.itemsize, zd.itemsize


if HAS_TRITON:
    from rotkv_kernels.hadamard_triton import _cast_rne

    @triton.jit
    def _rint(v):
        """Round half to even (``torch.round``) of fp32 ``v``."""
        r = tl.floor(v + 0.5)
        tie = (r - v) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        r = tl.where(tie & odd, r - 1.0, r)
        # |v| >= 2^23 is already an integer, and v + 0.5 may have rounded there.
        return tl.where(tl.abs(v) >= 8388608.0, v, r)

    @triton.jit
    def _fp8e4m3_encode(s):
        """fp32 ``s >= 2^-6`` (positive, normal range or +inf) -> float8_e4m3fn byte as int32, like torch."""
        fb = s.to(tl.int32, bitcast=True)
        odd = (fb >> 20) & 1
        # ((7 - 127) << 23) re-biases the exponent, 0x7FFFF + odd rounds the mantissa to nearest-even.
        r = (fb + (-1006632960 + 0x7FFFF) + odd) >> 20
        # torch (CPU) saturates: anything that rounds above 448, inf included, becomes 448 (0x7E), never NaN.
        return tl.minimum(r, 0x7E)

    @triton.jit
    def _fp8e4m3_decode(byte):
        """float8_e4m3fn byte (int32) -> fp32: normals, subnormals, NaN (``0x7F``/``0xFF``)."""
        e = (byte >> 3) & 15
        m = byte & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        sub = m.to(tl.float32) * 0.001953125  # m * 2^-9
        v = tl.where(e == 0, sub, normal)
        v = tl.where((byte & 0x7F) == 0x7F, float("nan"), v)
        return tl.where((byte & 0x80) != 0, -v, v)

    @triton.jit
    def _fp16_bits(v):
        """fp32 -> fp16 (round to nearest even) -> its 16 bits as int32."""
        return v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF

    @triton.jit
    def _fp16_from_bits(bits):
        """16 bits (int32) of an fp16 -> fp32."""
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _quantize_groups(y, valid, clip, eps, MAXQ: tl.constexpr, SCALE_FP8: tl.constexpr):
        """Quantize ``y`` ``[R, G, E]`` fp32 along the last axis (``valid`` masks padding).

        Returns ``(q int32 [R, G, E], scale_bits int32 [R, G], zero_bits int32 [R, G])``; the bits are the
        stored scale (fp16 or e4m3 pattern) and zero (fp16 pattern, or the uint8 value).
        """
        hi = tl.max(tl.where(valid, y, -float("inf")), axis=2)
        lo = tl.min(tl.where(valid, y, float("inf")), axis=2)
        # All-padding groups (rows past T, groups past G) would give inf - inf; they are never stored.
        hi = tl.where(hi == -float("inf"), 0.0, hi) * clip
        lo = tl.where(lo == float("inf"), 0.0, lo) * clip
        s = tl.maximum(tl.math.div_rn(hi - lo, MAXQ * 1.0), eps)
        if SCALE_FP8:
            s_bits = _fp8e4m3_encode(s)
            s = _fp8e4m3_decode(s_bits)
        else:
            s_bits = _fp16_bits(s)
            s = _fp16_from_bits(s_bits)
        z = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, s)), 0.0), MAXQ * 1.0)
        q = _rint(tl.math.div_rn(y, s[:, :, None])) + z[:, :, None]
        q = tl.minimum(tl.maximum(q, 0.0), MAXQ * 1.0).to(tl.int32)
        if SCALE_FP8:
            z_bits = z.to(tl.int32)
        else:
            z_bits = _fp16_bits(z)
        return q, s_bits, z_bits

    @triton.jit
    def _store_packed(q, row_ptr, row_valid, GS: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
                      G_PAD: tl.constexpr, GS_PAD: tl.constexpr, BITS: tl.constexpr):
        """Pack ``q`` ``[R, G_PAD, GS_PAD]`` (int32 codes, groups of GS) and store 8 codes per BITS bytes.

        ``row_ptr``: ``[R]`` uint8 pointers to each row's code bytes; group ``k`` starts at ``k*GS*BITS/8``.
        """
        W: tl.constexpr = GS_PAD // 8
        q4 = tl.reshape(q.to(tl.int64), (R, G_PAD, W, 8))
        sh = (tl.arange(0, 8) * BITS).to(tl.int64)
        word = tl.sum(q4 << sh[None, None, None, :], axis=3)  # disjoint bit ranges: sum == bitwise or
        jb = tl.arange(0, 4)
        byte = ((word[:, :, :, None] >> (jb[None, None, None, :] * 8).to(tl.int64)) & 0xFF).to(tl.uint8)
        k = tl.arange(0, G_PAD)
        w = tl.arange(0, W)
        offs = (k[None, :, None, None] * (GS * BITS // 8) + w[None, None, :, None] * BITS
                + jb[None, None, None, :])
        mask = (row_valid[:, None, None, None] & (k[None, :, None, None] < G) & (w[None, None, :, None] < GS // 8)
                & (jb[None, None, None, :] < BITS))
        tl.store(row_ptr[:, None, None, None] + offs, byte, mask=mask)

    @triton.jit
    def _store_le(bits, row_ptr, row_valid, G: tl.constexpr, G_PAD: tl.constexpr, NBYTES: tl.constexpr):
        """Store ``bits`` ``[R, G_PAD]`` (int32) as NBYTES little-endian bytes per group at ``row_ptr + k*NBYTES``."""
        k = tl.arange(0, G_PAD)
        jb = tl.arange(0, 2)
        byte = ((bits[:, :, None] >> (jb[None, None, :] * 8)) & 0xFF).to(tl.uint8)
        offs = k[None, :, None] * NBYTES + jb[None, None, :]
        mask = row_valid[:, None, None] & (k[None, :, None] < G) & (jb[None, None, :] < NBYTES)
        tl.store(row_ptr[:, None, None] + offs, byte, mask=mask)

    @triton.jit
    def _load_codes(row_ptr, p, mask, BITS: tl.constexpr):
        """Codes at positions ``p`` (any shape, int32) of a packed row (``row_ptr`` broadcastable uint8 ptrs)."""
        bit = p * BITS
        off = bit >> 3
        sh = bit & 7
        v = tl.load(row_ptr + off, mask=mask, other=0).to(tl.int32)
        if BITS == 3:
            # A 3-bit code at bit offset 6 or 7 of a byte continues in the next byte.
            hi = tl.load(row_ptr + off + 1, mask=mask & (sh > 5), other=0).to(tl.int32)
            v = v | (hi << 8)
        return (v >> sh) & ((1 << BITS) - 1)

    @triton.jit
    def _load_scale_zero(scale_ptr, zero_ptr, k, mask, SCALE_FP8: tl.constexpr):
        """fp32 (scale, zero) of groups ``k`` (any shape) from byte pointers (scales/zeros of one row)."""
        if SCALE_FP8:
            s = _fp8e4m3_decode(tl.load(scale_ptr + k, mask=mask, other=0x38).to(tl.int32))
            z = tl.load(zero_ptr + k, mask=mask, other=0).to(tl.float32)
        else:
            s_lo = tl.load(scale_ptr + 2 * k, mask=mask, other=0).to(tl.int32)
            s_hi = tl.load(scale_ptr + 2 * k + 1, mask=mask, other=0x3C).to(tl.int32)
            s = _fp16_from_bits(s_lo | (s_hi << 8))
            z_lo = tl.load(zero_ptr + 2 * k, mask=mask, other=0).to(tl.int32)
            z_hi = tl.load(zero_ptr + 2 * k + 1, mask=mask, other=0).to(tl.int32)
            z = _fp16_from_bits(z_lo | (z_hi << 8))
        return s, z

    @triton.jit
    def _quantize_pack_fwd_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, n_rows, clip, eps,
                                  N: tl.constexpr, GS: tl.constexpr, G_PAD: tl.constexpr, GS_PAD: tl.constexpr,
                                  BITS: tl.constexpr, SCALE_FP8: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        """One program: BLOCK_ROWS rows of N values -> packed codes, scale bytes, zero bytes."""
        G: tl.constexpr = N // GS
        SB: tl.constexpr = 1 if SCALE_FP8 else 2
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        k = tl.arange(0, G_PAD)
        e = tl.arange(0, GS_PAD)
        row_valid = r < n_rows
        valid = row_valid[:, None, None] & (k[None, :, None] < G) & (e[None, None, :] < GS)
        r64 = r.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None, None] * N + k[None, :, None] * GS + e[None, None, :], mask=valid,
                    other=0.0).to(tl.float32)
        q, s_bits, z_bits = _quantize_groups(x, valid, clip, eps, (1 << BITS) - 1, SCALE_FP8)
        _store_packed(q, codes_ptr + r64 * (N * BITS // 8), row_valid, GS, G, BLOCK_ROWS, G_PAD, GS_PAD, BITS)
        _store_le(s_bits, scale_ptr + r64 * (G * SB), row_valid, G, G_PAD, SB)
        _store_le(z_bits, zero_ptr + r64 * (G * SB), row_valid, G, G_PAD, SB)

    @triton.jit
    def _unpack_dequantize_fwd_kernel(codes_ptr, scale_ptr, zero_ptr, out_ptr, n_rows,
                                      N: tl.constexpr, GS: tl.constexpr, G_PAD: tl.constexpr,
                                      GS_PAD: tl.constexpr, BITS: tl.constexpr, SCALE_FP8: tl.constexpr,
                                      BLOCK_ROWS: tl.constexpr):
        """One program: BLOCK_ROWS packed rows -> ``(q - z) * s`` in the output dtype."""
        G: tl.constexpr = N // GS
        SB: tl.constexpr = 1 if SCALE_FP8 else 2
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        k = tl.arange(0, G_PAD)
        e = tl.arange(0, GS_PAD)
        row_valid = r < n_rows
        gvalid = row_valid[:, None] & (k[None, :] < G)
        valid = gvalid[:, :, None] & (e[None, None, :] < GS)
        r64 = r.to(tl.int64)
        p = k[None, :, None] * GS + e[None, None, :]
        q = _load_codes((codes_ptr + r64 * (N * BITS // 8))[:, None, None], p, valid, BITS)
        kk = tl.broadcast_to(k[None, :], (BLOCK_ROWS, G_PAD))
        s, z = _load_scale_zero((scale_ptr + r64 * (G * SB))[:, None], (zero_ptr + r64 * (G * SB))[:, None], kk,
                                gvalid, SCALE_FP8)
        x = (q.to(tl.float32) - z[:, :, None]) * s[:, :, None]
        tl.store(out_ptr + r64[:, None, None] * N + p, _cast_rne(x, out_ptr.dtype.element_ty), mask=valid)

    def _rows_per_program(g_pad: int, gs_pad: int) -> int:
        bt = max(1, _TILE_ELEMS // (g_pad * gs_pad))
        return 1 << (bt.bit_length() - 1)

    def _check_quant_args(n: int, bits: int, group_size: int, scale_format: str) -> None:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits}: supported are {SUPPORTED_BITS}")
        scale_dtypes(scale_format)
        check_triton_group_size(group_size, n)

    @torch.library.custom_op("rotkv::quantize_pack_triton", mutates_args=())
    def _quantize_pack_op(
        x: torch.Tensor, bits: int, group_size: int, clip_ratio: float, scale_format: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.shape[-1]
        _check_quant_args(n, bits, group_size, scale_format)
        if not 0.0 < clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio={clip_ratio} must be in (0, 1]")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"x.dtype={x.dtype}: expected float32, float16 or bfloat16")
        check_launchable(x, "quantize_pack_triton")
        sb, zb = scale_bytes(scale_format)
        g = n // group_size
        xc = x.contiguous()
        lead = x.shape[:-1]
        codes = torch.empty(*lead, n * bits // 8, dtype=torch.uint8, device=x.device)
        scale = torch.empty(*lead, g * sb, dtype=torch.uint8, device=x.device)
        zero = torch.empty(*lead, g * zb, dtype=torch.uint8, device=x.device)
        n_rows = xc.numel() // n if n else 0
        if n_rows:
            g_pad, gs_pad = _next_pow2(g), max(8, _next_pow2(group_size))
            bt = _rows_per_program(g_pad, gs_pad)
            sdt, _ = scale_dtypes(scale_format)
            _quantize_pack_fwd_kernel[(triton.cdiv(n_rows, bt),)](
                xc, codes, scale, zero, n_rows, float(clip_ratio), float(torch.finfo(sdt).tiny),
                N=n, GS=group_size, G_PAD=g_pad, GS_PAD=gs_pad, BITS=bits, SCALE_FP8=scale_format == "fp8",
                BLOCK_ROWS=bt,
            )
        sdt, zdt = scale_dtypes(scale_format)
        return codes, scale.view(sdt), zero.view(zdt)

    @_quantize_pack_op.register_fake
    def _(x, bits, group_size, clip_ratio, scale_format):
        n = x.shape[-1]
        sdt, zdt = scale_dtypes(scale_format)
        g = n // group_size
        lead = x.shape[:-1]
        return (x.new_empty(*lead, n * bits // 8, dtype=torch.uint8), x.new_empty(*lead, g, dtype=sdt),
                x.new_empty(*lead, g, dtype=zdt))

    @torch.library.custom_op("rotkv::unpack_dequantize_triton", mutates_args=())
    def _unpack_dequantize_op(
        packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits}: supported are {SUPPORTED_BITS}")
        m = packed.shape[-1]
        if packed.dtype != torch.uint8 or m % bits:
            raise ValueError(f"packed: expected uint8 with a last dimension divisible by bits={bits}, got "
                             f"{packed.dtype} {tuple(packed.shape)}")
        n = m * 8 // bits
        check_triton_group_size(group_size, n)
        g = n // group_size
        if scale.dtype == torch.float16 and zero.dtype == torch.float16:
            fp8 = False
        elif scale.dtype == torch.float8_e4m3fn and zero.dtype == torch.uint8:
            fp8 = True
        else:
            raise ValueError(f"scale/zero dtypes {scale.dtype}/{zero.dtype}: expected fp16/fp16 or "
                             "float8_e4m3fn/uint8")
        if scale.shape != (*packed.shape[:-1], g) or zero.shape != scale.shape:
            raise ValueError(f"scale {tuple(scale.shape)} / zero {tuple(zero.shape)}: expected "
                             f"{(*packed.shape[:-1], g)}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype={dtype}: expected float32, float16 or bfloat16")
        check_launchable(packed, "unpack_dequantize_triton")
        pc = packed.contiguous()
        sc = scale.contiguous().view(torch.uint8)
        zc = zero.contiguous().view(torch.uint8)
        out = torch.empty(*packed.shape[:-1], n, dtype=dtype, device=packed.device)
        n_rows = pc.numel() // m if m else 0
        if n_rows:
            g_pad, gs_pad = _next_pow2(g), max(8, _next_pow2(group_size))
            bt = _rows_per_program(g_pad, gs_pad)
            _unpack_dequantize_fwd_kernel[(triton.cdiv(n_rows, bt),)](
                pc, sc, zc, out, n_rows, N=n, GS=group_size, G_PAD=g_pad, GS_PAD=gs_pad, BITS=bits,
                SCALE_FP8=fp8, BLOCK_ROWS=bt,
            )
        return out

    @_unpack_dequantize_op.register_fake
    def _(packed, scale, zero, bits, group_size, dtype):
        return packed.new_empty(*packed.shape[:-1], packed.shape[-1] * 8 // bits, dtype=dtype)

    def quantize_pack_triton(
        x: torch.Tensor, bits: int, group_size: int, clip_ratio: float = 1.0, scale_format: str = "fp16"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``quantize_groupwise`` then ``pack_codes`` in one Triton kernel.

        Args:
            x: ``(..., n)`` fp32/fp16/bf16; ``n % group_size == 0`` and ``group_size % 8 == 0``.
        Returns:
            ``(packed uint8 (..., n*bits/8), scale (..., n/group_size), zero (..., n/group_size))`` with the
            scale/zero dtypes of ``scale_format``; bit-identical to ``pack_codes(quantize_groupwise(...)[0])``
            and the reference's scale and zero.
        Raises:
            ValueError: unsupported bits, scale format, clip ratio, dtype or group size.
        """
        return torch.ops.rotkv.quantize_pack_triton(x, bits, group_size, float(clip_ratio), scale_format)

    def unpack_dequantize_triton(
        packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``dequantize_groupwise(unpack_codes(packed), scale, zero)`` in one Triton kernel.

        Args:
            packed: ``(..., n*bits/8)`` uint8; scale/zero: ``(..., n/group_size)`` as returned by
                :func:`quantize_pack_triton`.
        Returns:
            ``(..., n)`` of ``dtype``: ``(q - z) * s`` computed in fp32, bit-identical to the reference.
        """
        return torch.ops.rotkv.unpack_dequantize_triton(packed, scale, zero, bits, group_size, dtype)

else:

    def quantize_pack_triton(
        x: torch.Tensor, bits: int, group_size: int, clip_ratio: float = 1.0, scale_format: str = "fp16"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stub: Triton is not installed."""
        raise NotImplementedError(
            "quantize_pack_triton needs Triton, which is not installed: pip install 'rotkv[triton]' or use "
            "rotkv_kernels.quant.quantize_groupwise + pack_codes"
        )

    def unpack_dequantize_triton(
        packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Stub: Triton is not installed."""
        raise NotImplementedError(
            "unpack_dequantize_triton needs Triton, which is not installed: pip install 'rotkv[triton]' or use "
            "rotkv_kernels.quant.unpack_codes + dequantize_groupwise"
        )
