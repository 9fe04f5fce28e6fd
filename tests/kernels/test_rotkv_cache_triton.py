"""Fused Triton cache write/read vs the PyTorch reference (``TRITON_INTERPRET=1`` on the CPU).

Where bit-exactness holds and why (see ``rotkv_cache_triton``'s docstring):

- dyadic inputs (``k / 64`` with ``|k| < 2^10``): every partial sum of the rotation is exact in fp32 in any
  order, so the rotated values, hence the records, are bit-identical; reading identical records is
  bit-identical as long as the inverse rotation's sums are exact too, which they are not in general (the
  dequantized values carry the scale's mantissa), so reads are compared with a derived bound;
- Gaussian inputs: the rotation's fp32 sums differ in order from the reference's butterflies, so a rotated
  value can differ by up to the sum of both Hadamard bounds ``delta``. A code can then differ only where the
  reference's ``y / s`` lies within ``delta / s`` of a rounding boundary, or where a group's scale/zero
  changed (its max/min moved across a rounding boundary of the stored scale); both are checked.
"""

from __future__ import annotations

import pytest
import torch

from kernel_bounds import (
    TINY_ABS,
    U32,
    UNIT_ROUNDOFF,
    block_perm,
    decode_rotated,
    device_for_triton,
    hadamard_fp32_bound,
    llama_cos_sin,
    ref_hadamard_terms,
    roundtrip_norm_bound,
    triton_hadamard_terms,
)
from rotkv_kernels.hadamard import hadamard_transform_ref
from rotkv_kernels.rotkv_cache import record_bytes, rotkv_read, rotkv_read_ref, rotkv_write, rotkv_write_ref


@pytest.fixture(scope="module")
def device():
    return device_for_triton()


# (T, H, D, rot_width, group_size, bits, scale_format, perm?) covering widths 64, 128, 192, 576, odd T
# (1, 7, 33), every bit width and both scale formats, with and without permutations, in 12 launches.
CASES = [
    (1, 1, 64, 64, 64, 2, "fp16", False),
    (7, 1, 64, 64, 32, 3, "fp8", True),
    (33, 1, 128, 128, 128, 4, "fp16", True),
    (7, 2, 64, 128, 64, 2, "fp8", False),
    (7, 3, 64, 192, 192, 2, "fp16", True),
    (1, 3, 64, 192, 64, 3, "fp16", False),
    (33, 3, 64, 64, 192, 4, "fp8", True),
    (7, 9, 64, 576, 64, 3, "fp8", True),
    (1, 9, 64, 576, 192, 4, "fp16", False),
    (7, 3, 64, 192, 96, 4, "fp16", True),
    (33, 6, 32, 192, 192, 3, "fp8", False),
    (7, 12, 48, 576, 576, 2, "fp16", True),
]


def _args(case, device):
    t, h, d, rw, gs, bits, fmt, use_perm = case
    gen = torch.Generator().manual_seed(t * 1000 + h * d + bits)
    perm = block_perm(h * d, rw, gen).to(device) if use_perm else None
    w = dict(bits=bits, group_size=gs, rot_width=rw, perm=perm, clip_ratio=0.8 if bits == 2 else 1.0,
             scale_format=fmt)
    r = dict(num_heads=h, head_dim=d, bits=bits, group_size=gs, rot_width=rw, perm=perm, scale_format=fmt)
    return t, h, d, gen, w, r


