"""Low-precision (INT8 / FP8-e4m3) matrix multiplication with scales: quantizers, reference, CPU/GPU paths.

All matmuls here use the ``F.linear`` ("NT") convention: both operands are stored K-contiguous,

    a_q: (M, K) int8 or float8_e4m3fn,  a_scale: (M, 1) or (1, 1) float32
    b_q: (N, K) same dtype,              b_scale: (N, 1) or (1, 1) float32
    out = (a_q @ b_q.T) * a_scale * b_scale.T                      (M, N)

Symmetric quantization of a 2-D tensor ``x`` (``quantize_lowp``), per row (``granularity="row"``,
one scale per row) or per tensor (``"tensor"``, one scale):

    s = max(amax(|x|), tiny) / qmax          qmax = 127 (int8, the code -128 is never used so that
                                                     the grid is symmetric) or 448 (e4m3's largest finite)
    q = round(x / s)  clamped to [-qmax, qmax]   (int8: round half to even; fp8: the cast rounds to nearest even)
    x^ = q * s

Backends for :func:`lowp_matmul`:

- ``"reference"``: float64 accumulation. Exact for both formats: int8 products are integers below 2**14
  and e4m3 products have at most 8 significant bits between 2**-18 and 2**17, so float64 sums of up
  to 2**18 such terms are exact. This is the oracle the other paths are tested against.
- ``"emulated"``: float32 matmul of the codes, then the scales. Runs anywhere; int8 sums are exact
  while ``K * 127**2 < 2**24`` (K <= 1040), beyond that float32 rounds (relative 2**-24).
- ``"int_mm"``: ``torch._int_mm`` (int8 x int8 -> int32, exact). On this CPU it dispatches to oneDNN's
  VNNI int8 GEMM; on CUDA it needs M > 16 and K, N multiples of 8.
- ``"scaled_mm"``: ``torch._scaled_mm`` for fp8 (CUDA sm89+; the CPU build also implements it).
- ``"triton"``: the Triton GEMM in :mod:`rotkv_kernels.lowp_matmul_triton`.
- ``"auto"``: ``int_mm`` for int8 where it applies, else ``emulated``; fp8 uses ``scaled_mm`` on CUDA
  and ``emulated`` on the CPU (the CPU ``_scaled_mm`` upcasts internally and measured no faster).
"""

from __future__ import annotations

import torch

__all__ = [
    "LOWP_DTYPES",
    "GRANULARITIES",
    "BACKENDS",
    "qmax",
    "torch_dtype",
    "quantize_lowp",
    "dequantize_lowp",
    "fake_quantize_lowp",
    "lowp_matmul",
    "lowp_matmul_ref",
    "resolve_backend",
]

LOWP_DTYPES = ("int8", "fp8_e4m3")
GRANULARITIES = ("tensor", "row")
BACKENDS = ("auto", "reference", "emulated", "int_mm", "scaled_mm", "triton")

_TORCH_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
_QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}
# Smallest scale: keeps an all-zero tensor finite (codes become 0) without touching real data.
_TINY = 1e-30


def _check_dtype(dtype: str) -> None:
    if dtype not in LOWP_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {LOWP_DTYPES}")


def qmax(dtype: str) -> float:
    """Largest code magnitude used: 127 for int8, 448 for fp8_e4m3."""
    _check_dtype(dtype)
    return _QMAX[dtype]


def torch_dtype(dtype: str) -> torch.dtype:
    """The storage dtype of a low-precision format name."""
    _check_dtype(dtype)
    return _TORCH_DTYPES[dtype]


