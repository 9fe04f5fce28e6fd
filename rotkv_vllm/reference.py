"""The transformers reference path: attention over quantized-then-dequantized K/V, and its baselines.

This is the accuracy oracle for RotateKV: a transformers model runs teacher-forced with every layer's
attention reading K/V exactly as a quantized cache would return them. One harness implements every
method so that comparisons come from one run:

    fp        no quantization (reproduces the unmodified model's logits bit for bit)
    int4/int2 per-token asymmetric min-max on post-RoPE K/V, no rotation
    kivi2     KIVI (Liu et al., 2024) without its residual: post-RoPE keys per channel over groups of 32
              tokens (a group stays full precision until its last token is written), values per token over
              one head; asymmetric min-max with the group minimum as a real zero point (fp16 scale and min)
    kivi2-r128  KIVI as published: the same groups plus a full-precision residual of the last 128 tokens
    quarot2   post-RoPE per-head Hadamard, then per-token (QuaRot's KV cache)
    rotkv*    RotateKV from a :class:`RotateKVConfig` + calibration: pre-RoPE grouped-head Hadamard and
              calibrated channel order for keys, per-head Hadamard for values, attention sinks (and the
              extensions: recent full-precision window, boosted layers, K/V at different bits)

Mechanics: a forward hook stashes each layer's pre-RoPE keys (``k_proj``'s output, or ``k_norm``'s for the
families with a key norm: ``model_support.register_pre_rope_key_hook``), a forward pre-hook on each decoder
layer stashes its input residual (for sinks) and ``(cos, sin)`` (the layer's own: Gemma 3's local and global
layers differ), and an attention function registered with
transformers' ``AttentionInterface`` as ``"rotkv_ref"`` builds the dequantized K/V. Tokens kept in full
precision (sinks, recent window, KIVI's residual) are handled exactly: scores and values for key ``s``
seen from query ``t`` use full-precision K/V where ``fp_mask[t, s]``, quantized K/V elsewhere.

It is the oracle, so RotateKV is formulated here on its own on purpose: fake quantization
(``quant.fake_quantize_groupwise``) of the rotated, reordered channels, with no records and no packing. The
cache that stores records (``hf_cache.py``, the vLLM backend) uses ``rotkv_kernels``' record maths instead, and
the tests hold the two against each other (``tests/rotkv_vllm/test_reference.py``, ``test_hf_cache.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from rotkv_kernels.hadamard import hadamard_transform
from rotkv_kernels.quant import bits_per_element, fake_quantize_groupwise
from rotkv_kernels.rotkv_cache import apply_rope
from rotkv_vllm.calibration import RotateKVCalibration
from rotkv_vllm.config import RotateKVConfig, RotateKVLayout, config_for_cache_dtype
from rotkv_vllm.model_support import decoder_layers, describe_model, register_pre_rope_key_hook
from rotkv_vllm.sinks import sink_token_mask

__all__ = ["KVMethod", "method_from_name", "quantized_kv", "perplexity", "windowed_nll", "KVStats", "METHOD_NAMES",
           "kivi_fake_quantize", "kivi_fp_masks", "KIVI_BITS_PER_GROUP"]

ATTN_NAME = "rotkv_ref"
METHOD_NAMES = ("fp", "int4", "int2", "kivi2", "kivi2-r128", "quarot2", "rotkv2", "rotkv3", "rotkv4")
KINDS = ("fp", "per_token", "kivi", "quarot", "rotkv")


@dataclass(frozen=True)
class KVMethod:
    """One way of storing K/V. ``kind`` selects the algorithm; ``rotkv`` carries RotateKV's config.

    For the baselines, ``key_bits``/``value_bits``/``clip_ratio``/``scale_format`` apply and the
    per-token group is ``group_size`` (``None``: the same group RotateKV resolves for the model).
    ``kind="kivi"`` uses :func:`kivi_fake_quantize` (its own scale and zero format; ``clip_ratio`` and
    ``scale_format`` do not apply): keys per channel over ``kivi_token_group`` tokens, values per token
    over ``group_size`` channels of one head (``None``: the head width), and a full-precision residual of
    ``kivi_residual`` tokens (0: none; else a multiple of ``kivi_token_group``), see :func:`kivi_fp_masks`.
    """

    name: str
    kind: str
    key_bits: int = 16
    value_bits: int = 16
    group_size: int | None = None
    clip_ratio: float = 1.0
    scale_format: str = "fp16"
    kivi_token_group: int = 32
    kivi_residual: int = 0
    rotkv: RotateKVConfig | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: expected one of {KINDS}")
        if self.kivi_token_group < 1 or self.kivi_residual < 0 or self.kivi_residual % self.kivi_token_group:
            raise ValueError(f"kivi_token_group={self.kivi_token_group}, kivi_residual={self.kivi_residual}: the "
                             "residual must be a non-negative multiple of a positive token group")
        if self.kind == "rotkv" and self.rotkv is None:
            raise ValueError("kind='rotkv' needs rotkv=RotateKVConfig(...)")

    @classmethod
    def from_config(cls, config: RotateKVConfig, name: str = "rotkv") -> "KVMethod":
        return cls(name=name, kind="rotkv", key_bits=config.key_bits, value_bits=config.value_bits, rotkv=config)


def method_from_name(name: str) -> KVMethod:
    """A named method: ``fp``, ``int4``, ``int2``, ``kivi2``, ``quarot2`` or ``rotkv2/3/4`` (defaults)."""
    if name == "fp":
        return KVMethod("fp", "fp")
    if name in ("int2", "int3", "int4"):
        b = int(name[3])
        return KVMethod(name, "per_token", b, b)
    if name == "kivi2":
        return KVMethod(name, "kivi", 2, 2)
    if name == "kivi2-r128":
        # The paper's setting: G = 32 for both the key token groups and the value channel groups, R = 128.
        return KVMethod(name, "kivi", 2, 2, group_size=32, kivi_residual=128)
    if name == "quarot2":
        return KVMethod(name, "quarot", 2, 2)
    if name in ("rotkv2", "rotkv3", "rotkv4"):  # the vLLM presets' defaults (recent window included)
        return KVMethod.from_config(config_for_cache_dtype(name), name)
    raise ValueError(f"unknown KV method {name!r}: expected one of {METHOD_NAMES} or a KVMethod")


@dataclass
class KVStats:
    """Stored-bits accounting over the evaluated windows (state of the cache at each window's end; a KIVI
    residual that fills and empties is counted at its mean share over one cycle, see ``_account``)."""

    stored_bits: float = 0.0
    elements: int = 0
    fp_tokens: float = 0.0
    tokens: int = 0

    @property
    def avg_bits(self) -> float:
        return self.stored_bits / max(self.elements, 1)


class _State:
    """Per-model harness state shared by the hooks and the attention function."""

    def __init__(self, method: KVMethod, info: dict, layout: RotateKVLayout,
                 calibration: RotateKVCalibration | None, stats: KVStats):
        self.method = method
        self.info = info
        self.layout = layout
        self.calibration = calibration
        self.stats = stats
        self.pre_k: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.orders: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def key_mean(self, layer: int, device) -> torch.Tensor | None:
        cfg = self.method.rotkv
        if cfg is None or not cfg.center_keys:
            return None
        return self.calibration.key_means[layer].to(device)

    def order(self, layer: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        cfg = self.method.rotkv
        if cfg is None or not cfg.reorder:
            return None
        if layer not in self.orders:
            perm = self.calibration.key_orders[layer].to(device)
            self.orders[layer] = (perm, torch.argsort(perm))
        return self.orders[layer]


def _fq_tokens(x: torch.Tensor, bits: int, group: int, clip: float, fmt: str) -> torch.Tensor:
    """Fake-quantize ``[B, H, T, D]`` per token over groups of the flattened ``H * D`` channels."""
    b, h, t, d = x.shape
    y = x.transpose(1, 2).reshape(b, t, h * d)
    y = fake_quantize_groupwise(y, bits, group, clip, fmt)
    return y.reshape(b, t, h, d).transpose(1, 2)


# KIVI stores each group's scale and minimum in the model's 16-bit dtype.
KIVI_BITS_PER_GROUP = 32


def kivi_fake_quantize(x: torch.Tensor, bits: int, group_size: int, dim: int = -1) -> torch.Tensor:
    """KIVI's quantizer, quantize then dequantize: groups of ``group_size`` consecutive elements along ``dim``.

    Per group, with ``M = 2**bits - 1`` and ``min``/``max`` over the group (no clipping):

        s  = fp16((max - min) / M),   m = fp16(min)      (32 bits per group)
        q  = clamp(round((x - m) / s), 0, M)
        x^ = q * s + m                                     (x^ = m where s == 0)

    The zero point is the real-valued minimum, so every group's range is covered whatever its sign;
    an integer zero point clamped to ``[0, M]`` (``rotkv_kernels.quant``) cannot represent a group that
    lies entirely above or below 0, which per-channel key groups often do.

    Args:
        x: any float tensor; ``x.shape[dim]`` must be a multiple of ``group_size``.
    Returns:
        a tensor of ``x``'s shape and dtype.
    Raises:
        ValueError: ``bits`` outside 1..8 or a group size that does not divide ``x.shape[dim]``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: expected 1..8")
    n = x.shape[dim]
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size={group_size} must divide the quantized dimension {n}")
    maxq = (1 << bits) - 1
    y = x.to(torch.float32).movedim(dim, -1)
    g = y.reshape(*y.shape[:-1], n // group_size, group_size)
    lo = g.amin(dim=-1, keepdim=True).to(torch.float16).to(torch.float32)
    scale = ((g.amax(dim=-1, keepdim=True) - g.amin(dim=-1, keepdim=True)) / maxq).to(torch.float16).to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((g - lo) / safe), 0, maxq)
    out = torch.where(scale > 0, q * scale + lo, lo.expand_as(g))
    return out.reshape(y.shape).movedim(-1, dim).to(x.dtype)


