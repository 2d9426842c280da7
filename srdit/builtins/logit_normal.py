"""Logit-normal training times (SD3, Esser et al. 2024, arXiv:2403.03206): t = sigmoid(mean + std n), n ~ N(0, 1),
in place of uniform times.

The draw is this module's `times` hook, called by the objective through the same extension point as a plugin's
(`srdit.transport.objective.StepNoise.draw`), at the built-in draw's place in the step's draw order; switched on by
`transport.time_sampling` (its diff key)."""

from srdit.builtins.time_shift import shift_time
from srdit.ext import Builtin


def logit_normal(n: int, mean: float, std: float, generator=None, device="cpu"):
    """n times sigmoid(mean + std n), n ~ N(0, 1) drawn from `generator` (None: torch's global RNG) on `device`:
    a tensor [n] in (0, 1)."""
    import torch  # in the hook's body: importing this module loads no torch

    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def times(knobs, n: int, shift: float, device):
    """The training times [n] of the step's global batch: logit-normal (knobs.mean, knobs.std), then the time shift
    `shift` (`srdit.builtins.time_shift.shift_time`; 1 = none)."""
    return shift_time(logit_normal(n, knobs.mean, knobs.std, device=device), shift)


TECHNIQUE = Builtin(
    "logit_normal",
    paper="SD3, Esser et al. 2024, arXiv:2403.03206",
    description="Logit-normal training times instead of uniform",
    diff={"transport.time_sampling": "logit_normal"},
    knobs={"mean": "transport.logit_mean", "std": "transport.logit_std"},
    points=("times",),
    code=("srdit.transport.timesteps",),
    hooks={"times": times},
    on="transport.time_sampling",
)
