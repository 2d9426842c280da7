"""FID Inception: state-dict layout of pytorch-fid's weights file, strict local loading, features, IS / FID / reference
files. The real weights are not available here: a randomly initialised network stands in for them."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from torch import nn

from srdit.metrics.distances import frechet_distance, precision_recall
from srdit.metrics.inception import (
    ENV_VAR,
    WEIGHTS_NAME,
    FIDInceptionV3,
    Reference,
    frechet_from_stats,
    imagenet_metrics,
    inception_features,
    inception_score,
    load_inception,
    load_reference,
    metrics_from_features,
    save_reference,
)


def _a(m: str, cin: int, pf: int) -> list[tuple]:
    return [
        (f"{m}.branch1x1", cin, 64, 1, 1),
        (f"{m}.branch5x5_1", cin, 48, 1, 1),
        (f"{m}.branch5x5_2", 48, 64, 5, 5),
        (f"{m}.branch3x3dbl_1", cin, 64, 1, 1),
        (f"{m}.branch3x3dbl_2", 64, 96, 3, 3),
        (f"{m}.branch3x3dbl_3", 96, 96, 3, 3),
        (f"{m}.branch_pool", cin, pf, 1, 1),
    ]


def _c(m: str, cin: int, c: int) -> list[tuple]:
    return [
        (f"{m}.branch1x1", cin, 192, 1, 1),
        (f"{m}.branch7x7_1", cin, c, 1, 1),
        (f"{m}.branch7x7_2", c, c, 1, 7),
        (f"{m}.branch7x7_3", c, 192, 7, 1),
        (f"{m}.branch7x7dbl_1", cin, c, 1, 1),
        (f"{m}.branch7x7dbl_2", c, c, 7, 1),
        (f"{m}.branch7x7dbl_3", c, c, 1, 7),
        (f"{m}.branch7x7dbl_4", c, c, 7, 1),
        (f"{m}.branch7x7dbl_5", c, 192, 1, 7),
        (f"{m}.branch_pool", cin, 192, 1, 1),
    ]


def _e(m: str, cin: int) -> list[tuple]:
    return [
        (f"{m}.branch1x1", cin, 320, 1, 1),
        (f"{m}.branch3x3_1", cin, 384, 1, 1),
        (f"{m}.branch3x3_2a", 384, 384, 1, 3),
        (f"{m}.branch3x3_2b", 384, 384, 3, 1),
        (f"{m}.branch3x3dbl_1", cin, 448, 1, 1),
        (f"{m}.branch3x3dbl_2", 448, 384, 3, 3),
        (f"{m}.branch3x3dbl_3a", 384, 384, 1, 3),
        (f"{m}.branch3x3dbl_3b", 384, 384, 3, 1),
        (f"{m}.branch_pool", cin, 192, 1, 1),
    ]


# By hand from torchvision's Inception3 / pytorch-fid's FID blocks: (unit, in, out, kh, kw) of the 94 conv+BN units.
CONVS = (
    [
        ("Conv2d_1a_3x3", 3, 32, 3, 3),
        ("Conv2d_2a_3x3", 32, 32, 3, 3),
        ("Conv2d_2b_3x3", 32, 64, 3, 3),
        ("Conv2d_3b_1x1", 64, 80, 1, 1),
        ("Conv2d_4a_3x3", 80, 192, 3, 3),
    ]
    + _a("Mixed_5b", 192, 32)
    + _a("Mixed_5c", 256, 64)
    + _a("Mixed_5d", 288, 64)
    + [
        ("Mixed_6a.branch3x3", 288, 384, 3, 3),
        ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
        ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3),
        ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    ]
    + _c("Mixed_6b", 768, 128)
    + _c("Mixed_6c", 768, 160)
    + _c("Mixed_6d", 768, 160)
    + _c("Mixed_6e", 768, 192)
    + [
        ("Mixed_7a.branch3x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
        ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
        ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
        ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    ]
    + _e("Mixed_7b", 1280)
    + _e("Mixed_7c", 2048)
)
EXPECTED_SHAPES = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
for _unit, _cin, _cout, _kh, _kw in CONVS:
    EXPECTED_SHAPES[f"{_unit}.conv.weight"] = (_cout, _cin, _kh, _kw)  # conv without bias
    for _p in ("weight", "bias", "running_mean", "running_var"):
        EXPECTED_SHAPES[f"{_unit}.bn.{_p}"] = (_cout,)
# Parameters: conv weights + BatchNorm gamma, beta + fc. Cross-check: torchvision's inception_v3 (1000 classes,
# with AuxLogits) has 27,161,264; its aux head has conv0 768*128+256, conv1 128*768*25+1536, fc 768*1000+1000 =
# 3,326,696, and its fc 2,049,000 where ours has 2048*1008+1008 = 2,065,392.
N_PARAMS = 23_850_960
assert len(CONVS) == 94 and len(EXPECTED_SHAPES) == 94 * 5 + 2
assert sum(ci * co * kh * kw + 2 * co for _, ci, co, kh, kw in CONVS) + 2048 * 1008 + 1008 == N_PARAMS
assert N_PARAMS == 27_161_264 - 3_326_696 - 2_049_000 + 2_065_392


def _random_net() -> FIDInceptionV3:
    """Random weights that keep activations O(1) through 94 layers (PyTorch's default init shrinks them to ~1e-8)."""
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    nn.init.normal_(net.fc.weight, std=0.05)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def net() -> FIDInceptionV3:
    torch.manual_seed(1)
    return _random_net()


@pytest.fixture(scope="module")
def weights(net: FIDInceptionV3, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return path


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_state_dict_layout_matches_pytorch_fid(net: FIDInceptionV3):
    assert sum(p.numel() for p in net.parameters()) == N_PARAMS
    sd = net.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert got == EXPECTED_SHAPES
    assert {k for k in sd if k.endswith("num_batches_tracked")} == {f"{u[0]}.bn.num_batches_tracked" for u in CONVS}
    for k, shape in {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
        "fc.weight": (1008, 2048),
    }.items():
        assert got[k] == shape, k
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))
    assert all(m.eps == 0.001 for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_tf_pooling_variants(net: FIDInceptionV3):
    # A constant input stays constant through TF's average pool, which ignores the zero padding; with the padding
    # counted (torchvision's default) the border of the pool branch would differ from the inside.
    with torch.inference_mode():
        for block, cin in ((net.Mixed_5b, 192), (net.Mixed_6b, 768), (net.Mixed_7b, 1280)):
            pooled = block.branches(torch.full((1, cin, 6, 6), 0.7))[-1]
            torch.testing.assert_close(pooled, pooled[:, :, 2:3, 2:3].expand_as(pooled))
        x = torch.randn(1, 2048, 5, 5)
        expect = net.Mixed_7c.branch_pool(torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1))
        torch.testing.assert_close(net.Mixed_7c.branches(x)[-1], expect)  # Mixed_7c: max pool, as the TF graph
        assert not torch.allclose(
            net.Mixed_7b.branches(x[:, :1280])[-1],
            net.Mixed_7b.branch_pool(torch.nn.functional.max_pool2d(x[:, :1280], 3, 1, 1)),
        )


