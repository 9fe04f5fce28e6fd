"""The model families RotateKV handles: one description per family, used by calibration, the transformers
reference and cache, the Optimum quantizer and the vLLM backend.

RotateKV quantizes *the key the attention sees before RoPE*: it calibrates that key, stores it rotated, and
applies RoPE on read. Where that key comes from is the family's business, and every path must take it from
the same place:

    family   pre-RoPE key (per KV head, width D)            RoPE (neox)                  windows   query scale
    llama    k_proj(x)                                       rope_parameters (llama3 ok)  none      D ** -0.5
    mistral  k_proj(x)                                       rope_parameters              global    D ** -0.5
    qwen2    k_proj(x) + bias                                rope_parameters              by layer  D ** -0.5
    qwen3    k_norm(k_proj(x))   (RMSNorm over D, per head)  rope_parameters              by layer  D ** -0.5
    gemma3   k_norm(k_proj(x))   (Gemma RMSNorm, 1 + w)      per layer type (local/global)  by layer  query_pre_attn_scalar ** -0.5

- Transformers paths (calibration, reference, cache) take the key from :func:`register_pre_rope_key_hook`
  (a forward hook on ``self_attn.k_norm`` when the family has one, else on ``k_proj``, whose output includes
  its bias), or compute it with :func:`pre_rope_key`. RoPE comes from the decoder layer's own
  ``position_embeddings`` (so per-layer-type bases and scaling are the model's); query scaling is the
  ``scaling`` transformers passes to the attention function; sliding windows are in the mask it passes.
- vLLM applies bias, ``k_norm`` and RoPE in the model before its attention layer, so the backend receives the
  post-RoPE key and undoes RoPE with each layer's own tables (:func:`layer_attention`'s ``rope_parameters``:
  Gemma 3's local layers their base, its global layers theirs); the query scale is the ``scale`` vLLM gives the
  attention implementation. Sliding-window layers (:func:`layer_attention`'s ``sliding_window``) get their own
  KV-cache group from vLLM and the backend attends over their window only; the backend checks that vLLM's
  window of each layer is this description's. :func:`vllm_refusal` refuses a window shorter than the preset's
  full-precision recent window.
- The transformers cache (``hf_cache``) does the same with the model's own rotary embedding per layer type and
  the windows of :func:`layer_attention`.

Families out of reach are refused everywhere with the reason (:data:`REFUSED_FAMILIES`, and the checks of
:func:`describe_model` for MLA, ALiBi and models without RoPE). Every entry point calls :func:`describe_model`
(a transformers model or config; vLLM's ``hf_text_config`` too) and :func:`decoder_layers` (a model) before it
hooks or stores anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = [
    "ModelFamily",
    "LayerAttention",
    "FAMILIES",
    "SUPPORTED_FAMILIES",
    "REFUSED_FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "model_family",
    "describe_model",
    "decoder_layers",
    "layer_attention",
    "pre_rope_key",
    "register_pre_rope_key_hook",
    "vllm_refusal",
]


@dataclass(frozen=True)
class ModelFamily:
    """How one family's attention produces the key RotateKV stores.

    Attributes:
        name: the family (README table, test ids): ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma3``.
        model_types: the ``config.model_type`` values of the family (text configs).
        key_norm: the ``self_attn`` submodule applied per KV head to ``k_proj``'s output before RoPE
            (``"k_norm"``), or None.
        rope_by_layer_type: RoPE parameters are ``config.rope_parameters[layer_type]`` (Gemma 3: local and
            global layers with their own bases), not one dict for all layers.
        window_by_layer_type: sliding windows apply to the layers ``config.layer_types`` marks
            ``"sliding_attention"``; otherwise (Mistral) ``config.sliding_window``, when set, applies to every layer.
        query_scale_attr: the config field ``s`` of a ``s ** -0.5`` query scale, or None for ``head_dim ** -0.5``.
        attention: one line for messages and the README.
    """

    name: str
    model_types: tuple[str, ...]
    key_norm: str | None
    rope_by_layer_type: bool
    window_by_layer_type: bool
    query_scale_attr: str | None
    attention: str


FAMILIES = (
    ModelFamily("llama", ("llama",), None, False, True, None,
                "k_proj -> RoPE (neox, llama3 scaling included) -> attention"),
    ModelFamily("mistral", ("mistral",), None, False, False, None,
                "as llama; config.sliding_window, when set, windows every layer"),
    ModelFamily("qwen2", ("qwen2",), None, False, True, None,
                "as llama with a k_proj bias (part of the stored key); sliding windows by layer type"),
    ModelFamily("qwen3", ("qwen3",), "k_norm", False, True, None,
                "k_proj -> per-head RMSNorm k_norm -> RoPE -> attention; sliding windows by layer type"),
    ModelFamily("gemma3", ("gemma3_text", "gemma3"), "k_norm", True, True, "query_pre_attn_scalar",
                "k_proj -> per-head Gemma RMSNorm k_norm -> RoPE of the layer type (local/global bases) -> "
                "attention scaled by query_pre_attn_scalar ** -0.5; local layers slide"),
)
SUPPORTED_FAMILIES = {t: f for f in FAMILIES for t in f.model_types}
SUPPORTED_MODEL_TYPES = tuple(SUPPORTED_FAMILIES)

_MLA = "multi-head latent attention (MLA) caches one compressed latent per token, not per-head keys and values"
_ALIBI = "ALiBi position biases: RotateKV rotates keys before RoPE and needs a RoPE model"
_NO_ROPE = "learned absolute positions, no RoPE: RotateKV rotates keys before RoPE and needs a RoPE model"
REFUSED_FAMILIES = {
    "deepseek_v2": _MLA,
    "deepseek_v3": _MLA,
    "kimi_k2": _MLA,
    "bloom": _ALIBI,
    "mpt": _ALIBI,
    "gpt2": _NO_ROPE,
    "opt": _NO_ROPE,
    "gpt_bigcode": _NO_ROPE,
    "gemma2": ("its attention soft-caps the logits (attn_logit_softcapping) and alternates sliding-window "
               "layers, which RotateKV's attention does not implement"),
}


def _text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) and getattr(cfg, "num_hidden_layers", None) is None else cfg


def model_family(model_or_config) -> ModelFamily:
    """The :class:`ModelFamily` of a transformers model or config (a multimodal config: its text config).

    Raises:
        ValueError: a refused family (with the reason) or an unknown ``model_type``.
    """
    cfg = _text_config(model_or_config)
    model_type = getattr(cfg, "model_type", None)
    if model_type in REFUSED_FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not supported: {REFUSED_FAMILIES[model_type]}; "
                         f"supported: {SUPPORTED_MODEL_TYPES}")
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model_type={model_type!r} is not supported: RotateKV knows where the pre-RoPE key of these families "
            f"comes from: {SUPPORTED_MODEL_TYPES}"
        )
    return SUPPORTED_FAMILIES[model_type]


def describe_model(model_or_config) -> dict[str, Any]:
    """Shapes RotateKV needs from a supported model (a transformers model or its config), validated.

    Sliding windows are accepted here (transformers applies them in the attention mask, over a cache that holds
    every position); the vLLM backend refuses them separately (:func:`vllm_refusal`).

    Returns:
        ``{"model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "hidden_size"}`` (ints but the type).
    Raises:
        ValueError: a family RotateKV does not handle, naming the reason: a refused or unknown ``model_type``,
            MLA, ALiBi, no RoPE, partial rotary embeddings, or soft-capped attention logits.
    """
    cfg = _text_config(model_or_config)
    model_type = getattr(cfg, "model_type", None)
    missing = [a for a in ("num_hidden_layers", "num_attention_heads", "hidden_size") if getattr(cfg, a, None) is None]
    if missing:
        raise ValueError(f"model config (model_type={model_type!r}) has no {missing}: not a decoder-only transformer")
    model_family(cfg)
    if getattr(cfg, "kv_lora_rank", None):
        raise ValueError(f"model_type={model_type!r} uses {_MLA}: RotateKV needs per-head keys and values")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise ValueError(f"model_type={model_type!r} soft-caps attention logits (attn_logit_softcapping="
                         f"{cfg.attn_logit_softcapping}), which RotateKV's attention does not implement")
    if getattr(cfg, "alibi", False) or getattr(cfg, "use_alibi", False):
        raise ValueError(f"model_type={model_type!r} uses {_ALIBI}")
    for i in range(int(cfg.num_hidden_layers)):
        rope = _rope_parameters(cfg, i)
        if not rope.get("rope_theta") and getattr(cfg, "rope_theta", None) is None:
            raise ValueError(f"model_type={model_type!r} has no rope_theta (layer {i}): RotateKV rotates keys before "
                             "RoPE and needs a RoPE model")
        partial = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0
        if partial != 1.0:
            raise ValueError(f"model_type={model_type!r} rotates {partial} of each head (partial_rotary_factor): "
                             "RotateKV applies RoPE to the whole head")
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


# ---- per-layer attention ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerAttention:
    """What one decoder layer's attention does around the key (all from the config).

    Attributes:
        layer_type: ``config.layer_types[layer]`` (``"full_attention"`` / ``"sliding_attention"``), or None.
        sliding_window: keys ``j`` with ``t - j >= sliding_window`` are masked for query ``t``; None: full.
        rope_parameters: the layer's RoPE parameters (``rope_theta``, ``rope_type`` and its scaling fields).
        query_scale: the factor on ``q . k`` before the softmax.
    """

    layer_type: str | None
    sliding_window: int | None
    rope_parameters: dict
    query_scale: float


def _rope_parameters(cfg, layer: int) -> dict:
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    types = getattr(cfg, "layer_types", None)
    if types and types[layer] in rope and isinstance(rope[types[layer]], dict):
        return dict(rope[types[layer]])
    if rope and all(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"rope_parameters are given per layer type {sorted(rope)}, but layer {layer} has type "
                         f"{types[layer] if types else None!r}")
    if "rope_theta" not in rope and getattr(cfg, "rope_theta", None) is not None:
        rope["rope_theta"] = cfg.rope_theta
    return rope


def layer_attention(model_or_config, layer: int) -> LayerAttention:
    """The :class:`LayerAttention` of decoder layer ``layer`` of a supported model or config.

    Raises:
        ValueError: an unsupported model (:func:`describe_model`) or a layer out of range.
    """
    cfg = _text_config(model_or_config)
    info = describe_model(cfg)
    fam = model_family(cfg)
    if not 0 <= layer < info["num_hidden_layers"]:
        raise ValueError(f"layer {layer} out of range for {info['num_hidden_layers']} layers")
    types = getattr(cfg, "layer_types", None)
    layer_type = types[layer] if types else None
    window = getattr(cfg, "sliding_window", None) or None
    if fam.window_by_layer_type:
        window = window if layer_type == "sliding_attention" else None
    elif getattr(cfg, "use_sliding_window", True) is False:
        window = None
    scalar = getattr(cfg, fam.query_scale_attr) if fam.query_scale_attr else info["head_dim"]
    return LayerAttention(layer_type=layer_type, sliding_window=window, rope_parameters=_rope_parameters(cfg, layer),
                          query_scale=float(scalar) ** -0.5)


def vllm_refusal(model_or_config, recent_window: int = 0) -> str | None:
    """Why the RotateKV vLLM backend cannot serve this model with a preset whose full-precision recent window is
    ``recent_window`` tokens (one clause), or None.

    Sliding-window layers and per-layer RoPE parameters are served (each layer's window and tables from
    :func:`layer_attention`); a window shorter than the recent window is refused (the recent window's ring holds
    positions the layer must not see). Families refused everywhere raise from :func:`describe_model` instead.
    """
    cfg = _text_config(model_or_config)
    n = describe_model(cfg)["num_hidden_layers"]
    fam = model_family(cfg)
    short = [(i, a.sliding_window) for i in range(n)
             if (a := layer_attention(cfg, i)).sliding_window and a.sliding_window < recent_window]
    if short:
        layers = [i for i, _ in short]
        shown = ", ".join(map(str, layers[:8])) + (", ..." if len(layers) > 8 else "")
        return (f"{fam.name}: {len(layers)} of {n} layers ({shown}) attend over a sliding window of "
                f"{short[0][1]} tokens, shorter than the preset's full-precision recent window of {recent_window}")
    return None


# ---- the pre-RoPE key in a transformers model ---------------------------------------------------------------
def decoder_layers(model) -> list:
    """The decoder layers of a supported transformers causal LM (``model.model.layers``, or
    ``model.model.language_model.layers`` for a multimodal wrapper), each checked for ``self_attn.k_proj /
    v_proj / o_proj`` and the family's key norm.

    Raises:
        ValueError: no decoder layers, or a layer without those modules.
    """
    fam = model_family(model)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        layers = getattr(getattr(inner, "language_model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: not a decoder-only causal LM")
    needed = ("k_proj", "v_proj", "o_proj") + ((fam.key_norm,) if fam.key_norm else ())
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        for name in needed:
            if attn is None or not hasattr(attn, name):
                raise ValueError(f"layer {i} has no self_attn.{name}: the {fam.name} family's attention has one")
    return list(layers)


def _key_norm(attn) -> torch.nn.Module | None:
    """The per-head key norm of a decoder layer's ``self_attn`` (``k_norm``) or None, from the family the layer's
    config names (a module missing where the family has one is :func:`decoder_layers`' error)."""
    cfg = getattr(attn, "config", None)
    if cfg is not None:
        fam = model_family(cfg)
        return getattr(attn, fam.key_norm) if fam.key_norm else None
    return getattr(attn, "k_norm", None)


def _apply_key_norm(attn, k: torch.Tensor) -> torch.Tensor:
    norm = _key_norm(attn)
    if norm is None:
        return k
    # The norm acts on each D-wide head vector alone, so heads-last here computes what the model computes in its
    # own layout (Qwen3 norms [B, T, H, D], Gemma 3 [B, H, T, D]).
    return norm(k.unflatten(-1, (-1, attn.head_dim))).flatten(-2)


def pre_rope_key(attn, hidden: torch.Tensor) -> torch.Tensor:
    """The key a decoder layer's attention rotates with RoPE, computed from its normed input.

    ``k_proj(hidden)`` (bias included), then the family's per-head key norm over each ``D``-wide head.

    Args:
        attn: the layer's ``self_attn``. hidden: ``[..., hidden_size]`` (after the layer's input norm).
    Returns:
        ``[..., Hkv * D]`` in ``hidden``'s dtype.
    """
    return _apply_key_norm(attn, attn.k_proj(hidden))


def register_pre_rope_key_hook(layer, fn: Callable[[torch.Tensor], None]):
    """Call ``fn(key)`` with the pre-RoPE key of every forward of decoder ``layer``: ``key`` is ``[B, T, Hkv * D]``,
    ``self_attn.k_proj``'s output (bias included), passed through the family's per-head key norm ``k_norm``
    (Qwen3, Gemma 3) as in :func:`pre_rope_key`. Returns the hook handle (``.remove()``).

    A forward hook on ``k_proj``: it sees the key before the model reshapes it, whatever layout the family's norm
    then works in. The transformers cache (``hf_cache``) replaces ``layer.self_attn.k_proj.register_forward_hook(
    hook)`` by ``register_pre_rope_key_hook(layer, lambda k: ...)``; calibration and the reference do the same.
    """
    attn = layer.self_attn
    return attn.k_proj.register_forward_hook(lambda module, inputs, out: fn(_apply_key_norm(attn, out)))
