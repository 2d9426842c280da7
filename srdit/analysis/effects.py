"""Effects of two-level technique switches: main effects, interactions, synergy, dividends, Shapley, ladders,
and incompatibility, with uncertainty.

Input: a tidy table, one row per trial: one 0/1 column per technique (factor), optionally a seed column and a status
column, and metric columns. Rows with an explicit failure status (FAILURE_STATUSES: diverged / nan / oom / crashed /
error / failed) or a finished status and a non-finite metric are *failures*: they are left out of the metric models
and used as evidence of failure interactions. Any other status (blank, cancelled, unknown) is excluded from both, and
so is a failure whose `crash_cause` column says `infrastructure` (a lost node, a missing file, the driver's own
error: `srdit.analysis.results.CRASH_CAUSE`); a blank or absent cause counts as evidence, as before it was recorded.

Conventions (design doc, "Synergy and incompatibility"):
- effects in +-1 coding (Montgomery, *Design and Analysis of Experiments*, ch. 6):
  ME_i = mean(y|x_i=+1) - mean(y|x_i=-1), INT_ij = (ME_i|x_j=+1 - ME_i|x_j=-1) / 2;
  OLS on +-1 columns gives beta = effect / 2;
- gains g = direction * y (direction +1 for "max", -1 for "min"), optionally y = log(metric) (speed-ups multiply);
- synergy S_ij = ME_i|j on - ME_i|j off = 2 INT_ij on the gain scale (positive = the pair helps more together);
- dividend D_ij = g(ij) - g(i) - g(j) + g(none) with other factors off (Moebius/Harsanyi dividend), and its
  conditional version against the full stack;
- Shapley phi_i = sum_{S subset N\\{i}} |S|!(k-|S|-1)!/k! [v(S+i) - v(S)] on cell means (sums to v(N) - v(empty));
- uncertainty: least squares `y ~ main + 2FI (+ seed block)` on (cell, seed) aggregates with pure error and a lack
  of fit test (cross-checked against statsmodels OLS in the tests), Lenth's PSE for unreplicated orthogonal designs,
  simultaneous (Bonferroni) pair intervals that make the decisions (on a study's secondary metrics: one
  Benjamini-Hochberg family with FCR-adjusted intervals, Benjamini & Yekutieli 2005), Holm/BH p_adj (statsmodels
  multipletests), a seed bootstrap within cells only where calibrated (scipy.stats.bootstrap); failure interactions
  by Boschloo's exact test (scipy.stats.boschloo_exact) and a survival-interaction likelihood-ratio test.

The result is typed (`Analysis`, one frozen dataclass per phase: fit, pairs, failures, bootstrap, attribution);
`Analysis.to_json()` is the JSON of `srdit analyze --format json`.

This module must not import torch, ray or mlflow: it works on any CSV.
"""

from __future__ import annotations

import inspect
import itertools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from srdit import metric_registry
from srdit.analysis.power import partial_aliases
from srdit.analysis.results import CODE, CRASH_CAUSE, INFRASTRUCTURE, StudyResults

__all__ = [
    "AnalysisError",
    "OK_STATUSES",
    "FAILURE_STATUSES",
    "Analysis",
    "AnalysisFailure",
    "Options",
    "analyze",
    "analyze_study",
    "bh_fcr_intervals",
    "FCRFamily",
    "level_pct",
    "pair_name",
    "shapley_values",
    "combo_label",
]

#: status values (case-insensitive) that count as a successful run
OK_STATUSES = frozenset({"finished", "ok", "success", "succeeded", "completed"})
#: explicit failures (case-insensitive): the only statuses that are evidence of an incompatibility. Any other status
#: (blank, "cancelled", "unknown", "running", ...) says nothing about the techniques: such runs are excluded from both
#: the metric models and the failure analysis, with a note.
FAILURE_STATUSES = frozenset({"diverged", "nan", "oom", "crashed", "error", "failed"})
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
        raise AnalysisError(f"factor '{name}' takes only one level ({level}) in the data: its effect is inestimable")
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
    data: pd.DataFrame  # columns: factors (0/1), _combo, _cell, _seed, _block, _ok, _status, _reason, _raw, _y, _g
    has_seed: bool
    notes: list[str] = field(default_factory=list)
    n_excluded: int = 0
    block_col: str | None = None
    "the block column when the table has one (e.g. the halves of a fold-over), else None"
    n_infrastructure: int = 0
    "failed runs left out because their crash cause is the infrastructure, not the training code"


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
    block_col: str | None = "block",
    cause_col: str | None = CRASH_CAUSE,
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
        raise AnalysisError(f"missing column(s) {missing}; available: {sorted(map(str, table.columns))[:30]}")
    # one column, one role: a factor analysed as its own response (or as the seed) would be read both ways
    roles = {"metric": metric, "seed column": seed_col, "status column": status_col}
    for role, col in roles.items():
        if col is not None and col in factors:
            raise AnalysisError(
                f"column '{col}' is both a factor and the {role}; the factors are the 0/1 technique columns, "
                f"the {role} another column: drop it from the factors or name another {role}"
            )
    if metric in (seed_col, status_col) and metric is not None:
        raise AnalysisError(
            f"column '{metric}' is both the metric and the {'seed' if metric == seed_col else 'status'} column"
        )
    sign = _direction_sign(direction)
    notes: list[str] = []
    n_excluded = 0
    if status_col and status_col in table.columns:
        st = table[status_col].fillna("").astype(str).str.strip().str.lower()
        excluded = ~st.isin(OK_STATUSES) & ~st.isin(FAILURE_STATUSES)
        if excluded.any():
            kinds = sorted({s or "(blank)" for s in st[excluded]})
            notes.append(
                f"{int(excluded.sum())} run(s) with status {', '.join(kinds)} are excluded from the metric "
                f"and failure analyses (only {', '.join(sorted(FAILURE_STATUSES))} count as failures)"
            )
            n_excluded = int(excluded.sum())
            table, st = table[~excluded], st[~excluded]
            if len(table) == 0:
                raise AnalysisError(f"no run has a finished or failed status (statuses seen: {', '.join(kinds)})")
    else:
        st = pd.Series("finished", index=table.index)
    table, st, n_infrastructure, cause_notes = _without_infrastructure_failures(table, st, cause_col)
    notes += cause_notes
    d = pd.DataFrame(index=table.index)
    for f in factors:
        d[f] = _binary_column(table[f], f)
    lv = d[factors].to_numpy(dtype=np.int64)
    # one integer code per cell (bit i = factor i on): grouping on it is cheap for millions of rows
    code = (
        lv @ (np.int64(1) << np.arange(len(factors), dtype=np.int64))
        if len(factors) < 63
        else pd.factorize(pd.Series(map(tuple, lv)))[0]
    )
    d["_code"] = code
    uniq, first = np.unique(code, return_index=True)
    labels = {c: combo_label(f for f, on in zip(factors, lv[i]) if on) for c, i in zip(uniq, first)}
    d["_combo"] = pd.Series(code, index=d.index).map(labels)
    d["_cell"] = table["cell"].astype(str) if "cell" in table.columns else d["_combo"]
    has_seed = bool(seed_col) and seed_col in table.columns
    d["_seed"] = table[seed_col].astype(str) if has_seed else "0"
    has_block = bool(block_col) and block_col in table.columns and bool(table[block_col].notna().any())
    if has_block and table[block_col].isna().any():
        raise AnalysisError(
            f"column '{block_col}' is empty in {int(table[block_col].isna().sum())} row(s); give "
            f"every run its block (e.g. the half of a fold-over) or drop the column"
        )
    d["_block"] = table[block_col].astype(str) if has_block else "0"
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
            raise AnalysisError(
                f"metric '{metric}' has {int(bad.sum())} non-positive value(s): cannot analyse it on the log scale"
            )
        y = np.log(y.where(ok))
    d["_y"] = y.where(ok)
    d["_g"] = sign * d["_y"]
    if not ok.any():
        raise AnalysisError(f"no finished run with a finite '{metric}': nothing to analyse")
    return _Prepared(
        factors,
        metric,
        sign,
        log,
        d.reset_index(drop=True),
        has_seed,
        notes,
        n_excluded,
        block_col if has_block else None,
        n_infrastructure,
    )


