"""Techniques: the registry of named config diffs, the one rule that merges them, and the run configs built from
them (the presets and the run-YAML loader).

A *technique* is a named config diff (dotted key -> value) with its paper, its knobs (short name -> dotted key) and
the modules that implement it. A run, or a study cell, is `base + the merged diffs of its enabled techniques`
(`merge_diffs`, the only merge rule in srdit): two techniques writing the same key with different values (compared
after conversion to the field's type, so 3e-3 and 0.003 agree) is an error naming both, the key and both values,
unless a `wins` rule says which one wins.

Layering: this module imports `srdit.config` (the schema and its strict loading) and nothing heavier; `srdit.config`
never imports it. That is why the presets and `load_run_config`, which need techniques, live here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srdit import ext
from srdit.builtins import BUILTINS
from srdit.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RegConfig,
    RepaConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    apply_diff,
    convert_value,
    flatten_dict,
    from_dict,
    nested_update,
    parse_override,
    read_yaml,
    to_dict,
)


@dataclass(frozen=True)
class Technique:
    """A named config diff with its provenance. Study-defined techniques (`{name: x, diff: {...}}`) are Techniques
    too, with no paper, knobs or code."""

    name: str
    description: str
    paper: str
    diff: Mapping[str, Any]
    "Dotted config key -> value, applied when the technique is on."
    knobs: Mapping[str, str] = field(default_factory=dict)
    "Short knob name -> dotted config key, for studies that override a technique's settings."
    code: tuple[str, ...] = ()
    "Modules that implement it (importable names), where to read or change it."
    stage: str = "train"
    """When it acts: "train" (it shapes the trained weights) or "eval" (it acts only when sampling or evaluating a
    trained model: every key of its diff lies in an evaluation-time section, `EVAL_SECTIONS`). Cells that differ
    only in evaluation-time techniques share one training."""

    @property
    def builtin(self) -> bool:
        """A registry technique (recorded in RunConfig.techniques), not a study's custom diff."""
        return self.name in TECHNIQUES

    def knob_key(self, knob: str) -> str:
        """The dotted config key of a knob; ConfigError listing the allowed knobs when unknown."""
        if knob not in self.knobs:
            allowed = ", ".join(self.knobs) or "none"
            raise ConfigError(f"technique {self.name}: unknown knob {knob!r}; allowed knobs: {allowed}")
        return self.knobs[knob]

    def resolved_diff(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The diff with knob overrides (short knob name -> value) written over it."""
        diff = dict(self.diff)
        for knob, value in (overrides or {}).items():
            diff[self.knob_key(knob)] = value
        return diff

    def knob_stage(self, knob: str) -> str:
        """ "train" or "eval": the stage of the config key a knob writes (`key_stage`)."""
        return key_stage(self.knob_key(knob))

    def with_knobs(self, overrides: Mapping[str, Any] | None = None) -> Technique:
        """This technique with knob overrides folded into its diff."""
        return dataclasses.replace(self, diff=self.resolved_diff(overrides)) if overrides else self


EVAL_SECTIONS = ("sample", "eval")
"""Config sections read only when sampling from or evaluating a trained model (sampler, guidance, label balance,
sample count, metric references): a change there needs no new training."""


def key_stage(key: str) -> str:
    """ "eval" for a dotted config key in an evaluation-time section (`EVAL_SECTIONS`) or of an evaluation-time
    plugin (`ext.<name>.<knob>`), else "train"."""
    head, _, rest = key.partition(".")
    if head == "ext" and rest.split(".", 1)[0] in ext.PLUGINS:
        return ext.PLUGINS[rest.split(".", 1)[0]].stage
    return "eval" if head in EVAL_SECTIONS else "train"


def diff_stage(diff: Mapping[str, Any]) -> str:
    """ "eval" when every key of a (non-empty) dotted diff is evaluation-time, else "train"."""
    return "eval" if diff and all(key_stage(k) == "eval" for k in diff) else "train"


def custom_technique(name: str, diff: Mapping[str, Any], description: str = "") -> Technique:
    """A study's own technique: a named diff (nested mappings are flattened to dotted keys); its stage follows from
    the keys it writes (`diff_stage`)."""
    flat = flatten_dict(diff)
    return Technique(name, description, "", flat, stage=diff_stage(flat))


def training_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config (`srdit.config.to_dict` form) that shapes the trained weights: without the
    evaluation-time sections, and with only training-time techniques in `techniques`. Two cells whose training
    configs are equal train the same model (same seed, same data, same code) and can share one training."""
    out = {k: v for k, v in config.items() if k not in EVAL_SECTIONS}
    if "techniques" in out:
        out["techniques"] = [t for t in out["techniques"] if t not in TECHNIQUES or TECHNIQUES[t].stage == "train"]
    if "ext" in out:
        kept = {n: v for n, v in out["ext"].items() if n not in ext.PLUGINS or ext.PLUGINS[n].stage == "train"}
        out = {k: v for k, v in out.items() if k != "ext"} | ({"ext": kept} if kept else {})
    return out


def evaluation_plugins(config: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation-time plugins of a resolved config's `ext` section (what `training_config` leaves out)."""
    return {n: v for n, v in config.get("ext", {}).items() if n in ext.PLUGINS and ext.PLUGINS[n].stage == "eval"}


def builtin_technique(b: ext.Builtin) -> Technique:
    """A built-in's declaration (`srdit.builtins`) as a registry Technique: its diff and knobs over the typed config
    keys, its code its own module first. ConfigError when its stage does not match the keys it writes (an "eval"
    technique writes only evaluation-time keys, a "train" one at least one training-time key)."""
    if diff_stage(b.diff) != b.stage or (b.stage == "eval" and any(key_stage(k) != "eval" for k in b.knobs.values())):
        raise ConfigError(f"built-in {b.name} ({b.module}): stage {b.stage} does not match the keys it writes")
    return Technique(b.name, b.description, b.paper, dict(b.diff), dict(b.knobs), code=b.where(), stage=b.stage)


TECHNIQUES: dict[str, Technique] = {b.name: builtin_technique(b) for b in BUILTINS}
"""The built-in techniques by name, in registry order: assembled from their modules (`srdit.builtins`, one each),
never written here."""

SRDIT_STACK = (
    "repa",
    "reg",
    "sprint",
    "rmsnorm",
    "rope",
    "qk_norm",
    "value_residual",
    "cfm",
    "time_shift",
    "balanced_labels",
)
"The SR-DiT recipe's techniques (the `SR-DiT-B/1` preset)."


def technique(name: str) -> Technique:
    """The registry entry of `name` (a built-in or a loaded plugin, `plugin_technique`); ConfigError listing the
    allowed names when unknown."""
    if isinstance(name, str) and name in ext.PLUGINS:
        return plugin_technique(ext.PLUGINS[name])
    if not isinstance(name, str) or name not in TECHNIQUES:
        raise ConfigError(f"unknown technique {name!r}; allowed: {', '.join(known_techniques())}")
    return TECHNIQUES[name]


def known_techniques() -> list[str]:
    """Built-in names, then the loaded plugins'."""
    return [*TECHNIQUES, *ext.PLUGINS]


# ----------------------------------------------------------------------------------------------------------------
# Plugin techniques (`srdit.ext`)
# ----------------------------------------------------------------------------------------------------------------


def plugin_technique(p: ext.Plugin) -> Technique:
    """A loaded plugin as a Technique: its diff writes every knob's default under `ext.<name>` (so the plugin is on
    exactly when its `ext` entry exists), its knobs are `ext.<name>.<knob>`, its code is where it lives."""
    return Technique(
        p.name,
        p.description,
        p.paper,
        {k: p.knobs[n].default for n, k in p.knob_keys.items()} or {f"ext.{p.name}": {}},
        p.knob_keys,
        code=(p.where(),),
        stage=p.stage,
    )


def load_plugins(entries: Any, relative_to: str | Path | None = None, where: str = "plugins") -> list[str]:
    """Load a YAML's `plugins:` list (module names, or .py files / package folders relative to `relative_to`) and
    register each plugin (`srdit.ext.register`); returns the names loaded. One-line ConfigError naming the entry
    for a missing file, an import error (the plugin's own file:line), a name that clashes with a built-in
    technique, a bad declaration (`srdit.ext.check_plugin`)."""
    load_installed_plugins()
    if entries is None:
        return []
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ConfigError(f"{where}: expected a list of module names or .py files / package folders, got {entries!r}")
    rel = Path(relative_to) if relative_to is not None else None
    names: list[str] = []
    for i, entry in enumerate(entries):
        try:
            for p in ext.import_plugins(entry, rel):
                if p.name in TECHNIQUES:
                    raise ConfigError(
                        f"plugin {p.name} ({p.where()}): the name is a built-in technique; give the plugin another name"
                    )
                ext.register(p)
                names.append(p.name)
        except ConfigError as e:
            raise ConfigError(f"{where}[{i}]: {e}") from None
    return names


def load_installed_plugins() -> list[str]:
    """Register the plugins of installed packages (entry-point group `srdit.ext.ENTRY_POINT_GROUP`); their names.
    Every YAML that lists `plugins:` (and `srdit techniques`) loads them too, so an installed plugin's technique can
    be named without listing it; installing one changes no other config (a plugin that is off is absent)."""
    names = []
    for p in ext.installed_plugins():
        if p.name in TECHNIQUES:
            raise ConfigError(f"entry point {p.origin}: plugin {p.name}: the name is a built-in technique")
        names.append(ext.register(p).name)
    return names


def load_plugin_sources(sources: Iterable[Mapping[str, str]]) -> None:
    """Load the plugins a job carries (`srdit.provenance.plugin_sources`) in this process: the worker imports each from the
    location the driver loaded it from."""
    for s in sources:
        if s["name"] not in ext.PLUGINS:
            load_plugins([s["origin"]], where=f"plugin {s['name']}")


# ----------------------------------------------------------------------------------------------------------------
# The merge
# ----------------------------------------------------------------------------------------------------------------


def merge_diffs(
    techniques: Sequence[Technique | str],
    knobs: Mapping[str, Mapping[str, Any]] | None = None,
    wins: Iterable[tuple[str, str]] = (),
    searched: Mapping[str, Any] | None = None,
    off: Iterable[str] = (),
) -> dict[str, Any]:
    """The one merge rule: the diffs of the enabled `techniques` (entries or registry names) as one dotted-key diff.

    - `knobs` ({technique: {knob: value}}) writes knob overrides into a technique's diff before merging.
    - A key written by several techniques takes the value of the one that agrees with (equal after conversion to
      the key's type: `srdit.config.convert_value`) or wins over every other writer, `wins` holding (winner, loser)
      pairs; when none does, ConfigError names two techniques that disagree
      with no rule between them, the key and both values.
    - `searched` ({key: value}, a search design's knobs) is written over the merge: `<technique>.<knob>` applies when
      the technique is enabled and is dropped when it is in `off` (a technique of the study switched off); any
      other key is a dotted config key.
    """
    entries = [technique(t) if isinstance(t, str) else t for t in techniques]
    by_name = {t.name: t for t in entries}
    win = set(wins)
    writers: dict[str, list[tuple[str, Any]]] = {}
    for t in entries:
        for key, value in t.resolved_diff((knobs or {}).get(t.name)).items():
            writers.setdefault(key, []).append((t.name, value))
    out: dict[str, Any] = {}
    for key, ws in writers.items():
        out[key] = _merged_value(key, ws, win)
    off = set(off)
    for key, value in (searched or {}).items():
        head, _, rest = key.partition(".")
        if head in by_name:
            out[by_name[head].knob_key(rest)] = value
        elif head not in off:
            out[key] = value
    return out


def _canonical(key: str, value: Any) -> Any:
    """The value as the config will hold it (a value that does not convert is compared as written; applying the
    merged diff reports it)."""
    try:
        return convert_value(key, value)
    except ConfigError:
        return value


def _merged_value(key: str, writers: list[tuple[str, Any]], wins: set[tuple[str, str]]) -> Any:
    same = {(a, b): _canonical(key, va) == _canonical(key, vb) for a, va in writers for b, vb in writers}
    for a, va in writers:
        if all(same[a, b] or (a, b) in wins for b, vb in writers if b != a):
            return va
    clashes = [(a, va, b, vb) for i, (a, va) in enumerate(writers) for b, vb in writers[i + 1 :] if not same[a, b]]
    a, va, b, vb = next((c for c in clashes if (c[0], c[2]) not in wins and (c[2], c[0]) not in wins), clashes[0])
    raise ConfigError(
        f"techniques {a} and {b} both set {key} ({va!r} vs {vb!r}); they cannot be on together "
        f"unless one wins: in a study add `{{wins: {a}, over: {b}}}` or `excludes: [{a}, {b}]`"
    )


def technique_diff(
    names: Sequence[str], knobs: Mapping[str, Mapping[str, Any]] | None = None, wins: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """`merge_diffs` of registry techniques, with `wins` given as config key -> winning technique."""
    pairs = {(w, n) for w in (wins or {}).values() for n in names if n != w}
    return merge_diffs(list(names), knobs, pairs)


def with_techniques(
    base: RunConfig,
    techniques: Sequence[Technique | str],
    knobs: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    wins: Iterable[tuple[str, str]] = (),
    searched: Mapping[str, Any] | None = None,
    off: Iterable[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> RunConfig:
    """`base` plus the merged diffs of `techniques` (see `merge_diffs`) and then `extra` (dotted keys), validated.
    Registry techniques are appended to `RunConfig.techniques`; a study's custom diffs are not."""
    diff = {**merge_diffs(techniques, knobs, wins, searched, off), **(extra or {})}
    names = tuple(t if isinstance(t, str) else t.name for t in techniques)
    recorded = tuple(n for n, t in zip(names, techniques) if (t in TECHNIQUES if isinstance(t, str) else t.builtin))
    return dataclasses.replace(apply_diff(base, diff), techniques=tuple(base.techniques) + recorded).validate()


# ----------------------------------------------------------------------------------------------------------------
# Presets and the run-config loader
# ----------------------------------------------------------------------------------------------------------------

PRESETS = ("digits", "SR-DiT-B/1")


def preset(name: str) -> RunConfig:
    """Named, validated run configs: `digits` (the embedded default) and `SR-DiT-B/1` (the paper's recipe)."""
    if name == "digits":
        return RunConfig().validate()
    if name == "SR-DiT-B/1":
        base = RunConfig(
            model=ModelConfig(
                size="B",
                patch_size=1,
                in_channels=32,
                input_size=16,
                num_classes=1000,
                repa=RepaConfig(projector_dim=2048, teacher_dim=768),
                reg=RegConfig(dim=768),
            ),
            data=DataConfig(dataset="latents", path="data/imagenet256_invae", teacher="dinov2_vitb14"),
            train=TrainConfig(
                steps=400_000,
                batch_size=256,
                lr=1e-4,
                ema_decay=0.9999,
                log_every=100,
                eval_every=50_000,
                ckpt_every=10_000,
            ),
            sample=SampleConfig(sampler="sde", steps=250),
            eval=EvalConfig(n_samples=50_000, batch_size=64),
        )
        return with_techniques(base, SRDIT_STACK)
    raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")


def run_config_from_dict(
    data: Mapping[str, Any], where: str = "", validate: bool = True, relative_to: str | Path | None = None
) -> RunConfig:
    """A run config from the mapping of a run YAML (or a study's `base:`): `plugins` (loaded first: `load_plugins`,
    paths relative to `relative_to`), `preset` (default digits), `techniques` (registry or plugin names), then
    sections (model, train, ..., `ext`) written key by key over the preset. `where` is the YAML path of the mapping
    and prefixes every error (`base.train.steps: ...`)."""

    def at(key: str) -> str:
        return f"{where}.{key}" if where else key

    data = dict(data)
    load_plugins(data.pop("plugins", None), relative_to, at("plugins"))
    name = data.pop("preset", "digits")
    if not isinstance(name, str):
        raise ConfigError(f"{at('preset')}: expected a string; allowed: {', '.join(PRESETS)}")
    try:
        cfg = preset(name)
    except ConfigError as e:
        raise ConfigError(f"{at('preset')}: {e}") from None
    techniques = data.pop("techniques", [])
    if not isinstance(techniques, list) or not all(isinstance(t, str) for t in techniques):
        raise ConfigError(f"{at('techniques')}: expected a list of names; allowed: {', '.join(known_techniques())}")
    for t in techniques:
        if t in cfg.techniques:
            raise ConfigError(f"{at('techniques')}: {t} is already on in preset {name}; remove it from the list")
        if techniques.count(t) > 1:
            raise ConfigError(f"{at('techniques')}: {t} is listed twice")
    tree = to_dict(cfg)
    for section, sub in data.items():
        if section not in tree and section != "ext":
            raise ConfigError(
                f"{at(section)}: unknown key; allowed keys{' in ' + where if where else ''}: preset, "
                f"techniques, {', '.join(tree)}, plugins, ext"
            )
        if section == "ext":
            tree.setdefault("ext", {})
        if isinstance(sub, Mapping) and isinstance(tree[section], dict):
            for k, v in flatten_dict(sub, section).items():
                nested_update(tree, k, v)
        else:
            tree[section] = sub
    try:
        cfg = from_dict(RunConfig, tree)
        if techniques:
            cfg = with_techniques(cfg, techniques)
        return cfg.validate() if validate else cfg
    except ConfigError as e:
        if not where:
            raise
        sep = "." if re.match(r"^[a-z_]+[.:]", str(e)) else ": "
        raise ConfigError(f"{where}{sep}{e}") from None


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run YAML (or the digits default), apply its `preset` and `techniques`, then key=value overrides;
    validate. The overrides `preset=NAME` and `techniques=[a, b]` replace the YAML's entries and are applied as the
    YAML's would be (the techniques' diffs included)."""
    data = read_yaml(path) if path is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    diff = dict(parse_override(o) for o in overrides or [])
    for key in ("preset", "techniques"):
        if key in diff:
            data = {**data, key: diff.pop(key)}
    cfg = run_config_from_dict(data, validate=False, relative_to=Path(path).parent if path is not None else None)
    if diff:
        cfg = apply_diff(cfg, diff)
    return cfg.validate()
