"""Twin-Log quantization of weight matrices (LRQ-DiT), pure PyTorch reference.

Each output row ``w`` (length ``n``) of a weight matrix is split by sign and each half is quantized
uniformly in the log domain with ``b - 1`` bits; the remaining bit is the sign:

    eta          > 0, per row (stored as log2(eta))
    l_j          = log2(|w_j| + eta)
    half h       = positive (w_j >= 0) or negative (w_j < 0), each with its own clipping range
    lo_h, hi_h   = log2(Q_h(p_lo) + eta), log2(Q_h(p_hi) + eta)    (Q_h: quantile of |w| within half h)
    step_h       = (hi_h - lo_h) / (L - 1),  L = 2**(b - 1) levels per half
    q_j          = clamp(round((l_j - lo_h) / step_h), 0, L - 1)
    code_j       = q_j | (sign_j << (b - 1))                      (sign_j = 1 for w_j < 0)
    w^_j         = (-1)**sign_j * (2**(lo_h + q_j * step_h) - eta)

Levels are dense near ``|w| ~ eta`` and sparse in the tails, which fits the Gaussian-like, long-tailed
weights of DiTs better than uniform levels. ``eta`` and the clipping quantiles ``(p_lo, p_hi)`` of each
half are chosen per row by minimizing the (optionally importance-weighted) reconstruction error
``sum_j h_j (w_j - w^_j)**2`` over a grid: every grid point is evaluated at once (vectorized over the
grid and the rows); given ``eta`` the two halves are independent, so each half takes its own best
``(p_lo, p_hi)`` and ``eta`` minimizes the sum of the two halves' minima.

Storage per row: the codes (``b`` bits each, 8 codes packed into ``b`` bytes, see
``rotkv_kernels.quant.pack_codes``; 8-bit codes are stored as they are) and 5 parameters
``(log2 eta, lo_pos, step_pos, lo_neg, step_neg)`` in float16 (all log-domain values of moderate size, so
fp16 neither under- nor overflows). The search rounds candidate parameters to fp16 *before* choosing
codes; a final per-row gain (``unbiased``) rescales the chosen levels so that the quantized row has no
systematic shrinkage, folded into the parameters (the codes are then those of the rescaled row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rotkv_kernels.quant import pack_codes, unpack_codes

__all__ = [
    "TWIN_LOG_BITS",
    "TWIN_LOG_NUM_PARAMS",
    "TwinLogGrid",
    "twin_log_quantize",
    "twin_log_dequantize",
    "twin_log_search",
    "twin_log_pack",
    "twin_log_unpack",
    "twin_log_packed_width",
    "twin_log_linear_ref",
]

TWIN_LOG_BITS = (3, 4, 8)
TWIN_LOG_NUM_PARAMS = 5
PARAM_DTYPE = torch.float16
# Columns of the parameter tensor.
P_LOG2_ETA, P_LO_POS, P_STEP_POS, P_LO_NEG, P_STEP_NEG = range(TWIN_LOG_NUM_PARAMS)


@dataclass(frozen=True)
class TwinLogGrid:
    """The search grid of :func:`twin_log_search`.

    Attributes:
        eta_ratios: candidate ``eta / max|w_row|``, each in ``(0, 1]``.
        lower_quantiles: candidate ``p_lo`` in ``[0, 1)`` (0: no clipping of small magnitudes).
        upper_quantiles: candidate ``p_hi`` in ``(0, 1]`` (1: no clipping of the tail).
    """

    # eta from log-like (1e-3: levels dense near 0, for heavy tails) to almost linear (1.0: for Gaussian rows);
    # the quantiles clip the few smallest / largest magnitudes of a half.
    eta_ratios: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
    lower_quantiles: tuple[float, ...] = (0.0, 0.02, 0.1)
    upper_quantiles: tuple[float, ...] = (1.0, 0.999, 0.99, 0.98, 0.95)

    def __post_init__(self) -> None:
        for name, lo_ok, hi_ok in (
            ("eta_ratios", lambda v: v > 0, lambda v: v <= 1),
            ("lower_quantiles", lambda v: v >= 0, lambda v: v < 1),
            ("upper_quantiles", lambda v: v > 0, lambda v: v <= 1),
        ):
            vals = getattr(self, name)
            if not isinstance(vals, (tuple, list)) or len(vals) == 0:
                raise ValueError(f"{name}={vals!r}: must be a non-empty sequence of floats")
            vals = tuple(float(v) for v in vals)
            if not all(lo_ok(v) and hi_ok(v) for v in vals):
                raise ValueError(f"{name}={vals}: out of range (eta in (0,1], lower in [0,1), upper in (0,1])")
            object.__setattr__(self, name, vals)
        if min(self.upper_quantiles) <= max(self.lower_quantiles):
            raise ValueError(
                f"every upper quantile must exceed every lower quantile: lower={self.lower_quantiles}, "
                f"upper={self.upper_quantiles}"
            )

    @property
    def size(self) -> int:
        return len(self.eta_ratios) * len(self.lower_quantiles) * len(self.upper_quantiles)


def _check_bits(bits: int) -> None:
    if bits not in TWIN_LOG_BITS:
        raise ValueError(f"bits={bits!r}: Twin-Log supports {TWIN_LOG_BITS} bits per weight")


def twin_log_packed_width(in_features: int, bits: int) -> int:
    """Bytes per packed row: ``ceil(n / 8) * bits`` for 3/4 bits (rows padded to 8 codes), ``n`` for 8 bits."""
    _check_bits(bits)
    if bits == 8:
        return in_features
    return (in_features + 7) // 8 * bits


def twin_log_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(rows, n)`` uint8 codes -> ``(rows, twin_log_packed_width(n, bits))`` uint8 (padding codes are 0)."""
    _check_bits(bits)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    n = codes.shape[-1]
    pad = (-n) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    return pack_codes(codes, bits)


