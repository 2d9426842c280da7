"""Effects over training time: `effects.analyze` at every evaluated step, and whether an effect changes between the
first and the last evaluated step.

Input: a long table, one row per trial and evaluated step (a `step` column, the factors, seed, status and the metric
at that step), from a CSV (`srdit analyze RUNS.csv --all-steps`) or from a study's learning curves
(`study_table`). Each step's rows are analysed by `effects.analyze` with the same options: the analysis at step s is
exactly `analyze(rows at s)` (`rows_at_step`), so every interval keeps its meaning (main effects: individual t
intervals; pair synergies: simultaneous over the pairs of that step).

Change over training (the question "does a technique that helps early still help at the end?", SR-DiT, Sec. 5):
per trial evaluated at both the first and the last step, the change y(last) - y(first) (log scale for log metrics)
is analysed by `effects.analyze` as a metric of its own. OLS is linear in y, so its effects are exactly the
differences of the two steps' effects on those trials, with intervals that account for the pairing. The changes of
all estimable mains and clean pairs form one family: simultaneous Bonferroni intervals (t at 1 - alpha / (2 m),
pure-error df) decide, Holm's p_adj is reported. A statement such as "helps early, less at the end" is made only for
an effect whose change interval excludes 0; otherwise the result says that the data carry no such statement.

This module must not import torch, ray or mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from srdit.analysis.effects import (
    FAILURE_STATUSES,
    Analysis,
    AnalysisError,
    AnalysisFailure,
    Options,
    _adjust,
    analyze,
    pair_name,
)
from srdit.analysis.results import StudyResults

__all__ = [
    "STEP_COLUMN",
    "NOT_EVALUATED",
    "Point",
    "Series",
    "Change",
    "OverSteps",
    "evaluated_steps",
    "rows_at_step",
    "analyze_over_steps",
    "study_table",
    "study_over_steps",
]

STEP_COLUMN = "step"
"Default name of the step column of a long table."
NOT_EVALUATED = "not evaluated"
"Status of a trial with no evaluation at a step it did not fail before (excluded from that step, with a note)."


def _num(x: Any) -> float | None:
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _step_values(table: pd.DataFrame, step_col: str, source: str = "the table") -> pd.Series:
    """The step column as numbers; AnalysisError naming the column when it is missing or not numeric."""
    if step_col not in table.columns:
        raise AnalysisError(
            f"{source} has no '{step_col}' column: an analysis per step needs one row per trial and "
            f"evaluated step with the step in a column (--step-col names it); columns: "
            f"{sorted(map(str, table.columns))[:30]}"
        )
    steps = pd.to_numeric(table[step_col], errors="coerce")
    bad = steps.isna() | ~np.isfinite(steps.astype(float))
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        raise AnalysisError(
            f"{source}: column '{step_col}' must hold a number in every row (row {i + 1}: "
            f"{table[step_col].iloc[i]!r}, {int(bad.sum())} such row(s))"
        )
    return steps.astype(float)


def _as_step(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def evaluated_steps(table: pd.DataFrame, step_col: str = STEP_COLUMN, source: str = "the table") -> list[int | float]:
    """The distinct steps of a long table, ascending."""
    return [_as_step(s) for s in sorted(_step_values(table, step_col, source).unique())]


def rows_at_step(
    table: pd.DataFrame, step: float, step_col: str = STEP_COLUMN, source: str = "the table"
) -> pd.DataFrame:
    """The rows of a long table at `step` (one per trial); AnalysisError listing the steps present when it has
    none."""
    steps = _step_values(table, step_col, source)
    rows = table[steps == float(step)]
    if rows.empty:
        have = evaluated_steps(table, step_col, source)
        shown = ", ".join(map(str, have[:20])) + (" ..." if len(have) > 20 else "")
        raise AnalysisError(f"step {_as_step(float(step))} is not in {source}; evaluated steps: {shown}")
    return rows


# --------------------------------------------------------------------------------------------------------------------
# the typed result
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One effect at one step: oriented gain (main effect) or synergy S (pair), positive = better, on the analysis
    scale (log for log metrics); `ci` as the step's analysis gives it (None without replicates); `significant`: the
    interval excludes 0 (None without an interval)."""

    step: int | float
    estimate: float | None
    ci: list[float] | None
    significant: bool | None

    def to_json(self) -> dict:
        return {"step": self.step, "estimate": self.estimate, "ci": self.ci, "significant": self.significant}


