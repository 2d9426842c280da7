"""`srdit report STUDY.yaml [--state DIR] [--out DIR]`: study YAML -> MLflow runs -> dashboards/<study>/index.html
(+ dashboards/index.html, dashboards/RECORDS.md), logged on the study's parent run under report/.

The command joins the two layers below it: the study layer reads the runs (`srdit.study.results.load_results`),
the analysis layer renders them (`srdit.analysis.page`, `srdit.analysis.records`). Dispatched by srdit.cli; also
`python -m srdit.report_command STUDY.yaml ...`. Bad input prints one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from srdit.config import ConfigError
from srdit.study.command import DEFAULT_DASHBOARDS, DEFAULT_STATE


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of the usage dump
        raise _ArgError(f"{self.prog}: {message}")


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def _quiet() -> None:
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _report_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="srdit report", description="Render a study's dashboard from its MLflow runs.")
    p.add_argument("study")
    p.add_argument("--state", default=DEFAULT_STATE)
    p.add_argument("--out", default=DEFAULT_DASHBOARDS, help="dashboards folder (the report goes to OUT/<study>/)")
    p.add_argument("--no-bootstrap", action="store_true", help="skip bootstrap CIs (faster)")
    return p


def report_main(argv: list[str] | None = None) -> int:
    """`srdit report STUDY.yaml [--state DIR]`; returns the exit code."""
    _quiet()
    try:
        args = _report_parser().parse_args(argv)
    except _ArgError as e:
        return _err(str(e))
    try:
        path = make_report(args.study, args.state, args.out, bootstrap=not args.no_bootstrap)
    except ConfigError as e:
        return _err(str(e))
    print(f"report: {path}")
    return 0


def make_report(study: str | Path, state: str | Path = DEFAULT_STATE, out: str | Path = DEFAULT_DASHBOARDS,
                bootstrap: bool = True) -> Path:
    """Study YAML -> MLflow runs -> dashboards/<study>/index.html, dashboards/index.html, dashboards/RECORDS.md;
    the report files are logged on the study's parent run under report/."""
    from srdit.analysis.page import render_index, render_report
    from srdit.analysis.records import write_records
    from srdit.study.results import load_results
    from srdit.study.spec import load_study

    spec = load_study(study)
    results, tracking = load_results(spec, state)
    if results.table.empty:
        raise ConfigError(f"study {spec.name}: no trial has finished yet; run `srdit study run {study}` first")
    out = Path(out)
    html = render_report(results, out / spec.name, bootstrap=bootstrap)
    render_index(out)
    write_records(results, out / "RECORDS.md")
    try:
        tracking.client.log_artifacts(tracking.parent_run_id, str(out / spec.name), "report")
    except Exception as e:  # the report exists on disk either way
        print(f"warning: could not log the report on the MLflow parent run: {e}", file=sys.stderr)
    return html


if __name__ == "__main__":
    sys.exit(report_main(sys.argv[1:]))
