"""Quantize a model with LRQ-DiT: one entry point, ``quantize_(model, config, stats)``.

Per converted ``nn.Linear`` (weight ``W`` ``(out, n)``, calibration statistics of its input):

1. plan: the shift ``delta = mean(X)`` per channel (if ``shift``), smoothing ``s`` (if ``smooth_alpha``), the
   fluctuation metric of ``(X - delta) / s`` and the rotation (``auto``: Hadamard below
   ``fluctuation_threshold``, outlier-aware above, and none if the chosen rotation does not lower the per-token
   activation quantization error on the calibration sample); none of these without ``act_bits``;
2. fold: ``W' = rotate(W * s)``, ``bias' = bias + W delta``;
3. quantize ``W'`` row by row: Twin-Log with the grid search, importance ``h_j = E[x'_j**2]`` of the
   transformed inputs (so the searched error tracks the output error), or uniform round-to-nearest;
4. swap the module for an :class:`LRQLinear` holding packed codes.

The resolved :class:`LayerPlan` of every layer goes into the returned config (``config.layers``), which is
also attached to the model so that ``save_pretrained`` writes it as ``quantization_config``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import nn

from rotkv_kernels.twin_log import twin_log_pack, twin_log_search

from .calibration import LayerStats, calibrate_pipeline, target_linears
from .config import LayerPlan, LRQDiTConfig
from .modules import LRQLinear, fake_quant_per_token, replace_with_skeletons, set_module
from .rotation import OutlierRotation, default_block_size, fluctuation, pack_bits, rotate, smoothing_factors

__all__ = ["channel_shift", "needs_statistics", "plan_layer", "quantize_", "quantize_linear", "quantize_pipeline",
           "replace_with_skeletons", "uniform_quantize_rows"]  # replace_with_skeletons: re-exported from .modules

logger = logging.getLogger(__name__)


def uniform_quantize_rows(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row asymmetric min-max round-to-nearest (the baseline).

    ``s = max(max - min, eps) / (2**b - 1)`` (fp16), ``z = clamp(round(-min / s), 0, 2**b - 1)``,
    ``q = clamp(round(w / s) + z, 0, 2**b - 1)``. Returns codes ``(rows, n)`` uint8 and params ``(rows, 2)``
    fp16 ``(s, z)``.
    """
    maxq = (1 << bits) - 1
    w = w.to(torch.float32)
    lo, hi = w.amin(dim=1, keepdim=True).clamp_max(0), w.amax(dim=1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / maxq).clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16).to(torch.float32)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return q.to(torch.uint8), torch.cat([scale, zero], dim=1).to(torch.float16)


def plan_layer(name: str, linear: nn.Linear, config: LRQDiTConfig, stats: LayerStats | None) -> LayerPlan:
    """Decide smoothing and rotation of one layer from its statistics.

    Raises:
        ValueError: the config needs statistics (activation quantization with rotation or smoothing) and
            ``stats`` is None, or a forced rotation cannot be built for this layer's width.
    """
    if config.act_bits is None:
        return LayerPlan()
    if stats is None and needs_statistics(config):
        raise ValueError(
            f"layer {name!r}: rotation={config.rotation!r} / smooth_alpha={config.smooth_alpha} / "
            f"shift={config.shift} "
            "need calibration statistics: run calibrate_pipeline (or ActivationRecorder) first, or use "
            "rotation='hadamard'/'none', smooth_alpha=None and shift=False"
        )
    n = linear.in_features
    smooth = config.smooth_alpha is not None
    fl = -1.0
    if stats is not None:
        delta = channel_shift(stats) if config.shift else torch.zeros(n)
        cabs = centred_absmax(stats, delta)
        s = smoothing_factors(cabs, linear.weight, config.smooth_alpha) if smooth else torch.ones(n)
        fl = fluctuation(cabs / s)
    rotation = config.rotation
    if rotation == "auto":
        rotation = "hadamard" if fl < config.fluctuation_threshold else "outlier_aware"
    if rotation == "none":
        return LayerPlan(rotation="none", smooth=smooth, shift=config.shift, fluctuation=fl)
    try:
        block = default_block_size(n, rotation, config.rotation_block_size)
    except ValueError as e:
        raise ValueError(f"layer {name!r}: {e} (or add it to modules_to_not_convert)") from e
    steps = config.greedy_steps if rotation == "outlier_aware" else 0
    return LayerPlan(rotation=rotation, block_size=block, greedy_steps=steps, smooth=smooth, shift=config.shift,
                     fluctuation=fl)


