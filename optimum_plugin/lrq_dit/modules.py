"""`LRQLinear`: a linear layer whose weight stays packed and is dequantized at run time.

State (all buffers are persistent and saved; shapes for ``out x n`` with ``b`` weight bits):

    weight          uint8  (out, twin_log_packed_width(n, b))  packed codes, 8 per b bytes (8-bit: one per byte)
    weight_params   int16  (out, 5) Twin-Log | (out, 2) uniform   fp16 bit patterns (see below)
    bias            float  (out,)                                  nn.Parameter, if the layer had one
    shift           int16  (n,)                                    fp16 bit patterns of delta, if shifting
    smooth          int16  (n,)                                    fp16 bit patterns of s, if smoothing
    rot_perm        int32  (n,)                                    zigzag permutation (outlier-aware)
    rot_channels    int16  (2, K, steps)                           greedy channels (outlier-aware)
    rot_signs       uint8  (2, K, steps, ceil(block / 8))          greedy signs, bit-packed (outlier-aware)

fp16 parameters are stored as their int16 bit patterns so that ``from_pretrained(torch_dtype=...)`` (which
casts every floating-point tensor of a checkpoint) cannot round them: they are what the codes were chosen
with. Forward, for ``x`` ``(..., n)`` in any float dtype (fp32 arithmetic inside):

    x' = rotate((x - delta) / s)             (folded offline: W' = rotate(W * s), bias' = bias + W delta)
    x' = fake_quant_per_token(x', act_bits)  (asymmetric min-max per token; skipped if act_bits is None)
    y  = x' @ dequant(weight).T + bias       (Triton kernel on CUDA for Twin-Log, PyTorch reference otherwise)

The packed codes are stored under the float layer's own name, ``weight``: a loader without the plugin
(diffusers or transformers, where an unknown ``quant_method`` only logs a warning) then meets a uint8 tensor of
another shape where it expects the float weight and refuses (transformers: a size-mismatch error) instead of
loading an unquantized layer with a freshly initialised weight.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from rotkv_kernels.twin_log import (
    TWIN_LOG_NUM_PARAMS,
    twin_log_dequantize,
    twin_log_packed_width,
    twin_log_unpack,
)
from rotkv_kernels.twin_log_triton import triton_runnable, twin_log_linear_triton

from .config import LayerPlan, LRQDiTConfig
from .rotation import rebuild_block_rotation, rotate, unpack_bits

__all__ = ["KERNELS", "LRQLinear", "fake_quant_per_token", "replace_with_skeletons", "set_module", "uniform_dequantize"]

logger = logging.getLogger(__name__)

KERNELS = ("auto", "torch", "triton")
UNIFORM_NUM_PARAMS = 2  # (scale, zero)


def fake_quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min-max quantize-dequantize along the last dim (one scale and zero per token).

    ``s = max(max(x) - min(x), 1e-8) / (2**b - 1)``, ``z = round(-min(x) / s)``,
    ``x^ = (clamp(round(x / s) + z, 0, 2**b - 1) - z) * s``. The zero point keeps the range fully used for
    one-sided inputs (post-GELU activations). fp32 in, fp32 out.
    """
    maxq = (1 << bits) - 1
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / maxq
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return (q - zero) * scale