def _read_bound(record, case, out_dtype, rope):
    """Bound on |read_triton - read_ref| per element, for the same record.

    Both dequantize identically (bit-exact, tested in test_quant_triton), then run an inverse rotation with
    different fp32 summation orders: each is within its Hadamard bound of the exact value, so they differ by
    at most the sum. RoPE mixes an element with its partner using |cos|, |sin| <= 1: the difference becomes at
    most ``delta(x) + delta(partner)`` plus the rounding of the three RoPE operations (each side ``3u`` of the
    magnitudes involved). Casting to ``out_dtype`` adds at most one ulp of the output (rounding can go
    opposite ways at a tie) and the subnormal floor.
    """
    t, h, d, rw, gs, bits, fmt, _ = case
    deq, _, _ = decode_rotated(record.cpu(), h * d, bits, gs, fmt)
    delta = (hadamard_fp32_bound(deq, rw, ref_hadamard_terms(rw))
             + hadamard_fp32_bound(deq, rw, triton_hadamard_terms(rw))).reshape(t, h, d)
    mag = deq.double().reshape(t, h * d // rw, rw).abs().sum(-1).max() / rw**0.5  # >= max |x| (Cauchy-Schwarz)
    if rope:
        partner = torch.cat([delta[..., d // 2:], delta[..., : d // 2]], -1)
        delta = delta + partner + 2 * 3 * U32 * 2 * mag
    u = UNIT_ROUNDOFF[out_dtype]
    return delta * (1 + u) + 2 * u * (mag + delta.max()) + TINY_ABS[out_dtype]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-H{}xD{}-rw{}-g{}-b{}-{}{}".format(*c[:7], "-perm" * c[7]))
def test_dyadic_inputs_bit_exact_write_and_bounded_read(device, case):
    t, h, d, gen, w, r = _args(case, device)
    # k/64 with |k| < 1024: sums of up to 576 of them are multiples of 1/64 below 2^16 -> exact in fp32
    x = torch.randint(-1023, 1024, (t, h, d), generator=gen).float() / 64
    rec_ref = rotkv_write_ref(x, **dict(w, perm=None if w["perm"] is None else w["perm"].cpu()))
    rec = rotkv_write(x.to(device), **w)
    assert rec.shape == (t, record_bytes(h * d, case[5], case[4], case[6])) and rec.dtype == torch.uint8
    assert torch.equal(rec.cpu(), rec_ref)

    rope = case[0] > 1  # decode steps of one token without RoPE, prefill-like tiles with it
    cos, sin = llama_cos_sin(torch.arange(t) * 37 + 5, d) if rope else (None, None)
    for out_dtype in (torch.float32, torch.bfloat16):
        ref = rotkv_read_ref(rec_ref, **dict(r, perm=None if r["perm"] is None else r["perm"].cpu()), cos=cos,
                             sin=sin, out_dtype=out_dtype)
        got = rotkv_read(rec, **r, cos=None if cos is None else cos.to(device),
                         sin=None if sin is None else sin.to(device), out_dtype=out_dtype)
        assert got.dtype == out_dtype and got.shape == (t, h, d)
        assert ((got.cpu().double() - ref.double()).abs() <= _read_bound(rec_ref, case, out_dtype, rope)).all()


@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[7]], ids=["w128", "w192", "w576"])
def test_gaussian_inputs_codes_differ_only_at_rounding_boundaries(device, case):
    t, h, d, gen, w, r = _args(case, device)
    _, _, _, rw, gs, bits, fmt, _ = case
    x = torch.randn(t, h, d, generator=gen) * torch.logspace(-1, 1, h * d).reshape(1, h, d)
    perm = None if w["perm"] is None else w["perm"].cpu()
    rec_ref = rotkv_write_ref(x, **dict(w, perm=perm))
    rec = rotkv_write(x.to(device), **w).cpu()
    deq_ref, s_ref, z_ref = decode_rotated(rec_ref, h * d, bits, gs, fmt)
    deq, s_tri, z_tri = decode_rotated(rec, h * d, bits, gs, fmt)
    # group parameters: a change needs max/min within delta of a stored-scale rounding boundary -> rare
    same_group = (s_ref == s_tri) & (z_ref == z_tri)
    assert same_group.float().mean() >= 0.99
    # codes inside unchanged groups: only where the exact y/s is within delta/s of a .5 boundary
    y64 = hadamard_transform_ref(x.double().reshape(t, h * d), block_size=rw)  # fp64 dense: the exact values
    delta = (hadamard_fp32_bound(x.reshape(t, h * d), rw, ref_hadamard_terms(rw))
             + hadamard_fp32_bound(x.reshape(t, h * d), rw, triton_hadamard_terms(rw)))
    if perm is not None:
        y64, delta = y64[:, perm], delta[:, perm]
    s = s_ref.double().repeat_interleave(gs, -1)
    v = y64 / s
    # (plus the fp32 rounding of the division y / s inside the quantizer: u |v| on each side)
    near = (v - v.floor() - 0.5).abs() <= 2 * delta / s + 2 * U32 * v.abs() + 1e-6
    same = same_group.repeat_interleave(gs, -1)
    differ = deq_ref != deq
    assert not (differ & same & ~near).any()
    assert differ.float().mean() <= 1e-3
    # where a code differs in an unchanged group, it is by one step: dequantized values differ by s
    assert ((deq_ref - deq).abs()[same].double() <= s[same] * (1 + 2**-20)).all()
    # both round trips obey the same derived error bound
    back = rotkv_read(rotkv_write(x.to(device), **w), **r).cpu()
    err = (back.double() - x.double()).reshape(t, h * d // rw, rw).norm(dim=-1)
    assert (err <= roundtrip_norm_bound(x, rec, **dict(w, perm=perm))).all()


def test_strided_inputs_and_low_precision(device):
    """x as a non-contiguous view (a slice of fused qkv, heads strided) and in bf16/fp16."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randint(-512, 512, (7, 5, 64), generator=gen).float() / 32
    x = qkv[:, 1:4]  # [T, 3, 64], stride(0) = 320
    w = dict(bits=3, group_size=192, rot_width=192)
    assert not x.is_contiguous()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        assert torch.equal(rotkv_write(qkv.to(device, dtype)[:, 1:4], **w).cpu(), rotkv_write_ref(xd, **w))
    rec = rotkv_write_ref(x, **w)
    rec_strided = torch.zeros(7, rec.shape[1] + 5, dtype=torch.uint8)
    rec_strided[:, :-5] = rec
    got = rotkv_read(rec_strided.to(device)[:, :-5], num_heads=3, head_dim=64, **w)
    ref = rotkv_read_ref(rec, num_heads=3, head_dim=64, **w)
    case = (7, 3, 64, 192, 192, 3, "fp16", False)
    assert ((got.cpu().double() - ref.double()).abs() <= _read_bound(rec, case, torch.float32, False)).all()


def test_triton_only_limits_and_errors(device):
    from rotkv_kernels.rotkv_cache_triton import rotkv_write_triton

    x = torch.randn(2, 1, 64, device=device)
    with pytest.raises(ValueError, match="group_size=4: the Triton kernels need a multiple of 8"):
        rotkv_write_triton(x, bits=2, group_size=4, rot_width=64)
    with pytest.raises(ValueError, match="rot_width=128 must divide"):
        rotkv_write_triton(x, bits=2, group_size=64, rot_width=128)
    # the reference accepts group_size=4, so the Triton limit is explicit rather than silent
    assert rotkv_write_ref(x.cpu(), bits=2, group_size=4, rot_width=64).shape[0] == 2


def test_opcheck(device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 64, generator=gen).to(device)
    perm = block_perm(192, 192, gen).to(device)
    torch.library.opcheck(torch.ops.rotkv.rotkv_write, (x, 2, 64, 192, perm, 0.8, "fp8"))
    rec = torch.ops.rotkv.rotkv_write(x, 2, 64, 192, perm, 0.8, "fp8")
    cos, sin = llama_cos_sin(torch.arange(3), 64)
    torch.library.opcheck(torch.ops.rotkv.rotkv_read,
                          (rec, 3, 64, 2, 64, 192, perm, "fp8", cos.to(device), sin.to(device), torch.bfloat16))
