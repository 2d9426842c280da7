"""Evaluating a model's samples: digits in memory (the in-project metric network), latent runs through sample
shards (FID / sFID / IS / precision / recall from local Inception weights, KD_DINOv2 from local DINOv2 files).

Sits above sampling: `srdit.generate` (batches, decoding) <- `srdit.sample_shards` (sharded sampling) <- this
module.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import torch

from srdit.config import EvalConfig, RunConfig, SampleConfig
from srdit.generate import batch_slice, generate
from srdit.metric_registry import produced_by
from srdit.parallel import DataParallel
from srdit.sample_shards import ShardResult, read_meta, shard_path, write_shard

EVAL_METRICS = {dataset: tuple(produced_by(dataset)) for dataset in ("digits", "latents")}
"""What `evaluate` reports per data.dataset, from the metric registry (sfid, precision / recall, kd_dinov2 only when
the reference allows)."""


def evaluate(
    model,
    cfg: RunConfig,
    device: torch.device | str = "cpu",
    n: int | None = None,
    sample_cfg: SampleConfig | None = None,
    samples_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Sample-quality metrics of n generated images.

    Digits: FD, KD (mean, std), precision, recall against the held-out digits (in-project metric network).
    Latent runs: FID, sFID, Inception Score, precision / recall against `eval.reference` from local Inception
    weights, and KD_DINOv2 when `eval.dinov2_path` is set; the samples are decoded with `data.tokenizer` and
    written as shards to `samples_dir` (a temporary folder when None). Under torch.distributed every rank writes
    its shard and extracts the features of its own samples; rank 0 gathers them and computes the metrics (the
    other ranks return {}). The metrics do not depend on the number of ranks (`sharded_features`)."""
    n = n or cfg.eval.n_samples
    if cfg.data.dataset != "digits":
        return _evaluate_latents(model, cfg, torch.device(device), n, sample_cfg, samples_dir)
    from srdit.data.digits import load_digits_split
    from srdit.metrics import evaluate_images, load_digits_metric_net

    images, _, nfe = generate(model, cfg, n, cfg.eval.seed, device, cfg.eval.batch_size, sample_cfg)
    real = load_digits_split().test_x
    metrics = evaluate_images(images, real, load_digits_metric_net("cpu"), kd_subset_size=min(1000, len(real)))
    return {**{k: float(v) for k, v in metrics.items()}, "nfe": float(nfe)}


def _evaluate_latents(
    model,
    cfg: RunConfig,
    device: torch.device,
    n: int,
    sample_cfg: SampleConfig | None,
    samples_dir: str | os.PathLike | None,
) -> dict[str, float]:
    from srdit.metrics.inception import load_inception, metrics_from_features

    ev = cfg.eval
    ref = check_evaluation(cfg)  # fail before sampling, not after
    net = load_inception(ev.inception_path, device)
    dp = DataParallel.current()
    if dp.active and samples_dir is None:
        raise ValueError(
            "a data-parallel evaluation needs one samples folder that every rank sees: pass "
            "samples_dir (srdit evaluate --samples DIR)"
        )
    with contextlib.ExitStack() as stack:
        folder = samples_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="srdit-samples-"))
        res = write_shard(model, cfg, folder, n, ev.seed, dp.rank, dp.world, device, ev.batch_size, sample_cfg)
        features = sharded_features(res, n, ev, net, dp)
        del net
        if features is None:
            return {}
        _check_same_settings(folder, dp.world)
    out = metrics_from_features(features, ref)
    if "dinov2" in features:
        from srdit.metrics.dinov2_kd import kd_dinov2

        with np.load(ev.reference) as z:
            real = z["dinov2"]
        out |= kd_dinov2(real, features["dinov2"], subset_size=min(1000, len(real), len(features["dinov2"])))
    return {**{k: float(v) for k, v in out.items()}, "nfe": float(res.nfe)}


