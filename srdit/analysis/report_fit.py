"""What a study report shows, fitted once before anything is drawn: every metric's analysis, the primary metric's
effects over training, the evaluation protocol the metrics were computed under, and the intervals of the ladder's
steps and the leave-one-out effects. The page (`page.render_report`) renders a `ReportFit` and fits nothing, as
statsmodels' `summary()` renders a fitted result and never refits the model.

This module must not import torch, ray or mlflow.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from srdit import metric_registry
from srdit.analysis.effects import (
    OK_STATUSES,
    Analysis,
    AnalysisError,
    AnalysisFailure,
    analyze_study,
    combo_label,
)
from srdit.analysis.over_steps import OverSteps, study_over_steps
from srdit.analysis.results import PROTOCOL_COLUMNS, StudyResults

__all__ = ["Protocol", "ReportFit", "fit_report", "protocols", "mixed_protocols", "welch_interval"]


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol of a study's finished runs: `values` maps each `PROTOCOL_COLUMNS` column to its text
    (blank: not recorded), `cells` names the cells (technique names) whose runs used it, `n_runs` counts them."""

    values: dict[str, str]
    cells: list[str]
    n_runs: int


def protocols(results: StudyResults) -> list[Protocol]:
    """The distinct evaluation protocols of the finished runs, the most used first; [] when the table records none
    (a CSV without the `protocol.*` columns)."""
    t = results.table
    cols = [c for c in PROTOCOL_COLUMNS if c in t.columns]
    if not cols or t.empty:
        return []
    ok = t["status"].astype(str).str.lower().isin(OK_STATUSES) if "status" in t.columns else pd.Series(True, t.index)
    t = t[ok]
    labels = _technique_labels(t, results.factors)
    keyed = t[cols].fillna("").astype(str)
    out = []
    for values, g in keyed.groupby(cols, sort=False):
        values = values if isinstance(values, tuple) else (values,)
        cells = list(dict.fromkeys(labels.loc[g.index]))
        out.append(Protocol(dict(zip(cols, values)), sorted(cells, key=_combo_order(results.factors)), len(g)))
    if len(out) == 1 and not any(out[0].values.values()):
        return []
    return sorted(out, key=lambda p: -p.n_runs)


def _technique_labels(t: pd.DataFrame, factors: list[str]) -> pd.Series:
    """Each row's cell by the names of its techniques that are on (a 0/1 or on/off factor column)."""
    on = t[factors].astype(str).apply(lambda c: c.str.strip().str.lower().isin(["1", "1.0", "true", "on", "yes"]))
    return on.apply(lambda r: combo_label(f for f in factors if r[f]), axis=1)


def _combo_order(factors: list[str]):
    """Sort key of technique-name labels ("repa+rope"): fewer techniques first, then the study's factor order."""
    idx = {f: i for i, f in enumerate(factors)}

    def key(name: str) -> tuple[int, list[int]]:
        on = [idx[x] for x in name.split("+") if x in idx]
        return len(on), on

    return key


def mixed_protocols(ps: list[Protocol]) -> str | None:
    """One line saying how the protocols differ and which cells used which, or None for at most one protocol."""
    if len(ps) < 2:
        return None
    differ = [c for c in ps[0].values if len({p.values[c] for p in ps}) > 1]
    what = "; ".join(
        f"{PROTOCOL_COLUMNS[c]}: " + ", ".join(f"{p.values[c] or 'not recorded'} ({', '.join(p.cells)})" for p in ps)
        for c in differ
    )
    return (
        f"the runs' metrics were computed under {len(ps)} different evaluation protocols ({what}); metrics "
        "from different protocols are not comparable, so no comparison is made: evaluate every run under one "
        "protocol (the study's sample and eval sections) and report again"
    )