@dataclass(frozen=True)
class Series:
    """One effect (a technique's main effect, or a pair's synergy) across the evaluated steps."""

    effect: str
    kind: str
    "'main' or 'pair'"
    points: list[Point]

    def to_json(self) -> dict:
        return {"effect": self.effect, "kind": self.kind, "points": [p.to_json() for p in self.points]}


@dataclass(frozen=True)
class Change:
    """The change of one effect from the first to the last evaluated step (oriented gain units: > 0 = the effect is
    better at the end), from the paired analysis of y(last) - y(first); `ci` is simultaneous over the family of
    changes tested (Bonferroni), `significant` when it excludes 0; `p_adj` by the analysis' correction."""

    effect: str
    kind: str
    first: int | float
    last: int | float
    estimate: float | None
    ci: list[float] | None
    p: float | None
    p_adj: float | None
    significant: bool | None
    statement: str | None = None
    "what the intervals carry, in words (only when `significant`)"

    def to_json(self) -> dict:
        return {
            "effect": self.effect,
            "kind": self.kind,
            "first": self.first,
            "last": self.last,
            "estimate": self.estimate,
            "ci": self.ci,
            "p": self.p,
            "p_adj": self.p_adj,
            "significant": self.significant,
            "statement": self.statement,
        }


@dataclass(frozen=True)
class OverSteps:
    """The analysis of one metric at every evaluated step (`analyses`, step -> `Analysis` or `AnalysisFailure`),
    the effects as series over the steps, the first-to-last changes and the statements they carry. `to_json()` is
    the JSON of `srdit analyze --all-steps --format json` and the report's effects_over_steps.json."""

    metric: str
    direction: str
    scale: str
    factors: list[str]
    alpha: float
    steps: list[int | float]
    analyses: dict[int | float, Analysis | AnalysisFailure]
    series: list[Series]
    changes: list[Change]
    statements: list[str]
    "one line per significant change, or one line saying that no statement is carried"
    change_interval: str | None = None
    "what `Change.ci` is"
    notes: list[str] = field(default_factory=list)

    @property
    def analysed_steps(self) -> list[int | float]:
        """Steps whose analysis succeeded."""
        return [s for s in self.steps if isinstance(self.analyses[s], Analysis)]

    def to_json(self) -> dict:
        return {
            "metric": self.metric,
            "direction": self.direction,
            "scale": self.scale,
            "factors": list(self.factors),
            "alpha": self.alpha,
            "steps": list(self.steps),
            "intervals": {
                "main": f"individual {int(round(100 * (1 - self.alpha)))}% t intervals of the oriented main effect "
                "(gain, positive = better) at each step",
                "pair": "the step's simultaneous synergy intervals (Bonferroni over its tested pairs), S = 2 INT "
                "oriented",
                "change": self.change_interval,
                "across steps": "pointwise: each step's intervals hold for that step; only `changes` compares steps",
            },
            "series": [s.to_json() for s in self.series],
            "changes": [c.to_json() for c in self.changes],
            "statements": list(self.statements),
            "notes": list(self.notes),
            "per_step": {str(s): a.to_json() for s, a in self.analyses.items()},
        }


# --------------------------------------------------------------------------------------------------------------------
# the per-step loop
# --------------------------------------------------------------------------------------------------------------------
def _oriented(a: Analysis, name: str, kind: str) -> tuple[float | None, list[float] | None]:
    if kind == "pair":
        return a.pairs.synergy.get(name), a.pairs.synergy_ci.get(name)
    sign = 1 if a.direction == "max" else -1
    v, c = a.fit.main_effects.get(name), a.fit.ci.get(name)
    return (None if v is None else sign * v), (None if not c else sorted([sign * c[0], sign * c[1]]))


def _effect_names(factors: Sequence[str]) -> list[tuple[str, str]]:
    names = [(f, "main") for f in factors]
    names += [(pair_name(a, b), "pair") for i, a in enumerate(factors) for b in factors[i + 1 :]]
    return names


