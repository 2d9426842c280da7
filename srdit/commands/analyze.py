"""`srdit analyze RUNS.csv --factors A,B,C --metric y --direction max|min ...`: effects, synergy and incompatibility for
results produced anywhere (any CSV with one row per trial).

Exit codes: 0 ok, 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from srdit.analysis.effects import Analysis, AnalysisError, analyze
from srdit.analysis.over_steps import OverSteps, analyze_over_steps, evaluated_steps, rows_at_step
from srdit.analysis.reading import cells_to_runs, is_cells_table, read_table
from srdit.analysis.report_fit import mixed_protocols, protocols
from srdit.commands.errors import ArgError, OneLineParser, fail

PROG = "srdit analyze"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `analyze` options to `parser` (for a caller that builds its own parser; `run` runs them)."""
    parser.add_argument("runs", metavar="RUNS.csv", help="table with one row per trial (CSV, or .parquet/.json)")
    parser.add_argument(
        "--factors", required=True, help="comma-separated technique columns coded 0/1 (pair names follow this order)"
    )
    parser.add_argument("--metric", required=True, help="metric column to analyse")
    parser.add_argument(
        "--direction",
        required=True,
        choices=["max", "min"],
        help="max if higher is better, min if lower is better (gains are oriented: positive = better)",
    )
    parser.add_argument("--seed-col", default="seed", help="seed (replicate) column; used as a block (default: seed)")
    parser.add_argument(
        "--status-col",
        default="status",
        help="status column; diverged/nan/oom/crashed/error/failed are failures, other non-finished "
        "statuses (blank, cancelled) are excluded (default: status)",
    )
    parser.add_argument("--log", action="store_true", help="analyse log(metric) (throughput-like metrics)")
    parser.add_argument(
        "--threshold", type=float, default=0.0, help="practical antagonism threshold in gain units (default 0)"
    )
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    parser.add_argument(
        "--correction",
        default="holm",
        choices=["holm", "fdr_bh", "bonferroni", "none"],
        help="multiplicity correction across pairs (default holm)",
    )
    parser.add_argument("--ladder", default=None, help="comma-separated factor order for the cumulative ladder")
    parser.add_argument(
        "--allow-inestimable",
        action="store_true",
        help="report effects the design cannot estimate as null instead of failing",
    )
    parser.add_argument("--no-bootstrap", action="store_true", help="skip the seed bootstrap")
    parser.add_argument("--format", default="table", choices=["json", "table"], help="output format (default table)")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument(
        "--step",
        type=float,
        default=None,
        metavar="N",
        help="analyse the rows at training step N of a long table (one row per trial and evaluated "
        "step, the step in --step-col)",
    )
    steps.add_argument(
        "--all-steps",
        action="store_true",
        help="analyse every evaluated step of a long table: the effects per step with their "
        "intervals, and whether each changes from the first to the last step",
    )
    parser.add_argument("--step-col", default="step", help="step column of a long table (default: step)")
    parser.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="also write the HTML report to DIR/index.html (with --all-steps: the effects over training panel)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(OneLineParser(prog=PROG, description=__doc__.splitlines()[0]))


def _fmt(x: Any, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, (list, tuple)) and len(x) == 2:
        return f"[{_fmt(x[0], nd)}, {_fmt(x[1], nd)}]"
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return str(x)


