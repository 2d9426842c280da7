"""Sharded sampling: per-batch seeds make any shard count reproduce the unsharded samples bit for bit; shards resume,
collect checks completeness, latent samples decode through the tokenizer. Tiny random models, CPU only."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from srdit.config import ConfigError, DataConfig, ModelConfig, RunConfig, apply_diff
from srdit.data.digits import balanced_labels, random_labels
from srdit.generate import batch_slice, generate, shard_batches, to_images
from srdit.imaging import to_uint8
from srdit.model import build_model
from srdit.sample_shards import collect, merge, resolve_shard, shard_path, write_shard
from srdit.techniques import load_run_config, with_techniques
from srdit.transport import guided_velocity, sample

N, BS = 11, 3  # four protocol batches: 3, 3, 3 and a short one of 2


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _cfg(sampler: str = "sde", reg: bool = False, balanced: bool = False) -> RunConfig:
    base = with_techniques(RunConfig(), ["reg"]) if reg else RunConfig()
    return apply_diff(
        base, {"sample.sampler": sampler, "sample.steps": 3, "sample.balanced_labels": balanced, "eval.batch_size": BS}
    )


def _model(cfg: RunConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(cfg.model).eval()


def _old_generate(model, cfg: RunConfig, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-generator protocol before sharding (for n <= batch size), kept here as the reference."""
    sc, m = cfg.sample, cfg.model
    g = torch.Generator().manual_seed(seed)
    labels = balanced_labels(n, m.num_classes) if sc.balanced_labels else random_labels(n, m.num_classes, g)
    noise = torch.randn(n, m.in_channels, m.input_size, m.input_size, generator=g)
    state = [noise] + ([torch.randn(n, m.reg.dim, generator=g)] if m.reg.enabled else [])
    velocity = guided_velocity(
        model,
        labels,
        m.num_classes,
        sc.cfg_scale,
        sc.cls_cfg_scale,
        sc.guidance_low,
        sc.guidance_high,
        sc.path_drop_guidance,
    )
    with torch.no_grad():
        res = sample(velocity, state, sc.sampler, sc.steps, cfg.shift_value(), generator=g)
    return res.state[0].float().clamp(-1, 1), labels


def test_one_batch_matches_the_single_generator_protocol():
    cfg = _cfg("sde", reg=True)
    model = _model(cfg)
    ref, ref_labels = _old_generate(model, cfg, BS, seed=7)
    x, y, _ = generate(model, cfg, BS, 7)
    assert torch.equal(x, ref) and torch.equal(y, ref_labels)


@pytest.mark.parametrize("sampler,reg,balanced", [("sde", True, False), ("euler", False, True)])
def test_any_shard_count_reproduces_the_unsharded_samples(tmp_path, sampler, reg, balanced):
    cfg = _cfg(sampler, reg, balanced)
    model = _model(cfg)
    full, labels, nfe = generate(model, cfg, N, seed=5)
    assert full.shape == (N, 1, 8, 8) and nfe == 3
    # tensors: shard k's batches, put back at their global rows, rebuild the full run exactly
    for w in (1, 3, 4, 6):
        rebuilt = torch.full_like(full, float("nan"))
        for k in range(w):
            part, _, _ = generate(model, cfg, N, 5, batches=shard_batches(N, BS, k, w))
            rows = [i for b in shard_batches(N, BS, k, w) for i in range(N)[batch_slice(N, BS, b)]]
            rebuilt[rows] = part
        assert torch.equal(rebuilt, full), w
    # files: three shards and one shard collect to the same uint8 images as the plain run
    for w in (3, 1):
        for k in range(w):
            write_shard(model, cfg, tmp_path / f"w{w}", N, 5, k, w)
        images, got = collect(tmp_path / f"w{w}", N)
        assert np.array_equal(images, to_uint8(full)) and np.array_equal(got, labels.numpy())
    if balanced:
        assert labels.tolist() == [i % 10 for i in range(N)]


