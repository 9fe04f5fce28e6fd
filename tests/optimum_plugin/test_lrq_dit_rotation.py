"""Adaptive Rotation Scheme: orthogonality, exact rebuild, zigzag balance, folding equivalence, the auto decision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimum_plugin.lrq_dit.calibration import LayerStats
from optimum_plugin.lrq_dit.config import LayerPlan, LRQDiTConfig
from optimum_plugin.lrq_dit.modules import LRQLinear, fake_quant_per_token
from optimum_plugin.lrq_dit.quantizer import plan_layer, quantize_linear
from optimum_plugin.lrq_dit.rotation import (
    OutlierRotation,
    apply_block_rotation,
    default_block_size,
    fluctuation,
    greedy_block_rotation,
    pack_bits,
    rebuild_block_rotation,
    rotate,
    smoothing_factors,
    unpack_bits,
    zigzag_permutation,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _acts(n: int, tokens: int = 512, salient: tuple[int, ...] = (), scale: float = 50.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    for c in salient:
        x[:, c] *= scale
    return x


def _stats(x: torch.Tensor) -> LayerStats:
    st = LayerStats.empty(x.shape[1], capacity=x.shape[0], seed=0)
    st.update(x)
    return st


@pytest.mark.parametrize("block", [8, 12, 32])
def test_greedy_rotation_is_orthogonal_lowers_the_max_and_rebuilds_exactly(block):
    x = _acts(4 * block, salient=(1, block + 3), seed=block).to(torch.float64)
    g = torch.Generator().manual_seed(0)
    ch, sg, r = greedy_block_rotation(x, block, steps=4, generator=g)
    eye = torch.eye(block, dtype=torch.float64).expand_as(r)
    assert torch.allclose(r @ r.transpose(1, 2), eye, atol=1e-12)
    y = apply_block_rotation(x, r)
    xb, yb = x.reshape(-1, 4, block), y.reshape(-1, 4, block)
    # Each kept step lowered its block's max, so no block got worse, and the salient blocks improved a lot.
    assert (yb.abs().amax(dim=(0, 2)) <= xb.abs().amax(dim=(0, 2))).all()
    assert yb[:, 0].abs().max() < 0.5 * xb[:, 0].abs().max()
    assert torch.equal(rebuild_block_rotation(ch, sg), r)


def test_sign_bits_roundtrip():
    b = torch.rand(2, 3, 4, 12) < 0.5
    assert torch.equal(unpack_bits(pack_bits(b), 12), b)


def test_zigzag_deals_the_largest_channels_to_distinct_blocks():
    n, block = 64, 16
    k = n // block
    m = torch.rand(n, generator=torch.Generator().manual_seed(1))
    perm = zigzag_permutation(m, block)
    assert torch.equal(perm.sort().values, torch.arange(n))
    block_of = torch.empty(n, dtype=torch.long)
    block_of[perm] = torch.arange(n) // block
    top = torch.argsort(m, descending=True)
    # Ranks 0..K-1 go to blocks 0..K-1, ranks K..2K-1 back from K-1 to 0.
    assert block_of[top[:k]].tolist() == list(range(k))
    assert block_of[top[k : 2 * k]].tolist() == list(range(k - 1, -1, -1))
    # Each block's sum of channel maxima is within one channel's value of the mean.
    sums = torch.zeros(k).index_add_(0, block_of, m)
    assert (sums - sums.mean()).abs().max() <= m.max()


@pytest.mark.parametrize("rotation", ["hadamard", "outlier_aware"])
@pytest.mark.parametrize("n, block", [(96, None), (1152, 128)])
def test_folding_is_exact_up_to_rounding(rotation, n, block):
    """(rotate(x / s)) (rotate(W * s))^T == x W^T: the transforms cancel in the product."""
    if rotation == "outlier_aware" and n == 1152:
        block = 64
    x = _acts(n, tokens=64, salient=(5,), scale=30.0)
    w = torch.randn(24, n, generator=torch.Generator().manual_seed(2)) * 0.05
    s = smoothing_factors(x.abs().amax(0), w, 0.5)
    b = default_block_size(n, rotation, block)
    mats = perm = None
    if rotation == "outlier_aware":
        oa = OutlierRotation.fit(x / s, b, steps=3)
        mats, perm = oa.matrices(), oa.perm
    xr = rotate(x / s, rotation, b, mats, perm)
    wr = rotate(w * s, rotation, b, mats, perm)
    ref = (x.double() @ w.double().T)
    got = (xr.double() @ wr.double().T)
    # fp32 transforms: relative error of a few 1e-7 per element, accumulated over n terms.
    bound = 64 * n * 2**-24 * (x.abs().double() @ w.abs().double().T)
    assert ((got - ref).abs() <= bound).all()


def test_rotation_flattens_a_salient_channel():
    x = _acts(128, salient=(7,), scale=80.0)
    before = fake_quant_per_token(x, 4) - x
    for rot in ("hadamard", "outlier_aware"):
        mats = perm = None
        b = default_block_size(128, rot, None)
        if rot == "outlier_aware":
            oa = OutlierRotation.fit(x, b, steps=4)
            mats, perm = oa.matrices(), oa.perm
        xr = rotate(x, rot, b, mats, perm)
        after = fake_quant_per_token(xr, 4) - xr
        # The rotation is orthogonal, so these errors are comparable in the original space. Spread over a block of
        # b >= 64 channels, the salient channel's share of each token's range drops by sqrt(b) >= 8, so the
        # per-token range (which sets the 4-bit step) shrinks by more than half.
        assert after.pow(2).sum() < 0.5 * before.pow(2).sum()


def test_block_sizes():
    assert default_block_size(1152, "hadamard", None) == 1152  # 1152 = 36 * 32 has a (Paley II) Hadamard matrix
    assert default_block_size(1152, "outlier_aware", None) == 64
    assert default_block_size(1152, "hadamard", 128) == 128  # block-diagonal on request
    assert default_block_size(80, "outlier_aware", None) == 40  # 40 = 20 * 2
    with pytest.raises(ValueError, match="does not divide"):
        default_block_size(96, "hadamard", 64)
    with pytest.raises(ValueError, match="no Hadamard"):
        default_block_size(120, "hadamard", 6)


def test_fluctuation_metric_and_auto_decision():
    mild = _acts(64)
    salient = _acts(64, salient=(3, 40), scale=100.0)
    assert fluctuation(mild.abs().amax(0)) < 2.0
    assert fluctuation(salient.abs().amax(0)) > 50.0
    lin = nn.Linear(64, 32)
    cfg = LRQDiTConfig(act_bits=4, smooth_alpha=None, fluctuation_threshold=8.0)
    assert plan_layer("a", lin, cfg, _stats(mild)).rotation == "hadamard"
    assert plan_layer("b", lin, cfg, _stats(salient)).rotation == "outlier_aware"
    # Weight-only: no rotation, no smoothing.
    assert plan_layer("c", lin, LRQDiTConfig(act_bits=None), None) == LayerPlan()
    with pytest.raises(ValueError, match="calibration"):
        plan_layer("d", lin, cfg, None)


@pytest.mark.parametrize("rotation", ["hadamard", "outlier_aware", "none"])
def test_quantized_layer_matches_float_layer_at_8_bits(rotation):
    """W8A8 through the whole module (smoothing, rotation, packing, dequant): close to the float layer."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = _acts(64, tokens=256, salient=(9,), scale=20.0)
    cfg = LRQDiTConfig(weight_bits=8, act_bits=8, rotation=rotation)
    st = _stats(x)
    plan = plan_layer("l", lin, cfg, st)
    q, plan = quantize_linear(lin, cfg, plan, st)
    assert isinstance(q, LRQLinear) and q.plan.rotation == rotation
    with torch.no_grad():
        ref, out = lin(x), q(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.02


def test_mean_shift_keeps_a_hadamard_from_piling_offsets_into_one_channel():
    """One-sided inputs (post-GELU): a Hadamard puts sum_j x_j / sqrt(n) into channel 0 unless the mean goes first."""
    from optimum_plugin.lrq_dit.quantizer import channel_shift

    x = torch.relu(_acts(256, tokens=512, seed=4)) + 0.5
    st = _stats(x)
    delta = channel_shift(st)
    assert torch.allclose(delta, x.mean(0), atol=1e-3)
    plain = rotate(x, "hadamard", 256)
    centred = rotate(x - delta, "hadamard", 256)
    # Channel 0 of H x is sum_j x_j / 16, about 16 * mean(x) ~ 14: an outlier 10x the other channels.
    assert plain[:, 0].abs().mean() > 5 * plain[:, 1:].abs().amax(1).mean()
    assert centred.abs().amax(1).mean() < 0.5 * plain.abs().amax(1).mean()
    e_plain = (fake_quant_per_token(plain, 4) - plain).pow(2).sum()
    e_centred = (fake_quant_per_token(centred, 4) - centred).pow(2).sum()
    assert e_centred < 0.5 * e_plain


def test_shift_is_folded_into_the_bias_exactly():
    torch.manual_seed(1)
    lin = nn.Linear(32, 16, bias=False)
    x = torch.relu(_acts(32, tokens=128, seed=5)) + 1.0
    cfg = LRQDiTConfig(weight_bits=8, act_bits=8, rotation="none", smooth_alpha=None, shift=True)
    st = _stats(x)
    q, plan = quantize_linear(lin, cfg, plan_layer("l", lin, cfg, st), st)
    assert plan.shift and q.bias is not None  # a bias appears to hold W delta
    delta = q.shift_values()
    with torch.no_grad():
        assert torch.allclose(q.bias, lin.weight @ delta, atol=1e-6)
        rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.02


def test_auto_keeps_bounded_inputs_unrotated():
    """Sinusoidal timestep features are flat and bounded: a Hadamard would make them Gaussian-like with a larger
    per-token range, so the adaptive scheme leaves such a layer unrotated (and says so in its plan)."""
    t = torch.linspace(0, 999, 400)[:, None]
    freqs = torch.exp(-torch.arange(64) / 64 * 9.2)[None]
    x = torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)], dim=1)  # (400, 128) in [-1, 1]
    lin = nn.Linear(128, 64)
    cfg = LRQDiTConfig(weight_bits=4, act_bits=4, smooth_alpha=None, shift=False)
    st = _stats(x)
    plan = plan_layer("t", lin, cfg, st)
    assert plan.rotation == "hadamard"  # flat channel maxima: the fluctuation metric says mild
    _, final = quantize_linear(lin, cfg, plan, st)
    assert final.rotation == "none"
    forced = LRQDiTConfig(weight_bits=4, act_bits=4, smooth_alpha=None, shift=False, rotation="hadamard")
    _, kept = quantize_linear(lin, forced, plan_layer("t", lin, forced, st), st)
    assert kept.rotation == "hadamard"  # a forced rotation is applied as asked
