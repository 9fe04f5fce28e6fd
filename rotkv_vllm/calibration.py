"""RotateKV calibration: grouped-head Hadamard channel statistics of pre-RoPE keys -> channel order.

For each layer, pre-RoPE keys ``k`` (``[tokens, H * D]``: the key the attention rotates with RoPE, i.e.
``k_proj``'s output with its bias, then the family's per-head ``k_norm`` for Qwen3 and Gemma 3; see
:func:`rotkv_vllm.model_support.register_pre_rope_key_hook`) are rotated by the block-diagonal normalized Hadamard of width ``W = g * D`` (``g`` KV heads per group). The signed sum of
each rotated channel over the calibration tokens (sink tokens excluded, they stay full precision) is
sorted ascending within each group, so channels with similar means share a quantization group:

    order[j*W:(j+1)*W] = j*W + argsort(sum_t H_W k_t[j*W:(j+1)*W])

With ``center_keys`` the per-channel mean ``mu`` of the pre-RoPE keys is stored too (the cache keeps
``k - mu``); the centered channels all have mean zero, so the order then sorts rotated channels by
their standard deviation instead, which groups channels of similar range.

Outputs, next to the model (``save_calibration``):
    rotkv_config.json    {"format": "rotkv-calibration", "format_version": 1, "config": RotateKVConfig,
                          "layout": {"head_group_size", "group_size"},
                          "model": {...shapes, k_proj norms, weight_fingerprint (rotkv_vllm.fingerprint)},
                          "calibration": {"source", "num_tokens", "seq_len"}}
    rotkv.safetensors    layers.{i}.key_order  int64 [H * D];  layers.{i}.key_channel_sum  fp32 [H * D];
                         layers.{i}.key_mean  fp32 [H * D] (pre-RoPE, unrotated)

    python -m rotkv_vllm.calibration MODEL_DIR --calib-file FILE [--bits 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rotkv_kernels.hadamard import hadamard_transform
from rotkv_vllm.config import RotateKVConfig, RotateKVLayout
from rotkv_vllm.fingerprint import check_fingerprint, model_fingerprint
from rotkv_vllm.model_support import decoder_layers, describe_model, register_pre_rope_key_hook
from rotkv_vllm.sinks import sink_token_mask

__all__ = [
    "CONFIG_FILE",
    "TENSORS_FILE",
    "RotateKVCalibration",
    "calibrate",
    "describe_model",
    "find_calibration",
    "load_calibration",
    "load_calibration_text",
    "save_calibration",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "rotkv_config.json"
TENSORS_FILE = "rotkv.safetensors"
FORMAT = "rotkv-calibration"
FORMAT_VERSION = 1
def _k_proj_norms(model) -> list[float]:
    return [float(layer.self_attn.k_proj.weight.detach().float().norm()) for layer in decoder_layers(model)]


@dataclass
class RotateKVCalibration:
    """Loaded calibration: config, resolved grouping, and one key channel order per layer."""

    config: RotateKVConfig
    model_info: dict[str, Any]
    head_group_size: int
    key_orders: list[torch.Tensor]
    key_channel_sums: list[torch.Tensor] = field(default_factory=list)
    key_means: list[torch.Tensor] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

    def layout(self, tp_size: int = 1) -> RotateKVLayout:
        """The layout on one tensor-parallel rank. Raises ValueError if groups would straddle ranks."""
        cfg = dataclasses.replace(self.config, head_group_size=self.head_group_size)
        try:
            return RotateKVLayout.resolve(cfg, self.model_info["num_key_value_heads"], self.model_info["head_dim"], tp_size)
        except ValueError as e:
            raise ValueError(
                f"{e}. This calibration groups {self.head_group_size} KV heads; recalibrate with "
                f"`python -m rotkv_vllm.calibration MODEL --tensor-parallel-size {tp_size}`"
            ) from None

    def key_order_for_rank(self, layer: int, rank: int = 0, tp_size: int = 1) -> torch.Tensor:
        """The layer's key order restricted to one rank's heads, as local indices ``[H/tp * D]``."""
        lay = self.layout(tp_size)
        w = lay.kv_width
        return self.key_orders[layer][rank * w : (rank + 1) * w] - rank * w

    def check_model(self, model_or_config) -> None:
        """Raise ValueError if this calibration was made for another model: another family or shapes (a model
        or a config), or other weights of the same shapes (a model: :mod:`rotkv_vllm.fingerprint`)."""
        info = describe_model(model_or_config)
        for k, v in info.items():
            if self.model_info.get(k) != v:
                raise ValueError(
                    f"this RotateKV calibration was made for a model with {k}={self.model_info.get(k)!r}, "
                    f"but the model has {k}={v!r}: recalibrate with `python -m rotkv_vllm.calibration MODEL_DIR`"
                )
        if not hasattr(model_or_config, "model"):
            return
        fingerprint = self.model_info.get("weight_fingerprint")
        if fingerprint is not None:
            check_fingerprint(fingerprint, model_fingerprint(model_or_config)["sha256"], "the model")
            return
        check_fingerprint(None, None, "the model")  # an older calibration: warn, and compare what it has
        norms = self.model_info.get("k_proj_norms")
        if norms is not None:
            mine = _k_proj_norms(model_or_config)
            if any(abs(a - b) > 1e-2 * max(abs(b), 1e-6) for a, b in zip(mine, norms)):
                raise ValueError(
                    "this RotateKV calibration was made for other weights (k_proj norms differ): recalibrate "
                    "with `python -m rotkv_vllm.calibration MODEL_DIR`"
                )


def _check_orders(orders: list[torch.Tensor], width: int, group_width: int) -> None:
    for i, o in enumerate(orders):
        if o.shape != (width,) or o.dtype != torch.int64:
            raise ValueError(f"layers.{i}.key_order has shape {tuple(o.shape)}/{o.dtype}, expected ({width},)/int64")
        blocks = o.view(-1, group_width)
        base = torch.arange(0, width, group_width).unsqueeze(1)
        if not torch.equal(blocks.sort(dim=1).values, base + torch.arange(group_width)):
            raise ValueError(f"layers.{i}.key_order is not a permutation within each {group_width}-channel head group")


def load_calibration_text(*, text: str | None = None, text_file: str | os.PathLike | None = None,
                          dataset: str | None = None) -> tuple[str, str]:
    """Exactly one of: literal ``text``; a ``text_file``; a ``datasets`` spec ``name[:config[:split]]``.

    Returns ``(text, description of the source)``.
    """
    given = [x is not None for x in (text, text_file, dataset)]
    if sum(given) != 1:
        raise ValueError("give exactly one of text=, text_file= or dataset= for calibration")
    if text is not None:
        if not text.strip():
            raise ValueError("calibration text is empty")
        return text, "text"
    if text_file is not None:
        p = Path(text_file)
        if not p.is_file():
            raise ValueError(f"calibration file {p} does not exist")
        return p.read_text(encoding="utf-8"), f"file:{p.name}"
    import datasets  # optional dependency, only for this path

    parts = dataset.split(":")
    name, conf, split = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "train")
    ds = datasets.load_dataset(name, conf, split=split)
    col = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n".join(ds[col]), f"dataset:{dataset}"


@torch.no_grad()
def calibrate(
    model,
    tokenizer,
    config: RotateKVConfig | None = None,
    *,
    text: str | None = None,
    text_file: str | os.PathLike | None = None,
    dataset: str | None = None,
    num_sequences: int = 32,
    seq_len: int = 512,
    tp_size: int = 1,
    progress: bool = True,
) -> RotateKVCalibration:
    """Run ``model`` over calibration text and compute each layer's key channel order.

    Args:
        model: a transformers causal LM of a supported family (:mod:`rotkv_vllm.model_support`; any dtype,
            statistics in fp32).
        tokenizer: its tokenizer.
        config: the RotateKV config to calibrate for (default ``RotateKVConfig()``).
        text / text_file / dataset: the calibration text (exactly one).
        num_sequences, seq_len: how much text: consecutive chunks of ``seq_len`` tokens (the first of them the
            BOS token where the tokenizer starts every text with one).
        tp_size: tensor-parallel size the calibration must support (head groups never straddle ranks).
    """
    config = config or RotateKVConfig()
    info = describe_model(model)
    layers = decoder_layers(model)
    layout = RotateKVLayout.resolve(config, info["num_key_value_heads"], info["head_dim"], tp_size)
    body, source = load_calibration_text(text=text, text_file=text_file, dataset=dataset)
    ids = tokenizer(body, return_tensors="pt", add_special_tokens=False).input_ids[0]
    # Each chunk opens with the BOS token where the tokenizer starts every text with one (Gemma), as served
    # text does: the keys are calibrated where they will be quantized, behind the sink the model expects.
    first = tokenizer("a").input_ids[0]
    bos = [first] if first == tokenizer.bos_token_id else []
    step = seq_len - len(bos)
    n_seq = min(num_sequences, ids.numel() // step)
    if n_seq < 1:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    chunks = ids[: n_seq * step].view(n_seq, step)
    if bos:
        chunks = torch.cat([torch.full((n_seq, 1), bos[0], dtype=chunks.dtype), chunks], dim=1)

    width = info["num_key_value_heads"] * info["head_dim"]
    sums = [torch.zeros(width, dtype=torch.float64) for _ in layers]
    sqsums = [torch.zeros(width, dtype=torch.float64) for _ in layers]
    raw_sums = [torch.zeros(width, dtype=torch.float64) for _ in layers]
    counts = [0 for _ in layers]
    sink_masks: dict[int, torch.Tensor | None] = {}
    handles = []

    def layer_pre_hook(idx):
        def hook(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            sink_masks[idx] = sink_token_mask(config, h.shape[0], h.shape[1], h, device=h.device)
        return hook

    def k_hook(idx):
        def hook(out):
            k = out.detach().to(torch.float32)  # [B, T, H*D] pre-RoPE keys
            y = hadamard_transform(k, block_size=layout.group_width)
            keep = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
            m = sink_masks.get(idx)
            if m is not None:
                keep = ~m
            y, k = y[keep].to(torch.float64), k[keep].to(torch.float64)
            sums[idx] += y.sum(dim=0)
            sqsums[idx] += (y * y).sum(dim=0)
            raw_sums[idx] += k.sum(dim=0)
            counts[idx] += int(keep.sum())
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(layer_pre_hook(i), with_kwargs=True))
        handles.append(register_pre_rope_key_hook(layer, k_hook(i)))
    device = next(model.parameters()).device
    try:
        from tqdm.auto import tqdm

        it = tqdm(range(n_seq), desc="RotateKV calibration", unit="seq", disable=not progress)
        for s in it:
            model(chunks[s : s + 1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()

    w = layout.group_width
    orders = []
    means = [r / max(c, 1) for r, c in zip(raw_sums, counts)]
    for s, sq, c in zip(sums, sqsums, counts):
        if config.center_keys:
            # Centered channels have mean 0: group channels of similar spread instead.
            s = (sq / max(c, 1) - (s / max(c, 1)) ** 2).clamp_min(0).sqrt()
        blocks = s.view(-1, w)
        orders.append((blocks.argsort(dim=1) + torch.arange(0, width, w).unsqueeze(1)).reshape(-1).to(torch.int64))
    info = dict(info, k_proj_norms=_k_proj_norms(model), weight_fingerprint=model_fingerprint(model))
    return RotateKVCalibration(
        config=config,
        model_info=info,
        head_group_size=layout.head_group_size,
        key_orders=orders,
        key_channel_sums=[s.to(torch.float32) for s in sums],
        key_means=[m.to(torch.float32) for m in means],
        source={"source": source, "num_tokens": int(n_seq * seq_len), "seq_len": seq_len},
    )


def save_calibration(calib: RotateKVCalibration, out_dir: str | os.PathLike) -> Path:
    """Write ``rotkv_config.json`` and ``rotkv.safetensors`` into ``out_dir`` (atomically, file by file)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"layers.{i}.key_order": o.contiguous() for i, o in enumerate(calib.key_orders)}
    for i, s in enumerate(calib.key_channel_sums):
        tensors[f"layers.{i}.key_channel_sum"] = s.contiguous()
    for i, m in enumerate(calib.key_means):
        tensors[f"layers.{i}.key_mean"] = m.contiguous()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": calib.config.to_dict(),
        "layout": {"head_group_size": calib.head_group_size},
        "model": calib.model_info,
        "calibration": calib.source,
    }
    tmp_t = out / (TENSORS_FILE + ".tmp")
    save_file(tensors, str(tmp_t), metadata={"format": FORMAT})
    tmp_c = out / (CONFIG_FILE + ".tmp")
    tmp_c.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_t, out / TENSORS_FILE)
    os.replace(tmp_c, out / CONFIG_FILE)
    return out


