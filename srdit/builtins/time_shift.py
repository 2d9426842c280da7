"""Resolution-dependent time shift (SD3, Esser et al. 2024, arXiv:2403.03206): t' = s t / (1 + (s - 1) t) on the
training times (`srdit.transport.timesteps.sample_times`) and on the sampler's grid
(`srdit.transport.samplers.time_grid`), both through `shift_time` here; the shift s is `transport.shift`, or
derived from the resolution when unset (`srdit.config`)."""

from srdit.builtins.common import SRDIT
from srdit.ext import Builtin


def shift_time(t, s: float):
    """t' = s t / (1 + (s - 1) t), clamped to [0, 1]; t a tensor of times (t = 1 noise). s > 1 moves mass toward
    noise; s = 1 returns t itself. Works on the tensor it is given (no torch import: the config layer)."""
    if s == 1.0:
        return t
    return (s * t / (1 + (s - 1) * t)).clamp(0.0, 1.0)


TECHNIQUE = Builtin(
    "time_shift",
    paper="SD3, Esser et al. 2024, arXiv:2403.03206; " + SRDIT,
    description="Resolution-dependent time shift on training times and the sampler grid",
    diff={"transport.time_shift": True},
    knobs={"shift": "transport.shift"},
    points=("times", "solver"),
    code=("srdit.transport.timesteps", "srdit.transport.samplers", "srdit.config"),
)
