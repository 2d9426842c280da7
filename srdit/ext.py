"""Plugin techniques: the one registration API for a technique that lives outside srdit.

A plugin is a Python file, a package folder or an importable module that defines one or more `Plugin` objects at
module level. A run or study YAML lists it under `plugins:` (a module name, or a `.py` file / package folder
relative to the YAML); an installed package can also declare it in the entry-point group `srdit.techniques`
(`ENTRY_POINT_GROUP`, the value a `Plugin` or a module). Once loaded (`srdit.techniques.load_plugins`), the plugin is a
technique like the built-ins: a study factor by its name, with its knobs as `name: {knob: value}`.

What a plugin declares (checked when it is loaded; a bad plugin is one `ConfigError` line):
- `name`, `paper`, `description`, `stage` ("train": it shapes the trained weights; "eval": it acts only when
  sampling or evaluating);
- `knobs`: short name -> `Knob(default, range=(low, high))` for numbers (None = unbounded on that side; a numeric
  knob without a range is refused), `Knob(default, choices=(...))` for strings, `Knob(True/False)` for switches.
  They are checked by the same loader and rules as the built-in config fields (`srdit.config.from_dict`, `Range`);
- `hooks`: hook name -> function, among `HOOKS`. A hook is called only while its technique is on: a plugin that is
  off is absent from the config (`ext` section), builds no module and runs no code ("off = absent" by construction);
- `terms`: loss-term name -> the knob that weighs it in the total loss.

The hooks (shapes: B this rank's batch, T tokens in the block's sequence, D model width; data parallel: B is the
rank's share of the global batch):
- `build(cfg, knobs) -> nn.Module | None`: the plugin's own modules and parameters, created with their own init
  *after* the backbone's (so the backbone's weights equal the plain model's), optimised, EMA'd and checkpointed with
  the model (state-dict prefix `ext.<name>.`). `cfg` is the `ModelConfig`; the width is `srdit.config.SIZES[
  cfg.size][1]`. When the plugin taps blocks, the model calls the module inside its forward (training only) on
  the taps (`{block: [B, T, D]}`) and its output reaches the loss as `LossContext.outputs`; the loss also gets the
  module itself (`LossContext.module`).
- `taps(cfg, knobs) -> iterable of int`: the blocks whose output the plugin reads: i in 1..depth is the hidden state
  [B, T, D] after block i (i blocks run). Training only. Inside SPRINT's sparse middle, T is the kept tokens K.
- `loss(ctx: LossContext) -> {term: scalar tensor}`: unweighted loss terms, each declared in `terms`; the trainer
  adds `weight * term` to the total loss and logs `loss/<term>` like the built-in terms.
- `tokens(cfg, knobs) -> int` and `embed_tokens(module, c) -> [B, n, D]` (together, with `build`): n extra tokens
  (register or prefix tokens, e.g. registers, Darcet et al. 2023, arXiv:2309.16588) that join the sequence after the
  patch embedding, in training and sampling; `c` [B, D] is the block conditioning (time + label embedding). The
  model handles their layout once: they sit after the REG class token (when on) and before the patch tokens, carry
  no position (no sin-cos embedding; RoPE's identity rotation), are never dropped by SPRINT's router (they join
  every sample's kept tokens; the route noise keeps its shape, so the other tokens are routed as without them),
  are left out of REPA's alignment, and are dropped before the output head. Taps include them (at positions
  [r, r + n), r = 1 with REG, else 0; several token plugins follow each other in name order).
- `attention(cfg, knobs, block) -> nn.Module | None` and `mlp(cfg, knobs, block) -> nn.Module | None`: an attention
  or MLP variant for block `block` (1..depth; None keeps the block's own). Built after the backbone's init with
  the module's own init and put in place of the block's module (so every other weight equals the plain model's;
  the state-dict keys stay `blocks.<i>.attn.` / `blocks.<i>.mlp.`). An MLP maps [B, T, D] -> [B, T, D]. An
  attention takes (x [B, T, D], rope=None | (cos, sin) tables, v_first=None | block 1's values [B, H, T, d]) and
  returns (out [B, T, D], its values [B, H, T, d]): start from `srdit.model.parts.attention(cfg, block)` to keep
  the built-ins that are on (QK-norm, value residual; RoPE's tables come in as `rope`). Two plugins may not replace
  the same block's module.
- `times(knobs, n, shift, device) -> t [n]`: the training times of the step's *global* batch (n samples), in
  place of the built-in draw (uniform, or the logit-normal built-in's own `times` hook, then the time shift `shift`,
  which the hook applies or not as it sees fit; a plugin's hook wins over the built-in's); drawn from torch's global RNG on `device` at the built-in draw's place in the step's draw
  order, and sliced to each data-parallel rank afterwards, so that the trajectory does not depend on the number of
  workers. Every t must lie in [0, 1] (t = 1 noise). At most one plugin with this hook may be on.
- `solver(knobs, velocity, state, times, generator) -> state`: a sampler (an ODE or SDE solver) in place of the
  built-in integrator of `sample.sampler`. `state` is the list of tensors at t = 1 (the image [B, C, H, W], then
  the REG class token [B, reg.dim] when on; float64), `times` the float64 grid of `sample.steps` + 1 points from 1
  to 0 with the time shift applied, `velocity(state, t) -> list` the (guided) velocity at the float t (each call
  counts as one function evaluation), `generator` the batch's torch.Generator for any noise. Returns the state at
  t = 0. At most one plugin with this hook may be on.
- `labels(knobs, n, num_classes, rows, generator) -> [len(rows)] int64`: the class labels (0..num_classes-1) of
  the evaluation samples `rows` (a range of indices into the n samples of one sampling seed: one sampling batch),
  in place of the uniform random draw from the batch's CPU `generator`, which comes first in the batch's draw order
  (a hook that draws nothing leaves the generator to the initial noise; balanced labels, `srdit.builtins`). At
  sampling only; at most one plugin with this hook may be on.
- `guidance(ctx: GuidanceContext) -> [B, C, H, W]`: the guided velocity from the conditional and unconditional
  ones, in place of classifier-free guidance's u + w (c - u) (e.g. adaptive projected guidance, Sadat et al. 2024,
  arXiv:2410.02416). Called at sampling only, at each step where guidance applies (`sample.cfg_scale` != 1, t
  inside [guidance_low, guidance_high]); the REG class token keeps the built-in rule. At most one plugin with this
  hook may be on. A technique that acts only here has stage "eval": its on and off cells share one training.

Built-in techniques declare themselves through the same API (`Builtin`, `register_builtin`), one module each in
`srdit.builtins`, with their knobs over the typed config keys of the core.

Layering: this module is in the config layer (no torch at import); `srdit.config` holds the knob schema of the
loaded plugins (`EXTENSIONS`) and `srdit.techniques` turns a plugin or a built-in into a `Technique`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
import traceback
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from srdit.config import (
    EXTENSIONS,
    FINITE,
    RANGE,
    ConfigError,
    Range,
    RunConfig,
    convert_value,
    from_dict,
    input_file_problem,
)

Tensor = Any
"A Tensor (torch is not imported here: the config layer stays free of it)."

ENTRY_POINT_GROUP = "srdit.techniques"
'Entry-point group of installed plugin packages (`[project.entry-points."srdit.techniques"]`).'

HOOKS: dict[str, tuple[str, ...]] = {
    "build": ("cfg", "knobs"),
    "taps": ("cfg", "knobs"),
    "loss": ("ctx",),
    "tokens": ("cfg", "knobs"),
    "embed_tokens": ("module", "c"),
    "guidance": ("ctx",),
    "attention": ("cfg", "knobs", "block"),
    "mlp": ("cfg", "knobs", "block"),
    "times": ("knobs", "n", "shift", "device"),
    "solver": ("knobs", "velocity", "state", "times", "generator"),
    "labels": ("knobs", "n", "num_classes", "rows", "generator"),
}
"Hook name -> its positional parameters (see the module docstring for what each receives and returns)."

BUILTIN_TERMS = ("loss", "fm", "repa", "reg", "cfm", "grad_norm")
"Metric names a plugin's loss terms may not take."

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Knob:
    """One setting of a plugin: `default`; numbers need `range=(low, high)` (inclusive unless `low_open` /
    `high_open`; None = unbounded on that side), strings need `choices`. `type` defaults to the default's type
    (bool, int, float or str); an int default with type float is a float knob."""

    default: Any
    range: tuple[float | None, float | None] | None = None
    choices: tuple[Any, ...] | None = None
    type: type | None = None
    low_open: bool = False
    high_open: bool = False
    help: str = ""


@dataclass(frozen=True)
class Plugin:
    """A technique declared outside srdit (see the module docstring)."""

    name: str
    paper: str
    description: str = ""
    stage: Literal["train", "eval"] = "train"
    knobs: Mapping[str, Knob] = field(default_factory=dict)
    hooks: Mapping[str, Callable] = field(default_factory=dict)
    terms: Mapping[str, str] = field(default_factory=dict)
    "Loss-term name -> the knob that weighs it."
    origin: str = ""
    "Where it was loaded from: the absolute file or package folder, or the module name (filled in when loaded)."
    source: str = ""
    "The file or package folder of its code (filled in when loaded)."

    @property
    def knob_keys(self) -> dict[str, str]:
        """Short knob name -> dotted config key (`ext.<name>.<knob>`)."""
        return {k: f"ext.{self.name}.{k}" for k in self.knobs}

    def defaults(self) -> dict[str, Any]:
        return {k: kn.default for k, kn in self.knobs.items()}

    def knob_values(self, values: Mapping[str, Any]) -> Any:
        """The resolved knobs (a frozen dataclass, attribute access: `knobs.weight`) from the config's
        `ext.<name>` mapping."""
        return from_dict(EXTENSIONS[self.name], values, f"ext.{self.name}")

    def hook(self, name: str) -> Callable | None:
        return self.hooks.get(name)

    def where(self) -> str:
        """Where its code lives, for listings."""
        return self.source or self.origin


@dataclass
class LossContext:
    """What a technique's `loss` hook sees for one training step (this rank's part of the global batch).

    x0 [B, C, H, W] clean data; y [B] labels after label dropout (num_classes = null label); t [B] times in (0, 1)
    (t = 1 noise); noise [B, C, H, W] the eps of x_t = (1 - t) x0 + t eps; pred, target [B, C, H, W] predicted and
    target velocity (eps - x0); teacher (patch tokens [B, T, teacher_dim], class token [B, reg.dim]) or None when
    no built-in technique needs a teacher; taps {block i: hidden state [B, T, D] after block i}; outputs what the
    plugin's module returned on the taps (None without a module); module the plugin's module (None without one);
    knobs the resolved knobs; gather(x [B, ...]) -> the global batch [world * B, ...] in global order, differentiable
    (each rank's gradient reaches its own rows, summed over ranks, so that after data parallel's gradient mean a
    cross-sample loss follows the one-process trajectory); roll(x [B, ...]) -> this rank's rows of the global batch
    rolled by one (x_{j-1})."""

    x0: Tensor
    y: Tensor
    t: Tensor
    noise: Tensor
    pred: Tensor
    target: Tensor
    teacher: tuple | None
    taps: dict[int, Tensor]
    outputs: Any
    module: Any
    knobs: Any
    gather: Callable[[Tensor], Tensor]
    roll: Callable[[Tensor], Tensor]
    aux: dict[str, Tensor] = field(default_factory=dict)
    """The model's outputs for the built-ins' terms: "repa" [B, T', teacher_dim] (REPA's projected tokens, training
    only; T' = T + 1 with REG's class token first), "reg" [B, reg.dim] (REG's class-token velocity)."""
    noise_cls: Tensor | None = None
    "REG's class-token noise eps_cls [B, reg.dim] (x_t^cls = (1 - t) cls0 + t eps_cls); None without REG."


@dataclass
class GuidanceContext:
    """What a plugin's `guidance` hook sees at one sampler step (one sampling batch).

    cond, uncond [B, C, H, W] the conditional and unconditional velocities (float32; the unconditional one with the
    null label, and without SPRINT's sparse path under path-drop guidance); x [B, C, H, W] the state at time t;
    t [B] the time (t = 1 noise); scale the guidance scale w (`sample.cfg_scale`); knobs the resolved knobs."""

    cond: Tensor
    uncond: Tensor
    x: Tensor
    t: Tensor
    scale: float
    knobs: Any


def _replacing(ext: Mapping[str, Mapping[str, Any]], hook: str, what: str) -> tuple[Plugin, Any, Callable] | None:
    """(plugin, knobs, its `hook`) of the one plugin that is on and replaces `what` through `hook`, or None;
    ConfigError naming them when several are on (one thing has one rule)."""
    on = [(p, k) for p, k in enabled(ext) if p.hook(hook) is not None]
    if len(on) > 1:
        raise ConfigError(f"ext: {', '.join(p.name for p, _ in on)} all replace {what}; switch on one at a time")
    return (on[0][0], on[0][1], on[0][0].hook(hook)) if on else None


def time_rule(ext: Mapping[str, Mapping[str, Any]]) -> Callable[[int, float, Any], Tensor] | None:
    """The training-time sampler of the plugin with a `times` hook that is on, as `rule(n, shift, device) -> t [n]`,
    or None (the built-in draw). ConfigError when several are on; ValueError when it returns other than n times
    (or, on its first draw, times outside [0, 1])."""
    key = repr(sorted((name, id(PLUGINS.get(name)), sorted(dict(knobs).items())) for name, knobs in ext.items()))
    if key not in _TIME_RULES:  # called every training step: resolved once per `ext` section and loaded plugins
        _TIME_RULES[key] = _time_rule(ext)
    return _TIME_RULES[key]


_TIME_RULES: dict[str, Callable | None] = {}


def _time_rule(ext: Mapping[str, Mapping[str, Any]]) -> Callable[[int, float, Any], Tensor] | None:
    found = _replacing(ext, "times", "the time sampling")
    if found is None:
        return None
    plugin, knobs, hook = found
    checked = False

    def rule(n, shift, device):
        nonlocal checked
        t = hook(knobs, n, shift, device)
        # the range is read back from the device on the first draw only: no host sync on every step
        if getattr(t, "shape", None) != (n,) or not (checked or bool(((t >= 0) & (t <= 1)).all())):
            got = tuple(t.shape) if hasattr(t, "shape") else type(t).__name__
            raise ValueError(f"plugin {plugin.name}: times returned {got}; expected {n} times in [0, 1]")
        checked = True
        return t

    return rule


def solver_rule(ext: Mapping[str, Mapping[str, Any]]) -> Callable | None:
    """The sampler of the plugin with a `solver` hook that is on, as `rule(velocity, state, times, generator) ->
    state`, or None (the built-in integrator). ConfigError when several are on."""
    found = _replacing(ext, "solver", "the sampler")
    if found is None:
        return None
    plugin, knobs, hook = found

    def rule(velocity, state, times, generator):
        out = hook(knobs, velocity, state, times, generator)
        if not isinstance(out, list | tuple) or [getattr(x, "shape", None) for x in out] != [x.shape for x in state]:
            raise ValueError(f"plugin {plugin.name}: the solver returned other than the state's tensors and shapes")
        return list(out)

    return rule


def label_rule(ext: Mapping[str, Mapping[str, Any]]) -> Callable | None:
    """The evaluation labels of the plugin with a `labels` hook that is on, as `rule(n, num_classes, rows,
    generator) -> [len(rows)]`, or None (the built-in draw). ConfigError when several are on; ValueError when it
    returns other than len(rows) labels in [0, num_classes)."""
    found = _replacing(ext, "labels", "the evaluation labels")
    if found is None:
        return None
    plugin, knobs, hook = found
    return checked_labels(f"plugin {plugin.name}", knobs, hook)


def checked_labels(name: str, knobs: Any, hook: Callable) -> Callable:
    """A `labels` hook of technique `name` as `rule(n, num_classes, rows, generator)`, its output checked."""

    def rule(n, num_classes, rows, generator):
        out = hook(knobs, n, num_classes, rows, generator)
        if getattr(out, "shape", None) != (len(rows),) or not bool(((out >= 0) & (out < num_classes)).all()):
            got = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
            raise ValueError(f"{name}: labels returned {got}; expected {len(rows)} labels in [0, {num_classes})")
        return out

    return rule


def guidance_rule(
    ext: Mapping[str, Mapping[str, Any]],
) -> Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor] | None:
    """The guidance of the plugin with a `guidance` hook that is on in a config's `ext` section, as
    `rule(cond, uncond, x, t, scale) -> velocity`, or None (classifier-free guidance). ConfigError when several
    are on."""
    found = _replacing(ext, "guidance", "guidance")
    if found is None:
        return None
    plugin, knobs, hook = found

    def rule(cond, uncond, x, t, scale):
        out = hook(GuidanceContext(cond=cond, uncond=uncond, x=x, t=t, scale=scale, knobs=knobs))
        if getattr(out, "shape", None) != cond.shape:
            shape = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
            raise ValueError(f"plugin {plugin.name}: guidance returned {shape}; expected {tuple(cond.shape)}")
        return out

    return rule