def load_calibration(path: str | os.PathLike) -> RotateKVCalibration:
    """Load a calibration from a folder holding ``rotkv_config.json`` + ``rotkv.safetensors``.

    Raises:
        ValueError: missing files, another format or version, or inconsistent tensors.
    """
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_file():
        p = p.parent
    cfg_file, t_file = p / CONFIG_FILE, p / TENSORS_FILE
    if not cfg_file.is_file() or not t_file.is_file():
        raise ValueError(
            f"{p} has no RotateKV calibration ({CONFIG_FILE} + {TENSORS_FILE}); create it with "
            f"`python -m rotkv_vllm.calibration {p} --calib-file TEXT_FILE`"
        )
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_file} is not a RotateKV calibration (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{cfg_file} has format_version {meta.get('format_version')}, this rotkv reads {FORMAT_VERSION}: recalibrate"
        )
    config = RotateKVConfig.from_dict(meta["config"])
    info = meta["model"]
    g = int(meta["layout"]["head_group_size"])
    tensors = load_file(str(t_file))
    n_layers = info["num_hidden_layers"]
    try:
        orders = [tensors[f"layers.{i}.key_order"] for i in range(n_layers)]
    except KeyError as e:
        raise ValueError(f"{t_file} lacks {e.args[0]}: the file is truncated or from another model") from None
    sums = [tensors[f"layers.{i}.key_channel_sum"] for i in range(n_layers) if f"layers.{i}.key_channel_sum" in tensors]
    means = [tensors[f"layers.{i}.key_mean"] for i in range(n_layers) if f"layers.{i}.key_mean" in tensors]
    width = info["num_key_value_heads"] * info["head_dim"]
    _check_orders(orders, width, g * info["head_dim"])
    if config.center_keys and len(means) != n_layers:
        raise ValueError(f"{cfg_file} asks for center_keys but {t_file} lacks layers.*.key_mean: recalibrate")
    return RotateKVCalibration(config=config, model_info=info, head_group_size=g, key_orders=orders,
                               key_channel_sums=sums, key_means=means, source=meta.get("calibration", {}))


