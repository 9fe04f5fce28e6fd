"""Normalized Hadamard transform in Triton, by two small matrix products per row (``tl.dot``).

Entry point: :func:`hadamard_transform_triton` (same signature and maths as
:func:`rotkv_kernels.hadamard.hadamard_transform`), also registered as the custom op
``rotkv::hadamard_transform_triton``.

Maths. ``H_n = kron(H_m, S_{2^k})`` (``hadamard.py``). Split ``n = a * b`` with ``A = kron(H_m, S_{2^k1})``
(order ``a``) and ``B = S_b`` (Sylvester, order ``b = 2^k2``), so ``H_n = kron(A, B)``. Viewing one row
``x`` (length ``n``) as the row-major matrix ``X`` of shape ``[a, b]`` (``X[i, j] = x[i*b + j]``):

    (H_n x)  reshaped  ==  A X B^T              (forward)
    (H_n^T x) reshaped ==  A^T X B              (inverse)

The kernel computes ``Z = X B^T`` as one ``tl.dot`` of ``[rows*a_pad, b] x [b, b]``, transposes each
``[a_pad, b]`` block in registers, and computes ``A Z`` as ``[rows*b, a_pad] x [a_pad, a_pad]``. ``a`` is
padded to the next power of two ``a_pad`` with zero rows/columns in ``A`` (``tl.dot`` needs power-of-2
shapes of at least 16); padded rows of ``X`` are masked loads (zeros) and never stored. Orders whose
next power of two is at most 128 use one dense product ``X H_n^T`` instead (``a = 1``, ``b = n`` padded).
The ``1/sqrt(n)`` normalization is one fp32 multiply at the end, as in the reference.

Precision: operands are fp32 and both dots use ``input_precision="ieee"``. The matrices hold +-1 (and
padding zeros), so every product is exact and the only rounding is in the fp32 sums: the error per
output is at most ``gamma_{a+b+1} * ||x||_1 / sqrt(n)`` (``gamma_k = k u / (1 - k u)``, ``u = 2^-24``),
the same kind of bound as the reference's butterflies but with a different summation order, so results
agree with the reference to a few ulps, not bit for bit.

Arithmetic intensity. Per element, the two stages cost ``2 * (a_pad + b) * a_pad / a`` flops (multiply-add
counted as 2; the factor ``a_pad / a`` is the padding waste) and move ``2 * itemsize`` bytes (one read,
one write). Examples (fp16/bf16 in and out, 4 bytes per element):

    n      split (a -> a_pad) x b    flops/elem   flops/byte
    64     dense, b = 64             128          32
    128    dense, b = 128            256          64
    192    12 -> 16 x 16             85           21
    576    36 -> 64 x 16             284          71
    1152   36 -> 64 x 32             341          85
    1536   24 -> 32 x 64             256          64
    4096   64 x 64                   256          64

Dense orders cost ``2 * b_pad`` flops per element. With fp32 (non-tensor-core, "ieee") dots an H100/H200
has a ridge point near 14 flops/byte (~67 TFLOP/s over ~4.8 TB/s), so all of these sizes are compute-bound
on a GPU; a TF32 or split-fp16 dot would make them memory-bound at a precision cost (not measured: no GPU
was available when this was written). The KV cache read path (``rotkv_cache_triton``) uses the same tiles.

Block-diagonal mode (``block_size=bs``) applies ``kron(I, H_bs / sqrt(bs))``: the rows are ``x`` viewed
as ``[-1, bs]``.
"""

from __future__ import annotations

import functools
import math

import torch

from rotkv_kernels.hadamard import hadamard_factors, hadamard_matrix

try:  # Triton is optional: the module must import without it (the stubs below raise instead).
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by tests/kernels/test_import_guard.py in a subprocess
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "HadamardPlan", "hadamard_plan", "hadamard_transform_triton", "is_interpreted"]

