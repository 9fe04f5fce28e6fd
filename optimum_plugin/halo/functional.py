"""The HALO linear layer as a custom autograd function (forward and backward in INT8 / FP8).

Shapes: ``x`` is ``(M, K)`` (M tokens), ``weight`` is ``(N, K)``, ``E = dL/dY`` is ``(M, N)``.
``R`` is the normalized Hadamard matrix over the K input features (full, or block-diagonal), applied
as ``rot(x) = x @ R.T`` (:func:`rotkv_kernels.hadamard.hadamard_transform`), so the paper's ``XH`` is
``rot(X)`` and its ``H^T`` is ``R``. ``T`` is a block-diagonal Hadamard over tokens (level 2 only).
``Q`` is symmetric quantization (:func:`rotkv_kernels.lowp_matmul.quantize_lowp`) and every product
of two ``Q``'s is one low-precision GEMM (:func:`rotkv_kernels.lowp_matmul.lowp_matmul`)::

    forward            Y  = Q(rot X) Q(rot W)^T                 (level 0: no rot)
    input gradient     dX = [Q(E) Q(rot W)] R                   (level 2: T^T [Q(T E) Q(rot W)] R)
    weight gradient    dW = [Q(E^T) Q(rot X)] R

Since ``R R^T = I`` and ``T^T T = I`` these equal ``X W^T``, ``E W`` and ``E^T X`` up to quantization.

The forward saves only the 8-bit operands ``Q(rot X)`` and ``Q(rot W)`` for the backward. With
``granularity="tensor"`` their scales are scalars and the backward GEMMs reuse them as they are
(as in the paper's kernels). With ``granularity="row"`` the saved scales run along the dimension the
backward GEMM contracts over, so they are folded into the full-precision gradient before it is
quantized (exact: ``E diag(s_w) q_w = (E * s_w^T) q_w``)::

    dX: Q_row(E * s_w^T) . q_w           (s_w: one scale per output channel)
    dW: Q_row((E * s_x)^T) . q_x         (s_x: one scale per token)

which keeps the backward in 8 bits without re-quantizing (or keeping) the full-precision X and W.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from optimum_plugin.halo.config import HALOConfig
from rotkv_kernels.hadamard import hadamard_factors, hadamard_matrix
from rotkv_kernels.lowp_matmul import lowp_matmul, quantize_lowp

__all__ = [
    "HALOLinearFunction",
    "halo_linear",
    "rotate_features",
    "unrotate_features",
    "rotate_tokens",
    "unrotate_tokens",
    "quantize_weight",
    "hadamard_rotate",
    "SUPPORTED_INPUT_DTYPES",
]

SUPPORTED_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _kron_factors(b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    m, p = hadamard_factors(b)
    return hadamard_matrix(m, device=device), hadamard_matrix(p, device=device)


def hadamard_rotate(x: torch.Tensor, block: int | None = None, inverse: bool = False) -> torch.Tensor:
    """The transform of :func:`rotkv_kernels.hadamard.hadamard_transform` (``x @ H.T``, or ``x @ H`` if
    ``inverse``; block-diagonal with ``block``), computed as two float32 GEMMs.

    ``H = kron(H_m, H_p)`` (normalized factors from ``rotkv_kernels.hadamard``), so for each block
    viewed as an ``(m, p)`` matrix ``X``, ``x @ H.T = H_m X H_p^T``. Two batched GEMMs cost
    ``2 (m + p)`` flops per element and, in eager PyTorch on the CPU, run one to three orders of
    magnitude faster than the butterfly reference (which stacks a new tensor per stage).

    Args:
        x: ``(..., n)`` float tensor; computed and returned in float32.
    """
    n = x.shape[-1]
    b = n if block is None else block
    if n % b or hadamard_factors(b) is None:  # HALOConfig checks widths; this guards direct callers
        raise ValueError(f"no Hadamard rotation of block {b} over a last dimension of {n}")
    hm, hp = _kron_factors(b, x.device)
    if inverse:
        hm, hp = hm.T, hp.T
    m, p = hm.shape[0], hp.shape[0]
    z = x.to(torch.float32).reshape(-1, p) @ hp.T
    if m > 1:
        z = torch.matmul(hm, z.reshape(-1, m, p))
    return z.reshape(x.shape)


def _block(cfg: HALOConfig) -> int | None:
    return None if cfg.hadamard == "full" else cfg.hadamard_block_size


def rotate_features(x: torch.Tensor, cfg: HALOConfig) -> torch.Tensor:
    """``x @ R.T`` over the last dimension (identity at level 0); float32 result."""
    x = x.to(torch.float32)
    return hadamard_rotate(x, _block(cfg)) if cfg.rotates else x


def unrotate_features(g: torch.Tensor, cfg: HALOConfig) -> torch.Tensor:
    """``g @ R`` over the last dimension: the inverse of :func:`rotate_features`."""
    g = g.to(torch.float32)
    return hadamard_rotate(g, _block(cfg), inverse=True) if cfg.rotates else g


def rotate_tokens(e: torch.Tensor, block: int) -> torch.Tensor:
    """``T e`` for ``e`` of shape ``(M, N)``: block-diagonal Hadamard over rows, rows zero-padded to a
    multiple of ``block``. Returns ``(M_pad, N)`` float32 (padding is exact: ``T`` is orthogonal)."""
    pad = (-e.shape[0]) % block
    e = e.to(torch.float32)
    if pad:
        e = F.pad(e, (0, 0, 0, pad))
    return hadamard_rotate(e.T, block).T


def unrotate_tokens(g: torch.Tensor, block: int, m: int) -> torch.Tensor:
    """``(T^T g)[:m]``: the inverse of :func:`rotate_tokens`, padding rows dropped."""
    return hadamard_rotate(g.to(torch.float32).T, block, inverse=True).T[:m]


def quantize_weight(weight: torch.Tensor, cfg: HALOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q(rot W)``: the 8-bit weight operand, ``(N, K)`` codes and ``(N, 1)`` or ``(1, 1)`` scales."""
    return quantize_lowp(rotate_features(weight, cfg), cfg.dtype, cfg.granularity)


