"""Group-wise asymmetric min-max integer quantization and bit packing (pure PyTorch reference).

Quantization of ``x`` of shape ``(..., n)`` in groups of ``g`` consecutive channels, ``b`` bits:

    hi = clip * max(group), lo = clip * min(group)       (clip ratio <= 1 shrinks the range)
    s  = max((hi - lo) / (2**b - 1), eps)                 (eps: the storage dtype's smallest normal)
    s  = cast(s, scale dtype)                              (codes use the stored scale)
    z  = clamp(round(-lo / s), 0, 2**b - 1)                (integer zero point, clamped)
    q  = clamp(round(x / s) + z, 0, 2**b - 1)
    x^ = (q - z) * s

``scale_format="fp16"`` stores ``s`` and ``z`` as fp16 (32 bits per group); ``"fp8"`` stores ``s`` as
float8_e4m3fn and ``z`` as uint8 (16 bits per group). Codes are packed 8 at a time into ``b`` bytes
(little-endian bit stream), so 2, 3 and 4 bits all pack without padding when ``n % 8 == 0``.
"""

from __future__ import annotations

import torch

__all__ = [
    "SCALE_FORMATS",
    "SUPPORTED_BITS",
    "quantize_groupwise",
    "dequantize_groupwise",
    "fake_quantize_groupwise",
    "pack_codes",
    "unpack_codes",
    "bits_per_element",
    "default_clip_ratio",
    "scale_dtypes",
]

SUPPORTED_BITS = (2, 3, 4)
SCALE_FORMATS = ("fp16", "fp8")


def default_clip_ratio(bits: int) -> float:
    """0.8 at 2 bits (RotateKV's setting), 1.0 at 3 and 4 bits."""
    return 0.8 if bits == 2 else 1.0


def scale_dtypes(scale_format: str) -> tuple[torch.dtype, torch.dtype]:
    """(scale dtype, zero dtype) for a scale format."""
    if scale_format == "fp16":
        return torch.float16, torch.float16
    if scale_format == "fp8":
        return torch.float8_e4m3fn, torch.uint8
    raise ValueError(f"scale_format={scale_format!r}: expected one of {SCALE_FORMATS}")


def bits_per_element(bits: int, group_size: int, scale_format: str) -> float:
    """Stored bits per quantized element, scale and zero included: ``b + (scale+zero bits) / g``."""
    sd, zd = scale_dtypes(scale_format)
    return bits + (torch.finfo(sd).bits + (zd.itemsize * 8)) / group_size


def _check(bits: int, n: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: supported are {SUPPORTED_BITS}")
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size={group_size} must divide the last dimension {n}")


def quantize_groupwise(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    clip_ratio: float = 1.0,
    scale_format: str = "fp16",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (``(..., n)``, any float dtype) group-wise along the last dim.

    Returns:
        codes: ``(..., n)`` uint8 in ``[0, 2**bits - 1]`` (unpacked);
        scale: ``(..., n // group_size)`` fp16 or float8_e4m3fn;
        zero:  ``(..., n // group_size)`` fp16 or uint8 (integer valued).
    Raises:
        ValueError: unsupported bits, scale format, clip ratio, or a group size that does not divide n.
    """
    n = x.shape[-1]
    _check(bits, n, group_size)
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio={clip_ratio} must be in (0, 1]")
    sdt, zdt = scale_dtypes(scale_format)
    maxq = (1 << bits) - 1
    xg = x.to(torch.float32).reshape(*x.shape[:-1], n // group_size, group_size)
    hi = xg.amax(dim=-1) * clip_ratio
    lo = xg.amin(dim=-1) * clip_ratio
    # A group whose values are all equal has hi == lo: eps keeps the scale finite and representable.
    eps = torch.finfo(sdt).tiny
    scale = ((hi - lo) / maxq).clamp_min(eps).to(sdt).to(torch.float32)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    q = torch.clamp(torch.round(xg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, maxq)
    codes = q.to(torch.uint8).reshape(x.shape)
    return codes, scale.to(sdt), zero.to(zdt)


def dequantize_groupwise(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_groupwise`: ``(codes - zero) * scale`` per group, as ``dtype``."""
    n = codes.shape[-1]
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size={group_size} must divide the last dimension {n}")
    q = codes.to(torch.float32).reshape(*codes.shape[:-1], n // group_size, group_size)
    x = (q - zero.to(torch.float32).unsqueeze(-1)) * scale.to(torch.float32).unsqueeze(-1)
    return x.reshape(codes.shape).to(dtype)


def fake_quantize_groupwise(
    x: torch.Tensor, bits: int, group_size: int, clip_ratio: float = 1.0, scale_format: str = "fp16"
) -> torch.Tensor:
    """Quantize then dequantize; same shape and dtype as ``x``."""
    codes, scale, zero = quantize_groupwise(x, bits, group_size, clip_ratio, scale_format)
    return dequantize_groupwise(codes, scale, zero, group_size, x.dtype)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``(..., n)`` uint8 codes of ``bits`` bits into ``(..., n * bits // 8)`` uint8.

    Every 8 codes form a ``8 * bits``-bit little-endian word (code i at bit ``i * bits``) stored in
    ``bits`` bytes, so no bits are wasted at 3 bits. Requires ``n % 8 == 0``.
    """
    n = codes.shape[-1]
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: supported are {SUPPORTED_BITS}")
    if n % 8:
        raise ValueError(f"the last dimension {n} must be a multiple of 8 to pack")
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], n // 8, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(dim=-1, keepdim=True)  # disjoint bit ranges: sum == bitwise or
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(*codes.shape[:-1], n // 8 * bits)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(..., m)`` uint8 -> ``(..., m * 8 // bits)`` uint8 codes.

    At 2 and 4 bits the 8-code words are byte aligned, so code ``i`` of a byte sits at bit ``i * bits`` of
    it and a byte shift suffices (the form the CPU serving path needs: no 64-bit words); at 3 bits the 24-bit
    little-endian word of every 3 bytes is assembled first.
    """
    m = packed.shape[-1]
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: supported are {SUPPORTED_BITS}")
    if m % bits:
        raise ValueError(f"packed width {m} is not a multiple of bits={bits}")
    lead = packed.shape[:-1]
    if bits in (2, 4):
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*lead, m * 8 // bits)
    p = packed.reshape(*lead, m // 3, 3).to(torch.int32)
    word = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
    shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
    return ((word.unsqueeze(-1) >> shifts) & 7).to(torch.uint8).reshape(*lead, m // 3 * 8)
