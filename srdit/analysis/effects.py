"""Effects of two-level technique switches: main effects, interactions, synergy, dividends, Shapley, ladders,
and incompatibility, with uncertainty.

Input: a tidy table, one row per trial: one 0/1 column per technique (factor), optionally a seed column and a status
column, and metric columns. Rows whose status is not "finished" (diverged / oom / crashed ...) or whose metric is not
finite are *failures*: they are left out of the metric models and used as evidence of failure interactions.

Conventions (design doc, "Synergy and incompatibility"):
- effects in +-1 coding (Montgomery, *Design and Analysis of Experiments*, ch. 6):
  ME_i = mean(y|x_i=+1) - mean(y|x_i=-1), INT_ij = (ME_i|x_j=+1 - ME_i|x_j=-1) / 2;
  OLS on +-1 columns gives beta = effect / 2;
- gains g = direction * y (direction +1 for "max", -1 for "min"), optionally y = log(metric) (speed-ups multiply);
- synergy S_ij = ME_i|j on - ME_i|j off = 2 INT_ij on the gain scale (positive = the pair helps more together);
- dividend D_ij = g(ij) - g(i) - g(j) + g(none) with other factors off (Moebius/Harsanyi dividend), and its
  conditional version against the full stack;
- Shapley phi_i = sum_{S subset N\\{i}} |S|!(k-|S|-1)!/k! [v(S+i) - v(S)] on cell means (sums to v(N) - v(empty));
- uncertainty: statsmodels OLS `y ~ main + 2FI + C(seed)` (t CIs), seed bootstrap within cells
  (scipy.stats.bootstrap), Holm/BH across pairs (statsmodels multipletests); failure interactions by Fisher's exact
  test (scipy.stats.fisher_exact).

The result is typed (`Analysis`, one frozen dataclass per phase: fit, pairs, failures, bootstrap, attribution);
`Analysis.to_json()` is the JSON of `srdit analyze --format json`.

This module must not import torch, ray or mlflow: it works on any CSV.
"""

from __future__ import annotations

import inspect
import itertools
import math
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats
from statsmodels.stats.multitest import multipletests

from srdit import metric_registry
from srdit.analysis.results import StudyResults

__all__ = [
    "AnalysisError",
    "OK_STATUSES",
    "Analysis",
    "AnalysisFailure",
    "Options",
    "analyze",
    "analyze_study",
    "pair_name",
    "shapley_values",
    "combo_label",
]

#: status values (case-insensitive) that count as a successful run
OK_STATUSES = frozenset({"finished", "ok", "success", "succeeded", "completed"})
BASELINE_LABEL = "baseline"
_TOL = 1e-9


class AnalysisError(ValueError):
    """Bad input for the analysis; the message is one line meant for the user."""


def pair_name(a: str, b: str) -> str:
    return f"{a}:{b}"


def combo_label(on: Iterable[str]) -> str:
    on = list(on)
    return "+".join(on) if on else BASELINE_LABEL


