"""Transport: path (t = 1 noise, t = 0 data), training times, losses, samplers."""

from srdit.transport.path import interpolate, score_from_velocity, velocity_target
from srdit.transport.samplers import SampleResult, guided_velocity, initial_state, sample, time_grid
from srdit.transport.timesteps import sample_times, shift_time

__all__ = [
    "interpolate",
    "velocity_target",
    "score_from_velocity",
    "sample_times",
    "shift_time",
    "sample",
    "time_grid",
    "guided_velocity",
    "initial_state",
    "SampleResult",
]
