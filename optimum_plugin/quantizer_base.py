"""What the three Optimum quantizers share (RotateKV: ``optimum_plugin.rotatekv``, LRQ-DiT:
``optimum_plugin.lrq_dit.optimum_quantizer``, HALO: ``optimum_plugin.halo.optimum_quantizer``): the output folder,
its model card (:func:`optimum_plugin.hub.model_card`), pushing it (:func:`optimum_plugin.hub.push_to_hub`), and
the evaluation text.

Every ``quantize`` writes a complete, loadable folder and a model card with the method, its config, the calibration
data and an evaluation measured in the same run against the unquantized model, plus the size against bf16. It
refuses to write into a non-empty folder unless ``overwrite=True`` and never touches the source.
``from_pretrained`` takes a local folder or a Hub repo id (resolved through ``huggingface_hub``, so ``HF_ENDPOINT``,
``HF_TOKEN``, ``HF_HUB_OFFLINE`` and revisions apply).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from optimum.quantization_base import OptimumQuantizer

from optimum_plugin.hub import CardSpec, PushResult, is_repo_id, model_card, push_to_hub

__all__ = ["README", "HubQuantizer", "prepare_output", "folder_bytes", "card_base_model", "eval_text", "eval_ids",
           "causal_lm_perplexity"]

README = "README.md"


def prepare_output(save_dir: str | os.PathLike, overwrite: bool, source: Path | None) -> Path:
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


def folder_bytes(folder: Path, suffix: str = "") -> int:
    return sum(p.stat().st_size for p in folder.rglob(f"*{suffix}") if p.is_file())


def card_base_model(source: str, folder: Path, given: str | None) -> str | None:
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


def eval_text(eval_file, eval_dataset, evaluate: bool) -> tuple[str, str] | None:
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


def eval_ids(tokenizer, text: str, n_tokens: int, window: int) -> torch.Tensor:
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


def causal_lm_perplexity(model, ids: torch.Tensor, window: int, progress: bool = False, desc: str = "ppl") -> float:
    """``exp(mean NLL)`` over consecutive windows of ``window`` tokens of ``ids`` ``[N]``: the windows and scored
    positions of :func:`rotkv_vllm.reference.perplexity` (:func:`rotkv_vllm.reference.windowed_nll`), for any
    causal LM (no KV-cache method installed)."""
    from rotkv_vllm.reference import windowed_nll

    nll, count = windowed_nll(model, ids, window, progress=progress, desc=desc)
    return math.exp(nll / count)


class HubQuantizer(OptimumQuantizer):
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
