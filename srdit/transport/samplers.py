"""Samplers from t = 1 (noise) to t = 0 (data) on a state of one or more tensors (the image, and the REG class
token integrated alongside it). `velocity(state, t) -> velocities` is any function; `guided_velocity` builds
one from a model with classifier-free guidance, a guidance interval and path-drop guidance.

- `sde`: Euler-Maruyama as in SR-DiT (section 3.2): grid of `steps` points from 1 to 0.04 plus a final 0, then
  time-shifted; diffusion w(t) = 2t; every step but the last adds noise; the last is a deterministic Euler step.
  NFE = steps.
- `euler`: ODE, `steps` uniform intervals from 1 to 0 (shifted). NFE = steps.
- `heun`: ODE, second order on the same grid. NFE = 2 * steps.
`SampleResult.nfe` counts velocity evaluations; with guidance active one evaluation runs the model on the
conditional and unconditional halves of a doubled batch (pass `counter` to `guided_velocity` to count them).

Guidance (`guided_velocity`), decided once here:
- Each output gets the classifier-free formula v = v_u + w (v_c - v_u) with its own scale: the image with
  `cfg_scale`, the REG class token with `cls_cfg_scale`. Any finite w is taken as written: w = 1 is the
  conditional model, 0 the unconditional one, w < 1 a weaker conditioning (useful in ablations), w > 1 guidance.
- The unconditional branch (null label; with `path_drop` also the SPRINT sparse path replaced by [MASK]) is
  evaluated only when it can change the result: t inside [low, high] and a scale that applies differs from 1
  (`cls_cfg_scale` applies only when the model has the REG token). Otherwise the velocity is the conditional
  model's, bit for bit, and no second pass runs (path-drop guidance at scale 1 costs nothing).
- Where this differs from the SR-DiT / REPA reference samplers (which guide only when cfg_scale > 1): there,
  cfg_scale <= 1 means no guidance at all and cls_cfg_scale is then ignored; cls_cfg_scale <= 0 means an
  unguided class token. For every setting the reference accepts (cfg_scale > 1, cls_cfg_scale > 0) both agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from srdit.transport.path import score_from_velocity
from srdit.transport.timesteps import shift_time

Velocity = Callable[[list[torch.Tensor], torch.Tensor], list[torch.Tensor]]
SDE_T_END = 0.04  # the SDE stops its stochastic steps here (SR-DiT / SiT "last step" convention)


def initial_state(model_cfg, n: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The sampler's starting noise at t = 1: the image [n, C, H, W], then the REG class token [n, reg.dim] when
    REG is on. `model_cfg` is a `srdit.config.ModelConfig`; the draw order (image first) is part of the
    evaluation protocol (same seed, same samples)."""
    m = model_cfg
    state = [torch.randn(n, m.in_channels, m.input_size, m.input_size, generator=generator)]
    if m.reg.enabled:
        state.append(torch.randn(n, m.reg.dim, generator=generator))
    return state


@dataclass
class SampleResult:
    state: list[torch.Tensor]
    nfe: int


def time_grid(sampler: str, steps: int, shift: float = 1.0, device="cpu") -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if sampler == "sde":
        if steps < 2:
            raise ValueError("the SDE sampler needs steps >= 2 (stochastic steps plus the final Euler step)")
        grid = torch.cat([torch.linspace(1.0, SDE_T_END, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    elif sampler in ("euler", "heun"):
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: sde, euler, heun")
    return shift_time(grid, shift).to(device)


def sample(velocity: Velocity, noise: list[torch.Tensor], sampler: str = "sde", steps: int = 50,
           shift: float = 1.0, generator: torch.Generator | None = None) -> SampleResult:
    """Integrate from the noise state at t = 1 to t = 0. The state is kept in float64."""
    calls = 0

    def v_at(state, t):
        nonlocal calls
        calls += 1
        tt = torch.full((state[0].shape[0],), float(t), dtype=torch.float32, device=state[0].device)
        return [v.double() for v in velocity(state, tt)]

    grid = time_grid(sampler, steps, shift, device="cpu")
    state = [x.double() for x in noise]
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        dt = t_next - t  # negative
        v = v_at(state, t)
        if sampler == "euler" or (sampler == "sde" and i == len(grid) - 2):
            if sampler == "sde":  # final deterministic step uses the SDE drift without noise
                v = [vi - t * score_from_velocity(x, vi, torch.tensor(t)) for x, vi in zip(state, v)]
            state = [x + vi * dt for x, vi in zip(state, v)]
        elif sampler == "heun":
            pred = [x + vi * dt for x, vi in zip(state, v)]
            v2 = v_at(pred, t_next)
            state = [x + 0.5 * (a + b) * dt for x, a, b in zip(state, v, v2)]
        else:  # sde: drift v - 1/2 w s with w = 2t, plus sqrt(w |dt|) noise
            new = []
            for x, vi in zip(state, v):
                drift = vi - t * score_from_velocity(x, vi, torch.tensor(t))
                noise_i = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
                new.append(x + drift * dt + (2 * t * abs(dt)) ** 0.5 * noise_i)
            state = new
    return SampleResult(state, nfe=calls)


def guides(cfg_scale: float, cls_cfg_scale: float, reg: bool) -> bool:
    """Whether guidance can change the sampler's result: a scale that applies differs from 1 (see module doc)."""
    return cfg_scale != 1.0 or (reg and cls_cfg_scale != 1.0)


def guided_velocity(model, y: torch.Tensor, null_label: int, cfg_scale: float = 1.0, cls_cfg_scale: float = 1.0,
                    low: float = 0.0, high: float = 1.0, path_drop: bool = False, counter: list | None = None,
                    dtype: torch.dtype = torch.float32) -> Velocity:
    """Velocity of `model` for labels y [B], with classifier-free guidance inside [low, high] (t = 1 noise); the
    semantics (which scale applies, when the unconditional branch runs) are in the module docstring.

    The unconditional branch uses the null label and, with `path_drop`, also drops the SPRINT sparse path
    (path-drop guidance; SR-DiT section 3.2). When guiding, both branches run as one forward on a [2B] batch
    (conditional half first); equal to two separate passes up to float32 round-off of the batched kernels.
    `counter`, when given, gets one entry per forward: the number of branches it evaluated (1 or 2)."""
    y_null = torch.full_like(y, null_label)
    labels2 = torch.cat([y, y_null])  # [2B]
    drop2 = torch.cat([torch.zeros_like(y, dtype=torch.bool), torch.ones_like(y, dtype=torch.bool)]) if path_drop \
        else False  # [2B]: only the unconditional half drops the sparse path

    def call(state, t, labels, drop, branches):
        if counter is not None:
            counter.append(branches)
        x = state[0].to(dtype)
        cls_token = state[1].to(dtype) if len(state) > 1 else None
        v, aux = model(x, t, labels, cls_token, drop_sparse_path=drop)
        return [v] + ([aux["reg"]] if "reg" in aux else [])

    def velocity(state, t):
        if not (guides(cfg_scale, cls_cfg_scale, len(state) > 1) and low <= float(t[0]) <= high):
            return call(state, t, y, False, 1)
        both = call([torch.cat([s, s]) for s in state], torch.cat([t, t]), labels2, drop2, 2)
        scales = [cfg_scale, cls_cfg_scale]
        out = []
        for i, v in enumerate(both):
            c, u = v.chunk(2)
            out.append(c if scales[i] == 1.0 else u + scales[i] * (c - u))
        return out

    return velocity
