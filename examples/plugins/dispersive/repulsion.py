"""The numerically stable reduction of the dispersive loss (a helper module of the plugin's own folder: its code
enters the plugin's code version too)."""

from __future__ import annotations

import math

import torch


def log_mean_exp_neg(x: torch.Tensor) -> torch.Tensor:
    """log(mean(exp(-x))) over every element of x, stably (logsumexp)."""
    return torch.logsumexp(-x.flatten(), dim=0) - math.log(x.numel())
