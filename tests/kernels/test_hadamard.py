"""The pure-PyTorch Hadamard reference (``rotkv_kernels.hadamard``) against dense fp64 maths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernel_bounds import TINY_ABS, UNIT_ROUNDOFF, hadamard_fp32_bound, ref_hadamard_terms
from rotkv_kernels.hadamard import (
    hadamard_factors,
    hadamard_matrix,
    hadamard_transform,
    hadamard_transform_ref,
    has_hadamard,
)

POW2 = [2**k for k in range(13)]  # 1 .. 4096
NON_POW2 = [12, 20, 28, 36, 44, 192, 576, 1152, 1536]
SIZES = POW2 + NON_POW2
NO_HADAMARD = [3, 6, 10, 52, 100]  # 52 and 100 exist in theory but not by the Paley/Sylvester constructions here


def _truth(x: torch.Tensor, block: int, inverse: bool = False) -> torch.Tensor:
    """fp64 dense ``x @ H.T`` per block (``x @ H`` if inverse)."""
    h = hadamard_matrix(block, dtype=torch.float64)
    xb = x.double().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    return (xb @ (h if inverse else h.T)).reshape(x.shape)


@pytest.mark.parametrize("n", SIZES)
def test_matrix_is_orthogonal_and_pm1(n):
    # Above 1536 a random subset of 128 rows keeps the O(n^3) product cheap; rows are chosen afresh per run.
    rows = torch.arange(n) if n <= 1536 else torch.randperm(n)[:128]
    hn = hadamard_matrix(n, dtype=torch.float64)
    h = (hn * math.sqrt(n)).round().float()  # the +-1 matrix (checked to be exactly that just below)
    assert h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    # +-1 entries and sums of at most 4096 terms: integers below 2^24, exact in fp32
    assert torch.equal(h[rows] @ h.T, n * torch.eye(n)[rows])
    # Normalized: every entry +-1/sqrt(n) (one fp64 division), so H H^T = I up to n fp64 roundings.
    assert torch.allclose(hn.abs(), torch.full_like(hn, 1 / math.sqrt(n)), rtol=2**-52, atol=0)
    eye = torch.eye(n, dtype=torch.float64)[rows]
    assert (hn[rows] @ hn.T - eye).abs().max() <= (n + 2) * 2.0**-52


@pytest.mark.parametrize("n", SIZES)
def test_transform_matches_dense_fp32(n):
    torch.manual_seed(n)
    x = torch.randn(6, n)
    y = hadamard_transform(x)
    truth = _truth(x, n)
    bound = hadamard_fp32_bound(x, n, ref_hadamard_terms(n))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((y.double() - truth).abs() <= bound).all()
    # the dense helper in the same module agrees too (fp64 inside, so it is within one fp32 rounding)
    assert torch.allclose(hadamard_transform_ref(x), truth.float(), rtol=2**-23, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 8, 12, 64, 192, 576, 1536, 4096])
def test_transform_low_precision_vs_torch_error(n, dtype):
    """err(ours) <= 2 * err(torch's own matmul in that dtype) + atol, and within the derived bound."""
    torch.manual_seed(n + 1)
    x = torch.randn(8, n).to(dtype)
    truth = _truth(x, n)
    y = hadamard_transform(x)
    assert y.dtype == dtype
    err = (y.double() - truth).abs()
    torch_err = (F.linear(x, hadamard_matrix(n, dtype=dtype)).double() - truth).abs().max()
    atol = TINY_ABS[dtype]
    assert err.max() <= 2 * torch_err + atol
    # fp32 arithmetic, then one rounding to dtype: |err| <= fp32 bound + u_dtype * |truth| (+ subnormal floor)
    u = UNIT_ROUNDOFF[dtype]
    bound = hadamard_fp32_bound(x, n, ref_hadamard_terms(n)) * (1 + u) + u * truth.abs() + atol
    assert (err <= bound).all()


@pytest.mark.parametrize("n,block", [(4096, 64), (576, 192), (1536, 12), (192, 64), (12, 12), (256, 1)])
def test_block_diagonal(n, block):
    torch.manual_seed(block)
    x = torch.randn(3, 5, n)
    y = hadamard_transform(x, block_size=block)
    # each block on its own, with the full (non-block) transform: the same arithmetic, so bit-identical
    per_block = hadamard_transform(x.reshape(3, 5, n // block, block)).reshape(x.shape)
    assert torch.equal(y, per_block)
    assert ((y.double() - _truth(x, block)).abs() <= hadamard_fp32_bound(x, block, ref_hadamard_terms(block))).all()


@pytest.mark.parametrize("n", [12, 20, 28, 36, 44, 192, 64])
def test_inverse_is_transpose(n):
    torch.manual_seed(n + 2)
    x = torch.randn(4, 2 * n)
    yi = hadamard_transform(x, block_size=n, inverse=True)
    bound = hadamard_fp32_bound(x, n, ref_hadamard_terms(n))
    assert ((yi.double() - _truth(x, n, inverse=True)).abs() <= bound).all()
    # round trip: forward then inverse is the identity up to two transforms' rounding
    y = hadamard_transform(x, block_size=n)
    back = hadamard_transform(y, block_size=n, inverse=True)
    bound2 = bound + hadamard_fp32_bound(y, n, ref_hadamard_terms(n)) * 2
    assert ((back.double() - x.double()).abs() <= bound2).all()


def test_paley_cores_are_not_symmetric():
    """Guards the inverse test: for Paley I orders (q = n - 1 prime, 3 mod 4) the transpose differs from the
    matrix (Paley II cores, 28 and 36 here, are symmetric)."""
    for n in (12, 20, 44, 192, 1536):
        h = hadamard_matrix(n, dtype=torch.float64, normalized=False)
        assert not torch.equal(h, h.T), n
        x = torch.randn(1, n, dtype=torch.float64)
        assert not torch.allclose(hadamard_transform(x), hadamard_transform(x, inverse=True))


@pytest.mark.parametrize("n", NO_HADAMARD)
def test_no_hadamard_order_raises(n):
    assert not has_hadamard(n)
    assert hadamard_factors(n) is None
    with pytest.raises(ValueError, match=f"no Hadamard matrix of order {n}"):
        hadamard_matrix(n)
    with pytest.raises(ValueError, match="no Hadamard"):
        hadamard_transform(torch.zeros(2, n))
    with pytest.raises(ValueError, match="no Hadamard"):
        hadamard_transform(torch.zeros(2, 2 * n), block_size=n)


def test_bad_block_size_raises():
    with pytest.raises(ValueError, match="block_size=48 must divide"):
        hadamard_transform(torch.zeros(2, 64), block_size=48)
    with pytest.raises(ValueError, match="block_size=0"):
        hadamard_transform(torch.zeros(2, 64), block_size=0)