def analyze_over_steps(
    table: pd.DataFrame,
    factors: Sequence[str],
    metric: str,
    direction: str = "min",
    options: Options | None = None,
    *,
    step_col: str = STEP_COLUMN,
    trial_col: str | None = "trial",
    steps: Sequence[float] | None = None,
    source: str = "the table",
    **overrides: Any,
) -> OverSteps:
    """`effects.analyze` of `metric` at every step of a long table (or at `steps`), the effects as series and their
    first-to-last changes (module docstring).

    table: one row per trial and evaluated step; `step_col` holds the step, `trial_col` (or, without it, the factors
    and the seed column) identifies a trial across steps. options / overrides: as `analyze` (the same for every
    step). A step whose rows cannot be analysed gets an `AnalysisFailure` with the reason; AnalysisError when the
    table has no usable step column, a requested step is absent or no step can be analysed."""
    o = replace(options or Options(), **overrides)
    o.validate()
    factors = [str(f) for f in factors]
    all_steps = evaluated_steps(table, step_col, source)
    if steps is not None:
        for s in steps:
            rows_at_step(table, s, step_col, source)  # names the steps present when one is absent
        all_steps = sorted({_as_step(float(s)) for s in steps})
    analyses: dict[int | float, Analysis | AnalysisFailure] = {}
    for s in all_steps:
        try:
            analyses[s] = analyze(rows_at_step(table, s, step_col, source), factors, metric, direction, o)
        except AnalysisError as e:
            analyses[s] = AnalysisFailure(metric=metric, direction=direction, error=str(e))
    ok = [s for s in all_steps if isinstance(analyses[s], Analysis)]
    if not ok:
        first = analyses[all_steps[0]]
        raise AnalysisError(f"no step of {source} can be analysed (step {all_steps[0]}: {first.error})")
    ref = analyses[ok[-1]]
    series = []
    for name, kind in _effect_names(factors):
        pts = []
        for s in ok:
            est, ci = _oriented(analyses[s], name, kind)
            sig = None if ci is None else bool(ci[0] > 0 or ci[1] < 0)
            pts.append(Point(step=s, estimate=_num(est), ci=ci, significant=sig))
        if any(p.estimate is not None for p in pts):
            series.append(Series(effect=name, kind=kind, points=pts))
    notes = [f"step {s}: {analyses[s].error}" for s in all_steps if isinstance(analyses[s], AnalysisFailure)]
    changes, statements, interval = [], [], None
    if len(ok) == 1:
        notes.append(f"only one step ({ok[0]}) could be analysed: no effects over training to compare")
    if len(ok) >= 2:
        changes, interval, cnotes, why = _changes(
            table,
            factors,
            metric,
            direction,
            o,
            step_col,
            trial_col,
            ok[0],
            ok[-1],
            {s.effect: s for s in series},
            source,
        )
        notes += cnotes
        statements = [c.statement for c in changes if c.statement]
        if why is not None:
            statements = [
                f"The change of the effects between step {ok[0]} and step {ok[-1]} is not tested ({why}): "
                "the data carry no statement about it."
            ]
        elif not statements:
            statements = [
                f"No effect changes significantly between step {ok[0]} and step {ok[-1]} "
                f"({sum(c.significant is not None for c in changes)} effect(s), simultaneous "
                f"{int(round(100 * (1 - o.alpha)))}% intervals): the data carry no statement such as "
                "'helps early, not at the end'."
            ]
    return OverSteps(
        metric=metric,
        direction=ref.direction,
        scale=ref.scale,
        factors=factors,
        alpha=o.alpha,
        steps=all_steps,
        analyses=analyses,
        series=series,
        changes=changes,
        statements=statements,
        change_interval=interval,
        notes=notes,
    )


def _state(est: float | None, ci: list[float] | None, kind: str) -> str:
    if ci is None or est is None:
        return "no interval"
    if ci[0] > 0:
        return "helps" if kind == "main" else "synergy"
    if ci[1] < 0:
        return "hurts" if kind == "main" else "antagonism"
    return "no clear effect" if kind == "main" else "no clear synergy"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3g}"


def _fmt_ci(c: list[float] | None) -> str:
    return "no CI" if not c else f"[{c[0]:.3g}, {c[1]:.3g}]"


