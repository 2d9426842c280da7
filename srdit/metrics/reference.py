"""`srdit reference`: reference statistics of real images for the ImageNet metrics, from local weights only.

The real images are ADM center crops, read either from an ImageNet-style folder or from the crops a latent folder
stores (`srdit preprocess --keep-images`). A seeded random subset of n images (50K by default, as FID's protocol) is
passed through the FID Inception: the file holds FID's and sFID's Gaussian statistics, a random 10K of the pool
features for precision / recall (ADM's reference batches have 10K images), and with `--dinov2` the DINOv2 ViT-L/14
class tokens for KD_DINOv2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

PR_REFERENCE = 10_000
"Real pool features kept for precision / recall (ADM's evaluator uses 10K reference images)."


def _source(source: str | os.PathLike, resolution: int):
    """(count, read(indices) -> uint8 [B, 3, R, R]) for an image folder or a latent folder with stored crops."""
    root = Path(source)
    if (root / "index.json").is_file():
        from srdit.data.latents import LatentDataset

        data = LatentDataset(root)
        if not data.has_images:
            raise ValueError(
                f"{root}: a latent folder without image crops; rebuild it with --keep-images or pass "
                f"the ImageNet image folder"
            )
        return len(data), lambda idx: data.get(idx)[2]
    from srdit.data.imagenet import load_crop, scan_image_folder

    folder = scan_image_folder(root)
    return len(folder), lambda idx: np.stack([load_crop(folder.path(int(i)), resolution) for i in idx])


def build_reference(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    inception: str | None = None,
    n: int = 50_000,
    resolution: int = 256,
    dinov2: str | None = None,
    seed: int = 0,
    batch_size: int = 100,
    device: str = "auto",
    progress: bool | None = None,
) -> Path:
    """Write the reference statistics of min(n, available) real images to `out` (.npz, atomically)."""
    from srdit.metrics.inception import inception_features, load_inception, save_reference

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    count, read = _source(source, resolution)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(count)[: min(n, count)])  # sorted: sequential reads
    net = load_inception(inception, device)
    extractor = None
    if dinov2:
        from srdit.metrics.dinov2_kd import load_kd_extractor

        extractor = load_kd_extractor(dinov2, device=device)
    dino: list[np.ndarray] = []

    def batches() -> Iterator[torch.Tensor]:
        bar = _bar(progress, len(chosen))
        for i in range(0, len(chosen), batch_size):
            images = torch.from_numpy(np.ascontiguousarray(read(chosen[i : i + batch_size])))
            if extractor is not None:
                dino.append(extractor.features(images).double().cpu().numpy())
            yield images
            if bar is not None:
                bar.update(len(images))
        if bar is not None:
            bar.close()

    feats = inception_features(batches(), net, batch_size)
    keep = rng.permutation(len(chosen))[:PR_REFERENCE]  # a random subset: `chosen` is in class order
    extra = {"dinov2": np.concatenate(dino).astype(np.float32)} if dino else {}
    return save_reference(out, feats["pool"], feats["spatial"], pool_keep=keep, **extra)


def _bar(enabled: bool | None, total: int):
    if not (enabled if enabled is not None else sys.stderr.isatty()):
        return None
    from rich.progress import Progress

    class Bar:
        def __init__(self):
            self.p = Progress(transient=False)
            self.task = self.p.add_task("reference", total=total)
            self.p.start()

        def update(self, k: int) -> None:
            self.p.update(self.task, advance=k)

        def close(self) -> None:
            self.p.stop()

    return Bar()