def twin_log_unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`twin_log_pack`: ``(rows, in_features)`` uint8 codes."""
    _check_bits(bits)
    if bits == 8:
        return packed
    return unpack_codes(packed, bits)[..., :in_features]


def _row_params(params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    p = params.to(torch.float32)
    return tuple(p[..., i : i + 1] for i in range(TWIN_LOG_NUM_PARAMS))


def twin_log_dequantize(codes: torch.Tensor, params: torch.Tensor, bits: int,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w^`` from unpacked codes.

    Args:
        codes: ``(rows, n)`` uint8, ``code = q | sign << (bits - 1)``.
        params: ``(rows, 5)`` (fp16 values) ``(log2 eta, lo_pos, step_pos, lo_neg, step_neg)``.
    Returns:
        ``(rows, n)`` tensor of ``dtype``; arithmetic in fp32.
    """
    _check_bits(bits)
    log2_eta, lo_p, st_p, lo_n, st_n = _row_params(params)
    c = codes.to(torch.int32)
    neg = (c >> (bits - 1)) & 1
    q = (c & ((1 << (bits - 1)) - 1)).to(torch.float32)
    is_neg = neg.bool()
    lo = torch.where(is_neg, lo_n, lo_p)
    st = torch.where(is_neg, st_n, st_p)
    mag = torch.exp2(lo + q * st) - torch.exp2(log2_eta)
    return torch.where(is_neg, -mag, mag).to(dtype)


