"""The digits teacher, the digits metric network, their deterministic builds and the disk cache."""

import os
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from srdit import cache
from srdit.data import load_digits_split
from srdit.encoders import DigitsMetricNet, DigitsTeacher, Teacher, load_teacher
from srdit.encoders import digits as E


@pytest.fixture(scope="module")
def cache_a(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("cache_a")
    mp.setenv(cache.ENV_VAR, str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def teacher(cache_a):
    t0 = time.perf_counter()
    t = load_teacher("digits-cnn")
    print(f"\nteacher build+load: {time.perf_counter() - t0:.1f}s, held-out acc {t.meta['test_accuracy']:.4f}")
    return t


@pytest.fixture(scope="module")
def metric_net(cache_a):
    t0 = time.perf_counter()
    m = E.load_digits_metric_net()
    print(f"\nmetric net build+load: {time.perf_counter() - t0:.1f}s, held-out acc {m.meta['test_accuracy']:.4f}")
    return m


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


def test_teacher_interface_and_shapes(teacher, split):
    assert isinstance(teacher, Teacher) and isinstance(teacher, DigitsTeacher) and teacher.dim == 64
    x = split.test_x[:5]
    for grid in (8, 4, 2, 16):
        patches, cls = teacher(x, grid)
        assert patches.shape == (5, grid * grid, 64) and cls.shape == (5, 64)
        assert torch.isfinite(patches).all() and torch.isfinite(cls).all()
    # Tokens are layer-normalised (like DINOv2's x_norm_* outputs): ~zero mean, unit variance per token.
    patches, cls = teacher(x, 8)
    assert patches.mean(-1).abs().max() < 0.2 and (patches.std(-1) - 1).abs().max() < 0.3


def test_teacher_tokens_follow_the_model_patch_grid(teacher, split):
    x = split.test_x[:3]
    fmap = teacher.feature_map(x)  # [B, 64, 8, 8]
    p8, _ = teacher(x, 8)
    # Token r*8+c is image position (r, c): row-major, like the DiT's patch sequence.
    r, c = 2, 5
    assert torch.allclose(p8[:, r * 8 + c], teacher.norm(fmap[:, :, r, c]), atol=1e-5)
    p4, _ = teacher(x, 4)  # patch size 2: each token pools its 2x2 pixels
    pooled = fmap[:, :, 2 * 1 : 2 * 1 + 2, 2 * 3 : 2 * 3 + 2].mean(dim=(2, 3))
    assert torch.allclose(p4[:, 1 * 4 + 3], teacher.norm(pooled), atol=1e-5)
    # 16x16 images (digits upsampled for patch size 2) are area-resampled to the teacher's 8x8 input.
    up = F.interpolate(x, size=(16, 16), mode="nearest")
    assert torch.allclose(teacher(up, 8)[0], p8, atol=1e-5)


def test_teacher_is_frozen(teacher, split):
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = split.test_x[:4].clone().requires_grad_(True)
    patches, cls = teacher(x, 8)
    assert not patches.requires_grad and not cls.requires_grad
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher(split.test_x, 4)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_teacher_class_token_is_discriminative(teacher, split):
    assert teacher.meta["test_accuracy"] > 0.9
    # Nearest class centroid on class tokens, fitted on train, scored on held-out: a property of the features
    # themselves, not of the classification head.
    _, tr = teacher(split.train_x, 8)
    _, te = teacher(split.test_x, 8)
    centroids = torch.stack([tr[split.train_y == c].mean(0) for c in range(10)])
    acc = (torch.cdist(te, centroids).argmin(1) == split.test_y).float().mean()
    assert acc > 0.85


def test_load_teacher_names(teacher):
    with pytest.raises(FileNotFoundError, match="is not a folder.*hubconf|dinov2_vitb14_pretrain.pth"):
        load_teacher("dinov2_vitb14", "/nonexistent")
    with pytest.raises(ValueError, match="digits-cnn"):
        load_teacher("resnet50")


def test_metric_net_accuracy_and_features(metric_net, teacher, split):
    assert isinstance(metric_net, DigitsMetricNet)
    acc = (metric_net.logits(split.test_x).argmax(1) == split.test_y).float().mean().item()
    assert acc > 0.95
    assert abs(acc - metric_net.meta["test_accuracy"]) < 1e-6
    f = metric_net.features(split.train_x)
    assert f.shape == (len(split.train_x), 64) and not f.requires_grad
    # Normalised on the train split: centred, mean per-dimension variance 1.
    assert f.mean(0).abs().max() < 1e-3 and abs(f.var(0).mean().item() - 1) < 1e-3
    # It is not the teacher: another architecture, seed and parameter set.
    assert E.METRIC_SETTINGS["seed"] != E.TEACHER_SETTINGS["seed"]
    assert set(metric_net.state_dict()) != set(teacher.state_dict())


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_builds_are_deterministic_and_cached(cache_a, teacher, metric_net, tmp_path, monkeypatch):
    rng_before = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))  # a fresh cache: both networks are rebuilt from scratch
    t0 = time.perf_counter()
    t2 = E.load_digits_teacher()
    t_teacher = time.perf_counter() - t0
    m2 = E.load_digits_metric_net()
    print(f"\nfresh builds: teacher {t_teacher:.1f}s, metric net {time.perf_counter() - t0 - t_teacher:.1f}s")
    assert _same_weights(t2.state_dict(), teacher.state_dict())
    assert _same_weights(m2.state_dict(), metric_net.state_dict())
    # Building leaves the caller's global RNG stream and thread count alone.
    assert torch.equal(torch.random.get_rng_state(), rng_before) and torch.get_num_threads() == threads

    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("digits-metric-") and files[1].startswith("digits-teacher-")
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    path = tmp_path / files[1]
    mtime = os.stat(path).st_mtime_ns
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent rebuild-on-unreadable would hide a broken reload path
        t3 = E.load_digits_teacher()  # reload path: read, not rebuilt
    assert time.perf_counter() - t0 < 1.0 and os.stat(path).st_mtime_ns == mtime
    assert _same_weights(t3.state_dict(), teacher.state_dict())
    assert t3.meta["build_seconds"] == t2.meta["build_seconds"]


def test_cache_key_and_corrupt_entry(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "c"))
    k = cache.cache_key("src", {"a": 1, "b": 2})
    assert len(k) == 16 and k == cache.cache_key(["src"], {"b": 2, "a": 1})
    assert k != cache.cache_key("src2", {"a": 1, "b": 2}) and k != cache.cache_key("src", {"a": 1, "b": 3})
    calls = []

    def build():
        calls.append(1)
        return {"w": torch.arange(3.0), "meta": {"n": len(calls)}}

    assert cache.cached("thing", k, build)["meta"]["n"] == 1
    assert cache.cached("thing", k, build)["meta"]["n"] == 1 and len(calls) == 1  # served from disk
    cache.cache_path("thing", k).write_bytes(b"truncated garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.cached("thing", k, build)["meta"]["n"] == 2  # unreadable entry: rebuilt and replaced
    assert torch.equal(cache.load(cache.cache_path("thing", k))["w"], torch.arange(3.0))
