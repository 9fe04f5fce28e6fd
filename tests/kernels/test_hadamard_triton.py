"""Triton Hadamard kernel vs the fp64 truth and the PyTorch reference (``TRITON_INTERPRET=1`` on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_bounds import (
    TINY_ABS,
    UNIT_ROUNDOFF,
    device_for_triton,
    hadamard_fp32_bound,
    ref_hadamard_terms,
    triton_hadamard_terms,
)
from rotkv_kernels.hadamard import hadamard_matrix, hadamard_transform

SIZES = [1, 12, 20, 64, 128, 192, 576, 1152, 1536, 4096]


@pytest.fixture(scope="module")
def device():
    return device_for_triton()


def _truth(x, block, inverse=False):
    h = hadamard_matrix(block, dtype=torch.float64, device=x.device)
    xb = x.double().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    return (xb @ (h if inverse else h.T)).reshape(x.shape)


@pytest.mark.parametrize("n", [1, 12, 20, 28, 36, 44, 64, 128, 192, 256, 576, 1152, 1536, 4096])
def test_plan_factors_rebuild_the_matrix(n):
    """The kernel's split ``H_n = kron(A, B)`` (with padding at least 16 for tl.dot) is the library's matrix."""
    from rotkv_kernels.hadamard_triton import hadamard_plan

    plan = hadamard_plan(n)
    a, b = plan.factors()
    assert plan.a * plan.b == n and plan.b_pad >= 16 and (plan.a_pad == 1 or plan.a_pad >= 16)
    assert torch.equal(torch.kron(a, b), hadamard_matrix(n, dtype=torch.float64, normalized=False))


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_fp32_matches_truth_and_reference(device, n, inverse):
    from rotkv_kernels.hadamard_triton import hadamard_transform_triton

    torch.manual_seed(n)
    x = torch.randn(5, n, device=device)  # 5 rows: the last program's tile is partly masked
    y = hadamard_transform_triton(x, inverse=inverse)
    truth = _truth(x, n, inverse)
    bound = hadamard_fp32_bound(x, n, triton_hadamard_terms(n))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((y.double() - truth).abs() <= bound).all()
    ref = hadamard_transform(x, inverse=inverse)
    both = bound + hadamard_fp32_bound(x, n, ref_hadamard_terms(n))
    assert ((y.double() - ref.double()).abs() <= both).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [12, 192, 576, 4096])
def test_low_precision_vs_torch_error(device, n, dtype):
    from rotkv_kernels.hadamard_triton import hadamard_transform_triton

    torch.manual_seed(n + 3)
    x = torch.randn(3, n, device=device).to(dtype)
    y = hadamard_transform_triton(x)
    assert y.dtype == dtype
    truth = _truth(x, n)
    err = (y.double() - truth).abs()
    torch_err = (F.linear(x, hadamard_matrix(n, dtype=dtype, device=device)).double() - truth).abs().max()
    assert err.max() <= 2 * torch_err + TINY_ABS[dtype]
    u = UNIT_ROUNDOFF[dtype]
    bound = hadamard_fp32_bound(x, n, triton_hadamard_terms(n)) * (1 + u) + u * truth.abs() + TINY_ABS[dtype]
    assert (err <= bound).all()
    # fp32 sums then one round-to-nearest-even: equal to the reference except where the fp32 values differ
    ref = hadamard_transform(x)
    assert (y.double() - ref.double()).abs().max() <= 2 * u * truth.abs().max() + 2 * bound.max()


@pytest.mark.parametrize("n,block,inverse", [(4096, 64, False), (576, 192, True), (1536, 12, False),
                                             (256, 128, True)])
def test_block_diagonal(device, n, block, inverse):
    from rotkv_kernels.hadamard_triton import hadamard_transform_triton

    torch.manual_seed(block)
    x = torch.randn(2, 3, n, device=device)
    y = hadamard_transform_triton(x, block_size=block, inverse=inverse)
    bound = hadamard_fp32_bound(x, block, triton_hadamard_terms(block))
    assert ((y.double() - _truth(x, block, inverse)).abs() <= bound).all()


def test_round_trip_and_errors(device):
    from rotkv_kernels.hadamard_triton import hadamard_transform_triton

    x = torch.randn(4, 192, device=device)
    back = hadamard_transform_triton(hadamard_transform_triton(x), inverse=True)
    bound = 2 * hadamard_fp32_bound(x, 192, triton_hadamard_terms(192)) * 1.01
    assert ((back.double() - x.double()).abs() <= bound).all()
    with pytest.raises(ValueError, match="no Hadamard matrix of order 52"):
        hadamard_transform_triton(torch.zeros(2, 52, device=device))
    with pytest.raises(ValueError, match="block_size=48 must divide"):
        hadamard_transform_triton(torch.zeros(2, 64, device=device), block_size=48)
    with pytest.raises(ValueError, match="x.dtype=torch.float64"):
        hadamard_transform_triton(torch.zeros(2, 64, device=device, dtype=torch.float64))


def test_opcheck(device):
    from rotkv_kernels.hadamard_triton import hadamard_transform_triton  # noqa: F401 - registers the op

    x = torch.randn(3, 192, device=device)
    torch.library.opcheck(torch.ops.rotkv.hadamard_transform_triton, (x, 64, True))
