"""Study YAML -> `StudySpec`: strict schema, one-line errors that name the key and the allowed values.

A study names a base run config, the techniques (factors) to switch on and off, a design that picks the cells,
the seeds every cell runs with, constraints between techniques, the metrics, the resources per trial and where
to track. Example (see studies/digits_quick.yaml):

    name: digits_quick
    base: {train: {steps: 200}}                 # same keys as a run YAML (preset, model, train, ...)
    techniques:
      - rmsnorm                                 # a built-in technique
      - sprint: {drop_ratio: 0.5}               # a built-in technique with overridden knobs
      - name: wide_lr                           # a custom named config diff
        diff: {train.lr: 3e-3}
    design: full_factorial                      # or {kind: fractional_factorial, resolution: 5}, ladder, ...
    seeds: [0, 1]
    constraints:
      - requires: [path_drop_guidance, sprint]  # the first needs all the others
      - excludes: [swiglu, relu2]               # never together
      - {wins: swiglu, over: relu2}             # shared keys take swiglu's value
    metrics: {primary: fd, direction: min, others: {images_per_s: max}}
    resources: {cpus: 1, gpus: 0}               # gpus: 8 = an 8-GPU data-parallel trial (Ray Train)
    tracking: {uri: null}                       # null: the embedded SQLite store under the state folder
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srdit import ext
from srdit.config import INT_MAX, SEED_MAX, ConfigError, RunConfig, apply_diff, decimal_number, read_yaml
from srdit.metric_registry import METRICS, analysable
from srdit.metric_registry import direction as metric_direction
from srdit.techniques import (
    PRESETS,
    TECHNIQUES,
    Technique,
    custom_technique,
    known_techniques,
    load_plugins,
    merge_diffs,
    plugin_technique,
    run_config_from_dict,
    with_techniques,
)

# The schema. Tests freeze these tuples so that the study format changes only on purpose.
STUDY_KEYS = (
    "name",
    "description",
    "base",
    "techniques",
    "design",
    "seeds",
    "constraints",
    "metrics",
    "resources",
    "tracking",
    "checkpoint",
    "plugins",
)
DESIGN_KINDS = ("full_factorial", "fractional_factorial", "ladder", "leave_one_out", "search", "foldover")
DESIGN_KEYS = {
    "full_factorial": ("kind",),
    "fractional_factorial": ("kind", "resolution"),
    "ladder": ("kind", "order"),
    "leave_one_out": ("kind",),
    "search": ("kind", "trials", "objectives", "space", "seed", "max_concurrent"),
    "foldover": ("kind", "of", "factor"),
}
FOLDOVER_INHERITED = ("base", "techniques", "constraints", "seeds", "checkpoint")
"What a fold-over takes from the study it folds and may only repeat unchanged (they make its cells and trials)."
CUSTOM_TECHNIQUE_KEYS = ("name", "diff", "description")
CONSTRAINT_KINDS = ("requires", "excludes", "wins")
METRICS_KEYS = ("primary", "direction", "others")
RESOURCES_KEYS = ("cpus", "gpus", "workers", "max_concurrent")
TRACKING_KEYS = ("uri", "experiment", "artifact_location")
SPACE_KEYS = ("low", "high", "log", "type", "choices")
DIRECTIONS = ("min", "max")


def _listing_order(name: str) -> int:
    """Evaluation metrics first (the usual primary metric), then training metrics, then the trial's own."""
    producers = set(METRICS[name].producers)
    return 0 if producers & {"digits", "latents"} else 1 if "train" in producers else 2


METRIC_DIRECTIONS = {n: metric_direction(n) for n in sorted(analysable(), key=_listing_order)}
"""The metrics a study may name (`metrics.primary`, `others`, search objectives) and their default directions, from
srdit.metric_registry."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_MAX = 80
"""Longest study or technique name. A study name becomes file and folder names under --state with suffixes srdit
adds (the Ray run folder `<name>-YYYYmmdd-HHMMSS`, `<name>_runs.csv`, `<name>.lock`), a technique name the
`tech.<name>` MLflow tag; 80 keeps each well under the 255-byte limit of a file name (names are ASCII: bytes =
characters)."""
MAX_TECHNIQUES = 64
"""Most techniques in a study: the cell id, one character per technique, starts every trial folder's name
(`<cell>-s<seed>-<hash>`, up to 23 more characters) and the name of its running-marker file (host and pid before
it), all well under 255 bytes."""
MAX_SEEDS = 1000
"Most seeds a study may give each cell (a guard against a typo such as `seeds: 100000`)."
_ROMAN = {"III": 3, "IV": 4, "V": 5, "VI": 6, "VII": 7, "VIII": 8}


@dataclass(frozen=True)
class Factor:
    """One technique of the study: a name and the config diff it applies when switched on."""

    name: str
    diff: Mapping[str, Any]
    "Dotted config key -> value."
    builtin: bool
    "A technique of srdit.techniques.TECHNIQUES (recorded in RunConfig.techniques) or a custom diff."
    knobs: Mapping[str, Any] = field(default_factory=dict)
    "Knob overrides of a built-in technique (short knob name -> value)."
    description: str = ""

    @property
    def technique(self) -> Technique:
        """The registry entry with the study's knob overrides in its diff, or the custom diff as a Technique."""
        if self.builtin:
            return dataclasses.replace(TECHNIQUES[self.name], diff=dict(self.diff))
        if self.plugin:
            return dataclasses.replace(plugin_technique(ext.PLUGINS[self.name]), diff=dict(self.diff))
        return custom_technique(self.name, self.diff, self.description)

    @property
    def plugin(self) -> bool:
        """A plugin technique (`srdit.ext`, listed under the study's `plugins:`)."""
        return not self.builtin and self.name in ext.PLUGINS


