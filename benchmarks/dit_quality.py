"""Sample quality of the trained digits DiT under quantization: fp vs round-to-nearest vs Hadamard-only vs LRQ-DiT.

    nice python benchmarks/dit_quality.py                       # W8A8, W4A8, W4A4, W3A4; ~15 min on 2 shared cores
    nice python benchmarks/dit_quality.py --json out.json       # also write the rows as a JSON list

One run, same noise and same class labels for every row. Methods (all quantize every linear layer of the
DiT's blocks and output head, activations dynamically per token):

  fp        the trained model (fp16 checkpoint, run in fp32)
  rtn       uniform per-row min-max round-to-nearest weights, no rotation, no smoothing
  hadamard  QuaRot-like: Hadamard rotation of every layer's input folded into the weights, then RTN weights
  lrq       LRQ-DiT (LRQDiTConfig defaults): Twin-Log weights (grid-searched per row, unbiased gain) + mean
            shift + smoothing + adaptive rotation (Hadamard or outlier-aware per layer by the fluctuation
            metric, none where rotating does not lower the activation error)

Calibration (rtn needs none) runs the DiTPipeline over its own class labels and timesteps (``--calib-per-class``
labels per class, different seeds from the evaluation). Columns: the classifier's accuracy on the generated
digits against the requested class; the (squared, as FID) Frechet distance between the classifier's features
of the generated digits and of the held-out real digits (both relative to fp), and between the features of the
generated digits and of fp's (same noise and labels: how far quantization moved the distribution); the on-disk
size of the transformer checkpoint (``save_pretrained``, tensors that stay floating point stored in bf16)
against the same model all in bf16, and the same ratio for the converted linear layers alone (packed codes, row
parameters, shift/smoothing vectors and rotation data, against their bf16 weights and biases). The model's six
1001-row class-embedding tables (DiTPipeline's fixed 1000-class layout) are most of what is not converted.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

import optimum_plugin.lrq_dit as lrq
from optimum_plugin.lrq_dit.digits import (
    NUM_CLASSES,
    digits_pipeline_path,
    frechet_distance,
    load_classifier,
    load_digits_images,
    to_model_range,
)

METHODS = {
    "rtn": dict(weight_quantizer="uniform", rotation="none", smooth_alpha=None, shift=False),
    "hadamard": dict(weight_quantizer="uniform", rotation="hadamard", smooth_alpha=None, shift=False),
    "lrq": dict(),
}
BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W3A4": (3, 4)}


def checkpoint_bytes(model) -> tuple[int, int, int]:
    """On-disk bytes of ``save_pretrained(model)`` with every floating-point tensor stored in bf16, and of the
    linear layers LRQ-DiT converts: (total, those layers as stored, those layers as bf16 weight + bias)."""
    from safetensors import safe_open

    m = copy.deepcopy(model)
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(torch.bfloat16)  # bypasses diffusers' refusal to .to() a quantized model
    linears = {n: mod for n, mod in m.named_modules() if isinstance(mod, (torch.nn.Linear, lrq.LRQLinear))}
    with tempfile.TemporaryDirectory() as tmp:
        m.save_pretrained(tmp)
        files = list(Path(tmp).glob("*.safetensors"))
        total = sum(f.stat().st_size for f in files)
        stored = 0
        for f in files:
            with safe_open(str(f), "pt") as sf:
                for key in sf.keys():
                    owner = linears.get(key.rpartition(".")[0])
                    if isinstance(owner, lrq.LRQLinear):
                        t = sf.get_tensor(key)
                        stored += t.numel() * t.element_size()
    as_bf16 = sum(2 * (mod.in_features + 1) * mod.out_features for mod in linears.values()
                  if isinstance(mod, lrq.LRQLinear))
    return total, stored, as_bf16


@torch.no_grad()
def sample(pipe, labels: list[int], steps: int, guidance: float, seed: int, batch: int) -> torch.Tensor:
    out = []
    for i in range(0, len(labels), batch):
        g = torch.Generator().manual_seed(seed + i)
        r = pipe(class_labels=labels[i : i + batch], num_inference_steps=steps, guidance_scale=guidance,
                 generator=g, output_type="pt")
        out.append(r.images.float())
    return torch.cat(out)


@torch.no_grad()
def score(classifier, images01: torch.Tensor, labels: list[int]) -> tuple[float, torch.Tensor]:
    x = to_model_range(images01)
    acc = (classifier(x).argmax(-1) == torch.tensor(labels)).float().mean().item()
    return acc, classifier.features(x)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=30, help="generated digits per class")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps (evaluation and calibration)")
    ap.add_argument("--guidance", type=float, default=1.5,
                    help="classifier-free guidance; stronger guidance sharpens samples past the real data and "
                         "inflates the Frechet distance to it (1.5: ~0.93 accuracy, near-floor distance at fp)")
    ap.add_argument("--calib-per-class", type=int, default=2, help="calibration prompts per class")
    ap.add_argument("--bits", default=",".join(BITS), help=f"comma list from {list(BITS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {list(METHODS)} (fp always runs)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    ap.add_argument("--pipeline", type=Path, default=None, help="DiTPipeline folder (default: the committed one)")
    ap.add_argument("--classifier", type=Path, default=None, help="classifier folder (default: the committed one)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as a JSON list of objects")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from diffusers import DiTPipeline

    bits = [b.strip() for b in args.bits.split(",") if b.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for b in bits:
        if b not in BITS:
            ap.error(f"--bits: unknown {b!r}, expected some of {list(BITS)}")
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown {m!r}, expected some of {list(METHODS)}")

    t_start = time.time()
    pipe = DiTPipeline.from_pretrained(args.pipeline or digits_pipeline_path(), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    fp_transformer = pipe.transformer
    classifier = load_classifier(args.classifier)
    real_x, _ = load_digits_images("test")
    with torch.no_grad():
        real_feats = classifier.features(real_x)
    labels = [c for c in range(NUM_CLASSES) for _ in range(args.per_class)]
    calib = [c for _ in range(args.calib_per_class) for c in range(NUM_CLASSES)]
    bf16_bytes, _, _ = checkpoint_bytes(fp_transformer)

    rows: list[dict] = []
    fp_feats: list[torch.Tensor] = []

    def run(method: str, label: str, cfg: lrq.LRQDiTConfig | None) -> None:
        t0 = time.time()
        if cfg is None:
            pipe.transformer = fp_transformer
            size, lin_ratio = bf16_bytes, 1.0
        else:
            pipe.transformer = copy.deepcopy(fp_transformer)
            lrq.quantize_pipeline(pipe, cfg, calib, num_inference_steps=args.steps, batch_size=NUM_CLASSES,
                                  seed=args.seed + 10_000, progress=False, guidance_scale=args.guidance)
            size, stored, as_bf16 = checkpoint_bytes(pipe.transformer)
            lin_ratio = stored / as_bf16
        imgs = sample(pipe, labels, args.steps, args.guidance, args.seed, args.batch)
        acc, feats = score(classifier, imgs, labels)
        fd = frechet_distance(feats, real_feats)
        if cfg is None:
            fp_feats.append(feats)
        fd_fp = frechet_distance(feats, fp_feats[0])
        rows.append({"method": method, "bits": label, "accuracy": round(acc, 4), "frechet": round(fd, 3),
                     "frechet_to_fp_samples": round(fd_fp, 3),
                     "checkpoint_mb": round(size / 2**20, 3), "size_vs_bf16": round(size / bf16_bytes, 4),
                     "linears_vs_bf16": round(lin_ratio, 4),
                     "seconds": round(time.time() - t0, 1)})
        print(f"  {method:9s} {label:5s} acc {acc:.3f}  frechet {fd:8.3f}  to fp {fd_fp:7.3f}  "
              f"({time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)

    run("fp", "W16A16", None)  # always first: every ratio is against it
    for b in bits:
        w, a = BITS[b]
        for m in methods:
            run(m, b, lrq.LRQDiTConfig(weight_bits=w, act_bits=a, **METHODS[m]))

    fp = next(r for r in rows if r["method"] == "fp")
    for r in rows:
        r["accuracy_vs_fp"] = round(r["accuracy"] / fp["accuracy"], 4) if fp["accuracy"] else None
        r["frechet_vs_fp"] = round(r["frechet"] / fp["frechet"], 3) if fp["frechet"] else None
    hdr = f"{'method':9s} {'bits':6s} {'accuracy':>8s} {'acc/fp':>7s} {'frechet':>8s} {'fd/fp':>7s} " \
          f"{'fd to fp':>8s} {'ckpt MB':>8s} {'size/bf16':>9s} {'linears/bf16':>12s}"
    print(f"digits DiT, {len(labels)} samples, {args.steps} DDIM steps, guidance {args.guidance}; "
          f"{time.time() - t_start:.0f} s")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['method']:9s} {r['bits']:6s} {r['accuracy']:8.3f} {r['accuracy_vs_fp']:7.3f} "
              f"{r['frechet']:8.3f} {r['frechet_vs_fp']:7.2f} {r['frechet_to_fp_samples']:8.3f} "
              f"{r['checkpoint_mb']:8.3f} {r['size_vs_bf16']:9.3f} "
              f"{r['linears_vs_bf16']:12.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