def token_quant_error(x: torch.Tensor, bits: int) -> float:
    """Squared error of per-token ``bits``-bit fake quantization of ``x`` ``(tokens, n)``."""
    return (fake_quant_per_token(x, bits) - x).pow(2).sum().item()


def needs_statistics(config: LRQDiTConfig) -> bool:
    """Whether quantizing with ``config`` needs calibration statistics."""
    return config.act_bits is not None and (
        config.smooth_alpha is not None or config.shift or config.rotation in ("auto", "outlier_aware")
    )


def channel_shift(stats: LayerStats) -> torch.Tensor:
    """``delta_j = mean_j`` over the calibration tokens, rounded to fp16 (the stored value); 0 if none were seen.

    The mean, not the centre of the range: activations are quantized per token, so what matters is that a
    typical token is centred, and a one-sided channel's range centre sits far from its typical value.
    """
    if stats.seen == 0:
        return torch.zeros_like(stats.absmax)
    return (stats.chsum / stats.seen).to(torch.float16).to(torch.float32)


def centred_absmax(stats: LayerStats, delta: torch.Tensor) -> torch.Tensor:
    """Per-channel ``max |x_j - delta_j|`` from the per-channel extremes."""
    hi = (stats.chmax - delta).abs()
    lo = (stats.chmin - delta).abs()
    m = torch.maximum(hi, lo)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


@torch.no_grad()
def quantize_linear(
    linear: nn.Linear, config: LRQDiTConfig, plan: LayerPlan, stats: LayerStats | None, seed: int = 0,
    name: str = "",
) -> tuple[LRQLinear, LayerPlan]:
    """Build the packed :class:`LRQLinear` of ``linear`` following ``plan``.

    Returns the module and the final plan (an outlier-aware plan's ``greedy_steps`` shrinks to the number of
    steps any block kept).
    """
    w = linear.weight.detach().to(torch.float32).cpu()
    n = linear.in_features
    delta = channel_shift(stats) if plan.shift else None
    s = None
    if plan.smooth:
        s = smoothing_factors(centred_absmax(stats, delta if delta is not None else torch.zeros(n)), w,
                              config.smooth_alpha)
    x = None
    if stats is not None and stats.sample.shape[0] > 0:
        x = stats.sample - delta if delta is not None else stats.sample
        x = x / s if s is not None else x
    oa = None
    mats = perm = None
    if plan.rotation == "outlier_aware":
        oa = OutlierRotation.fit(x, plan.block_size, plan.greedy_steps, seed=seed)
        plan = dataclasses.replace(plan, greedy_steps=oa.steps)
        mats, perm = oa.matrices(), oa.perm
    if config.rotation == "auto" and plan.rotation != "none" and x is not None:
        # The scheme only rotates where it helps: bounded, flat inputs (the sinusoidal timestep features) come
        # out of a Hadamard Gaussian-like, with a larger per-token range than they went in.
        xt = rotate(x, plan.rotation, plan.block_size, mats, perm)
        if token_quant_error(xt, config.act_bits) >= token_quant_error(x, config.act_bits):
            logger.info("%s: the %s rotation does not lower the %d-bit activation error on calibration data; "
                        "not rotating", name or "layer", plan.rotation, config.act_bits)
            plan = dataclasses.replace(plan, rotation="none", block_size=0, greedy_steps=0)
            oa = mats = perm = None
    w_fold = rotate(w * s if s is not None else w, plan.rotation, plan.block_size, mats, perm)
    importance = None
    if x is not None:
        xt = rotate(x, plan.rotation, plan.block_size, mats, perm)
        importance = xt.pow(2).mean(dim=0)
        # A floor keeps channels that never fired during calibration from being ignored entirely.
        importance = importance + 1e-3 * importance.mean().clamp_min(1e-12)
    if config.weight_quantizer == "twin_log":
        codes, params = twin_log_search(w_fold, config.weight_bits, config.grid, importance)
    else:
        codes, params = uniform_quantize_rows(w_fold, config.weight_bits)
    dev = linear.weight.device
    q = LRQLinear(n, linear.out_features, linear.bias is not None, config.weight_bits, config.act_bits,
                  config.weight_quantizer, plan, device=dev, dtype=linear.weight.dtype)
    q.weight.copy_(twin_log_pack(codes, config.weight_bits))
    q.weight_params.copy_(params.view(torch.int16))
    bias = linear.bias.detach().to(torch.float32).cpu() if linear.bias is not None else None
    if delta is not None:
        # x W^T + b = (x - delta) W^T + (b + W delta): the shift moves into the bias, computed in float64.
        folded = (w.double() @ delta.double()).to(torch.float32)
        bias = folded if bias is None else bias + folded
        q.shift.copy_(delta.to(torch.float16).view(torch.int16))
    if bias is not None:
        q.bias.copy_(bias)
    if s is not None:
        q.smooth.copy_(s.to(torch.float16).view(torch.int16))
    if oa is not None:
        q.rot_perm.copy_(oa.perm.to(torch.int32))
        q.rot_channels.copy_(oa.channels)
        q.rot_signs.copy_(pack_bits(oa.signs))
        q.invalidate_cache()
    return q.to(dev), plan


