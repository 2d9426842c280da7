"""Training-time sampling, then the resolution-dependent time shift (SD3, Esser et al. 2024; SR-DiT 1.11), whose
transform `shift_time` lives in its technique's module (`srdit.builtins.time_shift`)."""

from __future__ import annotations

import torch

from srdit.builtins.time_shift import shift_time  # the time shift's own module holds it

__all__ = ["sample_times", "shift_time"]


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
