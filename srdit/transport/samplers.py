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
- The unconditional branch (null label; with `unconditional` also what a technique asks of it, e.g. path-drop
  guidance's SPRINT sparse path replaced by [MASK]) is
  evaluated only when it can change the result: t inside [low, high] and a scale that applies differs from 1
  (`cls_cfg_scale` applies only when the model has the REG token). Otherwise the velocity is the conditional
  model's, bit for bit, and no second pass runs (path-drop guidance at scale 1 costs nothing).
- Where this differs from the SR-DiT / REPA reference samplers (which guide only when cfg_scale > 1): there,
  cfg_scale <= 1 means no guidance at all and cls_cfg_scale is then ignored; cls_cfg_scale <= 0 means an
  unguided class token. For every setting the reference accepts (cfg_scale > 1, cls_cfg_scale > 0) both agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

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
        grid = torch.cat(
            [torch.linspace(1.0, SDE_T_END, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
        )
    elif sampler in ("euler", "heun"):
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: sde, euler, heun")
    return shift_time(grid, shift).to(device)


NOISE_CHUNK_BYTES = 64 << 20
"Bytes of SDE noise (float64) one `SdeNoise` chunk buffer holds; a batch's noise is drawn this much at a time."


class SdeNoise:
    """The SDE sampler's per-step noise of one batch, drawn into preallocated buffers.

    Draw order and values are those of drawing `torch.randn(x.shape, generator=generator, dtype=torch.float64)` for
    each state tensor x at each stochastic step (so the samples do not depend on the device or the chunking, bit for
    bit): every slice is filled by the same kernel from the same generator stream. The noise of `chunk` steps at a
    time (`NOISE_CHUNK_BYTES`, at least one step) goes into a host buffer [chunk, *shape] per state tensor; on CUDA
    the host buffers are pinned, a background thread fills the next chunk while the device samples, and each chunk
    reaches a device buffer with one non-blocking copy, so the sampling loop neither allocates noise nor copies it
    to the device per step. `background` forces the thread on (True) or off (False); default: on for CUDA. The
    generator must not be used by anything else until `close`."""

    def __init__(
        self,
        shapes: list[torch.Size],
        steps: int,
        generator: torch.Generator | None,
        device: torch.device | str = "cpu",
        chunk_bytes: int = NOISE_CHUNK_BYTES,
        background: bool | None = None,
    ):
        self.shapes, self.steps, self.generator = [tuple(s) for s in shapes], int(steps), generator
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        per_step = 8 * sum(math.prod(s) for s in self.shapes)
        self.chunk = max(1, min(self.steps, chunk_bytes // max(per_step, 1)))
        chunks = -(-self.steps // self.chunk) if self.steps else 0
        threaded = (cuda if background is None else background) and chunks > 0
        copies = cuda or threaded  # a separate (device) buffer that the host chunks are copied into
        self._host = [
            [torch.empty((self.chunk, *s), dtype=torch.float64, pin_memory=cuda) for s in self.shapes]
            for _ in range(2 if threaded and chunks > 1 else 1)
        ]
        self._dev = (
            [torch.empty((self.chunk, *s), dtype=torch.float64, device=self.device) for s in self.shapes]
            if copies
            else None
        )
        self._copied: list = [None] * len(self._host)  # per host buffer: the CUDA event of its last copy
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sde-noise") if threaded else None
        self._pending: dict[int, Future] = {}
        self._loaded = -1
        if self._pool is not None:
            self._pending[0] = self._pool.submit(self._fill, 0)

    def _fill(self, j: int) -> None:
        """Draw chunk j into host buffer j % 2 (after that buffer's previous copy has left it)."""
        k = j % len(self._host)
        if self._copied[k] is not None:
            self._copied[k].synchronize()
        for i in range(self.chunk * j, min(self.steps, self.chunk * (j + 1))):
            for buf in self._host[k]:
                buf[i - self.chunk * j].normal_(generator=self.generator)  # = torch.randn(shape, dtype=float64)

    def _load(self, j: int) -> None:
        k = j % len(self._host)
        if self._pool is None:
            self._fill(j)
        else:
            self._pending.pop(j).result()
        if self._dev is not None:
            for d, h in zip(self._dev, self._host[k]):
                d.copy_(h, non_blocking=True)  # stream-ordered after the previous chunk's reads of d
            if self.device.type == "cuda":
                self._copied[k] = torch.cuda.Event()
                self._copied[k].record()
        if self._pool is not None and self.chunk * (j + 1) < self.steps:
            self._pending[j + 1] = self._pool.submit(self._fill, j + 1)
        self._loaded = j

    def __getitem__(self, step: int) -> list[torch.Tensor]:
        """The noise of stochastic step `step` (0-based, in order): one tensor per state tensor, float64, on the
        device (views of the buffer, valid until the next chunk is loaded)."""
        if not 0 <= step < self.steps:
            raise IndexError(f"SDE noise step {step} of {self.steps}")
        j, i = divmod(step, self.chunk)
        if j != self._loaded:
            self._load(j)
        return [b[i] for b in (self._dev if self._dev is not None else self._host[j % len(self._host)])]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def sample(
    velocity: Velocity,
    noise: list[torch.Tensor],
    sampler: str = "sde",
    steps: int = 50,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    noise_chunk_bytes: int = NOISE_CHUNK_BYTES,
    solver: Callable | None = None,
) -> SampleResult:
    """Integrate from the noise state at t = 1 to t = 0. The state is kept in float64; the SDE's noise comes from
    `generator` through `SdeNoise` (chunks of `noise_chunk_bytes`; the samples do not depend on it). `solver`
    (`srdit.ext.solver_rule`, a plugin technique's sampler) replaces the built-in integrator: it gets the ODE grid
    of `steps` intervals (shifted) and velocity(state, t: float)."""
    calls = 0
    if solver is not None:
        grid = time_grid("euler", steps, shift, device="cpu")
        state = [x.double() for x in noise]

        def v_of(state, t):
            nonlocal calls
            calls += 1
            tt = torch.full((state[0].shape[0],), float(t), dtype=torch.float32, device=state[0].device)
            return [v.double() for v in velocity([x.double() for x in state], tt)]

        return SampleResult([x.double() for x in solver(v_of, state, grid, generator)], nfe=calls)
    grid = time_grid(sampler, steps, shift, device="cpu")
    state = [x.double() for x in noise]
    times = grid.to(torch.float32).to(state[0].device)  # one copy per batch; t at step i is times[i]
    batch = state[0].shape[0]

    def v_at(state, i):
        nonlocal calls
        calls += 1
        return [v.double() for v in velocity(state, times[i].expand(batch))]

    sde_noise = (
        SdeNoise([x.shape for x in state], len(grid) - 2, generator, state[0].device, noise_chunk_bytes)
        if sampler == "sde"
        else None
    )
    try:
        for i in range(len(grid) - 1):
            t, t_next = float(grid[i]), float(grid[i + 1])
            dt = t_next - t  # negative
            v = v_at(state, i)
            if sampler == "euler" or (sampler == "sde" and i == len(grid) - 2):
                if sampler == "sde":  # final deterministic step uses the SDE drift without noise
                    v = [vi - t * score_from_velocity(x, vi, torch.tensor(t)) for x, vi in zip(state, v)]
                state = [x + vi * dt for x, vi in zip(state, v)]
            elif sampler == "heun":
                pred = [x + vi * dt for x, vi in zip(state, v)]
                v2 = v_at(pred, i + 1)
                state = [x + 0.5 * (a + b) * dt for x, a, b in zip(state, v, v2)]
            else:  # sde: drift v - 1/2 w s with w = 2t, plus sqrt(w |dt|) noise
                new = []
                for x, vi, eps in zip(state, v, sde_noise[i]):
                    drift = vi - t * score_from_velocity(x, vi, torch.tensor(t))
                    new.append(x + drift * dt + (2 * t * abs(dt)) ** 0.5 * eps)
                state = new
    finally:
        if sde_noise is not None:
            sde_noise.close()
    return SampleResult(state, nfe=calls)


def guides(cfg_scale: float, cls_cfg_scale: float, reg: bool) -> bool:
    """Whether guidance can change the sampler's result: a scale that applies differs from 1 (see module doc)."""
    return cfg_scale != 1.0 or (reg and cls_cfg_scale != 1.0)


def guided_velocity(
    model,
    y: torch.Tensor,
    null_label: int,
    cfg_scale: float = 1.0,
    cls_cfg_scale: float = 1.0,
    low: float = 0.0,
    high: float = 1.0,
    unconditional: Mapping[str, bool] | None = None,
    counter: list | None = None,
    dtype: torch.dtype = torch.float32,
    rule: Callable | None = None,
) -> Velocity:
    """Velocity of `model` for labels y [B], with classifier-free guidance inside [low, high] (t = 1 noise); the
    semantics (which scale applies, when the unconditional branch runs) are in the module docstring.

    The unconditional branch uses the null label and, with `unconditional`, also passes the model those keyword
    arguments as per-sample bool tensors [2B] that hold them on the unconditional half only (the `unconditional`
    point of `srdit.ext.CORE_HOOKS`; path-drop guidance, SR-DiT section 3.2: {"drop_sparse_path": True}); the
    conditional pass alone gets them as False. When guiding, both branches run as one forward on a [2B] batch
    (conditional half first); equal to two separate passes up to float32 round-off of the batched kernels.
    `counter`, when given, gets one entry per forward: the number of branches it evaluated (1 or 2). `rule`
    (`srdit.ext.guidance_rule`, a plugin technique's guidance) replaces u + w (c - u) for the image velocity:
    rule(cond, uncond, x, t, w) -> [B, C, H, W]."""
    y_null = torch.full_like(y, null_label)
    labels2 = torch.cat([y, y_null])  # [2B]
    asked = {k: v for k, v in (unconditional or {}).items() if v}
    half = [torch.zeros_like(y, dtype=torch.bool), torch.ones_like(y, dtype=torch.bool)]
    kwargs2 = {k: torch.cat(half) for k in asked}  # [2B]: only the unconditional half asks
    kwargs1 = dict.fromkeys(asked, False)

    def call(state, t, labels, kwargs, branches):
        if counter is not None:
            counter.append(branches)
        x = state[0].to(dtype)
        cls_token = state[1].to(dtype) if len(state) > 1 else None
        v, aux = model(x, t, labels, cls_token, **kwargs)
        return [v] + ([aux["reg"]] if "reg" in aux else [])

    def velocity(state, t):
        if not (guides(cfg_scale, cls_cfg_scale, len(state) > 1) and low <= float(t[0]) <= high):
            return call(state, t, y, kwargs1, 1)
        both = call([torch.cat([s, s]) for s in state], torch.cat([t, t]), labels2, kwargs2, 2)
        scales = [cfg_scale, cls_cfg_scale]
        out = []
        for i, v in enumerate(both):
            c, u = v.chunk(2)
            if i == 0 and rule is not None:
                out.append(rule(c, u, state[0].to(dtype), t, scales[0]))
            else:
                out.append(c if scales[i] == 1.0 else u + scales[i] * (c - u))
        return out

    return velocity
