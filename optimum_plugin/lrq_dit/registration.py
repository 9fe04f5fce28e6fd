"""The one place LRQ-DiT registers itself with diffusers and transformers (idempotent).

After :func:`register` (run when ``optimum_plugin.lrq_dit`` is imported), a component whose ``config.json`` has
``quantization_config.quant_method = "lrq_dit"`` loads packed with ``from_pretrained`` in

* diffusers 0.42.1, which has no registration API (DESIGN.md section 5): the quantizer and its config class
  are inserted into ``diffusers.quantizers.auto.AUTO_QUANTIZER_MAPPING`` / ``AUTO_QUANTIZATION_CONFIG_MAPPING``,
  and ``quant_method`` is a ``str`` Enum because diffusers reads ``quant_method.value``. Those are private
  structures, so another diffusers version is refused with an error instead of being patched blindly;
* transformers (DiT-style models such as ViT backbones), through ``register_quantization_config`` and
  ``register_quantizer``.

Without the plugin imported, diffusers itself refuses the checkpoint ("Unknown quantization type"); transformers
would only log a warning and load an unquantized model with missing weights, so load LRQ-DiT checkpoints
after ``import optimum_plugin.lrq_dit``.
"""

from __future__ import annotations

import json
import logging
from enum import Enum
from typing import Any

import torch

from .config import QUANT_METHOD, LRQDiTConfig

__all__ = [
    "DIFFUSERS_VERSION",
    "LRQDiTDiffusersConfig",
    "LRQDiTDiffusersQuantizer",
    "LRQDiTMethod",
    "LRQDiTTransformersConfig",
    "LRQDiTTransformersQuantizer",
    "attach_quantization_config",
    "check_diffusers_version",
    "register",
]

logger = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.42.1"


def check_diffusers_version() -> None:
    """Raise ``RuntimeError`` unless the installed diffusers is the pinned version."""
    import diffusers

    if diffusers.__version__ != DIFFUSERS_VERSION:
        raise RuntimeError(
            f"LRQ-DiT registers itself in diffusers' private quantizer tables, which it has only been built and "
            f"tested against for diffusers=={DIFFUSERS_VERSION}; found diffusers=={diffusers.__version__}. "
            f"Install diffusers=={DIFFUSERS_VERSION} (pip install 'rotkv[dit]')."
        )


check_diffusers_version()

from diffusers.models.modeling_utils import ModelMixin  # noqa: E402
from diffusers.quantizers import auto as _diffusers_auto  # noqa: E402
from diffusers.quantizers.base import DiffusersQuantizer  # noqa: E402
from diffusers.quantizers.quantization_config import (  # noqa: E402
    QuantizationConfigMixin as _DiffusersQuantizationConfigMixin,
)
from transformers import PreTrainedModel  # noqa: E402
from transformers.quantizers import auto as _transformers_auto  # noqa: E402
from transformers.quantizers.base import HfQuantizer  # noqa: E402
from transformers.utils.quantization_config import (  # noqa: E402
    QuantizationConfigMixin as _TransformersQuantizationConfigMixin,
)


class LRQDiTMethod(str, Enum):
    """``quant_method`` of LRQ-DiT checkpoints; a ``str`` Enum like diffusers' own ``QuantizationMethod``."""

    LRQ_DIT = QUANT_METHOD


class _LRQDiTConfigWrapper:
    """Shared body of the diffusers and transformers config classes: holds an :class:`LRQDiTConfig`."""

    def __init__(self, lrq_config: LRQDiTConfig | None = None, **kwargs: Any) -> None:
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if str(getattr(method, "value", method)) != QUANT_METHOD:
            raise ValueError(f"quant_method={method!r}: this config class reads {QUANT_METHOD!r} configs only")
        if lrq_config is None:
            lrq_config = LRQDiTConfig.from_dict(kwargs)
        elif kwargs:
            raise ValueError(f"pass either an LRQDiTConfig or its fields, not both (got {sorted(kwargs)})")
        elif not isinstance(lrq_config, LRQDiTConfig):
            raise ValueError(f"lrq_config must be an LRQDiTConfig, got {type(lrq_config).__name__}")
        self.quant_method = LRQDiTMethod.LRQ_DIT
        self.lrq_config = lrq_config

    def to_dict(self) -> dict[str, Any]:
        d = self.lrq_config.to_dict()
        d["quant_method"] = QUANT_METHOD
        return d

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __iter__(self):
        yield from self.to_dict().items()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _LRQDiTConfigWrapper) and self.lrq_config == other.lrq_config


