"""Error bounds shared by the kernel tests, each derived in its docstring (no tuned constants).

Notation: ``u`` is the unit roundoff of a float format (fp32: 2^-24), ``gamma_k = k u / (1 - k u)`` bounds
the relative error of any k-term sum or product chain (Higham, Accuracy and Stability, Lemma 3.1).
"""

from __future__ import annotations

import math

import pytest
import torch

from rotkv_kernels.hadamard import hadamard_factors, hadamard_transform
from rotkv_kernels.quant import dequantize_groupwise, scale_dtypes, unpack_codes

U32 = 2.0**-24
# Unit roundoff (half an ulp, relative) of each output dtype.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Smallest positive subnormal: the absolute rounding floor near zero (half of it is the max error there).
TINY_ABS = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}
# Relative half-ulp of each stored scale format (how far a stored scale can be from the fp32 one).
SCALE_REL_ROUNDING = {"fp16": 2.0**-11, "fp8": 2.0**-4}


def gamma(k: int, u: float = U32) -> float:
    return k * u / (1 - k * u)


def ref_hadamard_terms(n: int) -> int:
    """Rounding steps on the path of one output of ``hadamard.hadamard_transform``: ``log2(p)`` butterfly
    stages, a dot of length ``m`` with the core (at most ``m - 1`` additions, counted as ``m``), and the final
    ``1/sqrt(n)`` multiply. Every entry is +-1, so the error is at most ``gamma_K * ||x||_1 / sqrt(n)``."""
    m, p = hadamard_factors(n)
    return int(math.log2(p)) + m + 1


def triton_hadamard_terms(n: int) -> int:
    """Same for ``hadamard_triton``: two fp32 dots of padded lengths ``b_pad`` and ``a_pad`` (zero padding
    adds exact zeros, so counting it only loosens the bound) and the final multiply."""
    from rotkv_kernels.hadamard_triton import hadamard_plan

    plan = hadamard_plan(n)
    return plan.a_pad + plan.b_pad + 1


def hadamard_fp32_bound(x: torch.Tensor, block: int, terms: int) -> torch.Tensor:
    """Per-element bound ``gamma_terms * ||x_block||_1 / sqrt(block)``, broadcast to ``x``'s shape (fp64)."""
    xb = x.double().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    l1 = xb.abs().sum(-1, keepdim=True)
    return (gamma(terms) * l1 / math.sqrt(block)).expand_as(xb).reshape(x.shape)


