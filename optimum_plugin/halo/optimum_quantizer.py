"""The HALO face for Optimum: :class:`HALOQuantizer` (export a fine-tuned checkpoint as W8A8 or merged bf16, evaluate
it as it loads, write its model card, push it) and :func:`load_halo`.

    HALOQuantizer.from_pretrained("out-finetuned/").quantize("out/", export_format="w8a8")   # vLLM checkpoint

Shared parts (output folder, card, push, evaluation): ``optimum_plugin.quantizer_base``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from optimum_plugin.hub import CardSpec, resolve_folder
from optimum_plugin.quantizer_base import (
    HubQuantizer,
    card_base_model,
    causal_lm_perplexity,
    eval_ids,
    eval_text,
    folder_bytes,
    prepare_output,
)

__all__ = ["EXPORT_FORMATS", "HALOQuantizer", "load_halo"]

EXPORT_FORMATS = ("w8a8", "bf16")


class HALOQuantizer(HubQuantizer):
    """HALO export of a fine-tuned checkpoint, as an ``OptimumQuantizer``.

    The source is a transformers causal LM folder / repo (a HALO or any fine-tune, ``halo_config.json`` beside
    it if HALO trained it) or a PEFT adapter folder (merged on export). ``w8a8``: a compressed-tensors INT8
    checkpoint with the Hadamard input transforms (:func:`optimum_plugin.halo.save_w8a8`; vLLM serves it);
    ``bf16``: the merged model (:func:`optimum_plugin.halo.save_merged`).
    """

    method = "HALO"

    def __init__(self, model, tokenizer, *, source: str, folder: Path, revision: str | None = None,
                 halo_config=None) -> None:
        super().__init__(source, folder, revision)
        self.model, self.tokenizer, self.halo_config = model, tokenizer, halo_config

    @classmethod
    def from_pretrained(cls, model_or_path: str | Path, file_name: str | None = None, *, revision: str | None = None,
                        token: str | None = None, dtype: torch.dtype = torch.float32) -> "HALOQuantizer":
        """Load the fine-tuned checkpoint (folder or Hub repo id; a PEFT adapter folder loads its base too).

        Raises:
            ValueError: ``file_name`` given, or an unresolvable source.
        """
        if file_name is not None:
            raise ValueError("file_name is not used by HALO: pass the checkpoint folder or repo id")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from optimum_plugin.halo.config import HALOConfig

        folder = resolve_folder(model_or_path, revision, token=token)
        if (folder / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=dtype)
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
            tok_src = folder if (folder / "tokenizer_config.json").is_file() else base
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
            tok_src = folder
        halo_cfg = None
        if (folder / "halo_config.json").is_file():
            halo_cfg = HALOConfig.from_json((folder / "halo_config.json").read_text())
        return cls(model.eval(), AutoTokenizer.from_pretrained(tok_src), source=str(model_or_path), folder=folder,
                   revision=revision, halo_config=halo_cfg)

    def quantize(
        self,
        save_dir: str | Path,
        file_prefix: str | None = None,
        *,
        export_format: str = "w8a8",
        hadamard: str = "full",
        block_size: int = 64,
        skip_modules: Sequence[str] | None = None,
        evaluate: bool = True,
        eval_file: str | Path | None = None,
        eval_dataset: str | None = None,
        eval_tokens: int = 4096,
        eval_window: int = 1024,
        repo_id: str | None = None,
        base_model: str | None = None,
        overwrite: bool = False,
        progress: bool = True,
        command: str | None = None,
    ) -> Path:
        """Export, evaluate the exported checkpoint as it loads against the source model, write the card.

        Args:
            export_format: ``"w8a8"`` or ``"bf16"``.
            hadamard / block_size / skip_modules: as :func:`optimum_plugin.halo.save_w8a8` (``skip_modules``
                default: the HALO config's, else ``lm_head``).
        Raises:
            ValueError: ``file_prefix`` given, an unknown format, or a non-empty ``save_dir``.
        """
        from optimum_plugin.halo.export import save_merged, save_w8a8

        if file_prefix is not None:
            raise ValueError("file_prefix is not used by HALO: the checkpoint is model.safetensors")
        if export_format not in EXPORT_FORMATS:
            raise ValueError(f"export_format={export_format!r}: expected one of {EXPORT_FORMATS}")
        eval_src = eval_text(eval_file, eval_dataset, evaluate)
        out = prepare_output(save_dir, overwrite, self.source_folder)
        if skip_modules is None and self.halo_config is not None:
            skip_modules = self.halo_config.skip_modules
        if export_format == "w8a8":
            save_w8a8(self.model, out, self.tokenizer, hadamard=hadamard, block_size=block_size,
                      skip_modules=tuple(skip_modules) if skip_modules is not None else None)
        else:
            save_merged(self.model, out, self.tokenizer)
        if self.halo_config is not None and not (out / "halo_config.json").is_file():
            (out / "halo_config.json").write_text(self.halo_config.to_json())  # the training recipe, for provenance
        # The float size of what is exported: PEFT's LoRA factors are merged away (tied weights count once).
        merged_params = sum(p.numel() for n, p in self.model.named_parameters() if "lora_" not in n)
        evaluation = []
        if eval_src is not None:
            text, desc = eval_src
            ids = eval_ids(self.tokenizer, text, eval_tokens, eval_window)
            ref = causal_lm_perplexity(self.model, ids, eval_window, progress, "ppl source")
            exported = load_halo(out)
            ppl = causal_lm_perplexity(exported, ids, eval_window, progress, f"ppl {export_format}")
            evaluation.append({"metric": "perplexity (teacher-forced, lower is better)",
                               "data": f"{desc}, {ids.numel()} tokens in windows of {eval_window}",
                               "reference": ref, "reference_name": f"source, {str(self.model.dtype)[6:]}",
                               "quantized": ppl})
        q_bytes = folder_bytes(out, ".safetensors")
        sizes = []
        if export_format == "w8a8":
            from safetensors import safe_open

            from optimum_plugin.halo.export import TRANSFORM_SCHEME

            lin_q = lin_bf16 = 0
            with safe_open(str(out / "model.safetensors"), "pt") as f:
                for k in f.keys():
                    if k.endswith(".weight_scale"):
                        prefix = k[: -len(".weight_scale")]
                        w = f.get_slice(prefix + ".weight")
                        rows, cols = w.get_shape()
                        lin_bf16 += 2 * rows * cols
                        lin_q += rows * cols + 4 * rows  # int8 codes + fp32 row scales
                        transform = f"{prefix}.{TRANSFORM_SCHEME}_input.weight"
                        if transform in f.keys():
                            b = f.get_slice(transform).get_shape()[0]
                            lin_q += 2 * b * b
            sizes.append({"what": "the int8 linear layers (codes, row scales and stored Hadamard transforms)",
                          "bf16_bytes": lin_bf16, "quantized_bytes": lin_q})
        tied = bool(getattr(getattr(self.model, "config", None), "tie_word_embeddings", False))
        sizes.append({"what": "all weights on disk" + (" (tied embeddings stored once)" if tied else ""),
                      "bf16_bytes": 2 * merged_params, "quantized_bytes": q_bytes})
        if export_format == "w8a8":
            label = "W8A8 (INT8 weights per channel, INT8 activations per token)"
            summary = (f"A HALO export: {label} in the compressed-tensors format, each quantized linear layer with "
                       f"its Hadamard input transform ({hadamard}), exactly HALO's INT8 forward. vLLM serves it "
                       "(on its CPU platform with `rotkv`'s HALO plugin installed). Do not load it with "
                       "`AutoModelForCausalLM.from_pretrained`: transformers drops the Hadamard transforms; use "
                       "`load_halo` below.")
            usage = [("Serve it with vLLM:", "bash", "vllm serve {repo}"),
                     ("Evaluate it in PyTorch with vLLM's integer maths:", "python",
                      "from optimum_plugin.quantizers import load_halo\n\n"
                      'model = load_halo("{repo}")  # W8A8Linear layers: int8 GEMMs + Hadamard input transforms')]
        else:
            label = "bf16 (merged)"
            summary = "A HALO fine-tune exported as a plain bf16 transformers checkpoint (LoRA merged)."
            usage = [("Load it with transformers:", "python",
                      'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained('
                      '"{repo}")'),
                     ("Serve it with vLLM:", "bash", "vllm serve {repo}")]
        spec = CardSpec(
            method=self.method, title_suffix=label, summary=summary, library_name="transformers",
            pipeline_tag="text-generation", tags=("halo", "int8", "compressed-tensors") if export_format == "w8a8"
            else ("halo",), base_model=card_base_model(self.source, self.source_folder, base_model),
            config={"export_format": export_format, "hadamard": hadamard,
                    "block_size": block_size if hadamard == "block" else None,
                    "skip_modules": list(skip_modules) if skip_modules is not None else ["lm_head"],
                    "training": self.halo_config.to_dict() if self.halo_config is not None else None},
            calibration=None, evaluation=evaluation,
            sizes=sizes,
            usage=usage, command=command)
        self._write_card(out, spec, repo_id)
        return out


def load_halo(model_or_repo: str | Path, revision: str | None = None, *, token: str | None = None,
              dtype: torch.dtype = torch.float32):
    """A HALO export (folder or repo id): W8A8 through :func:`optimum_plugin.halo.load_w8a8` (transformers would
    load it without its Hadamard transforms), a bf16 export through ``AutoModelForCausalLM``.

    Raises:
        ValueError: as :func:`optimum_plugin.hub.resolve_folder`, or a folder with no ``config.json``.
    """
    from optimum_plugin.halo.export import load_w8a8

    folder = resolve_folder(model_or_repo, revision, token=token)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{model_or_repo} has no config.json: not a HALO export")
    qc = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    if qc.get("quant_method") == "compressed-tensors":
        return load_w8a8(folder, dtype=dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
