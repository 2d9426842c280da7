"""Sample-quality metrics: FD, KD, precision / recall over features of a frozen network."""

from __future__ import annotations

from torch import Tensor

from srdit.encoders.digits import load_digits_metric_net
from srdit.metrics.distances import compute_metrics, frechet_distance, kernel_distance, precision_recall
from srdit.metrics.features import Extractor, extract_features


def evaluate_images(
    fake_images: Tensor,
    real_images: Tensor,
    extractor: Extractor,
    *,
    batch_size: int = 512,
    kd_subsets: int = 100,
    kd_subset_size: int = 1000,
    k: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """`compute_metrics` on the extractor's features of generated vs real images (both in [-1, 1])."""
    real = extract_features(real_images, extractor, batch_size)
    fake = extract_features(fake_images, extractor, batch_size)
    return compute_metrics(real, fake, kd_subsets=kd_subsets, kd_subset_size=kd_subset_size, k=k, seed=seed)


__all__ = [
    "compute_metrics",
    "evaluate_images",
    "extract_features",
    "frechet_distance",
    "kernel_distance",
    "load_digits_metric_net",
    "precision_recall",
]
