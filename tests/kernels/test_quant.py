"""The group quantization and packing reference (``rotkv_kernels.quant``): derived bounds and bit layouts."""

from __future__ import annotations

import pytest
import torch

from kernel_bounds import SCALE_REL_ROUNDING, group_quant_bound
from rotkv_kernels.quant import (
    bits_per_element,
    dequantize_groupwise,
    pack_codes,
    quantize_groupwise,
    scale_dtypes,
    unpack_codes,
)

BITS = [2, 3, 4]
FORMATS = ["fp16", "fp8"]


def _groups(x, gs):
    return x.reshape(*x.shape[:-1], x.shape[-1] // gs, gs)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("clip", [1.0, 0.8])
def test_error_within_derived_bound(bits, fmt, clip):
    torch.manual_seed(bits * 10 + len(fmt))
    gs = 64
    # Per-row magnitudes over four decades, and a mean offset, so groups differ in range and position.
    x = torch.randn(33, 8 * gs) * torch.logspace(-2, 2, 33)[:, None] + 0.3
    codes, scale, zero = quantize_groupwise(x, bits, gs, clip, fmt)
    maxq = (1 << bits) - 1
    sd, zd = scale_dtypes(fmt)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and int(codes.max()) <= maxq
    assert scale.dtype == sd and zero.dtype == zd and scale.shape == (33, 8) == zero.shape
    xh = dequantize_groupwise(codes, scale, zero, gs)
    err = (xh.double() - x.double()).abs()
    bound = group_quant_bound(x, scale.float(), zero.float(), bits, gs, clip)
    assert (err <= bound).all()

    # Where the group range [lo, hi] contains 0, the zero point is not clamped and the grid covers [lo, hi]
    # up to the stored scale's rounding, so inside the clip range |x - x^| <= s/2 + rel * (hi - lo).
    xg = _groups(x, gs)
    lo = xg.amin(-1, keepdim=True) * clip
    hi = xg.amax(-1, keepdim=True) * clip
    s = scale.float().unsqueeze(-1)
    crossing = (lo <= 0) & (hi >= 0)
    assert crossing.float().mean() > 0.5  # the claim below is about most groups, not a vacuous few
    inside = (xg >= lo) & (xg <= hi) & crossing
    simple = s / 2 + SCALE_REL_ROUNDING[fmt] * (hi - lo) + 8 * 2.0**-24 * xg.abs().amax(-1, keepdim=True)
    assert (_groups(err, gs).float() <= simple)[inside].all()
    # and the bound is not loose: some element really sits ~half a step away
    assert (_groups(err, gs).float() / s)[inside].max() > 0.4


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_scale_is_stored_rounding_of_range(bits, fmt):
    torch.manual_seed(7)
    x = torch.randn(5, 128) * 3
    _, scale, _ = quantize_groupwise(x, bits, 32, 1.0, fmt)
    xg = _groups(x, 32)
    exact = ((xg.amax(-1) - xg.amin(-1)) / ((1 << bits) - 1)).double()
    rel = (scale.double() - exact).abs() / exact
    assert (rel <= SCALE_REL_ROUNDING[fmt]).all()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_zero_point_is_clamped(bits, fmt):
    """Groups that do not contain 0: ``round(-lo/s)`` is far outside ``[0, maxq]`` and must be clamped.

    All-positive groups get ``z = 0`` (grid ``[0, maxq*s]``), all-negative ones ``z = maxq`` (grid
    ``[-maxq*s, 0]``). The grid then does not cover the data (an all-positive group far from 0 decodes to at
    most ``maxq*s``): that is the reference's chosen behaviour, and the bound of ``group_quant_bound``
    (which measures the distance to the grid) still holds.
    """
    maxq = (1 << bits) - 1
    pos = 10 + torch.rand(4, 64)  # -lo/s = -10 / (1/maxq) ~ -10 maxq: clamp to 0
    neg = -10 - torch.rand(4, 64)  # -lo/s ~ 11 maxq: clamp to maxq (also above 255 for the uint8 zero)
    for x, z_expected in ((pos, 0), (neg, maxq)):
        codes, scale, zero = quantize_groupwise(x, bits, 64, 1.0, fmt)
        assert (zero.float() == z_expected).all()
        xh = dequantize_groupwise(codes, scale, zero, 64)
        grid_lo, grid_hi = -zero.float() * scale.float(), (maxq - zero.float()) * scale.float()
        assert ((xh >= grid_lo - 1e-6) & (xh <= grid_hi + 1e-6)).all()
        bound = group_quant_bound(x, scale.float(), zero.float(), bits, 64, 1.0)
        assert ((xh.double() - x.double()).abs() <= bound).all()
    # unclamped, the uint8 zero would overflow: check it stays an exact small integer
    _, s8, z8 = quantize_groupwise(-300 - torch.rand(1, 64), bits, 64, 1.0, "fp8")
    assert z8.dtype == torch.uint8 and int(z8.max()) == maxq


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_eps_on_constant_groups(bits, fmt):
    sd, _ = scale_dtypes(fmt)
    eps = torch.finfo(sd).tiny
    x = torch.zeros(3, 64)
    x[1] = 0.25  # constant, non-zero
    x[2, :32] = 1e-9  # spread far below eps * maxq
    codes, scale, zero = quantize_groupwise(x, bits, 32, 1.0, fmt)
    assert torch.isfinite(scale.float()).all()
    assert (scale.float() == eps).all()  # hi - lo == 0 (or ~0): the scale is clamped to eps, not 0 or NaN
    xh = dequantize_groupwise(codes, scale, zero, 32)
    assert torch.isfinite(xh).all()
    assert torch.equal(xh[0], torch.zeros(64))  # all-zero group decodes exactly
    assert (xh[2].abs() <= eps).all()
    bound = group_quant_bound(x, scale.float(), zero.float(), bits, 32, 1.0)
    assert ((xh.double() - x.double()).abs() <= bound).all()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", BITS)
def test_bits_per_element(bits, fmt):
    sd, zd = scale_dtypes(fmt)
    assert bits_per_element(bits, 128, fmt) == bits + (sd.itemsize + zd.itemsize) * 8 / 128


def test_quantize_rejects_bad_arguments():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="bits=5"):
        quantize_groupwise(x, 5, 32)
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_groupwise(x, 2, 48)
    with pytest.raises(ValueError, match="clip_ratio=0"):
        quantize_groupwise(x, 2, 32, clip_ratio=0.0)
    with pytest.raises(ValueError, match="scale_format='bf16'"):
        quantize_groupwise(x, 2, 32, scale_format="bf16")