def twin_log_quantize(w: torch.Tensor, params: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``w`` (``(rows, n)``) for given parameters (``(rows, 5)``); uint8 ``(rows, n)``."""
    _check_bits(bits)
    log2_eta, lo_p, st_p, lo_n, st_n = _row_params(params)
    w = w.to(torch.float32)
    levels = 1 << (bits - 1)
    neg = w < 0
    lg = torch.log2(w.abs() + torch.exp2(log2_eta))
    lo = torch.where(neg, lo_n, lo_p)
    st = torch.where(neg, st_n, st_p)
    # A half whose clipping range is empty (one distinct magnitude) has step 0: every value takes level 0.
    safe = torch.where(st > 0, st, torch.ones_like(st))
    q = torch.where(st > 0, torch.round((lg - lo) / safe), torch.zeros_like(lg)).clamp(0, levels - 1)
    return (q.to(torch.int32) | (neg.to(torch.int32) << (bits - 1))).to(torch.uint8)


def _half_quantiles(mag: torch.Tensor, mask: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """Quantiles of ``mag`` over the entries where ``mask`` holds, per row: ``(len(qs), rows)`` (NaN if empty)."""
    m = torch.where(mask, mag, torch.full_like(mag, float("nan")))
    qt = torch.tensor(qs, dtype=torch.float32, device=mag.device)
    return torch.nanquantile(m, qt, dim=-1)


def twin_log_search(
    w: torch.Tensor,
    bits: int,
    grid: TwinLogGrid | None = None,
    importance: torch.Tensor | None = None,
    max_chunk_elements: int = 1 << 23,
    unbiased: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin-Log quantize ``w`` with per-row ``eta`` and clipping quantiles chosen by grid search.

    Args:
        w: ``(rows, n)`` float weight (any float dtype; computed in fp32).
        bits: 3, 4 or 8 bits per weight (sign + ``bits - 1`` log bits).
        grid: candidate ``eta`` ratios and clipping quantiles (default :class:`TwinLogGrid`).
        importance: optional ``(n,)`` non-negative weights ``h_j`` of the error ``sum_j h_j (w_j - w^_j)**2``
            (e.g. ``E[x_j**2]`` of the layer's input, so the error approximates the output error).
        max_chunk_elements: rows are processed in chunks so that ``grid points x rows x n`` stays below this.
        unbiased: rescale each row's levels by ``g = <w, w>_h / <w^, w>_h`` after the search, so that the
            dequantized row has slope 1 against the original (``<w^, w>_h = <w, w>_h``). Clipping makes the
            error-minimizing levels shrink the row (by 2-3 % at 3 bits on DiT weights); in a deep network such a
            coherent gain error compounds layer after layer, unlike the zero-mean rounding noise. The gain is
            folded exactly into the parameters: ``g (2**(lo + q step) - eta) = 2**(lo + log2 g + q step) - g eta``,
            so ``log2 g`` is added to ``log2 eta``, ``lo_pos`` and ``lo_neg`` (then rounded to fp16).
        ``codes`` ``(rows, n)`` uint8 (unpacked) and ``params`` ``(rows, 5)`` float16.
    Raises:
        ValueError: unsupported bits, a non-2-D or non-finite weight, or a bad importance vector.
    """
    _check_bits(bits)
    grid = grid or TwinLogGrid()
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D (rows, n), got shape {tuple(w.shape)}")
    w = w.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("w has non-finite values; Twin-Log quantization needs finite weights")
    rows, n = w.shape
    if importance is None:
        h = torch.ones(n, dtype=torch.float32, device=w.device)
    else:
        h = importance.detach().to(torch.float32).reshape(-1).to(w.device)
        if h.numel() != n or not torch.isfinite(h).all() or (h < 0).any():
            raise ValueError(f"importance must be a finite non-negative ({n},) vector")
    per_row = grid.size * n
    chunk = max(1, min(rows, max_chunk_elements // max(per_row, 1)))
    codes_out = torch.empty(rows, n, dtype=torch.uint8, device=w.device)
    params_out = torch.empty(rows, TWIN_LOG_NUM_PARAMS, dtype=PARAM_DTYPE, device=w.device)
    for r0 in range(0, rows, chunk):
        c, p = _search_chunk(w[r0 : r0 + chunk], bits, grid, h)
        if unbiased:
            p = _unbias(w[r0 : r0 + chunk], c, p, bits, h)
        codes_out[r0 : r0 + chunk] = c
        params_out[r0 : r0 + chunk] = p
    return codes_out, params_out


def _unbias(w: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, bits: int, h: torch.Tensor) -> torch.Tensor:
    """Fold the per-row gain ``g = <w, w>_h / <w^, w>_h`` into the parameters (see ``twin_log_search``)."""
    w_hat = twin_log_dequantize(codes, params, bits)
    num = (h * w * w).sum(dim=1)
    den = (h * w_hat * w).sum(dim=1)
    # Rows that quantize to (almost) nothing, or would need an absurd gain, keep their levels.
    g = torch.where((den > 0) & (num > 0), num / den.clamp_min(1e-30), torch.ones_like(num)).clamp(0.5, 2.0)
    p = params.to(torch.float32).clone()
    for col in (P_LOG2_ETA, P_LO_POS, P_LO_NEG):
        p[:, col] += torch.log2(g)
    return p.to(PARAM_DTYPE)


def _r16(t: torch.Tensor) -> torch.Tensor:
    """Round to the stored precision (fp16) and back, so codes are chosen with the stored parameters."""
    return t.to(PARAM_DTYPE).to(torch.float32)


def _search_chunk(w: torch.Tensor, bits: int, grid: TwinLogGrid, h: torch.Tensor):
    rows, n = w.shape
    levels = 1 << (bits - 1)
    mag = w.abs()
    neg = w < 0
    amax = mag.amax(dim=1)  # (rows,)
    # An all-zero row still needs a finite eta; any positive value reconstructs it exactly (2**lo - eta == 0).
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    E, A, B = len(grid.eta_ratios), len(grid.lower_quantiles), len(grid.upper_quantiles)
    etas = torch.tensor(grid.eta_ratios, dtype=torch.float32, device=w.device)[:, None] * amax[None, :]  # (E, rows)
    log2_eta = _r16(torch.log2(etas))
    eta = torch.exp2(log2_eta)  # the eta the stored parameter decodes to

    # Quantiles of |w| within each half, per row: (A or B, rows) each.
    qlo_pos = _half_quantiles(mag, ~neg, grid.lower_quantiles)
    qhi_pos = _half_quantiles(mag, ~neg, grid.upper_quantiles)
    qlo_neg = _half_quantiles(mag, neg, grid.lower_quantiles)
    qhi_neg = _half_quantiles(mag, neg, grid.upper_quantiles)

    def half_candidates(qlo: torch.Tensor, qhi: torch.Tensor):
        # lo, step for every (eta, p_lo, p_hi): (E, A, B, rows); an empty half (NaN) gets lo = log2 eta, step 0.
        lo = torch.log2(qlo[None, :, None, :] + eta[:, None, None, :])
        hi = torch.log2(qhi[None, None, :, :] + eta[:, None, None, :])
        empty = torch.isnan(lo) | torch.isnan(hi)
        l2e = log2_eta[:, None, None, :].expand_as(lo)
        lo = torch.where(empty, l2e, lo)
        hi = torch.where(empty, l2e, hi)
        step = (hi - lo).clamp_min(0) / (levels - 1)
        return _r16(lo), _r16(step)

    lo_p, st_p = half_candidates(qlo_pos, qhi_pos)
    lo_n, st_n = half_candidates(qlo_neg, qhi_neg)

    # Evaluate every candidate on every element, (E, A, B, rows, n), both halves in one pass: each element uses
    # its own half's (lo, step); the per-half error sums are then taken with the half masks.
    negm = neg[None, None, None]
    lo = torch.where(negm, lo_n[..., None], lo_p[..., None])
    st = torch.where(negm, st_n[..., None], st_p[..., None])
    # A zero step (empty or single-valued half) decodes to 2**lo whatever q is; inv = 0 makes q = 0.
    inv = torch.where(st > 0, 1.0 / st.clamp_min(1e-30), torch.zeros_like(st))
    e = torch.log2(mag[None] + eta[:, :, None])[:, None, None] - lo  # (E, A, B, rows, n)
    e.mul_(inv).round_().clamp_(0, levels - 1)
    e.mul_(st).add_(lo).exp2_().sub_(eta[:, None, None, :, None]).sub_(mag).square_().mul_(h)
    del lo, st, inv
    posf, negf = (~neg).to(torch.float32), neg.to(torch.float32)
    err_p = torch.einsum("...rn,rn->...r", e, posf).reshape(E, A * B, rows)
    err_n = torch.einsum("...rn,rn->...r", e, negf).reshape(E, A * B, rows)
    best_p_err, best_p = err_p.min(dim=1)  # (E, rows)
    best_n_err, best_n = err_n.min(dim=1)
    best_e = (best_p_err + best_n_err).argmin(dim=0)  # (rows,)
    ar = torch.arange(rows, device=w.device)
    ip = best_p[best_e, ar]
    in_ = best_n[best_e, ar]

    def pick(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return t.reshape(E, A * B, rows)[best_e, idx, ar]

    params = torch.stack(
        [log2_eta[best_e, ar], pick(lo_p, ip), pick(st_p, ip), pick(lo_n, in_), pick(st_n, in_)], dim=-1
    ).to(PARAM_DTYPE)
    codes = twin_log_quantize(w, params, bits)
    return codes, params


def twin_log_linear_ref(
    x: torch.Tensor,
    packed: torch.Tensor,
    params: torch.Tensor,
    bits: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of the fused kernel: ``x @ W^.T + bias`` with ``W^`` dequantized from packed codes.

    Args:
        x: ``(..., in_features)`` float.
        packed: ``(out, twin_log_packed_width(in_features, bits))`` uint8.
        params: ``(out, 5)`` fp16.
        bias: optional ``(out,)``.
    Returns:
        ``(..., out)`` fp32.
    """
    w = twin_log_dequantize(twin_log_unpack(packed, bits, in_features), params, bits)
    b = None if bias is None else bias.to(torch.float32)
    return torch.nn.functional.linear(x.to(torch.float32), w, b)
