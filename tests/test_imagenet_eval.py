"""Latent-run evaluation end to end on stand-ins the test makes: an image folder, a tiny random INVAE, random FID
Inception weights. Reference statistics, a latent training run that evaluates itself (FID / sFID / IS / P / R) and
draws a decoded grid, the CLI, and sharded evaluation on two gloo ranks giving the single-process numbers."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from test_inception import _random_net  # random weights that keep activations O(1)

from srdit.config import DataConfig, EvalConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig
from srdit.data.preprocess import preprocess
from srdit.encoders.invae import InvaeAutoencoder, InvaeConfig, load_invae, save_invae
from srdit.evaluate import EVAL_METRICS
from srdit.metrics.inception import WEIGHTS_NAME, load_reference
from srdit.metrics.reference import build_reference
from srdit.parallel import join_group

RES = 32


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """(image folder, latent folder with crops, INVAE folder, Inception weights, reference .npz)."""
    root = tmp_path_factory.mktemp("imagenet_eval")
    rng = np.random.default_rng(0)
    for i in range(18):
        d = root / "images" / f"n0{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 36 + i, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    torch.manual_seed(0)
    save_invae(InvaeAutoencoder(InvaeConfig(ch=8, num_res_blocks=1, norm_groups=4)), root / "invae")
    preprocess(
        root / "images",
        root / "latents",
        load_invae(root / "invae"),
        resolution=RES,
        shard_size=8,
        batch_size=6,
        keep_images=True,
        workers=1,
        progress=False,
    )
    torch.manual_seed(1)
    weights = root / WEIGHTS_NAME
    torch.save(_random_net().state_dict(), weights)
    ref = build_reference(
        root / "latents", root / "ref.npz", inception=str(weights), n=100, batch_size=8, device="cpu", progress=False
    )
    return {
        "images": root / "images",
        "latents": root / "latents",
        "invae": root / "invae",
        "weights": weights,
        "ref": ref,
    }


def _cfg(s, samples: int = 12) -> RunConfig:
    return RunConfig(
        model=ModelConfig(size="debug", patch_size=1, in_channels=32, input_size=2, num_classes=3),
        data=DataConfig(dataset="latents", path=str(s["latents"]), tokenizer="invae", tokenizer_path=str(s["invae"])),
        train=TrainConfig(steps=4, batch_size=6, log_every=2, ckpt_every=4, threads=1),
        sample=SampleConfig(sampler="euler", steps=2),
        eval=EvalConfig(n_samples=samples, batch_size=5, reference=str(s["ref"]), inception_path=str(s["weights"])),
    )


def test_reference_from_image_folder_equals_reference_from_stored_crops(stand_ins, tmp_path):
    ref = load_reference(stand_ins["ref"])
    assert ref.mu.shape == (2048,) and ref.mu_s.shape == (2023,) and ref.pool.shape == (18, 2048)
    again = build_reference(
        stand_ins["images"],
        tmp_path / "r.npz",
        inception=str(stand_ins["weights"]),
        resolution=RES,
        batch_size=7,
        device="cpu",
        progress=False,
    )
    other = load_reference(again)
    np.testing.assert_allclose(other.mu, ref.mu, rtol=1e-6)
    np.testing.assert_allclose(other.sigma_s, ref.sigma_s, rtol=1e-5, atol=1e-9)


def test_latent_run_evaluates_itself_and_draws_a_decoded_grid(stand_ins, tmp_path):
    from srdit.train import train

    rows = []

    class Rec:
        def report(self, step, metrics):
            rows.append((step, dict(metrics)))

    res = train(_cfg(stand_ins), tmp_path, Rec(), progress=False)
    assert res.status == "finished"
    m = res.metrics
    for k in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert np.isfinite(m[k]), k
    assert m["fid"] > 0 and m["n"] == 12 and m["nfe"] == 2
    assert set(rows[-1][1]) <= set(EVAL_METRICS["latents"])  # the final report is the evaluation
    assert any("fid" in r for _, r in rows)
    assert (tmp_path / "samples.png").is_file()
    grid = np.load(tmp_path / "samples.npz")["images"]
    assert grid.shape == (100, RES, RES, 3) and grid.dtype == np.uint8
    assert len(list((tmp_path / "samples" / "step_0000004").glob("samples_*.npz"))) == 1


def test_missing_reference_is_a_clear_error(stand_ins, tmp_path):
    from srdit.evaluate import evaluate
    from srdit.model import build_model

    cfg = _cfg(stand_ins)
    no_ref = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, reference=None))
    with pytest.raises(ValueError, match="set eval.reference"):
        evaluate(build_model(cfg.model), no_ref)
    gone = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, reference=str(tmp_path / "nope.npz")))
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        evaluate(build_model(cfg.model), gone)
    bad_weights = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, inception_path=str(tmp_path / "w.pth")))
    with pytest.raises(FileNotFoundError, match="SRDIT_INCEPTION_WEIGHTS"):
        evaluate(build_model(cfg.model), bad_weights)


def _eval_worker(rank: int, port: int, cfg: RunConfig, samples: str, out: str) -> None:
    join_group(port, rank, 2)
    try:
        from srdit.evaluate import evaluate
        from srdit.model import build_model

        torch.set_num_threads(1)
        torch.manual_seed(3)
        metrics = evaluate(build_model(cfg.model), cfg, "cpu", samples_dir=samples)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(metrics, f)
        else:
            assert metrics == {}
    finally:
        dist.destroy_process_group()


def test_two_ranks_shard_the_samples_and_give_the_single_process_metrics(stand_ins, tmp_path, held_port):
    """13 samples in protocol batches of 5: rank 0 draws batches 0 and 2, rank 1 batch 1; the metrics equal one
    process's, because each batch's noise depends on (seed, batch) only."""
    from srdit.evaluate import evaluate
    from srdit.model import build_model

    cfg = _cfg(stand_ins, samples=13)
    mp.spawn(_eval_worker, args=(held_port(), cfg, str(tmp_path / "two"), str(tmp_path / "m.json")), nprocs=2)
    two = json.loads((tmp_path / "m.json").read_text())
    assert sorted(p.name for p in (tmp_path / "two").glob("samples_*.npz")) == [
        "samples_00000-of-00002.npz",
        "samples_00001-of-00002.npz",
    ]
    torch.manual_seed(3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (the decoder's convolutions round by thread count)
    try:
        one = evaluate(build_model(cfg.model), cfg, "cpu", samples_dir=tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    assert two == pytest.approx(one, rel=1e-9)


def test_cli_reference_and_evaluate(stand_ins, tmp_path, capsys):
    from srdit.commands import main
    from srdit.train import train

    cfg = dataclasses.replace(_cfg(stand_ins), eval=EvalConfig(n_samples=10, batch_size=5))  # no reference in it
    train(cfg, tmp_path / "run", progress=False)
    assert (
        main(
            [
                "reference",
                str(stand_ins["images"]),
                str(tmp_path / "ref.npz"),
                "--inception",
                str(stand_ins["weights"]),
                "--resolution",
                str(RES),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "run/checkpoints/last.pt"),
                "--n",
                "10",
                "--device",
                "cpu",
                "--json",
                "--reference",
                str(tmp_path / "ref.npz"),
                "--inception",
                str(stand_ins["weights"]),
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    assert {"fid", "sfid", "inception_score", "precision", "recall"} <= set(metrics) and metrics["n"] == 10
    assert main(["reference", str(tmp_path / "missing"), str(tmp_path / "x.npz")]) == 2
    assert "no such image folder" in capsys.readouterr().err


def _dino_vitl14_stand_in(root) -> str:
    """A tiny DINOv2-shaped ViT saved under the ViT-L/14 file name the KD_DINOv2 metric loads (layout of
    srdit.encoders.dinov2: <root>/dinov2/hubconf.py + <root>/dinov2_vitl14_pretrain.pth)."""
    from test_dinov2 import HUBCONF

    (root / "dinov2").mkdir(parents=True)
    (root / "dinov2" / "hubconf.py").write_text(
        HUBCONF + "\ndef dinov2_vitl14(pretrained=False, **kwargs):\n    return TinyDinoVisionTransformer(**kwargs)\n"
    )
    torch.manual_seed(4)
    model = torch.hub.load(str(root / "dinov2"), "dinov2_vitl14", source="local", pretrained=False)
    torch.save(model.state_dict(), root / "dinov2_vitl14_pretrain.pth")
    return str(root)


def _counting_features_worker(rank: int, port: int, cfgs: list, folders: list, out: str) -> None:
    """Evaluate each config on two gloo ranks; record this rank's metrics and how many samples its own Inception
    and DINOv2 passes saw."""
    from srdit.evaluate import evaluate
    from srdit.model import build_model

    join_group(port, rank, 2)
    try:
        torch.set_num_threads(1)
        seen = {}
        _count_rows(seen)
        rows = []
        for cfg, folder in zip(cfgs, folders):
            seen.update(inception=0, dinov2=0)
            torch.manual_seed(3)
            rows.append({"metrics": evaluate(build_model(cfg.model), cfg, "cpu", samples_dir=folder), **seen})
        with open(f"{out}.{rank}", "w") as f:
            json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def _count_rows(seen: dict, setattr=setattr) -> None:
    """Patch the Inception and DINOv2 metric networks to count the images fed to them in seen["inception"] /
    seen["dinov2"] (`setattr`: pytest's monkeypatch.setattr to undo it after a test)."""
    from srdit.metrics.dinov2_kd import DinoV2Features
    from srdit.metrics.inception import FIDInceptionV3

    inception, dino = FIDInceptionV3.forward, DinoV2Features.features

    def inception_forward(self, x):
        seen["inception"] += len(x)
        return inception(self, x)

    def dino_features(self, images):
        seen["dinov2"] += len(images)
        return dino(self, images)

    setattr(FIDInceptionV3, "forward", inception_forward)
    setattr(DinoV2Features, "features", dino_features)


def test_two_ranks_extract_their_own_samples_features_and_give_the_single_process_metrics(
    stand_ins, tmp_path, monkeypatch, held_port
):
    """The feature passes are sharded: each of two gloo ranks feeds only its own samples to Inception and DINOv2
    (13 samples in protocol batches of 5: rank 0 holds batches 0 and 2 = 8 samples, rank 1 batch 1 = 5; with 4
    samples rank 1 holds none), rank 0 gathers the features, and FID, sFID, IS, precision / recall and KD_DINOv2
    equal the single process's exactly (the same batches meet the networks, one protocol batch per forward)."""
    from srdit.evaluate import evaluate
    from srdit.model import build_model

    dino = _dino_vitl14_stand_in(tmp_path / "dino")
    with np.load(stand_ins["ref"]) as z:
        arrays = dict(z)
    arrays["dinov2"] = np.random.default_rng(0).normal(size=(18, 32))  # the reference's DINOv2 features
    np.savez(tmp_path / "ref_dino.npz", **arrays)
    cfgs = [
        dataclasses.replace(
            _cfg(stand_ins, samples=n),
            eval=dataclasses.replace(
                _cfg(stand_ins, samples=n).eval, reference=str(tmp_path / "ref_dino.npz"), dinov2_path=dino
            ),
        )
        for n in (13, 4)
    ]
    folders = [str(tmp_path / f"two_{k}") for k in range(len(cfgs))]
    mp.spawn(_counting_features_worker, args=(held_port(), cfgs, folders, str(tmp_path / "rows")), nprocs=2)
    ranks = [json.loads((tmp_path / f"rows.{r}").read_text()) for r in range(2)]

    seen = {}
    _count_rows(seen, monkeypatch.setattr)
    threads = torch.get_num_threads()
    for i, (cfg, own) in enumerate(zip(cfgs, [(8, 5), (4, 0)])):
        seen.update(inception=0, dinov2=0)
        torch.manual_seed(3)
        torch.set_num_threads(1)  # as the workers (the decoder's convolutions round by thread count)
        try:
            one = evaluate(build_model(cfg.model), cfg, "cpu", samples_dir=tmp_path / f"one_{i}")
        finally:
            torch.set_num_threads(threads)
        assert seen == {"inception": cfg.eval.n_samples, "dinov2": cfg.eval.n_samples}
        two, other = ranks[0][i], ranks[1][i]
        assert (two["inception"], other["inception"]) == own and (two["dinov2"], other["dinov2"]) == own
        assert other["metrics"] == {}
        assert {"fid", "sfid", "inception_score", "precision", "recall", "kd_dinov2"} <= set(one)
        assert two["metrics"] == one  # exactly: the sharded statistics are the single-process ones
