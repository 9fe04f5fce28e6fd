"""The class behind ``AutoModelForCausalLM.from_pretrained(w8a8_path, trust_remote_code=True)``.

A HALO W8A8 checkpoint's ``auto_map`` names ``modeling_halo_w8a8.HALOW8A8ForCausalLM``, a file that only
re-exports this class (see :mod:`optimum_plugin.halo.w8a8_config`). It is a loader, not a model class: its
``from_pretrained`` returns the model :func:`optimum_plugin.halo.export.load_w8a8` builds (the base family's
transformers model with each quantized linear a ``W8A8Linear``: Hadamard input transform, dynamic int8
per-token activations, int8 per-channel weights -- vLLM's maths).
"""

from __future__ import annotations

import os

import torch

__all__ = ["HALOW8A8ForCausalLM"]


class HALOW8A8ForCausalLM:
    """Loads a HALO W8A8 checkpoint (folder or Hub repo id) for ``AutoModelForCausalLM``."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM") -> None:
        """Called by transformers on remote-code classes; nothing to record for a loader."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, config=None,
                        dtype: torch.dtype | str | None = None, torch_dtype=None, revision: str | None = None,
                        token: str | None = None, **kwargs):
        """The checkpoint's model, ``dtype`` (default float32; ``"auto"`` = the checkpoint's storage dtype).

        Raises:
            ValueError: positional model arguments, or keyword arguments this loader does not honour (rather
                than ignoring them), or a folder that is not a HALO W8A8 checkpoint.
        """
        from optimum_plugin.halo.export import load_w8a8
        from optimum_plugin.hub import resolve_folder

        # Passed by transformers' Auto classes themselves; the rest would change what is loaded.
        for k in ("trust_remote_code", "code_revision", "_from_auto", "adapter_kwargs", "_commit_hash",
                  "cache_dir", "local_files_only", "subfolder"):
            kwargs.pop(k, None)
        if model_args or kwargs:
            raise ValueError(f"HALO W8A8 loading takes dtype, revision and token; got {list(model_args)} "
                             f"{sorted(kwargs)}")
        dtype = dtype if dtype is not None else torch_dtype
        folder = resolve_folder(pretrained_model_name_or_path, revision, token=token)
        if dtype == "auto":
            dtype = getattr(torch, str(getattr(config, "dtype", None) or "bfloat16").removeprefix("torch."))
        return load_w8a8(folder, dtype=dtype if dtype is not None else torch.float32)
