"""The model families RotateKV handles: one list for calibration, the transformers reference and cache, the
Optimum quantizer and the vLLM backend.

RotateKV calibrates the keys at ``k_proj``'s output (pre-RoPE), stores them rotated, and applies RoPE on read.
That is what the attention sees only when, between ``k_proj`` and RoPE, nothing else touches the keys; and the
cache holds every position only with full (not sliding-window) attention and per-head keys (not MLA).
A family is served when its attention is Llama's in those respects:

    llama     k_proj -> RoPE -> attention
    mistral   the same, refused when the config turns a sliding window on
    qwen2     the same (k_proj with a bias, which k_proj's output includes); sliding window refused likewise

Refused with the reason (:data:`REFUSED_FAMILIES`):

    qwen3     a per-head RMSNorm (``k_norm``) between k_proj and RoPE: calibrating and storing k_proj's output
              would quantize keys the attention never sees (support needs the norm applied in the hooks and
              the store; until then it is refused everywhere)

Every entry point calls :func:`describe_model` (a transformers model or config; vLLM's ``hf_text_config`` too)
and :func:`decoder_layers` (a model) before it hooks or stores anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ModelFamily", "SUPPORTED_FAMILIES", "REFUSED_FAMILIES", "SUPPORTED_MODEL_TYPES", "describe_model",
           "decoder_layers"]


@dataclass(frozen=True)
class ModelFamily:
    """One served family: its ``model_type`` and what about its attention RotateKV relies on."""

    model_type: str
    attention: str


SUPPORTED_FAMILIES = {
    f.model_type: f
    for f in (
        ModelFamily("llama", "k_proj -> RoPE (neox) -> attention; full attention"),
        ModelFamily("mistral", "as llama; a sliding window, when the config enables one, is refused"),
        ModelFamily("qwen2", "as llama with a k_proj bias; a sliding window, when enabled, is refused"),
    )
}
SUPPORTED_MODEL_TYPES = tuple(SUPPORTED_FAMILIES)

REFUSED_FAMILIES = {
    "qwen3": ("its attention normalizes each key head (k_norm) after k_proj and before RoPE, so the keys RotateKV "
              "would calibrate and store (k_proj's output) are not the keys the attention uses"),
}


def describe_model(model_or_config) -> dict[str, Any]:
    """Shapes RotateKV needs from a supported model (a transformers model or its config), validated.

    Returns:
        ``{"model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "hidden_size"}`` (ints but the type).
    Raises:
        ValueError: a family RotateKV does not handle, naming the reason: a refused or unknown ``model_type``,
            a sliding window, MLA, or no RoPE.
    """
    cfg = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(cfg, "model_type", None)
    missing = [a for a in ("num_hidden_layers", "num_attention_heads", "hidden_size") if getattr(cfg, a, None) is None]
    if missing:
        raise ValueError(f"model config (model_type={model_type!r}) has no {missing}: not a decoder-only transformer")
    if model_type in REFUSED_FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not supported yet: {REFUSED_FAMILIES[model_type]}; "
                         f"supported: {SUPPORTED_MODEL_TYPES}")
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model_type={model_type!r} is not supported: RotateKV needs a Llama-architecture attention "
            f"(k_proj/v_proj/o_proj, RoPE, no key norm, no sliding window); supported: {SUPPORTED_MODEL_TYPES}"
        )
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise ValueError(f"the model uses sliding-window attention (sliding_window={cfg.sliding_window}): RotateKV "
                         "does not support sliding windows")
    if getattr(cfg, "kv_lora_rank", None):
        raise ValueError("model uses MLA (kv_lora_rank): RotateKV needs per-head keys and values")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if getattr(cfg, "rope_theta", None) is None and not rope.get("rope_theta"):
        raise ValueError("model has no rope_theta: RotateKV rotates keys before RoPE and needs a RoPE model")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {
        "model_type": model_type,
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "hidden_size": int(cfg.hidden_size),
    }


def decoder_layers(model) -> list:
    """The decoder layers of a supported transformers causal LM (``model.model.layers``), each checked for
    Llama-style ``self_attn.k_proj / v_proj / o_proj``.

    Raises:
        ValueError: no ``model.layers``, or a layer without those projections.
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: not a Llama-architecture causal LM")
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        for name in ("k_proj", "v_proj", "o_proj"):
            if attn is None or not hasattr(attn, name):
                raise ValueError(f"layer {i} has no self_attn.{name}: RotateKV needs Llama-style attention")
    return list(layers)
