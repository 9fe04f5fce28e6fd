"""Train the reference model of LRQ-DiT on this CPU: a class-conditional DiT on scikit-learn's digits.

    nice python examples/train_digits_dit.py                 # writes examples/assets/{digits_dit,digits_classifier}
    nice python examples/train_digits_dit.py --out /tmp/x    # elsewhere

What it trains (all seeded; about 15 minutes on 2 idle cores, 35 on 2 cores shared with other jobs):
  1. a small CNN classifier on 16x16 digits (it judges generated samples: accuracy, Frechet distance);
  2. a small :class:`diffusers.AutoencoderKL` (16x16x1 image <-> 4x8x8 latent), its ``scaling_factor`` set to
     1 / std of the training latents;
  3. a :class:`diffusers.DiTTransformer2DModel` (6 blocks, width 128, patch 2 -> 16 tokens) predicting the
     noise of a DDPM with 1000 steps, classes 0..9 with 10 % label dropout to the null class 1000 that
     :class:`diffusers.DiTPipeline` uses for classifier-free guidance; an EMA of its weights is saved.
The pipeline is saved with a DDIM scheduler (fp16 weights: about 6 MB) and reloads with
``DiTPipeline.from_pretrained(folder)``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from optimum_plugin.lrq_dit.digits import (
    NUM_CLASSES,
    DigitsClassifier,
    assets_dir,
    load_digits_images,
    to_model_range,
)

logger = logging.getLogger("train_digits_dit")


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> DigitsClassifier:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    n = len(y)
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 64):
            idx = perm[i : i + 64]
            xb = x[idx]
            # Small random shifts make the classifier judge shapes, not exact pixel positions.
            shift = torch.randint(-1, 2, (2,), generator=g)
            xb = torch.roll(xb, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        mid_block_add_attention=False,
    )


def train_vae(x: torch.Tensor, steps: int, seed: int, kl_weight: float = 1e-4):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    n = len(x)
    for step in range(steps):
        idx = torch.randint(0, n, (128,), generator=g)
        post = vae.encode(x[idx]).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x[idx]) + kl_weight * post.kl().mean() / z[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0:
            logger.info("vae step %d loss %.4f", step, loss.item())
    vae.eval()
    with torch.no_grad():
        lat = vae.encode(x).latent_dist.mean
        rec = vae.decode(lat).sample
    scaling = 1.0 / lat.std().item()
    vae.register_to_config(scaling_factor=scaling)
    logger.info("vae: reconstruction mse %.4f, scaling_factor %.4f", F.mse_loss(rec, x).item(), scaling)
    return vae, lat * scaling


def build_dit():
    from diffusers import DiTTransformer2DModel

    # num_embeds_ada_norm=1000 because DiTPipeline hard-codes class 1000 as the null (unconditional) label.
    dit = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        num_layers=6,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    # Gaussian weights with the variance of PyTorch's default uniform init (1 / (3 fan_in)): a few hundred steps
    # barely move the weights, and a real, long-trained DiT's weights are Gaussian-like with long tails, not
    # uniform - the distribution LRQ-DiT is designed for. Embeddings keep their N(0, 1) init (with DiT's
    # N(0, 0.02) the class signal is too weak to be learned in this short run).
    for m in dit.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=(3 * m.in_features) ** -0.5)
    return dit


def train_dit(latents: torch.Tensor, labels: torch.Tensor, steps: int, seed: int, batch: int = 128,
              lr: float = 1e-3, ema_decay: float = 0.995):
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    dit = build_dit()
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(100, steps // 10)

    def lr_at(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))) * 0.9 + 0.1

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    n = len(labels)
    dit.train()  # label dropout (to class 1000) is active only in train mode
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        zt = sched.add_noise(z0, noise, t)
        pred = dit(zt, timestep=t, class_labels=labels[idx]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        # The EMA window (~1 / (1 - decay) steps) must be short against the run, or it keeps early weights.
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), dit.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 100 == 0:
            logger.info("dit step %d loss %.4f (%.0f s)", step, loss.item(), time.time() - t0)
    return ema, sched


@torch.no_grad()
def evaluate(pipe, classifier: DigitsClassifier, per_class: int, steps: int, seed: int) -> float:
    labels = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
    gen = torch.Generator().manual_seed(seed)
    out = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=3.0, generator=gen, output_type="pt")
    imgs = out.images if isinstance(out.images, torch.Tensor) else torch.as_tensor(out.images)
    pred = classifier(to_model_range(imgs.float())).argmax(-1)
    return (pred == torch.tensor(labels)).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=assets_dir(), help="folder for digits_dit/ and digits_classifier/")
    ap.add_argument("--dit-steps", type=int, default=1600)
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--classifier-epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-from", type=Path, default=None, help="reuse this trained VAE folder (skips step 2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is fastest when other jobs share the cores (OpenMP barriers spin)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from diffusers import DDIMScheduler, DiTPipeline
    from safetensors.torch import save_file

    t_start = time.time()
    x_tr, y_tr = load_digits_images("train")
    x_te, y_te = load_digits_images("test")

    clf = train_classifier(x_tr, y_tr, args.classifier_epochs, args.seed)
    with torch.no_grad():
        acc = (clf(x_te).argmax(-1) == y_te).float().mean().item()
    logger.info("classifier test accuracy %.4f (%.0f s)", acc, time.time() - t_start)

    if args.vae_from is not None:  # development shortcut: reuse a VAE this script trained before
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            latents = vae.encode(x_tr).latent_dist.mean * vae.config.scaling_factor
    else:
        vae, latents = train_vae(x_tr, args.vae_steps, args.seed)
    logger.info("vae done (%.0f s)", time.time() - t_start)
    dit, ddpm = train_dit(latents.detach(), y_tr, args.dit_steps, args.seed)
    logger.info("dit done (%.0f s)", time.time() - t_start)

    # No clipping of the predicted x0 to [-1, 1]: the latents have unit variance, not the image range.
    scheduler = DDIMScheduler.from_config(ddpm.config, clip_sample=False)
    id2label = {str(i): str(i) for i in range(NUM_CLASSES)}
    pipe = DiTPipeline(transformer=dit.to(torch.float16), vae=vae.to(torch.float16), scheduler=scheduler,
                       id2label=id2label)
    out_dit = args.out / "digits_dit"
    pipe.save_pretrained(out_dit)
    out_clf = args.out / "digits_classifier"
    out_clf.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(out_clf / "model.safetensors"))
    (out_clf / "config.json").write_text(json.dumps({"feature_dim": clf.feature_dim, "test_accuracy": acc}, indent=2))

    reloaded = DiTPipeline.from_pretrained(out_dit)
    reloaded.set_progress_bar_config(disable=True)
    gen_acc = evaluate(reloaded, clf, per_class=10, steps=20, seed=args.seed)
    info = {"command": "python examples/train_digits_dit.py " + " ".join(sys.argv[1:]),
            "seed": args.seed, "dit_steps": args.dit_steps, "vae_steps": None if args.vae_from else args.vae_steps,
            "vae_from": None if args.vae_from is None else str(args.vae_from),
            "classifier_test_accuracy": acc, "generated_accuracy_guidance3_20steps": gen_acc,
            "seconds": round(time.time() - t_start)}
    (args.out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    logger.info("generated-sample accuracy %.3f; assets %.1f MB; total %.0f s", gen_acc, size / 2**20,
                time.time() - t_start)


if __name__ == "__main__":
    main()