class LRQDiTDiffusersConfig(_LRQDiTConfigWrapper, _DiffusersQuantizationConfigMixin):
    """diffusers-facing ``quantization_config`` of LRQ-DiT (wraps a resolved :class:`LRQDiTConfig`)."""

    __init__ = _LRQDiTConfigWrapper.__init__


class LRQDiTTransformersConfig(_LRQDiTConfigWrapper, _TransformersQuantizationConfigMixin):
    """transformers-facing ``quantization_config`` of LRQ-DiT (wraps a resolved :class:`LRQDiTConfig`)."""

    __init__ = _LRQDiTConfigWrapper.__init__


def _after_load(model: torch.nn.Module) -> None:
    from .modules import LRQLinear

    for m in model.modules():
        if isinstance(m, LRQLinear):
            m.invalidate_cache()


class LRQDiTDiffusersQuantizer(DiffusersQuantizer):
    """Loads pre-quantized LRQ-DiT diffusers models: swaps in empty packed modules, then weights load into them.

    Quantizing at load time is refused (``requires_calibration``): LRQ-DiT needs calibration through a pipeline,
    see :func:`optimum_plugin.lrq_dit.quantize_pipeline`.
    """

    requires_calibration = True

    def validate_environment(self, *args, **kwargs) -> None:
        check_diffusers_version()

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        from .modules import replace_with_skeletons

        replace_with_skeletons(model, self.quantization_config.lrq_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        _after_load(model)
        return model

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


class LRQDiTTransformersQuantizer(HfQuantizer):
    """transformers counterpart of :class:`LRQDiTDiffusersQuantizer`."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        from .modules import replace_with_skeletons

        replace_with_skeletons(model, self.quantization_config.lrq_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        _after_load(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _put(table: dict, key: str, cls: type, where: str) -> None:
    old = table.get(key)
    if old is None or old is cls:
        table[key] = cls
        return
    # The same class from a re-imported module (importlib.reload, a second sys.path entry) replaces the old one;
    # anything else under our name is a conflict the user must see.
    if (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__):
        table[key] = cls
        return
    raise RuntimeError(f"{where}[{key!r}] is already taken by {old.__module__}.{old.__qualname__}")


def register() -> None:
    """Make diffusers and transformers load ``quant_method = "lrq_dit"``. Safe to call any number of times."""
    check_diffusers_version()
    _put(_diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, QUANT_METHOD, LRQDiTDiffusersConfig,
         "diffusers AUTO_QUANTIZATION_CONFIG_MAPPING")
    _put(_diffusers_auto.AUTO_QUANTIZER_MAPPING, QUANT_METHOD, LRQDiTDiffusersQuantizer,
         "diffusers AUTO_QUANTIZER_MAPPING")
    # transformers' register_* decorators refuse a second registration; go through them the first time only.
    if QUANT_METHOD not in _transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        _transformers_auto.register_quantization_config(QUANT_METHOD)(LRQDiTTransformersConfig)
    else:
        _put(_transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, QUANT_METHOD, LRQDiTTransformersConfig,
             "transformers AUTO_QUANTIZATION_CONFIG_MAPPING")
    if QUANT_METHOD not in _transformers_auto.AUTO_QUANTIZER_MAPPING:
        _transformers_auto.register_quantizer(QUANT_METHOD)(LRQDiTTransformersQuantizer)
    else:
        _put(_transformers_auto.AUTO_QUANTIZER_MAPPING, QUANT_METHOD, LRQDiTTransformersQuantizer,
             "transformers AUTO_QUANTIZER_MAPPING")


def attach_quantization_config(model: torch.nn.Module, config: LRQDiTConfig) -> None:
    """Mark a model quantized in place so ``save_pretrained`` writes ``quantization_config`` and the packed state.

    diffusers models get ``config.quantization_config`` and an ``hf_quantizer``; transformers models likewise;
    other modules are left as they are (save their ``state_dict`` and ``config.to_json()`` yourself).
    """
    register()
    if isinstance(model, ModelMixin):
        qc = LRQDiTDiffusersConfig(config)
        model.register_to_config(quantization_config=qc)
        model.hf_quantizer = LRQDiTDiffusersQuantizer(qc, pre_quantized=True)
    elif isinstance(model, PreTrainedModel):
        qc = LRQDiTTransformersConfig(config)
        model.config.quantization_config = qc
        model.hf_quantizer = LRQDiTTransformersQuantizer(qc, pre_quantized=True)
        model.config._is_quantized = True
    else:
        logger.info("%s is neither a diffusers nor a transformers model: no quantization_config attached",
                    type(model).__name__)
        return
    model.is_quantized = True
    model.quantization_method = qc.quant_method