def quantize_lowp(x: torch.Tensor, dtype: str, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of a 2-D float tensor.

    Args:
        x: ``(M, K)`` float tensor (any float dtype; computed in float32).
        dtype: ``"int8"`` or ``"fp8_e4m3"``.
        granularity: ``"row"`` (one scale per row) or ``"tensor"`` (one scale).
    Returns:
        ``q``: ``(M, K)`` int8 or float8_e4m3fn; ``scale``: ``(M, 1)`` or ``(1, 1)`` float32.
    Raises:
        ValueError: unknown dtype or granularity, or ``x`` not 2-D or not floating point.
    """
    _check_dtype(dtype)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: expected one of {GRANULARITIES}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"quantize_lowp expects a 2-D float tensor, got shape {tuple(x.shape)} dtype {x.dtype}")
    m = _QMAX[dtype]
    xf = x.to(torch.float32)
    # max |x| in one pass without a temporary |x| tensor (these run over whole weights every step)
    if granularity == "row":
        amax = torch.linalg.vector_norm(xf, ord=float("inf"), dim=1, keepdim=True)
    else:
        amax = torch.linalg.vector_norm(xf, ord=float("inf")).reshape(1, 1)
    scale = amax.clamp_min(_TINY) / m
    y = (xf / scale).clamp_(-m, m)  # a fresh tensor: the in-place steps below never touch x
    if dtype == "int8":
        q = y.round_().to(torch.int8)
    else:
        q = y.to(torch.float8_e4m3fn)
    return q, scale


def dequantize_lowp(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` as ``dtype`` (scale broadcasts: ``(M, 1)`` or ``(1, 1)``)."""
    return (q.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def fake_quantize_lowp(x: torch.Tensor, dtype: str, granularity: str = "row") -> torch.Tensor:
    """Quantize then dequantize; same shape and dtype as the 2-D ``x``."""
    q, s = quantize_lowp(x, dtype, granularity)
    return dequantize_lowp(q, s, x.dtype)


def _check_operands(a_q, a_scale, b_q, b_scale) -> None:
    if a_q.dim() != 2 or b_q.dim() != 2:
        raise ValueError(f"lowp_matmul expects 2-D operands, got {tuple(a_q.shape)} and {tuple(b_q.shape)}")
    if a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"inner dimensions differ: a is {tuple(a_q.shape)}, b is {tuple(b_q.shape)} (NT layout)")
    if a_q.dtype != b_q.dtype or a_q.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(
            f"operands must both be int8 or both float8_e4m3fn, got {a_q.dtype} and {b_q.dtype}; "
            "quantize them with quantize_lowp first"
        )
    m, n = a_q.shape[0], b_q.shape[0]
    if tuple(a_scale.shape) not in ((m, 1), (1, 1)):
        raise ValueError(f"a_scale has shape {tuple(a_scale.shape)}: expected ({m}, 1) or (1, 1)")
    if tuple(b_scale.shape) not in ((n, 1), (1, 1)):
        raise ValueError(f"b_scale has shape {tuple(b_scale.shape)}: expected ({n}, 1) or (1, 1)")


def lowp_matmul_ref(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Exact reference: float64 accumulation of the codes, then ``* a_scale * b_scale.T``."""
    _check_operands(a_q, a_scale, b_q, b_scale)
    acc = a_q.to(torch.float64) @ b_q.to(torch.float64).T
    return (acc * a_scale.to(torch.float64) * b_scale.to(torch.float64).T).to(out_dtype)


def _emulated(a_q, a_scale, b_q, b_scale, out_dtype):
    acc = a_q.to(torch.float32) @ b_q.to(torch.float32).T
    return acc.mul_(a_scale).mul_(b_scale.T).to(out_dtype)


def _int_mm(a_q, a_scale, b_q, b_scale, out_dtype):
    acc = torch._int_mm(a_q.contiguous(), b_q.contiguous().T)
    return acc.to(torch.float32).mul_(a_scale).mul_(b_scale.T).to(out_dtype)


def _scaled_mm(a_q, a_scale, b_q, b_scale, out_dtype):
    # _scaled_mm wants a row-major A, a column-major B, and (M,1)/(1,N) or scalar scales.
    sa = a_scale.to(torch.float32)
    sb = b_scale.to(torch.float32).T
    if sa.numel() == 1 and sb.numel() == 1:
        sa, sb = sa.reshape(()), sb.reshape(())
    elif sa.numel() == 1 or sb.numel() == 1:
        # rowwise scaling needs both scales rowwise
        sa = sa.expand(a_q.shape[0], 1).contiguous()
        sb = sb.expand(1, b_q.shape[0]).contiguous()
    return torch._scaled_mm(a_q.contiguous(), b_q.contiguous().T, scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def _int_mm_ok(a_q: torch.Tensor, b_q: torch.Tensor) -> bool:
    if not hasattr(torch, "_int_mm") or a_q.dtype != torch.int8:
        return False
    if a_q.device.type == "cpu":
        return True
    if a_q.device.type == "cuda":
        m, k = a_q.shape
        n = b_q.shape[0]
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return False


def resolve_backend(backend: str, a_q: torch.Tensor, b_q: torch.Tensor) -> str:
    """The concrete backend ``"auto"`` means for these operands (see module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    if a_q.dtype == torch.int8:
        return "int_mm" if _int_mm_ok(a_q, b_q) else "emulated"
    if a_q.device.type == "cuda" and hasattr(torch, "_scaled_mm"):
        major, minor = torch.cuda.get_device_capability(a_q.device)
        if (major, minor) >= (8, 9):
            return "scaled_mm"
    return "emulated"


def lowp_matmul(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """``(a_q @ b_q.T) * a_scale * b_scale.T`` in ``out_dtype``; shapes in the module docstring.

    Raises:
        ValueError: mismatched shapes or dtypes, an unknown backend, or ``"int_mm"`` asked for
            operands it cannot take (fp8, or CUDA shapes it rejects).
        NotImplementedError: ``"triton"`` without Triton installed.
    """
    _check_operands(a_q, a_scale, b_q, b_scale)
    a_scale = a_scale.to(torch.float32)
    b_scale = b_scale.to(torch.float32)
    which = resolve_backend(backend, a_q, b_q)
    if which == "reference":
        return lowp_matmul_ref(a_q, a_scale, b_q, b_scale, out_dtype)
    if which == "emulated":
        return _emulated(a_q, a_scale, b_q, b_scale, out_dtype)
    if which == "int_mm":
        if not _int_mm_ok(a_q, b_q):
            raise ValueError(
                f"backend='int_mm' needs int8 operands (CUDA: M > 16, K and N multiples of 8); got "
                f"{a_q.dtype} {tuple(a_q.shape)} x {tuple(b_q.shape)} on {a_q.device.type}: use backend='auto'"
            )
        return _int_mm(a_q, a_scale, b_q, b_scale, out_dtype)
    if which == "scaled_mm":
        if a_q.dtype != torch.float8_e4m3fn:
            raise ValueError("backend='scaled_mm' is for fp8_e4m3 operands; int8 uses 'int_mm'")
        return _scaled_mm(a_q, a_scale, b_q, b_scale, out_dtype)
    # "triton"
    from rotkv_kernels.lowp_matmul_triton import lowp_matmul_triton

    return lowp_matmul_triton(a_q, a_scale, b_q, b_scale, out_dtype=out_dtype)
