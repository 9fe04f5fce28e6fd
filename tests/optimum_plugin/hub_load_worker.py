"""Loads one pushed model twice in a fresh process, from its local folder and by Hub repo id, and compares outputs.

    python hub_load_worker.py rotkv|lrq|halo LOCAL_FOLDER REPO_ID [--revision REV]

The environment (set by the test) points ``HF_ENDPOINT`` at the loopback Hub server and ``HF_HOME`` at an empty
cache, so the repo-id load goes through huggingface_hub's real download path. Prints one JSON line:
``identical`` (bitwise equal outputs), ``max_abs_diff``, what the repo-id load put in the cache, and
method-specific facts (the quantized modules really are quantized).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def _cache_files() -> list[str]:
    root = Path(os.environ["HF_HOME"]) / "hub"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"identical": bool(torch.equal(a, b)), "max_abs_diff": float((a.float() - b.float()).abs().max()),
            "shape": list(a.shape), "finite": bool(torch.isfinite(a).all())}


@torch.no_grad()
def rotkv(local: str, repo: str, revision: str | None) -> dict:
    from optimum_plugin.quantizers import load_rotkv
    from rotkv_vllm.hf_cache import rotkv_cache

    outs, calibs = [], []
    for src, rev in ((local, None), (repo, revision)):
        model, tok, calib = load_rotkv(src, rev)
        ids = tok("The three primary colors are red, yellow and", return_tensors="pt").input_ids
        with rotkv_cache(model, calib) as cache:
            prefill = model(ids, past_key_values=cache, use_cache=True).logits
            step = model(prefill[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
        outs.append(torch.cat([prefill, step], dim=1))
        calibs.append(calib)
    res = _compare(*outs)
    res["calibration_identical"] = (calibs[0].config == calibs[1].config and all(
        torch.equal(x, y) for x, y in zip(calibs[0].key_orders, calibs[1].key_orders)))
    return res


@torch.no_grad()
def lrq(local: str, repo: str, revision: str | None) -> dict:
    from optimum_plugin.lrq_dit.modules import LRQLinear
    from optimum_plugin.quantizers import load_lrq_dit

    images, counts = [], []
    for src, rev in ((local, None), (repo, revision)):
        pipe = load_lrq_dit(src, rev)
        pipe.set_progress_bar_config(disable=True)
        counts.append(sum(isinstance(m, LRQLinear) for m in pipe.transformer.modules()))
        out = pipe(class_labels=[3, 5], num_inference_steps=3, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt")
        images.append(out.images)
    res = _compare(*images)
    res["lrq_linear_layers"] = counts
    return res


@torch.no_grad()
def halo(local: str, repo: str, revision: str | None) -> dict:
    from optimum_plugin.halo.export import W8A8Linear
    from optimum_plugin.quantizers import load_halo

    logits, counts = [], []
    ids = torch.arange(3, 40).unsqueeze(0)
    for src, rev in ((local, None), (repo, revision)):
        model = load_halo(src, rev)
        counts.append(sum(isinstance(m, W8A8Linear) for m in model.modules()))
        logits.append(model(ids).logits)
    res = _compare(*logits)
    res["w8a8_layers"] = counts
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=("rotkv", "lrq", "halo"))
    ap.add_argument("local")
    ap.add_argument("repo")
    ap.add_argument("--revision")
    a = ap.parse_args()
    res = {"rotkv": rotkv, "lrq": lrq, "halo": halo}[a.method](a.local, a.repo, a.revision)
    res["cache_files"] = _cache_files()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
