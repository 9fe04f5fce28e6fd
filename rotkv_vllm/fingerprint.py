"""A fingerprint of the weights a RotateKV calibration was made for, and the checks that compare it.

A calibration holds per-layer key statistics (channel orders, key means) of one set of weights. Another set of
the same shapes (a fine-tune, another checkpoint of the family) passes every shape check and would be served
with the wrong statistics, silently less accurate. So calibration stores, in ``rotkv_config.json``'s ``model``
section::

    "weight_fingerprint": {"layers": [0, n // 2, n - 1], "sha256": "..."}

the SHA-256 over ``k_proj.weight`` and ``v_proj.weight`` of those layers (name, shape, then the bytes of the
tensor rounded to bf16, row-major). Rounding to bf16 makes the hash independent of the dtype the weights are
read in: a bf16 checkpoint read in fp32 or bf16, and an fp32 one read in either, hash alike (a model read in
fp16 from a bf16 checkpoint can differ; the override below exists for such cases).

Where it is compared:

- transformers (:meth:`RotateKVCalibration.check_model` with a model: ``rotkv_cache``, the reference,
  ``load_rotkv``): from the loaded parameters (:func:`model_fingerprint`);
- vLLM start-up: from the checkpoint files, not from the loaded model. The backend is built while vLLM
  constructs the model, before its weights are loaded, and each tensor-parallel rank then holds only a slice
  of k_proj/v_proj (fused into ``qkv_proj``); the checkpoint's ``*.safetensors`` hold the whole tensors under
  their transformers names on every rank, whatever the parallelism and however vLLM loads them
  (:func:`checkpoint_fingerprint`, which reads only those tensors; for a Hub repo id the shards come through
  the Hugging Face cache vLLM itself downloads into).

On a mismatch both refuse with the recalibration command. ``ROTKV_ALLOW_WEIGHT_MISMATCH=1`` turns the refusal
into a warning (for weights known to be close enough, e.g. a checkpoint re-saved in another dtype). A
calibration without a fingerprint (made before it existed) is used with a loud warning that names the
recalibration command, as are checkpoints whose weights are not in safetensors files.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
from pathlib import Path

import torch

from rotkv_vllm.model_support import decoder_layers

__all__ = [
    "ALLOW_MISMATCH_ENV",
    "fingerprint_layers",
    "tensor_fingerprint",
    "model_fingerprint",
    "checkpoint_fingerprint",
    "check_fingerprint",
    "check_checkpoint_fingerprint",
]

logger = logging.getLogger(__name__)

ALLOW_MISMATCH_ENV = "ROTKV_ALLOW_WEIGHT_MISMATCH"
RECALIBRATE = "python -m rotkv_vllm.calibration MODEL_DIR --calib-file YOUR_TEXT.txt"
_PROJECTIONS = ("k_proj", "v_proj")
_CHECKPOINT_NAME = "model.layers.{layer}.self_attn.{proj}.weight"


def fingerprint_layers(num_layers: int) -> list[int]:
    """The layers hashed: first, middle and last (distinct, ascending)."""
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers}: must be positive")
    return sorted({0, num_layers // 2, num_layers - 1})


def tensor_fingerprint(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 (hex) over ``(name, shape, bf16 bytes)`` of each tensor, in the given order."""
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(f"{name}:{tuple(t.shape)}".encode())
        b = t.detach().to("cpu", torch.bfloat16).contiguous()
        # the raw bytes without numpy (not a dependency): the tensor's own contiguous memory
        h.update(ctypes.string_at(b.data_ptr(), b.numel() * b.element_size()))
    return h.hexdigest()


def model_fingerprint(model) -> dict:
    """``{"layers", "sha256"}`` of a transformers model's loaded k_proj/v_proj weights."""
    layers = decoder_layers(model)
    idx = fingerprint_layers(len(layers))
    tensors = [(_CHECKPOINT_NAME.format(layer=i, proj=p), getattr(layers[i].self_attn, p).weight)
               for i in idx for p in _PROJECTIONS]
    return {"layers": idx, "sha256": tensor_fingerprint(tensors)}


def _safetensors_files(model: str | os.PathLike, revision: str | None) -> list[Path]:
    p = Path(model)
    if p.is_dir():
        return sorted(p.glob("*.safetensors"))
    from huggingface_hub import snapshot_download

    snap = Path(snapshot_download(str(model), revision=revision, allow_patterns=["*.safetensors"]))
    return sorted(snap.glob("*.safetensors"))


def checkpoint_fingerprint(model: str | os.PathLike, layers: list[int], revision: str | None = None) -> str | None:
    """SHA-256 of the k_proj/v_proj weights of ``layers`` as stored in the checkpoint's ``*.safetensors`` files
    (a folder, or a Hub repo id through the Hugging Face cache), or None when those files do not hold them
    (another weight format)."""
    from safetensors import safe_open

    wanted = [_CHECKPOINT_NAME.format(layer=i, proj=p) for i in layers for p in _PROJECTIONS]
    found: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(model, revision):
        if f.name == "rotkv.safetensors":  # the calibration itself
            continue
        with safe_open(str(f), "pt") as sf:
            keys = set(sf.keys())
            for name in wanted:
                if name in keys:
                    found[name] = sf.get_tensor(name)
    if len(found) != len(wanted):
        return None
    return tensor_fingerprint([(name, found[name]) for name in wanted])


def _allowed() -> bool:
    return os.environ.get(ALLOW_MISMATCH_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_fingerprint(stored: dict | None, actual: str | None, where: str) -> None:
    """Compare a calibration's stored fingerprint with the weights' (``actual``; None: not readable).

    Raises:
        ValueError: they differ (unless ``ROTKV_ALLOW_WEIGHT_MISMATCH=1``, which warns instead).
    """
    if stored is None:
        logger.warning("rotkv: this RotateKV calibration has no weight fingerprint (made by an older rotkv), so it "
                       "cannot be checked against %s's weights; recalibrate to add one: %s", where, RECALIBRATE)
        return
    if actual is None:
        logger.warning("rotkv: %s has no k_proj/v_proj weights in safetensors files, so the RotateKV calibration's "
                       "weight fingerprint cannot be checked", where)
        return
    if actual == stored.get("sha256"):
        return
    msg = (f"this RotateKV calibration was made for other weights than {where}'s (k_proj/v_proj fingerprint of "
           f"layers {stored.get('layers')} differs): its channel orders and key means would not fit. Recalibrate "
           f"for these weights: `{RECALIBRATE}`; or set {ALLOW_MISMATCH_ENV}=1 to use it anyway")
    if _allowed():
        logger.warning("rotkv: %s (%s=1: used anyway)", msg, ALLOW_MISMATCH_ENV)
        return
    raise ValueError(msg)


def check_checkpoint_fingerprint(calibration, model: str | os.PathLike, revision: str | None = None) -> None:
    """:func:`check_fingerprint` of ``calibration`` against the checkpoint files of ``model`` (vLLM start-up)."""
    stored = calibration.model_info.get("weight_fingerprint")
    actual = None if stored is None else checkpoint_fingerprint(model, list(stored["layers"]), revision)
    check_fingerprint(stored, actual, str(model))