def tables(result: Analysis) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """The result as (title, caption, header, rows) tables of strings."""
    out = []
    fit, pairs, att = result.fit, result.pairs, result.attribution
    scale = " (log scale)" if result.scale == "log" else ""
    rows = []

    def name(n: str) -> str:  # the effect with its alias tag, as on the report page and in the JSON
        tag = fit.alias_tag(n)
        return f"{n} ({tag})" if tag else n

    for f, v in fit.main_effects.items():
        rows.append([name(f), _fmt(v), _fmt(fit.ci.get(f)), _fmt(fit.p.get(f)), "", ""])
    for n, v in fit.interactions.items():
        rows.append(
            [
                name(n),
                _fmt(v),
                _fmt(fit.ci.get(n)),
                _fmt(fit.p.get(n)),
                _fmt(pairs.synergy.get(n)),
                _fmt(pairs.p_adj.get(n)),
            ]
        )
    out.append(
        (
            f"Effects on {result.metric}{scale}",
            "estimate: ME = mean(+) - mean(-), INT = half difference, metric scale; "
            "synergy = 2 INT oriented (positive = better together); p_adj across pairs; "
            "aliased: the estimate is of the whole alias chain; partly aliased: biased by the omitted "
            "interactions named (missing or failed cells), not tested",
            ["effect", "estimate", "CI", "p", "synergy", "p_adj"],
            rows,
        )
    )
    if att.shapley:
        out.append(
            (
                "Shapley attribution",
                "oriented gain, sums to g(all) - g(none); loo = g(all) - g(all - i)",
                ["factor", "shapley", "loo"],
                [[f, _fmt(v), _fmt(att.loo.get(f))] for f, v in att.shapley.items()],
            )
        )
    if result.incompatible:
        rows = []
        for fl in result.incompatible:
            ev = (
                _fmt(fl.estimate)
                if fl.kind == "antagonism"
                else ", ".join(f"{k} {c['failed']}/{c['n']}" for k, c in fl.counts.items())
            )
            rows.append([fl.pair, fl.kind, ev, _fmt(fl.ci), _fmt(fl.p), _fmt(fl.p_adj)])
        out.append(
            (
                "Incompatible pairs",
                "antagonism: synergy significantly < -threshold; "
                "failure: both-on runs fail more than each alone (one-sided Boschloo exact tests) and more "
                "than independent failures of the two predict (survival-interaction test)",
                ["pair", "kind", "evidence", "CI", "p", "p_adj"],
                rows,
            )
        )
    if fit.aliased:
        out.append(
            (
                "Aliased effects",
                "not separable in this design; never read as a clean synergy",
                ["alias chain", "estimate"],
                [[a.label, _fmt(a.estimate)] for a in fit.aliased],
            )
        )
    if att.ladder:
        out.append(
            (
                f"Ladder ({att.ladder_kind})",
                "cumulative stacking; delta = step from the previous row",
                ["step", "cell", "n", "mean", "sd", "delta"],
                [
                    [str(r.step), r.cell, f"{r.n_finished}/{r.n}", _fmt(r.mean), _fmt(r.sd), _fmt(r.delta)]
                    for r in att.ladder
                ],
            )
        )
    return out


def over_steps_tables(ov: OverSteps) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """The effects over training as (title, caption, header, rows) tables of strings."""
    scale = " (log scale)" if ov.scale == "log" else ""
    rows = []
    for s in ov.series:
        for p in s.points:
            rows.append(
                [
                    s.effect,
                    s.kind,
                    _fmt(p.step),
                    _fmt(p.estimate),
                    _fmt(p.ci),
                    "-" if p.significant is None else ("yes" if p.significant else "no"),
                ]
            )
    out = [
        (
            f"Effects over training on {ov.metric}{scale}",
            "gain = oriented main effect (positive = better), individual CI; pair: synergy S with the step's "
            "simultaneous CI; pointwise per step",
            ["effect", "kind", "step", "gain / S", "CI", "excludes 0"],
            rows,
        )
    ]
    if ov.changes:
        c0 = ov.changes[0]
        out.append(
            (
                f"Change from step {c0.first} to step {c0.last}",
                (ov.change_interval or "not tested: see the note below") + "; > 0 = better at the end",
                ["effect", "kind", "change", "CI", "p", "p_adj", "significant"],
                [
                    [
                        c.effect,
                        c.kind,
                        _fmt(c.estimate),
                        _fmt(c.ci),
                        _fmt(c.p),
                        _fmt(c.p_adj),
                        "-" if c.significant is None else ("yes" if c.significant else "no"),
                    ]
                    for c in ov.changes
                ],
            )
        )
    failed = [(s, a) for s, a in ov.analyses.items() if not isinstance(a, Analysis)]
    if failed:
        out.append(("Steps not analysed", "", ["step", "reason"], [[_fmt(s), a.error] for s, a in failed]))
    return out


def _print_tables(result: Analysis, stream) -> None:
    head = (
        f"{result.metric} ({result.direction}), {result.n_finished}/{result.n_runs} finished runs in "
        f"{result.fit.n_cells} cells"
    )
    _print(head, tables(result), result.notes, stream)


