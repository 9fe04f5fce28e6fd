"""FSDP2 helpers for HALO, including HQ-FSDP: all-gather the 8-bit ``Q(rot W)`` instead of full-precision W.

Plain FSDP2 needs nothing special: ``apply_halo(model, cfg)`` then ``fully_shard`` as usual; each
rank all-gathers the float weight and the HALO layer quantizes it.

HQ-FSDP (``HALOConfig(hq_fsdp=True)`` and :func:`prepare_hq_fsdp` before ``fully_shard``) uses
FSDP2's all-gather extension (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` on the sharded
tensor). FSDP shards a weight ``(N, K)`` by rows, and both the rotation (over K) and row scales are
local to a row, so each rank rotates and quantizes its own rows::

    pre_all_gather  (rank r):  q_r, s_r = Q(rot W_r)         int8/fp8 codes (N/P, K) + float32 scales
    all-gather                 q = cat_r q_r, s = cat_r s_r  K + 4 bytes per row instead of 4K (fp32) or 2K (bf16)
    post_all_gather            HALOQuantizedWeight(q, s): the unsharded "weight" the HALO layer consumes

With ``granularity="tensor"`` the ranks first all-reduce the amax so that every shard uses the
global scale. Gradients are ordinary dense ``(N, K)`` tensors, reduce-scattered by FSDP as usual, and
the optimizer updates the full-precision shard.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from optimum_plugin.halo.config import HALOConfig
from optimum_plugin.halo.functional import rotate_features
from optimum_plugin.halo.linear import HALOLinear
from optimum_plugin.halo.quantized_weight import HALOQuantizedWeight
from rotkv_kernels.lowp_matmul import qmax, torch_dtype

# HALOQuantizedWeight lives in quantized_weight.py (the HALO layer reads it too) and is re-exported here.
__all__ = ["HALOQuantizedWeight", "HQShardedWeight", "prepare_hq_fsdp", "all_gather_bytes"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

# Bytes each rank contributed to weight all-gathers through HQ-FSDP (for tests and benchmarks).
_GATHERED_BYTES: dict[str, int] = {"quantized": 0}


def all_gather_bytes(reset: bool = False) -> int:
    """Bytes this rank has fed into HQ-FSDP weight all-gathers so far."""
    n = _GATHERED_BYTES["quantized"]
    if reset:
        _GATHERED_BYTES["quantized"] = 0
    return n


def _quantize_rows(w: torch.Tensor, cfg: HALOConfig, group) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q(rot w)`` of a row shard; per-tensor scales use the amax all-reduced over ``group``."""
    wr = rotate_features(w, cfg)
    m = qmax(cfg.dtype)
    if cfg.granularity == "row":
        amax = wr.abs().amax(dim=1, keepdim=True)
    else:
        amax = wr.abs().amax().reshape(1, 1)
        if group is not None and dist.is_initialized():
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    scale = amax.clamp_min(1e-30) / m
    y = (wr / scale).clamp_(-m, m)
    q = torch.round(y).to(torch.int8) if cfg.dtype == "int8" else y.to(torch_dtype(cfg.dtype))
    if cfg.granularity == "tensor":
        # every row carries the global scale so the all-gathered scales line up with the rows
        scale = scale.expand(w.shape[0], 1).contiguous()
    return q, scale


# Ops whose outputs stay sharded-weight wrappers: what FSDP2 does to a parameter while sharding it.
_PRESERVE = {
    aten.empty_like.default,
    aten.new_zeros.default,
    aten.new_empty.default,
    aten.slice.Tensor,
    aten.copy_.default,
    aten.view.default,
    aten.as_strided.default,
    aten._to_copy.default,
    aten._pin_memory.default,
    aten.split.Tensor,
    aten.chunk.default,
    aten.clone.default,
    aten.detach.default,
    aten.alias.default,
}