def test_strict_round_trip(net: FIDInceptionV3, weights):
    loaded = load_inception(weights)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = _images(2, 32, 0)
    with torch.inference_mode():
        a, b = net(x), loaded(x)
    for k in ("pool", "spatial", "logits"):
        assert torch.equal(a[k], b[k]), k


def test_file_without_batch_counters_and_env_var(net: FIDInceptionV3, tmp_path, monkeypatch):
    # The real file has no num_batches_tracked entries (saved before PyTorch had them); a plain dict has no
    # _metadata version either, as with a file saved by an old PyTorch.
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "weights_dir" / WEIGHTS_NAME
    path.parent.mkdir()
    torch.save(sd, path)
    monkeypatch.setenv(ENV_VAR, str(path.parent))  # a folder holding the file is accepted too
    loaded = load_inception()
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_missing_file_says_how_to_provide_it(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / WEIGHTS_NAME
    with pytest.raises(FileNotFoundError) as err:
        load_inception(missing)
    msg = str(err.value)
    assert str(missing) in msg and ENV_VAR in msg and WEIGHTS_NAME in msg and "github.com/mseitzer/pytorch-fid" in msg
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=ENV_VAR):
        load_inception(None)


def test_wrong_state_dicts_raise_value_error(net: FIDInceptionV3, tmp_path):
    sd = dict(net.state_dict())
    renamed = {
        ("Mixed_7c.pool_proj.conv.weight" if k == "Mixed_7c.branch_pool.conv.weight" else k): v for k, v in sd.items()
    }
    cases = {
        "renamed": (renamed, ["Mixed_7c.branch_pool.conv.weight", "Mixed_7c.pool_proj.conv.weight"]),
        "aux": ({**sd, "AuxLogits.fc.weight": torch.zeros(1000, 768)}, ["AuxLogits.fc.weight"]),
        "fc1000": ({**sd, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, ["fc.weight"]),
        "prefixed": ({f"module.{k}": v for k, v in sd.items()}, ["module.Conv2d_1a_3x3"]),
    }
    for name, (state, words) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
        with pytest.raises(ValueError) as err:
            load_inception(path)
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg, name
        assert all(w in msg for w in words), (name, msg)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        load_inception(junk)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError):
        load_inception(listed)


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_and_uint8_equals_float(net: FIDInceptionV3, size: int):
    u8 = _images(2, size, size)
    a = inception_features(u8, net)
    b = inception_features(u8.float() / 127.5 - 1.0, net)
    for k, width in (("pool", 2048), ("spatial", 2023), ("logits", 1008)):
        assert a[k].shape == (2, width) and a[k].dtype == np.float64 and np.isfinite(a[k]).all()
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert np.abs(a["pool"][0] - a["pool"][1]).max() > 1e-3  # the two images differ, and so do their features
    assert (a["pool"] >= 0).all() and (a["spatial"] >= 0).all()  # after ReLU