# ----------------------------------------------------------------------------------------------------------------
# Built-in techniques: the same declaration, over the typed config keys of the core
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Builtin:
    """A technique that ships with srdit, declared in its own module of `srdit.builtins` through the same API as a
    `Plugin`: name, paper, description, stage, knobs and the extension points it acts through. Where a plugin's knobs
    live under `ext.<name>`, a built-in keeps the typed config keys of the core (`model.sprint.drop_ratio`, `loss.repa`,
    ...), so its configs, content keys and checkpoints are those of the switch it always was: `diff` is what switching
    it on writes, `knobs` maps a short knob name to the config key it overrides; each knob's default, type and range
    are the config field's (`knob_rules`), checked by the same loader.

    `hooks` are the functions it implements through `HOOKS`, called by the same extension points as a plugin's
    (e.g. a `loss` hook with its `terms`, each weighed by a knob), while `on` (a knob, or a key of its diff when no
    knob holds the switch) holds a value other than its config field's default (`builtin_enabled`); `knobs` then
    reach the hooks as their values (attribute access). A hook may import torch inside its body, never at module
    level (this package and `srdit.builtins` sit in the config layer).
    `points` names every extension point it acts through (`HOOKS`, or the core's own `CORE_POINTS`), those its
    `hooks` implement and those whose code stays in the core; `code` the modules beyond its own that hold those
    pieces. `module` is the declaring module (filled in by `register_builtin`)."""

    name: str
    paper: str
    description: str
    diff: Mapping[str, Any]
    knobs: Mapping[str, str] = field(default_factory=dict)
    stage: Literal["train", "eval"] = "train"
    points: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    hooks: Mapping[str, Callable] = field(default_factory=dict)
    terms: Mapping[str, str] = field(default_factory=dict)
    "Loss-term name -> the knob that weighs it."
    on: str = ""
    """What switches the hooks on (required with hooks): a knob, or a key of `diff` when no knob holds the switch
    (`model.repa.enabled`); on while its config value differs from the config field's default."""
    module: str = ""

    def where(self) -> tuple[str, ...]:
        """Where its code lives, for listings: its own module first."""
        return (self.module, *self.code) if self.module else tuple(self.code)

    def knob_rules(self) -> dict[str, tuple[Any, Any]]:
        """Short knob name -> (default, rule) of the config field it writes: a `Range` for numbers, the allowed
        values (a tuple) for a choice, None for a switch."""
        return {k: config_field_rule(key) for k, key in self.knobs.items()}


