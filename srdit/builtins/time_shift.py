"""Resolution-dependent time shift (SD3, Esser et al. 2024, arXiv:2403.03206): t' = s t / (1 + (s - 1) t) on the
training times and on the sampler's grid (`srdit.transport.timesteps.shift_time`); the shift s is
`transport.shift`, or derived from the resolution when unset (`srdit.config`)."""

from srdit.builtins.paper import SRDIT
from srdit.ext import Builtin

TECHNIQUE = Builtin(
    "time_shift",
    paper="SD3, Esser et al. 2024, arXiv:2403.03206; " + SRDIT,
    description="Resolution-dependent time shift on training times and the sampler grid",
    diff={"transport.time_shift": True},
    knobs={"shift": "transport.shift"},
    points=("times", "solver"),
    code=("srdit.transport.timesteps", "srdit.transport.samplers", "srdit.config"),
)
