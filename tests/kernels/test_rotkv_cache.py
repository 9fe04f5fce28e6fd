"""RotateKV cache records, reference implementation: layout, permutation, round-trip bound, RoPE, validation."""

from __future__ import annotations

import pytest
import torch

from kernel_bounds import (
    U32,
    block_perm,
    decode_rotated,
    group_quant_bound,
    llama_cos_sin,
    roundtrip_norm_bound,
)
from rotkv_kernels.hadamard import hadamard_transform
from rotkv_kernels.quant import bits_per_element, scale_dtypes
from rotkv_kernels.rotkv_cache import check_perm, record_bytes, rotkv_read_ref, rotkv_write_ref


# (T, H, D, rot_width, group_size): SmolLM2 keys (3 heads x 64, one 192 group) and values (per head),
# a 128-wide head, a 576 rotation with 64-wide groups, groups spanning several rotation blocks
LAYOUTS = [
    (7, 3, 64, 192, 192),
    (7, 3, 64, 64, 192),
    (1, 2, 128, 128, 64),
    (33, 9, 64, 576, 64),
    (5, 4, 32, 32, 128),
]


@pytest.mark.parametrize("fmt", ["fp16", "fp8"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_record_layout_and_roundtrip_bound(layout, bits, fmt):
    t, h, d, rw, gs = layout
    torch.manual_seed(t * 100 + bits)
    x = torch.randn(t, h, d) * 2
    x[:, 0, :3] += 8.0  # an outlier channel: the rotation spreads it over the block
    perm = block_perm(h * d, rw)
    clip = 0.8 if bits == 2 else 1.0
    kw = dict(bits=bits, group_size=gs, rot_width=rw, perm=perm, clip_ratio=clip, scale_format=fmt)
    rec = rotkv_write_ref(x, **kw)
    assert rec.dtype == torch.uint8 and rec.shape == (t, record_bytes(h * d, bits, gs, fmt))
    assert rec.shape[1] * 8 / (h * d) == bits_per_element(bits, gs, fmt)
    # stored position p holds rotated channel perm[p] ("y = y[:, perm]"), within the quantizer's bound
    y = hadamard_transform(x.reshape(t, h * d), block_size=rw)
    deq, scale, zero = decode_rotated(rec, h * d, bits, gs, fmt)
    assert ((deq.double() - y[:, perm].double()).abs()
            <= group_quant_bound(y[:, perm], scale, zero, bits, gs, clip) + 1e-5 * y.abs().max()).all()
    # read(write(x)) per rotation block within the L2 bound derived from the per-element quantizer bound
    back = rotkv_read_ref(rec, num_heads=h, head_dim=d, bits=bits, group_size=gs, rot_width=rw, perm=perm,
                          scale_format=fmt)
    assert back.shape == x.shape and back.dtype == torch.float32
    err = (back.double() - x.double()).reshape(t, h * d // rw, rw).norm(dim=-1)
    assert (err <= roundtrip_norm_bound(x, rec, **kw)).all()
    # sanity of the bound's scale: 4 bits must beat 2 bits by a lot, so the test would notice a broken decoder
    rel = (err.pow(2).sum() / x.double().pow(2).sum()).sqrt()
    assert rel < {2: 0.6, 3: 0.3, 4: 0.15}[bits]


def test_permutation_inside_groups_commutes():
    """A permutation that stays inside each quantization group does not change min/max, so decoding with it
    gives exactly what decoding without it gives."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 64)
    perm = block_perm(192, 64)  # rotation blocks of 192, groups of 64: perm stays inside each group
    kw = dict(bits=3, group_size=64, rot_width=192)
    a = rotkv_read_ref(rotkv_write_ref(x, perm=perm, **kw), num_heads=3, head_dim=64, perm=perm, **kw)
    b = rotkv_read_ref(rotkv_write_ref(x, **kw), num_heads=3, head_dim=64, **kw)
    assert torch.equal(a, b)
    # ...while reading with the inverse permutation instead of perm gives something else
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(192)
    c = rotkv_read_ref(rotkv_write_ref(x, perm=perm, **kw), num_heads=3, head_dim=64, perm=inv, **kw)
    assert not torch.allclose(c, b, atol=0.1)


def test_rope_matches_complex_rotation():
    """RoPE on read: the pair (x_d, x_{d+D/2}) is multiplied by e^{i theta} (HF Llama's rotate_half form)."""
    torch.manual_seed(1)
    t, h, d = 6, 2, 64
    x = torch.randn(t, h, d)
    kw = dict(num_heads=h, head_dim=d, bits=4, group_size=64, rot_width=128, scale_format="fp16")
    rec = rotkv_write_ref(x, bits=4, group_size=64, rot_width=128)
    plain = rotkv_read_ref(rec, **kw)
    pos = torch.tensor([0, 1, 5, 17, 300, 4095])
    cos, sin = llama_cos_sin(pos, d)
    roped = rotkv_read_ref(rec, cos=cos, sin=sin, **kw)
    z = torch.complex(plain[..., : d // 2].double(), plain[..., d // 2:].double())
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(t, d // 2, dtype=torch.float64), pos.double()[:, None] * inv)[:, None, :]
    expect = torch.cat([(z * rot).real, (z * rot).imag], dim=-1)
    # fp32 tables (rounded cos/sin: 2u each) and three fp32 operations: a few u times |x|
    assert ((roped.double() - expect).abs() <= 8 * U32 * plain.abs().amax(-1, keepdim=True).double() * 2).all()
    assert torch.equal(roped[0], plain[0])  # position 0: cos = 1, sin = 0
    for dtype in (torch.float16, torch.bfloat16):
        low = rotkv_read_ref(rec, cos=cos, sin=sin, out_dtype=dtype, **kw)
        assert low.dtype == dtype and torch.equal(low, roped.to(dtype))


def test_record_bytes_formula_and_config():
    from rotkv_vllm.config import RotateKVConfig, RotateKVLayout

    for width, bits, gs, fmt in [(192, 2, 192, "fp16"), (1024, 3, 128, "fp8"), (64, 4, 8, "fp16")]:
        sd, zd = scale_dtypes(fmt)
        assert record_bytes(width, bits, gs, fmt) == width * bits // 8 + (width // gs) * (sd.itemsize + zd.itemsize)
    layout = RotateKVLayout.resolve(RotateKVConfig(), num_kv_heads=3, head_dim=64)
    for bits in (2, 3, 4):
        for fmt in ("fp16", "fp8"):
            assert layout.packed_bytes_per_token(bits, fmt) == record_bytes(192, bits, layout.group_size, fmt)
    with pytest.raises(ValueError, match="group_size=100"):
        record_bytes(192, 2, 100, "fp16")
    with pytest.raises(ValueError, match="width=12"):
        record_bytes(12, 2, 4, "fp16")


def test_bad_arguments_raise_value_error():
    x = torch.randn(2, 3, 64)
    ok = dict(bits=2, group_size=64, rot_width=64)
    cases = [
        (dict(ok, bits=5), "bits=5"),
        (dict(ok, group_size=100), "group_size=100"),
        (dict(ok, rot_width=128), "rot_width=128 must divide"),
        (dict(ok, rot_width=6, group_size=64), "rot_width=6 has no Hadamard"),
        (dict(ok, scale_format="int8"), "scale_format='int8'"),
        (dict(ok, clip_ratio=0.0), "clip_ratio=0.0"),
        (dict(ok, perm=torch.arange(192, dtype=torch.int32)), "perm: expected an int64"),
        (dict(ok, perm=torch.arange(191)), "perm: expected an int64"),
        (dict(ok, perm=torch.zeros(192, dtype=torch.int64)), "not a permutation"),
        (dict(ok, perm=torch.arange(192).roll(1)), "across rotation blocks"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            rotkv_write_ref(x, **kw)
    with pytest.raises(ValueError, match=r"x: expected a \[T, H, D\]"):
        rotkv_write_ref(x[0], **ok)
    with pytest.raises(ValueError, match=r"x: expected a \[T, H, D\]"):
        rotkv_write_ref(x.double(), **ok)
    rec = rotkv_write_ref(x, **ok)
    rk = dict(num_heads=3, head_dim=64, **ok)
    cos, sin = llama_cos_sin(torch.arange(2), 64)
    with pytest.raises(ValueError, match="record: expected uint8"):
        rotkv_read_ref(rec[:, :-1], **rk)
    with pytest.raises(ValueError, match="cos and sin"):
        rotkv_read_ref(rec, cos=cos, **rk)
    with pytest.raises(ValueError, match="sin: expected"):
        rotkv_read_ref(rec, cos=cos, sin=sin[:1], **rk)
    with pytest.raises(ValueError, match="out_dtype"):
        rotkv_read_ref(rec, out_dtype=torch.int32, **rk)
    with pytest.raises(ValueError, match="num_heads=0"):
        rotkv_read_ref(rec, **dict(rk, num_heads=0))


def test_check_perm_metadata_only():
    bad = torch.zeros(192, dtype=torch.int64)
    check_perm(bad, 192, 64, check_values=False)  # shape and dtype fine: no value check requested
    with pytest.raises(ValueError, match="not a permutation"):
        check_perm(bad, 192, 64)
