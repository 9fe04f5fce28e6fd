"""Export a HALO-trained model: (a) a merged bf16 checkpoint, (b) a W8A8 checkpoint vLLM serves.

(b) is a compressed-tensors ``int-quantized`` checkpoint with an online Hadamard input transform,
which is exactly HALO's int8 forward with row granularity::

    y = Q_tok(x R^T) Q_ch(W R^T)^T        Q_tok: dynamic symmetric int8 per token (vLLM computes it)
                                           Q_ch:  static symmetric int8 per output channel (stored)

Stored per quantized linear ``L``: ``L.weight`` int8 ``(N, K)`` = codes of ``W R^T``,
``L.weight_scale`` float32 ``(N, 1)``, and ``L.<SCHEME>_input.weight`` ``(b, b)`` = ``sqrt(b) R^T``
(the +-1 Hadamard, transposed; ``b`` = K, or the block size). compressed-tensors and vLLM apply an
input transform as ``x @ M / sqrt(b)`` (per block of ``b`` channels when ``head_dim=b``), which is
``x R^T``. The transform type is ``"random-hadamard"`` (an explicitly stored Hadamard matrix, any
order): vLLM's ``"hadamard"`` type calls the CUDA-only ``hadacore`` kernel and needs powers of two,
while SmolLM2's widths are 576 = 36*16 and 1536 = 12*128.

vLLM loads this with no plugin of ours where its compressed-tensors transform path runs (GPUs). On
vLLM 0.32's CPU platform that path calls ``layer.cpu_linear``, which its ``HadamardTransform`` never
sets, so our vLLM plugin (:mod:`optimum_plugin.halo.vllm_plugin`) registers a quantization method
that claims these checkpoints on the CPU and applies the same transform.

:func:`load_w8a8` evaluates such a checkpoint in transformers with the same integer maths.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from optimum_plugin.halo.apply import get_halo_config, remove_halo
from optimum_plugin.halo.config import HALOConfig
from optimum_plugin.halo.fsdp import HQShardedWeight
from optimum_plugin.halo.functional import hadamard_rotate
from optimum_plugin.halo.w8a8_config import base_config_dict, w8a8_config_dict, write_remote_code
from rotkv_kernels.hadamard import hadamard_matrix, has_hadamard
from rotkv_kernels.lowp_matmul import lowp_matmul, quantize_lowp

__all__ = ["save_merged", "save_w8a8", "load_w8a8", "W8A8Linear", "TRANSFORM_SCHEME", "w8a8_quantization_config"]

logger = logging.getLogger(__name__)

TRANSFORM_SCHEME = "halo_hadamard"
_TRANSFORM_KEY = f"{TRANSFORM_SCHEME}_input"
HALO_CONFIG_FILE = "halo_config.json"


def _merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy with PEFT adapters merged, HQ-FSDP wrappers and HALO layers removed (float weights)."""
    m = copy.deepcopy(model)
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional (the `halo` extra)
        PeftModel = ()
    if PeftModel and isinstance(m, PeftModel):
        m = m.merge_and_unload()
    for mod in m.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, HQShardedWeight):
            mod.weight = nn.Parameter(w._data.detach().clone(), requires_grad=w.requires_grad)
    remove_halo(m)
    return m


def _write_side_files(model, path: Path, tokenizer, halo_cfg: HALOConfig | None) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(path)
    if halo_cfg is not None:
        (path / HALO_CONFIG_FILE).write_text(halo_cfg.to_json())


