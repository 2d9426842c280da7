"""Training-time sampling and the resolution-dependent time shift (SD3, Esser et al. 2024; SR-DiT 1.11)."""

from __future__ import annotations

import torch


def shift_time(t: torch.Tensor, s: float) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t), clamped to [0, 1]. s > 1 moves mass toward noise (t = 1)."""
    if s == 1.0:
        return t
    return (s * t / (1 + (s - 1) * t)).clamp(0.0, 1.0)


def sample_times(
    n: int,
    kind: str,
    shift: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """n training times: uniform or logit-normal on (0, 1), then shifted."""
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif kind == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"unknown time sampling {kind!r}; allowed: uniform, logit_normal")
    return shift_time(t, shift)
