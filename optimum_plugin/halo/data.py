"""Token streams for HALO fine-tuning and evaluation: fixed-length chunks of a tokenized text file."""

from __future__ import annotations

import os

import torch

__all__ = ["token_chunks", "train_eval_split", "causal_lm_nll"]


def token_chunks(tokenizer, path: str | os.PathLike, seq_len: int, max_chunks: int | None = None) -> torch.Tensor:
    """Tokenize a text file as one stream (no special tokens) and cut it into ``(n, seq_len)`` int64 chunks.

    Raises:
        ValueError: ``seq_len < 2`` or a file too short for one chunk.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2 (one predicted token)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    need = None if max_chunks is None else max_chunks * seq_len
    # Tokenizing a prefix is enough when only a few chunks are needed (chars >= tokens).
    if need is not None:
        text = text[: need * 8]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n < 1:
        raise ValueError(f"{path} holds {len(ids)} tokens: fewer than one chunk of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)


def train_eval_split(chunks: torch.Tensor, eval_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out the *last* ``eval_chunks`` chunks for evaluation; training never sees them."""
    if not 0 < eval_chunks < chunks.shape[0]:
        raise ValueError(f"eval_chunks={eval_chunks} must be in (0, {chunks.shape[0]})")
    return chunks[:-eval_chunks], chunks[-eval_chunks:]


@torch.no_grad()
def causal_lm_nll(model, chunks: torch.Tensor, batch_size: int = 4, autocast_dtype: torch.dtype | None = None):
    """Summed next-token negative log-likelihood (nats) and the number of predicted tokens of ``chunks``
    (``[n, L]``): every chunk predicts its tokens 1..L-1 from the preceding ones (the first token has no
    context), the same positions vLLM's ``prompt_logprobs`` scores (:func:`rotkv_vllm.reference.windowed_nll`)."""
    from rotkv_vllm.reference import windowed_nll

    return windowed_nll(model, chunks, chunks.shape[1], batch_size=batch_size, autocast_dtype=autocast_dtype)