def save_merged(model: nn.Module, path: str | os.PathLike, tokenizer=None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save the fine-tuned model as a plain transformers checkpoint (LoRA merged, HALO layers removed).

    The model passed in is not modified. Writes ``config.json``, ``model.safetensors``, the tokenizer
    if given, and ``halo_config.json`` (the training recipe, for provenance).
    """
    path = Path(path)
    halo_cfg = get_halo_config(model)
    m = _merged_copy(model).to(dtype)
    m.save_pretrained(path)
    _write_side_files(m, path, tokenizer, halo_cfg)
    return path


def w8a8_quantization_config(ignore: list[str], block: int | None) -> dict:
    """The ``quantization_config`` of a HALO W8A8 checkpoint (compressed-tensors schema)."""
    act = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
           "group_size": None, "block_structure": None, "actorder": None, "observer": None}
    wgt = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
           "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"}
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": wgt, "input_activations": act,
                        "output_activations": None, "format": "int-quantized"},
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {
            "config_groups": {
                TRANSFORM_SCHEME: {
                    "type": "random-hadamard",
                    "apply": [{"targets": ["Linear"], "location": "input", "inverse": False, "ignore": list(ignore)}],
                    "randomize": False,
                    "requires_grad": False,
                    "head_dim": block,
                    "precision": "float32",
                }
            }
        },
    }


def _validate_with_compressed_tensors(qcfg: dict) -> None:
    """Check the config against the compressed-tensors schema when that library is installed."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
        from compressed_tensors.transform import TransformConfig
    except ImportError:
        logger.info("compressed-tensors not installed: W8A8 config written without schema validation")
        return
    body = {k: v for k, v in qcfg.items() if k not in ("transform_config", "sparsity_config")}
    QuantizationConfig.model_validate(body)
    if "transform_config" in qcfg:
        TransformConfig.model_validate(qcfg["transform_config"])


def save_w8a8(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    hadamard: str = "full",
    block_size: int = 64,
    skip_modules: tuple[str, ...] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Save a W8A8 (int8 weights, dynamic int8 per-token activations) compressed-tensors checkpoint.

    Args:
        model: a (HALO / PEFT / HQ-FSDP-unsharded) causal LM; not modified.
        hadamard: ``"full"`` (one Hadamard over each layer's inputs, HALO's default), ``"block"``
            (``block_size`` channels per block, smaller transforms) or ``"none"``.
        skip_modules: linear layers kept in ``dtype`` (default: the HALO config's, else ``lm_head``).
        dtype: storage dtype of everything not quantized (embeddings, norms, skipped layers).
    Raises:
        ValueError: an unknown ``hadamard`` mode, or a layer width with no Hadamard of that mode.
    """
    from safetensors.torch import save_file

    if hadamard not in ("full", "block", "none"):
        raise ValueError(f"hadamard={hadamard!r}: expected 'full', 'block' or 'none'")
    path = Path(path)
    halo_cfg = get_halo_config(model)
    skip = tuple(skip_modules) if skip_modules is not None else (halo_cfg.skip_modules if halo_cfg else ("lm_head",))
    # Reuse HALOConfig's matching and width checks for the export's rotation.
    rot_cfg = HALOConfig(level=1 if hadamard != "none" else 0, hadamard="full" if hadamard == "none" else hadamard,
                         hadamard_block_size=block_size, skip_modules=skip)
    m = _merged_copy(model).to(torch.float32)
    targets = {n: mod for n, mod in m.named_modules() if type(mod) is nn.Linear and not rot_cfg.skips(n)}
    if not targets:
        raise ValueError("save_w8a8 found no linear layer to quantize")
    for n, mod in targets.items():
        rot_cfg.check_in_features(mod.in_features, n)

    tensors: dict[str, torch.Tensor] = {}
    quantized_prefixes = set()
    for n, mod in targets.items():
        w = mod.weight.detach().to(torch.float32)
        if rot_cfg.rotates:
            b = rot_cfg.rotation_block(mod.in_features)
            w = hadamard_rotate(w, None if hadamard == "full" else b)
            # vLLM computes x @ M / sqrt(b); M = sqrt(b) R^T holds +-1 exactly in bf16.
            tensors[f"{n}.{_TRANSFORM_KEY}.weight"] = _unnormalized_rt(b).to(dtype, copy=True)
        q, s = quantize_lowp(w, "int8", "row")
        tensors[f"{n}.weight"] = q.contiguous()
        tensors[f"{n}.weight_scale"] = s.to(torch.float32).contiguous()
        if mod.bias is not None:
            tensors[f"{n}.bias"] = mod.bias.detach().to(dtype).contiguous()
        quantized_prefixes.add(n)

    tied = bool(getattr(m.config, "tie_word_embeddings", False))
    out_emb = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    for k, v in m.state_dict().items():
        prefix = k.rsplit(".", 1)[0]
        if prefix in quantized_prefixes:
            continue
        if tied and out_emb is not None and v is out_emb.weight:
            continue
        if tied and k.endswith("lm_head.weight"):
            continue
        tensors[k] = v.detach().to(dtype).contiguous() if v.is_floating_point() else v.detach().contiguous()

    ignore = sorted(n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and n not in targets)
    qcfg = w8a8_quantization_config(ignore, None if hadamard != "block" else block_size)
    if not rot_cfg.rotates:
        del qcfg["transform_config"]
    _validate_with_compressed_tensors(qcfg)

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    # typed halo_w8a8, not as the base model: transformers would load it without its transforms
    cfg = m.config.to_dict()
    if not cfg.get("architectures"):  # as save_pretrained records it; vLLM picks its model class from it
        cfg["architectures"] = [type(m).__name__]
    cfg = w8a8_config_dict(cfg)
    cfg["quantization_config"] = qcfg
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    write_remote_code(path)
    _write_side_files(m, path, tokenizer, halo_cfg)
    logger.info("W8A8 checkpoint: %d int8 linear layers, hadamard=%s -> %s", len(quantized_prefixes), hadamard, path)
    return path


@functools.lru_cache(maxsize=None)
def _unnormalized_rt(b: int) -> torch.Tensor:
    return hadamard_matrix(b, dtype=torch.float32, normalized=False).T.contiguous()


class W8A8Linear(nn.Module):
    """Evaluates one layer of a HALO W8A8 checkpoint in PyTorch, with vLLM's integer maths.

    ``y = (Q_tok(x M / sqrt(b)) int8-GEMM w^T) * s_x * s_w^T + bias`` where ``Q_tok`` is dynamic
    symmetric int8 per token (scale amax/127, round half to even), ``w`` the stored int8 weight
    ``(N, K)`` and ``s_w`` its ``(N, 1)`` scales; ``M`` the stored ``(b, b)`` transform (or None).
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, transform: torch.Tensor | None,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"W8A8Linear expects a 2-D int8 weight, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.to(torch.float32).reshape(-1, 1))
        self.hadamard_block = None
        if transform is not None:
            b = transform.shape[0]
            if self.in_features % b:
                raise ValueError(f"transform of order {b} does not divide in_features={self.in_features}")
            self.register_buffer("transform", transform.to(torch.float32) / math.sqrt(b))
            # The matrix save_w8a8 writes is sqrt(b) R^T with R our Kronecker Hadamard: apply that one
            # with the two-factor GEMMs (x @ M / sqrt(b) == hadamard_rotate(x)), any other densely.
            if has_hadamard(b) and torch.equal(transform.to(torch.float32), _unnormalized_rt(b)):
                self.hadamard_block = b
        else:
            self.transform = None
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        if self.hadamard_block is not None:
            x2 = hadamard_rotate(x2, self.hadamard_block)
        elif self.transform is not None:
            b = self.transform.shape[0]
            x2 = (x2.reshape(-1, self.in_features // b, b) @ self.transform).reshape(-1, self.in_features)
        q, s = quantize_lowp(x2, "int8", "row")
        y = lowp_matmul(q, s, self.weight, self.weight_scale, out_dtype=torch.float32)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def load_w8a8(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a HALO W8A8 checkpoint into transformers, each quantized linear a :class:`W8A8Linear`.

    Raises:
        ValueError: the folder is not a compressed-tensors W8A8 checkpoint written by :func:`save_w8a8`,
            or tensors are missing / left over.
    """
    from safetensors.torch import load_file
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    qcfg = raw.get("quantization_config") or {}
    if qcfg.get("quant_method") != "compressed-tensors" or qcfg.get("format") != "int-quantized":
        raise ValueError(f"{path} is not a compressed-tensors int-quantized (W8A8) checkpoint")
    tensors = load_file(str(path / "model.safetensors"))
    base = base_config_dict(raw)
    base.pop("quantization_config")
    config = CONFIG_MAPPING[base["model_type"]].from_dict(base)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefixes = sorted(k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale"))
    used = set()
    for n in prefixes:
        tk = f"{n}.{_TRANSFORM_KEY}.weight"
        bias = tensors.get(f"{n}.bias")
        layer = W8A8Linear(tensors[f"{n}.weight"], tensors[f"{n}.weight_scale"], tensors.get(tk),
                           None if bias is None else bias.to(dtype))
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        used.update({f"{n}.weight", f"{n}.weight_scale", tk, f"{n}.bias"})
    rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items() if k not in used}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    # the W8A8Linear buffers were filled from the file above
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in prefixes]
    if config.tie_word_embeddings:
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        model.tie_weights()
    if missing or unexpected:
        raise ValueError(f"{path}: tensors missing {missing[:5]} or unexpected {unexpected[:5]} for this model")
    return model.eval()


def has_export_hadamard(width: int, hadamard: str, block_size: int) -> bool:
    """Whether :func:`save_w8a8` can rotate a layer of this input width."""
    return has_hadamard(width) if hadamard == "full" else width % block_size == 0