def kivi_fp_masks(s: int, token_group: int, residual: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which K and V entries query ``t`` reads in full precision under KIVI's streaming cache: ``[S, S]`` bool each.

    KIVI appends each new key to a full-precision block, attends, and quantizes the block (per channel, in
    token groups) once it holds ``B = residual or token_group`` keys; so key ``j`` is full precision for
    queries ``t < (j // B + 1) * B``. Values keep the last ``residual`` tokens before the current one in full
    precision (quantized per token as they leave): value ``j`` is full precision for ``t - j <= residual``;
    with ``residual == 0`` every value is quantized when written.
    """
    t = torch.arange(s, device=device).unsqueeze(1)
    j = torch.arange(s, device=device).unsqueeze(0)
    block = residual or token_group
    fp_k = (t < (j // block + 1) * block) & (j <= t)
    fp_v = ((t - j) <= residual) & (j <= t) if residual else torch.zeros(s, s, dtype=torch.bool, device=device)
    return fp_k, fp_v


def _kivi_transform(m: KVMethod, k: torch.Tensor, v: torch.Tensor):
    """KIVI on fp32 ``[B, H, S, D]`` post-RoPE K/V: dequantized (K, V), their ``[B, S, S]`` full-precision masks
    and the stored bits per quantized K and V element."""
    b, h, s, d = k.shape
    g = m.kivi_token_group
    vgroup = m.group_size or d
    if d % vgroup:
        raise ValueError(f"value group {vgroup} must divide the head width {d} (KIVI groups values within a head)")
    nfull = (s // g) * g
    kq = k.clone()  # a trailing incomplete token group is never quantized: it stays in the residual
    if nfull:
        kq[:, :, :nfull] = kivi_fake_quantize(k[:, :, :nfull], m.key_bits, g, dim=2)
    vq = kivi_fake_quantize(v, m.value_bits, vgroup, dim=-1)
    fp_k, fp_v = kivi_fp_masks(s, g, m.kivi_residual, device=k.device)
    bits = (m.key_bits + KIVI_BITS_PER_GROUP / g, m.value_bits + KIVI_BITS_PER_GROUP / vgroup)
    return kq, vq, (fp_k.expand(b, s, s), fp_v.expand(b, s, s)), bits


def _transform(st: _State, layer: int, key: torch.Tensor, value: torch.Tensor):
    """Dequantized (K, V) as ``[B, Hkv, S, D]`` fp32, the full-precision mask ``[B, T, S]`` (or None; for
    KIVI a ``(keys, values)`` pair of masks), and the per-element stored bits of quantized K and V."""
    m = st.method
    lay = st.layout
    k = key.to(torch.float32)
    v = value.to(torch.float32)
    b, h, s, d = k.shape
    group = m.group_size or lay.group_size
    if m.kind == "per_token":
        kq = _fq_tokens(k, m.key_bits, group, m.clip_ratio, m.scale_format)
        vq = _fq_tokens(v, m.value_bits, group, m.clip_ratio, m.scale_format)
        bits = (bits_per_element(m.key_bits, group, m.scale_format), bits_per_element(m.value_bits, group, m.scale_format))
        return kq, vq, None, bits
    if m.kind == "quarot":
        kr = hadamard_transform(k, block_size=d)
        vr = hadamard_transform(v, block_size=d)
        kq = hadamard_transform(_fq_tokens(kr, m.key_bits, group, m.clip_ratio, m.scale_format), block_size=d, inverse=True)
        vq = hadamard_transform(_fq_tokens(vr, m.value_bits, group, m.clip_ratio, m.scale_format), block_size=d, inverse=True)
        bits = (bits_per_element(m.key_bits, group, m.scale_format), bits_per_element(m.value_bits, group, m.scale_format))
        return kq, vq, None, bits
    if m.kind == "kivi":
        return _kivi_transform(m, k, v)

    # RotateKV
    cfg = m.rotkv
    kb, vb = cfg.bits_for_layer(layer)
    kclip, vclip = cfg.clip_ratios(kb, vb)
    w = lay.group_width
    if cfg.pre_rope:
        kin = st.pre_k[layer].to(torch.float32)  # [B, S, H*D]
    else:
        kin = k.transpose(1, 2).reshape(b, s, h * d)
    mu = st.key_mean(layer, k.device)
    if mu is not None:
        kin = kin - mu
    y = hadamard_transform(kin, block_size=w)
    order = st.order(layer, k.device)
    if order is not None:
        y = y[..., order[0]]
    y = fake_quantize_groupwise(y, kb, lay.group_size, kclip, cfg.scale_format)
    if order is not None:
        y = y[..., order[1]]
    kq = hadamard_transform(y, block_size=w, inverse=True)
    if mu is not None:
        kq = kq + mu
    kq = kq.reshape(b, s, h, d).transpose(1, 2)
    if cfg.pre_rope:
        cos, sin = st.rope[layer]
        kq = apply_rope(kq, cos.unsqueeze(1).to(kq.dtype), sin.unsqueeze(1).to(kq.dtype))  # cos/sin [B, T, D]
    if cfg.rotate_values:
        vr = hadamard_transform(v, block_size=d)
        vq = hadamard_transform(_fq_tokens(vr, vb, lay.value_group_size, vclip, cfg.scale_format), block_size=d,
                                inverse=True)
    else:
        vq = _fq_tokens(v, vb, lay.value_group_size, vclip, cfg.scale_format)
    fp = None
    sinks = sink_token_mask(cfg, b, s, st.hidden.get(layer), device=k.device)
    if sinks is not None:
        fp = sinks.unsqueeze(1).expand(b, s, s)
    if cfg.recent_window:
        t_idx = torch.arange(s, device=k.device)
        recent = (t_idx.unsqueeze(1) - t_idx.unsqueeze(0)) < cfg.recent_window  # [T, S]
        fp = recent.unsqueeze(0).expand(b, s, s) if fp is None else (fp | recent)
    bits = (lay.bits_per_element(kb, cfg.scale_format), lay.bits_per_element(vb, cfg.scale_format, key=False))
    return kq, vq, fp, bits


def _account(st: _State, fp, bits: tuple[float, float], b: int, s: int, h: int, d: int) -> None:
    """Bits stored for K and V of one layer at the end of the window.

    ``fp`` is the full-precision mask ``[B, T, S]`` (or None) shared by K and V, or a ``(keys, values)``
    pair. A mask whose full-precision part is fixed (sinks, recent window) is counted on its last query
    row. KIVI's key residual fills and empties every ``kivi_residual or kivi_token_group`` tokens, so its
    masks are counted as the mean full-precision share of the cache read by the last such block of queries.
    """
    fp_k, fp_v = fp if isinstance(fp, tuple) else (fp, fp)
    m = st.method
    rows = min(s, (m.kivi_residual or m.kivi_token_group) if m.kind == "kivi" else 1)
    n = b * s

    def fp_count(mask):
        if mask is None:
            return 0.0
        last = mask[:, s - rows :, :].sum(dim=-1).to(torch.float64)  # [B, rows]
        readers = torch.arange(s - rows + 1, s + 1, dtype=torch.float64, device=mask.device)
        return float((last / readers).mean(dim=-1).sum()) * s

    nk, nv = fp_count(fp_k), fp_count(fp_v)
    per_tok = h * d
    st.stats.stored_bits += ((n - nk) * bits[0] + (n - nv) * bits[1] + (nk + nv) * 16) * per_tok
    st.stats.elements += 2 * n * per_tok
    st.stats.fp_tokens += (nk + nv) / 2
    st.stats.tokens += n


def _mixed_attention(query, k_fp, v_fp, k_q, v_q, fp, attention_mask, scaling, groups, fp_v=None):
    """Softmax attention where key/value ``s`` for query ``t`` is full precision iff ``fp[b, t, s]``
    (values by ``fp_v[b, t, s]`` instead where given)."""
    b, hq, t, d = query.shape
    s = k_fp.shape[2]
    rep = lambda x: x.repeat_interleave(groups, dim=1) if groups > 1 else x  # noqa: E731
    q = query.to(torch.float32)
    s_fp = q @ rep(k_fp).transpose(-1, -2) * scaling
    s_q = q @ rep(k_q).transpose(-1, -2) * scaling
    fp4 = fp[:, -t:, :].unsqueeze(1)  # rows of the current queries
    scores = torch.where(fp4, s_fp, s_q)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., -s:], float("-inf"))
    elif attention_mask is not None:
        scores = scores + attention_mask[..., -s:].to(scores.dtype)
    else:
        causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        scores = scores.masked_fill(~causal, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    fpf = (fp4 if fp_v is None else fp_v[:, -t:, :].unsqueeze(1)).to(p.dtype)
    out = (p * fpf) @ rep(v_fp) + (p * (1 - fpf)) @ rep(v_q)
    return out.transpose(1, 2).contiguous().to(query.dtype)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    st: _State | None = getattr(module, "_rotkv_state", None)
    if st is None or st.method.kind == "fp":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = module.layer_idx
    b, h, s, d = key.shape
    kq, vq, fp, bits = _transform(st, layer, key, value)
    _account(st, fp, bits, b, s, h, d)
    scaling = scaling if scaling is not None else d ** -0.5
    if fp is None:
        return sdpa_attention_forward(module, query, kq.to(query.dtype), vq.to(query.dtype), attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    fp_k, fp_v = fp if isinstance(fp, tuple) else (fp, None)
    out = _mixed_attention(query, key.to(torch.float32), value.to(torch.float32), kq, vq, fp_k, attention_mask,
                           scaling, query.shape[1] // h, fp_v=fp_v)
    return out, None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    # Idempotent: registering the same name again overwrites with the same function.
    AttentionInterface.register(ATTN_NAME, _attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


@contextlib.contextmanager
def quantized_kv(model, method: KVMethod | str, calibration: RotateKVCalibration | None = None,
                 stats: KVStats | None = None) -> Iterator[KVStats]:
    """Within the block, ``model`` (a transformers causal LM of a supported family, teacher-forced, no
    KV cache reuse) attends over K/V stored with ``method``. Yields the bits accounting.

    Raises:
        ValueError: an unsupported model, a RotateKV method without the calibration it needs, or a
            calibration made for another model.
    """
    method = method_from_name(method) if isinstance(method, str) else method
    info = describe_model(model)
    layers = decoder_layers(model)
    cfg = method.rotkv or RotateKVConfig()
    if method.kind == "rotkv":
        if calibration is not None:
            calibration.check_model(model)
            cfg = dataclasses.replace(cfg, head_group_size=calibration.head_group_size)
        elif cfg.reorder or cfg.center_keys:
            raise ValueError(f"method {method.name!r} uses calibrated key statistics and needs a calibration "
                             "(rotkv_vllm.calibration.calibrate / load_calibration)")
        if cfg.boosted_layers and max(cfg.boosted_layers) >= info["num_hidden_layers"]:
            raise ValueError(f"boosted_layers={cfg.boosted_layers} exceed the model's {info['num_hidden_layers']} layers")
    layout = RotateKVLayout.resolve(cfg, info["num_key_value_heads"], info["head_dim"])
    stats = stats if stats is not None else KVStats()
    st = _State(method, info, layout, calibration, stats)
    _register_attention()
    handles = []
    need_hidden = method.kind == "rotkv" and method.rotkv.sink_mode == "topk"

    def layer_hook(idx):
        def hook(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            if need_hidden:
                st.hidden[idx] = h
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                st.rope[idx] = pe
        return hook

    def k_hook(idx):
        def hook(out):
            st.pre_k[idx] = out
        return hook

    for i, layer in enumerate(layers):
        layer.self_attn._rotkv_state = st
        if method.kind == "rotkv":
            handles.append(layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True))
            handles.append(register_pre_rope_key_hook(layer, k_hook(i)))
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield stats
    finally:
        model.set_attn_implementation(previous)
        for h in handles:
            h.remove()
        for layer in layers:
            if hasattr(layer.self_attn, "_rotkv_state"):
                del layer.self_attn._rotkv_state


@torch.no_grad()
def windowed_nll(model, token_ids: torch.Tensor, window: int, *, batch_size: int = 1,
                 autocast_dtype: torch.dtype | None = None, progress: bool = False, desc: str = "ppl"
                 ) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and the number of scored tokens, over consecutive
    non-overlapping windows of ``window`` tokens of ``token_ids`` (``[N]``, or ``[n, window]`` already cut).

    Each window is one teacher-forced forward pass (no KV cache) scoring its tokens ``1 .. window - 1`` (the
    first has no context; the positions vLLM's ``prompt_logprobs`` scores); trailing tokens that do not fill a
    window are dropped. The one evaluation loop of the project: :func:`perplexity`, the Optimum quantizers'
    evaluations and HALO's (``optimum_plugin.halo.data.causal_lm_nll``) all call it.

    Args:
        batch_size: windows per forward pass. autocast_dtype: run the forward under ``torch.autocast`` in
            this dtype (None: the model's own dtype). Logits are scored in fp32 either way.
    Raises:
        ValueError: fewer tokens than one window.
    """
    ids = token_ids.reshape(-1)
    n_win = ids.numel() // window
    if n_win < 1:
        raise ValueError(f"{ids.numel()} tokens do not fill one window of {window}")
    chunks = ids[: n_win * window].view(n_win, window)
    device = next(model.parameters()).device
    starts = range(0, n_win, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    nll, count = 0.0, 0
    for i in starts:
        x = chunks[i: i + batch_size].to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = model(x, use_cache=False).logits
        logits = logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x.shape[0] * (window - 1)
    return nll, count


def perplexity(model, token_ids: torch.Tensor, *, window: int = 1024, method: KVMethod | str = "fp",
               calibration: RotateKVCalibration | None = None, stats: KVStats | None = None,
               progress: bool = False) -> float:
    """Perplexity over consecutive non-overlapping windows of ``window`` tokens of ``token_ids`` ([N]) with K/V
    stored by ``method``: ``exp(mean NLL)`` over all scored tokens (:func:`windowed_nll`)."""
    with quantized_kv(model, method, calibration, stats):
        nll, count = windowed_nll(model, token_ids, window, progress=progress,
                                  desc=f"ppl {getattr(method, 'name', method)}")
    return math.exp(nll / count)