@functools.cache
def config_field_rule(key: str) -> tuple[Any, Any]:
    """(default, rule) of the typed config field at dotted `key` (`RunConfig`): rule a `Range` for a number (the
    field's, or any finite value), the allowed values for a Literal, None otherwise. ConfigError for an unknown key."""
    cls: Any = RunConfig
    parts = key.split(".")
    for i, name in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if name not in fields:
            raise ConfigError(f"{key}: unknown config key")
        tp = typing.get_type_hints(cls)[name]
        if i < len(parts) - 1:
            cls = tp
            continue
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if typing.get_origin(tp) is Literal:
            return default, typing.get_args(tp)
        if tp in (int, float):
            return default, f.metadata.get(RANGE, FINITE)
        return default, None
    raise ConfigError(f"{key}: unknown config key")


CORE_HOOKS: dict[str, tuple[str, ...]] = {
    "norm": ("cfg", "knobs", "dim"),
    "activation": ("cfg", "knobs"),
    "qk_norm": ("cfg", "knobs", "head_dim"),
    "value_residual": ("cfg", "knobs", "block"),
    "rotary": ("cfg", "knobs", "head_dim", "grid", "prefix"),
    "unconditional": ("knobs",),
}
"""The backbone's and the sampler's own extension points, which the built-ins that shape the plain SiT implement
(`srdit.model.parts`, `srdit.generate`): hook name -> its positional parameters. Each is called only while its
technique is on, at the place where the plain SiT builds the part it replaces (so that the parameters, their init
and their state-dict keys are those of the switch it always was); at most one technique per point is on.
- `norm(cfg, knobs, dim) -> nn.Module`: the blocks' pre-norms and the final norm, [..., dim] -> [..., dim], without
  affine parameters (adaLN supplies scale and shift); in place of LayerNorm(eps 1e-6).
- `activation(cfg, knobs) -> (fn, gated)`: the MLP's hidden activation fn [..., h] -> [..., h] (gated: fn takes
  [..., 2 h'] -> [..., h'], the first layer's output holding value and gate, at h' = int(2 h / 3) to keep the
  weight count); in place of GELU(tanh).
- `qk_norm(cfg, knobs, head_dim) -> (q_norm, k_norm)`: modules [B, H, T, d] -> [B, H, T, d] applied to queries
  and keys before RoPE, state-dict keys `blocks.<i>.attn.q_norm.` / `.k_norm.`.
- `value_residual(cfg, knobs, block) -> nn.Parameter | None`: the learned scalar lambda of block `block` (1..depth)
  that mixes block 1's values into its own, V' = lambda V_1 + (1 - lambda) V (None: the block does not mix); key
  `blocks.<i>.attn.v_lambda`.
- `rotary(cfg, knobs, head_dim, grid, prefix) -> angles [prefix + grid^2, head_dim]`: the rotation angle of each
  token and channel pair (adjacent channels share one angle; the `prefix` leading tokens, which carry no position,
  get 0), for the rotary embedding of queries and keys (`srdit.model.layers.Rotary`).
- `unconditional(knobs) -> {model keyword: bool}`: what the unconditional branch of guidance passes the model
  besides the null label (path-drop guidance: `drop_sparse_path`); the conditional branch passes False."""

