"""`HALOConfig`: the validated, versioned, JSON round-trippable description of a HALO training recipe.

HALO (Ashkboos et al., 2025, arXiv:2501.02625) runs every large matmul of training in 8 bits and
places Hadamard rotations so that outliers of activations, weights and output gradients are spread
before they are quantized. The level says where the rotations go (``H`` a normalized Hadamard
matrix over the input features, ``T`` one over the token dimension, ``Q`` the quantizer, ``E`` the
output gradient ``dL/dY``):

    level 0:  Y = Q(X) Q(W)^T            dX = Q(E) Q(W)               dW = Q(E^T) Q(X)
    level 1:  Y = Q(XH) Q(WH)^T          dX = [Q(E) Q(WH)] H^T        dW = [Q(E^T) Q(XH)] H^T
    level 2:  as level 1, and            dX = T^T [Q(TE) Q(WH)] H^T
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any

from rotkv_kernels.hadamard import has_hadamard
from rotkv_kernels.lowp_matmul import BACKENDS, GRANULARITIES, LOWP_DTYPES

__all__ = ["HALOConfig", "HALO_CONFIG_VERSION", "HADAMARD_MODES"]

HALO_CONFIG_VERSION = 1
HADAMARD_MODES = ("full", "block")
LEVELS = (0, 1, 2)


@dataclass(frozen=True)
class HALOConfig:
    """How HALO quantizes the linear layers of a model for training.

    Attributes:
        level: 0 (no rotation), 1 (rotate along the input features in forward and backward) or 2
            (level 1 plus a token-dimension rotation of the output gradient for the input gradient).
        dtype: ``"int8"`` or ``"fp8_e4m3"``: the format of every matmul operand.
        granularity: ``"row"`` (one scale per token / output channel) or ``"tensor"`` (one scale per
            operand, as in the paper's kernels).
        hadamard: ``"full"`` (one Hadamard over all ``in_features``) or ``"block"`` (block-diagonal,
            ``hadamard_block_size`` channels per block).
        hadamard_block_size: block of ``hadamard="block"``; ignored for ``"full"``.
        token_block_size: level 2 rotates the output gradient along tokens in blocks of this many
            tokens (token counts are zero-padded to a multiple).
        skip_modules: ``fnmatch`` patterns of module names left in full precision; a pattern matches
            a module's qualified name or its last component (default: ``lm_head``).
        backend: matmul backend of :func:`rotkv_kernels.lowp_matmul.lowp_matmul` (``"auto"``: real
            INT8 GEMMs where PyTorch has them).
        hq_fsdp: under FSDP2, all-gather the quantized (rotated) weights instead of full precision
            (HALO's HQ-FSDP); see :mod:`optimum_plugin.halo.fsdp`.
        version: schema version of this config.
    """

    level: int = 1
    dtype: str = "int8"
    granularity: str = "row"
    hadamard: str = "full"
    hadamard_block_size: int = 64
    token_block_size: int = 64
    skip_modules: tuple[str, ...] = field(default_factory=lambda: ("lm_head",))
    backend: str = "auto"
    hq_fsdp: bool = False
    version: int = HALO_CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.level, bool) or self.level not in LEVELS:
            raise ValueError(f"level={self.level!r}: expected one of {LEVELS}")
        if self.dtype not in LOWP_DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {LOWP_DTYPES}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r}: expected one of {GRANULARITIES}")
        if self.hadamard not in HADAMARD_MODES:
            raise ValueError(f"hadamard={self.hadamard!r}: expected one of {HADAMARD_MODES}")
        for name in ("hadamard_block_size", "token_block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or not has_hadamard(v):
                raise ValueError(
                    f"{name}={v!r}: must be a positive int with a Hadamard matrix (m * 2**k, m in 1, 12, 20, ...), "
                    "e.g. 64 or 128"
                )
        if isinstance(self.skip_modules, str):
            raise ValueError(f"skip_modules={self.skip_modules!r}: pass a list of patterns, e.g. ['lm_head']")
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        if not all(isinstance(p, str) and p for p in self.skip_modules):
            raise ValueError(f"skip_modules={self.skip_modules!r}: every pattern must be a non-empty string")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: expected one of {BACKENDS}")
        if not isinstance(self.hq_fsdp, bool):
            raise ValueError(f"hq_fsdp={self.hq_fsdp!r}: must be True or False")
        if self.version != HALO_CONFIG_VERSION:
            raise ValueError(
                f"HALOConfig version {self.version} is not supported by this rotkv (expects {HALO_CONFIG_VERSION}); "
                "recreate the config with this version"
            )

    # ---- derived values -------------------------------------------------------------------------
    @property
    def rotates(self) -> bool:
        """Whether the input-feature Hadamard is used (levels 1 and 2)."""
        return self.level >= 1

    def rotation_block(self, in_features: int) -> int:
        """The Hadamard order applied to ``in_features``: all of it, or the block size."""
        return in_features if self.hadamard == "full" else self.hadamard_block_size

    def check_in_features(self, in_features: int, name: str = "layer") -> None:
        """Raise ``ValueError`` if this config cannot rotate a layer of ``in_features`` inputs."""
        if not self.rotates:
            return
        if self.hadamard == "full" and not has_hadamard(in_features):
            raise ValueError(
                f"{name}: in_features={in_features} has no Hadamard matrix (need m * 2**k with m in 1, 12, 20, 28, "
                f"36, ...); use hadamard='block' with a hadamard_block_size dividing {in_features}, or add the "
                "module to skip_modules"
            )
        if self.hadamard == "block" and in_features % self.hadamard_block_size:
            raise ValueError(
                f"{name}: hadamard_block_size={self.hadamard_block_size} does not divide in_features={in_features}; "
                "choose a divisor or add the module to skip_modules"
            )

    def skips(self, module_name: str) -> bool:
        """Whether a module (by qualified name) is left in full precision."""
        last = module_name.rsplit(".", 1)[-1]
        return any(fnmatch.fnmatchcase(module_name, p) or fnmatch.fnmatchcase(last, p) for p in self.skip_modules)

    # ---- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip_modules"] = list(self.skip_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HALOConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown HALOConfig fields {sorted(unknown)}; known fields are {sorted(known)}")
        d = dict(d)
        if "skip_modules" in d and not isinstance(d["skip_modules"], str):
            d["skip_modules"] = tuple(d["skip_modules"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "HALOConfig":
        return cls.from_dict(json.loads(s))
