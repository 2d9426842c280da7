"""`srdit report STUDY.yaml [--state DIR] [--out DIR]`: study YAML -> MLflow runs -> dashboards/<study>/index.html
(+ dashboards/index.html, dashboards/RECORDS.md), logged on the study's parent run under report/.

The command joins the two layers below it: the runtime reads the runs (`srdit.runtime.results.load_results`),
the analysis layer fits them once (`srdit.analysis.report_fit`) and renders the fit
(`srdit.analysis.page`, `srdit.analysis.records`). Bad input prints one line on stderr
(`srdit report: error: ...`), exit code 2; so do runs evaluated under different protocols (the page is written and
shows them side by side, and makes no comparison).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from srdit.commands.errors import ArgError, OneLineParser, fail
from srdit.commands.study import DEFAULT_DASHBOARDS, DEFAULT_STATE
from srdit.config import ConfigError

PROG = "srdit report"


def _quiet() -> None:
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def report_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Render a study's dashboard from its MLflow runs.")
    p.add_argument("study", help="the study YAML")
    p.add_argument("--state", default=DEFAULT_STATE, help="state folder (MLflow store, trial folders)")
    p.add_argument("--out", default=DEFAULT_DASHBOARDS, help="dashboards folder (the report goes to OUT/<study>/)")
    p.add_argument("--no-bootstrap", action="store_true", help="skip bootstrap CIs (faster)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`srdit report STUDY.yaml [--state DIR]`; returns the exit code."""
    _quiet()
    try:
        args = report_parser().parse_args(argv)
    except ArgError as e:
        return fail(e.prog, e.message)
    try:
        path = make_report(args.study, args.state, args.out, bootstrap=not args.no_bootstrap)
    except ConfigError as e:
        return fail(PROG, str(e))
    print(f"report: {path}")
    return 0


def make_report(
    study: str | Path, state: str | Path = DEFAULT_STATE, out: str | Path = DEFAULT_DASHBOARDS, bootstrap: bool = True
) -> Path:
    """Study YAML -> MLflow runs -> dashboards/<study>/index.html, dashboards/index.html, dashboards/RECORDS.md;
    the report files are logged on the study's parent run under report/."""
    from srdit.analysis.page import render_index, render_report
    from srdit.analysis.records import write_records
    from srdit.analysis.report_fit import fit_report
    from srdit.runtime.results import load_results
    from srdit.study.spec import load_study

    spec = load_study(study)
    results, tracking = load_results(spec, state)
    if results.table.empty:
        raise ConfigError(f"study {spec.name}: no trial has finished yet; run `srdit study run {study}` first")
    out = Path(out)
    fit = fit_report(results, bootstrap=bootstrap)
    html = render_report(fit, out / spec.name)
    render_index(out)
    if fit.protocol_error:  # the page shows the protocols side by side; nothing is logged as a result
        raise ConfigError(f"study {spec.name}: {fit.protocol_error} (the protocols by cell: {html})")
    write_records(results, out / "RECORDS.md")
    try:
        metrics, tags = headline_results(fit.analyses, results.metric)
        tracking.log_parent_metrics(metrics)
        tracking.tag_parent(tags)
        tracking.client.log_artifacts(tracking.parent_run_id, str(out / spec.name), "report")
    except Exception as e:  # the report exists on disk either way
        print(f"warning: could not log the report on the MLflow parent run: {e}", file=sys.stderr)
    return html


def _mlflow_name(s: str) -> str:
    """MLflow metric names allow letters, digits, `_ - . / ` and spaces: a pair `a:b` becomes `a-x-b`."""
    return s.replace(":", "-x-").replace("+", "-").replace("×", "-x-")


def headline_results(analyses: dict, primary: str) -> tuple[dict[str, float], dict[str, str]]:
    """The parent run's summary of a report: per analysed metric M, metrics `M/main_effect/<technique>` (the
    report's ME, the metric's own scale before orientation; log for throughput) with `.../ci_low`, `.../ci_high`,
    and `M/synergy/<a>-x-<b>` (oriented S, positive = better together) with its CI and p_adj (the report's: the
    primary metric's simultaneous interval, a secondary metric's FCR-adjusted interval and BH q); tags
    `result.best_cell` (techniques, cell id, mean ± sd of the primary metric) and, per wall-clock metric, where it
    comes from (`result.<M>.source`: the bench, or the contention caveat). Values without an estimate are left out."""
    from srdit.analysis.effects import BENCH_NOTE, CONTENTION_NOTE, Analysis

    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    for m, a in analyses.items():
        if not isinstance(a, Analysis):
            tags[f"result.{_mlflow_name(m)}"] = f"not analysed: {getattr(a, 'error', '')}"[:500]
            continue
        mm = _mlflow_name(m)
        for f, v in a.fit.main_effects.items():
            if v is None:
                continue
            metrics[f"{mm}/main_effect/{f}"] = v
            ci = a.fit.ci.get(f)
            if ci:
                metrics[f"{mm}/main_effect/{f}/ci_low"], metrics[f"{mm}/main_effect/{f}/ci_high"] = ci
        for pair, v in a.pairs.synergy.items():
            if v is None:
                continue
            name = f"{mm}/synergy/{_mlflow_name(pair)}"
            metrics[name] = v
            ci = a.pairs.synergy_ci.get(pair)
            if ci:
                metrics[f"{name}/ci_low"], metrics[f"{name}/ci_high"] = ci
            if a.pairs.p_adj.get(pair) is not None:
                metrics[f"{name}/p_adj"] = a.pairs.p_adj[pair]
        if a.notes and a.notes[0] in (BENCH_NOTE, CONTENTION_NOTE):  # where a wall-clock metric comes from
            tags[f"result.{mm}.source"] = a.notes[0][:500]
        b = a.attribution.best
        if m == primary and b is not None:
            tags["result.best_cell"] = f"{b.combo} ({b.cell})"
            if b.mean is not None:
                metrics[f"{mm}/best_cell/mean"] = b.mean
                tags["result.best_cell"] += f": {m} = {b.mean:.4g}" + (f" ± {b.sd:.2g}" if b.sd is not None else "")
        flags = sorted({fl.pair for fl in a.incompatible})
        tags[f"result.{mm}.incompatible"] = ", ".join(flags) or "none flagged"
    return {k: float(v) for k, v in metrics.items() if v == v}, tags
