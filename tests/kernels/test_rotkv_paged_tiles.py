"""The CPU paged attention's pieces (``rotkv_kernels.rotkv_paged_tiles``) against ``quant.py``'s reference; the
whole CPU path is checked against ``paged_attention_ref`` through the vLLM backend in
``tests/rotkv_vllm/test_vllm_backend.py`` and ``tests/kernels/test_rotkv_paged_vllm_layout.py``."""

from __future__ import annotations

import pytest
import torch

from rotkv_kernels.quant import dequantize_groupwise, pack_codes, quantize_groupwise, unpack_codes
from rotkv_kernels.rotkv_cache import rotkv_write_ref
from rotkv_kernels.rotkv_paged_tiles import KeyDecoder, dequantize_records, interleave_order


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fast_unpack_and_record_dequantization_match_quant_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    packed = torch.randint(0, 256, (37, 96 * bits // 8), dtype=torch.uint8, generator=gen)
    assert torch.equal(pack_codes(unpack_codes(packed, bits), bits), packed)  # the fast unpack inverts packing
    x = torch.randn(37, 3, 32, generator=gen)
    rec = rotkv_write_ref(x, bits=bits, group_size=32, rot_width=1, scale_format="fp16")
    codes, scale, zero = quantize_groupwise(x.view(37, 96), bits, 32, 1.0, "fp16")
    ref = dequantize_groupwise(codes, scale, zero, 32)
    valid = torch.arange(37) % 5 != 0
    got = dequantize_records(rec, bits, 96, 32, "fp16", valid)
    # Same fp32 products, one rounding apart (addcmul vs subtract-then-multiply).
    assert torch.allclose(got[valid], ref[valid], rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))


@pytest.mark.parametrize("heads,d,rot,perm", [(2, 32, 64, True), (3, 64, 192, True), (2, 32, 32, False)])
def test_key_decoder_inverts_the_key_write_in_interleaved_order(heads, d, rot, perm):
    from rotkv_kernels.hadamard import hadamard_transform

    gen = torch.Generator().manual_seed(heads * d)
    w = heads * d
    order = torch.cat([torch.randperm(rot, generator=gen) + j * rot for j in range(w // rot)]) if perm else None
    x = torch.randn(11, w, generator=gen, dtype=torch.float64)
    y = hadamard_transform(x, block_size=rot)
    if order is not None:
        y = y[:, order]
    out = interleave_order(heads, d)
    dec = KeyDecoder.build(w, rot, order, out)
    torch.testing.assert_close(dec(y.float()).double(), x[:, out], rtol=1e-5, atol=1e-5)
