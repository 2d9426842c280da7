"""The study -> analysis contract: `StudyResults`, everything a study report needs (a plain dataclass the study
layer fills from MLflow, or anyone fills from a CSV), and the column names of its tables.

The study layer imports this module and nothing else of the analysis; it imports only pandas."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

__all__ = [
    "StudyResults",
    "CURVE_COLUMNS",
    "TABLE_BASE_COLUMNS",
    "CRASH_CAUSE",
    "CODE",
    "INFRASTRUCTURE",
    "PROTOCOL_COLUMNS",
    "RUN_ID",
]

CURVE_COLUMNS = ["trial", "cell", "seed", "key", "step", "value"]
"Columns of `StudyResults.curves` (one row per logged point)."
CRASH_CAUSE = "crash_cause"
"""Column of `StudyResults.table` (and tag of a trial's child run) saying why a `crashed` run crashed: CODE or
INFRASTRUCTURE; blank when not recorded (runs from before the two were told apart, a CSV without the column)."""
CODE = "code"
"""An exception raised by the training code with the run's config: it recurs when retried, so it is evidence about
the techniques (the failure analysis counts it)."""
INFRASTRUCTURE = "infrastructure"
"""A failure of what the run runs on (a lost worker or node, a missing or unreadable file, a full disk, the tracking
store, the driver's own error): it says nothing about the techniques, and the analysis leaves it out with a note."""
PROTOCOL_COLUMNS = {
    "protocol.sampler": "sampler",
    "protocol.sampling_steps": "sampling steps",
    "protocol.guidance": "guidance scale",
    "protocol.guidance_interval": "guidance interval",
    "protocol.labels": "label sampling",
    "protocol.n_samples": "samples",
    "protocol.reference": "reference statistics",
    "protocol.precision": "precision",
}
"""Optional columns of `StudyResults.table` (column -> what it is): the evaluation protocol a run's metrics were
computed under, as text (from the run's `sample` and `eval` config sections, `train.precision` and the device). Runs
whose protocols differ in any column are not comparable; blank when not recorded (a CSV without the columns)."""
RUN_ID = "run_id"
"Optional column of `StudyResults.table`: the trial's MLflow run id (the report links it, see `mlflow_ui`)."
TABLE_BASE_COLUMNS = ["trial", "cell", "seed", "status", "status_reason", CRASH_CAUSE]
"Columns every `StudyResults.table` has besides the factors and the metrics."


@dataclass
class StudyResults:
    """Everything a study report needs; one row per trial in `table`.

    Fields:
        study: study name (also the dashboard folder name).
        design: design name, e.g. "full", "frac(res=5)", "ladder", "loo".
        factors: technique names; each is a 0/1 column of `table`.
        metric: primary metric column (e.g. "fd").
        direction: "min" or "max" for the primary metric.
        other_metrics: other metric columns -> direction (log-scale metrics of `srdit.metric_registry`, e.g.
            throughput, are analysed on the log scale).
        table: one row per trial: trial, cell (str id), seed, status ("finished"/"diverged"/"oom"/"crashed"),
            status_reason, crash_cause (CRASH_CAUSE: "code" / "infrastructure" for a crashed run, else blank), one
            0/1 column per factor, metric columns (NaN for failed trials); optionally `block`
            (the half of a fold-over: 0 = the folded study's cells, 1 = the mirror; an additive block term),
            RUN_ID and the PROTOCOL_COLUMNS.
        curves: learning curves: trial, cell, seed, key, step, value.
        samples: cell id -> path to a PNG sample grid.
        excluded: cells excluded by constraints: {"cell": ..., "techniques": [...], "reason": ...}.
        aliases: effect -> aliased effects (fractional designs, as emitted by the design generator).
        ladder_order: factor order of a ladder design (None: inferred from the cells when possible).
        commit: git commit of the code that produced the runs.
        date: date of the study (ISO string).
        description: the study's description (report header).
        steps: training length in steps (report header; None: the last step of the learning curves).
        bench: the controlled throughput measurement (`srdit study bench`), or None: a table like `table` with one
            row per cell x round (`seed` = round) and the wall-clock metrics of one training step; when present,
            the analysis takes the wall-clock metrics (`metric_registry.WALL_CLOCK`) from it, not from the trials.
        reused_from: study -> number of runs of `table` adopted from its finished runs (same content keys) instead
            of trained; the report header says so.
        mlflow_ui: the URL of the study's experiment in an MLflow UI ("http://host:port/#/experiments/<id>"); a run's
            page is `mlflow_ui + "/runs/<run_id>"`. Blank: no links (the report states run ids).
        mlflow_ui_local: whether `mlflow_ui` is the address `srdit ui` serves the local store on (it opens only
            while `srdit ui` runs), not a tracking server's.
    """

    study: str
    design: str
    factors: list[str]
    metric: str
    direction: str
    other_metrics: dict[str, str] = field(default_factory=dict)
    table: pd.DataFrame = field(default_factory=pd.DataFrame)
    curves: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CURVE_COLUMNS))
    samples: dict[str, str] = field(default_factory=dict)
    excluded: list[dict] = field(default_factory=list)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    ladder_order: list[str] | None = None
    commit: str = ""
    date: str = ""
    description: str = ""
    "the study's description (shown in the report header)"
    steps: int | None = None
    "training length in steps (None: taken from the learning curves when they exist)"
    bench: pd.DataFrame | None = None
    reused_from: dict[str, int] = field(default_factory=dict)
    mlflow_ui: str = ""
    mlflow_ui_local: bool = False

    def cell_names(self) -> dict[str, str]:
        """Cell id -> the names of its techniques that are on ("repa+sprint", or the baseline label), from the
        table's 0/1 factor columns: what every panel shows in place of the id."""
        from srdit.analysis.effects import combo_label

        t = self.table
        if t.empty or "cell" not in t.columns or not set(self.factors) <= set(t.columns):
            return {}
        firsts = t.drop_duplicates("cell")
        return {str(r["cell"]): combo_label(f for f in self.factors if int(r[f]) == 1) for _, r in firsts.iterrows()}