def _print(head: str, tabs: list, notes: list[str], stream) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:  # plain text
        print(head, file=stream)
        for title, caption, header, rows in tabs:
            print(f"\n{title} ({caption})", file=stream)
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
            print("  ".join(h.ljust(w) for h, w in zip(header, widths)), file=stream)
            for r in rows:
                print("  ".join(c.ljust(w) for c, w in zip(r, widths)), file=stream)
        for n in notes:
            print(f"note: {n}", file=stream)
        return
    console = Console(file=stream, width=max(100, Console(file=stream).width))
    console.print(head, highlight=False, markup=False, emoji=False)
    for title, caption, header, rows in tabs:
        # plain Text: no markup or emoji codes in the cells ("A:B:C" is not ":B:", "[1, 2]" is no style)
        t = Table(title=Text(title), title_justify="left", caption=Text(caption), caption_justify="left")
        for h in header:
            t.add_column(Text(h))
        for r in rows:
            t.add_row(*(Text(c) for c in r))
        console.print(t, emoji=False)
    for n in notes:
        console.print(f"note: {n}", highlight=False, markup=False, emoji=False)


def run(args: argparse.Namespace, stdout=None, stderr=None) -> int:
    """Run the command from parsed arguments (for a caller that built its own parser with add_arguments)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        table = read_table(args.runs, args.metric, args.status_col, notes=stderr)
        factors = [f.strip() for f in args.factors.split(",") if f.strip()]
        seed_col = args.seed_col
        if is_cells_table(table) and args.metric not in table.columns:
            # a report's own cells.csv: cell summaries of its primary metric (raw scale)
            if args.log:
                raise AnalysisError(
                    f"{args.runs} holds raw-scale cell summaries: a log-scale analysis needs the "
                    "runs (srdit study export STUDY --csv)"
                )
            table = cells_to_runs(table, factors, args.metric, str(args.runs))
        status_col = args.status_col
        step_col = getattr(args, "step_col", "step")
        for opt, col, default in (
            ("--seed-col", seed_col, "seed"),
            ("--status-col", status_col, "status"),
            ("--step-col", step_col, "step"),
        ):
            if col not in table.columns and col != default:  # explicitly named but absent
                raise AnalysisError(f"{opt} column '{col}' not in {args.runs}")
        step, all_steps = getattr(args, "step", None), getattr(args, "all_steps", False)
        long = table
        if step is not None:
            table = rows_at_step(table, step, step_col, str(args.runs))
        elif all_steps:
            evaluated_steps(table, step_col, str(args.runs))  # a usable step column, named in the error
        elif step_col in table.columns:
            steps = evaluated_steps(table, step_col, str(args.runs))
            if len(steps) > 1:  # pooling the steps would count one trial's evaluations as replicates
                shown = ", ".join(map(str, steps[:10])) + (" ..." if len(steps) > 10 else "")
                raise AnalysisError(
                    f"{args.runs} holds {len(steps)} evaluated steps in column '{step_col}' "
                    f"({shown}): analyse one with --step N, or every one with --all-steps"
                )
        mixed = mixed_protocols(protocols(_as_results(args, factors, table)))
        if mixed:  # a table exported from a study carries each run's evaluation protocol
            raise AnalysisError(f"{args.runs}: {mixed}")
        options = dict(
            seed_col=seed_col,
            status_col=status_col,
            log=args.log,
            alpha=args.alpha,
            threshold=args.threshold,
            correction=args.correction,
            bootstrap=not args.no_bootstrap,
            strict=not args.allow_inestimable,
            ladder_order=[f.strip() for f in args.ladder.split(",")] if args.ladder else None,
        )
        ov = None
        if all_steps:
            ov = analyze_over_steps(
                table, factors, args.metric, args.direction, step_col=step_col, source=str(args.runs), **options
            )
            last = ov.analysed_steps[-1]
            result = ov.analyses[last]
            table = rows_at_step(long, last, step_col, str(args.runs))
        else:
            result = analyze(table, factors, args.metric, args.direction, **options)
        if getattr(args, "report", None):
            try:
                path = _write_report(args, factors, result, table, long, step_col, ov)
            except OSError as e:
                raise AnalysisError(
                    f"--report: cannot write the report to {args.report}: {e.strerror or type(e).__name__}"
                ) from None
            print(f"report: {path}", file=stderr)
    except AnalysisError as e:
        return fail(PROG, str(e), stderr)
    try:
        if args.format == "json":
            json.dump(ov.to_json() if ov is not None else result.to_json(), stdout, indent=2, allow_nan=False)
            stdout.write("\n")
        elif ov is not None:
            head = f"{ov.metric} ({ov.direction}) at {len(ov.steps)} evaluated step(s): {', '.join(map(str, ov.steps))}"
            _print(head, over_steps_tables(ov), [*ov.statements, *ov.notes], stdout)
        else:
            _print_tables(result, stdout)
        stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    return 0


def _write_report(
    args: argparse.Namespace,
    factors: list[str],
    result: Analysis,
    table: pd.DataFrame,
    long: pd.DataFrame,
    step_col: str,
    ov: OverSteps | None,
) -> Path:
    """The study report page for a CSV (`--report DIR`): the analysed rows as the trial table; with a step column,
    the metric per step as its learning curve (and with --all-steps the effects over training)."""
    from srdit.analysis.effects import combo_label
    from srdit.analysis.page import render_report
    from srdit.analysis.report_fit import ReportFit, step_intervals
    from srdit.analysis.results import CURVE_COLUMNS, StudyResults

    def ids(t: pd.DataFrame) -> pd.DataFrame:
        t = t.copy()
        lv = (
            t[factors]
            .astype(str)
            .apply(lambda c: c.str.strip().str.lower().isin(["1", "1.0", "true", "on", "yes", "+1", "+"]))
        )
        combo = lv.apply(lambda r: combo_label(f for f in factors if r[f]), axis=1)
        seed = t[args.seed_col].astype(str) if args.seed_col in t.columns else pd.Series("0", index=t.index)
        if "cell" not in t.columns:
            t["cell"] = combo
        if "trial" not in t.columns:
            t["trial"] = combo + " · s" + seed
        if "seed" not in t.columns:
            t["seed"] = seed
        return t

    table = ids(table)
    curves = pd.DataFrame(columns=CURVE_COLUMNS)
    steps = None
    if step_col in long.columns:
        lg = ids(long)
        curves = pd.DataFrame(
            {
                "trial": lg["trial"],
                "cell": lg["cell"],
                "seed": lg["seed"],
                "key": args.metric,
                "step": pd.to_numeric(lg[step_col], errors="coerce"),
                "value": pd.to_numeric(lg[args.metric], errors="coerce"),
            }
        )
        steps = int(pd.to_numeric(table[step_col], errors="coerce").max())
    res = StudyResults(
        study=Path(args.runs).stem,
        design="csv",
        factors=factors,
        metric=args.metric,
        direction=args.direction,
        table=table,
        curves=curves,
        steps=steps,
        description=f"srdit analyze {Path(args.runs).name}",
    )
    if ov is None:  # one step (or none): the page says so instead of a chart
        ov = analyze_over_steps(
            table.assign(**{step_col: steps or 0}),
            factors,
            args.metric,
            args.direction,
            step_col=step_col,
            source=str(args.runs),
            seed_col=args.seed_col,
            status_col=args.status_col,
            log=args.log,
            alpha=args.alpha,
            bootstrap=False,
            strict=False,
        )
    ladder_ci, loo_ci = step_intervals(res, result) if isinstance(result, Analysis) else ({}, {})
    return render_report(
        ReportFit(res, {args.metric: result}, ov, protocols(res), None, ladder_ci, loo_ci), args.report
    )


def _as_results(args: argparse.Namespace, factors: list[str], table: pd.DataFrame):
    """The table as a `StudyResults` (what `report_fit.protocols` reads)."""
    from srdit.analysis.results import StudyResults

    return StudyResults(
        study="", design="csv", factors=factors, metric=args.metric, direction=args.direction, table=table
    )


def main(argv: list[str] | None = None, stdout=None, stderr=None) -> int:
    stderr = stderr or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except ArgError as e:
        return fail(e.prog, e.message, stderr)
    return run(args, stdout=stdout, stderr=stderr)