def uniform_dequantize(codes: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Per-row asymmetric dequantization ``(q - z) * s``; ``params`` ``(rows, 2)`` = (scale, zero)."""
    p = params.to(torch.float32)
    return (codes.to(torch.float32) - p[:, 1:2]) * p[:, 0:1]


class LRQLinear(nn.Module):
    """Packed replacement of ``nn.Linear`` (see the module docstring for state and maths).

    Args:
        in_features, out_features, bias: as ``nn.Linear`` (a shifted layer always has a bias: it holds ``W delta``).
        weight_bits: 3, 4 or 8.
        act_bits: 4, 6, 8 or ``None``.
        weight_quantizer: ``"twin_log"`` or ``"uniform"``.
        plan: the layer's :class:`LayerPlan` (rotation kind, block size, greedy steps, smoothing).
        device, dtype: of the bias (buffers have fixed integer dtypes).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_bits: int,
        act_bits: int | None,
        weight_quantizer: str,
        plan: LayerPlan,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.weight_quantizer = weight_quantizer
        self.plan = plan
        self.kernel = "auto"
        n_params = TWIN_LOG_NUM_PARAMS if weight_quantizer == "twin_log" else UNIFORM_NUM_PARAMS
        width = twin_log_packed_width(in_features, weight_bits)
        self.register_buffer("weight", torch.zeros(out_features, width, dtype=torch.uint8, device=device))
        self.register_buffer("weight_params", torch.zeros(out_features, n_params, dtype=torch.int16, device=device))
        if bias or plan.shift:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        for name, on in (("shift", plan.shift), ("smooth", plan.smooth)):
            self.register_buffer(name, torch.zeros(in_features, dtype=torch.int16, device=device) if on else None)
        if plan.rotation == "outlier_aware":
            k = in_features // plan.block_size
            self.register_buffer("rot_perm", torch.zeros(in_features, dtype=torch.int32, device=device))
            self.register_buffer(
                "rot_channels", torch.zeros(2, k, plan.greedy_steps, dtype=torch.int16, device=device)
            )
            self.register_buffer(
                "rot_signs",
                torch.zeros(2, k, plan.greedy_steps, (plan.block_size + 7) // 8, dtype=torch.uint8, device=device),
            )
        self._rot_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- state helpers ------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"W{self.weight_bits}A{self.act_bits or 16} {self.weight_quantizer}, rotation={self.plan.rotation}"
            f"(block={self.plan.block_size}), shift={self.plan.shift}, smooth={self.plan.smooth}"
        )

    def _load_from_state_dict(self, *args, **kwargs):
        self._rot_cache = None  # the rotation is rebuilt from the newly loaded buffers
        return super()._load_from_state_dict(*args, **kwargs)

    def invalidate_cache(self) -> None:
        """Drop the rebuilt rotation matrices (call after writing the rotation buffers in place)."""
        self._rot_cache = None

    def shift_values(self) -> torch.Tensor | None:
        """``(n,)`` float32 per-channel shifts ``delta``, or ``None``."""
        return None if self.shift is None else self.shift.view(torch.float16).to(torch.float32)

    def smooth_factors(self) -> torch.Tensor | None:
        """``(n,)`` float32 smoothing factors, or ``None``."""
        return None if self.smooth is None else self.smooth.view(torch.float16).to(torch.float32)

    def params_fp16(self) -> torch.Tensor:
        return self.weight_params.view(torch.float16)

    def rotation_matrices(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(R_1, R_2)`` ``(K, b, b)`` float32 of an outlier-aware rotation, rebuilt once from the buffers."""
        if self.plan.rotation != "outlier_aware":
            return None
        if self._rot_cache is None or self._rot_cache[0].device != self.rot_channels.device:
            b = self.plan.block_size
            ch = self.rot_channels.cpu()
            sg = unpack_bits(self.rot_signs.cpu(), b)
            r1 = rebuild_block_rotation(ch[0], sg[0]).to(torch.float32)
            r2 = rebuild_block_rotation(ch[1], sg[1]).to(torch.float32)
            dev = self.rot_channels.device
            self._rot_cache = (r1.to(dev), r2.to(dev))
        return self._rot_cache

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``rotate((x - delta) / s)`` in fp32 (no activation quantization)."""
        xf = x.to(torch.float32)
        d = self.shift_values()
        if d is not None:
            xf = xf - d
        s = self.smooth_factors()
        if s is not None:
            xf = xf / s
        perm = self.rot_perm.to(torch.int64) if self.plan.rotation == "outlier_aware" else None
        return rotate(xf, self.plan.rotation, self.plan.block_size, self.rotation_matrices(), perm)

    def dequantized_weight(self) -> torch.Tensor:
        """The folded weight ``W'`` ``(out, n)`` fp32, as the forward uses it."""
        codes = twin_log_unpack(self.weight, self.weight_bits, self.in_features)
        if self.weight_quantizer == "twin_log":
            return twin_log_dequantize(codes, self.params_fp16(), self.weight_bits)
        return uniform_dequantize(codes, self.params_fp16())

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.kernel == "torch" or self.weight_quantizer != "twin_log":
            if self.kernel == "triton":
                raise ValueError("kernel='triton' supports weight_quantizer='twin_log' only")
            return False
        if self.kernel == "triton":
            return True
        return x.is_cuda and triton_runnable(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel not in KERNELS:
            raise ValueError(f"LRQLinear.kernel={self.kernel!r}: expected one of {KERNELS}")
        xt = self.transform_input(x)
        if self.act_bits is not None:
            xt = fake_quant_per_token(xt, self.act_bits)
        bias = None if self.bias is None else self.bias.to(torch.float32)
        if self._use_triton(xt):
            y = twin_log_linear_triton(xt, self.weight, self.params_fp16(), self.weight_bits,
                                       self.in_features, bias)
        else:
            y = F.linear(xt, self.dequantized_weight(), bias)
        return y.to(x.dtype)

    # ---- size accounting --------------------------------------------------------------------------
    def storage_bytes(self) -> int:
        """Bytes this layer's state takes in a checkpoint (buffers and bias)."""
        total = sum(b.numel() * b.element_size() for b in self.buffers())
        if self.bias is not None:
            total += self.bias.numel() * self.bias.element_size()
        return total


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_with_skeletons(model: nn.Module, config: LRQDiTConfig) -> int:
    """Swap every layer listed in ``config.layers`` for an empty :class:`LRQLinear` (for loading a checkpoint).

    Returns the number of swapped layers.
    Raises:
        ValueError: ``config.layers`` is missing or names a module that is not an ``nn.Linear`` of ``model``.
    """
    if not config.layers:
        raise ValueError("quantization_config has no `layers`: the checkpoint was not written by LRQ-DiT's quantize_")
    for name, plan in config.layers.items():
        try:
            m = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"quantization_config names layer {name!r}, which this model does not have") from e
        if isinstance(m, LRQLinear):
            continue
        if not isinstance(m, nn.Linear):
            raise ValueError(f"quantization_config names {name!r}, a {type(m).__name__}, not an nn.Linear")
        dev = m.weight.device
        q = LRQLinear(m.in_features, m.out_features, m.bias is not None, config.weight_bits, config.act_bits,
                      config.weight_quantizer, plan, device=None if dev.type == "meta" else dev,
                      dtype=m.weight.dtype)
        if dev.type == "meta" and q.bias is not None:
            q.bias = nn.Parameter(torch.empty(m.out_features, dtype=m.weight.dtype, device="meta"),
                                  requires_grad=False)
        set_module(model, name, q)
    return len(config.layers)
