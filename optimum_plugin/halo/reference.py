"""Emulated HALO linear built from fake-quantizers, so that *autograd* derives its backward.

The oracle for :class:`optimum_plugin.halo.functional.HALOLinearFunction`: nothing here is a
hand-written backward of the layer. It composes differentiable rotations (the same Hadamard code,
whose autograd is the transpose), straight-through fake quantizers on the forward operands, and
"gradient quantizers" (identity forward, quantize the incoming gradient backward). Each backward
GEMM gets its own branch, built so that its forward value cancels::

    Y   = Yf.detach() + (Y1 - Y1.detach()) + (Y2 - Y2.detach()) + b
    Yf  = fq(rot X) fq(rot W)^T                               forward value
    Y1  = Tt( gq_x( T( fq(rot X) Wx^T ) ) )                  only X is live: autograd gives dX
    Y2  = gq_w( fq(rot X).detach() fq(rot W)^T )              only W is live: autograd gives dW

``fq`` quantizes and dequantizes with an identity backward; ``Wx`` is the weight operand of the
input-gradient GEMM (``fq(rot W)`` detached); ``T``/``Tt`` are the level-2 token rotation and its
inverse (identities below level 2); ``gq_x``/``gq_w`` quantize the gradient the way each GEMM
quantizes ``E`` (row granularity folds the other operand's scales in, see ``functional``).
Everything runs in float64 except the quantizers, which see the same float32 values as the layer.
"""

from __future__ import annotations

import torch

from optimum_plugin.halo.config import HALOConfig
from optimum_plugin.halo.functional import rotate_features, rotate_tokens, unrotate_tokens
from rotkv_kernels.lowp_matmul import dequantize_lowp, quantize_lowp

__all__ = ["halo_linear_reference"]


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, dtype, granularity):
        q, s = quantize_lowp(t.to(torch.float32), dtype, granularity)
        ctx.mark_non_differentiable(s)
        return dequantize_lowp(q, s, torch.float64), s

    @staticmethod
    def backward(ctx, g, _gs):
        return g, None, None


class _GradQuant(torch.autograd.Function):
    """Identity forward; backward returns ``deq(Q(g * fold)) / fold`` (fold: scales of the other operand)."""

    @staticmethod
    def forward(ctx, t, fold, transpose, dtype, granularity):
        ctx.save_for_backward(fold)
        ctx.transpose, ctx.dtype, ctx.granularity = transpose, dtype, granularity
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        (fold,) = ctx.saved_tensors
        a = (g * fold).to(torch.float32)
        a = a.T.contiguous() if ctx.transpose else a
        q, s = quantize_lowp(a, ctx.dtype, ctx.granularity)
        d = dequantize_lowp(q, s, torch.float64)
        d = d.T if ctx.transpose else d
        return d / fold, None, None, None, None


def halo_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: HALOConfig
) -> torch.Tensor:
    """Float64 emulation of HALO's ``F.linear`` whose gradients come from autograd.

    Args:
        x: ``(M, K)`` (requires_grad as needed); weight ``(N, K)``; bias ``(N,)`` or None.
    Returns:
        ``(M, N)`` float64.
    """
    row = cfg.granularity == "row"
    m = x.shape[0]
    xr = rotate_features(x, cfg)
    wr = rotate_features(weight, cfg)
    xq, sx = _FakeQuantSTE.apply(xr, cfg.dtype, cfg.granularity)
    wq, sw = _FakeQuantSTE.apply(wr, cfg.dtype, cfg.granularity)
    one = torch.ones((), dtype=torch.float64, device=x.device)

    yf = xq.detach() @ wq.detach().T

    # Input-gradient branch: the layer quantizes (T (E * s_w^T)) per row, or T E per tensor.
    z1 = xq @ wq.detach().T
    fold_x = sw.to(torch.float64).T if row else one
    if cfg.level == 2:
        # Y1 = T^T gq(T z1): autograd turns this into T^T Q(T E)
        u = rotate_tokens(z1, cfg.token_block_size).to(torch.float64)
        y1 = unrotate_tokens(_GradQuant.apply(u, fold_x, False, cfg.dtype, cfg.granularity), cfg.token_block_size, m)
        y1 = y1.to(torch.float64)
    else:
        y1 = _GradQuant.apply(z1, fold_x, False, cfg.dtype, cfg.granularity)

    # Weight-gradient branch: the layer quantizes (E * s_x)^T per row (per output channel), or E^T.
    z2 = xq.detach() @ wq.T
    fold_w = sx.to(torch.float64) if row else one
    y2 = _GradQuant.apply(z2, fold_w, True, cfg.dtype, cfg.granularity)

    y = yf + (y1 - y1.detach()) + (y2 - y2.detach())
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y