@dataclass(frozen=True)
class Constraint:
    kind: str
    "requires: `a` needs every one of `others`; excludes: no two of [a, *others] together; wins: a over others."
    a: str
    others: tuple[str, ...]

    def describe(self) -> str:
        if self.kind == "requires":
            return f"{self.a} requires {' and '.join(self.others)}"
        if self.kind == "excludes":
            return f"{', '.join((self.a,) + self.others)} exclude each other"
        return f"{self.a} wins over {', '.join(self.others)}"


@dataclass(frozen=True)
class SearchParam:
    """A numeric or categorical knob searched by the `search` design."""

    key: str
    "A dotted config key (train.lr) or <technique>.<knob> (applied only when the technique is on)."
    low: float | None = None
    high: float | None = None
    log: bool = False
    type: str = "float"
    "float | int | choice"
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Design:
    kind: str
    resolution: int | None = None
    order: tuple[str, ...] = ()
    trials: int = 0
    objectives: tuple[str, ...] = ()
    space: tuple[SearchParam, ...] = ()
    seed: int = 0
    max_concurrent: int | None = None
    of: StudySpec | None = field(default=None, repr=False, compare=False)
    "foldover: the study whose fraction it completes (its cells are the first half)."
    factor: str | None = None
    "foldover: the technique whose column is flipped; None: every sign flipped."

    @property
    def label(self) -> str:
        """Short name used in tags and reports: full, frac(res=5), ladder, loo, search, foldover(of=x[, factor=y])."""
        if self.kind == "foldover":
            return f"foldover(of={self.of.name}{', factor=' + self.factor if self.factor else ''})"
        return {
            "full_factorial": "full",
            "fractional_factorial": f"frac(res={self.resolution})",
            "ladder": "ladder",
            "leave_one_out": "loo",
            "search": "search",
        }[self.kind]


@dataclass(frozen=True)
class Metrics:
    primary: str = "fd"
    "The confirmatory metric (a metric of the registry that a study may name); its effects decide the report."
    direction: str = "min"
    "min or max: which way `primary` is better (default: the registry's direction of `primary`)."
    others: Mapping[str, str] = field(default_factory=dict)
    "Exploratory metrics: a list of names or a mapping name -> min|max (one Benjamini-Hochberg family)."

    def all(self) -> dict[str, str]:
        return {self.primary: self.direction, **{k: v for k, v in self.others.items() if k != self.primary}}


@dataclass(frozen=True)
class Resources:
    cpus: float = 1
    "CPUs per trial process (also its torch threads); a data-parallel trial has one process per worker."
    gpus: float = 0
    "GPUs per trial: 0, a fraction, or a whole number; N > 1 runs N data-parallel workers with one GPU each."
    workers: int = 1
    "Data-parallel workers per trial (a Ray Train data-parallel trial when > 1: NCCL on GPUs, gloo on CPUs)."
    max_concurrent: int | None = None
    "Cap on trials running at once (None: as many as the resources allow)."

    @property
    def gpus_per_worker(self) -> float:
        return self.gpus / self.workers


@dataclass(frozen=True)
class Tracking:
    uri: str | None = None
    "MLflow tracking URI; None: sqlite under the state folder."
    experiment: str | None = None
    "Experiment name; None: the study name."
    artifact_location: str | None = None
    "Artifact root of the experiment; None: <state>/mlartifacts/<study> (SQLite) or the server's artifact store."


@dataclass(frozen=True)
class StudySpec:
    name: str
    "`name:` (required): letters, digits, _ . - ; it names the MLflow experiment, the state's folders and the report."
    description: str
    "`description:` (optional): free text, shown in the report's header."
    base: RunConfig
    base_dict: Mapping[str, Any]
    "The base section as written (for the record)."
    factors: tuple[Factor, ...]
    design: Design
    seeds: tuple[int, ...]
    constraints: tuple[Constraint, ...]
    metrics: Metrics
    resources: Resources
    tracking: Tracking
    path: str = ""
    checkpoint: str | None = None
    plugins: tuple[str, ...] = ()
    """`plugins:` (optional): plugin techniques to load before the rest is read: module names, or `.py` files /
    package folders relative to the study YAML (see Add your own technique); each plugin's technique is then a
    factor by its name, with its knobs. Parsed: the names of the plugins the study uses."""
    """A fixed checkpoint (a `srdit train` checkpoint or `srdit convert` output) that every cell evaluates instead of
    training: only evaluation-time techniques may be factors, and a seed is the evaluation's (eval.seed)."""

    @property
    def factor_names(self) -> list[str]:
        return [f.name for f in self.factors]

    def factor(self, name: str) -> Factor:
        return {f.name: f for f in self.factors}[name]


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------