CORE_POINTS: dict[str, str] = {
    **{name: f"`{name}` hook of the core ({', '.join(params)})" for name, params in CORE_HOOKS.items()},
    "routing": "SPRINT's dense / sparse / dense split of the blocks and its token routing (`srdit.model.sit`)",
}
"""The extension points of the core that only built-ins use (besides `HOOKS`): name -> what it is. SPRINT's routing,
REPA's tap and REG's class token shape the token layout, which the backbone handles once for every technique
(positions, RoPE rows, routing, alignment taps, the output; `srdit.model.sit`): their modules live in the model."""

BUILTINS: dict[str, Builtin] = {}
"Name -> the built-in techniques, in registry order (filled by `srdit.builtins`)."


def register_builtin(b: Builtin, module: str) -> Builtin:
    """Check a built-in's declaration (as `check_plugin` does a plugin's: name, stage, paper, hooks; every diff and
    knob key a config field that takes the value) and make it known under its name; `module` is the declaring
    module. Returns the registered declaration. ConfigError naming the technique on a bad declaration or a second
    one of the same name."""
    if not isinstance(b, Builtin):
        raise ConfigError(f"{module}: expected an srdit.ext.Builtin, got {b!r}")
    where = f"built-in {b.name} ({module})"
    if not isinstance(b.name, str) or not _NAME.match(b.name):
        raise ConfigError(f"{where}: the name must be lower-case letters, digits and _")
    if b.stage not in ("train", "eval"):
        raise ConfigError(f"{where}: stage {b.stage!r} is not allowed; allowed: train, eval")
    if not b.paper or not b.description or not b.diff:
        raise ConfigError(f"{where}: paper, description and diff are required")
    for point in b.points:
        if point not in HOOKS and point not in CORE_POINTS:
            raise ConfigError(f"{where}: unknown point {point!r}; allowed: {', '.join([*HOOKS, *CORE_POINTS])}")
    for hook, fn in b.hooks.items():
        params = HOOKS.get(hook, CORE_HOOKS.get(hook))
        if params is None or hook not in b.points:
            raise ConfigError(
                f"{where}: hook {hook!r} is not one of its points ({', '.join(b.points)}) in HOOKS or CORE_HOOKS"
            )
        try:
            inspect.signature(fn).bind(*params)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: hook {hook} has the wrong signature; expected {hook}({', '.join(params)})"
            ) from None
    if b.hooks and b.on not in b.knobs and b.on not in b.diff:
        raise ConfigError(f"{where}: hooks need `on`, the knob or diff key whose value switches them on; got {b.on!r}")
    for term, knob in b.terms.items():
        if knob not in b.knobs or "loss" not in b.hooks:
            raise ConfigError(f"{where}: loss term {term} needs a loss hook and a weight among its knobs")
    for key, value in b.diff.items():
        convert_value(key, value)  # an unknown key or a value the field refuses: the loader's own line
    for knob, key in b.knobs.items():
        if not _NAME.match(knob):
            raise ConfigError(f"{where}: knob {knob!r} must be lower-case letters, digits and _")
        config_field_rule(key)
    b = dataclasses.replace(b, module=module)
    old = BUILTINS.get(b.name)
    if old is not None and old.module != module:
        raise ConfigError(f"{where}: already declared in {old.module}")
    BUILTINS[b.name] = b
    return b


