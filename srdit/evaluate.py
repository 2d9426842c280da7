"""Evaluating a model's samples: digits in memory (the in-project metric network), latent runs through sample
shards (FID / sFID / IS / precision / recall from local Inception weights, KD_DINOv2 from local DINOv2 files).

Sits above sampling: `srdit.generate` (batches, decoding) <- `srdit.sample_shards` (sharded sampling) <- this
module.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch

from srdit.config import RunConfig, SampleConfig
from srdit.generate import generate
from srdit.metric_registry import produced_by
from srdit.sample_shards import collect, write_shard

EVAL_METRICS = {dataset: tuple(produced_by(dataset)) for dataset in ("digits", "latents")}
"""What `evaluate` reports per data.dataset, from the metric registry (sfid, precision / recall, kd_dinov2 only when
the reference allows)."""


def evaluate(model, cfg: RunConfig, device: torch.device | str = "cpu", n: int | None = None,
             sample_cfg: SampleConfig | None = None, samples_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """Sample-quality metrics of n generated images.

    Digits: FD, KD (mean, std), precision, recall against the held-out digits (in-project metric network).
    Latent runs: FID, sFID, Inception Score, precision / recall against `eval.reference` from local Inception
    weights, and KD_DINOv2 when `eval.dinov2_path` is set; the samples are decoded with `data.tokenizer` and
    written as shards to `samples_dir` (a temporary folder when None). Under torch.distributed every rank writes
    its shard and rank 0 computes the metrics (the other ranks return {})."""
    n = n or cfg.eval.n_samples
    if cfg.data.dataset != "digits":
        return _evaluate_latents(model, cfg, torch.device(device), n, sample_cfg, samples_dir)
    from srdit.data.digits import load_digits_split
    from srdit.metrics import evaluate_images, load_digits_metric_net

    images, _, nfe = generate(model, cfg, n, cfg.eval.seed, device, cfg.eval.batch_size, sample_cfg)
    real = load_digits_split().test_x
    metrics = evaluate_images(images, real, load_digits_metric_net("cpu"), kd_subset_size=min(1000, len(real)))
    return {**{k: float(v) for k, v in metrics.items()}, "nfe": float(nfe)}


def _evaluate_latents(model, cfg: RunConfig, device: torch.device, n: int, sample_cfg: SampleConfig | None,
                      samples_dir: str | os.PathLike | None) -> dict[str, float]:
    from srdit.metrics.inception import inception_features, load_inception, metrics_from_features
    from srdit.parallel import DataParallel

    ev = cfg.eval
    ref = check_evaluation(cfg)  # fail before sampling, not after
    net = load_inception(ev.inception_path, device)
    dp = DataParallel.current()
    if dp.active and samples_dir is None:
        raise ValueError("a data-parallel evaluation needs one samples folder that every rank sees: pass "
                         "samples_dir (srdit evaluate --samples DIR)")
    with contextlib.ExitStack() as stack:
        folder = samples_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="srdit-samples-"))
        res = write_shard(model, cfg, folder, n, ev.seed, dp.rank, dp.world, device, ev.batch_size, sample_cfg)
        dp.barrier()
        if not dp.main:
            return {}
        images, _ = collect(folder, n)
    out = metrics_from_features(inception_features(images, net, batch_size=ev.batch_size), ref)
    del net
    if ev.dinov2_path:
        out |= _kd_dinov2(images, ev, device)
    return {**{k: float(v) for k, v in out.items()}, "nfe": float(res.nfe)}


def check_evaluation(cfg: RunConfig):
    """Raise now what a latent run's evaluation would otherwise only find after training or sampling: a missing
    reference, Inception weights, tokenizer weights or DINOv2 files, or a reference without DINOv2 features.
    Returns the loaded reference statistics (None for digits)."""
    ev = cfg.eval
    if cfg.data.dataset == "digits":
        return None
    if not ev.reference:
        raise ValueError("evaluating a latent run needs reference statistics: set eval.reference to an .npz made by "
                         "`srdit reference` (or ADM's VIRTUAL_imagenet256_labeled.npz)")
    from srdit.inputs import input_problems
    from srdit.metrics.inception import load_reference

    if not cfg.data.tokenizer or not cfg.data.tokenizer_path:
        raise FileNotFoundError("data.tokenizer / data.tokenizer_path: the tokenizer that decodes the samples is not "
                                "set (set data.tokenizer and data.tokenizer_path)")
    problems = input_problems(cfg, ["data.tokenizer_path", "eval.reference", "eval.inception_path",
                                    "eval.dinov2_path"])
    if problems:
        raise FileNotFoundError(" | ".join(map(str, problems)))
    ref = load_reference(ev.reference)
    return ref


def _kd_dinov2(images, ev, device: torch.device) -> dict[str, float]:
    import numpy as np

    from srdit.metrics import extract_features
    from srdit.metrics.dinov2_kd import kd_dinov2, load_kd_extractor

    with np.load(ev.reference) as z:
        real = z["dinov2"]
    fake = extract_features(torch.from_numpy(images).permute(0, 3, 1, 2), load_kd_extractor(ev.dinov2_path,
                                                                                             device=device),
                            ev.batch_size)
    return kd_dinov2(real, fake.numpy(), subset_size=min(1000, len(real), len(fake)))