def _pack_oracle(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent packing: each row is one little-endian integer with code i at bit ``i*bits``."""
    rows = codes.reshape(-1, codes.shape[-1]).tolist()
    out = []
    for row in rows:
        v = 0
        for i, c in enumerate(row):
            v |= int(c) << (i * bits)
        out.append(list(v.to_bytes(len(row) * bits // 8, "little")))
    return torch.tensor(out, dtype=torch.uint8).reshape(*codes.shape[:-1], -1)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 8), (7, 24), (33, 192), (3, 5, 64)])
def test_pack_roundtrip_and_layout(bits, shape):
    torch.manual_seed(bits + shape[-1])
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert torch.equal(packed, _pack_oracle(codes, bits))
    assert torch.equal(unpack_codes(packed, bits), codes)
    # every packed byte pattern decodes and re-encodes to itself (all 2^8 values appear in random data)
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * bits // 8), dtype=torch.uint8)
    assert torch.equal(pack_codes(unpack_codes(raw, bits), bits), raw)


def test_three_bits_pack_8_codes_in_3_bytes():
    codes = torch.arange(8, dtype=torch.uint8)[None]  # 0..7 -> bits 000 001 010 011 100 101 110 111
    packed = pack_codes(codes, 3)
    assert packed.shape == (1, 3)
    word = int(packed[0, 0]) | int(packed[0, 1]) << 8 | int(packed[0, 2]) << 16
    assert [(word >> (3 * i)) & 7 for i in range(8)] == list(range(8))


def test_pack_rejects_bad_widths():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(torch.zeros(2, 12, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="bits=5"):
        pack_codes(torch.zeros(2, 16, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="not a multiple of bits=3"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.uint8), 3)
