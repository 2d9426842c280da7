"""The probability path. Convention (stated once, used everywhere): t = 1 is pure noise, t = 0 is data.

Linear interpolant x_t = (1 - t) x0 + t eps, velocity target v* = d x_t / dt = eps - x0 (SiT, SR-DiT 1.1).
"""

from __future__ import annotations

import torch


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """d x_t / dt = eps - x0."""
    return eps - x0


def score_from_velocity(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Score of p_t from the velocity on the linear path: E[eps | x] = x + (1 - t) v, score = -E[eps | x] / t."""
    t = _expand(t, x)
    return -(x + (1 - t) * v) / t