def _mapping(value: Any, where: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(allowed)}, got {value!r}")
    for k in value:
        if k not in allowed:
            raise ConfigError(f"{where}.{k}: unknown key; allowed keys in {where}: {', '.join(allowed)}")
    return dict(value)


def _int(value: Any, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: {value} must be >= {minimum}")
    if not -INT_MAX - 1 <= value <= INT_MAX:
        raise ConfigError(f"{where}: {value} is not allowed; allowed: an integer within int32 (at most {INT_MAX})")
    return value


def _number(value: Any, where: str) -> float:
    """Every number of the study schema: finite (YAML 1.1 reads 1e-3 as a string, so numeric strings count)."""
    if isinstance(value, str) and decimal_number(value) is not None:
        value = decimal_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise ConfigError(f"{where}: {value!r} is not allowed; expected a finite number")
    return out


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def check_name(value: Any, where: str, what: str) -> str:
    """`value` as a name that becomes part of file and folder names: letters, digits, _ . - (starting with a letter
    or digit) and at most NAME_MAX characters; ConfigError naming `where` otherwise."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigError(
            f"{where}: {what} {shown} must be a non-empty string of letters, digits, _ . - (it names folders)"
        )
    if len(value) > NAME_MAX:
        raise ConfigError(
            f"{where}: {what} {value[:20]}... is {len(value)} characters; at most {NAME_MAX} (it names folders and "
            f"files under --state)"
        )
    return value


def _names(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of technique names, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------------------------


def parse_base(value: Any, where: str = "base", relative_to: Path | None = None) -> tuple[RunConfig, dict]:
    """The base run config: a mapping with the keys of a run YAML (preset, techniques, model, train, ...), or a
    path to a run YAML (relative to the study file)."""
    if value is None:
        value = {}
    if isinstance(value, str):
        p = Path(value)
        if not p.is_absolute() and relative_to is not None:
            p = relative_to / p
        try:
            value = read_yaml(p)
        except ConfigError as e:
            hint = f"; for the preset, write `{where}: {{preset: {value}}}`" if value in PRESETS else ""
            raise ConfigError(f"{where}: {e}{hint}") from None
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {p} must hold a mapping (a run config)")
        relative_to = p.parent
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping (a run config) or the path of a run YAML, got {value!r}")
    return run_config_from_dict(value, where, relative_to=relative_to), dict(value)


def parse_techniques(value: Any, base: RunConfig) -> tuple[Factor, ...]:
    """`techniques:` (required): the factors, a non-empty list. An item is a built-in technique's name, `name:
    {knob: value}` (a built-in with knob overrides), or `{name: ..., diff: {dotted.key: value}, description: ...}`
    (a custom technique: a named config diff, evaluation-time when every key is in `sample` / `eval`)."""
    where = "techniques"
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"{where}: expected a non-empty list of technique names (allowed: {', '.join(TECHNIQUES)}), "
            f"name: {{knob: value}} items, or {{name: ..., diff: {{key: value}}}} items"
        )
    factors: list[Factor] = []
    for i, item in enumerate(value):
        w = f"{where}[{i}]"
        if isinstance(item, str):
            name, knobs, custom = item, {}, None
        elif isinstance(item, Mapping) and ("diff" in item or "name" in item):
            custom = _mapping(item, w, CUSTOM_TECHNIQUE_KEYS)
            name = _str(custom.get("name"), f"{w}.name")
            knobs = {}
        elif isinstance(item, Mapping) and len(item) == 1:
            (name, knobs), custom = next(iter(item.items())), None
            knobs = {} if knobs is None else knobs
            if not isinstance(knobs, Mapping):
                raise ConfigError(f"{w}.{name}: expected a mapping of knobs, got {knobs!r}")
        else:
            raise ConfigError(
                f"{w}: expected a technique name, {{name: {{knob: value}}}} or "
                f"{{name: ..., diff: {{key: value}}}}, got {item!r}"
            )
        check_name(name, w, "technique name")
        if custom is not None:
            if name in TECHNIQUES or name in ext.PLUGINS:
                raise ConfigError(
                    f"{w}.name: {name!r} is a built-in or plugin technique; give the custom diff another name "
                    f"or list {name!r} with knobs instead"
                )
            diff = custom.get("diff")
            if not isinstance(diff, Mapping) or not diff:
                raise ConfigError(
                    f"{w}.diff: expected a non-empty mapping of dotted config keys to values "
                    f"(e.g. train.lr: 3e-3), got {diff!r}"
                )
            tech = custom_technique(name, diff, _str(custom.get("description", ""), f"{w}.description"))
            try:
                apply_diff(base, tech.diff)
            except ConfigError as e:
                raise ConfigError(f"{w}.diff: {e}") from None
            factors.append(Factor(name, tech.diff, False, {}, tech.description))
            continue
        if name in ext.PLUGINS:
            try:
                tech = plugin_technique(ext.PLUGINS[name]).with_knobs(knobs)
                apply_diff(base, tech.diff)
            except ConfigError as e:
                raise ConfigError(f"{w}: {e}") from None
            factors.append(Factor(name, dict(tech.diff), False, dict(knobs), tech.description))
            continue
        if name not in TECHNIQUES:
            raise ConfigError(
                f"{w}: unknown technique {name!r}; allowed: {', '.join(known_techniques())} "
                f"(or a custom {{name: ..., diff: ...}}, or a plugin listed under plugins:)"
            )
        if name in base.techniques:
            raise ConfigError(f"{w}: {name} is already on in base.techniques; remove it from one of the two")
        try:
            tech = TECHNIQUES[name].with_knobs(knobs)
        except ConfigError as e:
            raise ConfigError(f"{w}: {e}") from None
        factors.append(Factor(name, dict(tech.diff), True, dict(knobs), tech.description))
    names = [f.name for f in factors]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: {', '.join(dup)} listed more than once")
    if len(factors) > MAX_TECHNIQUES:
        raise ConfigError(
            f"{where}: {len(factors)} techniques; at most {MAX_TECHNIQUES} (the cell id, one character per "
            f"technique, names the trial folders)"
        )
    return tuple(factors)


def parse_design(value: Any, names: list[str]) -> Design:
    """`design:` (default full_factorial): a kind of `DESIGN_KINDS`, or a mapping `{kind: ..., ...}` with that kind's
    keys (`DESIGN_KEYS`): fractional_factorial `resolution` (3..8 or III..VIII), ladder `order` (default: the
    techniques' order), search `trials`, `objectives`, `space` (key -> {low, high, log, type} or {choices}), `seed`,
    `max_concurrent`; foldover `of`, `factor`. A full factorial takes at most 12 techniques."""
    where = "design"
    if value is None:
        value = "full_factorial"
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a design kind ({', '.join(DESIGN_KINDS)}) or a mapping with `kind`")
    kind = value.get("kind")
    if kind not in DESIGN_KINDS:
        raise ConfigError(f"{where}.kind: {kind!r} is not a design; allowed: {', '.join(DESIGN_KINDS)}")
    d = _mapping(value, where, DESIGN_KEYS[kind])
    if kind == "full_factorial":
        if len(names) > 12:
            raise ConfigError(
                f"{where}: a full factorial of {len(names)} techniques has 2^{len(names)} cells; "
                f"use fractional_factorial"
            )
        return Design(kind)
    if kind == "fractional_factorial":
        res = d.get("resolution")
        if isinstance(res, str) and res.upper() in _ROMAN:
            res = _ROMAN[res.upper()]
        if isinstance(res, bool) or not isinstance(res, int) or not 3 <= res <= 8:
            raise ConfigError(f"{where}.resolution: expected 3..8 (or III..VIII), got {res!r}")
        if len(names) < 2:
            raise ConfigError(f"{where}: a fractional factorial needs at least 2 techniques")
        return Design(kind, resolution=res)
    if kind == "ladder":
        order = _names(d.get("order", list(names)), f"{where}.order")
        unknown = [o for o in order if o not in names]
        if unknown:
            raise ConfigError(
                f"{where}.order: {', '.join(unknown)} not among the techniques; allowed: {', '.join(names)}"
            )
        if len(set(order)) != len(order) or not order:
            raise ConfigError(f"{where}.order: expected each technique at most once, got {order!r}")
        return Design(kind, order=tuple(order))
    if kind == "leave_one_out":
        return Design(kind)
    if kind == "foldover":  # study_from_dict parses it (it needs the study file's folder)
        raise ConfigError(
            f"{where}.of: required; a fold-over is written {{kind: foldover, of: OTHER.yaml}} in a "
            f"study file (OTHER's path relative to it)"
        )
    # search
    trials = _int(d.get("trials"), f"{where}.trials", 1)
    objectives = d.get("objectives", [])
    if isinstance(objectives, str):
        objectives = [objectives]
    if not isinstance(objectives, list) or not all(isinstance(o, str) for o in objectives):
        raise ConfigError(
            f"{where}.objectives: expected a list of metric names; allowed: {', '.join(METRIC_DIRECTIONS)}"
        )
    for o in objectives:
        if o not in METRIC_DIRECTIONS:
            raise ConfigError(f"{where}.objectives: unknown metric {o!r}; allowed: {', '.join(METRIC_DIRECTIONS)}")
    space_in = d.get("space", {}) or {}
    if not isinstance(space_in, Mapping):
        raise ConfigError(f"{where}.space: expected a mapping key -> {{low, high, log, type}} or {{choices: [...]}}")
    space = []
    for key, spec in space_in.items():
        w = f"{where}.space.{key}"
        s = _mapping(spec, w, SPACE_KEYS)
        if "choices" in s:
            ch = s["choices"]
            if not isinstance(ch, list) or not ch:
                raise ConfigError(f"{w}.choices: expected a non-empty list")
            space.append(SearchParam(str(key), type="choice", choices=tuple(ch)))
            continue
        typ = s.get("type", "float")
        if typ not in ("float", "int"):
            raise ConfigError(f"{w}.type: {typ!r} is not allowed; allowed values: float, int (or give choices)")
        if "low" not in s or "high" not in s:
            raise ConfigError(f"{w}: needs low and high (or choices)")
        low, high = _number(s["low"], f"{w}.low"), _number(s["high"], f"{w}.high")
        log = s.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{w}.log: expected true or false")
        if not low < high or (log and low <= 0):
            raise ConfigError(f"{w}: need low < high (and low > 0 with log: true)")
        space.append(SearchParam(str(key), low, high, log, typ))
    seed = _int(d.get("seed", 0), f"{where}.seed")
    mc = d.get("max_concurrent")
    mc = None if mc is None else _int(mc, f"{where}.max_concurrent", 1)
    return Design(kind, trials=trials, objectives=tuple(objectives), space=tuple(space), seed=seed, max_concurrent=mc)


def parse_constraints(value: Any, names: list[str]) -> tuple[Constraint, ...]:
    """`constraints:` (default none): a list of `{requires: [a, b, ...]}` (a needs every other), `{excludes: [a, b,
    ...]}` (no two together) and `{wins: a, over: b}` (a key both set takes a's value). Cells that break a rule are
    excluded and listed by `srdit study plan`."""
    where = "constraints"
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(
            f"{where}: expected a list of {{requires: [a, b]}}, {{excludes: [a, b]}} or {{wins: a, over: b}} items"
        )
    out: list[Constraint] = []
    for i, item in enumerate(value):
        w = f"{where}[{i}]"
        if not isinstance(item, Mapping) or not item:
            raise ConfigError(f"{w}: expected one of {{requires: [a, b]}}, {{excludes: [a, b]}}, {{wins: a, over: b}}")
        kinds = [k for k in item if k in CONSTRAINT_KINDS]
        extra = [k for k in item if k not in CONSTRAINT_KINDS + ("over",)]
        if extra or len(kinds) != 1:
            raise ConfigError(
                f"{w}: expected exactly one of requires, excludes, wins (with over); got keys "
                f"{', '.join(map(str, item))}"
            )
        kind = kinds[0]
        if kind == "wins":
            if set(item) != {"wins", "over"}:
                raise ConfigError(f"{w}: wins needs over: {{wins: a, over: b}}")
            a = _str(item["wins"], f"{w}.wins")
            others = _names(item["over"], f"{w}.over")
        else:
            if "over" in item:
                raise ConfigError(f"{w}.over: only allowed with wins")
            lst = _names(item[kind], f"{w}.{kind}")
            if len(lst) < 2:
                raise ConfigError(f"{w}.{kind}: expected at least two technique names, got {lst!r}")
            a, others = lst[0], lst[1:]
        for n in [a, *others]:
            if n not in names:
                raise ConfigError(f"{w}: {n!r} is not a technique of this study; allowed: {', '.join(names)}")
        if a in others or len(set(others)) != len(others):
            raise ConfigError(f"{w}: a technique appears twice in {kind}")
        out.append(Constraint(kind, a, tuple(others)))
    check_constraints(out)
    return tuple(out)


def excluded_pairs(constraints) -> set[frozenset]:
    pairs = set()
    for c in constraints:
        if c.kind == "excludes":
            group = (c.a,) + c.others
            pairs |= {frozenset((x, y)) for x in group for y in group if x != y}
    return pairs


def check_constraints(constraints) -> None:
    """Contradictions: a technique that requires one it excludes (it could never be on); wins both ways."""
    excl = excluded_pairs(constraints)
    requires: dict[str, set[str]] = {}
    for c in constraints:
        if c.kind == "requires":
            requires.setdefault(c.a, set()).update(c.others)

    def closure(n: str) -> set[str]:
        seen, todo = set(), [n]
        while todo:
            for m in requires.get(todo.pop(), ()):
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    for a in requires:
        need = closure(a) | {a}
        for x in need:
            for y in need:
                if x < y and frozenset((x, y)) in excl:
                    raise ConfigError(
                        f"constraints: conflicting constraints: {a} requires "
                        f"{' and '.join(sorted(need - {a}))} but {x} and {y} exclude each other, so "
                        f"{a} could never be on; remove one of the two constraints"
                    )
    wins = {(c.a, o) for c in constraints if c.kind == "wins" for o in c.others}
    for a, b in wins:
        if (b, a) in wins:
            raise ConfigError(f"constraints: conflicting constraints: {a} wins over {b} and {b} wins over {a}")


def win_pairs(constraints) -> set[tuple[str, str]]:
    """(winner, loser) pairs of the `wins` constraints."""
    return {(c.a, o) for c in constraints if c.kind == "wins" for o in c.others}


def check_shared_keys(factors: tuple[Factor, ...], constraints: tuple[Constraint, ...]) -> None:
    """Every pair of techniques that may be on together must merge (srdit.techniques.merge_diffs): two techniques
    writing the same key with different values must be excluded from each other or have a winner."""
    excl, wins = excluded_pairs(constraints), win_pairs(constraints)
    for i, f in enumerate(factors):
        for g in factors[i + 1 :]:
            if frozenset((f.name, g.name)) not in excl:
                merge_diffs([f.technique, g.technique], wins=wins)


def parse_metrics(value: Any) -> Metrics:
    """`metrics:` (default `{primary: fd}`): `primary` (the confirmatory metric), `direction` (min or max; default:
    the registry's) and `others` (a list of names, or a mapping name -> min|max; exploratory metrics)."""
    where = "metrics"
    if value is None:
        return Metrics()
    d = _mapping(value, where, METRICS_KEYS)
    primary = d.get("primary", "fd")
    if not isinstance(primary, str) or primary not in METRIC_DIRECTIONS:
        raise ConfigError(f"{where}.primary: unknown metric {primary!r}; allowed: {', '.join(METRIC_DIRECTIONS)}")
    direction = d.get("direction", METRIC_DIRECTIONS[primary])
    if direction not in DIRECTIONS:
        raise ConfigError(f"{where}.direction: {direction!r} is not allowed; allowed values: min, max")
    others_in = d.get("others", {}) or {}
    if isinstance(others_in, list):
        if not all(isinstance(o, str) for o in others_in):
            raise ConfigError(f"{where}.others: expected metric names; allowed: {', '.join(METRIC_DIRECTIONS)}")
        others_in = {o: None for o in others_in}
    if not isinstance(others_in, Mapping):
        raise ConfigError(f"{where}.others: expected a list of metric names or a mapping metric -> min|max")
    others = {}
    for k, v in others_in.items():
        if k not in METRIC_DIRECTIONS:
            raise ConfigError(f"{where}.others: unknown metric {k!r}; allowed: {', '.join(METRIC_DIRECTIONS)}")
        v = METRIC_DIRECTIONS[k] if v is None else v
        if v not in DIRECTIONS:
            raise ConfigError(f"{where}.others.{k}: {v!r} is not allowed; allowed values: min, max")
        others[k] = v
    return Metrics(primary, direction, others)


def parse_resources(value: Any) -> Resources:
    """`resources:` (default `{cpus: 1, gpus: 0}`): what one trial takes (see `Resources`); `gpus: N` > 1 makes a
    data-parallel trial of N workers with one GPU each."""
    where = "resources"
    if value is None:
        return Resources()
    d = _mapping(value, where, RESOURCES_KEYS)
    cpus = _number(d.get("cpus", 1), f"{where}.cpus")
    gpus = _number(d.get("gpus", 0), f"{where}.gpus")
    if cpus <= 0:
        raise ConfigError(f"{where}.cpus: {cpus:g} must be > 0")
    if gpus < 0:
        raise ConfigError(f"{where}.gpus: {gpus:g} must be >= 0")
    if gpus > 1 and gpus != int(gpus):
        raise ConfigError(
            f"{where}.gpus: {gpus:g} must be a fraction, 1, or a whole number of GPUs (one data-parallel worker each)"
        )
    workers = _int(d.get("workers", int(gpus) if gpus > 1 else 1), f"{where}.workers", 1)
    if gpus > 1 and workers != gpus:
        raise ConfigError(
            f"{where}.workers: {workers} must equal resources.gpus ({gpus:g}): one data-parallel worker per GPU"
        )
    if workers > 1 and 0 < gpus < 1:
        raise ConfigError(
            f"{where}.gpus: {gpus:g} is a fraction but resources.workers is {workers}; a "
            f"data-parallel trial takes one whole GPU per worker (gpus: {workers}) or none (gpus: 0)"
        )
    if workers > 1 and gpus == 1:
        raise ConfigError(f"{where}.gpus: 1 with {workers} workers; set gpus: {workers} (one per worker) or 0")
    mc = d.get("max_concurrent")
    mc = None if mc is None else _int(mc, f"{where}.max_concurrent", 1)
    return Resources(cpus if cpus != int(cpus) else int(cpus), gpus if gpus != int(gpus) else int(gpus), workers, mc)


def check_resources(cfg: RunConfig, resources: Resources) -> None:
    """What a trial's resources require of its resolved config: a data-parallel trial splits train.batch_size
    evenly over resources.workers (srdit.parallel.DataParallel.local_batch). Raises ConfigError."""
    if cfg.train.batch_size % resources.workers:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is not divisible by resources.workers "
            f"({resources.workers} data-parallel workers share each batch); choose a multiple of "
            f"{resources.workers}"
        )


def parse_tracking(value: Any) -> Tracking:
    """`tracking:` (default: the embedded SQLite store under the state folder): `uri` (sqlite, http(s) or a database
    URI), `experiment`, `artifact_location` (see `Tracking`)."""
    where = "tracking"
    if value is None:
        return Tracking()
    d = _mapping(value, where, TRACKING_KEYS)
    for k in TRACKING_KEYS:
        if d.get(k) is not None:
            _str(d[k], f"{where}.{k}")
    uri = d.get("uri")
    if uri is not None and not re.match(r"^(sqlite|https?|postgresql|mysql|mssql|databricks)[+a-z0-9]*:", uri):
        raise ConfigError(
            f"{where}.uri: {uri!r} is not allowed; expected sqlite:////abs/path.db, http://host:port "
            f"or a database URI (the file store is no longer supported by MLflow)"
        )
    return Tracking(uri, d.get("experiment"), d.get("artifact_location"))


def parse_seeds(value: Any) -> tuple[int, ...]:
    """`seeds:` (default `[0]`): a list of distinct integers in [0, 2^32 - 1], or a count N (seeds 0..N-1, at most
    `MAX_SEEDS`); every cell runs once per seed."""
    where = "seeds"
    if value is None:
        return (0,)
    if isinstance(value, int) and not isinstance(value, bool):
        _int(value, where, 1)
        if value > MAX_SEEDS:
            raise ConfigError(f"{where}: {value} seeds per cell; at most {MAX_SEEDS}")
        return tuple(range(value))
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of integers (or a count), got {value!r}")
    seeds = tuple(_int(s, f"{where}[{i}]", 0) for i, s in enumerate(value))
    for i, s in enumerate(seeds):
        if s > SEED_MAX:
            raise ConfigError(f"{where}[{i}]: {s} is not allowed; allowed: an integer in [0, {SEED_MAX}] (train.seed)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds must be distinct, got {list(seeds)}")
    return seeds


# ------------------------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------------------------


def study_from_dict(data: Any, path: str | Path = "<dict>") -> StudySpec:
    """Validate a study mapping strictly. Raises ConfigError (one line, naming the key and the allowed values)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(STUDY_KEYS)} at the top level")
    for k in data:
        if k not in STUDY_KEYS:
            raise ConfigError(f"{k}: unknown key; allowed keys: {', '.join(STUDY_KEYS)}")
    name = data.get("name")
    if name is None:
        raise ConfigError("name: required (letters, digits, _ . -)")
    check_name(name, "name", "study name")
    description = data.get("description", "") or ""
    _str(description, "description")
    rel = Path(path).parent if str(path) != "<dict>" else None
    plugins = tuple(load_plugins(data.get("plugins"), rel))
    design_in = {"kind": "foldover"} if data.get("design") == "foldover" else data.get("design")
    if isinstance(design_in, Mapping) and design_in.get("kind") == "foldover":
        return _foldover_from_dict({**data, "design": design_in}, name, description, path, rel)
    base, base_dict = parse_base(data.get("base"), relative_to=rel)
    if "techniques" not in data:
        raise ConfigError(
            f"techniques: required; a list of technique names (allowed: {', '.join(TECHNIQUES)}) "
            f"or custom {{name: ..., diff: ...}} items"
        )
    factors = parse_techniques(data["techniques"], base)
    plugins = tuple(dict.fromkeys([*plugins, *base.ext, *(f.name for f in factors if f.plugin)]))
    names = [f.name for f in factors]
    design = parse_design(data.get("design"), names)
    constraints = parse_constraints(data.get("constraints"), names)
    check_shared_keys(factors, constraints)
    metrics = parse_metrics(data.get("metrics"))
    for o in design.objectives:
        if o not in metrics.all():
            metrics = dataclasses.replace(metrics, others={**metrics.others, o: METRIC_DIRECTIONS[o]})
    spec = StudySpec(
        name=name,
        description=description,
        base=base,
        base_dict=base_dict,
        factors=factors,
        design=design,
        seeds=parse_seeds(data.get("seeds")),
        constraints=constraints,
        metrics=metrics,
        resources=parse_resources(data.get("resources")),
        tracking=parse_tracking(data.get("tracking")),
        path=str(path),
        checkpoint=parse_checkpoint(data.get("checkpoint")),
        plugins=plugins,
    )
    try:
        check_resources(base, spec.resources)
    except ConfigError as e:
        raise ConfigError(f"base.{e}") from None
    if design.kind == "search":
        _check_space(spec)
    return spec


def parse_checkpoint(value: Any) -> str | None:
    """`checkpoint:`: the path of a checkpoint file that every cell evaluates (relative to the working directory,
    as the base's paths); the preflight checks that it is an srdit checkpoint of the base's model."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"checkpoint: {value!r} is not allowed; expected the path of a checkpoint file (written by "
            f"`srdit train` as RUN/checkpoints/last.pt, or by `srdit convert`)"
        )
    return value


def _foldover_from_dict(data: Mapping, name: str, description: str, path: str | Path, rel: Path | None) -> StudySpec:
    """`design: {kind: foldover, of: OTHER.yaml, factor: NAME}`: OTHER's study (base, techniques, constraints, seeds,
    metrics, resources, tracking) with OTHER's fraction plus its mirror image as the design. FOLDOVER_INHERITED keys
    may be repeated here only unchanged (they make the cells and trials, and the first half must be OTHER's trials
    exactly, so that OTHER's finished runs are reused); metrics, resources and tracking may be overridden.
    Raises ConfigError (the mirror-image maths and its refusals: srdit.study.designs.foldover_design)."""
    where = "design"
    d = _mapping(data["design"], where, DESIGN_KEYS["foldover"])
    of = d.get("of")
    if not isinstance(of, str) or not of.strip():
        raise ConfigError(
            f"{where}.of: required; the path of the study whose fraction this fold-over completes "
            f"(relative to this file), e.g. of: digits_frac4.yaml"
        )
    p = Path(of)
    if not p.is_absolute() and rel is not None:
        p = rel / p
    if not p.is_file():
        raise ConfigError(f"{where}.of: {of!r}: no such study file ({p}); give the path relative to this file")
    if str(path) != "<dict>" and p.resolve() == Path(path).resolve():
        raise ConfigError(
            f"{where}.of: {of} is this study itself; a fold-over completes another study's fractional factorial"
        )
    # a fold-over of a fold-over is refused from its design alone, before loading it (which would load its `of`, and
    # so on: a chain or a cycle of fold-overs would nest one error message per level)
    raw = read_yaml(p)
    raw_design = raw.get("design") if isinstance(raw, Mapping) else None
    if raw_design == "foldover" or isinstance(raw_design, Mapping) and raw_design.get("kind") == "foldover":
        original = raw_design.get("of") if isinstance(raw_design, Mapping) else None
        raise ConfigError(
            f"{where}.of: {of} is itself a fold-over; fold the original fraction ({original or 'its design.of'})"
            f" instead, with design.factor for the technique still aliased"
        )
    try:
        other = load_study(p)
    except ConfigError as e:
        raise ConfigError(f"{where}.of: {e}") from None
    if other.design.kind == "foldover":
        raise ConfigError(
            f"{where}.of: {of} is itself a fold-over; fold the original fraction ({other.design.of.path})"
            f" instead, with design.factor for the technique still aliased"
        )
    if other.design.kind != "fractional_factorial":
        raise ConfigError(
            f"{where}.of: {of} has design {other.design.kind}; a fold-over completes a "
            f"fractional_factorial (resolution III or IV)"
        )
    if name == other.name:
        raise ConfigError(f"name: {name!r} is the name of the study it folds ({of}); give the fold-over its own name")
    names = other.factor_names
    factor = d.get("factor")
    if factor is not None and factor not in names:
        raise ConfigError(f"{where}.factor: {factor!r} is not a technique of {of}; allowed: {', '.join(names)}")
    given = {
        "base": lambda v: parse_base(v, relative_to=rel)[0],
        "techniques": lambda v: parse_techniques(v, other.base),
        "constraints": lambda v: parse_constraints(v, names),
        "seeds": parse_seeds,
        "checkpoint": parse_checkpoint,
    }
    mine = {
        "base": other.base,
        "techniques": other.factors,
        "constraints": other.constraints,
        "seeds": other.seeds,
        "checkpoint": other.checkpoint,
    }
    for key in FOLDOVER_INHERITED:
        if key in data and given[key](data[key]) != mine[key]:
            raise ConfigError(
                f"{key}: differs from the {key} of {of}; a fold-over inherits {key} from the study it "
                f"folds (its first half must be that study's trials): remove {key} here or make it "
                f"equal"
            )
    spec = dataclasses.replace(
        other,
        name=name,
        description=description or other.description,
        design=Design("foldover", resolution=other.design.resolution, of=other, factor=factor),
        metrics=parse_metrics(data["metrics"]) if "metrics" in data else other.metrics,
        resources=parse_resources(data["resources"]) if "resources" in data else other.resources,
        tracking=parse_tracking(data["tracking"]) if "tracking" in data else other.tracking,
        path=str(path),
    )
    try:
        check_resources(spec.base, spec.resources)
    except ConfigError as e:
        raise ConfigError(f"base.{e}") from None
    from srdit.study.designs import foldover_design  # the design maths live there (it imports this module)

    foldover_design(spec)  # refuses a mirror that reproduces the first half
    return spec


def _check_space(spec: StudySpec) -> None:
    """Every choice and both ends of every range must make a valid config (field rules and cross-field rules on the
    base, with the knob's technique on for `<technique>.<knob>`), so that the search never proposes a value the
    config alone rules out."""
    names = spec.factor_names
    for p in spec.design.space:
        head, _, rest = p.key.partition(".")
        on: list = []
        if head in names:
            f = spec.factor(head)
            if rest not in f.technique.knobs:
                allowed = ", ".join(f.technique.knobs) if f.builtin or f.plugin else "none (custom diff)"
                raise ConfigError(f"design.space.{p.key}: {rest!r} is not a knob of {head}; allowed knobs: {allowed}")
            on, key = [f.technique], f.technique.knobs[rest]
        else:
            key = p.key
        probes = (
            p.choices if p.type == "choice" else (int(p.low), int(p.high)) if p.type == "int" else (p.low, p.high)
        )  # as the runner draws them
        for probe in probes:
            try:
                cfg = apply_diff(with_techniques(spec.base, on), {key: probe}).validate()
                check_resources(cfg, spec.resources)
            except ConfigError as e:
                raise ConfigError(f"design.space.{p.key}: {probe!r}: {e}") from None


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study YAML file."""
    data = read_yaml(path)
    try:
        return study_from_dict(data, path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