class HQShardedWeight(torch.Tensor):
    """A full-precision weight (or FSDP shard of it) that all-gathers as ``Q(rot W)``.

    Every op runs on the wrapped float tensor (the optimizer updates it in place); the ops FSDP uses
    to shard a parameter keep the wrapper, so the local shard still carries the all-gather hooks.
    """

    @staticmethod
    def __new__(cls, data: torch.Tensor, cfg: HALOConfig):
        return torch.Tensor._make_wrapper_subclass(
            cls, data.size(), strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            layout=data.layout, device=data.device, requires_grad=data.requires_grad,
        )

    def __init__(self, data: torch.Tensor, cfg: HALOConfig):
        self._data = data
        self._cfg = cfg

    def __repr__(self) -> str:
        return f"HQShardedWeight({self._data!r})"

    def __tensor_flatten__(self):
        return ["_data"], self._cfg

    @staticmethod
    def __tensor_unflatten__(inner, cfg, outer_size, outer_stride):
        return HQShardedWeight(inner["_data"], cfg)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        cfg = None

        def unwrap(t):
            nonlocal cfg
            cfg = t._cfg
            return t._data

        args, kwargs = pytree.tree_map_only(HQShardedWeight, unwrap, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _PRESERVE:
            return out
        return pytree.tree_map_only(torch.Tensor, lambda x: HQShardedWeight(x, cfg), out)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        group = mesh.get_group() if mesh is not None else None
        with torch.no_grad():
            q, s = _quantize_rows(self._data, self._cfg, group)
        _GATHERED_BYTES["quantized"] += q.numel() * q.element_size() + s.numel() * s.element_size()
        return (q, s), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        codes, scale = all_gather_outputs
        if self._cfg.granularity == "tensor":
            scale = scale[:1]
        if out is not None:
            # FSDP refills the same all-gather buffers in place; `out` already views them.
            if not isinstance(out, HALOQuantizedWeight):
                raise RuntimeError(f"HQ-FSDP expected the unsharded weight to be HALOQuantizedWeight, got {type(out)}")
            out.codes, out.scale = codes, scale
            return
        return HALOQuantizedWeight(codes, scale, param_dtype), (codes, all_gather_outputs[1])


def prepare_hq_fsdp(model: nn.Module, world_size: int | None = None) -> int:
    """Wrap the weights of the model's HALO layers for HQ-FSDP; call after ``apply_halo`` and before
    ``fully_shard``. The config must have ``hq_fsdp=True``.

    Args:
        world_size: shard count to check ``out_features`` against (default: the initialized process group's).
    Returns:
        the number of weights wrapped.
    Raises:
        ValueError: no HALO layers, a config without ``hq_fsdp=True``, or ``out_features`` that the world
            size does not divide (FSDP would pad the shard and the all-gathered rows would not line up).
    """
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, HALOLinear)]
    if not layers:
        raise ValueError("prepare_hq_fsdp: the model has no HALO layers; call apply_halo(model, config) first")
    count = 0
    for name, mod in layers:
        cfg = mod.halo_config
        if not cfg.hq_fsdp:
            raise ValueError(f"prepare_hq_fsdp: {name} uses a HALOConfig with hq_fsdp=False; set hq_fsdp=True")
        if mod.out_features % world_size:
            raise ValueError(
                f"prepare_hq_fsdp: {name} has out_features={mod.out_features}, not divisible by world size {world_size}; "
                "leave this module out (skip_modules) or use a world size that divides it"
            )
        w = mod.weight
        if isinstance(w.data, HQShardedWeight):
            continue
        mod.weight = nn.Parameter(HQShardedWeight(w.data, cfg), requires_grad=w.requires_grad)
        count += 1
    logger.info("HQ-FSDP: %d HALO weights all-gather in %s", count, layers[0][1].halo_config.dtype)
    return count


def unwrap_hq_fsdp(model: nn.Module) -> dict[str, Any]:
    """Undo :func:`prepare_hq_fsdp` on an unsharded model (plain float weights again)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, HALOLinear) and isinstance(mod.weight, HQShardedWeight):
            mod.weight = nn.Parameter(mod.weight._data, requires_grad=mod.weight.requires_grad)
            out[name] = mod.weight
    return out
