"""Triton kernel: ``y = x @ W^.T + bias`` with ``W^`` Twin-Log dequantized tile by tile from packed codes.

Entry point: :func:`twin_log_linear_triton`. The reference it must match is
``rotkv_kernels.twin_log.twin_log_linear_ref``. The weight never exists in full precision in memory: each
program loads a ``BLOCK_N x BLOCK_K`` tile of packed bytes, unpacks the ``b``-bit codes (8 codes per ``b``
bytes, little-endian), decodes ``(-1)**s * (2**(lo_s + q * step_s) - eta)`` with the row's parameters and
feeds the tile to ``tl.dot`` with an fp32 accumulator.

Runs on a CUDA device, or on the CPU under ``TRITON_INTERPRET=1`` set before import (how the tests run it).
When Triton is not installed this module still imports; the entry point then raises ``NotImplementedError``.
"""

from __future__ import annotations

import torch

from rotkv_kernels.hadamard_triton import check_launchable, is_interpreted
from rotkv_kernels.twin_log import TWIN_LOG_BITS, TWIN_LOG_NUM_PARAMS, twin_log_packed_width

__all__ = ["HAS_TRITON", "twin_log_linear_triton", "triton_runnable"]

try:  # Triton is optional: the pure-PyTorch reference is the fallback the caller chooses explicitly.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by tests/kernels/test_twin_log.py in a subprocess
    triton = None
    tl = None
    HAS_TRITON = False


def triton_runnable(device: torch.device) -> bool:
    """Whether the kernel can run on ``device`` here: CUDA, or the CPU under the Triton interpreter."""
    if not HAS_TRITON:
        return False
    return torch.device(device).type == "cuda" or is_interpreted()


def _check_args(x, packed, params, bits, in_features, bias):
    if bits not in TWIN_LOG_BITS:
        raise ValueError(f"bits={bits!r}: Twin-Log supports {TWIN_LOG_BITS}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects in_features={in_features}")
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != twin_log_packed_width(in_features, bits):
        raise ValueError(
            f"packed width {packed.shape[1]} != {twin_log_packed_width(in_features, bits)} for "
            f"in_features={in_features}, bits={bits}"
        )
    if params.shape != (packed.shape[0], TWIN_LOG_NUM_PARAMS):
        raise ValueError(f"params must be ({packed.shape[0]}, {TWIN_LOG_NUM_PARAMS}), got {tuple(params.shape)}")
    if bias is not None and bias.shape != (packed.shape[0],):
        raise ValueError(f"bias must be ({packed.shape[0]},), got {tuple(bias.shape)}")
    if not (x.device == packed.device == params.device):
        raise ValueError("x, packed and params must be on one device")


if HAS_TRITON:

    @triton.jit
    def _twin_log_linear_fwd_kernel(
        x_ptr, packed_ptr, params_ptr, bias_ptr, y_ptr,
        M, N, K, stride_xm, stride_pn, stride_ym,
        BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        # Row parameters (fp16 in memory, fp32 arithmetic): log2 eta, lo/step of the positive and negative half.
        pbase = params_ptr + offs_n * 5
        log2_eta = tl.load(pbase + 0, mask=mask_n, other=0.0).to(tl.float32)
        lo_p = tl.load(pbase + 1, mask=mask_n, other=0.0).to(tl.float32)
        st_p = tl.load(pbase + 2, mask=mask_n, other=0.0).to(tl.float32)
        lo_n = tl.load(pbase + 3, mask=mask_n, other=0.0).to(tl.float32)
        st_n = tl.load(pbase + 4, mask=mask_n, other=0.0).to(tl.float32)
        eta = tl.exp2(log2_eta)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            wmask = mask_n[:, None] & mask_k[None, :]
            prow = packed_ptr + offs_n[:, None] * stride_pn
            if BITS == 8:
                code = tl.load(prow + offs_k[None, :], mask=wmask, other=0).to(tl.int32)
            else:
                # Code k sits at bit (k % 8) * BITS of the little-endian word in bytes [(k // 8) * BITS, +BITS).
                byte0 = (offs_k // 8) * BITS
                word = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
                for j in tl.static_range(BITS):
                    byte = tl.load(prow + (byte0 + j)[None, :], mask=wmask, other=0).to(tl.int32)
                    word = word | (byte << (8 * j))
                code = (word >> ((offs_k % 8) * BITS)[None, :]) & ((1 << BITS) - 1)
            is_neg = ((code >> (BITS - 1)) & 1) == 1
            q = (code & ((1 << (BITS - 1)) - 1)).to(tl.float32)
            lo = tl.where(is_neg, lo_n[:, None], lo_p[:, None])
            st = tl.where(is_neg, st_n[:, None], st_p[:, None])
            mag = tl.exp2(lo + q * st) - eta[:, None]
            w = tl.where(is_neg, -mag, mag)
            w = tl.where(wmask, w, 0.0)
            acc += tl.dot(x, tl.trans(w))
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += b[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc,
                 mask=mask_m[:, None] & mask_n[None, :])

    def twin_log_linear_triton(
        x: torch.Tensor,
        packed: torch.Tensor,
        params: torch.Tensor,
        bits: int,
        in_features: int,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x @ W^.T + bias`` with Twin-Log weights dequantized inside the kernel.

        Args:
            x: ``(..., in_features)`` float (fp32, fp16 or bf16).
            packed: ``(out, twin_log_packed_width(in_features, bits))`` uint8 codes.
            params: ``(out, 5)`` fp16 row parameters.
            bits: 3, 4 or 8.
            bias: optional ``(out,)``.
        Returns:
            ``(..., out)`` fp32.
        Raises:
            ValueError: shapes, dtypes or devices that do not fit (CPU tensors outside the interpreter).
        """
        _check_args(x, packed, params, bits, in_features, bias)
        check_launchable(x, "twin_log_linear_triton")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features).contiguous()
        m, n = x2.shape[0], packed.shape[0]
        y = torch.empty(m, n, dtype=torch.float32, device=x.device)
        params16 = params.to(torch.float16).contiguous()
        packed = packed.contiguous()
        bias_t = bias.to(torch.float32).contiguous() if bias is not None else params16  # dummy pointer
        block_m, block_n, block_k = 32, 32, 32
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _twin_log_linear_fwd_kernel[grid](
            x2, packed, params16, bias_t, y,
            m, n, in_features, x2.stride(0), packed.stride(0), y.stride(0),
            BITS=bits, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )
        return y.reshape(*lead, n)

else:  # pragma: no cover - exercised only where triton is missing

    def twin_log_linear_triton(
        x: torch.Tensor,
        packed: torch.Tensor,
        params: torch.Tensor,
        bits: int,
        in_features: int,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stub with the kernel's signature: Triton is not installed."""
        raise NotImplementedError(
            "twin_log_linear_triton needs Triton, which is not installed: pip install 'rotkv[triton]' or use "
            "rotkv_kernels.twin_log.twin_log_linear_ref"
        )
