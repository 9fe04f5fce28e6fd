"""Twin-Log quantization: reference properties, packing, the grid search, and the Triton kernel vs the reference.

The kernel runs on the CPU under TRITON_INTERPRET=1 (scripts/test.sh sets it); without it (and without CUDA)
the kernel tests are skipped, the reference tests still run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rotkv_kernels.twin_log import (
    TWIN_LOG_BITS,
    TwinLogGrid,
    twin_log_dequantize,
    twin_log_linear_ref,
    twin_log_pack,
    twin_log_packed_width,
    twin_log_quantize,
    twin_log_search,
    twin_log_unpack,
)
from rotkv_kernels.twin_log_triton import triton_runnable, twin_log_linear_triton

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BITS = list(TWIN_LOG_BITS)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_OK = triton_runnable(torch.device(DEVICE))


def _dit_like_weight(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with a long tail (a few large entries), the shape LRQ-DiT targets."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g) * 0.02
    tail = torch.rand(rows, n, generator=g) < 0.01
    return torch.where(tail, w * 6, w)


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().item()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [8, 37, 128])
def test_pack_roundtrip_bitwise(bits, n):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 1 << bits, (5, n), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = twin_log_pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, twin_log_packed_width(n, bits))
    assert torch.equal(twin_log_unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", BITS)
def test_codes_are_nearest_log_level(bits):
    """Within a half's clipping range, the decoded log-magnitude is within step/2 of the true one."""
    w = _dit_like_weight(16, 96)
    codes, params = twin_log_search(w, bits, unbiased=False)  # the rows' levels exactly as searched
    p = params.to(torch.float32)
    eta = torch.exp2(p[:, 0:1])
    lg = torch.log2(w.abs() + eta)
    neg = w < 0
    lo = torch.where(neg, p[:, 3:4], p[:, 1:2])
    st = torch.where(neg, p[:, 4:5], p[:, 2:3])
    hi = lo + st * ((1 << (bits - 1)) - 1)
    q = (codes.to(torch.int64) & ((1 << (bits - 1)) - 1)).to(torch.float32)
    assert torch.equal((codes.to(torch.int64) >> (bits - 1)).bool(), neg)  # the sign bit is the sign
    rec_lg = lo + q * st
    inside = (lg >= lo) & (lg <= hi)
    # fp32 rounding of log2 and of lo + q*step: a few ulps of values of magnitude <= 32.
    tol = st / 2 + 32 * 2**-20
    assert inside.float().mean() > 0.8
    assert ((rec_lg - lg).abs() <= tol)[inside].all()
    # Outside the range the code saturates at the nearer end.
    assert (q[lg < lo] == 0).all()
    assert (q[lg > hi] == (1 << (bits - 1)) - 1).all()


@pytest.mark.parametrize("bits", [3, 4])
def test_search_is_the_grid_minimum(bits):
    """The chosen parameters are at least as good (per row) as every single grid point."""
    w = _dit_like_weight(24, 64, seed=1)
    grid = TwinLogGrid(eta_ratios=(1e-3, 1e-2, 1e-1), lower_quantiles=(0.0, 0.1), upper_quantiles=(1.0, 0.95))
    codes, params = twin_log_search(w, bits, grid, unbiased=False)
    best = (twin_log_dequantize(codes, params, bits) - w).pow(2).sum(1)
    for e in grid.eta_ratios:
        for lo in grid.lower_quantiles:
            for hi in grid.upper_quantiles:
                c1, p1 = twin_log_search(w, bits, TwinLogGrid((e,), (lo,), (hi,)), unbiased=False)
                err = (twin_log_dequantize(c1, p1, bits) - w).pow(2).sum(1)
                assert (best <= err * (1 + 1e-5) + 1e-12).all()


@pytest.mark.parametrize("bits", [3, 4])
def test_twin_log_beats_uniform_round_to_nearest(bits):
    """On Gaussian-with-tail rows, Twin-Log's error is below per-row min-max uniform quantization's."""
    from rotkv_kernels.quant import dequantize_groupwise, quantize_groupwise

    w = _dit_like_weight(64, 256, seed=2)
    codes, params = twin_log_search(w, bits)
    e_tl = _mse(twin_log_dequantize(codes, params, bits), w)
    c, s, z = quantize_groupwise(w, bits, 256)
    e_u = _mse(dequantize_groupwise(c, s, z, 256), w)
    assert e_tl < 0.7 * e_u


def test_importance_weighting_moves_error_off_important_channels():
    w = _dit_like_weight(32, 64, seed=3)
    h = torch.ones(64)
    h[:8] = 100.0
    c0, p0 = twin_log_search(w, 3)
    c1, p1 = twin_log_search(w, 3, importance=h)
    e0 = (twin_log_dequantize(c0, p0, 3) - w).pow(2)[:, :8].sum()
    e1 = (twin_log_dequantize(c1, p1, 3) - w).pow(2)[:, :8].sum()
    assert e1 < e0


def test_stored_params_are_the_ones_used():
    """Without the gain, re-quantizing with the stored fp16 parameters reproduces the codes exactly; with it,
    the stored levels are still a fixed point (re-quantizing the decoded row decodes to the same row)."""
    w = _dit_like_weight(8, 40, seed=4)
    codes, params = twin_log_search(w, 4, unbiased=False)
    assert params.dtype == torch.float16
    assert torch.equal(twin_log_quantize(w, params, 4), codes)
    codes, params = twin_log_search(w, 4)
    rec = twin_log_dequantize(codes, params, 4)
    assert torch.equal(twin_log_dequantize(twin_log_quantize(rec, params, 4), params, 4), rec)


