"""LRQ-DiT on the real trained model (examples/assets): the committed checkpoint, and the method ordering at W4A4.

The ordering check uses the denoiser's output error against fp on points of fp sampling trajectories (the
quantity every sampling step integrates), not sample statistics, so it is deterministic and cheap; the sample
quality table comes from benchmarks/dit_quality.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

import optimum_plugin.lrq_dit as lrq
from optimum_plugin.lrq_dit.digits import (
    NUM_CLASSES,
    assets_dir,
    digits_pipeline_path,
    load_classifier,
    load_digits_images,
    to_model_range,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def pipe():
    from diffusers import DiTPipeline

    p = DiTPipeline.from_pretrained(digits_pipeline_path(), dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def test_assets_are_small_and_the_classifier_works():
    size = sum(f.stat().st_size for f in assets_dir().rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    clf = load_classifier()
    x, y = load_digits_images("test")
    with torch.no_grad():
        acc = (clf(x).argmax(-1) == y).float().mean().item()
    assert acc > 0.9


def test_trained_dit_generates_the_requested_digits(pipe):
    clf = load_classifier()
    labels = [c for c in range(NUM_CLASSES) for _ in range(3)]
    out = pipe(class_labels=labels, num_inference_steps=10, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    with torch.no_grad():
        acc = (clf(to_model_range(out.images.float())).argmax(-1) == torch.tensor(labels)).float().mean().item()
    assert acc > 0.8  # chance is 0.1; the committed model scores 1.0 on 100 samples at 20 steps


def _probes(pipe, n_steps: int):
    fp = pipe.transformer
    probes = []

    def grab(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]  # DiTPipeline passes the latents positionally
        probes.append((x.clone(), kwargs["timestep"].clone(), kwargs["class_labels"].clone()))

    h = fp.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(class_labels=list(range(NUM_CLASSES)), num_inference_steps=n_steps, guidance_scale=3.0,
             generator=torch.Generator().manual_seed(99), output_type="pt")
    finally:
        h.remove()
    return probes


def test_lrq_beats_round_to_nearest_and_hadamard_only_at_w4a4(pipe):
    steps = 10
    probes = _probes(pipe, steps)
    fp = pipe.transformer
    with torch.no_grad():
        refs = [fp(hidden_states=x, timestep=t, class_labels=y).sample for x, t, y in probes]
    calib = list(range(NUM_CLASSES))
    errors = {}
    methods = {
        "rtn": dict(weight_quantizer="uniform", rotation="none", smooth_alpha=None, shift=False),
        "hadamard": dict(weight_quantizer="uniform", rotation="hadamard", smooth_alpha=None, shift=False),
        "lrq": dict(),
    }
    try:
        for name, kw in methods.items():
            pipe.transformer = copy.deepcopy(fp)
            lrq.quantize_pipeline(pipe, lrq.LRQDiTConfig(weight_bits=4, act_bits=4, **kw), calib,
                                  num_inference_steps=steps, batch_size=NUM_CLASSES, seed=7, progress=False,
                                  guidance_scale=3.0)
            with torch.no_grad():
                num = sum((pipe.transformer(hidden_states=x, timestep=t, class_labels=y).sample - r).pow(2).sum()
                          for (x, t, y), r in zip(probes, refs))
            errors[name] = (num / sum(r.pow(2).sum() for r in refs)).item()
    finally:
        pipe.transformer = fp
    assert errors["lrq"] < errors["rtn"], errors
    assert errors["lrq"] < errors["hadamard"], errors
