"""Distribution distances between feature sets: Frechet distance, kernel distance, k-NN precision / recall.

Features are [N, d] arrays or tensors (any float dtype); everything is computed in float64 on the CPU. These
numbers are biased at small N (FD strongly so): compare runs only at a fixed number of samples, which
`compute_metrics` records as `n`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ArrayLike = np.ndarray | Tensor


def _f64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"features must be [N, d], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("features contain NaN or inf")
    return a


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits (unbiased covariances).

    The trace of (S_a S_b)^(1/2) equals the trace of the symmetric PSD matrix (S_a^(1/2) S_b S_a^(1/2))^(1/2), whose
    eigenvalues are real and non-negative: using it avoids sqrtm's complex round-off on near-singular covariances.
    """
    a, b = _f64(feats_a), _f64(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least two samples per set for a covariance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    return float(max(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt, 0.0))


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def cube(k: np.ndarray) -> np.ndarray:
        return k * k * k  # much faster than `** 3`, which goes through pow()

    k_xx = cube(x @ x.T / d + 1.0)
    k_yy = cube(y @ y.T / d + 1.0)
    k_xy = cube(x @ y.T / d + 1.0)
    m, n = len(x), len(y)
    # Unbiased: drop the diagonal (self-similarity) terms of the within-set sums.
    s_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    s_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(s_xx + s_yy - 2.0 * k_xy.mean())


def kernel_distance(
    real: ArrayLike, fake: ArrayLike, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3 (KID; Binkowski et al. 2018),
    averaged over `subsets` random subsets of `subset_size` per set (capped at the smaller set's size), drawn
    without replacement with a generator seeded by `seed`. Returns (mean, std over subsets)."""
    x, y = _f64(real), _f64(fake)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature widths differ: {x.shape[1]} vs {y.shape[1]}")
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError("need at least two samples per set for the unbiased kernel distance")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if size == len(x) == len(y):
        return _poly_mmd2_unbiased(x, y), 0.0  # every "subset" would be the whole of both sets
    rng = np.random.default_rng(seed)
    vals = np.array(
        [
            _poly_mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
            for _ in range(subsets)
        ]
    )
    return float(vals.mean()), float(vals.std())


def _kth_radii(x: Tensor, k: int, chunk: int) -> Tensor:
    # Distance to the k-th nearest other sample: index k of the sorted row, index 0 being the sample itself.
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i : i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(queries: Tensor, support: Tensor, radii: Tensor, chunk: int) -> float:
    # Fraction of queries inside the union of the support's k-NN balls.
    inside = []
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i : i + chunk], support)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision / recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls reaching
    each sample's k-th nearest neighbour. Precision = share of fake samples on the real manifold (fidelity);
    recall = share of real samples on the fake manifold (coverage)."""
    x = torch.from_numpy(_f64(real))
    y = torch.from_numpy(_f64(fake))
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature widths differ: {x.shape[1]} vs {y.shape[1]}")
    if min(len(x), len(y)) <= k:
        raise ValueError(f"need more than k={k} samples per set, got {len(x)} real and {len(y)} fake")
    precision = _coverage(y, x, _kth_radii(x, k, chunk), chunk)
    recall = _coverage(x, y, _kth_radii(y, k, chunk), chunk)
    return precision, recall


def compute_metrics(
    real_feats: ArrayLike,
    fake_feats: ArrayLike,
    *,
    kd_subsets: int = 100,
    kd_subset_size: int = 1000,
    k: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """All distances between real and generated features: fd, kd, kd_std, precision, recall, and n (the number
    of generated samples, to compare runs only at equal n)."""
    kd, kd_std = kernel_distance(real_feats, fake_feats, kd_subsets, kd_subset_size, seed)
    precision, recall = precision_recall(real_feats, fake_feats, k)
    return {
        "fd": frechet_distance(real_feats, fake_feats),
        "kd": kd,
        "kd_std": kd_std,
        "precision": precision,
        "recall": recall,
        "n": int(len(fake_feats)),
    }