def shard_features(images: np.ndarray, ev: EvalConfig, net) -> dict[str, torch.Tensor]:
    """Metric features of one rank's samples (uint8 [N, H, W, 3], N may be 0), float32 CPU [N, F]: Inception's
    "pool" (2048), "spatial" (2023) and "logits" (1008) and, with eval.dinov2_path, the DINOv2 class token
    ("dinov2", the backbone's width). One protocol batch (eval.batch_size rows) per forward, as every world size
    feeds them, so a sample's features do not depend on the number of ranks. `net`: the FID Inception
    (`load_inception`); DINOv2 is loaded from eval.dinov2_path onto the same device."""
    from srdit.metrics import extract_features
    from srdit.metrics.inception import NUM_CLASSES, SPATIAL_DIM, inception_features

    if len(images):  # the networks' float32 outputs, widened to float64 and back: exact
        feats = {
            k: torch.from_numpy(v).float() for k, v in inception_features(images, net, batch_size=ev.batch_size).items()
        }
    else:
        feats = {
            "pool": torch.empty(0, 2048),
            "spatial": torch.empty(0, SPATIAL_DIM),
            "logits": torch.empty(0, NUM_CLASSES),
        }
    if ev.dinov2_path:
        from srdit.metrics.dinov2_kd import load_kd_extractor

        kd = load_kd_extractor(ev.dinov2_path, device=next(net.parameters()).device)
        feats["dinov2"] = (
            extract_features(torch.from_numpy(images).permute(0, 3, 1, 2), kd, ev.batch_size).float()
            if len(images)
            else torch.empty(0, int(kd.model.embed_dim))
        )
    return feats


def sharded_features(res: ShardResult, n: int, ev: EvalConfig, net, dp: DataParallel) -> dict[str, np.ndarray] | None:
    """The features (`shard_features`) of all n samples in global order, float64 [n, F], on rank 0 (None on the
    other ranks): each rank extracts those of its own shard `res` (written by `write_shard` at protocol batch size
    eval.batch_size) and rank 0 gathers them (`DataParallel.gather`) with each row's global sample index. Raises
    ValueError when the gathered rows are not every sample exactly once."""
    with np.load(res.path) as z:
        images = z["arr_0"]
    rows = torch.cat(
        [torch.empty(0, dtype=torch.int64)]
        + [torch.arange(sl.start, sl.stop) for sl in (batch_slice(n, ev.batch_size, b) for b in res.batches)]
    )
    if len(rows) != len(images):
        raise ValueError(
            f"{res.path}: holds {len(images)} samples, its batches {list(res.batches)[:8]} make "
            f"{len(rows)}; delete the folder's shards and sample again"
        )
    feats = shard_features(images, ev, net)
    del images
    index = dp.gather(rows)
    gathered = {k: dp.gather(v) for k, v in feats.items()}
    if index is None:
        return None
    index = torch.cat(index)
    if not torch.equal(index.sort().values, torch.arange(n)):
        raise ValueError(
            f"the ranks' shards hold {len(index)} rows ({len(index.unique())} distinct) of the {n} "
            "samples; every sample must be in exactly one shard"
        )
    out = {}
    for k, parts in gathered.items():
        part = torch.cat(parts).double()
        full = torch.empty((n, *part.shape[1:]), dtype=torch.float64)
        full[index] = part
        out[k] = full.numpy()
    return out


def _check_same_settings(folder: str | os.PathLike, world: int) -> None:
    """The world's shard files were written with one set of settings (weights, sampler, n, ...)."""
    paths = [shard_path(folder, k, world) for k in range(world)]
    first = read_meta(paths[0])
    for p in paths[1:]:
        if read_meta(p) != first:
            raise ValueError(
                f"{folder}: {paths[0].name} and {p.name} were written with different settings; every "
                "rank must sample the same checkpoint with the same settings"
            )


def check_evaluation(cfg: RunConfig):
    """Raise now what a latent run's evaluation would otherwise only find after training or sampling: a missing
    reference, Inception weights, tokenizer weights or DINOv2 files, or a reference without DINOv2 features.
    Returns the loaded reference statistics (None for digits)."""
    ev = cfg.eval
    if cfg.data.dataset == "digits":
        return None
    if not ev.reference:
        raise ValueError(
            "evaluating a latent run needs reference statistics: set eval.reference to an .npz made by "
            "`srdit reference` (or ADM's VIRTUAL_imagenet256_labeled.npz)"
        )
    from srdit.inputs import input_problems
    from srdit.metrics.inception import load_reference

    if not cfg.data.tokenizer or not cfg.data.tokenizer_path:
        raise FileNotFoundError(
            "data.tokenizer / data.tokenizer_path: the tokenizer that decodes the samples is not "
            "set (set data.tokenizer and data.tokenizer_path)"
        )
    problems = input_problems(cfg, ["data.tokenizer_path", "eval.reference", "eval.inception_path", "eval.dinov2_path"])
    if problems:
        raise FileNotFoundError(" | ".join(map(str, problems)))
    ref = load_reference(ev.reference)
    return ref