def test_shard_file_format(tmp_path):
    cfg = _cfg("euler")
    r = write_shard(_model(cfg), cfg, tmp_path, N, 0, shard=0, num_shards=3)
    assert r.path == shard_path(tmp_path, 0, 3) and r.path.name == "samples_00000-of-00003.npz"
    assert r.batches == (0, 3) and r.num_samples == 5 and not r.skipped
    with np.load(r.path) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (5, 8, 8, 1)  # NHWC, ADM sample-batch format
        assert z["labels"].shape == (5,) and z["batches"].tolist() == [0, 3]
        assert json.loads(str(z["meta"]))["n"] == N
    assert [p.name for p in tmp_path.iterdir()] == [r.path.name]  # no temporary left behind
    # more shards than batches: the extra shard is empty but valid
    assert write_shard(_model(cfg), cfg, tmp_path / "many", N, 0, shard=5, num_shards=6).num_samples == 0


def test_rerun_skips_a_finished_shard_and_refuses_other_settings(tmp_path, monkeypatch):
    cfg = _cfg("euler")
    model = _model(cfg)
    first = write_shard(model, cfg, tmp_path, N, 0, 1, 2)
    stamp = os.stat(first.path).st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("a finished shard was generated again")

    monkeypatch.setattr("srdit.sample_shards.generate", boom)
    again = write_shard(model, cfg, tmp_path, N, 0, 1, 2)
    assert again.skipped and again.num_samples == first.num_samples and again.nfe == first.nfe
    assert os.stat(first.path).st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings \\(seed differ\\)"):
        write_shard(model, cfg, tmp_path, N, 1, 1, 2)
    with pytest.raises(ValueError, match="weights differ"):
        write_shard(_model(_cfg("euler")).requires_grad_(False).apply(_perturb), cfg, tmp_path, N, 0, 1, 2)


def _perturb(module: torch.nn.Module) -> None:
    for p in module.parameters(recurse=False):
        p.data.add_(1e-3)


def test_collect_names_what_is_missing(tmp_path):
    cfg = _cfg("euler")
    model = _model(cfg)
    for k in (0, 2):
        write_shard(model, cfg, tmp_path, N, 0, k, 3)
    with pytest.raises(ValueError, match=r"batches 1 of 0-3 are missing; missing shard files: samples_00001-of-00003"):
        collect(tmp_path, N)
    write_shard(model, cfg, tmp_path, N, 0, 1, 3)
    path = merge(tmp_path, N)
    assert path.name == f"samples_{N}.npz"
    with np.load(path) as z:
        assert z["arr_0"].shape == (N, 8, 8, 1) and z["labels"].shape == (N,)
    write_shard(model, cfg, tmp_path, N, 0, 0, 1)  # a second shard count in the same folder
    with pytest.raises(ValueError, match="more than one shard"):
        collect(tmp_path, N)
    with pytest.raises(ValueError, match="n=11, not n=12"):
        collect(tmp_path, 12)
    with pytest.raises(FileNotFoundError, match="no sample shards"):
        collect(tmp_path / "empty", N)


def test_shard_from_torchrun_environment(monkeypatch):
    assert resolve_shard() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_shard() == (2, 4) and resolve_shard(1, 3) == (1, 3)
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="--shard K --num-shards W"):
        resolve_shard()
    with pytest.raises(ValueError, match="need 0 <= shard < num_shards"):
        resolve_shard(4, 4)


# --------------------------------------------------------------------------------------------------------------
# Latent runs: decoding with the tokenizer
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_invae(tmp_path_factory):
    from srdit.encoders.invae import InvaeAutoencoder, InvaeConfig, save_invae

    torch.manual_seed(0)
    model = InvaeAutoencoder(InvaeConfig(ch=8, num_res_blocks=1, norm_groups=4))  # f16, 32 channels, narrow
    folder = tmp_path_factory.mktemp("invae")
    save_invae(model, folder)
    return folder


def _latent_cfg(tokenizer_path=None) -> RunConfig:
    data = DataConfig(
        dataset="latents",
        path="-",
        tokenizer="invae" if tokenizer_path else None,
        tokenizer_path=str(tokenizer_path) if tokenizer_path else None,
    )
    model = ModelConfig(in_channels=32, input_size=2, patch_size=1, num_classes=5)
    return apply_diff(
        RunConfig(model=model, data=data), {"sample.steps": 2, "sample.sampler": "euler", "eval.batch_size": 2}
    ).validate()


