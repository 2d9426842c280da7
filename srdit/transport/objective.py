"""The training objective: one step's noise, the noised inputs, the targets and the named, weighted losses.

In the spirit of DiT's / SiT's `training_losses` (SiT, Ma et al. 2024, arXiv:2401.08740): the trainer draws the
step's randomness (`StepNoise.draw`), calls `training_losses` and back-propagates `["loss"]`; everything that
depends on a technique of the objective lives here, not in the trainer.

Conventions (`srdit.transport.path`): t = 1 is pure noise, t = 0 is data; x_t = (1 - t) x0 + t eps; the model
predicts the velocity v* = d x_t / dt = eps - x0.

Terms (`srdit.transport.losses`; weights from `cfg.loss`, fm has weight 1):
- fm:   flow matching on the image velocity (SiT);
- repa: REPA (Yu et al. 2024, arXiv:2410.06940): the model's projected hidden tokens [B, T', teacher_dim] align
        with the teacher's patch tokens [B, T, teacher_dim] by cosine; with REG on, the sequence starts with the
        class token, so its target starts with the teacher's class token (T' = T + 1); its technique's `loss` hook
        (`srdit.builtins.repa`), which gets the teacher and the projected tokens through `LossContext`;
- reg:  REG (Wu et al. 2025, arXiv:2507.01467): the teacher's class token cls0 [B, reg.dim] is noised on the same
        path with its own noise, x_t^cls = (1 - t) cls0 + t eps_cls (here: the model's input), enters as token 0,
        and its velocity eps_cls - cls0 is regressed like the image's: its technique's `loss` hook
        (`srdit.builtins.reg`), which gets eps_cls as `LossContext.noise_cls`;
- cfm:  contrastive flow matching (Stoica et al. 2025, arXiv:2506.05350): minus the error against the target of
        the previous sample in the (global) batch; its technique's `loss` hook (`srdit.builtins.cfm`), called
        through the same named-term path as a plugin's;
- plugin terms (`srdit.ext`): each plugin that is on and has a `loss` hook adds its named terms, weighed by the
  knobs it declares (`Plugin.terms`), after the built-in ones.

The total adds fm, then the hooked terms: the built-ins' in registry order (repa, reg, cfm), then the plugins', in
that order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

import srdit.builtins  # noqa: F401  registers the built-ins whose hooks the objective calls
from srdit.config import teacher_widths  # noqa: F401  re-exported: the objective's teacher tokens
from srdit.ext import Builtin, LossContext, builtin_enabled, enabled, time_rule
from srdit.transport.losses import flow_matching, total
from srdit.transport.path import interpolate, velocity_target
from srdit.transport.timesteps import sample_times

if TYPE_CHECKING:
    from srdit.config import RunConfig

TEACHER_SETTINGS = ("model.repa.teacher_dim", "model.reg.dim")
"The config keys that must equal the teacher's token width."


class BatchPart(Protocol):
    """What `StepNoise.draw` needs of data parallelism (`srdit.parallel.DataParallel`): this rank's rows of a
    global-batch tensor."""

    def part(self, x: torch.Tensor | None) -> torch.Tensor | None: ...


@dataclass
class StepNoise:
    """The randomness of one step for the *global* batch, drawn in a fixed order from the shared RNG and sliced
    to this rank, so that the random streams do not depend on the number of data-parallel workers.

    drop [B] bool (label dropout -> null label), t [B] in (0, 1), eps like x0 [B, C, H, W], eps_cls [B, reg.dim]
    (REG's class-token noise; None without REG), route [B, tokens] uniform (SPRINT's token selection; None
    without routing), path_drop [] bool (SPRINT drops its whole sparse path this step, with probability
    model.sprint.path_drop_prob; the same on every rank; None when SPRINT or its path drop is off). B is this
    rank's part of the global batch. Everything is drawn on `device`: no host round trip, and the model applies
    path_drop without branching on it (one graph under torch.compile)."""

    drop: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    eps_cls: torch.Tensor | None
    route: torch.Tensor | None
    path_drop: torch.Tensor | None = None

    @classmethod
    def draw(cls, cfg: RunConfig, model, x_shape, shift: float, device, dp: BatchPart) -> StepNoise:
        b, m = cfg.train.batch_size, cfg.model
        drop = torch.rand(b, device=device) < cfg.train.label_dropout
        # a plugin technique's time sampling (`srdit.ext`), else a built-in's `times` hook (logit-normal), else the
        # built-in uniform draw: one draw, at this place of the draw order, whichever it is
        rule = time_rule(cfg.ext) if cfg.ext else None
        hooked = builtin_enabled(cfg, "times") if rule is None else []
        if rule is not None:
            t = rule(b, shift, device)
        elif hooked:
            (builtin, knobs), *_ = hooked
            t = builtin.hooks["times"](knobs, b, shift, device)
        else:
            t = sample_times(b, "uniform", shift, device=device)
        eps = torch.randn((b, *x_shape[1:]), device=device)
        eps_cls = torch.randn(b, m.reg.dim, device=device) if m.reg.enabled else None
        tokens = model.routed_tokens
        route = torch.rand(b, tokens, device=device) if tokens else None
        s = m.sprint
        path_drop = torch.rand((), device=device) < s.path_drop_prob if s.enabled and s.path_drop_prob > 0 else None
        return cls(*(dp.part(v) for v in (drop, t, eps, eps_cls, route)), path_drop)


def _roll_by_one(x: torch.Tensor) -> torch.Tensor:
    return x.roll(1, dims=0)


def training_losses(
    model: Callable,
    x0: torch.Tensor,
    y: torch.Tensor,
    teacher_out: tuple[torch.Tensor | None, torch.Tensor | None] | None,
    cfg: RunConfig,
    noise: StepNoise,
    roll: Callable[[torch.Tensor], torch.Tensor] = _roll_by_one,
    autocast: AbstractContextManager | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The named loss terms of one step and their weighted sum under "loss" (first key).

    model:       the network (SiT, or its DDP / compiled wrapper): (x_t, t, y, cls_token, route_noise=...) ->
                 (velocity [B, C, H, W], aux with "repa" [B, T', teacher_dim] / "reg" [B, reg.dim] when on).
    x0:          clean data (images or latents) [B, C, H, W].
    y:           labels [B] in [0, num_classes); noise.drop replaces some by the null label num_classes.
    teacher_out: (patch tokens [B, T, teacher_dim], class token [B, reg.dim]) from the alignment teacher, or None
                 when neither REPA nor REG is on (see `teacher_widths`).
    cfg:         the run config: cfg.model says which terms exist, cfg.loss weighs them.
    noise:       the step's randomness (`StepNoise.draw`, this rank's slice of the global batch).
    roll:        the batch rolled by one for CFM's negatives; under data parallel `DataParallel.rolled`, so that the
                 roll runs over the global batch (a collective: every rank calls it).
    autocast:    context for the model's forward only (mixed precision); the losses are computed in float32.
    gather:      plugin terms (`srdit.ext.LossContext.gather`): this rank's [B, ...] -> the global batch, with the
                 gradient of every rank's copy summed back to its own rows (`DataParallel.all_gather`); one
                 process: the identity.

    Returns {"loss": weighted total, "fm": ..., "repa" / "reg" / "cfm" when on, then the plugins' terms}, each a
    scalar tensor.
    """
    m = cfg.model
    gather = gather if gather is not None else _identity
    cls0 = teacher_out[1] if teacher_out is not None else None
    y = torch.where(noise.drop, torch.full_like(y, m.num_classes), y)  # label dropout for guidance
    t, eps = noise.t, noise.eps
    cls_t = interpolate(cls0, noise.eps_cls, t) if m.reg.enabled else None  # REG's noised class token (an input)
    with autocast if autocast is not None else contextlib.nullcontext():
        pred, aux = model(
            interpolate(x0, eps, t),
            t,
            y,
            cls_t,
            route_noise=noise.route,
            **({"drop_sparse_path": noise.path_drop} if noise.path_drop is not None else {}),
        )
    target = velocity_target(x0, eps)
    terms = {"fm": flow_matching(pred, target)}
    hooked = [*builtin_enabled(cfg, "loss"), *(enabled(cfg.ext) if cfg.ext else [])]
    more, weights = _hook_terms(
        hooked, model, aux, x0, y, t, eps, noise.eps_cls, pred, target, teacher_out, roll, gather
    )
    return {"loss": total(terms["fm"], more, weights), **terms, **more}


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _hook_terms(hooked, model, aux, x0, y, t, eps, eps_cls, pred, target, teacher_out, roll, gather):
    """The loss terms of the techniques that are on and have a `loss` hook ({term: unweighted scalar}), built-ins
    (`srdit.builtins`: REPA, REG, CFM) first in registry order, then plugins in name order, and their weights ({term:
    float}). `hooked`: their (declaration, knobs) pairs. A built-in may leave out a term whose model output is
    absent (REPA's tap in evaluation mode); a plugin returns all its declared terms."""
    net = model
    while hasattr(net, "module") or hasattr(net, "_orig_mod"):  # DDP / torch.compile wrappers
        net = getattr(net, "module", None) or net._orig_mod
    terms: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    ext_aux = aux.get("ext", {})
    for plugin, knobs in hooked:
        hook = plugin.hooks.get("loss")
        if hook is None:
            continue
        mine = ext_aux.get(plugin.name, {})
        ctx = LossContext(
            x0=x0,
            y=y,
            t=t,
            noise=eps,
            pred=pred,
            target=target,
            teacher=teacher_out,
            taps=mine.get("taps", {}),
            outputs=mine.get("outputs"),
            module=net.ext[plugin.name] if getattr(net, "ext", None) is not None and plugin.name in net.ext else None,
            knobs=knobs,
            gather=gather,
            roll=roll,
            aux=aux,
            noise_cls=eps_cls,
        )
        out = hook(ctx)
        builtin = isinstance(plugin, Builtin)
        if not isinstance(out, dict) or not (
            set(out) <= set(plugin.terms) if builtin else set(out) == set(plugin.terms)
        ):
            raise ValueError(
                f"plugin {plugin.name}: the loss hook returned {sorted(out) if isinstance(out, dict) else out!r}; "
                f"expected its declared terms {sorted(plugin.terms)}"
            )
        for term, value in out.items():
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"plugin {plugin.name}: loss term {term} is {shape}; expected a scalar tensor")
            terms[term] = value
            weights[term] = float(getattr(knobs, plugin.terms[term]))
    return terms, weights