def _changes(
    table: pd.DataFrame,
    factors: list[str],
    metric: str,
    direction: str,
    o: Options,
    step_col: str,
    trial_col: str | None,
    first: int | float,
    last: int | float,
    series: dict[str, Series],
    source: str,
) -> tuple[list[Change], str | None, list[str], str | None]:
    """The first-to-last changes (module docstring): the paired table of y(last) - y(first) analysed by `analyze`.
    Returns (changes, what their intervals are, notes, why nothing was tested or None)."""
    a_rows = rows_at_step(table, first, step_col, source)
    b_rows = rows_at_step(table, last, step_col, source)
    keys = (
        [trial_col]
        if trial_col and trial_col in table.columns
        else [*factors, *([o.seed_col] if o.seed_col and o.seed_col in table.columns else [])]
    )
    if a_rows.duplicated(keys).any() or b_rows.duplicated(keys).any():
        return (
            [],
            None,
            [],
            f"rows of one step do not identify their trial: {', '.join(keys)} repeat; add a 'trial' column",
        )

    seed = [o.seed_col] if o.seed_col and o.seed_col in table.columns else []
    carry = list(dict.fromkeys([*keys, *factors, *seed]))

    def values(rows: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
        y = pd.to_numeric(rows[metric], errors="coerce").astype(float)
        ok = np.isfinite(y)
        if o.status_col and o.status_col in rows.columns:
            from srdit.analysis.effects import OK_STATUSES

            ok &= rows[o.status_col].fillna("").astype(str).str.strip().str.lower().isin(OK_STATUSES)
        if o.log:
            ok &= y > 0
            y = np.log(y.where(y > 0))
        return rows.loc[ok, cols].assign(_y=y[ok])

    paired = values(b_rows, carry).merge(values(a_rows, keys), on=keys, suffixes=("_last", "_first"))
    note = (
        []
        if len(paired) == len(b_rows)
        else [
            f"the change between step {first} and step {last} uses the {len(paired)} trial(s) finished and evaluated at "
            f"both steps (of {len(b_rows)} at step {last})"
        ]
    )
    diff = paired[carry].assign(status="finished", change=paired["_y_last"] - paired["_y_first"])
    try:
        ca = analyze(
            diff,
            factors,
            "change",
            direction,
            replace(
                o, log=False, status_col="status", reason_col=None, bootstrap=False, strict=False, ladder_order=None
            ),
        )
    except AnalysisError as e:
        return [], None, note, f"it cannot be analysed: {e}"
    fit = ca.fit
    sign = 1 if ca.direction == "max" else -1
    tested = []
    for name, kind in _effect_names(factors):
        est = fit.main_effects.get(name) if kind == "main" else fit.interactions.get(name)
        clean = kind == "main" and name not in fit.aliased_effects and name not in fit.partial_aliases
        clean = clean or name in fit.clean_pairs
        if est is not None and clean and fit.p.get(name) is not None and fit.se.get(name):
            tested.append((name, kind))
    m = len(tested)
    tcrit = stats.t.ppf(1 - o.alpha / (2 * m), fit.df_resid) if m and fit.has_error else None
    # _adjust: statsmodels' values without its gc.collect() per call (a long analysis calls this once a step)
    p_adj = (
        dict(zip(tested, _adjust([fit.p[n] for n, _ in tested], o.correction, o.alpha)))
        if m and o.correction != "none"
        else {t: fit.p[t[0]] for t in tested}
    )
    out = []
    for name, kind in _effect_names(factors):
        raw = fit.main_effects.get(name) if kind == "main" else fit.interactions.get(name)
        if raw is None:
            continue
        mult = 1.0 if kind == "main" else 2.0  # S = 2 INT
        est = sign * mult * raw
        ci, sig, p, q = None, None, None, None
        if (name, kind) in tested and tcrit is not None:
            half = tcrit * mult * fit.se[name]
            ci = [est - half, est + half]
            sig = bool(ci[0] > 0 or ci[1] < 0)
            p, q = _num(fit.p[name]), _num(p_adj[(name, kind)])
        statement = None
        s = series.get(name)
        if sig and s is not None:
            pts = {pt.step: pt for pt in s.points}
            a, b = pts.get(first), pts.get(last)
            st_a = _state(a.estimate, a.ci, kind) if a else "no interval"
            st_b = _state(b.estimate, b.ci, kind) if b else "no interval"
            what = "gain" if kind == "main" else "synergy"
            statement = (
                f"{name}: {st_a} at step {first}, {st_b} at step {last}; the {what} "
                f"{'grows' if est > 0 else 'shrinks'} significantly: change {_fmt(est)} {_fmt_ci(ci)} "
                f"(step {first}: {_fmt(a.estimate if a else None)} {_fmt_ci(a.ci if a else None)}; "
                f"step {last}: {_fmt(b.estimate if b else None)} {_fmt_ci(b.ci if b else None)})"
            )
        out.append(
            Change(
                effect=name,
                kind=kind,
                first=first,
                last=last,
                estimate=_num(est),
                ci=[_num(ci[0]), _num(ci[1])] if ci else None,
                p=p,
                p_adj=q,
                significant=sig,
                statement=statement,
            )
        )
    interval = (
        (
            f"simultaneous {int(round(100 * (1 - o.alpha)))}% over the {m} change(s) tested (Bonferroni t, "
            f"df = {fit.df_resid:g}), oriented gain units; paired over the trials evaluated at step {first} "
            f"and step {last}"
        )
        if tcrit is not None
        else None
    )
    why = (
        None
        if tcrit is not None
        else "no replicated runs evaluated at both steps"
        if not fit.has_error
        else "no effect is estimable free of aliasing in this design"
    )
    return out, interval, note, why


# --------------------------------------------------------------------------------------------------------------------
# a study's long table
# --------------------------------------------------------------------------------------------------------------------
def study_table(results: StudyResults, metric: str | None = None) -> pd.DataFrame:
    """A study's long table of `metric` (default: the primary): the trial table's columns plus `step`, one row per
    trial and step at which the study evaluated `metric` (its learning curve).

    At the last step (the training length, `results.steps`, else the last curve step) the rows are the trial table
    itself, so the analysis there is the report's. At an earlier step s: a trial's value is its evaluation at s
    (status finished); a trial without one that failed counts as failed at s with its status (it failed before s);
    one that finished but has no evaluation at s gets the status 'not evaluated' and is left out of that step."""
    metric = metric or results.metric
    t = results.table.copy()
    c = results.curves
    if c is None or c.empty or metric not in set(c["key"]):
        steps: list = []
    else:
        c = c[c["key"] == metric].assign(step=lambda d: pd.to_numeric(d["step"], errors="coerce").astype(float))
        steps = sorted(c["step"].dropna().unique())
    last = float(results.steps) if results.steps else (float(steps[-1]) if steps else 0.0)
    frames = []
    if steps:
        value = c.drop_duplicates(["trial", "step"], keep="last").set_index(["trial", "step"])["value"]
        value = pd.to_numeric(value, errors="coerce")
        status = (
            t["status"].fillna("").astype(str).str.strip().str.lower()
            if "status" in t.columns
            else pd.Series("finished", index=t.index)
        )
        failed = status.isin(FAILURE_STATUSES)
        for s in steps:
            if s >= last:
                continue
            at_s = value.xs(s, level="step") if s in value.index.get_level_values("step") else pd.Series(dtype=float)
            v = t["trial"].map(at_s).astype(float)
            at = t.copy()
            at[metric] = v
            has = v.notna()
            at["status"] = np.where(has, "finished", np.where(failed, status, NOT_EVALUATED))
            if "status_reason" in at.columns:
                at["status_reason"] = np.where(has, "", at["status_reason"])
            frames.append(at.assign(step=_as_step(s)))
    frames.append(t.assign(step=_as_step(last)))
    return pd.concat(frames, ignore_index=True)


def study_over_steps(
    results: StudyResults,
    metric: str | None = None,
    *,
    alpha: float = 0.05,
    threshold: float = 0.0,
    bootstrap: bool = True,
) -> OverSteps:
    """`analyze_over_steps` of a study's metric (default: the primary) with the options the report's analysis of
    that metric uses (`effects.analyze_study`), on `study_table`. AnalysisError for a wall-clock metric: its
    values per log window carry the load of whatever else ran on the machine, and the study table holds their
    median, not a value at a step."""
    from srdit import metric_registry

    metric = metric or results.metric
    if metric in metric_registry.WALL_CLOCK:
        raise AnalysisError(
            f"{metric} is measured with a clock per log window (the machine's load is in it): it is "
            "not analysed over training; `srdit study bench` measures it under control"
        )
    direction = results.direction if metric == results.metric else results.other_metrics[metric]
    return analyze_over_steps(
        study_table(results, metric),
        results.factors,
        metric,
        direction,
        log=metric_registry.is_log(metric),
        alpha=alpha,
        threshold=threshold if metric == results.metric else 0.0,
        bootstrap=bootstrap,
        ladder_order=results.ladder_order,
        strict=False,
        source=f"study {results.study}",
    )
