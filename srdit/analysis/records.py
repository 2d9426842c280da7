"""The records table: dashboards/RECORDS.md, one markdown row per arm (cell) of each study's primary metric."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from srdit.analysis.effects import OK_STATUSES, combo_label
from srdit.analysis.results import CRASH_CAUSE, INFRASTRUCTURE, StudyResults

__all__ = ["record_rows", "write_records"]

RECORD_HEADER = ["study", "arm", "metric", "mean ± std (n)", "p vs baseline (Welch)", "commit", "date"]


def _md_cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _parse_records(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip("|"))]
        if cells[:2] == RECORD_HEADER[:2] or len(cells) != len(RECORD_HEADER):
            continue
        rows.append(cells)
    return rows


def record_rows(res: StudyResults) -> list[list[str]]:
    """One row per arm (cell) of the primary metric: mean ± std over finished seeds and Welch's t-test p-value
    against the baseline arm (every technique off), scipy.stats.ttest_ind(equal_var=False)."""
    t = res.table
    if t.empty or res.metric not in t.columns:
        return []
    ok = pd.Series(True, index=t.index)
    if "status" in t.columns:
        ok &= t["status"].astype(str).str.lower().isin(OK_STATUSES)
    y = pd.to_numeric(t[res.metric], errors="coerce")
    ok &= np.isfinite(y)
    combos = [combo_label(f for f in res.factors if int(r[f]) == 1) for _, r in t[res.factors].iterrows()]
    t = t.assign(_combo=combos, _y=y, _ok=ok)
    base = t[(t["_combo"] == "baseline") & t["_ok"]]["_y"].to_numpy(dtype=float)
    rows = []
    groups = list(t.groupby("_combo", sort=False))
    idx = {f: i for i, f in enumerate(res.factors)}
    groups.sort(
        key=lambda kv: (
            0 if kv[0] == "baseline" else len(kv[0].split("+")),
            [idx.get(f, 0) for f in kv[0].split("+")] if kv[0] != "baseline" else [],
        )
    )
    for combo, g in groups:
        vals = g.loc[g["_ok"], "_y"].to_numpy(dtype=float)
        cell = str(g["cell"].iloc[0]) if "cell" in g.columns else combo
        arm = cell if cell == combo else f"{cell} ({combo})"
        n, n_all = len(vals), len(g)
        lost = int((g[CRASH_CAUSE].astype(str) == INFRASTRUCTURE).sum()) if CRASH_CAUSE in g.columns else 0
        gone = [f"{n_all - n - lost} failed"] if n_all - n - lost else []
        gone += [f"{lost} lost to infrastructure"] if lost else []  # not the arm's failure (srdit.runtime.worker)
        if n:
            sd = f" ± {vals.std(ddof=1):.4g}" if n > 1 else ""
            ms = f"{vals.mean():.4g}{sd} (n={n}" + "".join(f", {x}" for x in gone) + ")"
        else:
            ms = f"– (0 of {n_all} finished" + "".join(f", {x}" for x in gone) + ")"
        pv = "–"
        if combo != "baseline" and n >= 2 and len(base) >= 2:
            with np.errstate(all="ignore"):
                p = stats.ttest_ind(vals, base, equal_var=False).pvalue
            if np.isfinite(p):
                pv = f"{p:.3g}"
        arrow = "↑" if res.direction == "max" else "↓"
        rows.append([res.study, arm, f"{res.metric} {arrow}", ms, pv, (res.commit or "")[:12], res.date or ""])
    return rows


def write_records(results: StudyResults | Sequence[StudyResults], path: str | Path) -> Path:
    """Append or refresh the markdown records table at `path` (e.g. dashboards/RECORDS.md): rows of the given
    studies replace any earlier rows of the same studies; rows of other studies are kept."""
    items = [results] if isinstance(results, StudyResults) else list(results)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    old = _parse_records(p.read_text(encoding="utf-8")) if p.exists() else []
    studies = {r.study for r in items}
    rows = [r for r in old if r[0] not in studies]
    for r in items:
        rows += record_rows(r)
    lines = [
        "# srdit records",
        "",
        "Primary metric per arm: mean ± standard deviation over finished seeds; p-value of Welch's t-test "
        "against the study's baseline arm (all techniques off). Refreshed by `srdit report`.",
        "",
        "| " + " | ".join(RECORD_HEADER) + " |",
        "|" + "|".join("---" for _ in RECORD_HEADER) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p
