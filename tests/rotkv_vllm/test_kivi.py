"""The KIVI baseline of the reference harness: its quantizer, its streaming residual, its bits."""

import pytest
import torch

from rotkv_kernels.quant import fake_quantize_groupwise
from rotkv_vllm.reference import (
    KVMethod,
    KVStats,
    _kivi_transform,
    _mixed_attention,
    kivi_fake_quantize,
    kivi_fp_masks,
    method_from_name,
    perplexity,
)

# A key group's codes cycle through 0..3; codes 1 and 2 carry an offset of +-0.3 steps that rounding removes,
# codes 0 and 3 sit exactly on the group's min and max (so min and max are known in advance).
CODES = torch.tensor([0, 1, 2, 3, 2, 1, 3, 0] * 4, dtype=torch.float32)  # 32 tokens
OFFSETS = torch.tensor([0, 0.3, -0.3, 0, 0.3, -0.3, 0, 0] * 4)
# (min, step) per (head, channel, token group): all-positive, all-negative and sign-straddling groups, steps
# exact in fp16 so that the expected dequantized values are exact.
KEY_GROUPS = {
    (0, 0): [(10.0, 1.0), (-6.0, 1.0)],
    (0, 1): [(-0.5, 0.25), (0.0, 0.5)],
    (0, 2): [(3.0, 2.0), (-1.0, 0.125)],
    (0, 3): [(-40.0, 4.0), (100.0, 0.5)],
    (1, 0): [(0.25, 0.125), (-2.0, 1.0)],
    (1, 1): [(7.0, 0.5), (-9.0, 2.0)],
    (1, 2): [(-3.0, 1.0), (5.0, 0.25)],
    (1, 3): [(1.0, 1.0), (-0.75, 0.25)],
}


def _keys():
    """K ``[1, 2, 64, 4]`` and its exact KIVI-2 dequantization (per channel over 2 groups of 32 tokens)."""
    k = torch.empty(1, 2, 64, 4)
    expected = torch.empty_like(k)
    for (h, c), groups in KEY_GROUPS.items():
        for gi, (lo, step) in enumerate(groups):
            sl = slice(32 * gi, 32 * gi + 32)
            k[0, h, sl, c] = lo + step * (CODES + OFFSETS)
            expected[0, h, sl, c] = lo + step * CODES
    return k, expected


def _values():
    """V ``[1, 2, 2, 4]`` and its exact KIVI-2 dequantization per token over one head of 4 channels."""
    v = torch.tensor([[[[1.0, 2.2, 3.9, 4.0], [0.5, 0.5, 0.5, 0.5]],
                       [[-8.0, -7.4, -6.4, -5.0], [0.0, 3.0, 1.7, 0.4]]]])
    expected = torch.tensor([[[[1.0, 2.0, 4.0, 4.0], [0.5, 0.5, 0.5, 0.5]],
                              [[-8.0, -7.0, -6.0, -5.0], [0.0, 3.0, 2.0, 0.0]]]])
    return v, expected


def test_kivi_quantizer_exact_values():
    """Keys: per channel over groups of 32 tokens; values: per token over one head; real-valued zero point."""
    k, k_expected = _keys()
    v, v_expected = _values()
    kq, vq, _, bits = _kivi_transform(method_from_name("kivi2"), k, torch.zeros_like(k))
    assert torch.equal(kq, k_expected)
    _, vq, _, _ = _kivi_transform(method_from_name("kivi2"), torch.zeros(1, 2, 2, 4), v)
    assert torch.equal(vq, v_expected)
    # fp16 scale + fp16 minimum per group: 32 bits over 32 tokens (keys) or over one head of 4 (values)
    assert bits == (2 + 32 / 32, 2 + 32 / 4)
    # the same function, grouped along any axis
    assert torch.equal(kivi_fake_quantize(k.transpose(2, 3), 2, 32, dim=-1), k_expected.transpose(2, 3))


