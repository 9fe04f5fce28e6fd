"""Triton INT8 / FP8-e4m3 GEMM with row or tensor scales: ``lowp_matmul_triton``.

Computes, in the ``F.linear`` (NT) layout of :mod:`rotkv_kernels.lowp_matmul`,

    out[m, n] = a_scale[m] * b_scale[n] * sum_k a_q[m, k] * b_q[n, k]

with int8 operands accumulated in int32 (exact) and fp8-e4m3 operands accumulated in float32. A
``(1, 1)`` scale is read with stride 0, so per-tensor and per-row scales share one kernel. On GPUs
without fp8 tensor cores (compute capability < 8.9) fp8 tiles are upcast to fp16 before ``tl.dot``:
every e4m3 value is exact in fp16, so only the accumulation order differs.

The kernel is tested on the CPU under ``TRITON_INTERPRET=1`` against ``lowp_matmul_ref``. Without
Triton this module still imports; ``lowp_matmul_triton`` then raises ``NotImplementedError``.
"""

from __future__ import annotations

import os

import torch

__all__ = ["lowp_matmul_triton", "has_triton"]


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(a_q, a_scale, b_q, b_scale) -> None:
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"lowp_matmul_triton expects (M, K) x (N, K) operands, got {tuple(a_q.shape)}, {tuple(b_q.shape)}")
    if a_q.dtype != b_q.dtype or a_q.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"operands must both be int8 or both float8_e4m3fn, got {a_q.dtype} and {b_q.dtype}")
    m, n = a_q.shape[0], b_q.shape[0]
    if tuple(a_scale.shape) not in ((m, 1), (1, 1)) or tuple(b_scale.shape) not in ((n, 1), (1, 1)):
        raise ValueError(
            f"scales must be (M, 1)/(1, 1) and (N, 1)/(1, 1); got {tuple(a_scale.shape)} and {tuple(b_scale.shape)}"
        )
    if a_q.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"lowp_matmul_triton runs on CUDA tensors (got {a_q.device.type}); on the CPU set TRITON_INTERPRET=1 "
            "(tests) or use lowp_matmul(..., backend='int_mm' or 'emulated')"
        )


if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _lowp_matmul_fwd_kernel(
        A, B, SA, SB, C,
        M, N, K,
        stride_am, stride_ak, stride_bn, stride_bk, stride_sa, stride_sb, stride_cm, stride_cn,
        IS_INT8: tl.constexpr,
        UPCAST_FP8: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One (BLOCK_M, BLOCK_N) tile of C = diag(SA) (A @ B^T) diag(SB); A (M, K), B (N, K) K-contiguous."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # IS_INT8 is constexpr so only one accumulator type is compiled.
        if IS_INT8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a_mask = (rm[:, None] < M) & (kk[None, :] < K)
            b_mask = (rn[None, :] < N) & (kk[:, None] < K)
            # Zero padding contributes nothing to the sums, so ragged M, N, K need no special case.
            if IS_INT8:
                a = tl.load(A + rm[:, None] * stride_am + kk[None, :] * stride_ak, mask=a_mask, other=0)
                b = tl.load(B + rn[None, :] * stride_bn + kk[:, None] * stride_bk, mask=b_mask, other=0)
                acc += tl.dot(a, b, out_dtype=tl.int32)
            else:
                a = tl.load(A + rm[:, None] * stride_am + kk[None, :] * stride_ak, mask=a_mask, other=0.0)
                b = tl.load(B + rn[None, :] * stride_bn + kk[:, None] * stride_bk, mask=b_mask, other=0.0)
                if UPCAST_FP8:
                    a = a.to(tl.float16)
                    b = b.to(tl.float16)
                acc += tl.dot(a, b, out_dtype=tl.float32)
        sa = tl.load(SA + rm * stride_sa, mask=rm < M, other=0.0)
        sb = tl.load(SB + rn * stride_sb, mask=rn < N, other=0.0)
        out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        c_mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(C + rm[:, None] * stride_cm + rn[None, :] * stride_cn, out.to(C.dtype.element_ty), mask=c_mask)

    def _block_sizes(m: int, n: int) -> tuple[int, int, int]:
        if _interpreting():
            # The interpreter runs each program in numpy: few, larger tiles are fastest.
            return 32, 32, 64
        return (64 if m > 32 else 32), 64, 64

    def lowp_matmul_triton(
        a_q: torch.Tensor,
        a_scale: torch.Tensor,
        b_q: torch.Tensor,
        b_scale: torch.Tensor,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``(a_q @ b_q.T) * a_scale * b_scale.T`` with a Triton GEMM.

        Args:
            a_q: ``(M, K)`` int8 or float8_e4m3fn; b_q: ``(N, K)`` same dtype.
            a_scale: ``(M, 1)`` or ``(1, 1)``; b_scale: ``(N, 1)`` or ``(1, 1)`` (cast to float32).
            out_dtype: float32, bfloat16 or float16.
        Returns:
            ``(M, N)`` tensor of ``out_dtype``.
        Raises:
            ValueError: shapes, dtypes, or a non-CUDA device outside the interpreter.
        """
        _check(a_q, a_scale, b_q, b_scale)
        if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"out_dtype={out_dtype}: expected float32, bfloat16 or float16")
        m, k = a_q.shape
        n = b_q.shape[0]
        sa = a_scale.to(torch.float32).contiguous()
        sb = b_scale.to(torch.float32).contiguous()
        c = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
        is_int8 = a_q.dtype == torch.int8
        upcast = False
        if not is_int8 and a_q.device.type == "cuda":
            upcast = torch.cuda.get_device_capability(a_q.device) < (8, 9)
        bm, bn, bk = _block_sizes(m, n)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _lowp_matmul_fwd_kernel[grid](
            a_q, b_q, sa, sb, c,
            m, n, k,
            a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1),
            0 if sa.shape[0] == 1 else 1, 0 if sb.shape[0] == 1 else 1,
            c.stride(0), c.stride(1),
            IS_INT8=is_int8, UPCAST_FP8=upcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        )
        return c

else:

    def lowp_matmul_triton(
        a_q: torch.Tensor,
        a_scale: torch.Tensor,
        b_q: torch.Tensor,
        b_scale: torch.Tensor,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Stub used when Triton is not installed (same signature as the real kernel)."""
        raise NotImplementedError(
            "lowp_matmul_triton needs Triton (pip install 'rotkv[triton]'); use "
            "rotkv_kernels.lowp_matmul.lowp_matmul(..., backend='int_mm' or 'emulated') instead"
        )
