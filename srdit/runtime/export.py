"""`srdit study export STUDY --csv [PATH]`: one row per trial from MLflow (trial, cell, seed, status,
status_reason, the 0/1 factor columns, every metric, run_id, the evaluation protocol's `protocol.*` columns), so that `srdit analyze` can re-run the analysis on any
machine without the MLflow store:

    srdit analyze PATH --factors A,B --metric fd --direction min
"""

from __future__ import annotations

from pathlib import Path

from srdit.runtime.results import load_results


def export_csv(spec, state_dir: str | Path, out: str | Path | None = None) -> tuple[Path, int]:
    """Write the study's trial table as CSV (default `<study>_runs.csv` in the working directory); returns the path
    and the row count. Raises ConfigError (one line) when the study has no MLflow store or no runs."""
    results, _ = load_results(spec, state_dir, curves=False, samples=False)
    path = Path(out) if out else Path(f"{spec.name}_runs.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    results.table.to_csv(path, index=False)
    return path, len(results.table)


def analyze_hint(spec, path: Path) -> str:
    """The command that re-runs the analysis on the exported table."""
    return (
        f"srdit analyze {path} --factors {','.join(spec.factor_names)} --metric {spec.metrics.primary} "
        f"--direction {spec.metrics.direction}"
    )