def quantize_(
    model: nn.Module,
    config: LRQDiTConfig,
    stats: dict[str, LayerStats] | None = None,
    seed: int = 0,
    attach: bool = True,
) -> LRQDiTConfig:
    """Quantize ``model``'s linear layers in place; return the resolved config (with ``layers``).

    Args:
        model: any ``nn.Module``; diffusers and transformers models also get their ``quantization_config``
            set, so ``save_pretrained`` / ``from_pretrained`` round-trip (``attach=True``).
        config: the recipe; ``config.layers`` must be ``None`` (a fresh recipe).
        stats: calibration statistics per module name (:func:`calibrate_pipeline`); needed when activations
            are quantized with smoothing or a data-dependent rotation.
    Raises:
        ValueError: the model has nothing to quantize, the config is already resolved, or statistics are
            missing for a layer that needs them.
    """
    if not isinstance(config, LRQDiTConfig):
        raise ValueError(f"config must be an LRQDiTConfig, got {type(config).__name__}")
    if config.layers is not None:
        raise ValueError("config.layers is already resolved (a loaded checkpoint's config): pass a fresh recipe")
    layers = target_linears(model, config)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer to quantize "
            f"(modules_to_not_convert={list(config.modules_to_not_convert)}): nothing to do"
        )
    # Plan every layer first (cheap), so a layer the config cannot handle fails before any weight is searched.
    planned = {
        name: plan_layer(name, linear, config, None if stats is None else stats.get(name))
        for name, linear in layers.items()
    }
    plans: dict[str, LayerPlan] = {}
    for i, (name, linear) in enumerate(layers.items()):
        st = None if stats is None else stats.get(name)
        qmod, plans[name] = quantize_linear(linear, config, planned[name], st, seed=seed + i, name=name)
        set_module(model, name, qmod)
    resolved = config.replace(layers=plans)
    kinds = {}
    for p in plans.values():
        kinds[p.rotation] = kinds.get(p.rotation, 0) + 1
    logger.info("LRQ-DiT %s: quantized %d linear layers (rotations: %s)", config.label(), len(plans), kinds)
    if attach:
        from .registration import attach_quantization_config

        attach_quantization_config(model, resolved)
    return resolved


def quantize_pipeline(
    pipe,
    config: LRQDiTConfig,
    prompts: Sequence,
    num_inference_steps: int = 20,
    batch_size: int = 8,
    component: str = "transformer",
    seed: int = 0,
    progress: bool = True,
    **pipe_kwargs,
) -> LRQDiTConfig:
    """Calibrate ``pipe`` over ``prompts`` x timesteps, then quantize ``pipe.<component>`` in place.

    Weight-only configs (``act_bits=None``) skip the calibration pass. Returns the resolved config.
    """
    stats = None
    if needs_statistics(config):
        stats = calibrate_pipeline(pipe, config, prompts, num_inference_steps, batch_size, component, seed,
                                   progress=progress, **pipe_kwargs)
    return quantize_(getattr(pipe, component), config, stats, seed=seed)
