"""The model type of a HALO W8A8 checkpoint: why it is not the base model's, and what loads it.

A HALO W8A8 checkpoint (:func:`optimum_plugin.halo.export.save_w8a8`) is compressed-tensors int8 with an
online Hadamard *input transform* on every quantized linear layer: its weights are stored in the rotated
basis ``W R^T``. transformers 5.19 loads compressed-tensors checkpoints but ignores ``transform_config``
(nothing calls compressed-tensors' ``apply_transform_config``), so a checkpoint typed as its base model
(``"llama"``) would load with plain ``AutoModelForCausalLM.from_pretrained`` into a model whose every layer
multiplies un-rotated inputs by rotated weights -- a silently wrong model (relative logit error ~0.9).

So ``config.json`` says ``"model_type": "halo_w8a8"`` and keeps the base type in ``"halo_base_model_type"``
and the base ``architectures`` (vLLM picks its model class from those). With ``auto_map`` pointing at two
small files written beside the weights (:data:`REMOTE_CODE_FILES`) every route either loads the right model
or stops with an error that names the fix:

- plain ``AutoModelForCausalLM.from_pretrained(path)``: transformers does not know ``halo_w8a8`` and refuses
  unless ``trust_remote_code=True`` is passed; with it, the checkpoint's ``modeling_halo_w8a8.py`` loads the
  model through :func:`optimum_plugin.halo.export.load_w8a8` (the same integer maths as vLLM), or, without
  rotkv installed, raises an ImportError that says to install it.
- vLLM with rotkv installed: the ``halo`` general plugin registers :class:`HALOW8A8Config` under
  ``halo_w8a8`` with transformers' ``AutoConfig`` (:func:`register_config`), so vLLM reads the base model's
  configuration (a subclass of the base config class, :data:`BASE_CONFIGS`), resolves the base architecture
  and serves the compressed-tensors weights with their transform.
- vLLM without rotkv: vLLM cannot read the configuration and stops, asking for ``--trust-remote-code``;
  with it, the checkpoint's ``configuration_halo_w8a8.py`` raises the ImportError that names rotkv.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

__all__ = ["W8A8_MODEL_TYPE", "BASE_TYPE_KEY", "BASE_CONFIGS", "REMOTE_CODE_FILES", "HALOW8A8Config",
           "register_config", "w8a8_config_dict", "base_config_dict", "write_remote_code", "INSTALL_HINT"]

W8A8_MODEL_TYPE = "halo_w8a8"
BASE_TYPE_KEY = "halo_base_model_type"
INSTALL_HINT = ("this HALO W8A8 checkpoint needs rotkv to load correctly: `pip install rotkv`, then "
                "`optimum_plugin.halo.load_w8a8(path)` in transformers, or `vllm serve path` next to rotkv")


# One subclass per base family, defined at module level so that vLLM can pickle the configuration into its
# engine and worker processes. Each *is* the base config (same fields, same validation); only the model type
# differs, which keeps transformers' Auto classes from pairing it with the base model class.
class HALOW8A8LlamaConfig(LlamaConfig):
    model_type = W8A8_MODEL_TYPE


class HALOW8A8MistralConfig(MistralConfig):
    model_type = W8A8_MODEL_TYPE


class HALOW8A8Qwen2Config(Qwen2Config):
    model_type = W8A8_MODEL_TYPE


class HALOW8A8Qwen3Config(Qwen3Config):
    model_type = W8A8_MODEL_TYPE


BASE_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": HALOW8A8LlamaConfig,
    "mistral": HALOW8A8MistralConfig,
    "qwen2": HALOW8A8Qwen2Config,
    "qwen3": HALOW8A8Qwen3Config,
}


class HALOW8A8Config(PretrainedConfig):
    """What ``AutoConfig`` returns for ``model_type="halo_w8a8"``: an instance of the base family's subclass in
    :data:`BASE_CONFIGS`, chosen by ``config_dict["halo_base_model_type"]``.

    Raises:
        ValueError: the base model type is missing or not one HALO's W8A8 export writes.
    """

    model_type = W8A8_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        base = config_dict.get(BASE_TYPE_KEY)
        if base not in BASE_CONFIGS:
            raise ValueError(f"{BASE_TYPE_KEY}={base!r}: HALO W8A8 checkpoints are written for {sorted(BASE_CONFIGS)}")
        return BASE_CONFIGS[base].from_dict(config_dict, **kwargs)


def register_config() -> None:
    """Register :class:`HALOW8A8Config` with transformers' ``AutoConfig`` (idempotent)."""
    from transformers import AutoConfig

    AutoConfig.register(W8A8_MODEL_TYPE, HALOW8A8Config, exist_ok=True)


def w8a8_config_dict(base: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a W8A8 checkpoint from its base model's configuration dict.

    Raises:
        ValueError: the base model type is not one of :data:`BASE_CONFIGS`.
    """
    base_type = base.get("model_type")
    if base_type not in BASE_CONFIGS:
        raise ValueError(f"model_type={base_type!r}: HALO's W8A8 export supports {sorted(BASE_CONFIGS)}")
    cfg = dict(base)
    cfg["model_type"] = W8A8_MODEL_TYPE
    cfg[BASE_TYPE_KEY] = base_type
    cfg["auto_map"] = {"AutoConfig": "configuration_halo_w8a8.HALOW8A8Config",
                       "AutoModelForCausalLM": "modeling_halo_w8a8.HALOW8A8ForCausalLM"}
    return cfg


def base_config_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`w8a8_config_dict` (a base-typed dict is returned unchanged)."""
    if cfg.get("model_type") != W8A8_MODEL_TYPE:
        return dict(cfg)
    out = {k: v for k, v in cfg.items() if k not in (BASE_TYPE_KEY, "auto_map")}
    out["model_type"] = cfg[BASE_TYPE_KEY]
    return out


# The two files transformers imports for ``trust_remote_code=True``. transformers checks the imports of
# remote code but skips try/except blocks, so a missing rotkv reaches the user as INSTALL_HINT.
_CONFIGURATION = f'''"""Written by rotkv (optimum_plugin.halo.export.save_w8a8): the configuration of a HALO W8A8 checkpoint."""
try:
    from optimum_plugin.halo.w8a8_config import HALOW8A8Config
except ImportError as e:
    raise ImportError({INSTALL_HINT!r}) from e

__all__ = ["HALOW8A8Config"]
'''
_MODELING = f'''"""Written by rotkv (optimum_plugin.halo.export.save_w8a8): loads a HALO W8A8 checkpoint correctly."""
try:
    from optimum_plugin.halo.w8a8_loading import HALOW8A8ForCausalLM
except ImportError as e:
    raise ImportError({INSTALL_HINT!r}) from e

__all__ = ["HALOW8A8ForCausalLM"]
'''
REMOTE_CODE_FILES = {"configuration_halo_w8a8.py": _CONFIGURATION, "modeling_halo_w8a8.py": _MODELING}


def write_remote_code(path: str | os.PathLike) -> None:
    """Write :data:`REMOTE_CODE_FILES` into a checkpoint folder."""
    for name, text in REMOTE_CODE_FILES.items():
        (Path(path) / name).write_text(text)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())
