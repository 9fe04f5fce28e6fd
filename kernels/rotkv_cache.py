"""RotateKV cache records: write (rotate, permute, quantize, pack) and read (the inverse, then RoPE).

Pure-PyTorch reference (``rotkv_write_ref`` / ``rotkv_read_ref``, built from ``hadamard.py`` and
``quant.py``), plus the dispatching entry points ``rotkv_write`` / ``rotkv_read`` (custom ops
``rotkv::rotkv_write`` / ``rotkv::rotkv_read``) that run the Triton kernels of ``rotkv_cache_triton`` when
the tensor is on CUDA, or on the CPU when ``TRITON_INTERPRET=1`` and Triton is installed, and the
reference otherwise. This module imports neither Triton nor a GPU library.

One token's record (``record_bytes(width, bits, group_size, scale_format)`` bytes, ``width = H * D``)::

    y      = hadamard_transform(x.reshape(T, H*D), block_size=rot_width)      # kron(I, H_rw / sqrt(rw))
    y      = y[:, perm]                                                       # optional, block-preserving
    q, s, z = quantize_groupwise(y, bits, group_size, clip_ratio, scale_format)
    record = [ pack_codes(q) | s of all groups (raw LE bytes) | z of all groups (raw LE bytes) ]

Reading inverts it: unpack, ``(q - z) * s``, ``y[:, perm] = y``, inverse block Hadamard, reshape to
``[T, H, D]`` and, given ``cos``/``sin`` (``[T, D]``, Hugging Face Llama convention), RoPE:
``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``.

Error of ``read(write(x))``: the rotation is orthogonal, so in the rotated basis every element's error is
the quantizer's (at most ``s/2`` plus the clipping and scale-rounding terms of ``quant.py``), and the
inverse rotation keeps the L2 norm of the error per rotation block; RoPE is a rotation per channel pair,
so it keeps the per-pair norm.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from rotkv_kernels.hadamard import hadamard_transform
from rotkv_kernels.quant import dequantize_groupwise, pack_codes, quantize_groupwise, scale_dtypes, unpack_codes
from rotkv_kernels.rotkv_layout import check_perm, check_record_read_args, check_record_write_args, record_bytes

__all__ = [
    "record_bytes",
    "check_perm",
    "rotkv_write_ref",
    "rotkv_read_ref",
    "rotkv_write",
    "rotkv_read",
    "triton_available",
    "interpret_requested",
    "use_triton",
    "rotate_half",
    "apply_rope",
]

logger = logging.getLogger(__name__)

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face Llama's ``rotate_half``: ``cat(-x[..., D/2:], x[..., :D/2])``."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face-convention RoPE: ``x * cos + rotate_half(x) * sin``, in ``x``'s dtype.

    ``cos``/``sin`` (``[..., D]``, each half repeated) broadcast against ``x`` (``[..., D]``); the caller
    casts them (the record read applies RoPE in fp32, the transformers reference in the model dtype).
    """
    return x * cos + rotate_half(x) * sin


def rotkv_write_ref(
    x: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    rot_width: int,
    perm: torch.Tensor | None = None,
    clip_ratio: float = 1.0,
    scale_format: str = "fp16",
) -> torch.Tensor:
    """Encode ``x`` into RotateKV records (reference).

    Args:
        x: ``[T, H, D]`` fp32/fp16/bf16: pre-RoPE keys or values. Arithmetic is fp32.
        bits: 2, 3 or 4. group_size: quantization group along the (permuted) ``H*D`` channels.
        rot_width: block Hadamard width (``g*D`` for keys, ``D`` for values); divides ``H*D``.
        perm: optional int64 ``[H*D]`` block-preserving channel permutation applied after the rotation.
        clip_ratio: min-max clip ratio in (0, 1]. scale_format: ``"fp16"`` or ``"fp8"``.
    Returns:
        uint8 ``[T, record_bytes(H*D, bits, group_size, scale_format)]``.
    Raises:
        ValueError: any argument that does not fit (see the messages).
    """
    check_record_write_args(x, bits, group_size, rot_width, perm, clip_ratio, scale_format)
    t, h, d = x.shape
    y = hadamard_transform(x.reshape(t, h * d).to(torch.float32), block_size=rot_width)
    if perm is not None:
        y = y[:, perm]
    codes, scale, zero = quantize_groupwise(y, bits, group_size, clip_ratio, scale_format)
    return torch.cat([pack_codes(codes, bits), scale.view(torch.uint8), zero.view(torch.uint8)], dim=-1)


