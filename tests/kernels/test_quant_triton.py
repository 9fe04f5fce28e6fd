"""Triton quantize+pack / unpack+dequantize: bit-identical to ``rotkv_kernels.quant`` (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import pytest
import torch

from kernel_bounds import device_for_triton
from rotkv_kernels.quant import dequantize_groupwise, pack_codes, quantize_groupwise, unpack_codes


@pytest.fixture(scope="module")
def device():
    return device_for_triton()


def _bytes(t):
    return t.contiguous().view(torch.uint8)


# (shape, group size, clip, dtype): odd row counts, 3-D leading dims, a non-power-of-2 group (192), bf16/fp16 in
CASES = [
    ((7, 192), 64, 0.8, torch.float32),
    ((3, 5, 128), 128, 1.0, torch.bfloat16),
    ((1, 576), 192, 0.9, torch.float16),
    ((33, 64), 8, 1.0, torch.float32),
]


@pytest.mark.parametrize("fmt", ["fp16", "fp8"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_bit_identical_to_reference(device, case, bits, fmt):
    from rotkv_kernels.quant_triton import quantize_pack_triton, unpack_dequantize_triton

    shape, gs, clip, dtype = CASES[case]
    torch.manual_seed(case * 7 + bits)
    # magnitudes over 3 decades; a few constant groups (eps path) and exact .5 ties (x = (k + .5) s) appear
    x = (torch.randn(shape) * torch.logspace(-1.5, 1.5, shape[-1])).to(dtype)
    x[..., :gs] = 0.5
    codes, scale, zero = quantize_groupwise(x, bits, gs, clip, fmt)
    packed, st, zt = quantize_pack_triton(x.to(device), bits, gs, clip, fmt)
    assert st.dtype == scale.dtype and zt.dtype == zero.dtype
    assert torch.equal(packed.cpu(), pack_codes(codes, bits))
    assert torch.equal(_bytes(st).cpu(), _bytes(scale)) and torch.equal(_bytes(zt).cpu(), _bytes(zero))
    for out_dtype in (torch.float32, dtype):
        ref = dequantize_groupwise(codes, scale, zero, gs, out_dtype)
        got = unpack_dequantize_triton(packed, st, zt, bits, gs, out_dtype)
        assert got.dtype == out_dtype and torch.equal(got.cpu(), ref)


def test_rounding_ties_and_fp8_saturation(device):
    """Exact .5 ties round to even like torch.round; fp8 scales follow torch's e4m3fn cast incl. its edges."""
    from rotkv_kernels.quant_triton import quantize_pack_triton

    # Group [-1, 2] at 2 bits: s = 1 exactly, -lo/s = 1 -> z = 1, x/s = k + .5 ties for the inner values.
    x = torch.tensor([[-1.0, 2.0, -0.5, 0.5, 1.5, 2.0, -1.0, 0.5]])
    codes, scale, zero = quantize_groupwise(x, 2, 8)
    packed, st, zt = quantize_pack_triton(x.to(device), 2, 8)
    assert torch.equal(unpack_codes(packed.cpu(), 2), codes)
    # ranges whose scale lands on fp8 rounding ties, near 448, in (464, 480) and >= 480 (torch saturates to 448)
    for s_target in (0.0234375 * 1.0625, 1.125 * 1.0625, 440.0, 470.0, 500.0):
        x = torch.tensor([[0.0] * 7 + [3 * s_target]])
        _, scale, zero = quantize_groupwise(x, 2, 8, scale_format="fp8")
        _, st, zt = quantize_pack_triton(x.to(device), 2, 8, scale_format="fp8")
        assert torch.equal(_bytes(st).cpu(), _bytes(scale)), s_target


def test_fp8_encoding_matches_torch_exhaustively(device):
    """Every e4m3 normal value and the midpoints between neighbours (ties) round like torch's cast."""
    from rotkv_kernels.quant_triton import quantize_pack_triton

    vals = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[vals >= 2.0**-6]
    mids = (vals[1:] + vals[:-1]) / 2
    targets = torch.cat([vals, mids, mids * (1 + 2.0**-20), mids * (1 - 2.0**-20)])
    # a group [0, ..., 0, maxq*t] has scale exactly fl32(maxq*t / maxq) == t for these t (maxq = 3, t dyadic)
    x = torch.zeros(targets.numel(), 8)
    x[:, -1] = targets * 3
    _, scale, _ = quantize_groupwise(x, 2, 8, scale_format="fp8")
    _, st, _ = quantize_pack_triton(x.to(device), 2, 8, scale_format="fp8")
    assert torch.equal(_bytes(st).cpu(), _bytes(scale))


def test_errors(device):
    from rotkv_kernels.quant_triton import quantize_pack_triton, unpack_dequantize_triton

    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match="group_size=4: the Triton kernels need a multiple of 8"):
        quantize_pack_triton(x, 2, 4)
    with pytest.raises(ValueError, match="bits=5"):
        quantize_pack_triton(x, 5, 32)
    with pytest.raises(ValueError, match="clip_ratio=1.5"):
        quantize_pack_triton(x, 2, 32, clip_ratio=1.5)
    p, s, z = quantize_pack_triton(x, 2, 32)
    with pytest.raises(ValueError, match="scale/zero dtypes"):
        unpack_dequantize_triton(p, s.float(), z, 2, 32)
    with pytest.raises(ValueError, match="expected"):
        unpack_dequantize_triton(p, s[:, :1], z[:, :1], 2, 32)


def test_opcheck(device):
    from rotkv_kernels.quant_triton import quantize_pack_triton  # noqa: F401 - registers the ops

    x = torch.randn(3, 64, device=device)
    torch.library.opcheck(torch.ops.rotkv.quantize_pack_triton, (x, 3, 32, 1.0, "fp8"))
    p, s, z = torch.ops.rotkv.quantize_pack_triton(x, 3, 32, 1.0, "fp16")
    torch.library.opcheck(torch.ops.rotkv.unpack_dequantize_triton, (p, s, z, 3, 32, torch.bfloat16))
