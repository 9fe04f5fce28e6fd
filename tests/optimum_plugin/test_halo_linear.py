"""The HALO linear layer: gradients vs the autograd-derived emulation, where each level puts its rotations,
accuracy vs exact float64 maths, the module / entry point, frozen-weight caching and input errors.

Tolerances:

- Layer vs :func:`halo_linear_reference`: both quantize the same float32 values, but the reference
  reaches the gradient quantizers through autograd (a different float32 operation order), so a value
  within ~1e-7 of a rounding boundary can land on the other code. One such flip moves one product
  term by one step ``s`` (<= amax/127); over an ``(M, N)`` operand of >= 10^3 entries that is a
  relative Frobenius change of <~ 1/(127 sqrt(10^3)) ~ 2.5e-4 per flip. We allow 1e-3 (a few flips);
  placement or transpose mistakes change the result by O(1).
- Accuracy vs exact: symmetric int8 with row scales rounds each entry by at most s/2 = amax/254, an
  RMS error of amax/(254 sqrt 3) ~ 0.9% of the row RMS for a Hadamard-rotated Gaussian row (amax/RMS
  ~ sqrt(2 ln 2n) ~ 3.9 at n = 576). A product of two such operands has ~sqrt 2 that, ~1.3%; the
  backward quantizes one more operand, ~1.6%. We assert < 3%.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import optimum_plugin.halo.functional as F_halo
from optimum_plugin.halo.apply import apply_halo, halo_modules, remove_halo
from optimum_plugin.halo.config import HALOConfig
from optimum_plugin.halo.functional import halo_linear
from optimum_plugin.halo.linear import HALOLinear
from optimum_plugin.halo.reference import halo_linear_reference
from rotkv_kernels.hadamard import hadamard_matrix
from rotkv_kernels.lowp_matmul import dequantize_lowp


def _rel(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _data(m=50, k=576, n=192, outliers=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g)
    e = torch.randn(m, n, generator=g)
    if outliers:  # an activation channel and a gradient token 30x larger: what the rotations are for
        x[:, 5] *= 30
        e[7] *= 30
    return x, w, b, e


def _run(fn, x, w, b, e):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = b.clone().requires_grad_()
    y = fn(x, w, b)
    y.backward(e.to(y.dtype))
    return y.detach(), x.grad, w.grad, b.grad


CONFIGS = [
    dict(level=lv, dtype=dt, granularity=gr)
    for lv in (0, 1, 2)
    for dt in ("int8", "fp8_e4m3")
    for gr in ("row", "tensor")
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda k: f"L{k['level']}-{k['dtype']}-{k['granularity']}")
def test_gradients_match_autograd_of_emulated_reference(kw):
    cfg = HALOConfig(token_block_size=16, backend="auto", **kw)
    # 41 tokens: level 2 pads to 48. K = 192 = 12 * 16 has a non-symmetric Hadamard (Paley I core), so
    # confusing R with R^T fails here; at 576 (Paley II, symmetric and involutory) it would not show.
    x, w, b, e = _data(m=41, k=192)
    got = _run(lambda x, w, b: halo_linear(x, w, b, cfg), x, w, b, e)
    ref = _run(lambda x, w, b: halo_linear_reference(x, w, b, cfg), x, w, b, e)
    for name, g, r in zip(("y", "dx", "dw", "db"), got, ref):
        assert g.shape == r.shape
        assert _rel(g, r) < 1e-3, f"{name}: {_rel(g, r):.2e}"


def test_block_hadamard_gradients_match_reference():
    cfg = HALOConfig(level=2, hadamard="block", hadamard_block_size=12, token_block_size=32)
    x, w, b, e = _data(m=70, k=192)
    got = _run(lambda x, w, b: halo_linear(x, w, b, cfg), x, w, b, e)
    ref = _run(lambda x, w, b: halo_linear_reference(x, w, b, cfg), x, w, b, e)
    for g, r in zip(got, ref):
        assert _rel(g, r) < 1e-3


@pytest.mark.parametrize("level", [1, 2])
def test_int8_accuracy_against_exact_maths(level):
    cfg = HALOConfig(level=level, token_block_size=16)
    x, w, b, e = _data(outliers=False)
    got = _run(lambda x, w, b: halo_linear(x, w, b, cfg), x, w, b, e)
    exact = _run(lambda x, w, b: x @ w.T + b, x.double(), w.double(), b.double(), e.double())
    for name, g, r in zip(("y", "dx", "dw"), got[:3], exact[:3]):
        assert _rel(g, r) < 0.03, f"{name}: {_rel(g, r):.3f}"
    assert _rel(got[3], exact[3]) < 1e-6  # the bias gradient is a full-precision sum


def test_rotations_spread_outliers():
    """With an outlier channel and an outlier token, level 1 beats level 0 on the forward and level 2
    beats level 1 on the input gradient under per-tensor scales (the token outlier sets E's scale)."""
    x, w, b, e = _data()
    exact = _run(lambda x, w, b: x @ w.T + b, x.double(), w.double(), b.double(), e.double())
    err = {}
    for lv in (0, 1, 2):
        cfg = HALOConfig(level=lv, granularity="tensor", token_block_size=16)
        got = _run(lambda x, w, b: halo_linear(x, w, b, cfg), x, w, b, e)
        err[lv] = [_rel(g, r) for g, r in zip(got[:3], exact[:3])]
    assert err[1][0] < 0.5 * err[0][0]
    assert err[2][1] < 0.7 * err[1][1]


# ---- where the rotations are ---------------------------------------------------------------------

@pytest.mark.parametrize("n, block", [(576, None), (1536, None), (192, None), (64, None), (576, 64), (192, 12)])
@pytest.mark.parametrize("inverse", [False, True])
def test_fast_rotation_equals_kernels_hadamard(n, block, inverse):
    """The two-GEMM rotation is rotkv_kernels' transform: each output is a +-1/sqrt(b) combination of
    b inputs summed in float32 by both, so they differ by at most 2 gamma_b ||x_block||_1 / sqrt(b)."""
    from rotkv_kernels.hadamard import hadamard_transform

    x = torch.randn(9, n) * torch.logspace(-2, 2, n)
    got = F_halo.hadamard_rotate(x, block, inverse=inverse)
    ref = hadamard_transform(x, block_size=block, inverse=inverse)
    b = block or n
    l1 = x.abs().reshape(9, n // b, b).sum(-1, keepdim=True).expand(9, n // b, b).reshape(9, n)
    gamma = b * 2.0**-24 / (1 - b * 2.0**-24)
    assert bool(((got - ref).abs() <= 2 * gamma * l1 / math.sqrt(b) + 1e-30).all())
    with pytest.raises(ValueError, match="no Hadamard rotation"):
        F_halo.hadamard_rotate(torch.randn(2, 100))

def _dense_rot(k, block=None):
    """R (normalized, possibly block-diagonal) so that rot(x) = x @ R.T."""
    if block is None:
        return hadamard_matrix(k, dtype=torch.float64)
    return torch.block_diag(*[hadamard_matrix(block, dtype=torch.float64)] * (k // block))


def _record_gemms(monkeypatch):
    calls = []
    real = F_halo.lowp_matmul

    def spy(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend="auto"):
        out = real(a_q, a_s, b_q, b_s, out_dtype=out_dtype, backend=backend)
        calls.append(dict(a=dequantize_lowp(a_q, a_s, torch.float64), a_s=a_s, a_q=a_q,
                          b=dequantize_lowp(b_q, b_s, torch.float64), b_q=b_q, b_s=b_s, out=out.double()))
        return out

    monkeypatch.setattr(F_halo, "lowp_matmul", spy)
    return calls


def _within_half_step(deq, expected, scale):
    """|deq - expected| <= s/2 elementwise (int8 never clips), plus float32 slack on the rotated values."""
    slack = 1e-5 * expected.abs().amax(dim=1, keepdim=True)
    return bool(((deq - expected).abs() <= scale.double() / 2 * (1 + 1e-5) + slack).all())


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_rotation_placement(monkeypatch, level, granularity):
    # K = 192 = 12 * 16: its Paley-I core is not symmetric, so R and R^T differ (a wrong side shows).
    m, k, n, tb = 37, 192, 96, 16
    cfg = HALOConfig(level=level, granularity=granularity, token_block_size=tb)
    x, w, b, e = _data(m=m, k=k, n=n)
    calls = _record_gemms(monkeypatch)
    _, gx, gw, _ = _run(lambda x, w, b: halo_linear(x, w, b, cfg), x, w, b, e)
    fwd, dx, dw = calls  # forward, then the input gradient, then the weight gradient
    r = _dense_rot(k) if level else torch.eye(k, dtype=torch.float64)
    assert not torch.allclose(r, r.T) or level == 0

    # forward: Q(X R^T) Q(W R^T)^T
    assert _within_half_step(fwd["a"], x.double() @ r.T, fwd["a_s"])
    assert _within_half_step(fwd["b"], w.double() @ r.T, fwd["b_s"])

    # input gradient: A = E (row: with the weight's row scales folded in), token-rotated at level 2;
    # B = the forward's weight codes, transposed (no re-quantization)
    a_exp = e.double() * (fwd["b_s"].double().T if granularity == "row" else 1.0)
    if level == 2:
        pad = (-m) % tb
        t = torch.block_diag(*[hadamard_matrix(tb, dtype=torch.float64)] * ((m + pad) // tb))
        a_exp = t @ torch.cat([a_exp, a_exp.new_zeros(pad, n)])
    assert _within_half_step(dx["a"], a_exp, dx["a_s"])
    assert torch.equal(dx["b_q"], fwd["b_q"].T)
    g = dx["out"]
    if level == 2:
        g = (t.T @ g)[:m]
    torch.testing.assert_close(gx.double(), g @ r, rtol=1e-5, atol=1e-5 * float(gx.abs().max()))

    # weight gradient: A = E^T (row: the tokens' scales folded in); B = the forward's input codes, transposed
    a_exp = (e.double() * (fwd["a_s"].double() if granularity == "row" else 1.0)).T
    assert _within_half_step(dw["a"], a_exp, dw["a_s"])
    assert torch.equal(dw["b_q"], fwd["a_q"].T)
    torch.testing.assert_close(gw.double(), dw["out"] @ r, rtol=1e-5, atol=1e-5 * float(gw.abs().max()))


# ---- the module and the entry point -------------------------------------------------------------

class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 192)
        self.down = nn.Linear(192, 64, bias=False)
        self.lm_head = nn.Linear(64, 10)

    def forward(self, x):
        return self.lm_head(self.down(torch.relu(self.up(x))))


def test_apply_and_remove_share_parameters():
    torch.manual_seed(0)
    model = _Toy()
    keys = set(model.state_dict())
    w_up = model.up.weight
    apply_halo(model, HALOConfig(level=2))
    assert set(halo_modules(model)) == {"up", "down"} and type(model.lm_head) is nn.Linear
    assert model.up.weight is w_up and set(model.state_dict()) == keys
    x = torch.randn(3, 5, 64)
    y = model(x)
    assert y.shape == (3, 5, 10)
    with pytest.raises(ValueError, match="already has HALO layers"):
        apply_halo(model, HALOConfig())
    remove_halo(model)
    assert type(model.up) is nn.Linear and model.up.weight is w_up
    plain = model(x)
    assert _rel(y, plain) < 0.03


def test_apply_rejects_widths_without_hadamard_and_empty_models():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(100, 8))
    with pytest.raises(ValueError, match=r"^1: in_features=100"):
        apply_halo(model, HALOConfig())
    assert type(model[0]) is nn.Linear  # nothing was converted
    apply_halo(model, HALOConfig(skip_modules=["1"]))
    assert isinstance(model[0], HALOLinear) and type(model[1]) is nn.Linear
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_halo(nn.Sequential(nn.Linear(4, 4)), HALOConfig(skip_modules=["0"]))
    with pytest.raises(ValueError, match="HALOConfig"):
        apply_halo(nn.Linear(4, 4), {"level": 1})


def test_unsupported_inputs_raise():
    lin = HALOLinear(64, 8, halo_config=HALOConfig())
    with pytest.raises(ValueError, match="float64"):
        lin(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="int64"):
        lin(torch.ones(2, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="last dimension 32.*in_features=64"):
        lin(torch.randn(2, 32))
    with pytest.raises(ValueError, match="in_features=100"):
        HALOLinear(100, 8, halo_config=HALOConfig())


def test_autocast_output_dtype_and_gradient_dtypes():
    lin = HALOLinear(64, 32, halo_config=HALOConfig())
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    z = lin(torch.randn(4, 64, dtype=torch.bfloat16))
    assert z.dtype == torch.bfloat16


def test_frozen_weight_is_quantized_once(monkeypatch):
    import optimum_plugin.halo.linear as L

    count = {"n": 0}
    real = L.quantize_weight

    def counting(w, cfg):
        count["n"] += 1
        return real(w, cfg)

    monkeypatch.setattr(L, "quantize_weight", counting)
    torch.manual_seed(0)
    lin = HALOLinear(64, 32, halo_config=HALOConfig(level=2, token_block_size=16))
    lin.weight.requires_grad_(False)
    x = torch.randn(6, 64, requires_grad=True)
    y1 = lin(x)
    y1.sum().backward()
    y2 = lin(x)
    assert count["n"] == 1 and torch.equal(y1, y2)
    assert lin.weight.grad is None and x.grad is not None
    # the same numbers as the per-call path
    trainable = HALOLinear(64, 32, halo_config=lin.halo_config)
    trainable.load_state_dict(lin.state_dict())
    assert torch.equal(trainable(x), y1)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # an in-place update (what LoRA merging does) invalidates the cache
    y3 = lin(x)
    assert count["n"] == 2 and _rel(y3 - lin.bias, 2 * (y1 - lin.bias)) < 1e-2


def test_empty_batch():
    lin = HALOLinear(64, 8, halo_config=HALOConfig())
    assert lin(torch.randn(0, 3, 64)).shape == (0, 3, 8)


def test_triton_backend_matches_cpu_gemms():
    """The layer on the Triton GEMM (interpreted on the CPU) gives the int_mm / emulated results: int8
    accumulates exactly in both; fp8 sums in float32 in a different order (relative 1e-6 level)."""
    import os

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1 (scripts/test.sh sets it)")
    dev = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    x, w, b, e = (t.to(dev) for t in _data(m=20, k=192, n=48))
    for dtype in ("int8", "fp8_e4m3"):
        cfgs = [HALOConfig(level=2, dtype=dtype, token_block_size=16, backend=be) for be in ("auto", "triton")]
        a, t = (_run(lambda x, w, b, c=c: halo_linear(x, w, b, c), x, w, b, e) for c in cfgs)
        for ga, gt in zip(a, t):
            assert _rel(gt, ga) < 1e-5