def test_kivi_quantizer_is_not_the_integer_zero_point():
    """The defect of the old kivi2 row: an integer zero point clamped to [0, 3] cannot represent a group that
    lies entirely above (or below) zero, so the per-channel key groups of one sign collapse."""
    k, k_expected = _keys()
    blocks = k.reshape(1, 2, 2, 32, 4).transpose(-1, -2)  # [B, H, group, D, 32]: channels over token groups
    old = fake_quantize_groupwise(blocks, 2, 32).transpose(-1, -2).reshape(k.shape)
    err_old = (old - k_expected)[0, 0, :32, 0].abs().max()  # the group in [10, 13]
    assert err_old > 5.0
    assert torch.equal(kivi_fake_quantize(k, 2, 32, dim=2), k_expected)


def test_kivi_quantizer_constant_group_and_errors():
    x = torch.full((2, 8), -3.5)
    assert torch.equal(kivi_fake_quantize(x, 2, 8), x)
    with pytest.raises(ValueError, match="divide"):
        kivi_fake_quantize(x, 2, 3)
    with pytest.raises(ValueError, match="bits"):
        kivi_fake_quantize(x, 0, 8)
    with pytest.raises(ValueError, match="residual"):
        KVMethod("k", "kivi", 2, 2, kivi_residual=48)  # not a multiple of the 32-token group
    with pytest.raises(ValueError, match="head width"):
        _kivi_transform(KVMethod("k", "kivi", 2, 2, group_size=3), torch.zeros(1, 1, 32, 4), torch.zeros(1, 1, 32, 4))


def test_kivi_streaming_masks():
    """Token group 2, residual 4: keys leave full precision in blocks of 4 once the block's last query has
    attended; values keep the current token and the 4 before it."""
    fp_k, fp_v = kivi_fp_masks(8, token_group=2, residual=4)
    exp_k = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    exp_v = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(fp_k, exp_k)
    assert torch.equal(fp_v, exp_v)
    # no residual: keys wait only for their token group, values are quantized when written
    fp_k, fp_v = kivi_fp_masks(4, token_group=2, residual=0)
    assert torch.equal(fp_k, torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool))
    assert not fp_v.any()


def test_mixed_attention_separate_value_mask():
    """Keys all full precision, values all quantized == attention over (fp K, quantized V)."""
    torch.manual_seed(0)
    q = torch.randn(1, 4, 10, 8)
    k, v, k2, v2 = (torch.randn(1, 2, 10, 8) for _ in range(4))
    ones = torch.ones(1, 10, 10, dtype=torch.bool)
    out = _mixed_attention(q, k, v, k2, v2, ones, None, 0.3, 2, fp_v=~ones)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v2.repeat_interleave(2, 1), is_causal=True, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_kivi_published_residual_and_bits(smollm2, eval_ids):
    """In windows of 128 the 128-token residual holds every key and value: fp perplexity at 16 bits. In windows
    of 256 it costs bits in proportion to its share, and the quantized part costs 2 + 32/32 bits."""
    model, _ = smollm2
    ids = eval_ids[:512]
    m = method_from_name("kivi2-r128")
    assert (m.kivi_token_group, m.kivi_residual, m.group_size) == (32, 128, 32)
    fp = perplexity(model, ids, window=128, method="fp")
    st = KVStats()
    assert perplexity(model, ids, window=128, method=m, stats=st) == pytest.approx(fp, rel=1e-5)
    assert st.avg_bits == pytest.approx(16.0)
    st = KVStats()
    perplexity(model, ids, window=256, method=m, stats=st)
    # keys: the residual block of the last 128 queries t = 128..255 holds t - 127 of their t + 1 keys;
    # values: 129 of t + 1.
    key_share = sum((t - 127) / (t + 1) for t in range(128, 256)) / 128
    value_share = sum(129 / (t + 1) for t in range(128, 256)) / 128
    expected = (key_share * 16 + (1 - key_share) * 3 + value_share * 16 + (1 - value_share) * 3) / 2
    assert st.avg_bits == pytest.approx(expected, rel=1e-9)


def test_kivi_rows_order(smollm2, eval_ids):
    """More full precision cannot hurt much: fp <= kivi2-r128 <= kivi2 < int2 (per token, no residual)."""
    model, _ = smollm2
    ids = eval_ids[:1024]
    ppl = {name: perplexity(model, ids, window=512, method=name) for name in ("fp", "kivi2-r128", "kivi2", "int2")}
    assert ppl["fp"] <= ppl["kivi2-r128"] <= ppl["kivi2"] < ppl["int2"]