def test_readouts_spatial_from_mixed_6d_branch1x1_in_hwc_order_and_bias_free_logits(net: FIDInceptionV3):
    seen = {}
    handle = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    try:
        with torch.inference_mode():
            out = net(_images(1, 32, 3))
    finally:
        handle.remove()
    x = seen["x"]
    assert x.shape == (1, 192, 17, 17)
    torch.testing.assert_close(out["spatial"], x[:, :7].permute(0, 2, 3, 1).reshape(1, -1))
    assert net.fc.bias.abs().max() > 0  # IS takes softmax(pool @ W), without the bias, as improved-GAN / ADM do
    torch.testing.assert_close(out["logits"], out["pool"] @ net.fc.weight.T)


def _is_scipy(logits: np.ndarray, splits: int) -> tuple[float, float]:
    p = scipy.special.softmax(logits, axis=1)
    n = len(p)
    scores = []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        py = part.mean(0)
        scores.append(np.exp(np.mean([scipy.stats.entropy(row, py) for row in part])))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_scipy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(103, 1008)) * 3.0
    for splits in (1, 4, 10):
        np.testing.assert_allclose(inception_score(logits, splits), _is_scipy(logits, splits), rtol=1e-10, atol=1e-12)
    # One confident class per sample, spread evenly over 10 classes: IS = 10.
    sharp = np.full((50, 1008), -1e4)
    sharp[np.arange(50), np.arange(50) % 10] = 0.0
    mean, std = inception_score(torch.from_numpy(sharp), splits=5)
    assert mean == pytest.approx(10.0) and std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        inception_score(logits[:3], splits=10)


def test_frechet_from_stats_equals_frechet_distance():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20))
    b = rng.normal(size=(200, 20)) @ rng.normal(size=(20, 20)) + 0.5
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    fd = frechet_from_stats(*stats[0], *stats[1])
    assert fd == pytest.approx(frechet_distance(a, b), rel=1e-10)
    assert frechet_from_stats(*stats[0], *stats[0]) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        frechet_from_stats(stats[0][0], stats[0][1], stats[1][0][:5], stats[1][1])