# tl.dot needs every dimension >= 16; these bound the shared-memory tiles of A and B (fp32).
_MIN_DOT = 16
_DENSE_MAX = 128
_MAX_B = 128
_MAX_A_PAD = 256
# Target number of fp32 elements per program's tile (registers on GPU; numpy arrays in the interpreter).
_TILE_ELEMS = 4096


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def hadamard_plan(n: int) -> "HadamardPlan":
    """How the kernel splits order ``n``: ``H_n = kron(A, B)``, ``A`` of order ``a`` (padded to ``a_pad``),
    ``B`` of order ``b`` (padded to ``b_pad``). ``a == 1`` means one dense product with ``B = H_n``.

    Raises:
        ValueError: no Hadamard matrix of order ``n``, or ``n`` too large for the kernel's tiles.
    """
    f = hadamard_factors(n)
    if f is None:
        raise ValueError(
            f"no Hadamard matrix of order {n}: supported orders are m * 2**k with m in 1, 12, 20, 28, 36, 44, ..."
        )
    m, p = f
    if _next_pow2(n) <= _DENSE_MAX:
        return HadamardPlan(n=n, a=1, b=n, a_pad=1, b_pad=max(_MIN_DOT, _next_pow2(n)))
    best = None
    k1 = 0
    while (1 << k1) <= p:
        a, b = m << k1, p >> k1
        a_pad = max(_MIN_DOT, _next_pow2(a))
        if _MIN_DOT <= b <= _MAX_B and a_pad <= _MAX_A_PAD:
            # flops per element, padding included: 2 * (a_pad + b) * a_pad / a
            cost = (a_pad + b) * a_pad / a
            if best is None or cost < best[0]:
                best = (cost, a, b, a_pad)
        k1 += 1
    if best is None:
        raise ValueError(
            f"Hadamard order {n} is outside the Triton kernel's tile limits (b <= {_MAX_B}, padded a <= "
            f"{_MAX_A_PAD}); use rotkv_kernels.hadamard.hadamard_transform"
        )
    _, a, b, a_pad = best
    return HadamardPlan(n=n, a=a, b=b, a_pad=a_pad, b_pad=b)


class HadamardPlan:
    """Static split of one Hadamard order for the Triton kernels (see :func:`hadamard_plan`)."""

    __slots__ = ("n", "a", "b", "a_pad", "b_pad")

    def __init__(self, n: int, a: int, b: int, a_pad: int, b_pad: int) -> None:
        assert a * b == n and a_pad >= a and b_pad >= b, (n, a, b, a_pad, b_pad)
        self.n, self.a, self.b, self.a_pad, self.b_pad = n, a, b, a_pad, b_pad

    @property
    def two_stage(self) -> bool:
        return self.a > 1

    def __repr__(self) -> str:
        return f"HadamardPlan(n={self.n}, a={self.a}->{self.a_pad}, b={self.b}->{self.b_pad})"

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalized +-1 factors ``(A, B)`` in fp64 with ``kron(A, B) == hadamard_matrix(n, normalized=False)``."""
        return (
            hadamard_matrix(self.a, dtype=torch.float64, normalized=False),
            hadamard_matrix(self.b, dtype=torch.float64, normalized=False),
        )


@functools.lru_cache(maxsize=64)
def _operands(n: int, inverse: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two right-hand ``tl.dot`` operands, fp32, zero-padded: (M1 ``[b_pad, b_pad]``, M2 ``[a_pad, a_pad]``).

    Forward ``Y = A X B^T``: ``Z = X @ B^T`` then ``Y^T = Z^T @ A^T``, so ``M1 = B^T, M2 = A^T``.
    Inverse ``Y = A^T X B``: ``M1 = B, M2 = A``.
    """
    plan = hadamard_plan(n)
    a_mat, b_mat = plan.factors()
    m1 = b_mat if inverse else b_mat.T
    m2 = a_mat if inverse else a_mat.T
    p1 = torch.zeros(plan.b_pad, plan.b_pad, dtype=torch.float32)
    p1[: plan.b, : plan.b] = m1
    p2 = torch.zeros(plan.a_pad, plan.a_pad, dtype=torch.float32)
    p2[: plan.a, : plan.a] = m2
    return p1.to(device), p2.to(device)