def _without_infrastructure_failures(
    table: pd.DataFrame, st: pd.Series, cause_col: str | None
) -> tuple[pd.DataFrame, pd.Series, int, list[str]]:
    """The rows whose failure the infrastructure caused (`cause_col` = "infrastructure": a lost worker or node, a
    missing file, the driver's own error) leave both analyses: a node lost mid-study is no evidence that two
    techniques are incompatible. A blank cause (not recorded: runs from before srdit told the causes apart, a CSV
    without the column) counts as the training code's, as it always did. Returns the kept rows, their statuses, the
    count left out and its note; AnalysisError for a cause that is neither "code", "infrastructure" nor blank."""
    if not cause_col or cause_col not in table.columns:
        return table, st, 0, []
    cause = table[cause_col].fillna("").astype(str).str.strip().str.lower()
    bad = sorted(set(cause) - {"", CODE, INFRASTRUCTURE})
    if bad:
        raise AnalysisError(
            f"column '{cause_col}' has value(s) {bad[:5]}; expected {CODE}, {INFRASTRUCTURE} or blank (why a "
            f"crashed run crashed)"
        )
    infra = st.isin(FAILURE_STATUSES) & (cause == INFRASTRUCTURE)
    n = int(infra.sum())
    if not n:
        return table, st, 0, []
    if n == len(table):
        raise AnalysisError(f"every run failed for a reason outside the training code ({cause_col} = {INFRASTRUCTURE})")
    note = (
        f"{n} run(s) failed for a reason outside the training code ({cause_col} = {INFRASTRUCTURE}: a lost worker "
        "or node, a missing file, the driver's own error) and are left out of the metric and failure analyses: "
        "they say nothing about the techniques (a rerun of the study retries them)"
    )
    return table[~infra], st[~infra], n, [note]


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
    """One summary per cell (in order of first appearance), from grouped aggregates (no per-row Python)."""
    d = p.data
    code = d["_code"].to_numpy()
    ok = d["_ok"].to_numpy()
    uniq, first, inv = np.unique(code, return_index=True, return_inverse=True)
    m = len(uniq)
    n = np.bincount(inv, minlength=m)
    n_ok = np.bincount(inv, weights=ok, minlength=m)

    def mean_sd(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = np.where(ok, v, 0.0)
        s1 = np.bincount(inv, weights=v, minlength=m)
        with np.errstate(all="ignore"):
            mu = s1 / n_ok
            dev = np.where(ok, v - mu[inv], 0.0)
            var = np.bincount(inv, weights=dev * dev, minlength=m) / (n_ok - 1)
        return mu, np.sqrt(var)

    raw_mu, raw_sd = mean_sd(d["_raw"].to_numpy(dtype=float))
    y_mu, _ = mean_sd(d["_y"].fillna(0.0).to_numpy(dtype=float))
    g_mu, g_sd = mean_sd(d["_g"].fillna(0.0).to_numpy(dtype=float))
    fail = d.loc[~ok]
    fail_counts = fail.groupby(["_code", "_status"]).size() if len(fail) else pd.Series(dtype=int)
    reasons = fail[fail["_reason"] != ""].groupby("_code")["_reason"].unique() if len(fail) else pd.Series(dtype=object)
    lv = d[p.factors].to_numpy()
    rows = []
    for i in np.argsort(first, kind="stable"):
        c, r0, no = uniq[i], first[i], int(n_ok[i])
        on = [f for f, x in zip(p.factors, lv[r0]) if x == 1]
        failures = {}
        if len(fail_counts) and c in fail_counts.index.get_level_values(0):
            failures = {
                str(k): int(v) for k, v in fail_counts.loc[c].sort_values(ascending=False, kind="stable").items()
            }
        rows.append(
            {
                "combo": str(d["_combo"].iat[r0]),
                "cell": str(d["_cell"].iat[r0]),
                "on": on,
                "key": frozenset(on),
                "n": int(n[i]),
                "n_finished": no,
                "n_failed": int(n[i]) - no,
                "failures": failures,
                "reasons": sorted(reasons.loc[c]) if len(reasons) and c in reasons.index else [],
                "mean": _f(raw_mu[i]) if no else None,
                "sd": _f(raw_sd[i]) if no > 1 else None,
                "y_mean": _f(y_mu[i]) if no else None,
                "gain": _f(g_mu[i]) if no else None,
                "gain_sem": _f(g_sd[i] / math.sqrt(no)) if no > 1 else None,
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
_SURV_D = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=float)


def _surv_ll(s: np.ndarray, f: np.ndarray, ok: np.ndarray) -> float:
    s = np.clip(s, 1e-300, 1.0)
    return float(
        np.sum(np.where(ok > 0, ok * np.log(s), 0.0) + np.where(f > 0, f * np.log(np.clip(1 - s, 1e-300, 1.0)), 0.0))
    )


def _surv_null_fit(f: np.ndarray, n: np.ndarray, starts: int = 3) -> tuple[float, np.ndarray]:
    """Constrained ML fit of log s = mu + alpha x1 + beta x2 (s <= 1): (log-likelihood, fitted s per group)."""
    from scipy.optimize import minimize  # local: only failing studies need it

    ok = n - f

    def negll(th):
        eta = np.minimum(_SURV_D @ th, 0.0)
        s = np.exp(eta)
        one_m = np.clip(1 - s, 1e-300, 1.0)
        val = -_surv_ll(s, f, ok)
        # d(-ll)/d eta_g = -(ok_g - f_g s_g / (1 - s_g)) where eta_g < 0
        g_eta = -(ok - np.where(f > 0, f * s / one_m, 0.0)) * (_SURV_D @ th < 0)
        return val, _SURV_D.T @ g_eta

    s0 = np.clip(ok / n, 0.5 / n, 1 - 0.5 / n)
    cands = [
        np.array([np.log(s0[0]), np.log(s0[1] / s0[0]), np.log(s0[2] / s0[0])]),
        np.zeros(3),
        np.array([0.0, np.log(s0[1]), np.log(s0[2])]),
    ][:starts]
    cons = [{"type": "ineq", "fun": (lambda th, r=r: -(r @ th)), "jac": (lambda th, r=r: -r)} for r in _SURV_D]
    best_l, best_s = -np.inf, None
    for th0 in cands:
        res = minimize(negll, th0, jac=True, method="SLSQP", constraints=cons, options={"maxiter": 300, "ftol": 1e-12})
        if -res.fun > best_l:
            best_l, best_s = -float(res.fun), np.exp(np.minimum(_SURV_D @ res.x, 0.0))
    return best_l, best_s


def _survival_interaction_p(groups: Sequence[tuple[int, int]], n_boot: int = 199) -> float:
    """One-sided test that a pair fails beyond independent failures.

    groups: (failed, n) for (neither, first alone, second alone, both), others at any level. Independent failure
    mechanisms multiply survival: s_both = s_first * s_second / s_neither, i.e. gamma = 0 in the binomial model
    log s = mu + alpha x1 + beta x2 + gamma x1 x2 (log link). Statistic: the likelihood ratio of the saturated model
    against the constrained ML null fit (s <= 1). Its chi2(1)/2 reference is anti-conservative at small n and on the
    boundary (a group that never fails), so a candidate (asymptotic p < 0.05) is confirmed by a parametric bootstrap
    from the null fit (`n_boot` tables, fixed seed): p = (1 + #{LR* >= LR}) / (1 + n_boot).
    Returns 1 when a group is empty or the pair fails no more than predicted."""
    f = np.array([g[0] for g in groups], dtype=float)
    n = np.array([g[1] for g in groups], dtype=float)
    if np.any(n == 0):
        return 1.0
    ok = n - f
    s_hat = ok / n
    pred = s_hat[1] * s_hat[2] / s_hat[0] if s_hat[0] > 0 else 1.0
    if s_hat[3] >= min(pred, 1.0) - 1e-12:
        return 1.0
    l0, s_null = _surv_null_fit(f, n)
    lr = max(2 * (_surv_ll(s_hat, f, ok) - l0), 0.0)
    p_asym = float(0.5 * stats.chi2.sf(lr, 1))
    if p_asym >= 0.05 or n_boot <= 0:
        return p_asym
    rng = np.random.default_rng(0)
    fails_b = rng.binomial(n.astype(int)[None, :], np.clip(1 - s_null, 0, 1)[None, :], size=(n_boot, 4))
    exceed = 0
    for fb in fails_b.astype(float):
        sb = (n - fb) / n
        pb = sb[1] * sb[2] / sb[0] if sb[0] > 0 else 1.0
        if sb[3] >= min(pb, 1.0) - 1e-12:
            continue  # one-sided: no excess failure, LR* counts as 0
        lb, _ = _surv_null_fit(fb, n, starts=1)
        exceed += 2 * (_surv_ll(sb, fb, n - fb) - lb) >= lr - 1e-9
    return float((1 + exceed) / (1 + n_boot))


#: group size above which the failure test uses Fisher's exact test instead of Boschloo's (same answer at large n)
BOSCHLOO_MAX_N = 60


def _boschloo_greater(c1: Sequence[int], c2: Sequence[int], cache: dict[tuple, float]) -> float:
    """One-sided p that group 1 fails more than group 2, from [failed, n] counts: Boschloo's exact test
    (scipy.stats.boschloo_exact), Fisher's above BOSCHLOO_MAX_N runs per group. Memoised in `cache`."""
    key = (*c1, *c2)
    if key not in cache:
        tab = [[c1[0], c2[0]], [c1[1] - c1[0], c2[1] - c2[0]]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if max(c1[1], c2[1]) <= BOSCHLOO_MAX_N:
                pv = stats.boschloo_exact(tab, alternative="greater").pvalue
            else:  # Boschloo's cost grows with n^2; at this size Fisher's conservativeness is negligible
                pv = stats.fisher_exact(tab, alternative="greater").pvalue
        cache[key] = float(pv) if np.isfinite(pv) else 1.0
    return cache[key]


def _pair_failure_test(
    d: pd.DataFrame, fails: np.ndarray, keep: np.ndarray, a: str, b: str, alpha: float, cache: dict[tuple, float]
) -> dict:
    """The failure test of one pair on the rows `keep` (see `_failure_tests`): failed / total runs with both on,
    each alone and neither; p = the larger of the excess p (Boschloo, both-on against each alone) and, when that is
    below alpha, the survival-interaction p; the estimate is the both-on failure rate minus the larger alone rate."""
    xa = d[a].to_numpy() == 1
    xb = d[b].to_numpy() == 1
    both, a_only, b_only, none = keep & xa & xb, keep & xa & ~xb, keep & ~xa & xb, keep & ~xa & ~xb

    def cnt(mask):
        return [int((fails & mask).sum()), int(mask.sum())]

    c_both, c_a, c_b, c_none = cnt(both), cnt(a_only), cnt(b_only), cnt(none)
    pv, p_int = 1.0, 1.0
    if c_both[0] > 0 and c_a[1] > 0 and c_b[1] > 0:
        pv = max(_boschloo_greater(c_both, c_a, cache), _boschloo_greater(c_both, c_b, cache))
        if pv < alpha:  # the pair's p is the larger of the two: only a candidate needs the second
            p_int = _survival_interaction_p([tuple(c_none), tuple(c_a), tuple(c_b), tuple(c_both)])
    rate = lambda c: c[0] / c[1] if c[1] else None  # noqa: E731
    est = None
    if c_both[1] and c_a[1] and c_b[1]:
        est = rate(c_both) - max(rate(c_a), rate(c_b))
    reasons = d.loc[both & fails, "_status"].value_counts().to_dict()
    return {
        "pair": pair_name(a, b),
        "factors": [a, b],
        "p": float(max(pv, p_int)),
        "p_excess": _f(pv),
        "p_interaction": _f(p_int),
        "estimate": _f(est),
        "counts": {
            "both": {"failed": c_both[0], "n": c_both[1]},
            f"{a}_alone": {"failed": c_a[0], "n": c_a[1]},
            f"{b}_alone": {"failed": c_b[0], "n": c_b[1]},
            "neither": {"failed": c_none[0], "n": c_none[1]},
        },
        "statuses": {str(k): int(v) for k, v in reasons.items()},
    }


def _failure_tests(p: _Prepared, alpha: float) -> tuple[list[dict], list[dict]]:
    """Pairs whose joint runs fail beyond what the two techniques' own failures predict.

    Only explicit failures (FAILURE_STATUSES) are evidence. For a pair (i, j), with the other factors at any level:
    - excess: both-on runs fail more than i-alone runs and more than j-alone runs (one-sided Boschloo exact tests,
      scipy.stats.boschloo_exact, uniformly more powerful than Fisher's: 3/3 vs 0/3 gives p = 0.0156; the larger
      p of the two = an intersection-union test);
    - interaction: both-on runs survive less than s_i * s_j / s_none predicts (`_survival_interaction_p`), so two
      independently flaky techniques are not flagged.
    The pair's p is the larger of the two (both must hold). Step-down over pairs in the spirit of Holm (Holm 1979):
    once a pair is flagged its both-on runs are set aside before re-testing the rest, so that a failing pair is not
    re-attributed to its supersets."""
    d = p.data
    fails = (~d["_ok"]).to_numpy()
    pairs = list(itertools.combinations(p.factors, 2))
    m = len(pairs)
    if m == 0 or not fails.any():
        return [], [{"pair": pair_name(a, b), "p": None, "p_adj": None, "counts": None} for a, b in pairs]
    keep = np.ones(len(d), dtype=bool)
    remaining = list(pairs)
    flags: list[dict] = []
    tests: dict[str, dict] = {}
    prev_adj = 0.0
    cache: dict[tuple, float] = {}  # Boschloo p-values of count tables already tested
    while remaining:
        results = [_pair_failure_test(d, fails, keep, a, b, alpha, cache) for a, b in remaining]
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
    """Resample seeds within cells. Runs are aggregated per (cell, seed) first (the unit resampled is a seed's
    mean, or a run when there is no seed column), so memory is units x batch, never rows x resamples."""
    d = p.data[p.data["_ok"]]
    unit = d.groupby(["_code", "_seed"], sort=True)["_y"].mean() if p.has_seed else d.set_index("_code")["_y"]
    codes = unit.index.get_level_values(0) if p.has_seed else unit.index
    groups = [g for _, g in unit.groupby(codes, sort=True)]
    smallest = min(len(g) for g in groups)
    if smallest < MIN_BOOTSTRAP_UNITS:
        return None, (
            f"bootstrap skipped: it is calibrated only with >= {MIN_BOOTSTRAP_UNITS} finished seeds in "
            f"every cell (smallest cell: {smallest}); the t intervals are used"
        )
    first = d.drop_duplicates("_code").set_index("_code").sort_index()
    levels = first.loc[[c for c, _ in unit.groupby(codes, sort=True)], p.factors].reset_index(drop=True)
    Xc = np.column_stack([np.ones(len(levels)), _pm_matrix(levels, terms)])
    ok_cols = _estimable_mask(Xc)[1:] & est_mask
    if not ok_cols.any():
        return None, "bootstrap skipped: no effect is estimable from the cell means"
    pinv = np.linalg.pinv(Xc)
    # resampling n values underestimates the variance of a mean by (n-1)/n: the deviations from each cell's mean are
    # scaled by sqrt(n/(n-1)) before resampling (a rescaled bootstrap; same estimate, unbiased bootstrap variance)
    samples = tuple(
        x.mean() + (x - x.mean()) * math.sqrt(len(x) / (len(x) - 1)) for x in (g.to_numpy(dtype=float) for g in groups)
    )

    def statistic(*xs, axis=-1):
        means = np.stack([x.mean(axis=axis) for x in xs], axis=-1)  # (..., n_cells)
        beta = means @ pinv.T  # (..., 1 + n_terms)
        eff = 2.0 * beta[..., 1:][..., ok_cols]
        return np.moveaxis(eff, -1, 0)

    # scipy >= 1.15 names the seed `rng`; older releases `random_state`
    kw = (
        {"rng": random_state}
        if "rng" in inspect.signature(stats.bootstrap).parameters
        else {"random_state": random_state}
    )
    note = None
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate BCa (too few distinct resamples) falls back below
        try:
            res = stats.bootstrap(
                samples,
                statistic,
                vectorized=True,
                n_resamples=n_resamples,
                batch=200,
                confidence_level=confidence,
                method=method,
                **kw,
            )
            lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
            if method.lower() == "bca" and not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
                raise ValueError("degenerate BCa interval")
        except Exception:  # BCa can be degenerate with very few seeds; percentile is always defined
            res = stats.bootstrap(
                samples,
                statistic,
                vectorized=True,
                n_resamples=n_resamples,
                batch=200,
                confidence_level=confidence,
                method="percentile",
                **kw,
            )
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
    cause_col: str | None = CRASH_CAUSE
    "why a crashed run crashed (code / infrastructure); infrastructure failures are no evidence (see `prepare`)"
    log: bool = False
    "analyse log(metric) (throughput-like metrics: speed-ups multiply)"
    alpha: float = 0.05
    threshold: float = 0.0
    "practical antagonism threshold delta, gain units"
    correction: str = "holm"
    seed_block: bool = True
    block_col: str | None = "block"
    "block column (e.g. the halves of a fold-over): an additive fixed effect in the model when the table has it"
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
    lack_of_fit: dict | None = None
    "F test of the mains + pairs model against pure error: ss, df, f, p, pure_error_ss, pure_error_df"
    lenth: dict | None = None
    "unreplicated orthogonal designs: Lenth's PSE, margins and significant effects (see `_lenth`)"
    aliased_effects: dict[str, str] = field(default_factory=dict)
    "every effect in an alias chain of the planned design (mains of resolution III included) -> the chain"
    partial_aliases: dict[str, dict[str, float]] = field(default_factory=dict)
    "fitted effect -> {omitted interaction: alias coefficient} caused by missing or failed cells"
    dropped_factors: list[str] = field(default_factory=list)
    "factors constant among finished runs, left out of the metric model"
    seed_block: bool = False
    block: dict | None = None
    "the block term when fitted: column, levels, effects (each level against the first: estimate, se, ci), df"
    # for the later phases (not part of the JSON)
    sign: int = field(repr=False, default=1)
    df_resid: float = field(repr=False, default=0.0)
    se: dict[str, float | None] = field(repr=False, default_factory=dict)
    "standard error of each estimated representative term (effect scale)"
    clean_pairs: frozenset[str] = field(repr=False, default=frozenset())
    "pairs estimated free of aliasing"
    estimated: frozenset[str] = field(repr=False, default=frozenset())
    "terms estimated as their own representative (what the bootstrap may estimate)"
    mse: float | None = field(repr=False, default=None)
    "pure-error mean square (metric scale), None without replicates"

    @property
    def has_error(self) -> bool:
        return self.error_df is not None

    def alias_tag(self, effect: str) -> str | None:
        """What an estimate is read with, as the CLI table and the report page print it: "aliased: <chain>" for an
        effect in an alias chain of the design (a resolution-III main effect included), "partly aliased: <omitted
        interactions>" for an estimate biased by missing cells (never tested), None for a clean estimate."""
        if effect in self.aliased_effects:
            return f"aliased: {self.aliased_effects[effect]}"
        if effect in self.partial_aliases:
            return "partly aliased: " + ", ".join(self.partial_aliases[effect])
        return None


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
            return {
                "pair": self.pair,
                "factors": self.factors,
                "kind": self.kind,
                "estimate": self.estimate,
                "ci": self.ci,
                "p": self.p,
                "p_adj": self.p_adj,
                "threshold": self.threshold,
                "df": self.df,
                "counts": self.counts,
            }
        return {
            "pair": self.pair,
            "factors": self.factors,
            "p": self.p,
            "estimate": self.estimate,
            "counts": self.counts,
            "statuses": self.statuses,
            "p_adj": self.p_adj,
            "kind": self.kind,
            "ci": self.ci,
        }


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
    significant: list[str] = field(default_factory=list)
    "pairs whose interval in `synergy_ci` excludes 0 (simultaneous, or FCR-adjusted for an exploratory metric)"
    partially_aliased: list[str] = field(default_factory=list)
    "pairs estimated but partially aliased (missing or failed cells): never tested"
    interval: str | None = None
    "what `synergy_ci` is (simultaneous level, method, df, units)"
    n_tested: int = 0
    fcr_level: float | None = None
    """marginal confidence level of `synergy_ci` when they are FCR-adjusted intervals of the exploratory BH family
    (`bh_fcr_intervals`); None where they are simultaneous (Bonferroni) intervals"""


@dataclass(frozen=True)
class FailureTest:
    """The failure test of one pair's joint failures (Boschloo excess and survival interaction, see
    `_failure_tests`); `factors` is None when no run failed (nothing was tested)."""

    pair: str
    p: float | None
    p_adj: float | None
    counts: dict | None
    factors: list[str] | None = None
    estimate: float | None = None
    statuses: dict[str, int] = field(default_factory=dict)
    p_excess: float | None = None
    "Boschloo: both-on fails more than each technique alone (the larger of the two one-sided p)"
    p_interaction: float | None = None
    "one-sided LR test: both-on survives less than independent failures predict"

    def to_json(self) -> dict:
        if self.factors is None:
            return {"pair": self.pair, "p": self.p, "p_adj": self.p_adj, "counts": self.counts}
        return {
            "pair": self.pair,
            "factors": self.factors,
            "p": self.p,
            "estimate": self.estimate,
            "counts": self.counts,
            "statuses": self.statuses,
            "p_adj": self.p_adj,
            "p_excess": self.p_excess,
            "p_interaction": self.p_interaction,
        }

    def flag(self) -> Flag:
        return Flag(
            pair=self.pair,
            factors=list(self.factors or []),
            kind="failure",
            estimate=self.estimate,
            ci=None,
            p=self.p,
            p_adj=self.p_adj,
            counts=self.counts,
            statuses=self.statuses,
        )


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
    indistinguishable: list[str] | None = None
    "cells (combos) not distinguishable from the best at alpha; None when there is no error estimate"
    rule: str = ""
    "how `indistinguishable` was decided"

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
    role: str = "confirmatory"
    "'confirmatory' (the primary metric) or 'exploratory' (secondary metrics of a study)"
    family: str = ""
    "the multiplicity family of the pair tests"
    n_excluded: int = 0
    "runs excluded for a status that is neither finished nor an explicit failure"
    n_infrastructure: int = 0
    "failed runs left out because the infrastructure, not the training code, made them fail"

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
            # added with the calibrated analysis (appended: the keys above are stable)
            "role": self.role,
            "family": self.family,
            "intervals": {
                "ci": (
                    f"individual {int(round(100 * (1 - self.alpha)))}% t intervals, pure error, effect units "
                    "(ME; INT = S/2), metric scale before orientation"
                )
                if fit.ci
                else None,
                "synergy_ci": pairs.interval,
                "ci_boot": (
                    f"seed bootstrap within cells, {int(round(100 * (1 - self.alpha)))}%, effect units "
                    "(ME; INT = S/2), metric scale before orientation; kept only with >= "
                    f"{MIN_BOOTSTRAP_UNITS} seeds per cell"
                )
                if self.bootstrap.ci
                else None,
            },
            "significant_pairs": list(pairs.significant),
            "partially_aliased_pairs": list(pairs.partially_aliased),
            "aliased_effects": dict(fit.aliased_effects),
            "partial_aliases": dict(fit.partial_aliases),
            "dropped_factors": list(fit.dropped_factors),
            "seed_block": fit.seed_block,
            "lack_of_fit": fit.lack_of_fit,
            "lenth": fit.lenth,
            "n_excluded": self.n_excluded,
            "block": fit.block,  # appended with the fold-over: the block term for its halves (None without)
            "n_infrastructure": self.n_infrastructure,  # appended: failures left out as the infrastructure's
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
def _components(a: np.ndarray, b: np.ndarray) -> int:
    """Connected components of the bipartite graph with an edge (a[i], b[i]) (cells x seeds layout)."""
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    parent = np.arange(na + nb)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), (b + na).tolist()):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[rx] = ry
    return len({find(x) for x in range(na + nb)})


def _absorb(v: np.ndarray, w: np.ndarray, groups: Sequence[np.ndarray], iters: int = 1000) -> np.ndarray:
    """Residual of v (n,) or (n, q) after a weighted least-squares fit of additive group effects (alternating
    projections; one pass suffices for one factor or a balanced two-way layout)."""
    r = np.array(v, dtype=float, copy=True)
    two_d = r.ndim == 2
    if not two_d:
        r = r[:, None]
    if r.shape[1] == 0:
        return r
    scale = max(float(np.abs(r).max(initial=0.0)), 1.0)
    for _ in range(iters if len(groups) > 1 else 1):
        step = 0.0
        for g in groups:
            m = g.max() + 1
            wsum = np.bincount(g, weights=w, minlength=m)
            means = np.column_stack([np.bincount(g, weights=w * r[:, j], minlength=m) for j in range(r.shape[1])])
            means /= np.where(wsum > 0, wsum, 1.0)[:, None]
            r -= means[g]
            step = max(step, float(np.abs(means).max(initial=0.0)))
        if step < 1e-13 * scale:
            break
    return r if two_d else r[:, 0]


def _all_terms(factors: Sequence[str], max_order: int) -> list[tuple[str, ...]]:
    return [t for r in range(1, max_order + 1) for t in itertools.combinations(factors, r)]


def _lenth(cells: pd.DataFrame, y: np.ndarray, factors: Sequence[str], alpha: float) -> dict | None:
    """Lenth's (1989) pseudo standard error for an unreplicated orthogonal two-level design.

    cells: (n, k) 0/1 levels, one row per run; y: (n,). Contrasts c_j = 2/n sum x_j y over the n-1 orthogonal alias
    chains; s0 = 1.5 median|c|, PSE = 1.5 median{|c| : |c| < 2.5 s0}; margin ME = t(1 - alpha/2, m/3) PSE,
    simultaneous margin SME = t(gamma, m/3) PSE with gamma = (1 + (1 - alpha)^(1/m)) / 2. Returns None when the
    design is not orthogonal (a missing cell, unequal replication) or has fewer than 4 contrasts."""
    n = len(cells)
    if n < 5 or len(factors) > 12:
        return None
    terms = _all_terms(factors, len(factors))
    names = [_term_name(t) for t in terms]
    X = _pm_matrix(cells[list(factors)], terms)
    groups = _alias_groups(np.column_stack([np.ones(n), X]), ["Intercept", *names])
    chains = [g for g in groups if g[0][0] != "Intercept"]
    reps = [names.index(g[0][0]) for g in chains]
    Xr = X[:, reps]
    if len(reps) != n - 1 or not np.allclose(Xr.T @ Xr, n * np.eye(len(reps))) or np.abs(Xr.sum(0)).max() > 1e-9:
        return None
    c = 2.0 / n * (Xr.T @ y)
    m = len(c)
    a = np.abs(c)
    s0 = 1.5 * np.median(a)
    small = a[a < 2.5 * s0]
    pse = 1.5 * float(np.median(small)) if small.size else float("nan")
    df = m / 3.0
    me = float(stats.t.ppf(1 - alpha / 2, df) * pse)
    gamma = (1 + (1 - alpha) ** (1.0 / m)) / 2
    sme = float(stats.t.ppf(gamma, df) * pse)
    labels = [_alias_label(g) for g in chains]
    pv = [float(2 * stats.t.sf(abs(x) / pse, df)) if pse > 0 else None for x in c]
    return {
        "pse": _f(pse),
        "margin": _f(me),
        "simultaneous_margin": _f(sme),
        "df": df,
        "effects": {lab: _f(x) for lab, x in zip(labels, c)},
        "p": {lab: _f(q) for lab, q in zip(labels, pv)},
        "significant": [lab for lab, x in zip(labels, a) if x > me],
        "significant_simultaneous": [lab for lab, x in zip(labels, a) if x > sme],
        "source": "Lenth (1989), Technometrics 31: 469-473; individual margin ME and simultaneous margin SME",
    }


def _block_term(
    col: str,
    levels: np.ndarray,
    g_block: np.ndarray,
    g_n: np.ndarray,
    g_mean: np.ndarray,
    Xg: np.ndarray,
    seed: list,
    mse: float,
    df: float | None,
    alpha: float,
) -> dict:
    """The fitted block effects (each level against the first, metric scale) of the model y ~ terms [+ seed] +
    block, by weighted least squares on the aggregates: the terms (Xg: intercept + kept columns) and the block
    dummies, with the seed means absorbed first (Frisch-Waugh). Standard errors from the pure-error `mse`."""
    D = np.column_stack([g_block == b for b in range(1, len(levels))]).astype(float)
    Z = np.column_stack([Xg[:, 1:] if seed else Xg, D])
    yv = g_mean
    if seed:
        Z, yv = _absorb(Z, g_n, seed), _absorb(g_mean, g_n, seed)
    sw = np.sqrt(g_n)
    beta, *_ = np.linalg.lstsq(Z * sw[:, None], yv * sw, rcond=None)
    cov = None
    if df is not None:
        cov = mse * np.linalg.pinv((Z * sw[:, None]).T @ (Z * sw[:, None]))
    tcrit = stats.t.ppf(1 - alpha / 2, df) if df is not None else None
    effects = {}
    for j, b in enumerate(levels[1:]):
        q = Z.shape[1] - D.shape[1] + j
        est = float(beta[q])
        se = math.sqrt(max(cov[q, q], 0.0)) if cov is not None else None
        effects[str(b)] = {
            "estimate": _f(est),
            "se": _f(se) if se is not None else None,
            "ci": _ci(est - tcrit * se, est + tcrit * se) if se is not None else None,
        }
    return {
        "column": col,
        "levels": [str(b) for b in levels],
        "effects": effects,
        "df": _f(df) if df is not None else None,
    }


@dataclass(frozen=True)
class _ModelFactors:
    """Step 1 of `fit_effects`: the factors the metric model can vary."""

    varying: list[str]
    "factors with both levels among the finished runs (the metric model's factors)"
    dropped: list[str]
    "factors constant among the finished runs (every run at the other level failed)"
    region: np.ndarray
    "(rows,) bool: the rows at the dropped factors' surviving levels (the planned design the model sees)"
    notes: list[str]


def _model_factors(p: _Prepared) -> _ModelFactors:
    """Step 1: a factor whose runs at one level all failed is constant among the finished runs; it leaves the metric
    model with its interactions (a note says so) and the failure analysis keeps it.

    Input: the prepared table (`_ok` marks finished runs). Output: the varying and dropped factors and the rows of the
    region the model describes. Raises AnalysisError when no factor varies."""
    d = p.data
    okd = d[d["_ok"]]
    model_f = [f for f in p.factors if okd[f].nunique() == 2]
    dropped = [f for f in p.factors if f not in model_f]
    region = np.ones(len(d), dtype=bool)
    notes: list[str] = []
    for f in dropped:
        lvl = int(okd[f].iloc[0])
        other = d[f].to_numpy() != lvl
        n_fail = int((other & ~d["_ok"].to_numpy()).sum())
        notes.append(
            f"{f} is {'on' if lvl else 'off'} in every finished run ({n_fail} of {int(other.sum())} runs "
            f"with {f} {'off' if lvl else 'on'} failed): {f} and its interactions are left out of the "
            f"metric model; the failure analysis keeps it"
        )
        region &= ~other
    if not model_f:
        raise AnalysisError(f"no factor varies among the finished runs of '{p.metric}': nothing to estimate")
    return _ModelFactors(model_f, dropped, region, notes)


@dataclass(frozen=True)
class _DesignAliasing:
    """Step 2 of `fit_effects`: the planned design's cells, its alias chains and holes."""

    cells: pd.DataFrame
    "(planned cells, varying factors) 0/1 levels, one row per planned cell"
    terms: list[tuple[str, ...]]
    "mains and pairs of the varying factors"
    term_of: dict[str, tuple[str, ...]]
    rep_of: dict[str, tuple[str, int]]
    "every term -> (the representative of its alias chain, the sign of the term in that chain)"
    chains: list[list[tuple[str, int]]]
    "alias chains of two terms or more"
    reps: list[str]
    "one representative term per chain (singletons included), in model order"
    estimable: dict[str, bool]
    "representative -> estimable from the planned cells"
    inestimable: list[Inestimable]
    notes: list[str]

    @property
    def aliased_names(self) -> set[str]:
        return {n for g in self.chains for n, _ in g}


def _design_aliasing(p: _Prepared, mf: _ModelFactors, strict: bool) -> _DesignAliasing:
    """Step 2: aliasing and holes from the planned design, i.e. all rows of the region, failed runs included.
    Identical or opposite +-1 columns of the mains + pairs model form alias chains (`_alias_groups`); a
    representative whose column the planned cells cannot estimate is a hole.

    Output: the chains, their representatives and the holes (a note, or AnalysisError under `strict`)."""
    d = p.data
    model_f = mf.varying
    terms = _effect_terms(model_f, 2)
    names = [_term_name(t) for t in terms]
    design_cells = d[mf.region].drop_duplicates("_code")[model_f].reset_index(drop=True)
    groups = _alias_groups(_pm_matrix(design_cells, terms), names)
    rep_of = {n: (g[0][0], sg) for g in groups for n, sg in g}
    reps = [g[0][0] for g in groups]
    term_of = dict(zip(names, terms))
    Xrep = np.column_stack([np.ones(len(design_cells)), _pm_matrix(design_cells, [term_of[r] for r in reps])])
    design_est = dict(zip(reps, _estimable_mask(Xrep)[1:]))
    holes = [r for r in reps if not design_est[r]]
    notes: list[str] = []
    if holes:
        msg = (
            f"design has holes: {', '.join(holes)} cannot be estimated from the {len(design_cells)} cell(s) "
            f"present (of {2 ** len(model_f)}); add the missing cells"
        )
        if strict:
            raise AnalysisError(msg + " or allow inestimable effects")
        notes.append(msg)
    return _DesignAliasing(
        cells=design_cells,
        terms=terms,
        term_of=term_of,
        rep_of=rep_of,
        chains=[g for g in groups if len(g) > 1],
        reps=reps,
        estimable=design_est,
        inestimable=[Inestimable(h, "design has holes") for h in holes],
        notes=notes,
    )


@dataclass(frozen=True)
class _Aggregates:
    """Step 4 of `fit_effects`: the finished runs aggregated per (cell, seed, block) group."""

    cell_codes: np.ndarray
    seed_codes: np.ndarray
    block_codes: np.ndarray
    "the distinct finished cells (`_code`), seeds and blocks, sorted"
    g_n: np.ndarray
    "(groups,) runs per group"
    g_mean: np.ndarray
    "(groups,) mean of y per group"
    g_cell: np.ndarray
    g_seed: np.ndarray
    g_block: np.ndarray
    "(groups,) index of each group's cell, seed and block in the codes above"
    within: float
    "sum of squares of y around its group means"
    fin_cells: pd.DataFrame
    "(finished cells, varying factors) 0/1 levels, in cell_codes order"
    c_n: np.ndarray
    "(finished cells,) runs per cell"
    n_ok: float
    "finished runs"


def _aggregate(p: _Prepared, model_f: list[str]) -> _Aggregates:
    """Step 4: counts, means and within sums of squares of y per cell x seed x block of the finished runs. Every
    later step works on these aggregates (weighted least squares with the counts as weights gives the OLS fit of the
    rows), never on a rows x parameters matrix."""
    d = p.data
    okd = d[d["_ok"]]
    cell_codes, cell_idx = np.unique(okd["_code"].to_numpy(), return_inverse=True)
    seed_codes, seed_idx = np.unique(okd["_seed"].to_numpy(), return_inverse=True)
    block_codes, block_idx = np.unique(okd["_block"].to_numpy(), return_inverse=True)
    n_s, n_bl = len(seed_codes), len(block_codes)
    y = okd["_y"].to_numpy(dtype=float)
    key = (cell_idx.astype(np.int64) * n_s + seed_idx) * n_bl + block_idx
    gkeys, ginv = np.unique(key, return_inverse=True)
    g_n = np.bincount(ginv).astype(float)
    g_mean = np.bincount(ginv, weights=y) / g_n
    g_cell = (gkeys // (n_s * n_bl)).astype(np.int64)
    first = np.unique(cell_idx, return_index=True)[1]
    return _Aggregates(
        cell_codes=cell_codes,
        seed_codes=seed_codes,
        block_codes=block_codes,
        g_n=g_n,
        g_mean=g_mean,
        g_cell=g_cell,
        g_seed=(gkeys // n_bl % n_s).astype(np.int64),
        g_block=(gkeys % n_bl).astype(np.int64),
        within=float(((y - g_mean[ginv]) ** 2).sum()),
        fin_cells=okd[model_f].iloc[first].reset_index(drop=True),  # levels of each finished cell, in cell order
        c_n=np.bincount(g_cell, weights=g_n),
        n_ok=float(g_n.sum()),
    )


@dataclass(frozen=True)
class _SupportedModel:
    """Step 3 of `fit_effects`: the terms the finished cells support."""

    kept: list[str]
    "representatives fitted, in model order"
    X1c: np.ndarray
    "(finished cells, 1 + kept) the intercept and the kept +-1 columns on the finished cells"
    inestimable: list[Inestimable]
    notes: list[str]


def _supported_model(p: _Prepared, mf: _ModelFactors, da: _DesignAliasing, agg: _Aggregates) -> _SupportedModel:
    """Step 3: the largest model the finished cells support: mains, then pair chains, each representative kept when
    its column adds rank on the finished cells. The rest is reported inestimable (the fallback for fractions with a
    failed cell), naming the cells that have no finished run."""
    d = p.data
    okd = d[d["_ok"]]
    Xc_rep = _pm_matrix(agg.fin_cells, [da.term_of[r] for r in da.reps])
    kept: list[str] = []
    cols = [np.ones(len(agg.fin_cells))]
    rank = 1
    lost_cells = sorted(set(d.loc[mf.region & ~d["_ok"].to_numpy(), "_combo"]) - set(okd["_combo"]))
    inestimable: list[Inestimable] = []
    fallback: list[str] = []
    for j, r in enumerate(da.reps):
        if not da.estimable[r]:
            continue
        trial = np.column_stack([*cols, Xc_rep[:, j]])
        if np.linalg.matrix_rank(trial) > rank:
            cols.append(Xc_rep[:, j])
            rank += 1
            kept.append(r)
        else:
            label = next((_alias_label(g) for g in da.chains if g[0][0] == r), r)
            why = (
                ("no finished runs in cell(s) " + ", ".join(lost_cells)) if lost_cells else "not enough finished cells"
            )
            inestimable.append(Inestimable(r, why))
            fallback.append(label)
    notes = []
    if fallback:
        notes.append(
            f"inestimable because runs failed: {', '.join(fallback)}; the model keeps what the finished "
            f"cells support (see the failure analysis)"
        )
    return _SupportedModel(kept, np.column_stack(cols), inestimable, notes)


@dataclass(frozen=True)
class _Nuisance:
    """Step 5 of `fit_effects`: the additive nuisance terms kept (seed block, block column)."""

    seed_block: bool
    block: bool
    groups: list[np.ndarray]
    "(groups,) index arrays of the kept nuisance terms: the seed, then the block"
    rank: int
    "rank of the nuisance part of the reduced model (the seed and block means, or the intercept)"
    rank_full: int
    "rank of the full model: one mean per cell plus the nuisance terms"
    notes: list[str]


def _keep_seed_block(p: _Prepared, o: Options, agg: _Aggregates) -> tuple[bool, list[str]]:
    """Step 5a: the seed block `C(seed)` is kept only when the cell x seed layout is connected (`_components`: a
    seed effect then costs the cell means no rank) and it leaves at least one error degree of freedom."""
    n_seeds = len(agg.seed_codes)
    if not (o.seed_block and p.has_seed and n_seeds > 1):
        return False, []
    if _components(agg.g_cell, agg.g_seed) > 1:
        return False, [
            (
                "seed block dropped: the cell x seed layout is not connected (some cells ran on seeds no "
                "other cell used), so a seed effect would absorb those cells' means"
            )
        ]
    if agg.n_ok - (len(agg.cell_codes) + n_seeds - 1) >= 1:
        return True, []
    return False, ["seed block dropped: it would leave no error degrees of freedom"]


def _keep_block(p: _Prepared, agg: _Aggregates, sm: _SupportedModel, seed_block: bool) -> tuple[bool, int, list[str]]:
    """Step 5b: the block term `C(block)` (e.g. the halves of a fold-over), additive, is kept when no fitted term is
    constant within the blocks (confounded: its column vanishes once the nuisance means are absorbed) and it leaves
    an error estimate. Returns (kept, rank the block and seed dummies add to the cell means, notes)."""
    n_seeds, n_bl = len(agg.seed_codes), len(agg.block_codes)
    g_n, g_seed, g_block = agg.g_n, agg.g_seed, agg.g_block
    nuisance = [g_seed] if seed_block else []
    sw0 = np.sqrt(g_n)
    Xk = sm.X1c[agg.g_cell][:, 1:]
    Xa = _absorb(Xk, g_n, [*nuisance, g_block])
    lost = [
        r
        for j, r in enumerate(sm.kept)
        if np.linalg.norm(Xa[:, j] * sw0) < 1e-8 * max(np.linalg.norm(Xk[:, j] * sw0), 1.0)
    ]
    dummies = np.column_stack(
        [*([g_seed == s for s in range(1, n_seeds)] if seed_block else []), *[g_block == b for b in range(1, n_bl)]]
    ).astype(float)
    r_extra = int(np.linalg.matrix_rank(_absorb(dummies, g_n, [agg.g_cell]) * sw0[:, None]))
    rank_cells = len(agg.cell_codes)
    if sm.kept and (lost or np.linalg.matrix_rank(Xa * sw0[:, None]) < len(sm.kept)):
        return (
            False,
            r_extra,
            [
                (
                    f"block term ({p.block_col}) dropped: it is confounded with "
                    f"{', '.join(lost) or 'a combination of the fitted effects'} (constant within each "
                    "block), so a block effect cannot be told apart from them"
                )
            ],
        )
    if agg.n_ok - (rank_cells + r_extra) < 1 and agg.n_ok > rank_cells:
        return False, r_extra, [f"block term ({p.block_col}) dropped: it would leave no error degrees of freedom"]
    return True, r_extra, []


def _nuisance_terms(p: _Prepared, o: Options, agg: _Aggregates, sm: _SupportedModel) -> _Nuisance:
    """Step 5: the seed block (5a), then the block column (5b), and the ranks they give the full and the reduced
    model (the seed and block means share one intercept per connected component of the seed x block layout)."""
    n_seeds, n_bl, rank_cells = len(agg.seed_codes), len(agg.block_codes), len(agg.cell_codes)
    seed_block, notes = _keep_seed_block(p, o, agg)
    groups = [agg.g_seed] if seed_block else []
    rank = n_seeds if seed_block else 1  # seed means, or the intercept
    rank_full = rank_cells + (n_seeds - 1 if seed_block else 0)
    block = False
    if p.block_col and n_bl > 1:
        block, r_extra, block_notes = _keep_block(p, agg, sm, seed_block)
        notes = [*notes, *block_notes]
        if block:
            rank_full = rank_cells + r_extra
            rank = (n_seeds + n_bl - _components(agg.g_seed, agg.g_block)) if seed_block else n_bl
            groups = [*groups, agg.g_block]
    return _Nuisance(seed_block, block, groups, rank, rank_full, notes)


@dataclass(frozen=True)
class _LeastSquares:
    """Step 6a of `fit_effects`: the weighted least-squares fit of the reduced model and the pure error."""

    beta: np.ndarray
    "(1 + kept,) coefficients on the +-1 columns (the intercept slot is 0 when nuisance means absorb it)"
    cov: np.ndarray | None
    "covariance of beta from the pure error, None without one"
    has_error: bool
    df_pure: float
    mse: float
    "pure-error mean square, NaN without an error estimate"
    lack_of_fit: dict | None
    Xg: np.ndarray
    "(groups, 1 + kept) the model columns per group"


def _least_squares(agg: _Aggregates, sm: _SupportedModel, nu: _Nuisance) -> _LeastSquares:
    """Step 6a: pure error from the full model (one mean per cell [+ seed] [+ block]) plus the spread within groups;
    the reduced model (kept terms [+ seed] [+ block]) by weighted least squares on the group means after absorbing
    the nuisance means from y and X (Frisch-Waugh-Lovell); the lack-of-fit F test of the reduced model against pure
    error (Montgomery, *Design and Analysis of Experiments*, ch. 6)."""
    g_n, g_mean, nuisance = agg.g_n, agg.g_mean, nu.groups
    rss_full = agg.within + float((g_n * _absorb(g_mean, g_n, [agg.g_cell, *nuisance]) ** 2).sum())
    df_pure = agg.n_ok - nu.rank_full
    Xg = sm.X1c[agg.g_cell]
    if nuisance:
        yt, Xt = _absorb(g_mean, g_n, nuisance), _absorb(Xg[:, 1:], g_n, nuisance)
        Xt = np.column_stack([np.zeros(len(Xt)), Xt])  # the intercept is absorbed by the seed / block means
    else:
        yt, Xt = g_mean, Xg
    sw = np.sqrt(g_n)
    XtW = Xt * sw[:, None]
    act = slice(1, None) if nuisance else slice(0, None)
    beta_a, *_ = np.linalg.lstsq(XtW[:, act], yt * sw, rcond=None)
    beta = np.zeros(Xt.shape[1])
    beta[act] = beta_a
    resid = yt - Xt @ beta
    rss_red = agg.within + float((g_n * resid**2).sum())
    df_red = agg.n_ok - (len(sm.kept) + nu.rank)
    has_error = df_pure >= 1 and rss_full >= 0
    mse = rss_full / df_pure if has_error else float("nan")
    lack_of_fit = None
    cov = None
    if has_error:
        df_lof = df_red - df_pure
        if df_lof >= 1:
            ss_lof = max(rss_red - rss_full, 0.0)
            fstat = (ss_lof / df_lof) / mse if mse > 0 else float("inf")
            lack_of_fit = {
                "ss": _f(ss_lof),
                "df": int(df_lof),
                "f": _f(fstat),
                "p": _f(stats.f.sf(fstat, df_lof, df_pure)),
                "pure_error_ss": _f(rss_full),
                "pure_error_df": int(df_pure),
            }
        cov = np.zeros((Xt.shape[1], Xt.shape[1]))
        cov[act, act] = mse * np.linalg.inv(XtW[:, act].T @ XtW[:, act])
    return _LeastSquares(beta, cov, bool(has_error), df_pure, mse, lack_of_fit, Xg)


def _term_estimates(kept: list[str], ls: _LeastSquares, alpha: float) -> dict[str, dict]:
    """Step 6b: each kept representative's effect = 2 beta (+-1 coding), with its t interval and two-sided p on the
    pure-error df (no se, CI or p without replicates). Output: term -> {effect, se, ci, p}."""
    tcrit = stats.t.ppf(1 - alpha / 2, ls.df_pure) if ls.has_error else None
    term_info: dict[str, dict] = {}
    for j, r in enumerate(kept, start=1):
        info = {"effect": 2 * float(ls.beta[j]), "se": None, "ci": None, "p": None}
        if ls.has_error:
            se = 2 * math.sqrt(max(ls.cov[j, j], 0.0))
            info["se"] = se
            info["ci"] = _ci(info["effect"] - tcrit * se, info["effect"] + tcrit * se)
            tstat = (
                info["effect"] / se if se > 0 else (math.copysign(math.inf, info["effect"]) if info["effect"] else 0.0)
            )
            info["p"] = _f(2 * stats.t.sf(abs(tstat), ls.df_pure))
        term_info[r] = info
    return term_info


@dataclass(frozen=True)
class _ErrorFit:
    """Step 6 of `fit_effects`: the estimates, their error and the block term."""

    ls: _LeastSquares
    term_info: dict[str, dict]
    block: dict | None
    notes: list[str]


def _error_and_estimates(p: _Prepared, o: Options, agg: _Aggregates, sm: _SupportedModel, nu: _Nuisance) -> _ErrorFit:
    """Step 6: the least-squares fit with pure error (6a), the term estimates (6b) and the block effects
    (`_block_term`), with the notes on the error estimate, the block and a significant lack of fit."""
    ls = _least_squares(agg, sm, nu)
    notes: list[str] = []
    if not ls.has_error:
        notes.append(
            "unreplicated design (one finished run per cell): no error estimate from replicates, so no "
            "t intervals or p-values; Lenth's pseudo standard error is used where the design allows; "
            "run more seeds to confirm"
        )
    elif nu.seed_block:
        notes.append(f"OLS with a seed block (C(seed)), pure error df = {int(ls.df_pure)}")
    block_codes = agg.block_codes
    block_fit = (
        _block_term(
            p.block_col,
            block_codes,
            agg.g_block,
            agg.g_n,
            agg.g_mean,
            ls.Xg,
            nu.groups[:-1],
            ls.mse,
            ls.df_pure if ls.has_error else None,
            o.alpha,
        )
        if nu.block
        else None
    )
    if block_fit:
        notes.append(
            f"additive block term C({p.block_col}) ({len(block_codes)} blocks: {', '.join(block_codes)}); "
            + "; ".join(
                f"block {b} - block {block_codes[0]} = {e['estimate']:.3g}"
                + (f" [{e['ci'][0]:.3g}, {e['ci'][1]:.3g}]" if e["ci"] else "")
                for b, e in block_fit["effects"].items()
            )
            + " (metric scale); cell means, dividends and Shapley values are not adjusted for it"
        )
    lof = ls.lack_of_fit
    if sm.kept and lof and lof["p"] is not None and lof["p"] < o.alpha:
        f_txt = "inf (no pure error)" if lof["f"] is None else f"{lof['f']:.3g}"
        notes.append(
            f"lack of fit of the mains + pairs model (F = {f_txt}, p = "
            f"{lof['p']:.2g}): higher-order interactions matter; read the pair effects with care"
        )
    return _ErrorFit(ls, _term_estimates(sm.kept, ls, o.alpha), block_fit, notes)


def _partial_aliasing(
    mf: _ModelFactors, da: _DesignAliasing, agg: _Aggregates, sm: _SupportedModel, nu: _Nuisance
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Step 7: the alias matrix of the fitted model against the omitted interactions (`partial_aliases`), on the
    finished cells, each once, whatever made a cell missing (failed, absent from the table, excluded by a
    constraint); when the block term is fitted, on each finished (cell, block) once with the block dummies in the
    fitted model. Output: fitted term -> {omitted term: coefficient}, and its note."""
    fin_cells, kept = agg.fin_cells, sm.kept
    chained = {n for r in kept for n, (rr, _) in da.rep_of.items() if rr == r}
    if nu.block:  # each (cell, block) once, and the block dummies
        rows = np.unique(np.column_stack([agg.g_cell, agg.g_block]), axis=0)
        row_cell, extra = rows[:, 0], [(rows[:, 1] == b).astype(float) for b in range(1, len(agg.block_codes))]
    else:
        row_cell, extra = np.arange(len(fin_cells)), []
    levels = fin_cells.iloc[row_cell].reset_index(drop=True)
    partial = partial_aliases(levels, [da.term_of[r] for r in kept], chained, extra)
    notes = []
    if partial:
        notes.append(
            "partially aliased (missing or failed cells): "
            + "; ".join(f"{r} with {', '.join(list(h)[:4])}{' ...' if len(h) > 4 else ''}" for r, h in partial.items())
            + ": these estimates are biased by the omitted interactions and no pair among them is flagged"
        )
    return partial, notes


def _lenth_screen(
    p: _Prepared, o: Options, mf: _ModelFactors, da: _DesignAliasing, agg: _Aggregates, nu: _Nuisance
) -> tuple[dict | None, list[str]]:
    """Step 6, without pure error: Lenth's pseudo standard error (`_lenth`, Lenth 1989) on the cell means, when
    every planned cell finished exactly once and no factor was dropped. With a two-level block, a note names the
    contrast the block is confounded with. Output: the `_lenth` dict (or None) and its note."""
    cells_complete = len(agg.cell_codes) == len(da.cells) and np.all(agg.c_n == 1) and not mf.dropped
    if not cells_complete:
        return None, []
    model_f, fin_cells = mf.varying, agg.fin_cells
    cm = np.bincount(agg.g_cell, weights=agg.g_n * agg.g_mean) / agg.c_n
    lenth = _lenth(fin_cells, cm, model_f, o.alpha)
    notes = []
    if lenth is not None and nu.block and len(agg.block_codes) == 2 and len(model_f) <= 10:
        # the halves are confounded with an interaction: its contrast carries the block effect too
        half = np.zeros(len(fin_cells))
        half[agg.g_cell] = 2.0 * agg.g_block - 1.0
        same = [
            _term_name(t)
            for t in _all_terms(model_f, len(model_f))
            if len(t) > 1 and abs(float(_pm_matrix(fin_cells, [t])[:, 0] @ half)) == len(half)
        ]
        if same:
            notes.append(
                f"Lenth's contrast {same[0]} is confounded with the block ({p.block_col}): it "
                f"carries the difference between the blocks too"
            )
    return lenth, notes


@dataclass(frozen=True)
class _NamedEffects:
    """The estimates under every effect's own name (what `Fit` reports)."""

    main_effects: dict[str, float | None]
    interactions: dict[str, float | None]
    ci: dict[str, list | None]
    p: dict[str, float | None]
    clean_pairs: set[str]
    aliased: list[AliasChain]


def _named_effects(
    factors: list[str], da: _DesignAliasing, term_info: dict[str, dict], partial: dict[str, dict[str, float]]
) -> _NamedEffects:
    """Every main effect and pair under its own name (None where not estimated): a term that represents its chain
    carries the estimate; a main effect aliased with interactions (resolution III) is reported with its chain
    (tagged); an aliased pair is never a clean synergy. Also the alias chains with their estimates."""
    main_effects: dict[str, float | None] = {f: None for f in factors}
    interactions: dict[str, float | None] = {_term_name(t): None for t in _effect_terms(factors, 2) if len(t) == 2}
    ci: dict[str, list | None] = {}
    pvals: dict[str, float | None] = {}
    clean_pairs = set()
    aliased_names = da.aliased_names
    for t in da.terms:
        n = _term_name(t)
        rep, _ = da.rep_of[n]
        info = term_info.get(rep)
        if len(t) == 1:
            if rep == n and info is not None:
                main_effects[n] = _f(info["effect"])
                ci[n] = info["ci"]
                pvals[n] = info["p"]
        elif rep == n and n not in aliased_names and info is not None:
            interactions[n] = _f(info["effect"])
            ci[n] = info["ci"]
            pvals[n] = info["p"]
            if n not in partial:
                clean_pairs.add(n)
    aliased = []
    for g in da.chains:
        info = term_info.get(g[0][0])
        aliased.append(
            AliasChain(
                effects=[n for n, _ in g],
                signs=[sg for _, sg in g],
                label=_alias_label(g),
                estimate=_f(info["effect"]) if info else None,
                ci=info["ci"] if info else None,
            )
        )
    return _NamedEffects(main_effects, interactions, ci, pvals, clean_pairs, aliased)


def fit_effects(p: _Prepared, o: Options) -> Fit:
    """Phase 1: the metric model on the finished runs.

    1. Factors constant among finished runs (a technique whose runs all failed) leave the metric model with their
       interactions; the failure analysis keeps them (`_model_factors`).
    2. Aliasing from the planned design (all rows, failed included): identical / opposite +-1 columns form chains
       (`_design_aliasing`).
    3. The largest model the finished cells support: mains, then pair chains, each kept when it adds rank; the rest
       is reported inestimable (fallback for fractions with a failed cell) (`_supported_model`).
    4. Runs are aggregated per cell and seed first (counts, means, within sums of squares); everything below works on
       those aggregates, never on a rows x parameters matrix (`_aggregate`).
    5. Seed block: kept only when the cell x seed layout is connected (so it costs the cell means no rank) and leaves
       an error estimate; otherwise dropped with a note (`_nuisance_terms`, with the block column).
    6. Error: pure error, from the full model (one mean per cell, + seed block); the mains + pairs model is tested
       for lack of fit against it (Montgomery ch. 6) (`_error_and_estimates`). No pure error: Lenth's PSE when the
       design is orthogonal (`_lenth_screen`).
    7. Alias matrix A = (X1'X1)^-1 X1'X2 of the fitted model (the block included when fitted) against the omitted
       interactions on the finished cells, whatever made a cell missing (failed, absent, excluded): an entry that is
       not a complete alias marks a partially aliased effect, never tested. Omitted terms containing a pair that
       never finished together are not counted (the pair is infeasible) (`_partial_aliasing`)."""
    mf = _model_factors(p)
    da = _design_aliasing(p, mf, o.strict)
    agg = _aggregate(p, mf.varying)
    sm = _supported_model(p, mf, da, agg)
    nu = _nuisance_terms(p, o, agg, sm)
    er = _error_and_estimates(p, o, agg, sm, nu)
    partial, partial_notes = _partial_aliasing(mf, da, agg, sm, nu)
    lenth, lenth_notes = _lenth_screen(p, o, mf, da, agg, nu) if not er.ls.has_error else (None, [])
    named = _named_effects(p.factors, da, er.term_info, partial)
    has_error, df_pure = er.ls.has_error, er.ls.df_pure
    dropped = [
        Inestimable(f, "constant among finished runs (every run with the other level failed)") for f in mf.dropped
    ]
    return Fit(
        n_cells=len(da.cells),
        replicated=has_error,
        error_df=_f(df_pure) if has_error else None,
        main_effects=named.main_effects,
        interactions=named.interactions,
        ci={n: c for n, c in named.ci.items() if c is not None} if has_error else {},
        p={n: q for n, q in named.p.items() if q is not None},
        aliased=named.aliased,
        inestimable=[*da.inestimable, *sm.inestimable, *dropped],
        notes=[*mf.notes, *da.notes, *sm.notes, *nu.notes, *er.notes, *partial_notes, *lenth_notes],
        lack_of_fit=er.ls.lack_of_fit,
        lenth=lenth,
        aliased_effects={n: _alias_label(g) for g in da.chains for n, _ in g},
        partial_aliases=partial,
        dropped_factors=mf.dropped,
        seed_block=nu.seed_block,
        block=er.block,
        sign=p.sign,
        df_resid=float(df_pure),
        se={r: i["se"] for r, i in er.term_info.items()},
        clean_pairs=frozenset(named.clean_pairs),
        estimated=frozenset(sm.kept),
        mse=_f(er.ls.mse),
    )


def pair_synergies(fit: Fit, o: Options) -> Pairs:
    """Phase 2: S_ij = direction * 2 INT_ij, intervals and flags that agree.

    Intervals: simultaneous over the m clean pairs (Bonferroni: t at 1 - alpha/(2m), pure-error df), so the family
    of printed intervals covers the m true synergies with probability >= 1 - alpha. Decisions use the same
    intervals: a pair is significant when its interval excludes 0, and flagged antagonistic when its upper bound is
    below -threshold (equivalently, the one-sided p of H0: S >= -threshold is below alpha / (2m); that Bonferroni
    p is the flag's p_adj). `p_adj` (two-sided, `correction` across the clean pairs: Holm by default) is never
    larger than the Bonferroni p, so every starred pair also has p_adj < alpha. Partially aliased pairs (failed or
    missing cells) are estimated but never tested or flagged."""
    notes: list[str] = []
    synergy: dict[str, float | None] = {}
    synergy_ci: dict[str, list | None] = {}
    clean = [n for n in fit.interactions if n in fit.clean_pairs and fit.interactions[n] is not None]
    m = len(clean)
    tcrit = stats.t.ppf(1 - o.alpha / (2 * m), fit.df_resid) if (fit.has_error and m) else None
    for n, v in fit.interactions.items():
        synergy[n] = _f(fit.sign * 2 * v) if v is not None else None
        se = fit.se.get(n)
        if n in clean and tcrit is not None and se is not None:
            s = synergy[n]
            synergy_ci[n] = _ci(s - tcrit * 2 * se, s + tcrit * 2 * se)
    pair_ps = {n: fit.p[n] for n in clean if fit.p.get(n) is not None}
    p_adj: dict[str, float | None] = {n: None for n in synergy}
    if pair_ps:
        adj = _adjust(list(pair_ps.values()), o.correction, o.alpha)
        p_adj.update({n: _f(v) for n, v in zip(pair_ps, adj)})
    significant = [n for n, c in synergy_ci.items() if c and (c[0] > 0 or c[1] < 0)]
    antagonism: list[Flag] = []
    if fit.has_error:
        for n in clean:
            s, se, c = synergy[n], fit.se.get(n), synergy_ci.get(n)
            if c is None or se is None:
                continue
            se_s = 2 * se
            tstat = (s + o.threshold) / se_s if se_s > 0 else (-np.inf if s + o.threshold < 0 else np.inf)
            p_one = float(stats.t.cdf(tstat, fit.df_resid))
            if c[1] < -o.threshold and s < -o.threshold:
                antagonism.append(
                    Flag(
                        pair=n,
                        factors=n.split(":"),
                        kind="antagonism",
                        estimate=s,
                        ci=c,
                        p=_f(p_one),
                        p_adj=_f(min(1.0, 2 * m * p_one)),
                        threshold=o.threshold,
                        df=_f(fit.df_resid),
                        counts=None,
                    )
                )
    else:
        notes.append("antagonism cannot be tested without replicates; failure interactions are still tested")
    partial_pairs = [n for n in synergy if synergy[n] is not None and n not in fit.clean_pairs]
    strongest = None
    pos = {n: s for n, s in synergy.items() if s is not None and n in fit.clean_pairs}
    if pos:
        n = max(pos, key=lambda q: pos[q])
        strongest = StrongestSynergy(pair=n, estimate=pos[n], ci=synergy_ci.get(n), p_adj=p_adj.get(n))
    kind = (
        (
            f"simultaneous {int(round(100 * (1 - o.alpha)))}% over {m} pair(s) (Bonferroni t, df = "
            f"{_num_s(fit.df_resid)}), synergy units (S = 2 INT, oriented gain)"
        )
        if synergy_ci
        else None
    )
    return Pairs(
        synergy=synergy,
        synergy_ci={n: c for n, c in synergy_ci.items() if c is not None},
        p_adj=p_adj,
        antagonism=antagonism,
        strongest=strongest,
        notes=notes,
        significant=significant,
        partially_aliased=partial_pairs,
        interval=kind,
        n_tested=m,
    )


def _num_s(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def failure_interactions(p: _Prepared, o: Options) -> Failures:
    """Phase 3: pairs whose joint runs fail beyond what the two techniques' own failures predict (`_failure_tests`)."""
    flags, tests = _failure_tests(p, o.alpha)

    def typed(t: dict) -> FailureTest:
        if "factors" not in t:  # no run failed: nothing was tested
            return FailureTest(pair=t["pair"], p=t["p"], p_adj=t["p_adj"], counts=t["counts"])
        return FailureTest(
            pair=t["pair"],
            p=t["p"],
            p_adj=t["p_adj"],
            counts=t["counts"],
            factors=t["factors"],
            estimate=t["estimate"],
            statuses=t["statuses"],
            p_excess=t["p_excess"],
            p_interaction=t["p_interaction"],
        )

    return Failures(tests=[typed(t) for t in tests], flagged=[typed(t) for t in flags])


#: the bootstrap over seeds is kept only when every cell has at least this many finished seeds (units): with fewer,
#: resampling n values underestimates the variance by (n-1)/n and the intervals under-cover (89-91% at nominal 95%
#: with 3 seeds); at 20 the simulated coverage is within a point of nominal (tests/test_analysis_calibration.py).
MIN_BOOTSTRAP_UNITS = 20


def bootstrap_cis(p: _Prepared, fit: Fit, pairs: Pairs, o: Options) -> Bootstrap:
    """Seed bootstrap within cells of the cleanly estimated effects; kept only where it is calibrated (every cell has
    >= MIN_BOOTSTRAP_UNITS finished seeds). Units: effects on the metric scale (ME, and INT = S/2 before orientation,
    the units of `ci`, not of `synergy_ci`)."""
    if not (o.bootstrap and fit.replicated):
        return Bootstrap(ci={}, notes=[])
    if fit.dropped_factors:
        return Bootstrap(ci={}, notes=["bootstrap skipped: a factor is constant among finished runs"])
    terms = _effect_terms(p.factors, 2)
    est_mask = np.array([_term_name(t) in fit.estimated and _term_name(t) not in fit.partial_aliases for t in terms])
    ci_boot, bnote = _bootstrap(p, terms, est_mask, 1 - o.alpha, o.n_resamples, o.bootstrap_method, o.random_state)
    if ci_boot:
        for n in list(ci_boot):
            if n in pairs.synergy and n not in fit.clean_pairs:
                ci_boot.pop(n)
    return Bootstrap(ci=ci_boot or {}, notes=[bnote] if bnote else [])


def attribute(p: _Prepared, o: Options, fit: Fit | None = None) -> Attribution:
    """Phase 4: cell means on oriented gains -> dividends, leave-one-out, exact Shapley values (full factorials),
    the cumulative ladder and the best cell with the cells not distinguishable from it.

    Best: the largest mean gain (ties to the smaller set). With a pure-error estimate (`fit.mse`, `fit.df_resid`),
    each other cell is compared with the best by a one-sided t test of mean difference (SE from the pure error
    and the two cells' run counts), Bonferroni over the comparisons (a multiple comparison with the best, Hsu 1984,
    in its simple conservative form); cells not rejected at alpha are "not distinguishable from the best"."""
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
    missing_cells = (
        [s for s in (frozenset(c) for r in range(k + 1) for c in itertools.combinations(factors, r)) if s not in v]
        if k <= 12
        else None
    )
    if k > 12:
        notes.append("Shapley values skipped: more than 12 factors")
    elif missing_cells:
        shown = ", ".join(combo_label(f for f in factors if f in s) for s in missing_cells[:5])
        notes.append(
            f"Shapley values need every cell of the full factorial; missing or all-failed: {shown}"
            + (" ..." if len(missing_cells) > 5 else "")
        )
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
        indist, rule = None, "no error estimate (one run per cell): the best cell is a point estimate"
        if fit is not None and fit.mse is not None and fit.df_resid >= 1:
            others = [c for c in finished_cells if c["combo"] != r["combo"]]
            g_best = r["gain"] if not p.log else r["gain"]
            indist = []
            for c in others:
                se = math.sqrt(fit.mse * (1 / r["n_finished"] + 1 / c["n_finished"]))
                diff = g_best - c["gain"]
                pv = float(stats.t.sf(diff / se, fit.df_resid)) if se > 0 else (0.0 if diff > 0 else 1.0)
                if min(1.0, pv * max(len(others), 1)) >= o.alpha:
                    indist.append(c["combo"])
            rule = (
                f"one-sided t tests of (best - cell) with the pure-error SE (df = {_num_s(fit.df_resid)}), "
                f"Bonferroni over {len(others)} comparisons at alpha = {o.alpha}"
            )
        best = Best(
            cell=r["cell"],
            combo=r["combo"],
            on=r["on"],
            mean=r["mean"],
            sd=r["sd"],
            gain=r["gain"],
            n_finished=int(r["n_finished"]),
            n=int(r["n"]),
            indistinguishable=indist,
            rule=rule,
        )
    return Attribution(
        cells=[Cell(**{k2: v2 for k2, v2 in r.items() if k2 != "key"}) for r in cells],
        best=best,
        dividends=dividends,
        dividends_full=dividends_full,
        loo=loo,
        shapley=shapley,
        ladder=[LadderRow(**r) for r in ladder] if ladder is not None else None,
        ladder_kind=ladder_kind,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------------------------
# the analysis
# --------------------------------------------------------------------------------------------------------------------
def analyze(
    table: pd.DataFrame,
    factors: Sequence[str],
    metric: str,
    direction: str = "min",
    options: Options | None = None,
    **overrides: Any,
) -> Analysis:
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
    p = prepare(
        table,
        factors,
        metric,
        direction,
        seed_col=o.seed_col,
        status_col=o.status_col,
        reason_col=o.reason_col,
        log=o.log,
        block_col=o.block_col,
        cause_col=o.cause_col,
    )
    fit = fit_effects(p, o)
    pairs = pair_synergies(fit, o)
    failures = failure_interactions(p, o)
    boot = bootstrap_cis(p, fit, pairs, o)
    att = attribute(p, o, fit)
    d = p.data
    return Analysis(
        metric=metric,
        direction="max" if p.sign > 0 else "min",
        scale="log" if o.log else "linear",
        factors=list(p.factors),
        n_runs=int(len(d)),
        n_finished=int(d["_ok"].sum()),
        n_failed=int((~d["_ok"]).sum()),
        alpha=o.alpha,
        correction=o.correction,
        threshold=o.threshold,
        fit=fit,
        pairs=pairs,
        failures=failures,
        bootstrap=boot,
        attribution=att,
        notes=[*p.notes, *fit.notes, *pairs.notes, *boot.notes, *att.notes],
        n_excluded=p.n_excluded,
        n_infrastructure=p.n_infrastructure,
        family=(
            f"{pairs.n_tested} pair test(s) of this metric: simultaneous (Bonferroni) intervals decide; "
            f"p_adj by {o.correction}"
        )
        if pairs.n_tested
        else "",
    )


def analyze_study(
    results: StudyResults, *, alpha: float = 0.05, threshold: float = 0.0, bootstrap: bool = True
) -> dict[str, Analysis | AnalysisFailure]:
    """`analyze` for the primary metric and every other metric of a study (log scale per the metric registry);
    a metric that cannot be analysed gets an AnalysisFailure with the reason.

    Multiplicity across metrics: the primary metric is confirmatory (its pair family as in `pair_synergies`); every
    other metric is exploratory, and their pair tests form one family controlled by Benjamini-Hochberg (FDR at
    alpha) over all secondary metrics together: `p_adj`, `significant_pairs` and antagonism flags of a secondary
    metric come from that pooled correction, and its `synergy_ci` are the family's FCR-adjusted intervals
    (Benjamini & Yekutieli 2005, `bh_fcr_intervals`), which exclude 0 exactly for the selected pairs (`role`,
    `family` and `intervals.synergy_ci` say so in the JSON)."""
    out: dict[str, Analysis | AnalysisFailure] = {}
    metrics = {
        results.metric: results.direction,
        **{m: d for m, d in results.other_metrics.items() if m != results.metric},
    }
    for m, d in metrics.items():
        wall = m in metric_registry.WALL_CLOCK
        bench = wall and results.bench is not None and m in results.bench.columns
        try:
            a = analyze(
                results.bench if bench else results.table,
                results.factors,
                m,
                d,
                log=metric_registry.is_log(m),
                alpha=alpha,
                threshold=threshold if m == results.metric else 0.0,
                bootstrap=bootstrap,
                ladder_order=results.ladder_order,
                strict=False,
            )
        except AnalysisError as e:
            out[m] = AnalysisFailure(metric=m, direction=d, error=str(e))
            continue
        if bench:
            a = replace(a, notes=[BENCH_NOTE, *a.notes])
        elif wall and contended(results.table):
            a = without_significance(a, CONTENTION_NOTE)
        out[m] = a
    return _exploratory_family(out, results.metric, alpha)


@dataclass(frozen=True)
class FCRFamily:
    """One Benjamini-Hochberg family of two-sided t tests with its FCR-adjusted intervals (`bh_fcr_intervals`).
    Lists are in the order of the tests given."""

    p: list[float]
    "two-sided t p-values, 2 P(T_df > |estimate / se|), from the same estimate, se and df as `ci`"
    q: list[float]
    "Benjamini-Hochberg adjusted p-values (statsmodels multipletests, fdr_bh)"
    selected: list[bool]
    "q < alpha: the tests the family calls significant"
    ci: list[list[float] | None]
    "estimate -+ t_{df, 1 - (1 - level) / 2} se: the FCR-adjusted intervals"
    alpha: float
    "the FDR level of the selection and the FCR bound of the selected intervals"
    level: float
    "marginal confidence level of every interval: 1 - R alpha / m (R = 0: 1 - alpha / m)"

    @property
    def n_selected(self) -> int:
        return sum(self.selected)


def bh_fcr_intervals(estimates: Sequence[float], ses: Sequence[float], dfs: Sequence[float], alpha: float) -> FCRFamily:
    """Benjamini-Hochberg selection of m two-sided t tests and their false-coverage-rate adjusted intervals
    (Benjamini & Yekutieli 2005, "False discovery rate-adjusted multiple confidence intervals for selected
    parameters", JASA 100:71-81, Definition 1): with R of the m tests selected by BH at level alpha, each interval
    is the marginal t interval at level 1 - R alpha / m (with R = 0, 1 - alpha / m: Bonferroni's level), so the
    expected share of selected intervals that miss their parameter is at most alpha (independent or positively
    dependent tests).

    Inputs: one estimate, standard error (> 0, or 0 for an exact value) and t df (>= 1) per test, any units; every
    test's p-value and interval come from the same three numbers, so a selected test's interval excludes 0 and a
    test not selected has one that covers 0 (selected <=> p < R alpha / m <=> |t| > t_{df, 1 - R alpha / (2 m)};
    BH with a strict q < alpha selects exactly the tests with p < R alpha / m). Empty input: an empty family."""
    est = np.asarray(estimates, dtype=float)
    se = np.asarray(ses, dtype=float)
    df = np.asarray(dfs, dtype=float)
    m = est.size
    if m == 0:
        return FCRFamily(p=[], q=[], selected=[], ci=[], alpha=alpha, level=1 - alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, est / np.where(se > 0, se, 1.0), np.where(est == 0, 0.0, np.copysign(np.inf, est)))
    p = np.minimum(1.0, 2 * stats.t.sf(np.abs(t), df))
    q = np.asarray(_adjust(p.tolist(), "fdr_bh", alpha))
    selected = q < alpha
    r = int(selected.sum())
    tail = max(r, 1) * alpha / m  # 1 - level
    tcrit = stats.t.isf(tail / 2, df)
    ci = [_ci(e - c * s, e + c * s) for e, c, s in zip(est, tcrit, se)]
    return FCRFamily(p=p.tolist(), q=q.tolist(), selected=selected.tolist(), ci=ci, alpha=alpha, level=float(1 - tail))


def level_pct(level: float) -> str:
    """A confidence level in percent with two significant digits of its complement, so that 1 - alpha / m never
    reads as 100%: 0.95 -> "95%", 0.979167 -> "97.9%", 0.998333 -> "99.83%", 0.9998333 -> "99.983%"."""
    x = 100 * level
    if abs(x - round(x)) < 1e-9:
        return f"{round(x)}%"
    miss = 100 - x
    dec = max(1, math.ceil(-math.log10(miss)) + 1) if miss > 0 else 1
    return f"{x:.{dec}f}%"


def _exploratory_family(
    out: dict[str, Analysis | AnalysisFailure], primary: str, alpha: float
) -> dict[str, Analysis | AnalysisFailure]:
    """Re-decide the pair tests of the secondary metrics as one Benjamini-Hochberg family (see `analyze_study`), with
    the FCR-adjusted intervals of that family in place of the per-metric simultaneous ones (`bh_fcr_intervals`):
    the decision (q < alpha, a star on the page), the interval beside it and the p-value fed to BH come from the
    same estimate, standard error and df, so they agree. Antagonism on a secondary metric (threshold 0) is a
    selected pair with S < 0, i.e. an FCR interval entirely below 0 (the sign of a selected interval, a decision of
    the same family, not a second one-sided family); its p is the one-sided p of H0: S >= 0, its p_adj the pair's q."""
    tests: list[tuple[str, str, float, float, float]] = []  # metric, pair, S, se(S), df
    for m, a in out.items():
        if m == primary or not isinstance(a, Analysis):
            continue
        for n in a.pairs.synergy:
            s, se = a.pairs.synergy[n], a.fit.se.get(n)
            # the pairs a metric tests (clean, with a pure-error p); a contended clock has its p removed
            if n in a.fit.clean_pairs and a.fit.p.get(n) is not None and s is not None and se is not None:
                tests.append((m, n, s, 2 * se, a.fit.df_resid))
    fam = bh_fcr_intervals([t[2] for t in tests], [t[3] for t in tests], [t[4] for t in tests], alpha)
    by = {(m, n): i for i, (m, n, *_) in enumerate(tests)}
    n_sec = sum(1 for m, a in out.items() if m != primary and isinstance(a, Analysis))
    family = (
        f"exploratory: Benjamini-Hochberg (FDR {alpha}) over all {len(tests)} pair test(s) of the {n_sec} "
        "secondary metric(s); the primary metric's pairs are the confirmatory family"
    )
    if tests:
        family += (
            f"; {fam.n_selected} selected, synergy intervals FCR-adjusted (Benjamini-Yekutieli) at marginal "
            f"level 1 - R alpha / m = {level_pct(fam.level)} (R = {fam.n_selected}, m = {len(tests)})"
        )
    for m, a in list(out.items()):
        if m == primary:
            if isinstance(a, Analysis):
                out[m] = replace(a, role="confirmatory")
            continue
        if not isinstance(a, Analysis):
            continue
        mine = {n: by[(m, n)] for n in a.pairs.synergy if (m, n) in by}
        p_adj = {n: (_f(fam.q[mine[n]]) if n in mine else None) for n in a.pairs.synergy}
        sig = [n for n, i in mine.items() if fam.selected[i]]
        ci = {**a.pairs.synergy_ci, **{n: fam.ci[i] for n, i in mine.items() if fam.ci[i] is not None}}
        ant = []
        for n in sig:
            i, s = mine[n], a.pairs.synergy[n]
            if s < 0:
                _, _, _, se_s, df = tests[i]
                ant.append(
                    Flag(
                        pair=n,
                        factors=n.split(":"),
                        kind="antagonism",
                        estimate=s,
                        ci=ci.get(n),
                        p=_f(stats.t.cdf(s / se_s, df) if se_s > 0 else 0.0),
                        p_adj=_f(fam.q[i]),
                        threshold=0.0,
                        df=_f(df),
                        counts=None,
                    )
                )
        strongest = a.pairs.strongest
        if strongest is not None:
            strongest = replace(strongest, ci=ci.get(strongest.pair), p_adj=p_adj.get(strongest.pair))
        interval = a.pairs.interval
        fcr_level = None
        if mine:
            fcr_level = fam.level
            dfs = sorted({tests[i][4] for i in mine.values()})
            interval = (
                f"FCR-adjusted (Benjamini-Yekutieli) {level_pct(1 - alpha)} intervals for the exploratory "
                "Benjamini-Hochberg family: marginal t intervals at level 1 - R alpha / m = "
                f"{level_pct(fam.level)} (R = {fam.n_selected} of m = {len(tests)} pair tests over the secondary "
                f"metrics selected at FDR {alpha}; df = "
                f"{', '.join(_num_s(d) for d in dfs)}), synergy units (S = 2 INT, oriented gain); an interval "
                "excludes 0 exactly when its pair is selected"
            )
        pairs = replace(
            a.pairs,
            synergy_ci=ci,
            p_adj=p_adj,
            significant=sig,
            antagonism=ant,
            strongest=strongest,
            interval=interval,
            fcr_level=fcr_level,
        )
        out[m] = replace(a, pairs=pairs, role="exploratory", family=family, correction="fdr_bh")
    return out


BENCH_NOTE = (
    "measured by `srdit study bench`: one training step per cell, interleaved in one process (rounds as "
    "blocks), not the trials' wall clock"
)
CONTENTION_NOTE = (
    "measured with a clock while several trials shared the machine: the load of the neighbours is in "
    "the numbers, so no significance is claimed (run `srdit study bench` for a controlled measurement)"
)


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
