"""The ImageNet data path on a generated image folder: folder scan, ADM center crop, resumable deterministic
preprocessing into latent shards (byte-identical after an interruption), integrity check, and the latent stream's
exact resume."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from srdit.commands.preprocess import main
from srdit.data import latents as store
from srdit.data.imagenet import center_crop_adm, load_crop, scan_image_folder
from srdit.data.latents import LatentDataset, LatentStream, verify
from srdit.data.preprocess import preprocess
from srdit.encoders.invae import InvaeAutoencoder, InvaeConfig, load_invae, save_invae

RES = 32  # crop side; the tiny INVAE (f16) gives 32 x 2 x 2 latents


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """3 classes, 11 images of assorted sizes and formats (PNG, JPEG, one grayscale, one RGBA, one nested)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = [
        (40, 32),
        (32, 70),
        (90, 64),
        (33, 33),
        (128, 50),
        (36, 48),
        (64, 64),
        (50, 41),
        (75, 32),
        (32, 32),
        (48, 96),
    ]
    for i, (w, h) in enumerate(sizes):
        cls = ["n01_tench", "n02_goldfish", "n03_shark"][i % 3]
        d = root / cls / ("sub" if i == 10 else "")
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        if i == 4:
            img = img.convert("L")
        if i == 5:
            img = img.convert("RGBA")
        ext = ".JPEG" if i % 4 == 1 and img.mode != "RGBA" else ".png"
        img.save(d / f"img_{i:02d}{ext}")
    (root / "n01_tench" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("invae")
    save_invae(InvaeAutoencoder(InvaeConfig(ch=8, num_res_blocks=1, norm_groups=4)), folder)
    return load_invae(folder)


def _run(image_dir, out, tokenizer, **kw):
    kw = {"resolution": RES, "shard_size": 4, "batch_size": 3, "seed": 7, "keep_images": True, "workers": 2, **kw}
    return preprocess(image_dir, out, tokenizer, **kw)


def _shard_bytes(root):
    return {p.name: p.read_bytes() for p in sorted((root / "shards").iterdir())}


@pytest.fixture(scope="module")
def reference(image_dir, tokenizer, tmp_path_factory):
    """One uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "latents"
    index = _run(image_dir, out, tokenizer)
    return out, index


# ------------------------------------------------------------------------------------------------------------


def test_scan_is_sorted_and_labelled(image_dir):
    f = scan_image_folder(image_dir)
    assert f.classes == ("n01_tench", "n02_goldfish", "n03_shark")
    assert len(f) == 11 and f.class_counts() == [4, 4, 3]
    assert list(f.labels) == sorted(f.labels)  # grouped by class
    assert "n02_goldfish/sub/img_10.png" in f.files and not any(x.endswith(".txt") for x in f.files)
    assert f.files == tuple(sorted(f.files))
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        scan_image_folder(image_dir / "missing")
    with pytest.raises(ValueError, match="no class sub-folders"):
        scan_image_folder(image_dir / "n03_shark")  # images only, no class folders


def test_adm_center_crop():
    # Already at size: unchanged.
    arr = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(center_crop_adm(Image.fromarray(arr), 16), arr)
    # Wide image of three vertical colour bands: the short side is resized to the target and the central square
    # (the middle band) is kept.
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:40] = (0, 255, 0)
    wide[:, 40:] = (0, 0, 255)
    crop = center_crop_adm(Image.fromarray(wide), 10)
    assert crop.shape == (10, 10, 3)
    assert (crop[..., 1] > 200).all() and (crop[..., 0] < 60).all() and (crop[..., 2] < 60).all()
    # Tall and large (box halvings first): a 4x nearest-upsampled image comes back to the original's centre.
    small = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    big = np.repeat(np.repeat(small, 4, 0), 4, 1)  # 32 x 32
    tall = np.concatenate([np.zeros((32, 32, 3), np.uint8), big, np.zeros((32, 32, 3), np.uint8)])  # 96 x 32
    assert np.array_equal(center_crop_adm(Image.fromarray(tall), 8), small)
    # Gray and RGBA inputs become RGB, channels first from load_crop.
    assert center_crop_adm(Image.fromarray(small[..., 0]), 8).shape == (8, 8, 3)


def test_preprocess_writes_index_and_shards(reference, image_dir, tokenizer):
    out, index = reference
    assert index is not None and (out / "index.json").is_file()
    assert index["num_images"] == 11 and len(index["shards"]) == 3  # 4 + 4 + 3
    assert index["classes"] == ["n01_tench", "n02_goldfish", "n03_shark"] and index["class_counts"] == [4, 4, 3]
    assert index["latent_shape"] == [32, 2, 2] and index["image_shape"] == [3, RES, RES]
    assert index["tokenizer"]["scale"] == pytest.approx(0.3099) and index["tokenizer"]["name"] == "invae"
    assert verify(out) == []
    data = LatentDataset(out)
    folder = scan_image_folder(image_dir)
    assert np.array_equal(data.labels, folder.labels)
    assert (out / "files.txt").read_text().splitlines() == list(folder.files)
    # Row i holds image i: its ADM crop, and one posterior sample seeded by (seed, i) alone.
    lat, lab, img = data.get([5, 0])
    assert np.array_equal(img[0], load_crop(folder.path(5), RES))
    from srdit.data.imagenet import to_unit_range
    from srdit.data.preprocess import posterior_noise

    x = to_unit_range(img[:1])
    z = tokenizer.encode(x, noise=posterior_noise([5], (32, 2, 2), seed=7))
    np.testing.assert_allclose(lat[0], z[0].numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(lat[0], tokenizer.encode(x, sample=False)[0].numpy())  # a sample, not the mean


def test_interrupted_run_resumes_to_identical_shards(reference, image_dir, tokenizer, tmp_path):
    ref_out, ref_index = reference
    out = tmp_path / "latents"

    class Stop(Exception):
        pass

    def stop_after_first(k):
        if k == 0:
            raise Stop

    with pytest.raises(Stop):
        _run(image_dir, out, tokenizer, on_shard=stop_after_first)
    assert not (out / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        LatentDataset(out)
    # A second crash while shard 1 was half written: its files exist, its manifest does not; a stale temp file.
    lat1 = store.shard_file(ref_out, "latents", 1)
    shutil.copy(lat1, store.shard_file(out, "latents", 1))
    (out / "shards" / ".latents-00002.npy.abc.tmp").write_bytes(b"partial")
    done = []
    index = _run(image_dir, out, tokenizer, on_shard=done.append)
    assert done == [1, 2]  # the verified shard 0 is skipped
    assert _shard_bytes(out) == _shard_bytes(ref_out)
    assert index["shards"] == ref_index["shards"]
    # Nothing left to do on a complete folder.
    again = []
    _run(image_dir, out, tokenizer, on_shard=again.append)
    assert again == []


def test_corruption_is_detected_and_repaired(reference, image_dir, tokenizer, tmp_path, capsys):
    ref_out, _ = reference
    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    assert main(["--verify", str(out)]) == 0
    assert "ok, 11 images in 3 shards" in capsys.readouterr().out
    p = store.shard_file(out, "latents", 2)
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF  # same size, different content: only the checksum notices
    p.write_bytes(bytes(raw))
    assert main(["--verify", str(out), "--quick"]) == 0
    assert main(["--verify", str(out)]) == 1
    assert "shard 2: latents-00002.npy checksum mismatch" in capsys.readouterr().err
    done = []
    _run(image_dir, out, tokenizer, on_shard=done.append)
    assert done == [2] and verify(out) == [] and _shard_bytes(out) == _shard_bytes(ref_out)


def test_settings_guard_and_cli_errors(reference, image_dir, tokenizer, tmp_path, capsys):
    ref_out, _ = reference
    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    with pytest.raises(ValueError, match=r"other settings \(differs in: seed\)"):
        _run(image_dir, out, tokenizer, seed=8)
    with pytest.raises(ValueError, match=r"other settings \(differs in: batch_size\)"):
        _run(image_dir, out, tokenizer, batch_size=5)  # it decides the bytes (kernels round per batch shape)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a latent folder"):
        _run(image_dir, tmp_path / "busy", tokenizer)
    assert main([str(image_dir), str(tmp_path / "o"), "--weights", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "e2e-invae-400k.pt" in err
    assert main([str(image_dir), str(tmp_path / "o")]) == 2
    assert main(["--verify", str(tmp_path / "none")]) == 1
    assert "srdit preprocess" in capsys.readouterr().err


def test_parts_write_disjoint_shards(reference, image_dir, tokenizer, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "parts"
    assert _run(image_dir, out, tokenizer, part=(0, 2)) is None  # shards 0 and 2; shard 1 missing
    assert sorted(p.name for p in (out / "shards").glob("shard-*.json")) == ["shard-00000.json", "shard-00002.json"]
    index = _run(image_dir, out, tokenizer, part=(1, 2))  # the last part completes the folder
    assert index is not None and _shard_bytes(out) == _shard_bytes(ref_out)


# ------------------------------------------------------------------------------------------------------------
# The stream
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [0, 2])
def test_stream_resumes_exactly(reference, prefetch):
    out, _ = reference
    data = LatentDataset(out)
    full = LatentStream(out, batch_size=4, seed=3, images=True)
    expected = []
    for _ in range(6):  # 24 draws over 11 images: crosses epoch boundaries
        lat, lab, img = full.next_batch()
        expected.append((lat, lab, img, full.last_indices.clone()))
        ref_lat, ref_lab, ref_img = data.get(full.last_indices.numpy())
        assert lat.dtype == torch.float32 and lab.dtype == torch.int64 and img.dtype == torch.uint8
        assert np.array_equal(lat.numpy(), ref_lat) and np.array_equal(lab.numpy(), ref_lab)
        assert np.array_equal(img.numpy(), ref_img)
    first = LatentStream(out, batch_size=4, seed=3, images=True, prefetch=prefetch)
    for i in range(2):
        lat, lab, img = first.next_batch()
        assert torch.equal(lat, expected[i][0]) and torch.equal(lab, expected[i][1])
    state = first.state_dict()
    first.close()
    buf = io.BytesIO()
    torch.save({"data": state}, buf)  # as inside a training checkpoint, read back with weights_only=True
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["data"]
    resumed = LatentStream(out, batch_size=4, seed=3, images=True, prefetch=prefetch)
    resumed.load_state_dict(state)
    for i in range(2, 6):
        lat, lab, img = resumed.next_batch()
        assert torch.equal(lat, expected[i][0]) and torch.equal(lab, expected[i][1])
        assert torch.equal(img, expected[i][2]) and torch.equal(resumed.last_indices, expected[i][3])
    resumed.close()


def test_stream_guards(reference, tmp_path):
    out, _ = reference
    s = LatentStream(out, batch_size=4, seed=3)
    lat, lab, img = s.next_batch()
    assert img is None and lat.shape == (4, 32, 2, 2)
    with pytest.raises(ValueError, match="other settings|seed"):
        LatentStream(out, batch_size=4, seed=4).load_state_dict(s.state_dict())
    other = {**s.state_dict(), "index": "0" * 16}
    with pytest.raises(ValueError, match="another latent folder"):
        LatentStream(out, batch_size=4, seed=3).load_state_dict(other)
    with pytest.raises(FileNotFoundError, match="srdit preprocess"):
        LatentStream(tmp_path, batch_size=4)


# ------------------------------------------------------------------------------------------------------------
# The ImageNet studies plan (nothing runs)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, trials",
    [
        ("imagenet256_sr_dit_ladder", "trials: 9 (9 cells x 1 seeds [0])"),
        ("imagenet256_factorial", "trials: 64 (64 cells x 1 seeds [0])"),
        ("imagenet256_search", "trials: 48 (search budget)"),
    ],
)
def test_imagenet_studies_plan(name, trials, capsys):
    from pathlib import Path

    from srdit.commands.study import main as study_main
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    path = Path(__file__).resolve().parents[1] / "studies" / f"{name}.yaml"
    assert study_main(["plan", str(path), "--steps-per-s", "1.5"]) == 0
    assert trials in capsys.readouterr().out
    spec = load_study(path)
    plan = plan_study(spec)
    for t in plan.trials:  # every cell is the SR-DiT-B/1 shape on INVAE latents with the DINOv2-B teacher
        m, d = t.config["model"], t.config["data"]
        assert (m["size"], m["patch_size"], m["in_channels"], m["input_size"]) == ("B", 1, 32, 16)
        assert d["dataset"] == "latents" and d["teacher"] == "dinov2_vitb14" and m["reg"]["enabled"]
    if name == "imagenet256_sr_dit_ladder":
        last = plan.trials[-1].config
        assert last["model"]["sprint"]["enabled"] and last["model"]["repa"]["depth"] == 2
        first = plan.trials[0].config["model"]
        assert first["repa"]["depth"] == 4 and not first["rope"]["enabled"] and not first["sprint"]["enabled"]
        assert last["sample"]["balanced_labels"] and last["loss"]["cfm"] == 0.05 and last["transport"]["time_shift"]
        assert last["train"]["steps"] == 400_000 and last["eval"]["n_samples"] == 50_000
        assert last["sample"]["steps"] == 250 and last["sample"]["cfg_scale"] == 1.0
    if name == "imagenet256_factorial":
        assert plan.resolution == 5


def test_trainer_runs_on_latent_shards_and_resumes(reference, tmp_path):
    """The trainer streams preprocessed shards (here 32x2x2 latents, 3 classes) with SPRINT on, and resumes."""
    import dataclasses

    from srdit.config import DataConfig, ModelConfig, RunConfig, SprintConfig, TrainConfig
    from srdit.train import load_checkpoint, train

    root, _ = reference
    cfg = RunConfig(
        model=ModelConfig(
            size="debug",
            patch_size=1,
            in_channels=32,
            input_size=2,
            num_classes=3,
            sprint=SprintConfig(enabled=True, dense_in=2, dense_out=2, drop_ratio=0.5),
        ),
        data=DataConfig(dataset="latents", path=str(root)),
        train=TrainConfig(steps=6, batch_size=4, ckpt_every=3, log_every=1, threads=1),
    )
    losses = {}

    class Rec:
        def report(self, step, metrics):
            if "loss" in metrics:
                losses.setdefault(step, []).append(metrics["loss"])

    result = train(cfg, tmp_path / "run", Rec(), progress=False)
    assert result.status == "finished" and result.step == 6
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["data"]["offset"] >= 0
    again = train(cfg, tmp_path / "run2", Rec(), progress=False)
    assert again.status == "finished"
    assert all(len(set(v)) == 1 for v in losses.values())  # two runs of the same config: identical losses
    bad = dataclasses.replace(
        cfg, model=ModelConfig(size="debug", patch_size=1, in_channels=4, input_size=2, num_classes=3)
    )
    with pytest.raises(ValueError, match="set model.in_channels"):
        train(bad, tmp_path / "bad", progress=False)


@pytest.mark.slow
def test_ray_parts_write_the_single_process_shards(image_dir, tokenizer, tmp_path):
    """`srdit preprocess --ray 2`: two Ray tasks (local Ray, CPU) write the shards and the index of one process.
    Byte-identical at equal torch threads (a Ray task with 1 CPU runs 1 thread; CPU convolutions round differently
    with other thread counts)."""
    import ray

    from srdit.runtime.ray_parts import shutdown_ray

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref_index = _run(image_dir, tmp_path / "one", tokenizer)
    finally:
        torch.set_num_threads(threads)
    ref_out = tmp_path / "one"
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        code = main(
            [
                str(image_dir),
                str(tmp_path / "latents"),
                "--weights",
                str(tokenizer.source),
                "--resolution",
                str(RES),
                "--shard-size",
                "4",
                "--batch-size",
                "3",
                "--seed",
                "7",
                "--keep-images",
                "--workers",
                "1",
                "--ray",
                "2",
                "--no-progress",
            ]
        )
    finally:
        shutdown_ray()
    assert code == 0
    assert _shard_bytes(tmp_path / "latents") == _shard_bytes(ref_out)
    assert store.read_index(tmp_path / "latents")["shards"] == ref_index["shards"]
    assert main([str(image_dir), str(tmp_path / "x"), "--weights", "w", "--ray", "2", "--part", "0/2"]) == 2