def _f(x: Any) -> float | None:
    """A JSON-safe float (None for NaN/inf/None)."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _ci(lo: Any, hi: Any) -> list[float] | None:
    lo, hi = _f(lo), _f(hi)
    if lo is None or hi is None:
        return None
    return [min(lo, hi), max(lo, hi)]


# --------------------------------------------------------------------------------------------------------------------
# input preparation
# --------------------------------------------------------------------------------------------------------------------
def _binary_column(s: pd.Series, name: str) -> pd.Series:
    """Map a two-level column to 0/1; accepts 0/1, -1/+1, booleans and their string spellings."""
    if s.isna().any():
        raise AnalysisError(f"factor '{name}' has missing values in {int(s.isna().sum())} row(s)")
    vals = s.unique().tolist()
    mapping = {}
    for v in vals:
        key = v
        if isinstance(v, str):
            key = v.strip().lower()
            key = {"true": 1, "false": 0, "on": 1, "off": 0, "yes": 1, "no": 0, "+1": 1, "+": 1, "-": -1}.get(key, key)
            try:
                key = float(key)
            except (TypeError, ValueError):
                pass
        elif isinstance(v, (bool, np.bool_)):
            key = int(v)
        try:
            fk = float(key)
        except (TypeError, ValueError):
            fk = None
        if fk == 1.0:
            mapping[v] = 1
        elif fk in (0.0, -1.0):
            mapping[v] = fk
        else:
            shown = sorted(map(str, vals))[:6]
            raise AnalysisError(
                f"factor '{name}' has non-binary levels {shown}; expected two levels coded 0/1 (or -1/+1, false/true)"
            )
    lows = {m for m in mapping.values() if m != 1}
    if len(lows) > 1:
        shown = sorted(map(str, vals))[:6]
        raise AnalysisError(f"factor '{name}' has non-binary levels {shown}; expected two levels coded 0/1 (or -1/+1)")
    out = s.map(lambda v: 1 if mapping[v] == 1 else 0).astype(int)
    if out.nunique() < 2:
        level = int(out.iloc[0]) if len(out) else 0
        raise AnalysisError(
            f"factor '{name}' takes only one level ({level}) in the data: its effect is inestimable"
        )
    return out


def _direction_sign(direction: str) -> int:
    d = str(direction).strip().lower()
    if d in ("max", "maximize", "higher"):
        return 1
    if d in ("min", "minimize", "lower"):
        return -1
    raise AnalysisError(f"direction must be 'max' or 'min', got {direction!r}")


@dataclass
class _Prepared:
    factors: list[str]
    metric: str
    sign: int
    log: bool
    data: pd.DataFrame  # columns: factors (0/1), _combo, _cell, _seed, _ok, _status, _reason, _raw, _y, _g
    has_seed: bool
    notes: list[str] = field(default_factory=list)


def prepare(
    table: pd.DataFrame,
    factors: Sequence[str],
    metric: str,
    direction: str,
    *,
    seed_col: str | None = "seed",
    status_col: str | None = "status",
    reason_col: str | None = "status_reason",
    log: bool = False,
) -> _Prepared:
    """Validate and normalise the table (see module docstring). Raises AnalysisError with a one-line message."""
    if not isinstance(table, pd.DataFrame):
        raise AnalysisError("the results table must be a pandas DataFrame")
    factors = [str(f) for f in factors]
    if not factors:
        raise AnalysisError("no factors given")
    if len(set(factors)) != len(factors):
        raise AnalysisError(f"duplicate factors in {factors}")
    if len(table) == 0:
        raise AnalysisError("the results table has no rows")
    missing = [c for c in [*factors, metric] if c not in table.columns]
    if missing:
        raise AnalysisError(
            f"missing column(s) {missing}; available: {sorted(map(str, table.columns))[:30]}"
        )
    sign = _direction_sign(direction)
    d = pd.DataFrame(index=table.index)
    for f in factors:
        d[f] = _binary_column(table[f], f)
    lv = d[factors].to_numpy()
    d["_combo"] = [combo_label(f for f, on in zip(factors, row) if on) for row in lv]
    d["_cell"] = table["cell"].astype(str) if "cell" in table.columns else d["_combo"]
    has_seed = bool(seed_col) and seed_col in table.columns
    d["_seed"] = table[seed_col].astype(str) if has_seed else "0"
    if status_col and status_col in table.columns:
        st = table[status_col].fillna("unknown").astype(str).str.strip().str.lower()
    else:
        st = pd.Series("finished", index=table.index)
    raw = pd.to_numeric(table[metric], errors="coerce")
    nonnum = table[metric].notna() & raw.isna()
    if nonnum.all():
        raise AnalysisError(f"metric column '{metric}' is not numeric")
    ok = st.isin(OK_STATUSES) & np.isfinite(raw.astype(float))
    # a run that says "finished" but has a non-finite metric counts as diverged (architecture: NaN = diverged)
    status = st.where(~(st.isin(OK_STATUSES) & ~ok), "diverged")
    d["_ok"] = ok
    d["_status"] = status
    if reason_col and reason_col in table.columns:
        d["_reason"] = table[reason_col].fillna("").astype(str)
    else:
        d["_reason"] = ""
    d["_raw"] = raw.astype(float)
    y = raw.astype(float).copy()
    if log:
        bad = ok & (raw <= 0)
        if bad.any():
            raise AnalysisError(f"metric '{metric}' has {int(bad.sum())} non-positive value(s): "
                                "cannot analyse it on the log scale")
        y = np.log(y.where(ok))
    d["_y"] = y.where(ok)
    d["_g"] = sign * d["_y"]
    if not ok.any():
        raise AnalysisError(f"no finished run with a finite '{metric}': nothing to analyse")
    return _Prepared(factors, metric, sign, log, d.reset_index(drop=True), has_seed)


# --------------------------------------------------------------------------------------------------------------------
# design matrix, aliasing, estimability
# --------------------------------------------------------------------------------------------------------------------
def _effect_terms(factors: Sequence[str], order: int = 2) -> list[tuple[str, ...]]:
    terms: list[tuple[str, ...]] = [(f,) for f in factors]
    if order >= 2:
        terms += list(itertools.combinations(factors, 2))
    return terms


def _term_name(t: tuple[str, ...]) -> str:
    return ":".join(t)


def _pm_matrix(levels01: pd.DataFrame, terms: Sequence[tuple[str, ...]]) -> np.ndarray:
    """+-1 coded effect columns (one per term) for rows of 0/1 levels."""
    pm = 2.0 * levels01.to_numpy(dtype=float) - 1.0
    idx = {f: i for i, f in enumerate(levels01.columns)}
    cols = [np.prod(pm[:, [idx[f] for f in t]], axis=1) for t in terms]
    return np.column_stack(cols) if cols else np.zeros((len(levels01), 0))


def _alias_groups(X: np.ndarray, names: Sequence[str]) -> list[list[tuple[str, int]]]:
    """Groups of effect columns that are identical (+1) or opposite (-1) in +-1 coding; the first is the
    representative. Also reports a column aliased with the intercept (constant) as alias of "Intercept"."""
    groups: list[list[tuple[str, int]]] = []
    assigned = [False] * len(names)
    for a in range(len(names)):
        if assigned[a]:
            continue
        grp = [(names[a], 1)]
        for b in range(a + 1, len(names)):
            if assigned[b]:
                continue
            if np.array_equal(X[:, a], X[:, b]):
                grp.append((names[b], 1))
                assigned[b] = True
            elif np.array_equal(X[:, a], -X[:, b]):
                grp.append((names[b], -1))
                assigned[b] = True
        groups.append(grp)
    return groups


def _estimable_mask(X: np.ndarray) -> np.ndarray:
    """Column j of X is estimable iff e_j lies in the row space of X, i.e. (pinv(X) X) e_j == e_j."""
    if X.size == 0:
        return np.zeros(X.shape[1], dtype=bool)
    P = np.linalg.pinv(X) @ X
    eye = np.eye(X.shape[1])
    return np.all(np.abs(P - eye) < 1e-7, axis=0)


def _alias_label(group: list[tuple[str, int]]) -> str:
    s = group[0][0]
    for name, sg in group[1:]:
        s += (" + " if sg > 0 else " - ") + name
    return s


def _adjust(pvals: Sequence[float], method: str, alpha: float) -> list[float]:
    """Multiplicity-adjusted p-values. Holm's step-down (Holm 1979) is computed here, identical to statsmodels'
    multipletests(method="holm") (checked in the tests), because that function runs gc.collect() on every call,
    which costs 0.1-1 s in a large process; other methods go through statsmodels.stats.multitest.multipletests."""
    p = np.asarray(pvals, dtype=float)
    if method == "none" or p.size == 0:
        return p.tolist()
    if method == "holm":
        order = np.argsort(p, kind="mergesort")
        adj = np.minimum(1.0, np.maximum.accumulate(p[order] * np.arange(p.size, 0, -1)))
        out = np.empty_like(p)
        out[order] = adj
        return out.tolist()
    return multipletests(p, alpha=alpha, method=method)[1].tolist()


# --------------------------------------------------------------------------------------------------------------------
# cell summaries, Shapley, dividends, ladders
# --------------------------------------------------------------------------------------------------------------------
def _cell_table(p: _Prepared) -> list[dict]:
    d = p.data
    rows = []
    for combo, grp in d.groupby("_combo", sort=False):
        okg = grp[grp["_ok"]]
        on = [f for f in p.factors if grp[f].iloc[0] == 1]
        statuses = grp.loc[~grp["_ok"], "_status"].value_counts().to_dict()
        reasons = sorted({r for r in grp.loc[~grp["_ok"], "_reason"] if r})
        n_ok = len(okg)
        rows.append(
            {
                "combo": combo,
                "cell": str(grp["_cell"].iloc[0]),
                "on": on,
                "key": frozenset(on),
                "n": len(grp),
                "n_finished": n_ok,
                "n_failed": len(grp) - n_ok,
                "failures": {str(k): int(v) for k, v in statuses.items()},
                "reasons": reasons,
                "mean": _f(okg["_raw"].mean()) if n_ok else None,
                "sd": _f(okg["_raw"].std(ddof=1)) if n_ok > 1 else None,
                "y_mean": _f(okg["_y"].mean()) if n_ok else None,
                "gain": _f(okg["_g"].mean()) if n_ok else None,
                "gain_sem": _f(okg["_g"].std(ddof=1) / math.sqrt(n_ok)) if n_ok > 1 else None,
            }
        )
    return rows


def shapley_values(v: dict[frozenset, float], players: Sequence[str]) -> dict[str, float]:
    """Exact Shapley values of the game v (subset -> value; every subset of players must be present).

    phi_i = sum_{S subset N\\{i}} |S|! (k-|S|-1)! / k! * (v(S u {i}) - v(S))   (Shapley 1953)."""
    k = len(players)
    fact = [math.factorial(n) for n in range(k + 1)]
    out = {}
    for i in players:
        others = [q for q in players if q != i]
        phi = 0.0
        for r in range(k):
            w = fact[r] * fact[k - r - 1] / fact[k]
            for S in itertools.combinations(others, r):
                s = frozenset(S)
                phi += w * (v[s | {i}] - v[s])
        out[i] = phi
    return out


def _chain_from_cells(keys: set[frozenset], factors: Sequence[str]) -> list[str] | None:
    """Detect a nested chain empty < S1 < ... < N among the cells (a ladder design); None if there is none unique."""
    k = len(factors)
    by_size: dict[int, list[frozenset]] = {}
    for s in keys:
        by_size.setdefault(len(s), []).append(s)
    if any(len(by_size.get(n, [])) != 1 for n in range(k + 1)):
        return None
    order: list[str] = []
    prev: frozenset = frozenset()
    for n in range(1, k + 1):
        cur = by_size[n][0]
        if not prev < cur:
            return None
        (added,) = tuple(cur - prev)
        order.append(added)
        prev = cur
    return order


def _ladder(cells: list[dict], factors: Sequence[str], order: Sequence[str] | None, log: bool):
    """Cumulative ladder rows (like the paper's chain): metric mean at each step and the step from the previous row."""
    if not cells:
        return None, None
    by_key = {r["key"]: r for r in cells}
    kind = "given"
    if order:
        unknown = [f for f in order if f not in factors]
        if unknown:
            raise AnalysisError(f"ladder order names unknown factor(s) {unknown}")
    else:
        order = _chain_from_cells(set(by_key), factors)
        kind = "chain"
        if order is None:
            # full factorial: the greedy forward path (each step adds the technique with the largest gain)
            ok = {k: r["gain"] for k, r in by_key.items() if r["gain"] is not None}
            if len(ok) < 2 ** len(factors) or len(factors) > 12:
                return None, None
            order, cur, left = [], frozenset(), list(factors)
            while left:
                best = max(left, key=lambda f: ok[cur | {f}])
                order.append(best)
                left.remove(best)
                cur = cur | {best}
            kind = "greedy"
    rows = []
    cur: frozenset = frozenset()
    prev = None
    for step, f in enumerate([None, *order]):
        if f is not None:
            cur = cur | {f}
        r = by_key.get(cur)
        row = {
            "step": step,
            "added": f,
            "cell": r["cell"] if r is not None else combo_label(x for x in factors if x in cur),
            "on": [x for x in factors if x in cur],
            "n": int(r["n"]) if r is not None else 0,
            "n_finished": int(r["n_finished"]) if r is not None else 0,
            "mean": r["mean"] if r is not None else None,
            "sd": r["sd"] if r is not None else None,
            "gain": r["gain"] if r is not None else None,
            "delta": None,
            "gain_step": None,
            "ratio": None,
        }
        if prev is not None and row["mean"] is not None and prev["mean"] is not None:
            row["delta"] = _f(row["mean"] - prev["mean"])
            if row["gain"] is not None and prev["gain"] is not None:
                row["gain_step"] = _f(row["gain"] - prev["gain"])
            if log and prev["mean"]:
                row["ratio"] = _f(row["mean"] / prev["mean"])
        rows.append(row)
        prev = row
    return rows, kind


# --------------------------------------------------------------------------------------------------------------------
# failure interactions
# --------------------------------------------------------------------------------------------------------------------
def _failure_tests(p: _Prepared, alpha: float) -> tuple[list[dict], list[dict]]:
    """Pairs whose joint runs fail where each technique alone succeeds.

    For a pair (i, j), both-on runs are compared with i-alone (i on, j off) and with j-alone runs by one-sided Fisher
    exact tests (scipy.stats.fisher_exact, alternative="greater"); the pair's p is the larger of the two
    (intersection-union test: it must fail more than *each* alone). Step-down over pairs in the spirit of Holm
    (Holm 1979): the most significant pair is tested at alpha/m, alpha/(m-1), ...; once a pair is flagged, its both-on
    runs are set aside before re-testing the rest, so that a failing pair is not re-attributed to its supersets."""
    d = p.data
    fails = ~d["_ok"].to_numpy()
    pairs = list(itertools.combinations(p.factors, 2))
    m = len(pairs)
    if m == 0 or not fails.any():
        return [], [
            {"pair": pair_name(a, b), "p": None, "p_adj": None, "counts": None} for a, b in pairs
        ]
    keep = np.ones(len(d), dtype=bool)
    remaining = list(pairs)
    flags: list[dict] = []
    tests: dict[str, dict] = {}
    prev_adj = 0.0

    def test(a: str, b: str) -> dict:
        xa = d[a].to_numpy() == 1
        xb = d[b].to_numpy() == 1
        both, a_only, b_only = keep & xa & xb, keep & xa & ~xb, keep & ~xa & xb

        def cnt(mask):
            return [int((fails & mask).sum()), int(mask.sum())]

        c_both, c_a, c_b = cnt(both), cnt(a_only), cnt(b_only)
        pv = 1.0
        if c_both[0] > 0 and c_a[1] > 0 and c_b[1] > 0:
            ps = []
            for c in (c_a, c_b):
                tab = [[c_both[0], c_both[1] - c_both[0]], [c[0], c[1] - c[0]]]
                ps.append(stats.fisher_exact(tab, alternative="greater").pvalue)
            pv = float(max(ps))
        rate = lambda c: c[0] / c[1] if c[1] else None  # noqa: E731
        est = None
        if c_both[1] and c_a[1] and c_b[1]:
            est = rate(c_both) - max(rate(c_a), rate(c_b))
        reasons = d.loc[both & fails, "_status"].value_counts().to_dict()
        return {
            "pair": pair_name(a, b),
            "factors": [a, b],
            "p": pv,
            "estimate": _f(est),
            "counts": {
                "both": {"failed": c_both[0], "n": c_both[1]},
                f"{a}_alone": {"failed": c_a[0], "n": c_a[1]},
                f"{b}_alone": {"failed": c_b[0], "n": c_b[1]},
            },
            "statuses": {str(k): int(v) for k, v in reasons.items()},
        }

    while remaining:
        results = [test(a, b) for a, b in remaining]
        best_i = int(np.argmin([r["p"] for r in results]))
        best = results[best_i]
        step = m - len(remaining)
        p_adj = min(1.0, max(prev_adj, best["p"] * (m - step)))
        if p_adj < alpha:
            prev_adj = p_adj
            best["p_adj"] = p_adj
            tests[best["pair"]] = best
            a, b = remaining.pop(best_i)
            flags.append(best)
            keep &= ~((d[a].to_numpy() == 1) & (d[b].to_numpy() == 1))
            continue
        # stop: report the rest with Holm-style adjusted p on the remaining runs
        order = np.argsort([r["p"] for r in results], kind="stable")
        run = prev_adj
        for rank, idx in enumerate(order):
            r = results[idx]
            run = min(1.0, max(run, r["p"] * (m - step - rank)))
            r["p_adj"] = run
            tests[r["pair"]] = r
        break
    out_tests = [tests[pair_name(a, b)] for a, b in pairs]
    return flags, out_tests


# --------------------------------------------------------------------------------------------------------------------
# bootstrap over seeds within cells
# --------------------------------------------------------------------------------------------------------------------
def _bootstrap(p: _Prepared, terms, est_mask, confidence: float, n_resamples: int, method: str, random_state: int):
    d = p.data[p.data["_ok"]]
    groups = [g for _, g in d.groupby("_combo", sort=True)]
    if any(len(g) < 2 for g in groups):
        return None, "bootstrap skipped: some cells have fewer than 2 finished runs"
    levels = pd.DataFrame([g[p.factors].iloc[0] for g in groups]).reset_index(drop=True)
    Xc = np.column_stack([np.ones(len(levels)), _pm_matrix(levels, terms)])
    ok_cols = _estimable_mask(Xc)[1:] & est_mask
    if not ok_cols.any():
        return None, "bootstrap skipped: no effect is estimable from the cell means"
    pinv = np.linalg.pinv(Xc)
    samples = tuple(g["_y"].to_numpy(dtype=float) for g in groups)

    def statistic(*xs, axis=-1):
        means = np.stack([x.mean(axis=axis) for x in xs], axis=-1)  # (..., n_cells)
        beta = means @ pinv.T  # (..., 1 + n_terms)
        eff = 2.0 * beta[..., 1:][..., ok_cols]
        return np.moveaxis(eff, -1, 0)

    # scipy >= 1.15 names the seed `rng`; older releases `random_state`
    kw = ({"rng": random_state} if "rng" in inspect.signature(stats.bootstrap).parameters
          else {"random_state": random_state})
    note = None
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate BCa (too few distinct resamples) falls back below
        try:
            res = stats.bootstrap(samples, statistic, vectorized=True, n_resamples=n_resamples,
                                  confidence_level=confidence, method=method, **kw)
            lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
            if method.lower() == "bca" and not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
                raise ValueError("degenerate BCa interval")
        except Exception:  # BCa can be degenerate with very few seeds; percentile is always defined
            res = stats.bootstrap(samples, statistic, vectorized=True, n_resamples=n_resamples,
                                  confidence_level=confidence, method="percentile", **kw)
            lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
            note = "bootstrap: BCa was degenerate, used percentile intervals"
    names = [_term_name(t) for t, ok in zip(terms, ok_cols) if ok]
    return {n: _ci(a, b) for n, a, b in zip(names, lo, hi)}, note




# --------------------------------------------------------------------------------------------------------------------
# the typed result: one frozen dataclass per phase, assembled into `Analysis`
# --------------------------------------------------------------------------------------------------------------------
def _record(obj: Any) -> dict:
    """Shallow field -> value dict of a record dataclass, in field order (its JSON form)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


@dataclass(frozen=True)
class Options:
    """How `analyze` treats the table and what it computes (the keyword arguments of `analyze`)."""

    seed_col: str | None = "seed"
    status_col: str | None = "status"
    reason_col: str | None = "status_reason"
    log: bool = False
    "analyse log(metric) (throughput-like metrics: speed-ups multiply)"
    alpha: float = 0.05
    threshold: float = 0.0
    "practical antagonism threshold delta, gain units"
    correction: str = "holm"
    seed_block: bool = True
    cov_type: str = "nonrobust"
    bootstrap: bool = True
    n_resamples: int = 2000
    bootstrap_method: str = "BCa"
    ladder_order: Sequence[str] | None = None
    strict: bool = False
    "a design whose cells leave an effect inestimable (not merely aliased) raises AnalysisError"
    random_state: int = 0

    def validate(self) -> None:
        if not 0 < self.alpha < 1:
            raise AnalysisError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.correction not in ("holm", "fdr_bh", "bonferroni", "none"):
            raise AnalysisError(f"correction must be holm, fdr_bh, bonferroni or none, got {self.correction!r}")


@dataclass(frozen=True)
class AliasChain:
    """Effects the design cannot separate (identical or opposite +-1 columns); the first is the representative."""

    effects: list[str]
    signs: list[int]
    label: str
    estimate: float | None = None
    ci: list[float] | None = None

    def to_json(self) -> dict:
        return _record(self)


@dataclass(frozen=True)
class Inestimable:
    effect: str
    reason: str

    def to_json(self) -> dict:
        return _record(self)


@dataclass(frozen=True)
class Fit:
    """Phase 1: OLS `y ~ mains + 2FI (representatives) + C(seed)` on the finished runs, with the design's aliasing
    and holes. Effects on the metric scale (log if `log`), before orientation."""

    n_cells: int
    replicated: bool
    error_df: float | None
    "residual df when there is an error estimate (replicated runs), else None"
    main_effects: dict[str, float | None]
    interactions: dict[str, float | None]
    ci: dict[str, list[float]]
    p: dict[str, float]
    aliased: list[AliasChain]
    inestimable: list[Inestimable]
    notes: list[str]
    # for the later phases (not part of the JSON)
    sign: int = field(repr=False, default=1)
    df_resid: float = field(repr=False, default=0.0)
    se: dict[str, float | None] = field(repr=False, default_factory=dict)
    "standard error of each estimated representative term (effect scale)"
    clean_pairs: frozenset[str] = field(repr=False, default=frozenset())
    "pairs estimated free of aliasing"
    estimated: frozenset[str] = field(repr=False, default=frozenset())
    "terms estimated as their own representative (what the bootstrap may estimate)"

    @property
    def has_error(self) -> bool:
        return self.error_df is not None


@dataclass(frozen=True)
class Flag:
    """An incompatible pair with its evidence: `antagonism` (synergy significantly below -threshold) or `failure`
    (runs with both techniques fail more often than with each alone)."""

    pair: str
    factors: list[str]
    kind: str
    estimate: float | None
    ci: list[float] | None
    p: float | None
    p_adj: float | None
    threshold: float | None = None
    df: float | None = None
    counts: dict | None = None
    statuses: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        if self.kind == "antagonism":
            return {"pair": self.pair, "factors": self.factors, "kind": self.kind, "estimate": self.estimate,
                    "ci": self.ci, "p": self.p, "p_adj": self.p_adj, "threshold": self.threshold, "df": self.df,
                    "counts": self.counts}
        return {"pair": self.pair, "factors": self.factors, "p": self.p, "estimate": self.estimate,
                "counts": self.counts, "statuses": self.statuses, "p_adj": self.p_adj, "kind": self.kind,
                "ci": self.ci}


@dataclass(frozen=True)
class StrongestSynergy:
    pair: str
    estimate: float | None
    ci: list[float] | None
    p_adj: float | None

    def to_json(self) -> dict:
        return _record(self)


@dataclass(frozen=True)
class Pairs:
    """Phase 2: pair synergies S_ij (oriented gain), their CIs and corrected p-values, antagonism flags."""

    synergy: dict[str, float | None]
    synergy_ci: dict[str, list[float]]
    p_adj: dict[str, float | None]
    antagonism: list[Flag]
    strongest: StrongestSynergy | None
    notes: list[str]


@dataclass(frozen=True)
class FailureTest:
    """Fisher test of one pair's joint failures; `factors` is None when no run failed (nothing was tested)."""

    pair: str
    p: float | None
    p_adj: float | None
    counts: dict | None
    factors: list[str] | None = None
    estimate: float | None = None
    statuses: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        if self.factors is None:
            return {"pair": self.pair, "p": self.p, "p_adj": self.p_adj, "counts": self.counts}
        return {"pair": self.pair, "factors": self.factors, "p": self.p, "estimate": self.estimate,
                "counts": self.counts, "statuses": self.statuses, "p_adj": self.p_adj}

    def flag(self) -> Flag:
        return Flag(pair=self.pair, factors=list(self.factors or []), kind="failure", estimate=self.estimate,
                    ci=None, p=self.p, p_adj=self.p_adj, counts=self.counts, statuses=self.statuses)


@dataclass(frozen=True)
class Failures:
    """Phase 3: failure interactions (one test per pair; the flagged ones)."""

    tests: list[FailureTest]
    flagged: list[FailureTest]


@dataclass(frozen=True)
class Bootstrap:
    """Seed bootstrap within cells: effect name -> CI (metric scale), for the estimable clean effects."""

    ci: dict[str, list[float] | None]
    notes: list[str]


@dataclass(frozen=True)
class Cell:
    """One combination of techniques: runs, failures, metric mean / sd, oriented gain."""

    combo: str
    cell: str
    on: list[str]
    n: int
    n_finished: int
    n_failed: int
    failures: dict[str, int]
    reasons: list[str]
    mean: float | None
    sd: float | None
    y_mean: float | None
    gain: float | None
    gain_sem: float | None

    def to_json(self) -> dict:
        return _record(self)


@dataclass(frozen=True)
class Best:
    cell: str
    combo: str
    on: list[str]
    mean: float | None
    sd: float | None
    gain: float | None
    n_finished: int
    n: int

    def to_json(self) -> dict:
        return _record(self)


@dataclass(frozen=True)
class LadderRow:
    step: int
    added: str | None
    cell: str
    on: list[str]
    n: int
    n_finished: int
    mean: float | None
    sd: float | None
    gain: float | None
    delta: float | None
    gain_step: float | None
    ratio: float | None

    def to_json(self) -> dict:
        return _record(self)


@dataclass(frozen=True)
class Attribution:
    """Phase 4: cell-based quantities on oriented gains: cells, best cell, dividends, leave-one-out, Shapley, ladder."""

    cells: list[Cell]
    best: Best | None
    dividends: dict[str, float | None]
    dividends_full: dict[str, float | None]
    loo: dict[str, float | None]
    shapley: dict[str, float | None] | None
    ladder: list[LadderRow] | None
    ladder_kind: str | None
    notes: list[str]


@dataclass(frozen=True)
class Analysis:
    """The analysis of one metric: the phases' results and the run counts. `to_json()` is the JSON of
    `srdit analyze --format json` and of the report's effects.json."""

    metric: str
    direction: str
    "'max' or 'min'"
    scale: str
    "'log' or 'linear'"
    factors: list[str]
    n_runs: int
    n_finished: int
    n_failed: int
    alpha: float
    correction: str
    threshold: float
    fit: Fit
    pairs: Pairs
    failures: Failures
    bootstrap: Bootstrap
    attribution: Attribution
    notes: list[str]
    "every phase's notes, in phase order"

    @property
    def incompatible(self) -> list[Flag]:
        """Antagonism flags, then failure flags."""
        return [*self.pairs.antagonism, *(t.flag() for t in self.failures.flagged)]

    def to_json(self) -> dict:
        fit, pairs, att = self.fit, self.pairs, self.attribution
        return {
            "metric": self.metric,
            "direction": self.direction,
            "scale": self.scale,
            "factors": list(self.factors),
            "n_runs": self.n_runs,
            "n_finished": self.n_finished,
            "n_failed": self.n_failed,
            "n_cells": fit.n_cells,
            "replicated": fit.replicated,
            "error_df": fit.error_df,
            "alpha": self.alpha,
            "correction": self.correction,
            "threshold": self.threshold,
            "main_effects": fit.main_effects,
            "interactions": fit.interactions,
            "synergy": pairs.synergy,
            "ci": fit.ci,
            "synergy_ci": pairs.synergy_ci,
            "p": fit.p,
            "p_adj": pairs.p_adj,
            "ci_boot": self.bootstrap.ci,
            "dividends": att.dividends,
            "dividends_full": att.dividends_full,
            "loo": att.loo,
            "shapley": att.shapley,
            "ladder": [r.to_json() for r in att.ladder] if att.ladder is not None else None,
            "ladder_kind": att.ladder_kind,
            "cells": [c.to_json() for c in att.cells],
            "best": att.best.to_json() if att.best else None,
            "strongest_synergy": pairs.strongest.to_json() if pairs.strongest else None,
            "incompatible": [f.to_json() for f in self.incompatible],
            "failure_tests": [t.to_json() for t in self.failures.tests],
            "aliased": [a.to_json() for a in fit.aliased],
            "inestimable": [i.to_json() for i in fit.inestimable],
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class AnalysisFailure:
    """A metric that could not be analysed (bad input for `analyze`), with the one-line reason."""

    metric: str
    direction: str
    error: str

    def to_json(self) -> dict:
        return {"error": self.error, "metric": self.metric, "direction": self.direction}


# --------------------------------------------------------------------------------------------------------------------
# the phases
# --------------------------------------------------------------------------------------------------------------------
def fit_effects(p: _Prepared, o: Options) -> Fit:
    """Phase 1: aliasing and holes from the design (all rows), then OLS on the finished runs with a seed block."""
    factors = p.factors
    d = p.data
    notes: list[str] = []
    k = len(factors)
    terms = _effect_terms(factors, 2)
    names = [_term_name(t) for t in terms]

    # ---- aliasing and holes, from the design itself (all rows, failed ones included) ----
    design_cells = d.drop_duplicates("_combo")[factors].reset_index(drop=True)
    Xd = _pm_matrix(design_cells, terms)
    inter = np.ones((len(design_cells), 1))
    groups = _alias_groups(Xd, names)
    rep_of = {}
    alias_groups = []
    for g in groups:
        for n, sg in g:
            rep_of[n] = (g[0][0], sg)
        if len(g) > 1:
            alias_groups.append(g)
    aliased_names = {n for g in alias_groups for n, _ in g}
    reps = [g[0][0] for g in groups]
    rep_terms = [terms[names.index(r)] for r in reps]
    Xrep = np.column_stack([inter, _pm_matrix(design_cells, rep_terms)])
    design_est = dict(zip(reps, _estimable_mask(Xrep)[1:]))
    holes = [r for r in reps if not design_est[r]]
    n_cells = len(design_cells)
    inestimable: list[Inestimable] = []
    if holes:
        msg = (f"design has holes: {', '.join(holes)} cannot be estimated from the {n_cells} cell(s) present "
               f"(of {2 ** k}); add the missing cells")
        if o.strict:
            raise AnalysisError(msg + " or allow inestimable effects")
        notes.append(msg)
        inestimable += [Inestimable(h, "design has holes") for h in holes]

    # ---- OLS on finished runs: y ~ mains + 2FI (representatives) + C(seed) ----
    okd = d[d["_ok"]].reset_index(drop=True)
    safe = {f: f"x{i}" for i, f in enumerate(factors)}
    fit_df = pd.DataFrame({safe[f]: 2 * okd[f] - 1 for f in factors})
    fit_df["y"] = okd["_y"].to_numpy()
    fit_df["seed"] = okd["_seed"].to_numpy()
    rep_fit = [r for r in reps if design_est[r]]
    rhs_terms = [":".join(safe[f] for f in terms[names.index(r)]) for r in rep_fit]
    ok_cells = okd.groupby("_combo").size()
    pure_df = int((ok_cells - 1).sum())
    replicated = pure_df > 0

    def ols(block: bool):
        rhs = " + ".join(rhs_terms) if rhs_terms else "1"
        if block:
            rhs += " + C(seed)"
        with warnings.catch_warnings():  # rank deficiency is handled below, term by term (_estimable_mask)
            warnings.simplefilter("ignore")
            return smf.ols("y ~ " + rhs, data=fit_df).fit(cov_type=o.cov_type)

    res = ols(False)
    used_block = False
    if o.seed_block and p.has_seed and fit_df["seed"].nunique() > 1:
        res_b = ols(True)
        est0 = _estimable_mask(res.model.exog)
        estb = _estimable_mask(res_b.model.exog)
        cols0 = dict(zip(res.model.exog_names, est0))
        colsb = dict(zip(res_b.model.exog_names, estb))
        same = all(colsb.get(c, False) or not e for c, e in cols0.items() if c != "Intercept")
        if same and res_b.df_resid >= 1:
            res, used_block = res_b, True
        else:
            notes.append("seed block dropped: seeds are not crossed with the cells")
    est_cols = dict(zip(res.model.exog_names, _estimable_mask(res.model.exog)))
    has_error = replicated and res.df_resid >= 1
    if not replicated:
        notes.append("unreplicated design (one finished run per cell): no error estimate, so no CIs or p-values; "
                     "run more seeds")
    ci_tab = res.conf_int(alpha=o.alpha) if has_error else None

    term_info: dict[str, dict] = {}
    lost_cells = sorted(set(d.loc[~d["_ok"], "_combo"]) - set(okd["_combo"]))
    for r in rep_fit:
        col = ":".join(safe[f] for f in terms[names.index(r)])
        if not est_cols.get(col, False):
            why = "no finished runs in cell(s) " + ", ".join(lost_cells) if lost_cells else "not enough finished runs"
            inestimable.append(Inestimable(r, why))
            continue
        beta = float(res.params[col])
        info = {"effect": 2 * beta, "se": None, "ci": None, "p": None}
        if has_error:
            info["se"] = 2 * float(res.bse[col])
            info["ci"] = _ci(2 * ci_tab.loc[col, 0], 2 * ci_tab.loc[col, 1])
            info["p"] = _f(res.pvalues[col])
        term_info[r] = info
    lost = [i.effect for i in inestimable if i.reason != "design has holes"]
    if lost:
        notes.append(f"inestimable because runs failed: {', '.join(lost)} (see the failure analysis)")
    if used_block:
        notes.append(f"OLS with a seed block (C(seed)), residual df = {int(res.df_resid)}")

    # ---- effects per name ----
    main_effects: dict[str, float | None] = {}
    interactions: dict[str, float | None] = {}
    ci: dict[str, list | None] = {}
    pvals: dict[str, float | None] = {}
    clean_pairs = set()
    for t in terms:
        n = _term_name(t)
        rep, _ = rep_of[n]
        info = term_info.get(rep)
        if len(t) == 1:
            # a main effect aliased with interactions (resolution III) is still reported, with its alias chain
            if rep == n and info is not None:
                main_effects[n] = _f(info["effect"])
                ci[n] = info["ci"]
                pvals[n] = info["p"]
            else:
                main_effects[n] = None
        elif rep == n and n not in aliased_names and info is not None:
            interactions[n] = _f(info["effect"])
            ci[n] = info["ci"]
            pvals[n] = info["p"]
            clean_pairs.add(n)
        else:
            interactions[n] = None
    aliased = []
    for g in alias_groups:
        info = term_info.get(g[0][0])
        aliased.append(AliasChain(effects=[n for n, _ in g], signs=[sg for _, sg in g], label=_alias_label(g),
                                  estimate=_f(info["effect"]) if info else None, ci=info["ci"] if info else None))
    return Fit(
        n_cells=n_cells, replicated=bool(replicated), error_df=_f(res.df_resid) if has_error else None,
        main_effects=main_effects, interactions=interactions,
        ci={n: c for n, c in ci.items() if c is not None} if has_error else {},
        p={n: q for n, q in pvals.items() if q is not None}, aliased=aliased, inestimable=inestimable, notes=notes,
        sign=p.sign, df_resid=float(res.df_resid), se={r: i["se"] for r, i in term_info.items()},
        clean_pairs=frozenset(clean_pairs),
        estimated=frozenset(n for n in names if rep_of[n][0] == n and n in term_info))


def pair_synergies(fit: Fit, o: Options) -> Pairs:
    """Phase 2: S_ij = direction * 2 INT_ij for the clean pairs, corrected p-values across pairs, and antagonism
    flags: one-sided t test of H0: S >= -threshold, corrected across pairs (level alpha)."""
    notes: list[str] = []
    synergy: dict[str, float | None] = {}
    synergy_ci: dict[str, list | None] = {}
    for n, v in fit.interactions.items():
        if n in fit.clean_pairs:
            synergy[n] = _f(fit.sign * 2 * v) if v is not None else None
            c = fit.ci.get(n)
            synergy_ci[n] = _ci(*(fit.sign * 2 * np.array(c))) if c else None
        else:
            synergy[n] = None

    # multiplicity across clean pairs
    pair_ps = {n: fit.p[n] for n in synergy if synergy[n] is not None and fit.p.get(n) is not None}
    p_adj: dict[str, float | None] = {n: None for n in synergy}
    if pair_ps:
        adj = _adjust(list(pair_ps.values()), o.correction, o.alpha)
        p_adj.update({n: _f(v) for n, v in zip(pair_ps, adj)})

    antagonism: list[Flag] = []
    antag = {}
    if fit.has_error:
        for n, s in synergy.items():
            se = fit.se.get(n)
            if s is None or se is None:
                continue
            se_s = 2 * se
            tstat = (s + o.threshold) / se_s if se_s > 0 else (-np.inf if s + o.threshold < 0 else np.inf)
            antag[n] = float(stats.t.cdf(tstat, fit.df_resid))
        if antag:
            adj = _adjust(list(antag.values()), o.correction, o.alpha)
            for (n, pv), pa in zip(antag.items(), adj):
                if pa < o.alpha and synergy[n] < -o.threshold:
                    antagonism.append(Flag(
                        pair=n, factors=n.split(":"), kind="antagonism", estimate=synergy[n], ci=synergy_ci[n],
                        p=_f(pv), p_adj=_f(pa), threshold=o.threshold, df=_f(fit.df_resid), counts=None))
    else:
        notes.append("antagonism cannot be tested without replicates; failure interactions are still tested")

    strongest = None
    pos = {n: s for n, s in synergy.items() if s is not None}
    if pos:
        n = max(pos, key=lambda q: pos[q])
        strongest = StrongestSynergy(pair=n, estimate=pos[n], ci=synergy_ci.get(n), p_adj=p_adj.get(n))
    return Pairs(synergy=synergy, synergy_ci={n: c for n, c in synergy_ci.items() if c is not None}, p_adj=p_adj,
                 antagonism=antagonism, strongest=strongest, notes=notes)


def failure_interactions(p: _Prepared, o: Options) -> Failures:
    """Phase 3: pairs whose joint runs fail where each technique alone succeeds (see `_failure_tests`)."""
    flags, tests = _failure_tests(p, o.alpha)

    def typed(t: dict) -> FailureTest:
        if "factors" not in t:  # no run failed: nothing was tested
            return FailureTest(pair=t["pair"], p=t["p"], p_adj=t["p_adj"], counts=t["counts"])
        return FailureTest(pair=t["pair"], p=t["p"], p_adj=t["p_adj"], counts=t["counts"], factors=t["factors"],
                           estimate=t["estimate"], statuses=t["statuses"])

    return Failures(tests=[typed(t) for t in tests], flagged=[typed(t) for t in flags])


def bootstrap_cis(p: _Prepared, fit: Fit, pairs: Pairs, o: Options) -> Bootstrap:
    """Seed bootstrap within cells (replicated designs only) of the effects the OLS estimated cleanly."""
    if not (o.bootstrap and fit.replicated):
        return Bootstrap(ci={}, notes=[])
    terms = _effect_terms(p.factors, 2)
    est_mask = np.array([_term_name(t) in fit.estimated for t in terms])
    ci_boot, bnote = _bootstrap(p, terms, est_mask, 1 - o.alpha, o.n_resamples, o.bootstrap_method, o.random_state)
    if ci_boot:
        for n in list(ci_boot):
            if n in pairs.synergy and pairs.synergy[n] is None:
                ci_boot.pop(n)
    return Bootstrap(ci=ci_boot or {}, notes=[bnote] if bnote else [])


def attribute(p: _Prepared, o: Options) -> Attribution:
    """Phase 4: cell means on oriented gains -> dividends, leave-one-out, exact Shapley values (full factorials),
    the cumulative ladder and the best cell."""
    factors = p.factors
    k = len(factors)
    notes: list[str] = []
    cells = _cell_table(p)
    v = {r["key"]: r["gain"] for r in cells if r["gain"] is not None}
    full = frozenset(factors)
    dividends: dict[str, float | None] = {}
    dividends_full: dict[str, float | None] = {}
    for a, b in itertools.combinations(factors, 2):
        n = pair_name(a, b)
        ks = [frozenset(), frozenset({a}), frozenset({b}), frozenset({a, b})]
        dividends[n] = _f(v[ks[3]] - v[ks[1]] - v[ks[2]] + v[ks[0]]) if all(x in v for x in ks) else None
        kf = [full, full - {a}, full - {b}, full - {a, b}]
        dividends_full[n] = _f(v[kf[0]] - v[kf[1]] - v[kf[2]] + v[kf[3]]) if all(x in v for x in kf) else None
    loo = {f: (_f(v[full] - v[full - {f}]) if full in v and full - {f} in v else None) for f in factors}
    shapley = None
    missing_cells = [s for s in (frozenset(c) for r in range(k + 1) for c in itertools.combinations(factors, r))
                     if s not in v] if k <= 12 else None
    if k > 12:
        notes.append("Shapley values skipped: more than 12 factors")
    elif missing_cells:
        shown = ", ".join(combo_label(f for f in factors if f in s) for s in missing_cells[:5])
        notes.append(f"Shapley values need every cell of the full factorial; missing or all-failed: {shown}"
                     + (" ..." if len(missing_cells) > 5 else ""))
    else:
        shapley = {f: _f(x) for f, x in shapley_values(v, factors).items()}
    ladder, ladder_kind = _ladder(cells, factors, o.ladder_order, p.log)

    finished_cells = [r for r in cells if r["gain"] is not None]
    # prefer cells where at least half of the runs finished (a lucky survivor is not a recommendation)
    reliable = [r for r in finished_cells if 2 * r["n_finished"] >= r["n"]]
    finished_cells = reliable or finished_cells
    best = None
    if finished_cells:
        # best mean gain; ties go to the smaller technique set
        r = max(finished_cells, key=lambda c: (c["gain"], -len(c["on"])))
        best = Best(cell=r["cell"], combo=r["combo"], on=r["on"], mean=r["mean"], sd=r["sd"], gain=r["gain"],
                    n_finished=int(r["n_finished"]), n=int(r["n"]))
    return Attribution(
        cells=[Cell(**{k2: v2 for k2, v2 in r.items() if k2 != "key"}) for r in cells], best=best,
        dividends=dividends, dividends_full=dividends_full, loo=loo, shapley=shapley,
        ladder=[LadderRow(**r) for r in ladder] if ladder is not None else None, ladder_kind=ladder_kind,
        notes=notes)


# --------------------------------------------------------------------------------------------------------------------
# the analysis
# --------------------------------------------------------------------------------------------------------------------
def analyze(table: pd.DataFrame, factors: Sequence[str], metric: str, direction: str = "min",
            options: Options | None = None, **overrides: Any) -> Analysis:
    """Analyse one metric of a two-level technique study; `to_json()` of the result is JSON-serialisable.

    `options` (or keyword arguments naming its fields, e.g. `log=True, bootstrap=False`) set how; see `Options`.

    Result (see `Analysis`): fit.main_effects / fit.interactions (metric scale, log if `log`, *before* orientation:
    ME = mean(y|+) - mean(y|-), INT = half difference), pairs.synergy (oriented, = direction * 2 INT), fit.ci /
    pairs.synergy_ci (t intervals from OLS with a seed block, only when runs are replicated), fit.p / pairs.p_adj,
    bootstrap.ci (seed bootstrap within cells), attribution (cells, best, dividends, dividends_full, loo, shapley
    (oriented; full factorials only), ladder), pairs.strongest, incompatible (flags with evidence),
    failures.tests, fit.aliased, fit.inestimable, notes.

    `threshold` is the practical antagonism threshold delta (gain units): a pair is flagged when S < -delta
    significantly (one-sided t test of H0: S >= -delta, `correction` across pairs, level `alpha`).
    With `strict`, a design whose cells leave an effect inestimable (not merely aliased) raises AnalysisError."""
    o = replace(options or Options(), **overrides)
    o.validate()
    p = prepare(table, factors, metric, direction, seed_col=o.seed_col, status_col=o.status_col,
                reason_col=o.reason_col, log=o.log)
    fit = fit_effects(p, o)
    pairs = pair_synergies(fit, o)
    failures = failure_interactions(p, o)
    boot = bootstrap_cis(p, fit, pairs, o)
    att = attribute(p, o)
    d = p.data
    return Analysis(
        metric=metric, direction="max" if p.sign > 0 else "min", scale="log" if o.log else "linear",
        factors=list(p.factors), n_runs=int(len(d)), n_finished=int(d["_ok"].sum()),
        n_failed=int((~d["_ok"]).sum()), alpha=o.alpha, correction=o.correction, threshold=o.threshold,
        fit=fit, pairs=pairs, failures=failures, bootstrap=boot, attribution=att,
        notes=[*p.notes, *fit.notes, *pairs.notes, *boot.notes, *att.notes])


def analyze_study(results: StudyResults, *, alpha: float = 0.05, threshold: float = 0.0,
                  bootstrap: bool = True) -> dict[str, Analysis | AnalysisFailure]:
    """`analyze` for the primary metric and every other metric of a study (log scale per the metric registry);
    a metric that cannot be analysed gets an AnalysisFailure with the reason."""
    out: dict[str, Analysis | AnalysisFailure] = {}
    metrics = {results.metric: results.direction, **{m: d for m, d in results.other_metrics.items()
                                                      if m != results.metric}}
    for m, d in metrics.items():
        wall = m in metric_registry.WALL_CLOCK
        bench = wall and results.bench is not None and m in results.bench.columns
        try:
            a = analyze(results.bench if bench else results.table, results.factors, m, d,
                        log=metric_registry.is_log(m), alpha=alpha, threshold=threshold if m == results.metric else 0.0,
                        bootstrap=bootstrap, ladder_order=results.ladder_order, strict=False)
        except AnalysisError as e:
            out[m] = AnalysisFailure(metric=m, direction=d, error=str(e))
            continue
        if bench:
            a = replace(a, notes=[BENCH_NOTE, *a.notes])
        elif wall and contended(results.table):
            a = without_significance(a, CONTENTION_NOTE)
        out[m] = a
    return out


BENCH_NOTE = ("measured by `srdit study bench`: one training step per cell, interleaved in one process (rounds as "
              "blocks), not the trials' wall clock")
CONTENTION_NOTE = ("measured with a clock while several trials shared the machine: the load of the neighbours is in "
                   "the numbers, so no significance is claimed (run `srdit study bench` for a controlled measurement)")


def contended(table: pd.DataFrame) -> bool:
    """Whether the trials' wall-clock metrics carry other trials' load: some trial shared its machine, or the runs do
    not record it (`trials_on_host`)."""
    if "trials_on_host" not in table.columns:
        return True
    n = pd.to_numeric(table["trials_on_host"], errors="coerce")
    return bool(n.isna().any() or (n > 1).any())


def without_significance(a: Analysis, note: str) -> Analysis:
    """The same estimates and intervals, with every p-value, star and antagonism flag removed and `note` first:
    for measurements whose noise is not what the model assumes (contention)."""
    fit = replace(a.fit, p={k: None for k in a.fit.p})
    strongest = a.pairs.strongest and replace(a.pairs.strongest, p_adj=None)
    pairs = replace(a.pairs, p_adj={k: None for k in a.pairs.p_adj}, antagonism=[], strongest=strongest)
    return replace(a, fit=fit, pairs=pairs, notes=[note, *a.notes])
