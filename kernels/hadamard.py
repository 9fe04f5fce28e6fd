"""Normalized Walsh-Hadamard transforms over the last dimension (pure PyTorch reference).

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H @ H.T == n * I``; ``H / sqrt(n)`` is
orthogonal. Orders supported here are ``n = m * 2**k`` where ``m`` is 1 or the order of a Paley
matrix (``m - 1`` a prime congruent to 3 mod 4, Paley I; or ``m / 2 - 1`` a prime congruent to 1 mod 4,
Paley II): 12, 20, 28, 36, 44, 60, ... The matrix is ``kron(H_m, H_{2^k})`` and every small matrix is
generated at run time, never pasted as a table.

``hadamard_transform(x)`` computes ``x @ H.T / sqrt(n)`` for ``x`` of shape ``(..., n)``: the 2**k
part by a butterfly (``k`` add/sub stages, O(n log n)), the ``m`` part by a small dense matmul. With
``block_size=b`` it applies the block-diagonal ``kron(I_{n/b}, H_b / sqrt(b))`` instead.
``inverse=True`` applies the transpose (Paley matrices are not symmetric, Sylvester ones are).
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "hadamard_matrix",
    "hadamard_transform",
    "hadamard_transform_ref",
    "has_hadamard",
    "hadamard_factors",
]


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    return all(p % d for d in range(2, int(math.isqrt(p)) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) over GF(q), q prime, chi the quadratic character (0 at 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.int64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley_core(m: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order m from a Paley construction, or None if none applies."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.int64)
    if m == 2:
        return torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    q = m - 1
    if m % 4 == 0 and _is_prime(q) and q % 4 == 3:
        # Paley I: H = I + S with S = [[0, 1^T], [-1, Q]] skew-symmetric of order q + 1.
        s = torch.zeros(m, m, dtype=torch.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return torch.eye(m, dtype=torch.int64) + s
    if m % 4 == 0:
        q = m // 2 - 1
        if _is_prime(q) and q % 4 == 1:
            # Paley II: C = [[0, 1^T], [1, Q]] is a symmetric conference matrix of order q + 1;
            # H = C (x) [[1, -1], [-1, -1]] + I (x) [[1, 1], [1, -1]].
            c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
            c[0, 1:] = 1
            c[1:, 0] = 1
            c[1:, 1:] = _jacobsthal(q)
            a = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
            b = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
            return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)
    return None


@functools.lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[int, int] | None:
    """Split ``n = m * 2**k`` with the smallest generated core order ``m`` (1 for powers of two).

    Returns ``(m, 2**k)`` or ``None`` when no construction here reaches ``n``.
    """
    if n < 1:
        return None
    pow2 = n & -n
    odd = n // pow2
    # m must be odd * 2**j for some j <= log2(pow2); prefer the smallest m that has a core.
    j = 0
    while (1 << j) <= pow2:
        m = odd << j
        if _paley_core(m) is not None:
            return m, n // m
        j += 1
    return None


def has_hadamard(n: int) -> bool:
    """Whether ``hadamard_matrix(n)`` can be built."""
    return hadamard_factors(n) is not None


@functools.lru_cache(maxsize=None)
def _core_matrix(m: int) -> torch.Tensor:
    h = _paley_core(m)
    if h is None:  # hadamard_factors only returns constructible cores
        raise AssertionError(f"no Paley core of order {m}")
    # Internal invariant: the construction really is Hadamard.
    if not torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.int64)):
        raise AssertionError(f"Paley construction of order {m} is not Hadamard")
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None, normalized: bool = True) -> torch.Tensor:
    """The order-``n`` Hadamard matrix ``kron(H_m, H_{2^k})``, divided by ``sqrt(n)`` if ``normalized``.

    Args:
        n: order; must be ``m * 2**k`` with ``m`` constructible (see module docstring).
    Returns:
        ``(n, n)`` tensor of ``dtype`` on ``device``.
    Raises:
        ValueError: if no Hadamard matrix of order ``n`` can be generated here.
    """
    f = hadamard_factors(n)
    if f is None:
        raise ValueError(
            f"no Hadamard matrix of order {n}: supported orders are m * 2**k with m in 1, 12, 20, 28, 36, 44, ... "
            "(m - 1 prime = 3 mod 4, or m / 2 - 1 prime = 1 mod 4)"
        )
    m, p = f
    h = torch.kron(_core_matrix(m), _sylvester(p)).to(torch.float64)
    if normalized:
        h = h / math.sqrt(n)
    return h.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _fwht_pow2(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Sylvester transform over the last dim (a power of two), by butterflies."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    y = x
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(*lead, n)


def hadamard_transform(
    x: torch.Tensor, block_size: int | None = None, inverse: bool = False
) -> torch.Tensor:
    """Normalized Hadamard transform over the last dimension.

    Args:
        x: ``(..., n)`` float tensor (fp32, fp16 or bf16). Arithmetic is done in fp32.
        block_size: if given, apply ``H_b / sqrt(b)`` to each consecutive block of ``b`` channels
            (block-diagonal mode); ``n`` must be a multiple of ``b``.
        inverse: apply the inverse (the transpose) instead.
    Returns:
        tensor of the same shape and dtype; equals ``x @ H.T / sqrt(n)`` (``x @ H / sqrt(n)`` if inverse).
    Raises:
        ValueError: bad ``block_size`` or an order with no Hadamard matrix.
    """
    n = x.shape[-1]
    b = n if block_size is None else int(block_size)
    if b < 1 or n % b:
        raise ValueError(f"block_size={block_size} must divide the last dimension {n}")
    f = hadamard_factors(b)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {b} (block_size or last dimension)")
    m, p = f
    dtype = x.dtype
    y = x.to(torch.float32).reshape(*x.shape[:-1], n // b, m, p)
    y = _fwht_pow2(y)
    if m > 1:
        core = _core_matrix(m).to(torch.float32)
        # out[..., i, :] = sum_j H_m[i, j] y[..., j, :]  (forward)  or  H_m[j, i]  (inverse)
        c = core.T if inverse else core
        y = torch.einsum("ij,...jp->...ip", c.to(y.device), y)
    y = y * (1.0 / math.sqrt(b))
    return y.reshape(x.shape).to(dtype)


def hadamard_transform_ref(
    x: torch.Tensor, block_size: int | None = None, inverse: bool = False
) -> torch.Tensor:
    """Dense reference: ``x @ H.T`` (or ``x @ H``) with the explicit normalized matrix, in fp64."""
    n = x.shape[-1]
    b = n if block_size is None else int(block_size)
    if b < 1 or n % b:
        raise ValueError(f"block_size={block_size} must divide the last dimension {n}")
    h = hadamard_matrix(b, dtype=torch.float64, device=x.device)
    y = x.to(torch.float64).reshape(*x.shape[:-1], n // b, b)
    y = y @ (h if inverse else h.T)
    return y.reshape(x.shape).to(x.dtype)
