"""Attention-sink detection: which tokens keep full-precision K/V.

``sink_mode="topk"`` (RotateKV): over one layer's input residual stream ``h`` (``[B, T, hidden]``, before
the norm), take the ``sink_topk`` largest ``|h|`` entries over tokens x hidden; every token that holds
one of them is a sink, at most ``max_sink_tokens`` per sequence (the ones holding the largest values).
``sink_mode="first"``: the first ``max_sink_tokens`` positions. ``"none"``: no sinks.
"""

from __future__ import annotations

import torch

from rotkv_vllm.config import RotateKVConfig

__all__ = ["sink_token_mask"]


def sink_token_mask(
    config: RotateKVConfig, batch: int, length: int, hidden_states: torch.Tensor | None = None, device=None
) -> torch.Tensor | None:
    """Bool mask ``[batch, length]`` of sink tokens, or ``None`` when the config has no sinks.

    Args:
        hidden_states: ``[batch, length, hidden]`` layer input; needed only for ``sink_mode="topk"``.
    Raises:
        ValueError: ``sink_mode="topk"`` without ``hidden_states``.
    """
    if config.sink_mode == "none":
        return None
    if config.sink_mode == "first":
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        mask[:, : config.max_sink_tokens] = True
        return mask
    if hidden_states is None:
        raise ValueError("sink_mode='topk' needs the layer's input hidden states")
    b, t, d = hidden_states.shape
    k = min(config.sink_topk, t * d)
    mag = hidden_states.detach().abs().to(torch.float32).reshape(b, t * d)
    vals, idx = mag.topk(k, dim=-1)  # [b, k], sorted descending
    tok = idx // d
    # Per token, its largest value among the top-k; keep the max_sink_tokens tokens ranked by it.
    score = torch.full((b, t), -1.0, device=hidden_states.device)
    score.scatter_reduce_(1, tok, vals, reduce="amax")
    n = min(config.max_sink_tokens, t)
    top_score, top_tok = score.topk(n, dim=-1)
    mask = torch.zeros(b, t, dtype=torch.bool, device=hidden_states.device)
    mask.scatter_(1, top_tok, top_score >= 0)
    return mask