def test_latent_samples_decode_through_the_tokenizer(tiny_invae, tmp_path):
    from srdit.encoders import load_tokenizer

    cfg = _latent_cfg(tiny_invae)
    model = _model(cfg)
    latents, _, _ = generate(model, cfg, 3, 0)
    assert latents.shape == (3, 32, 2, 2) and latents.abs().max() > 1  # latents are not clamped like pixels
    images = to_images(latents, cfg)
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    tok = load_tokenizer("invae", str(tiny_invae))
    # decode undoes the 0.3099 scale itself (chunks of eval.batch_size: equal up to float rounding)
    torch.testing.assert_close(images, tok.decode(latents).clamp(-1, 1))
    r = write_shard(model, cfg, tmp_path, 3, 0, 0, 1)
    with np.load(r.path) as z:
        assert z["arr_0"].shape == (3, 32, 32, 3) and z["arr_0"].dtype == np.uint8
        tok_meta = json.loads(str(z["meta"]))["tokenizer"]
    assert tok_meta["name"] == "invae" and len(tok_meta["weights"]) == 16  # fingerprinted weights, not a path


def test_latents_without_a_tokenizer_say_what_to_set():
    cfg = _latent_cfg()
    with pytest.raises(ValueError, match="data.tokenizer .*data.tokenizer_path"):
        to_images(torch.zeros(1, 32, 2, 2), cfg)
    digits = torch.linspace(-2, 2, 64).reshape(1, 1, 8, 8)
    assert torch.equal(to_images(digits, RunConfig()), digits.clamp(-1, 1))


def test_tokenizer_name_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer: unknown tokenizer 'vqgan'; allowed: invae, sdvae"):
        dataclasses.replace(_latent_cfg(), data=DataConfig(dataset="latents", path="-", tokenizer="vqgan")).validate()
    with pytest.raises(ConfigError, match="data.tokenizer: unknown tokenizer 'sd-vae'"):
        load_run_config(None, ["data.tokenizer=sd-vae"])


# --------------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from srdit.train import train

    out = tmp_path_factory.mktemp("run")
    cfg = apply_diff(
        RunConfig(),
        {
            "train.steps": 2,
            "train.ckpt_every": 2,
            "train.threads": 1,
            "eval.n_samples": 20,
            "eval.batch_size": 20,
            "sample.steps": 2,
        },
    )
    assert train(cfg, out, progress=False).status == "finished"
    return str(out / "checkpoints" / "last.pt")


def _cli(capsys, *args) -> tuple[int, dict | str]:
    from srdit.commands import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else err)


def test_cli_shards_merge_to_the_plain_samples(checkpoint, tmp_path, capsys):
    common = ["--n", "7", "--batch-size", "2", "--sampler", "euler", "--steps", "2", "--device", "cpu"]
    for k in range(3):
        code, out = _cli(
            capsys, "sample", checkpoint, *common, "--out", str(tmp_path / "s"), "--shard", str(k), "--num-shards", "3"
        )
        assert code == 0 and out["shard_index"] == k and not out["skipped"]
    code, out = _cli(
        capsys, "sample", checkpoint, *common, "--out", str(tmp_path / "s"), "--shard", "1", "--num-shards", "3"
    )
    assert code == 0 and out["skipped"]
    code, out = _cli(capsys, "sample", checkpoint, "--n", "7", "--out", str(tmp_path / "s"), "--merge")
    assert code == 0 and out["npz"].endswith("samples_7.npz")
    code, one = _cli(
        capsys,
        "sample",
        checkpoint,
        *common,
        "--out",
        str(tmp_path / "one"),
        "--shard",
        "0",
        "--num-shards",
        "1",
        "--merge",
    )
    assert code == 0 and one["samples"] == 7
    code, plain = _cli(capsys, "sample", checkpoint, *common, "--out", str(tmp_path / "plain"))
    assert code == 0 and (tmp_path / "plain/samples.png").is_file()
    with np.load(out["npz"]) as a, np.load(one["npz"]) as b, np.load(plain["npz"]) as c:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_0"], c["images"])
        assert np.array_equal(a["labels"], c["labels"])
    os.remove(tmp_path / "s/samples_00002-of-00003.npz")
    code, err = _cli(capsys, "sample", checkpoint, "--n", "7", "--out", str(tmp_path / "s"), "--merge")
    assert code == 2 and "samples_00002-of-00003.npz" in err and len(err.strip().splitlines()) == 1
