"""A crashed shard keeps its finished batches: the rerun generates only the missing ones and writes the same shard
as an uninterrupted run (then removes the batch parts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import srdit.sample_shards as shards
from srdit.config import RunConfig, apply_diff
from srdit.model import build_model
from srdit.sample_shards import parts_dir, shard_path, write_shard

N, BS = 11, 3  # four protocol batches


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_a_crash_keeps_the_finished_batches(tmp_path, monkeypatch):
    cfg = apply_diff(RunConfig(), {"sample.steps": 3, "eval.batch_size": BS})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    whole = write_shard(model, cfg, tmp_path / "a", N, seed=5, shard=0, num_shards=1)
    calls, real = [], shards.generate

    def crashing(*a, batches, **k):
        calls.append(batches[0])
        if len(calls) == 3:
            raise RuntimeError("node lost")
        return real(*a, batches=batches, **k)

    monkeypatch.setattr(shards, "generate", crashing)
    with pytest.raises(RuntimeError, match="node lost"):
        write_shard(model, cfg, tmp_path / "b", N, seed=5, shard=0, num_shards=1)
    path = shard_path(tmp_path / "b", 0, 1)
    assert not path.exists() and sorted(p.name for p in parts_dir(path).iterdir()) == [
        "batch_000000.npz",
        "batch_000001.npz",
    ]
    calls.clear()
    again = write_shard(model, cfg, tmp_path / "b", N, seed=5, shard=0, num_shards=1)
    assert calls == [2, 3]  # only the batches the crash lost
    assert not parts_dir(path).exists() and again.num_samples == whole.num_samples == N
    with np.load(whole.path) as a, np.load(again.path) as b:
        for key in ("arr_0", "labels", "batches", "meta", "nfe"):
            assert np.array_equal(a[key], b[key]), key


def test_parts_of_other_settings_are_redone(tmp_path, monkeypatch):
    cfg = apply_diff(RunConfig(), {"sample.steps": 3, "eval.batch_size": BS})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    calls, real = [], shards.generate

    def crashing(*a, batches, **k):
        calls.append(batches[0])
        if len(calls) == 2:
            raise RuntimeError("stop")
        return real(*a, batches=batches, **k)

    monkeypatch.setattr(shards, "generate", crashing)
    with pytest.raises(RuntimeError):
        write_shard(model, cfg, tmp_path, N, seed=5, shard=0, num_shards=1)
    calls.clear()

    def counted(*a, batches, **k):
        calls.append(batches[0])
        return real(*a, batches=batches, **k)

    monkeypatch.setattr(shards, "generate", counted)
    write_shard(model, cfg, tmp_path, N, seed=6, shard=0, num_shards=1)  # another seed: batch 0's part is stale
    assert calls == [0, 1, 2, 3]