def _config_value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def builtin_on(b: Builtin, cfg: Any) -> bool:
    """Whether built-in `b` is on in the run config `cfg`: its `on` knob differs from the config field's default,
    or its `on` diff key holds the value its diff writes (`model.mlp: swiglu` is SwiGLU's, not ReLU^2's)."""
    if b.on in b.knobs:
        key = b.knobs[b.on]
        return _config_value(cfg, key) != config_field_rule(key)[0]
    return _config_value(cfg, b.on) == b.diff[b.on]


def builtin_enabled(cfg: Any, hook: str) -> list[tuple[Builtin, Any]]:
    """(built-in, its knob values) of each built-in with a `hook` that is on in `cfg` (`builtin_on`), in registry
    order. `cfg` is a run config, or a `ModelConfig` for the backbone's points (then the knobs are the `model.` keys
    only). The knob values are read from their typed config keys (attribute access: `knobs.weight`)."""
    model_only = not isinstance(cfg, RunConfig)
    root = types.SimpleNamespace(model=cfg) if model_only else cfg

    def covers(key: str) -> bool:
        return not model_only or key.startswith("model.")

    out = []
    for b in BUILTINS.values():
        if hook in b.hooks and covers(b.knobs.get(b.on, b.on)) and builtin_on(b, root):
            keys = {k: key for k, key in b.knobs.items() if covers(key)}
            out.append((b, _knob_values(b.name, tuple(keys))(*(_config_value(root, k) for k in keys.values()))))
    return out


