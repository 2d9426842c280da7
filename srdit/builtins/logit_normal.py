"""Logit-normal training times (SD3, Esser et al. 2024, arXiv:2403.03206): t = sigmoid(mean + std n), n ~ N(0, 1),
in place of uniform times (`srdit.transport.timesteps.sample_times`)."""

from srdit.ext import Builtin

TECHNIQUE = Builtin(
    "logit_normal",
    paper="SD3, Esser et al. 2024, arXiv:2403.03206",
    description="Logit-normal training times instead of uniform",
    diff={"transport.time_sampling": "logit_normal"},
    knobs={"mean": "transport.logit_mean", "std": "transport.logit_std"},
    points=("times",),
    code=("srdit.transport.timesteps",),
)
