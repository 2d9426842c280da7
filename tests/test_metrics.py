"""FD / KD / precision-recall against independent implementations, and their ordering on digits."""

import time

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from srdit import cache
from srdit.data import load_digits_split
from srdit.metrics import (
    compute_metrics,
    evaluate_images,
    extract_features,
    frechet_distance,
    kernel_distance,
    load_digits_metric_net,
    precision_recall,
)


def _gauss(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features: a non-diagonal covariance
    return (rng.normal(size=(n, d)) @ mix) * scale + shift


def _fd_scipy(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _mmd_naive(x, y):
    d = x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


class _Identity(torch.nn.Module):
    """Feature 'extractor' for torchmetrics that passes precomputed features through."""

    def __init__(self, d):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x


def test_fd_matches_scipy_and_torchmetrics():
    a, b = _gauss(400, 16, 0), _gauss(300, 16, 1, shift=0.3, scale=1.5)
    fd = frechet_distance(a, b)
    assert fd == pytest.approx(_fd_scipy(a, b), rel=1e-6)
    import torchmetrics.image.fid as fid_mod  # a dev dependency: an independent implementation

    tm = fid_mod.FrechetInceptionDistance(feature=_Identity(16))
    tm.update(torch.from_numpy(a), real=True)
    tm.update(torch.from_numpy(b), real=False)
    assert fd == pytest.approx(float(tm.compute()), rel=1e-5)


def test_fd_basic_properties():
    a = _gauss(500, 8, 2)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.arange(8) * 0.1
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-8)
    # torch input, rank-deficient covariance (fewer samples than dims) stays finite and non-negative.
    low = torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    assert 0.0 <= frechet_distance(low, low + 1) < np.inf
    with pytest.raises(ValueError):
        frechet_distance(a, a[:, :4])


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kd_matches_naive_loop_and_torchmetrics():
    x, y = _gauss(25, 6, 3), _gauss(25, 6, 4, shift=0.5)
    mean, std = kernel_distance(x, y, subsets=5, subset_size=25)  # subsets = whole sets: one exact value
    assert mean == pytest.approx(_mmd_naive(x, y), rel=1e-9) and std == 0.0
    import torchmetrics.image.kid as kid_mod

    tm = kid_mod.KernelInceptionDistance(feature=_Identity(6), subsets=1, subset_size=25)
    tm.update(torch.from_numpy(x), real=True)
    tm.update(torch.from_numpy(y), real=False)
    assert mean == pytest.approx(float(tm.compute()[0]), rel=1e-6)
    # subset_size above the sample count is capped: 30 real vs 25 fake -> subsets of 25, drawn without
    # replacement from a generator seeded by `seed`.
    x30 = _gauss(30, 6, 5)
    mean, std = kernel_distance(x30, y, subsets=4, subset_size=1000, seed=3)
    rng = np.random.default_rng(3)
    vals = [_mmd_naive(x30[rng.choice(30, 25, replace=False)], y[rng.choice(25, 25, replace=False)]) for _ in range(4)]
    assert (mean, std) == pytest.approx((np.mean(vals), np.std(vals)), rel=1e-9)


def test_kd_subsets():
    x, y = _gauss(300, 8, 5), _gauss(300, 8, 6, shift=0.4)
    m1, s1 = kernel_distance(x, y, subsets=20, subset_size=100, seed=0)
    m2, s2 = kernel_distance(x, y, subsets=20, subset_size=100, seed=0)
    m3, _ = kernel_distance(x, y, subsets=20, subset_size=100, seed=1)
    assert (m1, s1) == (m2, s2) and m1 != m3 and s1 > 0
    # Subset estimates are unbiased: their mean is close to the full-set value.
    full, _ = kernel_distance(x, y, subsets=1, subset_size=300)
    assert abs(m1 - full) < 3 * s1 / np.sqrt(20) + 1e-3
    same, _ = kernel_distance(x, _gauss(300, 8, 7), subsets=20, subset_size=100)
    assert abs(same) < m1 / 5  # same distribution: ~0 (can be negative), far below the shifted pair


def _pr_naive(real, fake, k):
    def radii(s):
        return np.array([np.sort(np.linalg.norm(s - p, axis=1))[k] for p in s])

    rr, rf = radii(real), radii(fake)
    prec = np.mean([np.any(np.linalg.norm(real - q, axis=1) <= rr) for q in fake])
    rec = np.mean([np.any(np.linalg.norm(fake - q, axis=1) <= rf) for q in real])
    return prec, rec


def test_precision_recall():
    real, fake = _gauss(200, 4, 8), _gauss(150, 4, 9, shift=0.7)
    p, r = precision_recall(real, fake, k=3, chunk=64)  # small chunks exercise the chunked path
    pn, rn = _pr_naive(real, fake, 3)
    assert (p, r) == pytest.approx((pn, rn), abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # Mode collapse: fakes cover only one of two real clusters -> high precision, recall about one half.
    rng = np.random.default_rng(0)
    two = np.concatenate([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 20])
    p, r = precision_recall(two, rng.normal(size=(200, 2)))
    assert p > 0.9 and 0.35 < r < 0.55


def test_compute_metrics_keys():
    out = compute_metrics(_gauss(120, 5, 10), _gauss(100, 5, 11), kd_subsets=10, kd_subset_size=50)
    assert set(out) == {"fd", "kd", "kd_std", "precision", "recall", "n"} and out["n"] == 100
    assert all(np.isfinite(v) for v in out.values())


@pytest.fixture(scope="module")
def metric_net(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv(cache.ENV_VAR, str(tmp_path_factory.mktemp("metric_cache")))
    t0 = time.perf_counter()
    net = load_digits_metric_net()
    print(f"\nmetric net build: {time.perf_counter() - t0:.1f}s, held-out acc {net.meta['test_accuracy']:.4f}")
    yield net
    mp.undo()


def test_digits_ordering_real_blur_noise(metric_net):
    s = load_digits_split()
    n = len(s.test_x)
    g = torch.Generator().manual_seed(0)
    real = s.train_x[torch.randperm(len(s.train_x), generator=g)[:n]]  # real digits not in the reference set
    blur = F.avg_pool2d(F.pad(s.test_x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # 3x3 box blur
    noise = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    t0 = time.perf_counter()
    res = {
        name: evaluate_images(x, s.test_x, metric_net) for name, x in (("real", real), ("blur", blur), ("noise", noise))
    }
    print(f"\n3 evaluations: {time.perf_counter() - t0:.2f}s")
    for name, r in res.items():
        print(name, {k: round(v, 4) for k, v in r.items()})
    assert res["real"]["fd"] * 10 < res["blur"]["fd"] < res["noise"]["fd"]
    assert res["real"]["kd"] < res["blur"]["kd"] and res["real"]["kd"] < res["noise"]["kd"]
    assert res["real"]["precision"] > 0.8 and res["real"]["recall"] > 0.8
    assert res["blur"]["recall"] < 0.3 and res["noise"]["recall"] < 0.3
    # Same numbers from precomputed features (evaluate_images is only feature extraction + compute_metrics).
    f_ref, f_real = extract_features(s.test_x, metric_net, 100), extract_features(real, metric_net, 100)
    assert compute_metrics(f_ref, f_real)["fd"] == pytest.approx(res["real"]["fd"], rel=1e-6)