def builtin_part(cfg: Any, hook: str) -> tuple[Builtin, Any, Callable] | None:
    """(built-in, knob values, its `hook`) of the one built-in with `hook` that is on in `cfg` (`builtin_enabled`),
    or None: the core's own part. ConfigError naming them when several are on (one part has one rule)."""
    on = builtin_enabled(cfg, hook)
    if len(on) > 1:
        raise ConfigError(f"{', '.join(b.name for b, _ in on)} all replace the {hook}; switch on one at a time")
    return (on[0][0], on[0][1], on[0][0].hooks[hook]) if on else None


@functools.cache
def _knob_values(name: str, knobs: tuple[str, ...]) -> type:
    """The frozen dataclass of a built-in's knob values (made once: `builtin_enabled` runs every training step)."""
    return dataclasses.make_dataclass(f"{name}_knobs", list(knobs), frozen=True)


# ----------------------------------------------------------------------------------------------------------------
# Checking a declaration
# ----------------------------------------------------------------------------------------------------------------


def _code_at(fn: Callable) -> str:
    code = getattr(fn, "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}: " if code is not None else ""


def _knob_field(plugin: str, knob: str, kn: Any) -> tuple[str, Any, Any]:
    where = f"plugin {plugin}: knob {knob}"
    if not isinstance(kn, Knob):
        raise ConfigError(f"{where}: expected srdit.ext.Knob(default, range=... or choices=...), got {kn!r}")
    if kn.choices is not None:
        choices = tuple(kn.choices)
        if not choices or kn.default not in choices:
            raise ConfigError(f"{where}: default {kn.default!r} is not one of its choices {choices!r}")
        return knob, Literal[choices], field(default=kn.default)
    tp = kn.type or type(kn.default)
    if tp is bool:
        return knob, bool, field(default=kn.default)
    if tp not in (int, float):
        raise ConfigError(f"{where}: a {tp.__name__} knob needs choices=(...); numbers need range=(low, high)")
    if kn.range is None:
        raise ConfigError(
            f"{where}: has no range; declare range=(low, high) (None for an unbounded side) like every numeric "
            f"config field"
        )
    low, high = kn.range
    rule = Range(low, high, kn.low_open, kn.high_open)
    return knob, tp, field(default=tp(kn.default), metadata={RANGE: rule})


def check_plugin(p: Any) -> Plugin:
    """Refuse a bad declaration with one line (ConfigError): a bad name, stage or knob, a knob without a range, an
    unknown hook, a hook whose signature does not take the documented parameters, an undeclared or clashing loss
    term."""
    if not isinstance(p, Plugin):
        raise ConfigError(f"expected an srdit.ext.Plugin, got {p!r}")
    if not isinstance(p.name, str) or not _NAME.match(p.name):
        raise ConfigError(f"plugin {p.name!r}: the name must be lower-case letters, digits and _ (a config key)")
    if p.stage not in ("train", "eval"):
        raise ConfigError(f"plugin {p.name}: stage {p.stage!r} is not allowed; allowed: train, eval")
    if not p.paper:
        raise ConfigError(f"plugin {p.name}: paper is required (the paper or source of the technique)")
    for hook, fn in p.hooks.items():
        if hook not in HOOKS:
            raise ConfigError(f"plugin {p.name}: unknown hook {hook!r}; allowed hooks: {', '.join(HOOKS)}")
        params = HOOKS[hook]
        try:
            inspect.signature(fn).bind(*params)
        except TypeError:
            raise ConfigError(
                f"{_code_at(fn)}plugin {p.name}: hook {hook}{inspect.signature(fn)} has the wrong signature; "
                f"expected {hook}({', '.join(params)})"
            ) from None
        except ValueError:
            raise ConfigError(f"plugin {p.name}: hook {hook} is not a Python function") from None
    for term, knob in p.terms.items():
        if term in BUILTIN_TERMS:
            raise ConfigError(f"plugin {p.name}: loss term {term!r} clashes with a built-in term; rename it")
        if knob not in p.knobs:
            raise ConfigError(f"plugin {p.name}: loss term {term} is weighed by unknown knob {knob!r}")
    if ("tokens" in p.hooks) != ("embed_tokens" in p.hooks) or ("tokens" in p.hooks and "build" not in p.hooks):
        raise ConfigError(
            f"plugin {p.name}: extra tokens need three hooks: tokens (how many), embed_tokens (their values) and "
            f"build (the module that holds them)"
        )
    if p.terms and "loss" not in p.hooks:
        raise ConfigError(f"plugin {p.name}: declares loss terms but no loss hook")
    from_dict(knob_class(p), p.defaults(), f"plugin {p.name}: knob")  # the defaults obey their own rules
    return p


def knob_class(p: Plugin) -> type:
    """The frozen dataclass of a plugin's knobs (what `srdit.config.EXTENSIONS` holds)."""
    return dataclasses.make_dataclass(
        f"{p.name}_knobs", [_knob_field(p.name, k, kn) for k, kn in p.knobs.items()], frozen=True
    )


# ----------------------------------------------------------------------------------------------------------------
# The registry of loaded plugins
# ----------------------------------------------------------------------------------------------------------------

PLUGINS: dict[str, Plugin] = {}
"Name -> the plugins loaded in this process."


def register(p: Plugin) -> Plugin:
    """Check `p` and make it known (its knobs to `srdit.config.EXTENSIONS`). Registering the same plugin (same
    name and source) again is a no-op; another plugin of the same name is refused."""
    check_plugin(p)
    old = PLUGINS.get(p.name)
    if old is not None and (old.origin, old.source) != (p.origin, p.source):
        raise ConfigError(f"plugin {p.name}: already loaded from {old.where()}; a second one from {p.where()}")
    PLUGINS[p.name] = p
    EXTENSIONS[p.name] = knob_class(p)
    return p


def enabled(ext: Mapping[str, Mapping[str, Any]]) -> list[tuple[Plugin, Any]]:
    """(plugin, resolved knobs) of each plugin that is on in a config's `ext` section, in name order."""
    out = []
    for name in sorted(ext):
        if name not in PLUGINS:
            raise ConfigError(f"ext.{name}: plugin not loaded; list it under `plugins:`")
        out.append((PLUGINS[name], PLUGINS[name].knob_values(ext[name])))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _error_line(e: BaseException, root: Path) -> str:
    """ "file:line: Type: message" at the deepest frame inside the plugin's folder (a syntax error: its own line)."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}: SyntaxError: {e.msg}"
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve().is_relative_to(root)]
    at = f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""
    return f"{at}{type(e).__name__}: {e}"


def _plugins_in(module: Any, where: str) -> list[Plugin]:
    if isinstance(module, Plugin):
        return [module]
    found = [v for v in vars(module).values() if isinstance(v, Plugin)]
    if not found:
        raise ConfigError(f"{where}: defines no srdit.ext.Plugin (declare one at module level)")
    return found


def import_plugins(entry: str, relative_to: Path | None = None) -> list[Plugin]:
    """Import a plugin entry (a `.py` file or package folder, relative to `relative_to`, or a module name) and return
    its `Plugin`s with `origin` / `source` filled in (not yet registered: `srdit.techniques.load_plugins` does that
    after checking the names). A missing file, an unknown module and an import error are one ConfigError line;
    an import error names the plugin's own file:line."""
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(f"expected a module name or the path of a .py file or package folder, got {entry!r}")
    looks_like_path = entry.endswith(".py") or "/" in entry or entry.startswith(".")
    path = Path(entry).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    if looks_like_path or path.exists():
        path = path.resolve()
        if not path.exists():
            raise ConfigError(f"{entry}: no such plugin file or folder ({path})")
        if path.is_dir():
            init = path / "__init__.py"
            if not init.is_file():
                raise ConfigError(f"{entry}: a plugin folder must be a package (it has no __init__.py)")
            name, file, search = path.name, init, [str(path)]
            root = path
        elif path.suffix == ".py":
            problem = input_file_problem(path)  # e.g. a FIFO, which the import would wait on forever
            if problem:
                raise ConfigError(f"plugin {problem}")
            name, file, search, root = path.stem, path, None, path.parent
        else:
            raise ConfigError(f"{entry}: a plugin is a .py file, a package folder or a module name")
        module = sys.modules.get(name)
        if module is None or Path(getattr(module, "__file__", "") or "").resolve() != file:
            if str(root if search is None else path.parent) not in sys.path:
                # the plugin imports the modules of its own folder by their plain names
                sys.path.insert(0, str(root if search is None else path.parent))
            spec = importlib.util.spec_from_file_location(name, file, submodule_search_locations=search)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise ConfigError(f"plugin {entry}: {_error_line(e, root)}") from None
        origin, source = str(path), str(path)
    else:
        try:
            module = importlib.import_module(entry)
        except ModuleNotFoundError as e:
            if e.name and entry.startswith(e.name):
                raise ConfigError(
                    f"{entry}: no such module; give an importable module name, or the path of a .py file or "
                    f"package folder relative to the YAML"
                ) from None
            raise ConfigError(f"plugin {entry}: {type(e).__name__}: {e}") from None
        except Exception as e:
            file = Path(getattr(importlib.util.find_spec(entry), "origin", "") or ".").resolve().parent
            raise ConfigError(f"plugin {entry}: {_error_line(e, file)}") from None
        origin = entry
        source = module_source(module)
    return [dataclasses.replace(p, origin=origin, source=source) for p in _plugins_in(module, entry)]


def module_source(module: Any) -> str:
    """The file of a module, or the folder of a package."""
    file = Path(getattr(module, "__file__", "") or "")
    return str(file.parent if file.name == "__init__.py" else file) if file.name else ""


def installed_plugins() -> list[Plugin]:
    """The plugins of installed packages (entry-point group `srdit.techniques`: a Plugin or a module per entry)."""
    out = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:
            raise ConfigError(f"entry point {ep.name} ({ep.value}): {type(e).__name__}: {e}") from None
        source = module_source(sys.modules.get(ep.module)) if ep.module in sys.modules else ""
        # origin: the module, which a worker imports to load the plugin again
        out += [dataclasses.replace(p, origin=ep.module, source=source) for p in _plugins_in(obj, ep.value)]
    return out
