"""The LRQ-DiT face for Optimum: :class:`LRQDiTQuantizer` (quantize a diffusers pipeline's transformer over
prompts x timesteps, save the pipeline and its model card, push it) and :func:`load_lrq_dit`.

    LRQDiTQuantizer.from_pretrained("alice/dit").quantize("out/", prompts=[0, 1, 2, 3])      # diffusers pipeline

Shared parts (output folder, card, push): ``optimum_plugin.quantizer_base``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from optimum_plugin.hub import CardSpec, resolve_folder
from optimum_plugin.quantizer_base import HubQuantizer, card_base_model, folder_bytes, prepare_output

__all__ = ["LRQDiTQuantizer", "load_lrq_dit", "pipeline_prompt_argument"]


def pipeline_prompt_argument(pipe) -> str:
    """The name of the argument a diffusers pipeline takes its prompts in: ``class_labels`` or ``prompt``."""
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


class LRQDiTQuantizer(HubQuantizer):
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
        arg = pipeline_prompt_argument(self.pipeline)
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
        out = prepare_output(save_dir, overwrite, self.source_folder)
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
        q_bytes = folder_bytes(out / self.component, ".safetensors")
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
        arg = pipeline_prompt_argument(self.pipeline)
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
            base_model=card_base_model(self.source, self.source_folder, base_model),
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