def _grad_input(e, w_q, w_s, cfg: HALOConfig) -> torch.Tensor:
    row = cfg.granularity == "row"
    m = e.shape[0]
    a = e * w_s.T if row else e
    if cfg.level == 2:
        a = rotate_tokens(a, cfg.token_block_size)
    a_q, a_s = quantize_lowp(a, cfg.dtype, cfg.granularity)
    b_s = torch.ones(1, 1, device=e.device) if row else w_s
    g = lowp_matmul(a_q, a_s, w_q.T.contiguous(), b_s, out_dtype=torch.float32, backend=cfg.backend)
    if cfg.level == 2:
        g = unrotate_tokens(g, cfg.token_block_size, m)
    return unrotate_features(g, cfg)


def _grad_weight(e, x_q, x_s, cfg: HALOConfig) -> torch.Tensor:
    row = cfg.granularity == "row"
    a = (e * x_s).T if row else e.T
    a_q, a_s = quantize_lowp(a.contiguous(), cfg.dtype, cfg.granularity)
    b_s = torch.ones(1, 1, device=e.device) if row else x_s
    g = lowp_matmul(a_q, a_s, x_q.T.contiguous(), b_s, out_dtype=torch.float32, backend=cfg.backend)
    return unrotate_features(g, cfg)


class HALOLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with HALO's quantized forward and backward (see module docstring).

    ``apply(x, weight, bias, w_q, w_s, cfg, out_dtype)``:
        x: ``(M, K)`` float; weight: ``(N, K)`` float parameter; bias: ``(N,)`` or None.
        w_q, w_s: a precomputed ``quantize_weight(weight, cfg)`` (frozen weights, HQ-FSDP), or None.
        cfg: the :class:`HALOConfig`; out_dtype: dtype of ``y``.
    Gradients: ``dx`` in ``x.dtype``, ``dW`` in ``weight.dtype`` (8-bit GEMMs), ``db = sum_m E`` in
    full precision.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, w_q, w_s, cfg: HALOConfig, out_dtype: torch.dtype):
        dev = x.device.type
        # Autocast would recast our float32 rotations and emulated GEMMs to bf16; the 8-bit maths
        # decides precision here, so autocast is off inside (the caller chose out_dtype).
        with torch.autocast(dev, enabled=False):
            x_q, x_s = quantize_lowp(rotate_features(x, cfg), cfg.dtype, cfg.granularity)
            if w_q is None:
                w_q, w_s = quantize_weight(weight.detach(), cfg)
            y = lowp_matmul(x_q, x_s, w_q, w_s, out_dtype=torch.float32, backend=cfg.backend)
            if bias is not None:
                y = y + bias.to(torch.float32)
        ctx.save_for_backward(x_q, x_s, w_q, w_s)
        ctx.cfg = cfg
        ctx.x_dtype = x.dtype
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        cfg = ctx.cfg
        gx = gw = gb = None
        with torch.autocast(grad_y.device.type, enabled=False):
            e = grad_y.to(torch.float32)
            if ctx.needs_input_grad[0]:
                gx = _grad_input(e, w_q, w_s, cfg).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                gw = _grad_weight(e, x_q, x_s, cfg).to(ctx.w_dtype)
            if ctx.needs_input_grad[2]:
                gb = e.sum(dim=0).to(ctx.b_dtype)
        return gx, gw, gb, None, None, None, None


def halo_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: HALOConfig,
    w_q: torch.Tensor | None = None,
    w_s: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear`` with HALO's quantized forward and backward.

    Args:
        x: ``(..., K)`` float32, bfloat16 or float16.
        weight: ``(N, K)``; bias: ``(N,)`` or None.
        cfg: the :class:`HALOConfig`.
        w_q, w_s: optional precomputed :func:`quantize_weight` of ``weight``.
    Returns:
        ``(..., N)`` in ``x.dtype`` (the autocast dtype when autocast is on).
    Raises:
        ValueError: an unsupported input dtype or a last dimension that is not ``K``.
    """
    if x.dtype not in SUPPORTED_INPUT_DTYPES:
        raise ValueError(
            f"HALO linear input has dtype {x.dtype}: supported are float32, bfloat16 and float16 "
            "(quantized inputs are produced inside the layer)"
        )
    k = weight.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"HALO linear input has last dimension {x.shape[-1]}, the weight expects in_features={k}")
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return torch.zeros(*x.shape[:-1], weight.shape[0], dtype=out_dtype, device=x.device)
    y = HALOLinearFunction.apply(x2, weight, bias, w_q, w_s, cfg, out_dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])
