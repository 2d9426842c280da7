"""Power before launch: the smallest main effect and pair synergy a two-level design detects, and the noise sd
a finished study's replicates give.

The model is the one `srdit.analysis.effects.fit_effects` fits to a study's runs (its steps 1-3 and 5-7, rebuilt
here from the cells alone, so that `srdit study plan` needs no results and no statistics package): +-1 coding,
``y = X b + e`` with e ~ N(0, sigma^2) independent, X = [a seed block (or the intercept) | the main columns | each
pair column that the design does not alias with another main or pair term and that adds rank]; a pair that the
omitted interactions partially alias on the design's cells (`partial_aliases`: cells a constraint excludes,
or a design that lacks some) is estimated but not tested, as in the analysis. A plan runs every
cell with every seed, so the seed block is orthogonal to the effect columns and costs only degrees of freedom.

Contrasts (the analysis's units, see effects.py): main effect ME_i = 2 b_i, synergy S_ij = 4 b_ij (= 2 INT_ij,
oriented by the metric's direction). For a contrast c' b the standard error is

    SE = sigma * sqrt(c' (X'X)^-1 c)        (X: one row per run; unbalanced and fractional designs included)

and the analysis tests it with t = estimate / SE_hat, SE_hat from the pure error with
``df = N - cells - (seeds - 1)`` (seed block; ``N - cells`` without it). The test levels are the analysis's:

- main effects: two-sided at alpha (the analysis gives individual t intervals and p-values for main effects);
- pair synergies: two-sided at alpha / m, m = the pairs the design estimates cleanly (the analysis marks a pair
  significant when its Bonferroni simultaneous interval excludes 0; its Holm p_adj is never larger than the
  Bonferroni p, so this is also a lower bound on the power of p_adj < alpha).

Power at a true contrast delta (exact, the non-central t; scipy.stats.nct):

    power(delta) = P(T > t_{1-a/2, df}) + P(T < -t_{1-a/2, df}),   T ~ nct(df, delta / SE)

and the minimal detectable effect MDE is the delta with power(delta) = 1 - beta (root of the above), close to
(t_{1-a/2, df} + t_{1-beta, df}) SE (Montgomery, *Design and Analysis of Experiments*, ch. 6; NIST/SEMATECH
e-Handbook 7.2.2.2). Unreplicated designs (df = 0) have no pure error: the analysis then falls back to Lenth's
pseudo standard error, for which no power is computed here. Effects are on the analysis scale of the metric (log
for throughput-like metrics: an MDE d there is a ratio exp(d)).

This module imports numpy, pandas and scipy only (never torch, ray or mlflow).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize, stats

__all__ = [
    "ALPHA",
    "POWER",
    "Detectable",
    "DesignPower",
    "PowerError",
    "design_power",
    "partial_aliases",
    "power_at",
    "mde",
    "pooled_sd",
    "sd_upper",
]

ALPHA = 0.05
"Significance level of the study report (the default of effects.analyze_study and effects.Options; a test checks)."
POWER = 0.8
"Target power of the minimal detectable effects (1 - beta)."


class PowerError(ValueError):
    """Bad input for a power computation; the message is one line meant for the user."""


def power_at(delta: float, se: float, df: float, level: float) -> float:
    """Power of the two-sided t test at `level` (df error degrees of freedom) when the contrast's true value is
    `delta` and its standard error `se` (same units): P(|T| > t_{1-level/2, df}), T ~ nct(df, delta / se)."""
    if not (se > 0 and df >= 1 and 0 < level < 1):
        raise PowerError(f"power needs se > 0, df >= 1 and 0 < level < 1 (got se={se}, df={df}, level={level})")
    tc = stats.t.ppf(1 - level / 2, df)
    ncp = abs(delta) / se
    # The lower tail P(T < -tc) as the upper tail of -T ~ nct(df, -ncp): scipy's nct.cdf returns NaN where this
    # tail underflows (df = 1, ncp = 8), its sf returns the tiny value.
    return float(stats.nct.sf(tc, df, ncp) + stats.nct.sf(tc, df, -ncp))


def mde(se: float, df: float, level: float, power: float = POWER) -> float:
    """Minimal detectable effect: the |delta| at which `power_at` equals `power` (same units as `se`)."""
    if not 0 < power < 1:
        raise PowerError(f"power must be in (0, 1), got {power}")
    if power <= level:
        return 0.0
    f = lambda lam: power_at(lam, 1.0, df, level) - power  # noqa: E731  (in units of se)
    hi = stats.t.ppf(1 - level / 2, df) + stats.t.ppf(power, df) + 1.0
    while not f(hi) >= 0:  # NaN keeps widening too, so brentq never starts from an undefined end
        hi *= 2
    return float(optimize.brentq(f, 0.0, hi, xtol=1e-10)) * se


@dataclass(frozen=True)
class Detectable:
    """One tested contrast: its SE per unit noise sd, test level, and minimal detectable effect."""

    effect: str
    kind: str
    "'main' (ME_i) or 'pair' (synergy S_ij)"
    se_per_sd: float
    "SE / sigma = sqrt(c' (X'X)^-1 c)"
    level: float
    "two-sided test level (alpha for mains, alpha / m for pairs)"
    mde_sd: float
    "the MDE in units of the noise sd"
    mde: float | None = None
    "the MDE in metric units (analysis scale), when a noise sd is given"

    def to_json(self) -> dict:
        return {
            "effect": self.effect,
            "kind": self.kind,
            "se_per_sd": self.se_per_sd,
            "level": self.level,
            "mde_sd": self.mde_sd,
            "mde": self.mde,
        }


@dataclass(frozen=True)
class DesignPower:
    """What a design detects: per contrast and the worst (largest) MDE of each kind."""

    factors: list[str]
    n_cells: int
    n_seeds: int
    n_runs: int
    df: int
    "pure-error degrees of freedom of the analysis"
    seed_block: bool
    alpha: float
    power: float
    m_pairs: int
    "pairs tested (estimated free of aliasing): the Bonferroni family"
    mains: list[Detectable]
    pairs: list[Detectable]
    untested: dict[str, str]
    "effect -> why the analysis does not test it (aliased, inestimable, constant factor)"
    notes: list[str] = field(default_factory=list)
    sigma: float | None = None
    "the noise sd the absolute MDEs use (analysis scale)"

    @property
    def mde_main(self) -> float | None:
        """Largest main-effect MDE (metric units; None without sigma or without a tested main effect)."""
        vals = [d.mde for d in self.mains if d.mde is not None]
        return max(vals) if vals else None

    @property
    def mde_pair(self) -> float | None:
        vals = [d.mde for d in self.pairs if d.mde is not None]
        return max(vals) if vals else None

    @property
    def mde_main_sd(self) -> float | None:
        return max((d.mde_sd for d in self.mains), default=None)

    @property
    def mde_pair_sd(self) -> float | None:
        return max((d.mde_sd for d in self.pairs), default=None)

    def worst_sd(self) -> float | None:
        """The largest MDE over every tested contrast, in noise sds (what a target has to meet)."""
        vals = [d.mde_sd for d in (*self.mains, *self.pairs)]
        return max(vals) if vals else None

    def to_json(self) -> dict:
        return {
            "factors": list(self.factors),
            "n_cells": self.n_cells,
            "n_seeds": self.n_seeds,
            "n_runs": self.n_runs,
            "df": self.df,
            "seed_block": self.seed_block,
            "alpha": self.alpha,
            "power": self.power,
            "m_pairs": self.m_pairs,
            "pair_level": self.alpha / self.m_pairs if self.m_pairs else None,
            "sigma": self.sigma,
            "mde_main": self.mde_main,
            "mde_pair": self.mde_pair,
            "mde_main_sd": self.mde_main_sd,
            "mde_pair_sd": self.mde_pair_sd,
            "mains": [d.to_json() for d in self.mains],
            "pairs": [d.to_json() for d in self.pairs],
            "untested": dict(self.untested),
            "notes": list(self.notes),
        }


def _pm(cells: np.ndarray, cols: Sequence[tuple[int, ...]]) -> np.ndarray:
    pm = 2.0 * cells - 1.0
    return np.column_stack([np.prod(pm[:, list(c)], axis=1) for c in cols]) if cols else np.zeros((len(cells), 0))


MAX_FULL_ORDER = 10
"Up to this many factors every interaction order is checked; above it, interactions of order 2 and 3 only."


def _pm_named(levels: pd.DataFrame, terms: Sequence[tuple[str, ...]]) -> np.ndarray:
    return _pm(levels.to_numpy(dtype=float), [tuple(levels.columns.get_loc(f) for f in t) for t in terms])


def partial_aliases(
    levels: pd.DataFrame,
    fitted: Sequence[tuple[str, ...]],
    chained: Collection[str] = (),
    extra: Sequence[np.ndarray] = (),
) -> dict[str, dict[str, float]]:
    """The partial aliases of each fitted term: the alias matrix A = (X1'X1)^-1 X1'X2 (Montgomery, *Design and
    Analysis of Experiments*, fractional factorials) of the fitted model X1 against the interactions X2 it omits,
    on the cells present: when the true model has the omitted terms too, the fitted coefficients estimate
    b1 + A b2. A table says nothing about the cells it lacks, so whatever made a cell missing (its runs failed, it
    is absent from a CSV, a constraint excludes it) it is simply not a row. An omitted column equal to +-1 times a
    fitted column is completely aliased with it (the alias structure of a regular fraction, its resolution), not
    partially; every other non-zero entry marks the fitted term as partially aliased: the analysis
    (`srdit.analysis.effects`, on the finished cells) reports it and never tests it, and `design_power` (on a
    plan's cells) does not count it among the tested pairs.

    levels: (rows, factors) 0/1 levels, one row per cell present (unequal replication is not aliasing), or per
    (cell, block) when `extra` holds the block dummies. fitted: the fitted terms (factor-name tuples, mains and
    pairs), besides the intercept. chained: names ("A:B") of terms in an alias chain of a fitted term (estimated
    with it, so not omitted). extra: (rows,) columns fitted too but not reported (block dummies: a block confounded
    with an interaction absorbs it, so that interaction biases no effect).

    Omitted: every interaction of order >= 2 of the factors (up to order 3 above MAX_FULL_ORDER factors) that is
    neither fitted nor chained, except those containing a pair that no row has both on: such a pair never ran
    together (a constraint `excludes` it, or it always fails), so no interaction containing it is defined.

    Returns {"A:B": {"A:B:C": coefficient, ...}} for the fitted terms with a partial alias, coefficients rounded
    to 6 decimals (entries below 1e-6 are zero)."""
    factors = list(levels.columns)
    max_order = len(factors) if len(factors) <= MAX_FULL_ORDER else 3
    names = {t: ":".join(t) for t in fitted}
    chained = set(chained) | set(names.values())
    lv = levels.to_numpy()
    together = {
        (a, b)
        for (i, a), (j, b) in itertools.combinations(enumerate(factors), 2)
        if ((lv[:, i] == 1) & (lv[:, j] == 1)).any()
    }
    omitted = [
        t
        for r in range(2, max_order + 1)
        for t in itertools.combinations(factors, r)
        if ":".join(t) not in chained and all(p in together for p in itertools.combinations(t, 2))
    ]
    if not omitted or not fitted:
        return {}
    X1 = np.column_stack([np.ones(len(levels)), _pm_named(levels, list(fitted)), *extra])
    X2 = _pm_named(levels, omitted)
    A = np.linalg.lstsq(X1, X2, rcond=None)[0]
    n_fit = 1 + len(fitted)
    complete = np.array(
        [
            any(np.array_equal(X2[:, q], s * X1[:, j]) for j in range(n_fit) for s in (1.0, -1.0))
            for q in range(len(omitted))
        ]
    )
    out: dict[str, dict[str, float]] = {}
    for j, t in enumerate(fitted, start=1):
        hit = {":".join(omitted[q]): round(float(A[j, q]), 6) for q in np.nonzero((np.abs(A[j]) > 1e-6) & ~complete)[0]}
        if hit:
            out[names[t]] = hit
    return out


def design_power(
    cells: np.ndarray | Sequence[Sequence[int]],
    factors: Sequence[str],
    n_seeds: int,
    *,
    alpha: float = ALPHA,
    power: float = POWER,
    sigma: float | None = None,
    seed_block: bool = True,
) -> DesignPower:
    """What a design of `cells` (n_cells x k, 0/1 levels; each distinct cell once), each run with the same
    `n_seeds` seeds, detects under the analysis's model and tests (module docstring). `sigma` (noise sd, analysis
    scale) turns the MDEs into metric units. Raises PowerError on bad input."""
    C = np.asarray(cells, dtype=float)
    factors = [str(f) for f in factors]
    if C.ndim != 2 or C.shape[1] != len(factors) or len(C) == 0:
        raise PowerError(f"cells must be a non-empty (cells x {len(factors)}) 0/1 matrix")
    if not np.all((C == 0) | (C == 1)):
        raise PowerError("cells must be coded 0/1")
    C = np.unique(C, axis=0)
    if int(n_seeds) < 1:
        raise PowerError(f"n_seeds must be >= 1, got {n_seeds}")
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise PowerError(f"alpha and power must be in (0, 1), got {alpha}, {power}")
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise PowerError(f"the noise sd must be a positive number, got {sigma}")
    s, n_cells = int(n_seeds), len(C)
    notes: list[str] = []
    untested: dict[str, str] = {}
    # 1. a factor constant among the cells leaves the model (with its pairs)
    var = [j for j in range(len(factors)) if len(np.unique(C[:, j])) == 2]
    for j in range(len(factors)):
        if j not in var:
            untested[factors[j]] = "constant in the design (every cell has it at one level)"
    name = lambda t: ":".join(factors[i] for i in t)  # noqa: E731
    terms = [(j,) for j in var] + list(itertools.combinations(var, 2))
    X = _pm(C, terms)
    # 2. alias groups: identical or opposite +-1 columns; the first term of a group represents it
    rep: dict[tuple, tuple] = {}
    aliased: set[tuple] = set()
    for a, ta in enumerate(terms):
        if ta in rep:
            continue
        rep[ta] = ta
        for b in range(a + 1, len(terms)):
            tb = terms[b]
            if tb not in rep and (np.array_equal(X[:, a], X[:, b]) or np.array_equal(X[:, a], -X[:, b])):
                rep[tb] = ta
                aliased |= {ta, tb}
    reps = [t for t in terms if rep[t] == t]
    # holes: a representative is estimable iff its unit vector lies in the row space of [1 | representatives]
    Xr = np.column_stack([np.ones(n_cells), X[:, [terms.index(t) for t in reps]]])
    est = np.all(np.abs(np.linalg.pinv(Xr) @ Xr - np.eye(Xr.shape[1])) < 1e-7, axis=0)[1:]
    # 3. the largest model the cells support: each representative in order, kept when it adds rank
    cols = [np.ones(n_cells)]
    kept: list[tuple] = []
    for t, ok in zip(reps, est):
        if not ok:
            untested[name(t)] = f"inestimable: the design has holes ({n_cells} of {2 ** len(var)} cells)"
            continue
        trial = np.column_stack([*cols, X[:, terms.index(t)]])
        if np.linalg.matrix_rank(trial) > len(cols):
            cols.append(trial[:, -1])
            kept.append(t)
        else:
            untested[name(t)] = "inestimable from the design's cells"
    for t in terms:
        if rep[t] != t:
            untested[name(t)] = f"aliased with {name(rep[t])}"
        elif len(t) == 2 and t in aliased and t in kept:
            partners = [name(u) for u in terms if u != t and rep[u] == t]
            untested[name(t)] = f"aliased with {', '.join(partners)}"
    # 7. partial aliasing on the design's cells (cells a constraint excludes are missing): such pairs are not tested
    levels = pd.DataFrame(C[:, var].astype(int), columns=[factors[j] for j in var])
    as_names = lambda t: tuple(factors[i] for i in t)  # noqa: E731
    chained = {name(t) for t in terms if rep[t] in kept}
    partial = partial_aliases(levels, [as_names(t) for t in kept], chained)
    for t in kept:
        if len(t) == 2 and name(t) in partial and t not in aliased:
            untested[name(t)] = "partially aliased with " + ", ".join(partial[name(t)]) + " (cells missing)"
    # 5-6. seed block and pure-error df (every cell runs every seed: the block is orthogonal to the effects)
    n_runs = n_cells * s
    block = seed_block and s > 1 and n_runs - (n_cells + s - 1) >= 1
    df = n_runs - n_cells - (s - 1 if block else 0)
    if df < 1:
        notes.append(
            "unreplicated: no pure error, so the analysis has no t test (it falls back to Lenth's pseudo "
            "standard error, for which no power is computed); run 2 or more seeds"
        )
    X1 = np.column_stack(cols)
    inv = np.linalg.inv(s * X1.T @ X1)  # (X'X)^-1 of the run-level matrix: each cell s times
    mains_t = [t for t in kept if len(t) == 1]
    pairs_t = [t for t in kept if len(t) == 2 and t not in aliased and name(t) not in partial]
    m = len(pairs_t)
    mains: list[Detectable] = []
    pairs: list[Detectable] = []
    if df >= 1:
        for t in mains_t + pairs_t:
            j = 1 + kept.index(t)
            c = 2.0 if len(t) == 1 else 4.0  # ME = 2 b, S = 4 b
            se = c * math.sqrt(inv[j, j])
            level = alpha if len(t) == 1 else alpha / m
            d_sd = mde(se, df, level, power)
            d = Detectable(
                name(t), "main" if len(t) == 1 else "pair", se, level, d_sd, d_sd * sigma if sigma is not None else None
            )
            (mains if len(t) == 1 else pairs).append(d)
    if len(var) >= 2 and not m:
        why = (
            "the cells it lacks (e.g. excluded by a constraint) leave every estimated pair partially aliased with "
            "the interactions the model omits"
            if any(len(t) == 2 and name(t) in partial for t in kept)
            else "a fractional design needs resolution >= 5 to keep pairs clear of each other and of the mains"
        )
        notes.append(f"no pair synergy is estimable free of aliasing in this design: the analysis tests none ({why})")
    return DesignPower(
        factors=factors,
        n_cells=n_cells,
        n_seeds=s,
        n_runs=n_runs,
        df=int(df),
        seed_block=block,
        alpha=alpha,
        power=power,
        m_pairs=m,
        mains=mains,
        pairs=pairs,
        untested=untested,
        notes=notes,
        sigma=sigma,
    )


def pooled_sd(
    table: pd.DataFrame, metric: str, *, cell_col: str = "cell", status_col: str | None = "status", log: bool = False
) -> tuple[float, int, int]:
    """Pooled within-cell sd of `metric` over the finished runs: sqrt(sum_c (n_c - 1) s_c^2 / sum_c (n_c - 1)),
    on the log scale when `log`. Returns (sd, df = sum_c (n_c - 1), cells with replicates). A seed effect common
    to every cell (which the analysis's seed block removes) is included, so the sd errs on the large side.
    Raises PowerError when no cell has two finished runs."""
    if metric not in table.columns:
        raise PowerError(f"no column '{metric}' in the runs; available: {sorted(map(str, table.columns))[:20]}")
    d = table
    if status_col and status_col in d.columns:
        d = d[d[status_col].astype(str).str.strip().str.lower() == "finished"]
    y = pd.to_numeric(d[metric], errors="coerce").astype(float)
    ok = np.isfinite(y)
    if log:
        ok &= y > 0
        y = np.log(y.where(ok))
    y, cells = y[ok], d.loc[ok, cell_col].astype(str)
    g = y.groupby(cells)
    n = g.count()
    ss = g.var(ddof=1).fillna(0.0) * (n - 1)
    df = int((n - 1).sum())
    if df < 1:
        raise PowerError(f"no replicates: no cell has two finished runs with a finite '{metric}'")
    return float(math.sqrt(ss.sum() / df)), df, int((n > 1).sum())


def sd_upper(sd: float, df: int, confidence: float = 0.9) -> float:
    """One-sided upper confidence bound of a noise sd estimated with `df` degrees of freedom (chi-square):
    sd * sqrt(df / chi2_{1-confidence}(df))."""
    return float(sd * math.sqrt(df / stats.chi2.ppf(1 - confidence, df)))
