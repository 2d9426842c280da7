"""In-project networks for the digits default: the alignment teacher and the (separate) metric network.

No pretrained encoder ships offline, so both are small CNNs trained here on the digits train split in seconds,
deterministically (fixed seeds, CPU, one thread), and cached on disk keyed by this file's source, the data
module's source and their settings (see `srdit.cache`).

- `DigitsTeacher` ("digits-cnn") keeps an 8x8 spatial feature map so it can give REPA one token per model patch,
  and a pooled class token for REG, like DINOv2's patch / class tokens (both layer-normalised, as DINOv2's
  `x_norm_*` outputs are).
- `DigitsMetricNet` is a differently built and seeded classifier whose penultimate layer is the metric feature
  space (the TF-GAN MNIST-FID idea). Grading with the teacher itself would reward a model for matching the very
  features it was aligned to.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srdit import cache
from srdit.data import digits as digits_data

TEACHER_SETTINGS: dict[str, Any] = {
    "kind": "digits-teacher",
    "seed": 1001,
    "widths": [16, 32, 64],
    "epochs": 12,
    "batch_size": 64,
    "lr": 3e-3,
}
METRIC_SETTINGS: dict[str, Any] = {
    "kind": "digits-metric",
    "seed": 2002,
    "widths": [32, 64],
    "hidden": 64,
    "epochs": 20,
    "batch_size": 64,
    "lr": 1e-2,
}


def _as_digit_grid(images: Tensor) -> Tensor:
    """[B, 1, H, W] in [-1, 1] -> [B, 1, 8, 8] (area-resampled if the caller works at another resolution)."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"digits networks expect [B, 1, H, W] images, got {tuple(images.shape)}")
    if images.shape[-2:] != (8, 8):
        images = F.interpolate(images, size=(8, 8), mode="area")
    return images


class DigitsTeacher(nn.Module):
    """Frozen digits CNN with the `Teacher` interface: `teacher(images, grid) -> (patch tokens, class token)`."""

    def __init__(self, widths: list[int] | tuple[int, ...] = (16, 32, 64), num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for i, w in enumerate(widths):
            # Stride 1 keeps the 8x8 map (one cell per pixel); growing dilation widens the receptive field cheaply.
            layers.append(nn.Conv2d(c_in, w, 3, padding=2**i, dilation=2**i))
            if i < len(widths) - 1:
                layers.append(nn.GELU())
            c_in = w
        self.body = nn.Sequential(*layers)
        self.dim = int(widths[-1])
        self.norm = nn.LayerNorm(self.dim)
        self.head = nn.Linear(self.dim, num_classes)

    def feature_map(self, images: Tensor) -> Tensor:
        """[B, dim, 8, 8] pre-normalisation features."""
        return self.body(_as_digit_grid(images))

    def logits(self, images: Tensor) -> Tensor:
        return self.head(self.norm(self.feature_map(images).mean(dim=(2, 3))))

    @torch.no_grad()
    def forward(self, images: Tensor, grid: int) -> tuple[Tensor, Tensor]:
        fmap = self.feature_map(images)
        cls = self.norm(fmap.mean(dim=(2, 3)))
        if grid <= 0:
            raise ValueError(f"grid must be positive, got {grid}")
        if grid < fmap.shape[-1]:
            fmap = F.adaptive_avg_pool2d(fmap, grid)  # one token summarises the pixels its model patch covers
        elif grid > fmap.shape[-1]:
            fmap = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False)
        patches = self.norm(fmap.flatten(2).transpose(1, 2))
        return patches, cls


class DigitsMetricNet(nn.Module):
    """Frozen digits classifier whose (normalised) penultimate layer is the metric feature space."""

    def __init__(self, widths: list[int] | tuple[int, ...] = (32, 64), hidden: int = 64, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, side = 1, 8
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2)]
            c_in, side = w, side // 2
        # Average (not max) pooling: with max pooling, pure noise lands closer to real digits than blurred digits
        # do (noise excites the per-window maxima). SiLU rather than ReLU: no feature is stuck at zero.
        layers += [nn.Flatten(), nn.Linear(c_in * side * side, hidden), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, num_classes)
        self.num_features = int(hidden)
        # Fixed train-split statistics: centred features with unit mean variance keep the cubic KD kernel's inputs
        # O(1). One scalar scale (not a per-dimension std) so the feature geometry is unchanged: per-dimension
        # standardisation would inflate near-constant directions and let noise score closer than blurred digits.
        self.register_buffer("feat_mean", torch.zeros(hidden))
        self.register_buffer("feat_scale", torch.ones(()))

    def logits(self, images: Tensor) -> Tensor:
        return self.head(self.body(_as_digit_grid(images)))

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """[B, num_features] normalised penultimate features of images in [-1, 1]."""
        return (self.body(_as_digit_grid(images)) - self.feat_mean) / self.feat_scale

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)