def group_quant_bound(y: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                      clip_ratio: float) -> torch.Tensor:
    """Per-element bound on ``|y - dequant(quant(y))|`` from the stored scale ``s`` and zero ``z``.

    Codes are ``clamp(rint(y/s) + z, 0, maxq)``, so the grid is ``(q - z) s`` for ``q`` in ``[0, maxq]``, i.e.
    ``[v_bot, v_top] = [-z s, (maxq - z) s]`` with step ``s``. Rounding to the nearest grid point is off by
    at most ``s/2`` inside ``[v_bot - s/2, v_top + s/2]``; outside, the clamp returns the end of the grid.
    With ``lo, hi`` the clipped group range (``clip * min``, ``clip * max``), every element obeys

        |y - y^| <= max(s/2, v_bot - lo, hi - v_top) + dist(y, [lo, hi]) + slack,

    slack ``= 4 u (|y| + |y^|) + 2^-140`` for the fp32 rounding of ``y/s`` (which can push a value at a .5 tie
    to either side: still within ``s/2 + u|y|``) and of the product ``(q - z) s``.
    """
    maxq = (1 << bits) - 1
    yg = y.double().reshape(*y.shape[:-1], y.shape[-1] // group_size, group_size)
    s = scale.double().unsqueeze(-1)
    z = zero.double().unsqueeze(-1)
    lo = (yg.float().amin(-1, keepdim=True) * clip_ratio).double()
    hi = (yg.float().amax(-1, keepdim=True) * clip_ratio).double()
    v_bot, v_top = -z * s, (maxq - z) * s
    inner = torch.maximum(torch.maximum(s / 2, v_bot - lo), hi - v_top)
    outside = torch.clamp(lo - yg, min=0) + torch.clamp(yg - hi, min=0)
    slack = 4 * U32 * (yg.abs() + torch.maximum(v_bot.abs(), v_top.abs())) + 2.0**-140
    return (inner + outside + slack).reshape(y.shape)


def device_for_triton() -> str:
    """``cuda`` if present, else ``cpu`` (which needs the interpreter); skip the test if neither can run."""
    pytest.importorskip("triton")
    from rotkv_kernels.hadamard_triton import is_interpreted

    if torch.cuda.is_available() and not is_interpreted():
        return "cuda"
    if is_interpreted():
        return "cpu"
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 (scripts/test.sh sets it)")


# ---- RotateKV cache helpers (shared by the reference and Triton cache tests) ----------------------------


def block_perm(width: int, block: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation mapping each ``block`` of channels onto itself."""
    return torch.cat([torch.randperm(block, generator=gen) + b * block for b in range(width // block)])


def llama_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """HF Llama rotary tables ``[T, D]``: ``emb = cat(freqs, freqs)``, ``cos(emb)``, ``sin(emb)``."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = positions.double()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def decode_rotated(record, width, bits, group_size, scale_format):
    """Dequantized values of a record in stored (rotated, permuted) order, from quant.py's primitives."""
    sd, zd = scale_dtypes(scale_format)
    g = width // group_size
    cb = width * bits // 8
    codes = unpack_codes(record[:, :cb], bits)
    scale = record[:, cb:cb + g * sd.itemsize].contiguous().view(sd)
    zero = record[:, cb + g * sd.itemsize:].contiguous().view(zd)
    return dequantize_groupwise(codes, scale, zero, group_size), scale.float(), zero.float()


def roundtrip_norm_bound(x, record, *, bits, group_size, rot_width, perm, clip_ratio, scale_format):
    """Per (token, rotation block) bound on ``||read(write(x)) - x||_2`` (no RoPE).

    In the rotated basis ``y = H x`` every stored element is off by at most ``group_quant_bound`` (stored
    scale and zero, see kernel_bounds). The permutation only reorders, and the inverse rotation is
    orthogonal, so the error of each block of ``x`` has the L2 norm of its elements' errors in ``y``. On top:
    the fp32 rounding of the forward rotation (inside the quantizer's input: ``e_fwd``, it moves values by at
    most the Hadamard bound, which we add to each element) and of the inverse rotation (``e_inv``).
    """
    t, h, d = x.shape
    width = h * d
    y = hadamard_transform(x.reshape(t, width).float(), block_size=rot_width)
    if perm is not None:
        y = y[:, perm]
    deq, scale, zero = decode_rotated(record, width, bits, group_size, scale_format)
    eb = group_quant_bound(y, scale, zero, bits, group_size, clip_ratio)
    # forward rounding: the quantizer saw fl(Hx), not Hx
    l1 = x.double().reshape(t, width // rot_width, rot_width).abs().sum(-1)
    k = ref_hadamard_terms(rot_width)
    e_fwd = gamma(k) * l1 / math.sqrt(rot_width)
    # inverse rounding on the dequantized values
    if perm is not None:
        unperm = torch.empty_like(deq)
        unperm[:, perm] = deq
        deq, eb_unperm = unperm, torch.empty_like(eb)
        eb_unperm[:, perm] = eb
        eb = eb_unperm
    l1_deq = deq.double().reshape(t, width // rot_width, rot_width).abs().sum(-1)
    e_inv = gamma(k) * l1_deq / math.sqrt(rot_width)
    per_block = eb.reshape(t, width // rot_width, rot_width).pow(2).sum(-1).sqrt()
    return per_block + e_fwd * math.sqrt(rot_width) + e_inv * math.sqrt(rot_width)