@pytest.mark.parametrize("bits", [3, 4])
def test_unbiased_gain_removes_the_shrinkage_of_clipping(bits):
    """Error-minimizing clipped levels shrink a row (slope of w^ on w below 1); the folded gain restores slope 1
    up to the fp16 rounding of the shifted log-domain parameters (|log2 values| < 16: ulp <= 2**-7, so the
    decoded gain is off by at most ~2 * (2**(2**-8) - 1) < 0.6 %)."""
    w = _dit_like_weight(64, 256, seed=6)
    slope = lambda a: (a * w).sum(1) / (w * w).sum(1)  # noqa: E731
    c0, p0 = twin_log_search(w, bits, unbiased=False)
    c1, p1 = twin_log_search(w, bits)
    s0, s1 = slope(twin_log_dequantize(c0, p0, bits)), slope(twin_log_dequantize(c1, p1, bits))
    assert s0.mean() < 1.0  # shrinkage (about 3 % at 3 bits, 0.2 % at 4 bits here)
    assert ((s1 - 1).abs() < 0.006).all()
    assert (s1 - 1).abs().mean() < 0.25 * (s0 - 1).abs().mean()
    assert torch.equal(c0, c1)  # same codes, rescaled levels


def test_zero_rows_and_one_sided_rows_reconstruct():
    w = torch.zeros(3, 16)
    w[1] = torch.linspace(0.01, 0.2, 16)  # no negative half
    w[2] = -torch.linspace(0.01, 0.2, 16)  # no positive half
    codes, params = twin_log_search(w, 4)
    rec = twin_log_dequantize(codes, params, 4)
    assert torch.isfinite(rec).all()
    assert torch.equal(rec[0], torch.zeros(16))
    assert (rec[1] >= 0).all() and (rec[2] <= 0).all()
    assert (rec - w).abs().max() < 0.05


@pytest.mark.parametrize("bad", [2, 5, 16])
def test_unsupported_bits_raise(bad):
    with pytest.raises(ValueError, match="bits"):
        twin_log_search(torch.randn(2, 8), bad)
    with pytest.raises(ValueError, match="bits"):
        twin_log_pack(torch.zeros(2, 8, dtype=torch.uint8), bad)


def test_bad_grid_and_inputs_raise():
    with pytest.raises(ValueError, match="eta_ratios"):
        TwinLogGrid(eta_ratios=(0.0,))
    with pytest.raises(ValueError, match="upper quantile"):
        TwinLogGrid(lower_quantiles=(0.5,), upper_quantiles=(0.4,))
    with pytest.raises(ValueError, match="2-D"):
        twin_log_search(torch.randn(8), 4)
    with pytest.raises(ValueError, match="non-finite"):
        twin_log_search(torch.tensor([[1.0, float("nan")]]), 4)
    with pytest.raises(ValueError, match="importance"):
        twin_log_search(torch.randn(2, 8), 4, importance=-torch.ones(8))


# ---- Triton kernel vs reference ---------------------------------------------------------------------

SHAPES = [  # (M tokens, N out, K in): odd sizes, K not a multiple of 8 or of the 32-wide tiles
    (1, 16, 8),
    (19, 48, 100),
    (70, 33, 64),
]


@pytest.mark.skipif(not KERNEL_OK, reason="needs triton with CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_kernel_matches_reference(bits, shape, with_bias):
    m, n, k = shape
    w = _dit_like_weight(n, k, seed=m + n + k)
    codes, params = twin_log_search(w, bits)
    packed = twin_log_pack(codes, bits)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    ref = twin_log_linear_ref(x, packed, params, bits, k, bias)
    dev = DEVICE
    out = twin_log_linear_triton(x.to(dev), packed.to(dev), params.to(dev), bits, k,
                                 None if bias is None else bias.to(dev)).cpu()
    # Both sum K fp32 products in different orders and may decode a weight 1-2 ulps apart (exp2):
    # |err| <= (K + 8) * 2**-23 * sum_k |x_k w_k|  (+ |bias| * 2**-23).
    w_hat = twin_log_dequantize(codes, params, bits)
    bound = (k + 8) * 2**-23 * (x.abs() @ w_hat.abs().T) + 1e-30
    if bias is not None:
        bound = bound + bias.abs() * 2**-23
    assert out.shape == ref.shape == (m, n)
    assert ((out - ref).abs() <= bound).all(), (out - ref).abs().max()


@pytest.mark.skipif(not KERNEL_OK, reason="needs triton with CUDA or TRITON_INTERPRET=1")
def test_kernel_rejects_bad_arguments():
    w = _dit_like_weight(8, 16)
    codes, params = twin_log_search(w, 4)
    packed = twin_log_pack(codes, 4)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="in_features"):
        twin_log_linear_triton(torch.randn(2, 15), packed, params, 4, 16)
    with pytest.raises(ValueError, match="packed width"):
        twin_log_linear_triton(x, packed, params, 3, 16)
    with pytest.raises(ValueError, match="params"):
        twin_log_linear_triton(x, packed, params[:4], 4, 16)


def test_modules_import_without_triton():
    """The reference never needs triton; the kernel module imports and its stub raises a clear error."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from rotkv_kernels.twin_log import twin_log_search, twin_log_pack, twin_log_linear_ref\n"
        "import rotkv_kernels.twin_log_triton as k\n"
        "assert not k.HAS_TRITON\n"
        "c, p = twin_log_search(torch.randn(4, 8), 4)\n"
        "twin_log_linear_ref(torch.randn(1, 8), twin_log_pack(c, 4), p, 4, 8)\n"
        "try:\n"
        "    k.twin_log_linear_triton(torch.randn(1, 8), twin_log_pack(c, 4), p, 4, 8)\n"
        "except NotImplementedError as e:\n"
        "    assert 'needs Triton, which is not installed' in str(e); print('stub-ok')\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "stub-ok" in r.stdout