def test_reference_round_trip_and_adm_files(tmp_path):
    rng = np.random.default_rng(2)
    pool, spatial = rng.normal(size=(40, 16)), rng.normal(size=(40, 9))
    ours = save_reference(tmp_path / "ref", pool, spatial)  # no ".npz" appended behind our back
    assert ours == tmp_path / "ref" and ours.is_file()
    ref = load_reference(ours)
    np.testing.assert_allclose(ref.mu, pool.mean(0))
    np.testing.assert_allclose(ref.sigma, np.cov(pool, rowvar=False))
    np.testing.assert_allclose(ref.mu_s, spatial.mean(0))
    np.testing.assert_allclose(ref.sigma_s, np.cov(spatial, rowvar=False))
    np.testing.assert_allclose(ref.pool, pool, rtol=1e-6)
    # ADM's reference batches: images (arr_0) plus the four statistics, no pool features.
    adm = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(
        adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=ref.mu, sigma=ref.sigma, mu_s=ref.mu_s, sigma_s=ref.sigma_s
    )
    r = load_reference(adm)
    assert r.pool is None and np.array_equal(r.sigma_s, ref.sigma_s)
    fid_only = tmp_path / "pytorch_fid_stats.npz"
    np.savez(fid_only, mu=ref.mu, sigma=ref.sigma)
    assert load_reference(fid_only).mu_s is None
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros(3))
    with pytest.raises(ValueError, match="mu"):
        load_reference(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        load_reference(tmp_path / "missing.npz")


def test_imagenet_metrics_end_to_end(net: FIDInceptionV3, tmp_path):
    images = _images(12, 32, 7)
    feats = inception_features(images, net, batch_size=8)  # batches of 8 and 4
    path = save_reference(tmp_path / "ref.npz", feats["pool"], feats["spatial"])

    def numpy_batches():  # channels-last numpy batches, as in samples.npz / ADM's sample files
        for i in range(0, 12, 7):
            yield images[i : i + 7].permute(0, 2, 3, 1).numpy()

    # One call only: each FID on 2048-d statistics costs two eigendecompositions (seconds on 2 cores).
    m = imagenet_metrics(numpy_batches(), path, net, batch_size=6, splits=2)  # batches of 6, 1, 5
    assert set(m) == {"fid", "sfid", "inception_score", "inception_score_std", "precision", "recall", "n"}
    assert all(np.isfinite(v) for v in m.values()) and m["n"] == 12
    ref = load_reference(path)
    assert m["fid"] <= 1e-6 * np.trace(ref.sigma) and m["sfid"] <= 1e-6 * np.trace(ref.sigma_s)
    assert m["precision"] == m["recall"] == 1.0
    # Batch composition changes float32 round-off only.
    assert m["inception_score"] == pytest.approx(inception_score(feats["logits"], 2)[0], rel=1e-6)


def test_metrics_skip_what_the_reference_lacks():
    rng = np.random.default_rng(3)
    pool, spatial, logits = rng.normal(size=(30, 8)), rng.normal(size=(30, 5)), rng.normal(size=(30, 1008))
    real = rng.normal(size=(40, 8)) + 1.0
    feats = {"pool": pool, "spatial": spatial, "logits": logits}
    full = Reference(mu=real.mean(0), sigma=np.cov(real, rowvar=False), mu_s=np.zeros(5), sigma_s=np.eye(5), pool=real)
    m = metrics_from_features(feats, full, splits=3)
    assert m["fid"] == pytest.approx(frechet_distance(real, pool), rel=1e-10)
    assert (m["precision"], m["recall"]) == precision_recall(real, pool, k=3)
    assert (m["inception_score"], m["inception_score_std"]) == inception_score(logits, 3)
    adm = Reference(mu=full.mu, sigma=full.sigma, mu_s=full.mu_s, sigma_s=full.sigma_s)  # no pool features
    assert set(metrics_from_features(feats, adm, splits=3)) == {
        "fid",
        "sfid",
        "inception_score",
        "inception_score_std",
        "n",
    }
    fid_only = Reference(mu=full.mu, sigma=full.sigma)
    assert "sfid" not in metrics_from_features(feats, fid_only, splits=3)
