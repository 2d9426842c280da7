"""KD_DINOv2 ("KDD"): the kernel distance in DINOv2 ViT-L/14 class-token space, from local weights.

SR-DiT reports KDD next to FID (arXiv:2512.12386: 0.319 at 256 px) without code for it; its log keys match the
dgm-eval toolkit (Stein et al. 2023, arXiv:2306.04675), so this is our best reading of it, and it is labelled as
such in outputs: images bicubic-resized to 224 px, ImageNet-normalised, the backbone's class token (`model(x)`,
1024-d for ViT-L/14; DINOv2 interpolates its position table at run time, as dgm-eval runs it), then the unbiased
cubic-polynomial MMD^2 averaged over 100 subsets of 1000 (`srdit.metrics.distances.kernel_distance`).
Equality with the paper's numbers is unverified (the real reference set it used is unknown).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srdit.encoders.dinov2 import IMAGENET_MEAN, IMAGENET_STD, load_dinov2
from srdit.metrics.distances import kernel_distance

LABEL = "KD_DINOv2 (poly3, 100x1000 subsets, ViT-L/14 CLS, 224 bicubic)"
DEFAULT_MODEL = "dinov2_vitl14"


class DinoV2Features(nn.Module):
    """Metric features (`features(images) -> [B, dim]`) for `srdit.metrics.extract_features`; images in [-1, 1]
    (or uint8)."""

    def __init__(self, model: nn.Module, size: int = 224):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.size = int(size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        dev = self.mean.device
        x = images.to(dev).float().div(255.0) if images.dtype == torch.uint8 else (images.to(dev).float() + 1) / 2
        # PIL's bicubic resize (dgm-eval) anti-aliases when shrinking; so does this one.
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return self.model.forward_features(x)["x_norm_clstoken"].float()

    forward = features


def load_kd_extractor(
    path: str | os.PathLike, name: str = DEFAULT_MODEL, device: str | torch.device = "cpu"
) -> DinoV2Features:
    """The KD_DINOv2 feature network from local files (layout as for the teacher, see srdit.encoders.dinov2)."""
    return DinoV2Features(load_dinov2(name, path, "cpu")).to(device)


def kd_dinov2(
    real_features, fake_features, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> dict[str, float]:
    """{"kd_dinov2": mean, "kd_dinov2_std": std over subsets} of precomputed DINOv2 features."""
    mean, std = kernel_distance(
        np.asarray(real_features, dtype=np.float64),
        np.asarray(fake_features, dtype=np.float64),
        subsets,
        subset_size,
        seed,
    )
    return {"kd_dinov2": mean, "kd_dinov2_std": std}