def welch_interval(a: np.ndarray, b: np.ndarray, level: float) -> list[float] | None:
    """Welch's t interval at `level` for mean(b) - mean(a) (unequal variances, Welch-Satterthwaite df); None
    unless both samples have two or more values and one of them varies (no error estimate)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):  # no spread at all: no df, no interval
        return None
    with warnings.catch_warnings():  # scipy warns of precision loss for a constant sample; its variance is 0 exactly
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_ind(b, a, equal_var=False).confidence_interval(level)
    lo, hi = float(ci.low), float(ci.high)
    return [lo, hi] if np.isfinite(lo) and np.isfinite(hi) else None


@dataclass(frozen=True)
class ReportFit:
    """The inputs of a study report: the results table and the analyses fitted on it.

    `analyses` maps each analysed metric (the primary first) to its `effects.Analysis`, or an `AnalysisFailure`
    with the one-line reason it could not be analysed. `over_steps` is the primary metric analysed at every
    evaluated training step (`over_steps.study_over_steps`), an `AnalysisFailure` when that failed, and None when the
    primary metric itself could not be analysed. `protocols`: the evaluation protocols of the finished runs
    (`protocols`); `protocol_error`: the refusal when there are several (`mixed_protocols`), in which case every
    analysis is an AnalysisFailure with that reason. `ladder_ci` (ladder step -> interval of its change of the
    primary metric's mean, metric units) and `loo_ci` (technique -> interval of its leave-one-out effect, gain
    units): individual Welch t intervals at 1 - alpha over the seeds of the two cells compared; absent where a cell
    has fewer than two finished runs."""

    results: StudyResults
    analyses: dict[str, Analysis | AnalysisFailure]
    over_steps: OverSteps | AnalysisFailure | None = None
    protocols: list[Protocol] = field(default_factory=list)
    protocol_error: str | None = None
    ladder_ci: dict[int, list[float]] = field(default_factory=dict)
    loo_ci: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.results.metric not in self.analyses:
            raise ValueError(
                f"the report's analyses lack the primary metric '{self.results.metric}' "
                f"(have: {', '.join(self.analyses) or 'none'})"
            )

    @property
    def primary(self) -> Analysis | AnalysisFailure:
        """The primary metric's analysis."""
        return self.analyses[self.results.metric]


def _finished_values(results: StudyResults, rows: pd.Series) -> np.ndarray:
    t = results.table[rows]
    v = pd.to_numeric(t[results.metric], errors="coerce").to_numpy(dtype=float)
    ok = t["status"].astype(str).str.lower().isin(OK_STATUSES).to_numpy() if "status" in t.columns else True
    return v[ok & np.isfinite(v)]


def step_intervals(results: StudyResults, a: Analysis) -> tuple[dict[int, list[float]], dict[str, list[float]]]:
    """(ladder_ci, loo_ci) of `ReportFit` for the primary metric's analysis `a` at level 1 - a.alpha."""
    t, level = results.table, 1 - a.alpha
    ladder: dict[int, list[float]] = {}
    rows = a.attribution.ladder or []
    for prev, r in zip(rows, rows[1:]):
        if r.delta is None:
            continue
        x = [_finished_values(results, t["cell"].astype(str) == str(c.cell)) for c in (prev, r)]
        ci = welch_interval(x[0], x[1], level)
        if ci:
            ladder[r.step] = ci
    loo: dict[str, list[float]] = {}
    sign = 1.0 if a.direction == "max" else -1.0
    log = metric_registry.is_log(results.metric) and a.scale == "log"
    f = results.factors
    full = (t[f] == 1).all(axis=1)
    for x, v in a.attribution.loo.items():
        if v is None:
            continue
        without = (t[x] == 0) & (t[[y for y in f if y != x]] == 1).all(axis=1)
        g = [_finished_values(results, m) for m in (without, full)]
        g = [sign * (np.log(v_[v_ > 0]) if log else v_) for v_ in g]
        ci = welch_interval(g[0], g[1], level)
        if ci:
            loo[x] = sorted(ci)
    return ladder, loo


def fit_report(
    results: StudyResults, *, alpha: float = 0.05, threshold: float = 0.0, bootstrap: bool = True
) -> ReportFit:
    """Fit everything the report page shows: `effects.analyze_study` (every metric, at level `alpha`, practical
    antagonism `threshold` in gain units, seed-bootstrap intervals where calibrated when `bootstrap`), when the
    primary metric could be analysed `over_steps.study_over_steps` (an `AnalysisFailure` when it raises
    AnalysisError) and the ladder and leave-one-out intervals (`step_intervals`). Runs evaluated under different
    protocols are not compared: every metric is then an AnalysisFailure with the `mixed_protocols` line. Raises what
    `analyze_study` raises."""
    ps = protocols(results)
    mixed = mixed_protocols(ps)
    if mixed:
        metrics = {results.metric: results.direction, **results.other_metrics}
        failed = {m: AnalysisFailure(metric=m, direction=d, error=mixed) for m, d in metrics.items()}
        return ReportFit(results, failed, None, ps, mixed)
    analyses = analyze_study(results, alpha=alpha, threshold=threshold, bootstrap=bootstrap)
    over_steps: OverSteps | AnalysisFailure | None = None
    ladder_ci: dict[int, list[float]] = {}
    loo_ci: dict[str, list[float]] = {}
    a = analyses[results.metric]
    if isinstance(a, Analysis):
        try:
            over_steps = study_over_steps(results, alpha=alpha, threshold=threshold, bootstrap=bootstrap)
        except AnalysisError as e:
            over_steps = AnalysisFailure(metric=results.metric, direction=results.direction, error=str(e))
        ladder_ci, loo_ci = step_intervals(results, a)
    return ReportFit(results, analyses, over_steps, ps, None, ladder_ci, loo_ci)
