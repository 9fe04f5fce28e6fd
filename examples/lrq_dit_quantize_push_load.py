"""Quantize a diffusion transformer with LRQ-DiT, publish it, load it back and sample from it.

    python examples/lrq_dit_quantize_push_load.py                     # the bundled digits DiT, W4A8, a local "hub"
    HF_TOKEN=... python examples/lrq_dit_quantize_push_load.py --repo-id you/digits-dit-lrq --endpoint https://huggingface.co

Calibrates over class labels x timesteps, writes the packed pipeline and its model card (with the PSNR of its
samples against the float pipeline's), pushes it as one commit to ``--endpoint`` (any Hub-compatible server; without
one, the folder is copied under ``--hub-dir`` instead), loads it back by the plain diffusers route
(``DiffusionPipeline.from_pretrained`` after ``import optimum_plugin.lrq_dit``) and samples the same seeds again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default=str(ASSETS / "digits_dit"), help="a diffusers DiT pipeline folder")
    ap.add_argument("--out", help="where the quantized pipeline is written (default: a temporary folder)")
    ap.add_argument("--repo-id", default="you/digits-dit-lrq-w4a8")
    ap.add_argument("--endpoint", help="a Hub endpoint to push to (default: copy under --hub-dir)")
    ap.add_argument("--token", help="write token for --endpoint (default: HF_TOKEN)")
    ap.add_argument("--hub-dir", help="the local stand-in for a Hub without --endpoint (default: beside --out)")
    ap.add_argument("--weight-bits", type=int, default=4)
    ap.add_argument("--act-bits", type=int, default=8)
    ap.add_argument("--labels", default="0,1,2,3,4,5,6,7,8,9", help="calibration class labels")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps for calibration and samples")
    args = ap.parse_args(argv)
    if args.endpoint:  # read by huggingface_hub at import: set it first
        os.environ["HF_ENDPOINT"] = args.endpoint

    import torch

    from optimum_plugin.lrq_dit import LRQDiTConfig
    from optimum_plugin.lrq_dit.modules import LRQLinear
    from optimum_plugin.quantizers import LRQDiTQuantizer, load_lrq_dit

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lrq-dit-")) / "out"
    labels = [int(x) for x in args.labels.split(",")]
    q = LRQDiTQuantizer.from_pretrained(args.pipeline)
    q.quantize(out, config=LRQDiTConfig(weight_bits=args.weight_bits, act_bits=args.act_bits), prompts=labels,
               num_inference_steps=args.steps, batch_size=len(labels), pipe_kwargs={"guidance_scale": 1.5},
               eval_prompts=labels[:4], repo_id=args.repo_id, overwrite=bool(args.out))
    psnr = next(e["quantized"] for e in q.card_spec.evaluation if e["metric"].startswith("PSNR"))
    print(f"wrote {out}: samples at {psnr:.1f} dB PSNR against the float pipeline")

    if args.endpoint:
        pushed = q.push_to_hub(args.repo_id, token=args.token, endpoint=args.endpoint, progress=False)
        print(f"pushed {args.repo_id} to {args.endpoint}: commit {pushed.commit_oid}")
        source = args.repo_id
    else:
        hub = Path(args.hub_dir) if args.hub_dir else out.parent / "hub"
        source = hub / args.repo_id
        shutil.copytree(out, source, dirs_exist_ok=True)
        print(f"no --endpoint: published to {source}")

    pipe = load_lrq_dit(source, token=args.token)
    packed = sum(isinstance(m, LRQLinear) for m in pipe.transformer.modules())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=labels[:4], num_inference_steps=args.steps, guidance_scale=1.5,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    print(f"loaded {source}: {packed} packed LRQLinear layers; sampled {tuple(images.shape)}")
    return {"out": out, "source": source, "psnr_db": psnr, "packed_layers": packed, "images": images,
            "quantized_pipeline": q.pipeline}


if __name__ == "__main__":
    main()
