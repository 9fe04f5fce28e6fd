"""A transformers KV cache that stores RotateKV records, for ``model.generate``.

    with rotkv_cache(model, calibration) as cache:
        out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)

Each layer keeps, per token, the packed record of its pre-RoPE key (grouped-head Hadamard, calibrated
channel order, group quantization; ``rotkv_write``) and of its value (per-head Hadamard), plus the
token's RoPE ``cos``/``sin`` so the key can be re-rotated at read time (``rotkv_read`` applies RoPE at
each key's own position). The record maths is ``rotkv_kernels.rotkv_cache``'s (``rotkv_write`` / ``rotkv_read``,
the references beside their Triton kernels); this module only keeps the records of a transformers cache. Sink tokens (chosen at prefill) and the recent window keep their
full-precision K/V in a side store. Every ``update`` returns the whole dequantized cache, so attention
sees exactly what a quantized cache holds.

transformers' Llama attention hands the cache only post-RoPE keys, so two hooks feed it: one on
``k_proj`` (pre-RoPE keys) and one on each decoder layer (``cos``/``sin`` and, for ``sink_mode="topk"``,
the layer's input residual). The context manager installs and removes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
from transformers.cache_utils import Cache, DynamicLayer

from rotkv_kernels.rotkv_cache import apply_rope, record_bytes, rotkv_read, rotkv_write
from rotkv_vllm.calibration import RotateKVCalibration
from rotkv_vllm.config import RotateKVConfig, RotateKVLayout
from rotkv_vllm.model_support import decoder_layers, describe_model
from rotkv_vllm.sinks import sink_token_mask

__all__ = ["RotateKVCache", "RotateKVLayer", "rotkv_cache"]


class RotateKVLayer(DynamicLayer):
    """One layer's RotateKV cache. ``keys``/``values`` hold only the full-precision side store."""

    def __init__(self, layer_idx: int, config: RotateKVConfig, layout: RotateKVLayout, key_order: torch.Tensor | None,
                 key_mean: torch.Tensor | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        self.layout = layout
        self.key_bits, self.value_bits = config.bits_for_layer(layer_idx)
        self.key_clip, self.value_clip = config.clip_ratios(self.key_bits, self.value_bits)
        # Values: a per-head Hadamard, or none with rotate_values=False (as in the reference and the vLLM backend).
        self.value_rot_width = layout.head_dim if config.rotate_values else 1
        self.key_order = key_order
        # Calibrated pre-RoPE key mean [H, D] (center_keys): stored keys are k - mean.
        self.key_mean = None if key_mean is None else key_mean.reshape(layout.num_kv_heads, layout.head_dim)
        self.key_records: torch.Tensor | None = None  # uint8 [B, S, key record bytes]
        self.value_records: torch.Tensor | None = None
        self.cos: torch.Tensor | None = None  # [B, S, D]
        self.sin: torch.Tensor | None = None
        self.fp_keys: torch.Tensor | None = None  # [B, H, S, D] post-RoPE, valid where fp_mask
        self.fp_values: torch.Tensor | None = None
        self.sink_mask: torch.Tensor | None = None  # [B, S] bool
        # Set by the hooks right before ``update``.
        self.pending_pre_k: torch.Tensor | None = None
        self.pending_rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pending_hidden: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes held by the packed records (the quantized part of the cache)."""
        if self.key_records is None:
            return 0
        return self.key_records.numel() + self.value_records.numel()

    def _write(self, x: torch.Tensor, *, key: bool) -> torch.Tensor:
        b, t, h, d = x.shape
        lay = self.layout
        if key and self.key_mean is not None:
            x = x.to(torch.float32) - self.key_mean
        rec = rotkv_write(
            x.reshape(b * t, h, d),
            bits=self.key_bits if key else self.value_bits,
            group_size=lay.group_size if key else lay.value_group_size,
            rot_width=lay.group_width if key else self.value_rot_width,
            perm=self.key_order if key else None,
            clip_ratio=self.key_clip if key else self.value_clip,
            scale_format=self.config.scale_format,
        )
        return rec.reshape(b, t, -1)

    def _read(self, rec: torch.Tensor, *, key: bool, dtype: torch.dtype) -> torch.Tensor:
        b, s, _ = rec.shape
        lay = self.layout
        d = lay.head_dim
        # With a key mean, RoPE must come after adding it back: RoPE(k^ + mu), so apply it here.
        rope_in_kernel = key and self.key_mean is None
        out = rotkv_read(
            rec.reshape(b * s, -1),
            num_heads=lay.num_kv_heads,
            head_dim=d,
            bits=self.key_bits if key else self.value_bits,
            group_size=lay.group_size if key else lay.value_group_size,
            rot_width=lay.group_width if key else self.value_rot_width,
            perm=self.key_order if key else None,
            scale_format=self.config.scale_format,
            cos=self.cos.reshape(b * s, d) if rope_in_kernel else None,
            sin=self.sin.reshape(b * s, d) if rope_in_kernel else None,
            out_dtype=torch.float32,
        )
        if key and self.key_mean is not None:
            out = out + self.key_mean
            cos, sin = self.cos.reshape(b * s, 1, d), self.sin.reshape(b * s, 1, d)
            out = apply_rope(out, cos, sin)
        return out.reshape(b, s, lay.num_kv_heads, d).transpose(1, 2).to(dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new tokens; return the dequantized cache ``([B, H, S, D], [B, H, S, D])``."""
        if self.pending_pre_k is None or self.pending_rope is None:
            raise RuntimeError("RotateKVCache.update called without its hooks: use `with rotkv_cache(model, ...)`")
        b, h, t, d = key_states.shape
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pre_k = self.pending_pre_k.reshape(b, t, h, d)
        cos, sin = self.pending_rope
        cos, sin = cos.expand(b, t, d).to(torch.float32), sin.expand(b, t, d).to(torch.float32)
        new_k = self._write(pre_k, key=True)
        new_v = self._write(value_states.transpose(1, 2), key=False)
        first = self.key_records is None
        if first:
            sinks = sink_token_mask(self.config, b, t, self.pending_hidden, device=key_states.device)
            self.sink_mask = sinks if sinks is not None else torch.zeros(b, t, dtype=torch.bool, device=key_states.device)
            self.key_records, self.value_records, self.cos, self.sin = new_k, new_v, cos, sin
            self.fp_keys, self.fp_values = key_states, value_states
        else:
            # Sinks are chosen at prefill; later tokens are never sinks.
            self.sink_mask = torch.cat([self.sink_mask, self.sink_mask.new_zeros(b, t)], dim=1)
            self.key_records = torch.cat([self.key_records, new_k], dim=1)
            self.value_records = torch.cat([self.value_records, new_v], dim=1)
            self.cos, self.sin = torch.cat([self.cos, cos], dim=1), torch.cat([self.sin, sin], dim=1)
            self.fp_keys = torch.cat([self.fp_keys, key_states], dim=2)
            self.fp_values = torch.cat([self.fp_values, value_states], dim=2)
        s = self.key_records.shape[1]
        keep = self.sink_mask.clone()
        if self.config.recent_window:
            keep[:, max(0, s - self.config.recent_window):] = True
        # The side store only needs the kept tokens; drop the full-precision copies of the others.
        self.fp_keys = self.fp_keys * keep[:, None, :, None]
        self.fp_values = self.fp_values * keep[:, None, :, None]
        self.pending_pre_k = self.pending_rope = self.pending_hidden = None
        k = self._read(self.key_records, key=True, dtype=key_states.dtype)
        v = self._read(self.value_records, key=False, dtype=value_states.dtype)
        m = keep[:, None, :, None]
        return torch.where(m, self.fp_keys, k), torch.where(m, self.fp_values, v)

    def get_seq_length(self) -> int:
        return 0 if self.key_records is None else self.key_records.shape[1]

    def reset(self) -> None:
        self.key_records = self.value_records = self.cos = self.sin = None
        self.fp_keys = self.fp_values = self.sink_mask = None
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("RotateKVCache does not support cropping (assisted decoding)")


class RotateKVCache(Cache):
    """A transformers ``Cache`` of :class:`RotateKVLayer`; build it with :func:`rotkv_cache`."""

    def __init__(self, layers: list[RotateKVLayer]):
        super().__init__(layers=layers)

    def quantized_nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def bits_per_element(self) -> float:
        """Average stored bits per cached K/V element, counting the full-precision tokens at 16 bits."""
        total_bits, elements = 0.0, 0
        for layer in self.layers:
            if layer.key_records is None:
                continue
            b, s, rk = layer.key_records.shape
            rv = layer.value_records.shape[2]
            width = layer.layout.kv_width
            n_fp = int(layer.sink_mask.sum())
            if layer.config.recent_window:
                n_fp = int((layer.sink_mask | _recent(layer.sink_mask, layer.config.recent_window)).sum())
            total_bits += (b * s - n_fp) * (rk + rv) * 8 + n_fp * 2 * width * 16
            elements += b * s * 2 * width
        return total_bits / max(elements, 1)


def _recent(mask: torch.Tensor, window: int) -> torch.Tensor:
    r = torch.zeros_like(mask)
    r[:, -window:] = True
    return r


@contextlib.contextmanager
def rotkv_cache(model, calibration: RotateKVCalibration | None = None,
                config: RotateKVConfig | None = None) -> Iterator[RotateKVCache]:
    """Install the hooks a :class:`RotateKVCache` needs on ``model`` and yield a fresh cache.

    Args:
        calibration: from :func:`rotkv_vllm.calibration.load_calibration`; required when the config
            reorders channels. Its config is used unless ``config`` is given.
    Raises:
        ValueError: an unsupported model, a calibration for another model, or reordering without one.
    """
    info = describe_model(model)
    layers = decoder_layers(model)
    if calibration is not None:
        calibration.check_model(model)
        config = config or calibration.config
        config = dataclasses.replace(config, head_group_size=calibration.head_group_size)
    config = config or RotateKVConfig()
    if (config.reorder or config.center_keys) and calibration is None:
        raise ValueError("this RotateKV config uses calibrated key statistics: pass calibration=load_calibration(MODEL_DIR)")
    if not config.pre_rope:
        raise ValueError("the RotateKV cache stores pre-RoPE keys: pre_rope=False is only for the reference ablation")
    layout = RotateKVLayout.resolve(config, info["num_key_value_heads"], info["head_dim"])
    record_bytes(layout.kv_width, config.key_bits, layout.group_size, config.scale_format)  # validates early
    device = next(model.parameters()).device
    cache_layers = [
        RotateKVLayer(i, config, layout, calibration.key_orders[i].to(device) if config.reorder else None,
                      calibration.key_means[i].to(device) if config.center_keys else None)
        for i in range(info["num_hidden_layers"])
    ]
    cache = RotateKVCache(cache_layers)
    handles = []

    def layer_hook(idx):
        def hook(module, args, kwargs):
            cl = cache_layers[idx]
            cl.pending_rope = kwargs.get("position_embeddings")
            if config.sink_mode == "topk" and cl.key_records is None:
                cl.pending_hidden = kwargs.get("hidden_states", args[0] if args else None)
        return hook

    def k_hook(idx):
        def hook(module, inputs, out):
            cache_layers[idx].pending_pre_k = out
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True))
        handles.append(layer.self_attn.k_proj.register_forward_hook(k_hook(i)))
    try:
        yield cache
    finally:
        for h in handles:
            h.remove()
