"""Sampling from a trained model and evaluating the samples (digits: the in-project metric network)."""

from __future__ import annotations

import dataclasses

import torch

from srdit.config import RunConfig, SampleConfig
from srdit.data.digits import balanced_labels, random_labels
from srdit.transport import guided_velocity, sample


@torch.no_grad()
def generate(model, cfg: RunConfig, n: int, seed: int, device: torch.device | str = "cpu", batch_size: int = 500,
             sample_cfg: SampleConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """n images in [-1, 1] (CPU float32), their labels, and the NFE per image.

    Noise and labels come from a generator seeded by `seed` alone, so samples do not depend on the batch size
    or on the training RNG."""
    sc = sample_cfg or cfg.sample
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    labels = balanced_labels(n, m.num_classes) if sc.balanced_labels else random_labels(n, m.num_classes, g)
    noise = torch.randn(n, m.in_channels, m.input_size, m.input_size, generator=g)
    cls_noise = torch.randn(n, m.reg.dim, generator=g) if m.reg.enabled else None
    was_training = model.training
    model.eval()
    out, nfe = [], 0
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        state = [noise[sl].to(device)] + ([cls_noise[sl].to(device)] if cls_noise is not None else [])
        velocity = guided_velocity(model, labels[sl].to(device), m.num_classes, sc.cfg_scale, sc.cls_cfg_scale,
                                   sc.guidance_low, sc.guidance_high, sc.path_drop_guidance)
        res = sample(velocity, state, sc.sampler, sc.steps, cfg.shift_value(), generator=g)
        out.append(res.state[0].float().cpu())
        nfe = res.nfe
    model.train(was_training)
    return torch.cat(out).clamp(-1, 1), labels, nfe


def evaluate(model, cfg: RunConfig, device: torch.device | str = "cpu", n: int | None = None,
             sample_cfg: SampleConfig | None = None) -> dict[str, float]:
    """FD, KD (mean, std), precision, recall of n generated images against the held-out real images."""
    if cfg.data.dataset != "digits":
        raise NotImplementedError("evaluation on latents (Inception FID, DINOv2 KD) needs the ImageNet metrics "
                                  "from local weights, which this version does not include yet")
    from srdit.data.digits import load_digits_split
    from srdit.metrics import evaluate_images, load_digits_metric_net

    n = n or cfg.eval.n_samples
    images, _, nfe = generate(model, cfg, n, cfg.eval.seed, device, cfg.eval.batch_size, sample_cfg)
    real = load_digits_split().test_x
    metrics = evaluate_images(images, real, load_digits_metric_net("cpu"), kd_subset_size=min(1000, len(real)))
    return {**{k: float(v) for k, v in metrics.items()}, "nfe": float(nfe)}


def with_sampler(cfg: RunConfig, **changes) -> SampleConfig:
    """The run's sample settings with command-line changes (None values ignored)."""
    return dataclasses.replace(cfg.sample, **{k: v for k, v in changes.items() if v is not None})