def rotkv_read_ref(
    record: torch.Tensor,
    *,
    num_heads: int,
    head_dim: int,
    bits: int,
    group_size: int,
    rot_width: int,
    perm: torch.Tensor | None = None,
    scale_format: str = "fp16",
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode RotateKV records (reference); the inverse of :func:`rotkv_write_ref`, then optional RoPE.

    Args:
        record: uint8 ``[T, record_bytes(H*D, ...)]``.
        cos, sin: ``[T, D]`` (both or neither): RoPE at each token's position, applied in fp32.
    Returns:
        ``[T, H, D]`` of ``out_dtype``; all arithmetic in fp32, one rounding to ``out_dtype`` at the end.
    Raises:
        ValueError: any argument that does not fit (see the messages).
    """
    check_record_read_args(record, num_heads, head_dim, bits, group_size, rot_width, perm, scale_format, cos, sin,
                           out_dtype)
    t = record.shape[0]
    width = num_heads * head_dim
    sd, zd = scale_dtypes(scale_format)
    n_groups = width // group_size
    cb = width * bits // 8
    sb = n_groups * sd.itemsize
    codes = unpack_codes(record[:, :cb], bits)
    scale = record[:, cb:cb + sb].contiguous().view(sd)
    zero = record[:, cb + sb:].contiguous().view(zd)
    y = dequantize_groupwise(codes, scale, zero, group_size, torch.float32)
    if perm is not None:
        unperm = torch.empty_like(y)
        unperm[:, perm] = y
        y = unperm
    x = hadamard_transform(y, block_size=rot_width, inverse=True).reshape(t, num_heads, head_dim)
    if cos is not None:
        x = apply_rope(x, cos.to(torch.float32)[:, None, :], sin.to(torch.float32)[:, None, :])
    return x.to(out_dtype)


# ---- dispatch ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton is installed and importable (the kernels modules load without it either way)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install is reported, not hidden
        logger.warning("triton is installed but failed to import (%s); using the PyTorch reference", e)
        return False
    return True


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (kernels on CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def _warn_no_triton_on_cuda() -> None:
    logger.warning("CUDA tensors but Triton is not installed: the RotateKV cache ops run their PyTorch references")


def use_triton(t: torch.Tensor) -> bool:
    """Whether the RotateKV cache ops (records here, paged cache in ``rotkv_paged``) run their Triton kernels
    for a tensor on ``t``'s device: on CUDA when Triton is installed (a warning, once, when it is not), on
    the CPU only under ``TRITON_INTERPRET=1``."""
    if t.device.type == "cuda":
        if triton_available():
            return True
        _warn_no_triton_on_cuda()
        return False
    return t.device.type == "cpu" and interpret_requested() and triton_available()


@torch.library.custom_op("rotkv::rotkv_write", mutates_args=())
def _rotkv_write_op(
    x: torch.Tensor, bits: int, group_size: int, rot_width: int, perm: torch.Tensor | None, clip_ratio: float,
    scale_format: str,
) -> torch.Tensor:
    kw = dict(bits=bits, group_size=group_size, rot_width=rot_width, perm=perm, clip_ratio=clip_ratio,
              scale_format=scale_format)
    if use_triton(x):
        from rotkv_kernels.rotkv_cache_triton import rotkv_write_triton

        return rotkv_write_triton(x, **kw)
    return rotkv_write_ref(x, **kw)


@_rotkv_write_op.register_fake
def _(x, bits, group_size, rot_width, perm, clip_ratio, scale_format):
    width = x.shape[1] * x.shape[2]
    sd, zd = scale_dtypes(scale_format)
    return x.new_empty(x.shape[0], width * bits // 8 + (width // group_size) * (sd.itemsize + zd.itemsize),
                       dtype=torch.uint8)


@torch.library.custom_op("rotkv::rotkv_read", mutates_args=())
def _rotkv_read_op(
    record: torch.Tensor, num_heads: int, head_dim: int, bits: int, group_size: int, rot_width: int,
    perm: torch.Tensor | None, scale_format: str, cos: torch.Tensor | None, sin: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    kw = dict(num_heads=num_heads, head_dim=head_dim, bits=bits, group_size=group_size, rot_width=rot_width,
              perm=perm, scale_format=scale_format, cos=cos, sin=sin, out_dtype=out_dtype)
    if use_triton(record):
        from rotkv_kernels.rotkv_cache_triton import rotkv_read_triton

        return rotkv_read_triton(record, **kw)
    return rotkv_read_ref(record, **kw)


@_rotkv_read_op.register_fake
def _(record, num_heads, head_dim, bits, group_size, rot_width, perm, scale_format, cos, sin, out_dtype):
    return record.new_empty(record.shape[0], num_heads, head_dim, dtype=out_dtype)


def rotkv_write(
    x: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    rot_width: int,
    perm: torch.Tensor | None = None,
    clip_ratio: float = 1.0,
    scale_format: str = "fp16",
) -> torch.Tensor:
    """:func:`rotkv_write_ref`'s contract; runs the Triton kernel on CUDA (or the CPU under
    ``TRITON_INTERPRET=1``), else the reference. Custom op ``rotkv::rotkv_write``."""
    return torch.ops.rotkv.rotkv_write(x, bits, group_size, rot_width, perm, float(clip_ratio), scale_format)


def rotkv_read(
    record: torch.Tensor,
    *,
    num_heads: int,
    head_dim: int,
    bits: int,
    group_size: int,
    rot_width: int,
    perm: torch.Tensor | None = None,
    scale_format: str = "fp16",
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`rotkv_read_ref`'s contract; runs the Triton kernel on CUDA (or the CPU under
    ``TRITON_INTERPRET=1``), else the reference. Custom op ``rotkv::rotkv_read``."""
    return torch.ops.rotkv.rotkv_read(record, num_heads, head_dim, bits, group_size, rot_width, perm,
                                      scale_format, cos, sin, out_dtype)
