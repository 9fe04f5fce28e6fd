"""The Adaptive Rotation Scheme of LRQ-DiT: smoothing, a fluctuation metric, Hadamard or outlier-aware rotations.

For a linear layer ``y = x W^T + b`` with calibration activations ``X`` (tokens x ``n``):

0. **Shift** (``quantizer.channel_shift``): ``delta_j = mean(X_j)``, subtracted from the input and folded into
   the bias (``b' = b + W delta``), so that no channel carries a constant offset into the rotation.
1. **Smoothing** (per channel ``j``): ``s_j = max|X_j - delta_j|**alpha / max|W_j|**(1 - alpha)``, in fp16.
2. **Fluctuation metric** of the smoothed activations ``(X - delta) / s``: with ``m_j`` the per-channel
   absolute maximum, ``F = max_j m_j / median_j m_j``. Mild outliers (``F`` below the threshold) are spread
   well by a Hadamard rotation; salient outliers concentrated in a few channels (``F`` above it) get the
   outlier-aware rotation. Under ``rotation="auto"`` a layer whose chosen rotation does not lower the per-token
   quantization error of its calibration activations is left unrotated.
3. **Rotation** ``R`` (orthogonal, block-diagonal with blocks of ``b`` channels):

   * Hadamard: ``x -> x H_b^T / sqrt(b)`` per block (``rotkv_kernels.hadamard.hadamard_transform``).
   * Outlier-aware (after DuQuant): ``R = R_1 P R_2``. Each ``R_k`` is built greedily per block: find the
     channel ``d`` holding the block's largest |activation|, rotate by ``E_d M E_d`` where ``E_d`` swaps
     channels 0 and ``d`` and ``M = H_b^T diag(s) / sqrt(b)`` with random signs ``s`` (``s_0 = +1``): row ``d``
     of that matrix has all entries ``+-1/sqrt(b)``, so channel ``d`` is spread evenly over the block. A
     step is kept only if it lowers the block's maximum; at most ``greedy_steps`` steps. ``P`` is the zigzag
     permutation: channels sorted by their maximum after ``R_1`` are dealt to blocks 0,1,..,K-1,K-1,..,0,0,..
     so every block gets a similar share of large channels before ``R_2``.

The transform applied to activations is ``x' = rotate((x - delta) / s)``; the weight is folded offline as
``W' = rotate(W * s)`` (``rotate`` acting on each row), so
``x' W'^T + b' = (x - delta) diag(1/s) R R^T diag(s) W^T + b + W delta = x W^T + b``.
An outlier-aware rotation is stored compactly and rebuilt exactly: the chosen channels ``(2, K, steps)``
(-1 where a block stopped early), the signs ``(2, K, steps, b)`` bit-packed, and the permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rotkv_kernels.hadamard import hadamard_matrix, hadamard_transform, has_hadamard

__all__ = [
    "OutlierRotation",
    "apply_block_rotation",
    "default_block_size",
    "fluctuation",
    "greedy_block_rotation",
    "pack_bits",
    "rebuild_block_rotation",
    "rotate",
    "smoothing_factors",
    "unpack_bits",
    "zigzag_permutation",
]

OUTLIER_DEFAULT_MAX_BLOCK = 64


def default_block_size(n: int, rotation: str, requested: int | None) -> int:
    """Block size of a rotation over ``n`` channels.

    ``requested`` (the config's ``rotation_block_size``) must divide ``n`` and have a Hadamard matrix. Without
    one: Hadamard rotations use ``n`` itself when ``hadamard_matrix(n)`` exists, else the largest order dividing
    ``n`` that has one; outlier-aware rotations use the largest such order ``<= 64``.

    Raises:
        ValueError: a requested size that does not divide ``n`` or has no Hadamard matrix, or an ``n`` with no
            usable block at all.
    """
    if requested is not None:
        if n % requested:
            raise ValueError(f"rotation_block_size={requested} does not divide the layer's input width {n}")
        if not has_hadamard(requested):
            raise ValueError(
                f"rotation_block_size={requested} has no Hadamard matrix (use m * 2**k, m in 1, 12, 20, ..)"
            )
        return requested
    cap = n if rotation == "hadamard" else min(n, OUTLIER_DEFAULT_MAX_BLOCK)
    best = max((d for d in range(2, cap + 1) if n % d == 0 and has_hadamard(d)), default=0)
    if best == 0:
        raise ValueError(f"input width {n} has no divisor with a Hadamard matrix: use rotation='none' for this layer")
    return best


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)``, clamped to ``[1e-4, 1e4]``, rounded to fp16.

    Args:
        act_absmax: ``(n,)`` per-channel max |activation| over the calibration tokens.
        weight: ``(out, n)``.
    Returns:
        ``(n,)`` float32 holding fp16 values (1 for channels that never fired or have zero weights).
    """
    a = act_absmax.to(torch.float32)
    w = weight.detach().to(torch.float32).abs().amax(dim=0)
    ok = (a > 0) & (w > 0)
    s = torch.ones_like(a)
    s[ok] = a[ok].pow(alpha) / w[ok].pow(1.0 - alpha)
    return s.clamp(1e-4, 1e4).to(torch.float16).to(torch.float32)


def fluctuation(act_absmax: torch.Tensor) -> float:
    """``max_j m_j / median_j m_j`` of per-channel maxima ``m`` (``inf`` if the median is 0)."""
    m = act_absmax.to(torch.float64)
    med = m.median()
    if med <= 0:
        return math.inf
    return float(m.max() / med)


def pack_bits(b: torch.Tensor) -> torch.Tensor:
    """Bool ``(..., n)`` -> uint8 ``(..., ceil(n / 8))``, bit ``i % 8`` of byte ``i // 8`` (padding bits 0)."""
    n = b.shape[-1]
    pad = (-n) % 8
    x = torch.nn.functional.pad(b.to(torch.int64), (0, pad)).reshape(*b.shape[:-1], -1, 8)
    weights = 1 << torch.arange(8, dtype=torch.int64, device=b.device)
    return (x * weights).sum(-1).to(torch.uint8)


def unpack_bits(p: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: bool ``(..., n)``."""
    bits = (p.to(torch.int64)[..., None] >> torch.arange(8, dtype=torch.int64, device=p.device)) & 1
    return bits.reshape(*p.shape[:-1], -1)[..., :n].bool()


def _step_matrices(channels: torch.Tensor, signs: torch.Tensor, b: int) -> torch.Tensor:
    """``E_d H_b^T diag(s) E_d / sqrt(b)`` for each block: channels ``(K,)``, signs bool ``(K, b)`` (True: -1).

    Returns ``(K, b, b)`` float64; blocks with ``d < 0`` get the identity.
    """
    k = channels.shape[0]
    h = hadamard_matrix(b, dtype=torch.float64).T  # H^T / sqrt(b): applying it to x gives hadamard_transform(x)
    sgn = 1.0 - 2.0 * signs.to(torch.float64)  # (K, b)
    sgn[:, 0] = 1.0
    m = h[None] * sgn[:, None, :]  # scale columns
    d = channels.to(torch.int64).clamp_min(0)
    idx = torch.arange(b)[None].repeat(k, 1)
    ar = torch.arange(k)
    idx[ar, 0] = d
    idx[ar, d] = 0
    # E_d M E_d: permute rows and columns by the swap (0 d).
    out = torch.gather(m, 1, idx[:, :, None].expand(k, b, b))
    out = torch.gather(out, 2, idx[:, None, :].expand(k, b, b))
    eye = torch.eye(b, dtype=torch.float64)[None].expand(k, b, b)
    return torch.where((channels >= 0)[:, None, None], out, eye)


def apply_block_rotation(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., K*b)`` times block-diagonal ``diag(blocks[0], .., blocks[K-1])`` (``blocks`` ``(K, b, b)``)."""
    k, b, _ = blocks.shape
    xb = x.reshape(*x.shape[:-1], k, b)
    return torch.einsum("...kb,kbc->...kc", xb, blocks.to(x.dtype)).reshape(x.shape)


def greedy_block_rotation(
    x: torch.Tensor, block: int, steps: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy outlier-spreading rotation, per block of ``block`` channels.

    Args:
        x: ``(N, n)`` calibration activations, ``n % block == 0``.
        block: block width (has a Hadamard matrix).
        steps: at most this many steps per block.
        generator: source of the random signs (CPU).
    Returns:
        ``channels`` ``(K, steps)`` int16 (-1 after a block stopped), ``signs`` bool ``(K, steps, block)``,
        ``R`` ``(K, block, block)`` float64 with ``x R`` the rotated activations.
    """
    n = x.shape[-1]
    k = n // block
    xb = x.detach().to(torch.float64).reshape(-1, k, block)
    r = torch.eye(block, dtype=torch.float64)[None].repeat(k, 1, 1)
    channels = torch.full((k, steps), -1, dtype=torch.int16)
    signs = torch.zeros(k, steps, block, dtype=torch.bool)
    active = torch.ones(k, dtype=torch.bool)
    for s in range(steps):
        m = xb.abs().amax(dim=0)  # (K, b)
        cur = m.amax(dim=1)  # (K,)
        d = m.argmax(dim=1)
        sg = torch.rand(k, block, generator=generator) < 0.5
        sg[:, 0] = False
        rs = _step_matrices(d, sg, block)
        cand = torch.einsum("nkb,kbc->nkc", xb, rs)
        better = active & (cand.abs().amax(dim=(0, 2)) < cur)
        if not better.any():
            break
        xb = torch.where(better[None, :, None], cand, xb)
        r = torch.where(better[:, None, None], r @ rs, r)
        channels[better, s] = d[better].to(torch.int16)
        signs[better, s] = sg[better]
        active &= better
    return channels, signs, r


def rebuild_block_rotation(channels: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``R`` ``(K, b, b)`` float64 from the stored ``channels`` ``(K, steps)`` and ``signs`` ``(K, steps, b)``.

    Exactly the product :func:`greedy_block_rotation` accumulated (same float64 operations in the same order).
    """
    k, steps = channels.shape
    b = signs.shape[-1]
    r = torch.eye(b, dtype=torch.float64)[None].repeat(k, 1, 1)
    for s in range(steps):
        c = channels[:, s].to(torch.int64)
        if (c < 0).all():
            break
        rs = _step_matrices(c, signs[:, s], b)
        r = torch.where((c >= 0)[:, None, None], r @ rs, r)
    return r


def zigzag_permutation(channel_max: torch.Tensor, block: int) -> torch.Tensor:
    """Deal channels, sorted by ``channel_max`` (descending), to blocks in zigzag order.

    Rank ``r`` goes to block ``r % K`` on even passes ``r // K`` and to ``K - 1 - r % K`` on odd ones, so each
    block receives one channel of every ``K`` consecutive ranks and the large ones alternate ends.

    Returns:
        ``perm`` ``(n,)`` int64 with ``x[..., perm]`` the permuted activations (block ``i`` = positions
        ``i*block .. (i+1)*block - 1``).
    """
    n = channel_max.shape[0]
    k = n // block
    order = torch.argsort(channel_max.to(torch.float64), descending=True, stable=True)
    ranks = torch.arange(n)
    passes, pos = ranks // k, ranks % k
    blk = torch.where(passes % 2 == 0, pos, k - 1 - pos)
    # Within a block keep the rank order: sort by (block, rank).
    key = blk * n + ranks
    return order[torch.argsort(key)]


@dataclass
class OutlierRotation:
    """A resolved outlier-aware rotation ``R_1 P R_2`` (all blocks of width ``block``)."""

    block: int
    channels: torch.Tensor  # (2, K, steps) int16
    signs: torch.Tensor  # (2, K, steps, block) bool
    perm: torch.Tensor  # (n,) int64

    @classmethod
    def fit(cls, x: torch.Tensor, block: int, steps: int, seed: int = 0) -> "OutlierRotation":
        """Build ``R_1``, the zigzag ``P`` and ``R_2`` greedily from calibration activations ``x`` ``(N, n)``."""
        g = torch.Generator().manual_seed(seed)
        x64 = x.detach().to(torch.float64)
        c1, s1, r1 = greedy_block_rotation(x64, block, steps, g)
        y = apply_block_rotation(x64, r1)
        k = x.shape[-1] // block
        perm = zigzag_permutation(y.abs().amax(dim=0), block) if k > 1 else torch.arange(x.shape[-1])
        c2, s2, _ = greedy_block_rotation(y[:, perm], block, steps, g)
        used = int(max((c1 >= 0).sum(1).max(), (c2 >= 0).sum(1).max(), 1))
        return cls(block, torch.stack([c1, c2])[:, :, :used].contiguous(),
                   torch.stack([s1, s2])[:, :, :used].contiguous(), perm)

    @property
    def steps(self) -> int:
        return self.channels.shape[-1]

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R_1, R_2)`` as ``(K, b, b)`` float32 (rebuilt in float64, then rounded once)."""
        r1 = rebuild_block_rotation(self.channels[0], self.signs[0]).to(torch.float32)
        r2 = rebuild_block_rotation(self.channels[1], self.signs[1]).to(torch.float32)
        return r1, r2


def rotate(x: torch.Tensor, rotation: str, block: int,
           mats: tuple[torch.Tensor, torch.Tensor] | None = None, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Apply a layer's rotation to the last dim of ``x`` (activations, or weight rows for folding)."""
    if rotation == "none":
        return x
    if rotation == "hadamard":
        return hadamard_transform(x, block_size=block)
    if rotation == "outlier_aware":
        assert mats is not None and perm is not None
        y = apply_block_rotation(x, mats[0])
        y = y[..., perm]
        return apply_block_rotation(y, mats[1])
    raise AssertionError(f"unknown rotation {rotation!r}")
