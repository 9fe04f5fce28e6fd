"""INT8 / FP8 quantizers and GEMMs (`rotkv_kernels.lowp_matmul`, `lowp_matmul_triton`) against exact references.

Bounds (u = 2**-24, float32 unit roundoff; gamma_k = k u / (1 - k u)):

- int8 quantization never clips (|x / s| <= 127 by construction), so |x - q s| <= s / 2, plus the
  float32 rounding of x / s (<= u * 127 s) and of q * s (<= u |x|).
- e4m3 keeps 3 mantissa bits: a normal value (|x / s| >= 2**-6) rounds with relative error <= 2**-4;
  below that the subnormal step is 2**-9, so the absolute error is <= 2**-10 s.
- GEMMs: the reference accumulates in float64, which is exact for both formats (module docstring).
  An int32 accumulator (``_int_mm``, Triton int8) is exact too; converting it to float32 and applying
  two scales costs three roundings and the final cast of the reference one more: <= 4u |exact|.
  A float32 accumulation of K exact products adds gamma_K * sum_k |a_k b_k| (Higham, Lemma 3.1).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rotkv_kernels.lowp_matmul import (
    lowp_matmul,
    lowp_matmul_ref,
    quantize_lowp,
    dequantize_lowp,
    resolve_backend,
)

U = 2.0**-24


def gamma(k: int) -> float:
    return k * U / (1 - k * U)


def _operands(m, n, k, dtype, a_gran, b_gran, seed=0):
    g = torch.Generator().manual_seed(seed)
    # columns over two decades so that per-row and per-tensor scales differ
    a = torch.randn(m, k, generator=g) * torch.logspace(-1, 1, k)
    b = torch.randn(n, k, generator=g) * 0.05
    aq, sa = quantize_lowp(a, dtype, a_gran)
    bq, sb = quantize_lowp(b, dtype, b_gran)
    return aq, sa, bq, sb


def _abs_product(aq, sa, bq, sb):
    """sum_k |a_k b_k| * |sa| |sb| in float64: the scale of every accumulation error."""
    return (aq.double().abs() @ bq.double().abs().T) * sa.double() * sb.double().T


SHAPES = [(1, 5, 3), (7, 45, 70), (33, 192, 576), (130, 64, 1536)]
GRANS = [("row", "row"), ("tensor", "tensor"), ("row", "tensor")]


# ---- quantizers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_int8_roundtrip_within_half_step(granularity):
    x = torch.randn(37, 300) * torch.logspace(-2, 2, 300)
    q, s = quantize_lowp(x, "int8", granularity)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert s.shape == ((37, 1) if granularity == "row" else (1, 1))
    assert int(q.abs().max()) <= 127
    err = (x - dequantize_lowp(q, s)).abs()
    bound = s / 2 + U * 127 * s + U * x.abs()
    assert bool((err <= bound).all())
    # the largest magnitude of each scale group lands on the end of the grid
    amax_codes = q.abs().amax(dim=1) if granularity == "row" else q.abs().amax()
    assert bool((amax_codes == 127).all())


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_fp8_roundtrip_relative_bound(granularity):
    x = torch.randn(37, 300) * torch.logspace(-3, 2, 300)
    q, s = quantize_lowp(x, "fp8_e4m3", granularity)
    assert q.dtype == torch.float8_e4m3fn
    y = q.float()
    assert float(y.abs().max()) <= 448.0
    err = (x - dequantize_lowp(q, s)).abs()
    bound = torch.maximum(2.0**-4 * x.abs(), 2.0**-10 * s) * (1 + 4 * U) + U * x.abs()
    assert bool((err <= bound).all())


def test_zero_tensor_quantizes_to_zero_codes():
    for dt in ("int8", "fp8_e4m3"):
        q, s = quantize_lowp(torch.zeros(4, 8), dt, "row")
        assert torch.isfinite(s).all() and bool((q.float() == 0).all())


def test_quantizer_rejects_bad_input():
    with pytest.raises(ValueError, match="dtype"):
        quantize_lowp(torch.randn(2, 2), "int4")
    with pytest.raises(ValueError, match="granularity"):
        quantize_lowp(torch.randn(2, 2), "int8", "group")
    with pytest.raises(ValueError, match="2-D float"):
        quantize_lowp(torch.randn(2, 2, 2), "int8")
    with pytest.raises(ValueError, match="2-D float"):
        quantize_lowp(torch.ones(2, 2, dtype=torch.int32), "int8")


# ---- GEMMs --------------------------------------------------------------------------------------

def test_reference_is_exact_for_int8():
    aq, sa, bq, sb = _operands(19, 23, 1536, "int8", "row", "row")
    one_a, one_b = torch.ones(1, 1), torch.ones(1, 1)
    exact = (aq.long() @ bq.long().T).double()
    assert torch.equal(lowp_matmul_ref(aq, one_a, bq, one_b, torch.float64), exact)


@pytest.mark.parametrize("grans", GRANS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int_mm_matches_reference(shape, grans):
    m, n, k = shape
    aq, sa, bq, sb = _operands(m, n, k, "int8", *grans, seed=k)
    ref = lowp_matmul_ref(aq, sa, bq, sb, torch.float64)
    got = lowp_matmul(aq, sa, bq, sb, backend="int_mm")
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert bool(((got.double() - ref).abs() <= 4.01 * U * ref.abs() + 1e-30).all())


@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_matches_reference(shape, dtype):
    m, n, k = shape
    aq, sa, bq, sb = _operands(m, n, k, dtype, "row", "tensor", seed=k + 1)
    ref = lowp_matmul_ref(aq, sa, bq, sb, torch.float64)
    got = lowp_matmul(aq, sa, bq, sb, backend="emulated")
    bound = (gamma(k) + 4 * U) * _abs_product(aq, sa, bq, sb)
    assert bool(((got.double() - ref).abs() <= bound + 1e-30).all())


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="this torch has no _scaled_mm")
@pytest.mark.parametrize("grans", GRANS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_scaled_mm_fp8_matches_reference(grans):
    aq, sa, bq, sb = _operands(33, 48, 576, "fp8_e4m3", *grans, seed=3)
    ref = lowp_matmul_ref(aq, sa, bq, sb, torch.float64)
    try:
        got = lowp_matmul(aq, sa, bq, sb, backend="scaled_mm")
    except RuntimeError as e:  # a torch build without an fp8 GEMM for this device
        pytest.skip(f"_scaled_mm unavailable here: {e}")
    bound = (gamma(576) + 4 * U) * _abs_product(aq, sa, bq, sb)
    assert bool(((got.double() - ref).abs() <= bound + 1e-30).all())


def test_auto_backend_choice_on_cpu():
    aq, sa, bq, sb = _operands(4, 8, 16, "int8", "row", "row")
    assert resolve_backend("auto", aq, bq) == "int_mm"
    fq, fsa, fq2, fsb = _operands(4, 8, 16, "fp8_e4m3", "row", "row")
    assert resolve_backend("auto", fq, fq2) == "emulated"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cutlass", aq, bq)


def test_gemm_rejects_bad_operands():
    aq, sa, bq, sb = _operands(4, 8, 16, "int8", "row", "row")
    fq, fsa, _, _ = _operands(4, 8, 16, "fp8_e4m3", "row", "row")
    with pytest.raises(ValueError, match="inner dimensions"):
        lowp_matmul(aq, sa, bq[:, :8], sb)
    with pytest.raises(ValueError, match="int8 or both float8"):
        lowp_matmul(aq, sa, fq, sb)
    with pytest.raises(ValueError, match="b_scale"):
        lowp_matmul(aq, sa, bq, torch.ones(3, 1))
    with pytest.raises(ValueError, match="int_mm"):
        lowp_matmul(fq, fsa, fq, fsa, backend="int_mm")
    with pytest.raises(ValueError, match="2-D"):
        lowp_matmul(aq[None], sa, bq, sb)


# ---- Triton (TRITON_INTERPRET=1 on the CPU) -----------------------------------------------------

def _triton_device() -> str:
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("Triton GEMMs need a GPU or TRITON_INTERPRET=1 (scripts/test.sh sets it)")


TRITON_SHAPES = [(1, 5, 3), (7, 45, 70), (33, 70, 576), (40, 33, 130)]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grans", GRANS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(shape, dtype, grans, out_dtype):
    dev = _triton_device()
    m, n, k = shape
    aq, sa, bq, sb = _operands(m, n, k, dtype, *grans, seed=m + n)
    ref = lowp_matmul_ref(aq, sa, bq, sb, torch.float64)
    got = lowp_matmul(aq.to(dev), sa.to(dev), bq.to(dev), sb.to(dev), out_dtype=out_dtype, backend="triton").cpu()
    assert got.shape == (m, n) and got.dtype == out_dtype
    # int8: exact int32 accumulation; fp8: float32 accumulation. Then scales in fp32 and the output cast.
    acc = 4 * U if dtype == "int8" else gamma(k) + 4 * U
    # The output cast: round-to-nearest on GPUs (half an ulp); Triton's interpreter truncates fp32 -> bf16,
    # so allow a whole ulp (2**-7 relative for bf16's 8-bit significand, 2**-23 for fp32).
    cast = {torch.float32: 2 * U, torch.bfloat16: 2.0**-7}[out_dtype]
    bound = acc * _abs_product(aq, sa, bq, sb) + cast * ref.abs() * (1 + acc)
    assert bool(((got.double() - ref).abs() <= bound + 1e-30).all())


def test_triton_rejects_cpu_tensors_outside_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from rotkv_kernels.lowp_matmul_triton import lowp_matmul_triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    aq, sa, bq, sb = _operands(4, 8, 16, "int8", "row", "row")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        lowp_matmul_triton(aq, sa, bq, sb)


def test_triton_module_imports_without_triton():
    """With triton unimportable the module still imports and the entry point raises a clear error."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from rotkv_kernels.lowp_matmul_triton import lowp_matmul_triton, has_triton\n"
        "assert not has_triton()\n"
        "a = torch.zeros(2, 4, dtype=torch.int8); s = torch.ones(1, 1)\n"
        "try:\n"
        "    lowp_matmul_triton(a, s, a, s)\n"
        "except NotImplementedError as e:\n"
        "    assert 'Triton' in str(e); print('stub-ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "stub-ok" in out.stdout
