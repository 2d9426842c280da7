"""Reading a results table from a file (CSV, or .parquet / .json): one row per trial, or per trial and evaluated
step. `read_table` refuses what would silently change the analysis (a column named twice, text in a finished row's
metric); `cells_to_runs` turns a report's cells.csv back into runs with the same sufficient statistics.

Errors are `AnalysisError`s with a one-line message naming the file. pandas and numpy only: `srdit analyze` reads
its input with this module, and so can anyone analysing a CSV with `srdit.analysis.effects.analyze`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd

from srdit.analysis.effects import AnalysisError
from srdit.config import input_file_problem

__all__ = ["CELLS_COLUMNS", "cells_to_runs", "is_cells_table", "read_table"]


def read_table(
    path: str | Path, metric: str | None = None, status_col: str | None = "status", notes=None
) -> pd.DataFrame:
    """Read a results table; raises AnalysisError with a one-line message naming the file.

    Refused: a CSV header that names a column twice (pandas would rename the second and the analysis would read
    the first without a word), and a finished row (status in effects.OK_STATUSES, or every row when there is no
    status column) whose `metric` holds text that is not a number. The rule for a finished row with an empty or
    non-finite metric is the architecture's (a missing value means the run failed: it counts as diverged); it is
    printed to `notes` (a stream, e.g. stderr) when it applies."""
    p = Path(path)
    if not p.exists():
        raise AnalysisError(f"cannot read {p}: no such file")
    if p.is_dir():
        raise AnalysisError(f"cannot read {p}: it is a directory")
    problem = input_file_problem(p)
    if problem:
        raise AnalysisError(problem)
    try:
        if p.suffix == ".parquet":
            df = pd.read_parquet(p)
        elif p.suffix == ".json":
            df = pd.read_json(p)
        else:
            header = _csv_header(p)
            df = pd.read_csv(p)
    except pd.errors.EmptyDataError:
        raise AnalysisError(f"{p} is empty") from None
    except UnicodeDecodeError:
        raise AnalysisError(f"cannot read {p}: not a text CSV file") from None
    except (pd.errors.ParserError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AnalysisError(f"cannot read {p}: {first}") from None
    if p.suffix not in (".parquet", ".json"):
        for i, name in enumerate(header):
            if name in header[:i]:
                raise AnalysisError(
                    f"{p}: column {name!r} appears twice in the header (columns "
                    f"{header.index(name) + 1} and {i + 1}); rename or drop one"
                )
    if df.empty:
        raise AnalysisError(f"{p} has a header but no rows")
    if metric is not None and metric in df.columns:
        _check_metric(p, df, metric, status_col, notes)
    return df


def _csv_header(p: Path) -> list[str]:
    with p.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def _check_metric(p: Path, df: pd.DataFrame, metric: str, status_col: str | None, notes) -> None:
    from srdit.analysis.effects import OK_STATUSES

    if status_col and status_col in df.columns:
        finished = df[status_col].fillna("").astype(str).str.strip().str.lower().isin(OK_STATUSES)
    else:
        finished = pd.Series(True, index=df.index)
    values = pd.to_numeric(df[metric], errors="coerce")
    text = finished & df[metric].notna() & values.isna()
    if text.any():
        i = int(text.to_numpy().nonzero()[0][0])
        where = f"line {i + 2}" if p.suffix not in (".parquet", ".json") else f"row {i + 1}"
        raise AnalysisError(
            f"{p} {where}: {metric} = {df[metric].iloc[i]!r} in a finished row is not a number "
            f"({int(text.sum())} such row(s)); fix the value, or give the row the status of the "
            f"failure it records"
        )
    missing = finished & ~np.isfinite(values.astype(float))
    if missing.any() and notes is not None:
        print(
            f"note: {int(missing.sum())} finished row(s) of {p} have no finite {metric}; they count as diverged "
            f"(a missing or non-finite metric means the run failed)",
            file=notes,
        )


#: the columns of a report's cells.csv (one row per cell: `Cell.to_json()`)
CELLS_COLUMNS = frozenset({"combo", "on", "n", "n_finished", "n_failed", "failures", "mean", "sd"})


def is_cells_table(df: pd.DataFrame) -> bool:
    return CELLS_COLUMNS <= set(df.columns)


def cells_to_runs(cells: pd.DataFrame, factors: list[str], metric: str, path: str) -> pd.DataFrame:
    """Runs with the same sufficient statistics as a report's cells.csv: per cell, n_finished values with exactly
    the cell's mean and standard deviation (mean + sd * z, z standardised), plus one failed row per recorded
    failure with its status. OLS effects, pure error and tests equal those of the original runs analysed without a
    seed block (seeds are not in cells.csv)."""
    rows = []
    for r in cells.itertuples(index=False):
        try:
            on = set(json.loads(r.on)) if isinstance(r.on, str) else set(r.on)
            failures = json.loads(r.failures) if isinstance(r.failures, str) else dict(r.failures or {})
        except (ValueError, TypeError):
            raise AnalysisError(f"{path}: cell '{r.combo}' has an unreadable 'on' or 'failures' column") from None
        unknown = on - set(factors)
        if unknown:
            raise AnalysisError(f"{path}: cell '{r.combo}' turns on {sorted(unknown)}, not in --factors {factors}")
        lv = {f: int(f in on) for f in factors}
        n = int(r.n_finished)
        if n:
            z = np.zeros(n) if n == 1 else np.linspace(-1.0, 1.0, n)
            if n > 1:
                z = (z - z.mean()) / z.std(ddof=1)
            sd = float(r.sd) if n > 1 and pd.notna(r.sd) else 0.0
            rows += [{**lv, "cell": r.combo, "status": "finished", metric: float(r.mean) + sd * v} for v in z]
        for st, k in failures.items():
            rows += [{**lv, "cell": r.combo, "status": st, metric: float("nan")}] * int(k)
    if not rows:
        raise AnalysisError(f"{path} has no cells")
    return pd.DataFrame(rows)
