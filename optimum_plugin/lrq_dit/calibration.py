"""Calibration: activation statistics of every linear layer, gathered over prompts x timesteps.

:func:`calibrate_pipeline` runs a real diffusers pipeline (``DiTPipeline``, ``PixArtAlphaPipeline``, ...) over
batches of prompts (class labels for class-conditional pipelines) for ``num_inference_steps`` denoising steps;
every call of the denoiser is one timestep, and forward pre-hooks on its ``nn.Linear`` layers record, per
layer: the per-channel minimum, maximum, sum and absolute maximum over all tokens, and a uniform reservoir
sample of input rows (tokens) of bounded size for the rotation search and the weight-importance vector. A tqdm
bar counts denoiser calls (batches x timesteps).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import LRQDiTConfig

__all__ = ["ActivationRecorder", "LayerStats", "calibrate_pipeline", "target_linears"]

logger = logging.getLogger(__name__)


@dataclass
class LayerStats:
    """Activation statistics of one linear layer's input.

    Attributes:
        absmax: ``(n,)`` float32 per-channel max |x| over every token seen.
        chmin / chmax: ``(n,)`` float32 per-channel minimum / maximum over every token seen.
        chsum: ``(n,)`` float64 per-channel sum over every token seen (``chsum / seen`` is the mean).
        sample: ``(<= capacity, n)`` float32 uniform reservoir sample of input rows.
        seen: number of rows seen.
        calls: number of forward calls seen (timesteps x batches).
    """

    absmax: torch.Tensor
    chmin: torch.Tensor
    chmax: torch.Tensor
    chsum: torch.Tensor
    sample: torch.Tensor
    seen: int = 0
    calls: int = 0
    capacity: int = 1024
    _gen: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0), repr=False)

    @classmethod
    def empty(cls, n: int, capacity: int, seed: int) -> "LayerStats":
        inf = torch.full((n,), float("inf"))
        return cls(torch.zeros(n), inf.clone(), -inf, torch.zeros(n, dtype=torch.float64), torch.zeros(0, n), 0, 0,
                   capacity, torch.Generator().manual_seed(seed))

    def update(self, x: torch.Tensor) -> None:
        """Add rows ``x`` ``(rows, n)`` (reservoir sampling, Algorithm R, vectorized per batch)."""
        x = x.detach().to(torch.float32).cpu()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))
        self.chmin = torch.minimum(self.chmin, x.amin(dim=0))
        self.chmax = torch.maximum(self.chmax, x.amax(dim=0))
        self.chsum += x.to(torch.float64).sum(dim=0)
        self.calls += 1
        free = self.capacity - self.sample.shape[0]
        if free > 0:
            take = x[:free]
            self.sample = torch.cat([self.sample, take])
            self.seen += take.shape[0]
            x = x[free:]
        if x.shape[0] == 0:
            return
        # Row i of this batch is the (seen + i + 1)-th row overall: it replaces a random slot with
        # probability capacity / (seen + i + 1). Later rows of the batch win ties, as in the sequential loop.
        t = self.seen + torch.arange(1, x.shape[0] + 1, dtype=torch.float64)
        keep = torch.rand(x.shape[0], generator=self._gen, dtype=torch.float64) < self.capacity / t
        slots = torch.randint(0, self.capacity, (x.shape[0],), generator=self._gen)
        idx = keep.nonzero().flatten()
        if idx.numel():
            self.sample[slots[idx]] = x[idx]
        self.seen += x.shape[0]


def target_linears(model: nn.Module, config: LRQDiTConfig) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` that ``config`` converts (``modules_to_not_convert`` excluded)."""
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) is nn.Linear and name and not config.excludes(name)
    }