def find_calibration(model: str | os.PathLike, revision: str | None = None, *,
                     token: str | None = None) -> Path | None:
    """The folder holding a RotateKV calibration for ``model`` (a local folder or a Hub repo id), or None.

    For a repo id, ``rotkv_config.json`` and ``rotkv.safetensors`` are fetched through ``huggingface_hub``
    (``snapshot_download`` restricted to those two files): both from the one commit ``revision`` (default
    ``main``) points at, into the shared Hugging Face cache, from ``HF_ENDPOINT``, with ``token`` or
    ``HF_TOKEN``; with ``HF_HUB_OFFLINE`` set only the cache is read. Returns the snapshot folder, or None
    when the folder or repo holds no calibration.

    Raises:
        ValueError: a repo id that does not exist (or is private and no token was given), an unknown
            revision, or a calibration that cannot be had: offline (or the Hub unreachable) and not cached.
    """
    p = Path(model)
    if p.is_dir():
        return p if (p / CONFIG_FILE).is_file() and (p / TENSORS_FILE).is_file() else None
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(model))
    except HFValidationError:  # neither an existing folder nor a valid repo id
        return None
    where = f"{model}@{revision or 'main'}"
    try:
        snap = Path(snapshot_download(str(model), revision=revision, token=token,
                                      allow_patterns=[CONFIG_FILE, TENSORS_FILE]))
    except RepositoryNotFoundError:
        raise ValueError(
            f"Hub repo {str(model)!r} does not exist or is private: check the id, and give a token (HF_TOKEN) "
            "for a private repo"
        ) from None
    except RevisionNotFoundError:
        raise ValueError(f"Hub repo {str(model)!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if constants.is_offline_mode()
               else f"the Hub at {constants.ENDPOINT} could not be reached")
        raise ValueError(
            f"{why} and the RotateKV calibration of {where} ({CONFIG_FILE}, {TENSORS_FILE}) is not in the Hugging "
            f"Face cache {constants.HF_HUB_CACHE}: fetch it once online"
        ) from None
    if (snap / CONFIG_FILE).is_file() and (snap / TENSORS_FILE).is_file():
        return snap
    if constants.is_offline_mode():
        raise ValueError(
            f"HF_HUB_OFFLINE is set and the cached snapshot of {where} ({snap}) lacks {CONFIG_FILE} / "
            f"{TENSORS_FILE}: fetch them once online (or the repo has no calibration)"
        )
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rotkv_vllm.calibration", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="local model folder (transformers checkpoint)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--calib-file", help="calibration text file (never the evaluation text)")
    src.add_argument("--calib-dataset", help="datasets spec name[:config[:split]]")
    ap.add_argument("--bits", type=int, default=2, choices=(2, 3, 4))
    ap.add_argument("--config-json", help="a RotateKVConfig JSON file (overrides --bits)")
    ap.add_argument("--num-sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--out", help="output folder (default: the model folder)")
    args = ap.parse_args(argv)
    from rotkv_vllm.cli import user_errors_exit

    with user_errors_exit(ap.prog):
        _run(args)


def _run(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        what = "is not a model folder (no config.json)" if model_dir.is_dir() else "does not exist"
        raise ValueError(f"model folder {args.model} {what}; this command calibrates a local transformers "
                         "checkpoint (for a Hub repo id use optimum-cli rotkv rotatekv -m REPO_ID)")
    for opt in ("calib_file", "config_json"):
        f = getattr(args, opt)
        if f is not None and not Path(f).is_file():
            raise ValueError(f"--{opt.replace('_', '-')} {f} does not exist")
    config = (RotateKVConfig.from_json(Path(args.config_json).read_text()) if args.config_json
              else RotateKVConfig.for_bits(args.bits))
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    calib = calibrate(model, tok, config, text_file=args.calib_file, dataset=args.calib_dataset,
                      num_sequences=args.num_sequences, seq_len=args.seq_len, tp_size=args.tensor_parallel_size)
    out = save_calibration(calib, args.out or args.model)
    print(f"RotateKV calibration ({calib.source['num_tokens']} tokens, head groups of {calib.head_group_size}) "
          f"written to {out / CONFIG_FILE} and {out / TENSORS_FILE}")


if __name__ == "__main__":
    main()
