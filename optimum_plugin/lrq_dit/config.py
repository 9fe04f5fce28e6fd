"""`LRQDiTConfig`: the validated, versioned, JSON round-trippable recipe of LRQ-DiT.

A config says *how* to quantize (bits, the Twin-Log search grid, the rotation policy, ...). Quantizing a
model resolves it into one :class:`LayerPlan` per converted ``nn.Linear`` (which rotation, which block size),
stored in ``config.layers``; a checkpoint's ``quantization_config`` carries that resolved config, which is
all a loader needs to rebuild the packed modules before it reads the weights.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any

from rotkv_kernels.twin_log import TWIN_LOG_BITS, TwinLogGrid

__all__ = [
    "ACT_BITS",
    "CONFIG_VERSION",
    "QUANT_METHOD",
    "ROTATIONS",
    "WEIGHT_BITS",
    "WEIGHT_QUANTIZERS",
    "LRQDiTConfig",
    "LayerPlan",
]

CONFIG_VERSION = 1
QUANT_METHOD = "lrq_dit"
WEIGHT_BITS = TWIN_LOG_BITS  # (3, 4, 8)
ACT_BITS = (4, 6, 8)
ROTATIONS = ("auto", "hadamard", "outlier_aware", "none")
LAYER_ROTATIONS = ("hadamard", "outlier_aware", "none")
WEIGHT_QUANTIZERS = ("twin_log", "uniform")


@dataclass(frozen=True)
class LayerPlan:
    """What calibration decided for one linear layer.

    Attributes:
        rotation: ``"hadamard"``, ``"outlier_aware"`` or ``"none"``.
        block_size: width of each diagonal block of the rotation (divides ``in_features``; 0 for none).
        greedy_steps: greedy rotation steps stored per block and stage (outlier-aware only, else 0).
        smooth: whether a per-channel smoothing vector divides the input.
        shift: whether a per-channel shift is subtracted from the input (and folded into the bias).
        fluctuation: the layer's measured fluctuation metric (informative; -1 when not measured).
    """

    rotation: str = "none"
    block_size: int = 0
    greedy_steps: int = 0
    smooth: bool = False
    shift: bool = False
    fluctuation: float = -1.0

    def __post_init__(self) -> None:
        if self.rotation not in LAYER_ROTATIONS:
            raise ValueError(f"LayerPlan.rotation={self.rotation!r}: expected one of {LAYER_ROTATIONS}")
        if not isinstance(self.block_size, int) or self.block_size < 0:
            raise ValueError(f"LayerPlan.block_size={self.block_size!r}: must be a non-negative int")
        if (self.rotation == "none") != (self.block_size == 0):
            raise ValueError(f"LayerPlan: block_size={self.block_size} does not fit rotation={self.rotation!r}")
        if not isinstance(self.greedy_steps, int) or self.greedy_steps < 0:
            raise ValueError(f"LayerPlan.greedy_steps={self.greedy_steps!r}: must be a non-negative int")
        if self.rotation != "outlier_aware" and self.greedy_steps:
            raise ValueError("LayerPlan.greedy_steps is only meaningful for outlier_aware rotations")
        object.__setattr__(self, "fluctuation", float(self.fluctuation))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerPlan":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LayerPlan fields {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class LRQDiTConfig:
    """How LRQ-DiT quantizes the linear layers of a diffusion transformer.

    Attributes:
        weight_bits: bits per weight, 3, 4 or 8 (Twin-Log: 1 sign bit + ``weight_bits - 1`` log bits).
        act_bits: bits per activation (4, 6 or 8), quantized dynamically per token (asymmetric min-max);
            ``None`` keeps activations in floating point (weight-only; no smoothing or rotation then).
        weight_quantizer: ``"twin_log"`` (LRQ-DiT) or ``"uniform"`` (per-row asymmetric min-max
            round-to-nearest, the baseline).
        eta_grid / clip_lower_grid / clip_upper_grid: the Twin-Log search grid (see
            ``rotkv_kernels.twin_log.TwinLogGrid``): ``eta / max|w_row|`` and the clipping quantiles.
        rotation: ``"auto"`` (the Adaptive Rotation Scheme: per layer, Hadamard if the fluctuation
            metric is below ``fluctuation_threshold``, else outlier-aware; and no rotation where the chosen one
            does not lower the per-token activation quantization error on the calibration sample),
            ``"hadamard"``, ``"outlier_aware"`` or ``"none"`` (forced for every layer).
        fluctuation_threshold: threshold of the fluctuation metric (max over channels of the per-channel
            absolute maximum divided by its median, after smoothing) above which ``"auto"`` picks the
            outlier-aware rotation.
        rotation_block_size: width of the diagonal blocks of the rotations. ``None``: Hadamard rotations
            span the whole input width when a Hadamard matrix of that order exists (else the largest
            order that divides it), outlier-aware rotations use blocks of at most 64 (so that the zigzag
            permutation has blocks to balance).
        greedy_steps: at most this many greedy steps per block and stage of the outlier-aware rotation.
        smooth_alpha: migration strength ``alpha`` of the per-channel smoothing
            ``s_j = max|X_j - delta_j|**alpha / max|W_j|**(1 - alpha)``; ``None`` disables smoothing.
        shift: subtract the per-channel calibration mean ``delta_j = E[X_j]`` from the input before smoothing
            and rotation, and fold ``W delta`` into the bias. It centres one-sided channels (post-GELU inputs,
            adaLN shifts): otherwise a rotation sums their offsets into one huge channel (for a Hadamard,
            the first: ``sum_j x_j / sqrt(n)``).
        modules_to_not_convert: ``fnmatch`` patterns of module names (full dotted name) kept in floating point.
        calibration_tokens: activation rows kept per layer during calibration (a uniform reservoir of the
            stream; ``4 * calibration_tokens * in_features`` bytes per layer while calibrating).
        layers: the resolved per-layer plans (module name -> :class:`LayerPlan`); ``None`` until a model is
            quantized. A checkpoint's config always has it.
        version: schema version.
    """

    weight_bits: int = 4
    act_bits: int | None = 8
    weight_quantizer: str = "twin_log"
    eta_grid: tuple[float, ...] = TwinLogGrid().eta_ratios
    clip_lower_grid: tuple[float, ...] = TwinLogGrid().lower_quantiles
    clip_upper_grid: tuple[float, ...] = TwinLogGrid().upper_quantiles
    rotation: str = "auto"
    fluctuation_threshold: float = 4.0
    rotation_block_size: int | None = None
    greedy_steps: int = 4
    smooth_alpha: float | None = 0.5
    shift: bool = True
    modules_to_not_convert: tuple[str, ...] = field(default_factory=tuple)
    calibration_tokens: int = 1024
    layers: dict[str, LayerPlan] | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.weight_bits, bool) or self.weight_bits not in WEIGHT_BITS:
            raise ValueError(f"weight_bits={self.weight_bits!r}: supported weight bit widths are {WEIGHT_BITS}")
        if self.act_bits is not None and (isinstance(self.act_bits, bool) or self.act_bits not in ACT_BITS):
            raise ValueError(f"act_bits={self.act_bits!r}: supported activation bit widths are {ACT_BITS} or None")
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise ValueError(f"weight_quantizer={self.weight_quantizer!r}: expected one of {WEIGHT_QUANTIZERS}")
        # TwinLogGrid validates the grid and raises ValueError naming the bad field.
        grid = TwinLogGrid(tuple(self.eta_grid), tuple(self.clip_lower_grid), tuple(self.clip_upper_grid))
        object.__setattr__(self, "eta_grid", grid.eta_ratios)
        object.__setattr__(self, "clip_lower_grid", grid.lower_quantiles)
        object.__setattr__(self, "clip_upper_grid", grid.upper_quantiles)
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation={self.rotation!r}: expected one of {ROTATIONS}")
        if not isinstance(self.fluctuation_threshold, (int, float)) or not self.fluctuation_threshold > 1.0:
            raise ValueError(f"fluctuation_threshold={self.fluctuation_threshold!r}: must be a number > 1")
        object.__setattr__(self, "fluctuation_threshold", float(self.fluctuation_threshold))
        if self.rotation_block_size is not None and (
            isinstance(self.rotation_block_size, bool)
            or not isinstance(self.rotation_block_size, int)
            or self.rotation_block_size < 2
            or self.rotation_block_size % 2
        ):
            raise ValueError(
                f"rotation_block_size={self.rotation_block_size!r}: must be an even int >= 2 with a Hadamard "
                "matrix (e.g. 32, 64, 128) or None"
            )
        if not isinstance(self.greedy_steps, int) or not 1 <= self.greedy_steps <= 64:
            raise ValueError(f"greedy_steps={self.greedy_steps!r}: must be an int in [1, 64]")
        if self.smooth_alpha is not None and not (
            isinstance(self.smooth_alpha, (int, float)) and 0.0 <= self.smooth_alpha <= 1.0
        ):
            raise ValueError(f"smooth_alpha={self.smooth_alpha!r}: must be in [0, 1] or None")
        if not isinstance(self.shift, bool):
            raise ValueError(f"shift={self.shift!r}: must be True or False")
        if isinstance(self.modules_to_not_convert, str):
            raise ValueError("modules_to_not_convert must be a list of patterns, not one string")
        object.__setattr__(self, "modules_to_not_convert", tuple(str(p) for p in self.modules_to_not_convert))
        if not isinstance(self.calibration_tokens, int) or self.calibration_tokens < 16:
            raise ValueError(f"calibration_tokens={self.calibration_tokens!r}: must be an int >= 16")
        if self.layers is not None:
            if not isinstance(self.layers, dict):
                raise ValueError("layers must be a dict of module name -> LayerPlan (or None)")
            plans = {
                str(k): v if isinstance(v, LayerPlan) else LayerPlan.from_dict(dict(v)) for k, v in self.layers.items()
            }
            if self.act_bits is None and any(p.rotation != "none" or p.smooth or p.shift for p in plans.values()):
                raise ValueError(
                    "layers: rotations, smoothing and shifts need act_bits (weight-only configs have none)"
                )
            object.__setattr__(self, "layers", plans)
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"LRQDiTConfig version {self.version} is not supported by this rotkv (expects {CONFIG_VERSION}); "
                "re-quantize the model with this version"
            )

    # ---- derived values -------------------------------------------------------------------------
    @property
    def grid(self) -> TwinLogGrid:
        return TwinLogGrid(self.eta_grid, self.clip_lower_grid, self.clip_upper_grid)

    @property
    def quant_method(self) -> str:
        return QUANT_METHOD

    def excludes(self, module_name: str) -> bool:
        """Whether ``module_name`` matches a pattern of ``modules_to_not_convert``."""
        return any(fnmatch.fnmatchcase(module_name, p) for p in self.modules_to_not_convert)

    def label(self) -> str:
        """``W4A8``-style short name."""
        return f"W{self.weight_bits}A{self.act_bits if self.act_bits is not None else 16}"

    # ---- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in ("eta_grid", "clip_lower_grid", "clip_upper_grid", "modules_to_not_convert"):
            d[k] = list(d[k])
        d["layers"] = None if self.layers is None else {k: v.to_dict() for k, v in self.layers.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LRQDiTConfig":
        d = dict(d)
        d.pop("quant_method", None)  # written by the Hugging Face wrappers; always "lrq_dit"
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LRQDiTConfig fields {sorted(unknown)}")
        for k in ("eta_grid", "clip_lower_grid", "clip_upper_grid", "modules_to_not_convert"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "LRQDiTConfig":
        return cls.from_dict(json.loads(s))

    def replace(self, **changes: Any) -> "LRQDiTConfig":
        return dataclasses.replace(self, **changes)