class ActivationRecorder:
    """Context manager recording :class:`LayerStats` of the inputs of the given linear layers.

    Usage::

        with ActivationRecorder(target_linears(model, cfg), cfg.calibration_tokens) as rec:
            model(...)
        stats = rec.stats
    """

    def __init__(self, layers: dict[str, nn.Linear], capacity: int, seed: int = 0) -> None:
        self.layers = layers
        self.stats = {
            name: LayerStats.empty(m.in_features, capacity, seed + i) for i, (name, m) in enumerate(layers.items())
        }
        self._handles: list = []

    def __enter__(self) -> "ActivationRecorder":
        for name, m in self.layers.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Linear, args):
            x = args[0]
            self.stats[name].update(x.reshape(-1, x.shape[-1]))

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _prompt_argument(pipe) -> str:
    params = inspect.signature(pipe.__call__).parameters
    for name in ("class_labels", "prompt"):
        if name in params:
            return name
    raise ValueError(
        f"{type(pipe).__name__}.__call__ takes neither `class_labels` nor `prompt`: pass prompt_argument=..."
    )


@torch.no_grad()
def calibrate_pipeline(
    pipe,
    config: LRQDiTConfig,
    prompts: Sequence,
    num_inference_steps: int = 20,
    batch_size: int = 8,
    component: str = "transformer",
    seed: int = 0,
    prompt_argument: str | None = None,
    progress: bool = True,
    **pipe_kwargs,
) -> dict[str, LayerStats]:
    """Run ``pipe`` over ``prompts`` and record the input statistics of the denoiser's linear layers.

    Args:
        pipe: a diffusers pipeline whose ``component`` (default ``"transformer"``) is the model to quantize.
        config: decides which layers are recorded and the reservoir size (``calibration_tokens``).
        prompts: class labels (``DiTPipeline``) or text prompts; run in batches of ``batch_size``.
        num_inference_steps: denoising steps per batch (each one a timestep the statistics cover).
        seed: seeds the pipeline's generator (batch ``i`` uses ``seed + i``) and the reservoirs.
        prompt_argument: the pipeline's argument the prompts go to (default: ``class_labels`` or ``prompt``).
        pipe_kwargs: passed to the pipeline call (e.g. ``guidance_scale``).
    Returns:
        ``{module name: LayerStats}`` for every converted layer.
    Raises:
        ValueError: no prompts, a pipeline without ``component``, or a model with no linear layer to convert.
    """
    if len(prompts) == 0:
        raise ValueError("prompts is empty: calibration needs at least one prompt (or class label)")
    if batch_size < 1 or num_inference_steps < 1:
        raise ValueError(f"batch_size={batch_size} and num_inference_steps={num_inference_steps} must be >= 1")
    model = getattr(pipe, component, None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{type(pipe).__name__} has no model component {component!r} to calibrate")
    layers = target_linears(model, config)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer to quantize "
            f"(modules_to_not_convert={list(config.modules_to_not_convert)})"
        )
    if model.training:
        logger.warning("%s is in training mode (dropout, label dropout): calibrating it as it is; call .eval() "
                       "first unless that is intended", type(model).__name__)
    arg = prompt_argument or _prompt_argument(pipe)
    batches = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    bar = tqdm(total=len(batches) * num_inference_steps, desc="LRQ-DiT calibration", unit="step",
               disable=not progress)

    def count_step(*_) -> None:  # a forward hook's non-None return value would replace the model's output
        bar.update(1)

    step_hook = model.register_forward_hook(count_step)
    old_bar_cfg = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    device = getattr(pipe, "_execution_device", torch.device("cpu"))
    try:
        with ActivationRecorder(layers, config.calibration_tokens, seed) as rec:
            for i, batch in enumerate(batches):
                gen = torch.Generator(device="cpu").manual_seed(seed + i)
                kwargs = {arg: batch, "num_inference_steps": num_inference_steps, "generator": gen,
                          "output_type": "latent" if arg == "prompt" else "pt"}
                kwargs.update(pipe_kwargs)
                pipe(**kwargs)
    finally:
        step_hook.remove()
        bar.close()
        pipe._progress_bar_config = old_bar_cfg
    logger.info("calibrated %d layers over %d batches x %d steps on %s", len(layers), len(batches),
                num_inference_steps, device)
    return rec.stats
