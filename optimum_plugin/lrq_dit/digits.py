"""The reference model LRQ-DiT is measured on: scikit-learn's handwritten digits, a DiT trained on them, a classifier.

No DiT weights can be downloaded here, so ``examples/train_digits_dit.py`` trains one: a class-conditional
:class:`diffusers.DiTTransformer2DModel` in the latent space of a small :class:`diffusers.AutoencoderKL`, packed
as a :class:`diffusers.DiTPipeline`, plus a small CNN classifier on the same images. This module holds what the
training script, the benchmark and the tests share: the data, the classifier architecture, the Frechet distance
and the loaders of the committed checkpoint (``examples/assets/digits_dit``).

Images: the 8x8 digits (values 0..16) upsampled bilinearly to 16x16 and mapped to ``[-1, 1]``;
shape ``(N, 1, 16, 16)`` float32. The DiTPipeline returns images in ``[0, 1]``; :func:`to_model_range` maps them back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "DigitsClassifier",
    "assets_dir",
    "digits_pipeline_path",
    "frechet_distance",
    "load_classifier",
    "load_digits_images",
    "to_model_range",
]

logger = logging.getLogger(__name__)

IMAGE_SIZE = 16
NUM_CLASSES = 10
# Fixed split: the DiT, the VAE and the classifier train on `train`; the benchmark's reference features use `test`.
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def assets_dir() -> Path:
    """``examples/assets`` of this checkout (the committed checkpoint lives there)."""
    return Path(__file__).resolve().parents[2] / "examples" / "assets"


def digits_pipeline_path() -> Path:
    """Folder of the committed :class:`diffusers.DiTPipeline` (``examples/assets/digits_dit``).

    Raises:
        FileNotFoundError: when the assets are missing; ``python examples/train_digits_dit.py`` recreates them.
    """
    p = assets_dir() / "digits_dit"
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no trained digits DiT at {p}: run `python examples/train_digits_dit.py` (about 10 minutes on 2 cores)"
        )
    return p


def load_digits_images(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as ``(images (N, 1, 16, 16) float32 in [-1, 1], labels (N,) int64)``.

    Args:
        split: ``"train"`` (80 %, stratified, fixed seed), ``"test"`` (the other 20 %) or ``"all"``.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split={split!r}: expected 'train', 'test' or 'all'")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1) * 2 - 1
    y = torch.from_numpy(d.target.astype(np.int64))
    if split == "all":
        return x, y
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=d.target)
    sel = torch.from_numpy(np.sort(tr if split == "train" else te))
    return x[sel], y[sel]


def to_model_range(images01: torch.Tensor) -> torch.Tensor:
    """Pipeline output ``(N, 1, H, W)`` in ``[0, 1]`` -> classifier input range ``[-1, 1]``."""
    return images01 * 2 - 1


class DigitsClassifier(nn.Module):
    """A small CNN: ``(N, 1, 16, 16)`` in ``[-1, 1]`` -> logits ``(N, 10)``.

    ``features(x)`` returns the ``(N, feature_dim)`` penultimate activations (before the ReLU) in which the
    benchmark's Frechet distance is measured, as FID does with Inception features.
    """

    def __init__(self, feature_dim: int = 32) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, feature_dim)
        self.fc2 = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc1(h.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.features(x)))


def load_classifier(path: Path | None = None) -> DigitsClassifier:
    """The committed classifier (``examples/assets/digits_classifier``), in eval mode."""
    from safetensors.torch import load_file

    p = Path(path) if path is not None else assets_dir() / "digits_classifier"
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no classifier at {p}: run `python examples/train_digits_dit.py`")
    cfg = json.loads(cfg_file.read_text())
    model = DigitsClassifier(feature_dim=int(cfg["feature_dim"]))
    model.load_state_dict(load_file(str(p / "model.safetensors")))
    return model.eval()


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Squared Frechet distance between Gaussians fitted to two feature sets (the FID formula and convention).

    ``d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` with ``S`` the unbiased covariances;
    like FID, the squared distance ``d^2`` is returned.
    The matrix square root is taken as ``S_a^{1/2} S_b S_a^{1/2}`` (symmetric PSD, same trace), by
    eigendecomposition in float64, so the result is real and non-negative.

    Args:
        feats_a, feats_b: ``(N_a, d)`` and ``(N_b, d)`` with ``N >= 2``.
    """
    a = feats_a.detach().to(torch.float64)
    b = feats_b.detach().to(torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(
            f"feature sets must be (N, d) with N >= 2 and equal d, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)

    def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    ra = _sqrtm_psd(sa)
    cross = _sqrtm_psd(ra @ sb @ ra)
    d2 = (mu_a - mu_b).pow(2).sum() + torch.trace(sa) + torch.trace(sb) - 2 * torch.trace(cross)
    return float(max(d2.item(), 0.0))