# ----------------------------------------------------------------------------------------------------------------
# Deterministic build
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _deterministic_cpu(seed: int) -> Iterator[None]:
    """One thread (reduction order independent of the machine's core count), seeded, global RNG restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def _shift_augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Translate each image by up to one pixel (background -1 fills): cheap invariance that lifts accuracy."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (b,), generator=g)
    dx = torch.randint(0, 3, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(8))[:, :, None]  # [B, 8, 1]
    cols = (dx[:, None] + torch.arange(8))[:, None, :]  # [B, 1, 8]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]


def accuracy(model: DigitsTeacher | DigitsMetricNet, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model.logits(x).argmax(1) == y).float().mean())


def _train(model: nn.Module, settings: dict[str, Any], split: digits_data.DigitsSplit) -> dict[str, Any]:
    g = torch.Generator().manual_seed(settings["seed"])
    stream = digits_data.BatchStream(len(split.train_y), settings["batch_size"], seed=settings["seed"])
    steps = settings["epochs"] * len(split.train_y) // settings["batch_size"]
    opt = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings["lr"], total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(steps):
        idx = stream.next_indices()
        loss = F.cross_entropy(model.logits(_shift_augment(split.train_x[idx], g)), split.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return {
        "train_accuracy": accuracy(model, split.train_x, split.train_y),
        "test_accuracy": accuracy(model, split.test_x, split.test_y),
    }


def _cache_key(settings: dict[str, Any]) -> str:
    sources = [Path(__file__).read_text(encoding="utf-8"), Path(digits_data.__file__).read_text(encoding="utf-8")]
    return cache.cache_key(sources, settings)


def build_digits_teacher(settings: dict[str, Any] = TEACHER_SETTINGS) -> dict[str, Any]:
    """Train the teacher from scratch; returns {"state_dict", "meta"} (what the cache stores)."""
    t0 = time.perf_counter()
    with _deterministic_cpu(settings["seed"]):
        model = DigitsTeacher(settings["widths"])
        meta = _train(model, settings, digits_data.load_digits_split())
    meta.update(settings=dict(settings), build_seconds=time.perf_counter() - t0, torch=str(torch.__version__))
    return {"state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}, "meta": meta}


def build_digits_metric_net(settings: dict[str, Any] = METRIC_SETTINGS) -> dict[str, Any]:
    """Train the metric classifier and fix its feature standardisation on the train split."""
    t0 = time.perf_counter()
    with _deterministic_cpu(settings["seed"]):
        model = DigitsMetricNet(settings["widths"], settings["hidden"])
        split = digits_data.load_digits_split()
        meta = _train(model, settings, split)
        with torch.no_grad():
            h = model.body(split.train_x).double()
            model.feat_mean.copy_(h.mean(0).float())
            model.feat_scale.copy_(h.var(0).mean().sqrt().float())
    meta.update(settings=dict(settings), build_seconds=time.perf_counter() - t0, torch=str(torch.__version__))
    return {"state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}, "meta": meta}


def _restore(cls: type[nn.Module], entry: dict[str, Any], device: str | torch.device, *args: Any) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation must not consume the caller's RNG
        model = cls(*args)
    model.load_state_dict(entry["state_dict"])
    meta = entry["meta"]
    model.eval().requires_grad_(False)
    model.meta = meta  # type: ignore[assignment]  # build record: accuracies, settings, build time
    return model.to(device)


def load_digits_teacher(device: str | torch.device = "cpu") -> DigitsTeacher:
    """The frozen digits teacher (dim 64), from the disk cache, built first if missing."""
    s = TEACHER_SETTINGS
    entry = cache.cached(s["kind"], _cache_key(s), lambda: build_digits_teacher(s))
    return _restore(DigitsTeacher, entry, device, s["widths"])  # type: ignore[return-value]


def load_digits_metric_net(device: str | torch.device = "cpu") -> DigitsMetricNet:
    """The frozen digits metric network (64-d features), from the disk cache, built first if missing."""
    s = METRIC_SETTINGS
    entry = cache.cached(s["kind"], _cache_key(s), lambda: build_digits_metric_net(s))
    return _restore(DigitsMetricNet, entry, device, s["widths"], s["hidden"])  # type: ignore[return-value]
