"""The teacher cache: built by `srdit cache-teacher` in parts (each part its own files), read by training only,
in the latent stream's prefetch thread."""

import json

import numpy as np
import pytest
import torch
from test_dinov2 import _latent_folder, dino_root  # noqa: F401  (dino_root is a fixture)

from srdit.commands.cache_teacher import main as cache_teacher
from srdit.data import teacher_cache as store
from srdit.data.latents import LatentStream
from srdit.encoders import load_teacher


@pytest.fixture
def latents(tmp_path):
    _latent_folder(tmp_path, images=7, shard_size=3, seed=2)
    return tmp_path / "lat"


def test_parts_built_separately_equal_the_teacher(dino_root, latents, tmp_path, capsys):  # noqa: F811
    root, _ = dino_root
    out = tmp_path / "cache"
    args = [
        str(latents),
        "--teacher",
        "dinov2_vits14",
        "--teacher-path",
        str(root),
        "--out",
        str(out),
        "--grid",
        "2",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    assert cache_teacher(args + ["--part", "1/3"]) == 0
    assert "2 of 3 parts still missing" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="rerun the same `srdit cache-teacher` command"):
        store.TeacherCache(out)  # training refuses an incomplete cache
    for k in (0, 2, 1):  # part 1 again: already done, skipped
        assert cache_teacher(args + ["--part", f"{k}/3"]) == 0
    assert "0 part(s) computed" in capsys.readouterr().out.splitlines()[-1]
    cache = store.TeacherCache(out)
    assert [json.loads((store.part_dir(out, k, 3) / "done.json").read_text())["start"] for k in range(3)] == [0, 2, 4]
    teacher = load_teacher("dinov2_vits14", str(root))
    from srdit.data.latents import LatentDataset

    crops = torch.from_numpy(LatentDataset(latents).get(np.arange(7))[2])
    want_p, want_c = teacher(crops, 2)
    p, c = cache.get([6, 0, 3, 2])
    assert p.dtype == np.float16 and p.shape == (4, 4, 32) and c.shape == (4, 32)
    torch.testing.assert_close(torch.from_numpy(p).float(), want_p[[6, 0, 3, 2]], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(torch.from_numpy(c).float(), want_c[[6, 0, 3, 2]], rtol=2e-3, atol=2e-3)


def test_prefetch_path_returns_the_same_tokens_as_direct_reads(latents, tmp_path):
    """Tokens read in the prefetch thread (two batches ahead) are, batch by batch, the cache's rows of the batch's
    image indices, cast to float32; the same with no prefetch, and across a resume."""
    out = tmp_path / "cache"

    def teacher(crops, grid):  # deterministic stand-in: tokens are a function of the crop
        flat = crops.float().flatten(1)
        return flat[:, : grid * grid * 8].reshape(-1, grid * grid, 8) / 255, flat[:, -8:] / 255

    store.create(out, {"num_images": 7, "grid": 2, "dim": 8, "parts": 2, "teacher": "t"})
    from srdit.data.latents import LatentDataset

    data = LatentDataset(latents)
    for k in (0, 1):
        store.write_part(out, k, lambda idx: torch.from_numpy(data.get(idx)[2]), teacher, batch_size=3)
    cache = store.TeacherCache(out)
    direct = LatentStream(latents, batch_size=4, seed=3, prefetch=0, teacher_cache=cache)
    ahead = LatentStream(latents, batch_size=4, seed=3, prefetch=2, teacher_cache=cache)
    for _ in range(5):  # crosses epochs (7 images, batches of 4)
        direct.next_batch()
        ahead.next_batch()
        assert torch.equal(direct.last_indices, ahead.last_indices)
        p, c = cache.get(ahead.last_indices.numpy())
        for got, want in zip(ahead.last_teacher, (p, c)):
            assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(want).float())
        for a, b in zip(direct.last_teacher, ahead.last_teacher):
            assert torch.equal(a, b)
    state = ahead.state_dict()
    resumed = LatentStream(latents, batch_size=4, seed=3, prefetch=2, teacher_cache=cache)
    resumed.load_state_dict(state)
    ahead.next_batch(), resumed.next_batch()
    assert all(torch.equal(a, b) for a, b in zip(ahead.last_teacher, resumed.last_teacher))
    ahead.close(), resumed.close()


def test_a_cache_for_other_settings_is_refused(latents, tmp_path):
    out = tmp_path / "cache"
    store.create(out, {"num_images": 7, "grid": 2, "dim": 8, "parts": 1, "teacher": "t"})
    with pytest.raises(ValueError, match="differs in: grid"):
        store.create(out, {"num_images": 7, "grid": 4, "dim": 8, "parts": 1, "teacher": "t"})
    store.write_part(
        out,
        0,
        lambda idx: torch.zeros(len(idx), 3, 32, 32, dtype=torch.uint8),
        lambda crops, grid: (torch.zeros(len(crops), grid * grid, 8), torch.zeros(len(crops), 8)),
    )
    with pytest.raises(ValueError, match="teacher cache made with grid = 2, this run needs 4"):
        store.TeacherCache(out, expect={"grid": 4})


def test_cli_bad_input_is_one_line(latents, tmp_path, capsys):
    assert cache_teacher([str(latents), "--out", str(tmp_path / "c"), "--part", "3/2"]) == 2
    assert "--part '3/2': expected K/N" in capsys.readouterr().err
    assert cache_teacher([str(tmp_path / "nothing"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "srdit preprocess" in err


@pytest.mark.parametrize("name", ["imagenet256_sr_dit_ladder", "imagenet256_factorial", "imagenet256_search"])
def test_imagenet_studies_read_the_teacher_cache(name):
    """Every cell of the ImageNet studies reads the DINOv2-B tokens from the cache (no teacher forward per step)."""
    from pathlib import Path

    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    plan = plan_study(load_study(Path(__file__).resolve().parents[1] / "studies" / f"{name}.yaml"))
    assert all(t.config["data"]["teacher_cache"] for t in plan.trials)