def hadamard_operands(n: int, inverse: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Public accessor of the cached kernel operands (used by the fused cache kernels)."""
    return _operands(n, bool(inverse), str(torch.device(device)))


def is_interpreted() -> bool:
    """Whether this module's kernels were built for the Triton CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    # triton.jit returns an InterpretedFunction instead of a JITFunction when TRITON_INTERPRET=1 at decoration.
    return HAS_TRITON and not isinstance(_hadamard_fwd_kernel, triton.runtime.JITFunction)


def check_launchable(t: torch.Tensor, what: str) -> None:
    """Raise a clear error when a Triton kernel cannot run on ``t``'s device in this process."""
    if not HAS_TRITON:
        raise NotImplementedError(
            f"{what} needs Triton, which is not installed: pip install 'rotkv[triton]' or use the reference"
        )
    if t.device.type == "cpu" and not is_interpreted():
        raise ValueError(
            f"{what}: CPU tensors run only under the Triton interpreter; set TRITON_INTERPRET=1 before "
            "rotkv_kernels imports its Triton modules, or move the tensor to a GPU"
        )


def _tokens_per_program(tile_elems: int, rows_per_token: int, min_rows: int = _MIN_DOT) -> int:
    """Power-of-two tokens per program: ~_TILE_ELEMS elements, and at least ``min_rows`` dot rows."""
    bt = max(1, _TILE_ELEMS // max(1, tile_elems))
    bt = 1 << (bt.bit_length() - 1)
    while bt * rows_per_token < min_rows:
        bt *= 2
    return bt


if HAS_TRITON:

    @triton.jit
    def _hadamard_tile(x, m1_ptr, m2_ptr, ROWS: tl.constexpr, A_PAD: tl.constexpr, B_PAD: tl.constexpr,
                       TWO_STAGE: tl.constexpr):
        """Unnormalized ``A X B^T`` (operands M1 = B^T, M2 = A^T) of ``x``: ``[ROWS, A_PAD, B_PAD]`` fp32."""
        ob = tl.arange(0, B_PAD)
        m1 = tl.load(m1_ptr + ob[:, None] * B_PAD + ob[None, :])
        z = tl.dot(tl.reshape(x, (ROWS * A_PAD, B_PAD)), m1, input_precision="ieee")
        z = tl.reshape(z, (ROWS, A_PAD, B_PAD))
        if TWO_STAGE:
            oa = tl.arange(0, A_PAD)
            m2 = tl.load(m2_ptr + oa[:, None] * A_PAD + oa[None, :])
            zt = tl.reshape(tl.permute(z, (0, 2, 1)), (ROWS * B_PAD, A_PAD))
            y = tl.dot(zt, m2, input_precision="ieee")
            z = tl.permute(tl.reshape(y, (ROWS, B_PAD, A_PAD)), (0, 2, 1))
        return z

    @triton.jit
    def _cast_rne(v, OUT_DTYPE: tl.constexpr):
        """fp32 -> OUT_DTYPE rounding to nearest-even on every backend.

        The interpreter (triton 3.9) truncates fp32 -> bf16 casts, while GPUs and torch round to
        nearest-even; rounding the fp32 bits first makes the final cast exact everywhere.
        """
        if OUT_DTYPE == tl.bfloat16:
            b = v.to(tl.int32, bitcast=True)
            r = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            v = tl.where(v != v, v, r)
        return v.to(OUT_DTYPE)

    @triton.jit
    def _hadamard_fwd_kernel(x_ptr, out_ptr, m1_ptr, m2_ptr, n_rows, scale,
                             A: tl.constexpr, B: tl.constexpr, A_PAD: tl.constexpr, B_PAD: tl.constexpr,
                             BLOCK_ROWS: tl.constexpr, TWO_STAGE: tl.constexpr):
        """One program: BLOCK_ROWS rows of width A*B -> ``scale * A X B^T`` (forward or inverse by the operands)."""
        pid = tl.program_id(0)
        r = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        i = tl.arange(0, A_PAD)
        j = tl.arange(0, B_PAD)
        mask = (r[:, None, None] < n_rows) & (i[None, :, None] < A) & (j[None, None, :] < B)
        offs = r[:, None, None].to(tl.int64) * (A * B) + i[None, :, None] * B + j[None, None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _hadamard_tile(x, m1_ptr, m2_ptr, BLOCK_ROWS, A_PAD, B_PAD, TWO_STAGE) * scale
        tl.store(out_ptr + offs, _cast_rne(y, out_ptr.dtype.element_ty), mask=mask)

    def _hadamard_launch(x: torch.Tensor, block_size: int | None, inverse: bool) -> torch.Tensor:
        n = x.shape[-1]
        b = n if block_size is None else int(block_size)
        if b < 1 or n % b:
            raise ValueError(f"block_size={block_size} must divide the last dimension {n}")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"x.dtype={x.dtype}: expected float32, float16 or bfloat16")
        check_launchable(x, "hadamard_transform_triton")
        plan = hadamard_plan(b)
        xc = x.contiguous()
        out = torch.empty_like(xc)
        n_rows = xc.numel() // b
        if n_rows == 0:
            return out
        m1, m2 = hadamard_operands(b, inverse, xc.device)
        bt = _tokens_per_program(plan.a_pad * plan.b_pad, plan.a_pad)
        grid = (triton.cdiv(n_rows, bt),)
        _hadamard_fwd_kernel[grid](
            xc, out, m1, m2, n_rows, 1.0 / math.sqrt(b),
            A=plan.a, B=plan.b, A_PAD=plan.a_pad, B_PAD=plan.b_pad, BLOCK_ROWS=bt, TWO_STAGE=plan.two_stage,
        )
        return out

    @torch.library.custom_op("rotkv::hadamard_transform_triton", mutates_args=())
    def _hadamard_op(x: torch.Tensor, block_size: int | None = None, inverse: bool = False) -> torch.Tensor:
        return _hadamard_launch(x, block_size, inverse)

    @_hadamard_op.register_fake
    def _(x: torch.Tensor, block_size: int | None = None, inverse: bool = False) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def hadamard_transform_triton(
        x: torch.Tensor, block_size: int | None = None, inverse: bool = False
    ) -> torch.Tensor:
        """Normalized Hadamard transform over the last dim, Triton kernel.

        Args:
            x: ``(..., n)`` fp32, fp16 or bf16, on a GPU or (``TRITON_INTERPRET=1``) the CPU. Sums in fp32.
            block_size: apply ``H_bs / sqrt(bs)`` to each consecutive block of ``bs`` channels.
            inverse: apply the transpose (the inverse).
        Returns:
            same shape and dtype as ``x``: ``x @ H.T / sqrt(n)`` (``x @ H / sqrt(n)`` if ``inverse``).
        Raises:
            ValueError: bad ``block_size``, dtype, an order with no Hadamard matrix or beyond the tile
                limits, or a CPU tensor outside the interpreter.
        """
        return torch.ops.rotkv.hadamard_transform_triton(x, block_size, inverse)

else:

    def hadamard_transform_triton(
        x: torch.Tensor, block_size: int | None = None, inverse: bool = False
    ) -> torch.Tensor:
        """Stub: Triton is not installed."""
        raise NotImplementedError(
            "hadamard_transform_triton needs Triton, which is not installed: pip install 'rotkv[triton]' "
            "or use rotkv_kernels.hadamard.hadamard_transform"
        )
