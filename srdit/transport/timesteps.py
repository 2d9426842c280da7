"""Training-time sampling, then the resolution-dependent time shift (SD3, Esser et al. 2024; SR-DiT 1.11), whose
transform `shift_time` lives in its technique's module (`srdit.builtins.time_shift`), as the logit-normal draw does
(`srdit.builtins.logit_normal`, which the objective calls as that technique's `times` hook)."""

from __future__ import annotations

import torch

from srdit.builtins.logit_normal import logit_normal  # the techniques' own modules hold them
from srdit.builtins.time_shift import shift_time

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
        t = logit_normal(n, mean, std, generator, device)
    else:
        raise ValueError(f"unknown time sampling {kind!r}; allowed: uniform, logit_normal")
    return shift_time(t, shift)
