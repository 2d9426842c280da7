"""The report page: one self-contained HTML page per study (plotly.js inline once, PNG samples as data URIs, opens
offline) with its summary cards and tables, the index of all studies, and the side files (effects.json, cells.csv,
summary.json). It renders a fitted `report_fit.ReportFit` and fits nothing itself.

plotly.py docs: `Figure.to_html(full_html=False, include_plotlyjs=True|False)` embeds the library once and then
reuses the global `Plotly` object (https://plotly.com/python/interactive-html-export/).
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from srdit import metric_registry
from srdit.analysis.effects import (
    BENCH_NOTE,
    CONTENTION_NOTE,
    OK_STATUSES,
    Analysis,
    AnalysisFailure,
    Flag,
    combo_label,
    level_pct,
)
from srdit.analysis.figures import (
    _cell_order,
    _ci,
    _esc,
    _metric_label,
    _num,
    _pv,
    decision_p,
    fig_curves,
    fig_effects,
    fig_half_normal,
    fig_ladder,
    fig_over_steps,
    fig_pareto,
    fig_synergy,
    throughput_metrics,
)
from srdit.analysis.over_steps import OverSteps
from srdit.analysis.report_fit import Protocol, ReportFit
from srdit.analysis.results import PROTOCOL_COLUMNS, RUN_ID, StudyResults

__all__ = ["render_report", "render_index"]

# --------------------------------------------------------------------------------------------------------------------
# HTML pieces
# --------------------------------------------------------------------------------------------------------------------
CSS = """
:root { --fg:#1d2330; --muted:#5b6576; --line:#e3e7ee; --bg:#f6f8fb; --card:#fff; --accent:#2f5d9e;
        --good:#2e7d4f; --bad:#b3261e; --warn:#9a6700; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; }
header { background:#1f2a3c; color:#fff; padding:28px 0 22px; }
header .wrap, main { max-width:1240px; margin:0 auto; padding:0 28px; }
header h1 { margin:0 0 6px; font-size:26px; font-weight:650; letter-spacing:.2px; }
header .meta { color:#c9d3e3; font-size:13.5px; }
header .meta code { color:#fff; background:rgba(255,255,255,.12); padding:1px 6px; border-radius:4px; }
nav { margin-top:12px; font-size:13.5px; }
header .meta a { color:#bcd3ff; }
nav a { color:#bcd3ff; margin-right:14px; text-decoration:none; }
nav a:hover { text-decoration:underline; }
main { padding-top:22px; padding-bottom:60px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:20px 24px;
          margin:0 0 20px; }
h2 { margin:0 0 4px; font-size:19px; }
h3 { margin:18px 0 6px; font-size:15.5px; }
p.caption, .caption { color:var(--muted); font-size:13.5px; margin:4px 0 12px; max-width:1000px; }
.summary { display:grid; grid-template-columns:repeat(auto-fit,minmax(260px,1fr)); gap:14px; margin-top:10px; }
.card { border:1px solid var(--line); border-radius:8px; padding:12px 14px; background:#fbfcfe; }
.card .label { font-size:12px; text-transform:uppercase; letter-spacing:.6px; color:var(--muted); }
.card .value { font-size:18px; font-weight:600; margin-top:2px; overflow-wrap:anywhere; }
.card .detail { font-size:13px; color:var(--muted); margin-top:2px; }
.card.bad { border-color:#f1c7c3; background:#fff7f6; } .card.bad .value { color:var(--bad); }
.card.good .value { color:var(--good); }
.card.warn { border-color:#f0dfa8; background:#fffbef; } .card.warn .value { color:var(--warn); }
ul.flags { margin:6px 0 0; padding-left:20px; } ul.flags li { margin:3px 0; }
table.data { border-collapse:collapse; width:100%; font-size:13.5px; margin:8px 0 4px; }
table.data th { text-align:left; font-weight:600; color:var(--muted); border-bottom:2px solid var(--line);
                padding:6px 8px; }
table.data td { border-bottom:1px solid var(--line); padding:5px 8px; vertical-align:top; }
table.data tr:nth-child(even) td { background:#fafbfd; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
.tag { display:inline-block; padding:0 7px; border-radius:10px; font-size:12px; background:#eef1f6; color:#364152;
       margin-right:3px; }
.tag.bad { background:#fde8e6; color:var(--bad); } .tag.warn { background:#fff4d6; color:var(--warn); }
.tag.good { background:#e3f4e8; color:var(--good); }
a.run { font-size:11.5px; color:var(--accent); text-decoration:none; white-space:nowrap; }
code.run { font-size:11px; color:var(--muted); }
.samples { display:grid; grid-template-columns:repeat(auto-fill,minmax(180px,1fr)); gap:14px; }
.samples figure { margin:0; border:1px solid var(--line); border-radius:8px; padding:8px; background:#fbfcfe;
                  text-align:center; }
.samples img { width:100%; image-rendering:pixelated; border-radius:4px; background:#000; }
.samples figcaption { font-size:12.5px; color:var(--muted); margin-top:5px; word-break:break-word; }
.notes li { color:var(--muted); font-size:13.5px; }
.plot { width:100%; }
.grid2 { display:grid; grid-template-columns:repeat(auto-fit,minmax(480px,1fr)); gap:10px; }
footer { color:var(--muted); font-size:12.5px; text-align:center; padding:10px 0 30px; }
#js-errors:empty { display:none; }
#js-errors { color:var(--bad); white-space:pre-wrap; }
"""

# Collects JavaScript errors into a DOM element (read by the browser test through a DOM dump).
ERROR_HOOK = """<script>
window.__srditErrors = [];
window.addEventListener("error", function (e) {
  window.__srditErrors.push(String(e.message || e));
  var el = document.getElementById("js-errors"); if (el) { el.textContent = window.__srditErrors.join("\\n"); }
});
</script>"""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], num_cols: Iterable[int] = ()) -> str:
    num = set(num_cols)
    h = "".join(f'<th class="num">{c}</th>' if i in num else f"<th>{c}</th>" for i, c in enumerate(header))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f'<table class="data"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _figure_html(fig: go.Figure, div_id: str, first: bool) -> str:
    return fig.to_html(
        full_html=False, include_plotlyjs=bool(first), div_id=div_id, config={"displaylogo": False, "responsive": True}
    )


def _png_data_uri(path: str | Path) -> str | None:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _flag_text(fl: Flag) -> str:
    if fl.kind == "antagonism":
        return (
            f"<b>{_esc(fl.pair)}</b> — antagonism: S = {_num(fl.estimate, 3)} "
            f"(CI {_ci(fl.ci)}, p<sub>adj</sub> = {_pv(fl.p_adj)}; threshold {_num(fl.threshold)})"
        )
    c = fl.counts
    parts = ", ".join(
        f"{_esc(k.replace('_alone', ' alone'))} {v['failed']}/{v['n']}" for k, v in c.items() if k != "neither"
    )
    st = ", ".join(f"{_esc(k)} ×{v}" for k, v in fl.statuses.items())
    return (
        f"<b>{_esc(fl.pair)}</b> — runs fail together beyond the techniques' own failures: {parts} failed"
        f"{' (' + st + ')' if st else ''}; p<sub>adj</sub> = {_pv(fl.p_adj)}"
    )


def _best_tag(best, combo: str) -> str:
    """The cells table's badge for the best cell, saying what the summary card says: "best" only when it is
    distinguishably better than every other cell; otherwise the highest mean, with why it is not called a winner."""
    if best is None or best.combo != combo:
        return ""
    if best.indistinguishable is None:
        return ' <span class="tag warn" title="one run per cell: no error estimate">highest (point estimate)</span>'
    if best.indistinguishable:
        n = len(best.indistinguishable)
        return f' <span class="tag warn">highest mean · not distinguishable from {n} other{"s" if n > 1 else ""}</span>'
    return ' <span class="tag good">best</span>'


def _summary_cards(res: StudyResults, a: Analysis | AnalysisFailure) -> str:
    cards = []
    if isinstance(a, AnalysisFailure):
        return (
            f'<div class="card bad"><div class="label">analysis</div><div class="value">not possible</div>'
            f'<div class="detail">{_esc(a.error)}</div></div>'
        )
    b = a.attribution.best
    if b:
        sd = f" ± {_num(b.sd, 3)}" if b.sd is not None else ""
        if b.indistinguishable is None:
            tie = (
                '<div class="detail"><span class="tag warn">point estimate</span> no error estimate (one run per '
                "cell): run more seeds before calling a winner</div>"
            )
        elif b.indistinguishable:
            shown = ", ".join(_esc(x) for x in b.indistinguishable[:8]) + (" …" if len(b.indistinguishable) > 8 else "")
            tie = (
                f'<div class="detail"><span class="tag warn">not distinguishable</span> from the best at '
                f"α = {a.alpha}: {shown}</div>"
            )
        else:
            tie = (
                f'<div class="detail"><span class="tag good">distinguishable</span> better than every other cell '
                f"at α = {a.alpha}</div>"
            )
        cards.append(
            f'<div class="card good"><div class="label">best combination</div>'
            f'<div class="value">{_esc(b.combo)}</div>'
            f'<div class="detail">{_esc(res.metric)} = {_num(b.mean, 4)}{sd} '
            f"({b.n_finished}/{b.n} runs finished)</div>{tie}</div>"
        )
    s = a.pairs.strongest
    if s and s.estimate is not None and s.estimate > 0:
        sig = ""
        if s.p_adj is not None:
            sig = f", p<sub>adj</sub> = {_pv(s.p_adj)}"
        if s.pair not in a.pairs.significant:
            sig += ' <span class="tag warn">not significant</span>'
        cards.append(
            f'<div class="card"><div class="label">strongest synergy</div>'
            f'<div class="value">{_esc(s.pair)}</div>'
            f'<div class="detail">S = {_num(s.estimate, 3)} gain'
            f"{' (CI ' + _ci(s.ci) + ')' if s.ci else ''}{sig}</div></div>"
        )
    elif not any(v is not None for v in a.pairs.synergy.values()):  # ladder, leave-one-out
        cards.append(
            '<div class="card"><div class="label">strongest synergy</div><div class="value">not estimable'
            '</div><div class="detail">this design does not vary pairs of techniques independently'
            "</div></div>"
        )
    else:
        cards.append(
            '<div class="card"><div class="label">strongest synergy</div><div class="value">none</div>'
            '<div class="detail">no pair gains more together than apart</div></div>'
        )
    flags = a.incompatible
    if flags:
        pairs = sorted({fl.pair for fl in flags})
        cards.append(
            f'<div class="card bad"><div class="label">incompatible pairs</div>'
            f'<div class="value">{_esc(", ".join(pairs))}</div>'
            f'<div class="detail">{len(flags)} flag(s), details below</div></div>'
        )
    else:
        cards.append(
            '<div class="card"><div class="label">incompatible pairs</div>'
            '<div class="value">none flagged</div>'
            f'<div class="detail">at α = {a.alpha} after {_esc(a.correction)} correction</div></div>'
        )
    n_fail = a.n_failed
    cards.append(
        f'<div class="card{" warn" if n_fail else ""}"><div class="label">runs</div>'
        f'<div class="value">{a.n_finished} finished / {a.n_runs}</div>'
        f'<div class="detail">{n_fail} failed, {len(res.excluded)} cell(s) excluded by constraints, '
        f"{a.fit.n_cells} cells</div></div>"
    )
    html_ = '<div class="summary">' + "".join(cards) + "</div>"
    if flags:
        html_ += '<ul class="flags">' + "".join(f"<li>{_flag_text(fl)}</li>" for fl in flags) + "</ul>"
    return html_


def _study_steps(res: StudyResults) -> int | None:
    if res.steps:
        return int(res.steps)
    c = res.curves
    if c is not None and not c.empty and "step" in c.columns:
        last = pd.to_numeric(c["step"], errors="coerce").groupby(c["trial"]).max().dropna()
        if len(last):
            return int(last.median())
    return None


#: below this many training steps the report says the effects come from short runs
SHORT_RUN_STEPS = 10_000


def _header_context(res: StudyResults, a: Analysis | None) -> str:
    """Training length, seeds per cell, runs finished, the study's description (the header's second line)."""
    parts = []
    steps = _study_steps(res)
    if steps is not None:
        short = (
            (
                f' <span class="tag warn">short runs: effects measured after {steps:,} steps may change with '
                "longer training</span>"
            )
            if steps < SHORT_RUN_STEPS
            else ""
        )
        parts.append(f"training length <b>{steps:,} steps</b>{short}")
    else:
        parts.append("training length unknown")
    t = res.table
    if a is not None and len(a.attribution.cells):
        ns = sorted({c.n for c in a.attribution.cells})
        seeds = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
        parts.append(f"<b>{seeds} seed(s) per cell</b>")
        parts.append(
            f"<b>{a.n_finished} of {a.n_runs} runs finished</b>"
            + (f" ({a.n_excluded} excluded: not finished, not failed)" if a.n_excluded else "")
        )
    elif t is not None and len(t):
        parts.append(f"{len(t)} runs")
    if res.reused_from:
        n, where = (
            sum(res.reused_from.values()),
            ", ".join(f"study {_esc(s)} ({k})" for s, k in res.reused_from.items()),
        )
        parts.append(
            f"<b>{n} of {len(t)} trials reused</b> from finished runs of {where} (same training config, "
            "data, code and evaluation settings)"
        )
    head = " · ".join(parts)
    if res.description:
        head += f'<br><span class="desc">{_esc(res.description)}</span>'
    return head


def _pair_decision(a: Analysis, n: str) -> str:
    """What the synergy matrix decided about pair `n`, in words (the same rule as its stars)."""
    fit, pairs = a.fit, a.pairs
    s = pairs.synergy.get(n)
    aliased = {x for al in fit.aliased for x in al.effects}
    if s is None:
        return "aliased" if n in aliased else "not estimable"
    if n in fit.partial_aliases:
        return '<span class="tag warn">partly aliased</span> not tested'
    if a.notes and a.notes[0] == CONTENTION_NOTE:
        return "not tested (shared-machine clock)"
    lenth = set((fit.lenth or {}).get("significant_simultaneous", []))
    if n in pairs.significant or (fit.lenth is not None and n in lenth):
        return f'<span class="tag good">{"synergy" if s > 0 else "antagonism"}</span> significant'
    if not pairs.synergy_ci.get(n) and fit.lenth is None:
        return "no error estimate"
    return "n.s."


def _effects_table(a: Analysis, fit_: ReportFit) -> str:
    """Two tables, one convention each: per technique (gains) and per pair (gains; the matrix's intervals and
    decisions)."""
    scale = "log " if a.scale == "log" else ""
    fit, pairs, att = a.fit, a.pairs, a.attribution
    pct = int(round(100 * (1 - a.alpha)))
    sign = 1 if a.direction == "max" else -1

    def note(n: str) -> str:
        tag = fit.alias_tag(n)
        return f' <span class="tag warn">{_esc(tag)}</span>' if tag else ""

    tech = []
    for f_, v in fit.main_effects.items():
        c = fit.ci.get(f_)
        partial = f_ in fit.partial_aliases  # biased by omitted interactions: an estimate, never a test
        tech.append(
            [
                _esc(f_) + note(f_),
                ("≈" if partial and v is not None else "") + _num(None if v is None else sign * v),
                "–" if partial else _ci(sorted([sign * c[0], sign * c[1]]) if c and v is not None else None),
                "not tested" if partial else _pv(fit.p.get(f_)),
                _num(att.shapley.get(f_)) if att.shapley else "–",
                _num(att.loo.get(f_)),
                _ci(fit_.loo_ci.get(f_)),
            ]
        )
    techniques = _table(
        [
            "technique",
            "main effect (gain)",
            f"individual {pct}% CI",
            "p (individual)",
            "Shapley (gain)",
            "leave-one-out (gain)",
            f"individual {pct}% CI (Welch, seeds)",
        ],
        tech,
        num_cols=[1, 3, 4, 5],
    )
    rows = []
    for n in pairs.synergy:
        p_dec, lab = decision_p(a, n)
        rows.append(
            [
                _esc(n) + note(n),
                _num(pairs.synergy.get(n)),
                _ci(pairs.synergy_ci.get(n)) if n not in fit.partial_aliases else "–",
                _pv(p_dec),
                _pv(pairs.p_adj.get(n)) if n not in fit.partial_aliases else "–",
                _pair_decision(a, n),
                _num(att.dividends.get(n)),
                _num(att.dividends_full.get(n)),
            ]
        )
    pair_table = (
        _table(
            [
                "pair",
                "synergy S (gain)",
                f"simultaneous {pct}% CI",
                "p<sub>Bonf</sub> (decision)",
                f"p<sub>adj</sub> ({_esc(a.correction)})",
                "decision",
                "D vs baseline (gain)",
                "D vs full stack (gain)",
            ],
            rows,
            num_cols=[1, 3, 4, 6, 7],
        )
        if rows
        else '<p class="caption">No pair of techniques.</p>'
    )
    interval = f" ({_esc(pairs.interval)})" if pairs.interval else ""
    return (
        f"<h3>Per technique</h3>"
        f'<p class="caption">Every column in gain units of {scale}{_esc(a.metric)}, oriented so that positive = '
        f"better. Main effect: mean gain with the technique on minus off over the design, with its individual "
        f"{pct}% t interval and p-value (one test per technique, not corrected across techniques; a partly aliased "
        "effect is biased by omitted interactions: ≈ estimate, not tested). Shapley: its "
        "exact share of g(all) − g(none) (full factorials only; no interval). Leave-one-out: g(all) − g(all "
        f"without it), with Welch's individual {pct}% interval over the seeds of the two cells (where both have two "
        f"or more finished runs).</p>{techniques}"
        f"<h3>Per pair</h3>"
        f'<p class="caption">Every column in gain units of {scale}{_esc(a.metric)}. Synergy S = (gain of i with j '
        "on) − (gain of i with j off), positive = better together, with the <b>simultaneous</b> "
        + (
            f"{pct}% interval over the {pairs.n_tested} tested pair(s){interval}: the interval, p and decision the "
            "synergy matrix shows (significant = the simultaneous interval excludes 0). "
            if pairs.n_tested
            else f"{pct}% interval over the tested pairs; here no pair could be tested. "
        )
        + "Partly aliased pairs are "
        "estimated but never tested. Dividends D = g(ij) − g(i) − g(j) + g(none) with the others off, and the "
        "same difference of differences against the full stack: point values of single cells, no interval, "
        "not tested; – = not estimable from the cells run.</p>"
        f"{pair_table}"
    )


def _cells_table(res: StudyResults, analyses: dict[str, Analysis | AnalysisFailure]) -> str:
    a = analyses[res.metric]
    metrics = [m for m in analyses if isinstance(analyses[m], Analysis)]
    by_metric = {m: {c.combo: c for c in analyses[m].attribution.cells} for m in metrics}
    t = res.table
    rows = []
    for c in _cell_order(a.attribution.cells, res.factors):
        cells = []
        for m in metrics:
            cc = by_metric[m].get(c.combo)
            if cc is None or cc.mean is None:
                cells.append("–")
            else:
                cells.append(_num(cc.mean, 4) + (f" ± {_num(cc.sd, 2)}" if cc.sd is not None else ""))
        status = f"{c.n_finished}/{c.n}"
        if c.n_failed:
            status += " " + " ".join(f'<span class="tag bad">{_esc(k)} ×{v}</span>' for k, v in c.failures.items())
        name = _esc(c.cell) + _best_tag(a.attribution.best, c.combo)
        rows.append([name, _esc(c.combo), status, *cells, _per_seed(t[t["cell"].astype(str) == str(c.cell)], res)])
    return _table(
        [
            "cell",
            "techniques on",
            "finished",
            *[f"{_esc(m)} ({analyses[m].direction})" for m in metrics],
            f"{_esc(res.metric)} per seed",
        ],
        rows,
        num_cols=range(3, 3 + len(metrics)),
    )


def _per_seed(rows: pd.DataFrame, res: StudyResults) -> str:
    """ "seed: value" of each run of a cell (its status where it did not finish), in seed order, each followed by
    a link to its MLflow run (`_run_link`)."""
    out = []
    for _, r in rows.sort_values("seed").iterrows():
        v = pd.to_numeric(pd.Series([r.get(res.metric)]), errors="coerce").iloc[0]
        ok = str(r.get("status", "finished")).lower() in OK_STATUSES and np.isfinite(v)
        out.append(
            f"{_esc(r['seed'])}: "
            + (_num(float(v), 4) if ok else f'<span class="tag bad">{_esc(r.get("status"))}</span>')
            + _run_link(res, r.get(RUN_ID))
        )
    return ", ".join(out) or "–"


def _run_link(res: StudyResults, run_id) -> str:
    """A link to a run's page in the MLflow UI (`res.mlflow_ui`), or the run id where there is no UI address."""
    if not isinstance(run_id, str) or not run_id:
        return ""
    if not res.mlflow_ui:
        return f' <code class="run">run {_esc(run_id)}</code>'
    url = f"{res.mlflow_ui}/runs/{run_id}"
    return f' <a class="run" href="{_esc(url)}" title="MLflow run {_esc(run_id)}">run ↗</a>'


def _runs_caption(res: StudyResults) -> str:
    """Where the per-seed run links lead."""
    if RUN_ID not in res.table.columns:
        return ""
    if not res.mlflow_ui:
        return " Each value is followed by its MLflow run id."
    if res.mlflow_ui_local:
        return (
            " Each value links to its MLflow run (<i>run ↗</i>) in the UI that <code>srdit ui</code> serves over the "
            f"study's local store at its default address (<code>{_esc(res.mlflow_ui.split('/#')[0])}</code>): the "
            "links open while it runs."
        )
    return f" Each value links to its MLflow run (<i>run ↗</i>) on the tracking server <code>{_esc(res.mlflow_ui.split('/#')[0])}</code>."


def _failures_table(res: StudyResults, a: Analysis) -> str:
    rows = []
    for c in _cell_order(a.attribution.cells, res.factors):
        if c.n_failed:
            st = " ".join(f'<span class="tag bad">{_esc(k)} ×{v}</span>' for k, v in c.failures.items())
            rows.append(
                [_esc(c.cell), _esc(c.combo), f"failed {c.n_failed}/{c.n}", st, _esc("; ".join(c.reasons)) or "–"]
            )
    for e in res.excluded:
        tech = e.get("techniques") or []
        rows.append(
            [
                _esc(e.get("cell", "")),
                _esc(combo_label(tech)),
                '<span class="tag warn">excluded</span>',
                "",
                _esc(e.get("reason", "")),
            ]
        )
    if not rows:
        return '<p class="caption">No failed runs and no excluded cells.</p>'
    return _table(["cell", "techniques on", "outcome", "status", "reason"], rows)


def _failure_tests_table(a: Analysis) -> str:
    rows = []
    for t in a.failures.tests:
        if not t.counts:
            continue
        c = t.counts
        if c["both"]["failed"] == 0:
            continue
        alone = [
            f"{_esc(k.removesuffix('_alone'))} alone: {v['failed']}/{v['n']}"
            for k, v in c.items()
            if k.endswith("_alone")
        ]
        rows.append([_esc(t.pair), f"{c['both']['failed']}/{c['both']['n']}", *alone, _pv(t.p), _pv(t.p_adj)])
    if not rows:
        return ""
    return (
        '<h3>Failure interaction tests</h3><p class="caption">Failed / total runs with both techniques on and '
        "with each one alone (others at any level). p: the larger of the two one-sided Boschloo exact tests "
        "(both-on must fail more than <i>each</i> alone) and, below alpha, of the survival-interaction test "
        "(more than independent failures predict); p<sub>adj</sub>: step-down across pairs.</p>"
        + _table(
            ["pair", "both on (failed/n)", "first alone", "second alone", "p (Boschloo)", "p<sub>adj</sub>"],
            rows,
            num_cols=[4, 5],
        )
    )


def _samples_html(res: StudyResults, a: Analysis | AnalysisFailure) -> str:
    if not res.samples:
        return '<p class="caption">No sample grids were recorded for this study.</p>'
    order = (
        {c.cell: i for i, c in enumerate(_cell_order(a.attribution.cells, res.factors))}
        if isinstance(a, Analysis)
        else {}
    )
    figs, names = [], res.cell_names()
    for cell in sorted(res.samples, key=lambda c: (order.get(c, 1e9), c)):
        uri, name = _png_data_uri(res.samples[cell]), names.get(cell, cell)
        img = (
            f'<img alt="samples of {_esc(name)}" src="{uri}">'
            if uri
            else '<div class="caption">(sample grid missing or not a PNG)</div>'
        )
        caption = _esc(name) + (f" <code>{_esc(cell)}</code>" if name != cell else "")
        figs.append(f"<figure>{img}<figcaption>{caption}</figcaption></figure>")
    return '<div class="samples">' + "".join(figs) + "</div>"


def _alias_html(res: StudyResults, a: Analysis) -> str:
    rows = [[_esc(al.label), _num(al.estimate), _ci(al.ci)] for al in a.fit.aliased]
    design_rows = [[_esc(k), _esc(" = ".join(v))] for k, v in (res.aliases or {}).items()]
    out = ""
    if rows:
        out += _table(
            ["alias chain (detected from the design matrix)", "estimate (metric scale)", "CI"], rows, num_cols=[1]
        )
    if design_rows:
        out += "<h3>Alias structure emitted by the design</h3>" + _table(["effect", "aliased with"], design_rows)
    return out


# --------------------------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------------------------
def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "study"


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o) if math.isfinite(float(o)) else None
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)


def _over_steps_html(res: StudyResults, ov: OverSteps | AnalysisFailure) -> tuple[str, str]:
    """(caption, text when there is no chart) of the effects-over-training section."""
    if isinstance(ov, AnalysisFailure):
        return "", f"The effects over training could not be analysed: {_esc(ov.error)}"
    steps = ov.analysed_steps
    if len(steps) < 2:
        c = res.curves
        have = (
            []
            if c is None or c.empty or not {"key", "step"} <= set(c.columns)
            else sorted(pd.to_numeric(c.loc[c["key"] == ov.metric, "step"], errors="coerce").dropna().unique())
        )
        at = steps[0] if steps else ov.steps[-1]
        if len(have) > 1:
            where = (
                f"this report analyses step {at} of the {len(have)} steps at which {_esc(ov.metric)} was "
                "evaluated (<code>srdit analyze --all-steps</code> analyses them all)"
            )
        elif have:
            where = f"{_esc(ov.metric)} was evaluated at one step only (step {at})"
        else:
            where = f"no evaluation of {_esc(ov.metric)} during training was recorded (only the final one)"
        return "", (
            f"Only one step to analyse: {where}, so there are no effects over training. Evaluate during "
            "training with <code>train.eval_every</code> (e.g. <code>eval_every: 120</code> with "
            "<code>steps: 240</code>) to see whether an effect found at the end holds earlier."
        )
    pct = int(round(100 * (1 - ov.alpha)))
    statements = "".join(f"<li>{_esc(x)}</li>" for x in ov.statements)
    notes = "".join(f"<li>{_esc(x)}</li>" for x in ov.notes)
    failed = [s for s in ov.steps if s not in steps]
    no_ci = not any(p.ci for x in ov.series for p in x.points)
    return (
        f"The analysis above (of the last step), repeated at every evaluated step of {_esc(ov.metric)} "
        f"({len(steps)} steps: {_esc(', '.join(map(str, steps)))}). Top: each technique's main effect as a "
        f"gain (positive = better) with its individual {pct}% interval as a band; bottom: each pair's "
        "synergy S with the step's simultaneous interval over the pairs (dotted). Filled markers: the interval "
        "excludes 0; open markers: it does not. "
        + (
            '<span class="tag warn">no intervals</span> one run per cell: no error estimate, so no bands and no '
            "significance; run more seeds. "
            if no_ci
            else ""
        )
        + "The bands are <b>pointwise</b> (one step at a time): do not read a trend from them. "
        "Whether an effect changes over training is tested once, from the first to the last step, on the "
        "trials evaluated at both (paired; simultaneous intervals over the effects):"
        f'<ul class="flags">{statements}</ul>'
        + (f"Steps that could not be analysed: {_esc(', '.join(map(str, failed)))}. " if failed else "")
        + (f'<ul class="notes">{notes}</ul>' if notes else ""),
        "No effect is estimable at the evaluated steps.",
    )


class _Figures:
    """The figures of a page in order of appearance: a section holds a `@@FIG:<id>@@` placeholder that `inline`
    replaces with the figure's HTML (the first one carries plotly.js)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, go.Figure]] = []

    def add(self, div_id: str, fig: go.Figure) -> None:
        self.items.append((div_id, fig))

    def block(self, div_id: str, fig: go.Figure | None, title: str, caption: str, missing: str) -> str:
        """A section with the figure and its caption, or the `missing` text when there is no figure."""
        if fig is None:
            return f'<section id="sec-{div_id}"><h2>{title}</h2><p class="caption">{missing}</p></section>'
        self.add(div_id, fig)
        return (
            f'<section id="sec-{div_id}"><h2>{title}</h2><p class="caption">{caption}</p>'
            f'<div class="plot">@@FIG:{div_id}@@</div></section>'
        )

    def inline(self, body: str) -> str:
        for i, (div_id, fig) in enumerate(self.items):
            body = body.replace(f"@@FIG:{div_id}@@", _figure_html(fig, div_id, first=i == 0), 1)
        return body


def _summary_section(res: StudyResults, a: Analysis | AnalysisFailure) -> str:
    """The summary: the primary metric, its orientation and the summary cards."""
    primary_log = metric_registry.is_log(res.metric)
    mlabel = _metric_label(res.metric, res.direction, primary_log)
    log_note = ""
    if any(metric_registry.is_log(m) for m in [res.metric, *res.other_metrics]):
        log_note = "; throughput-like metrics are compared on the log scale (speed-ups multiply)"
    return (
        f'<section id="sec-summary"><h2>Summary</h2><p class="caption">Primary metric: {_esc(mlabel)}. '
        f"Gains are oriented so that <b>positive = better</b> for every metric{log_note}."
        f"</p>{_summary_cards(res, a)}</section>"
    )


def _primary_sections(fit: ReportFit, figs: _Figures) -> list[str]:
    """The primary metric's figures: synergy matrix, half-normal plot (unreplicated screens), effects, effects
    over training and the cumulative ladder."""
    res, a, over_steps = fit.results, fit.primary, fit.over_steps
    mlabel = _metric_label(res.metric, res.direction, metric_registry.is_log(res.metric))
    sections: list[str] = []
    k = len(res.factors)
    pct = int(round(100 * (1 - a.alpha)))
    syn_fig = fig_synergy(a) if k >= 2 else None
    sections.append(
        figs.block(
            "fig-synergy",
            syn_fig,
            "Synergy matrix",
            "Cell (row <i>i</i>, column <i>j</i>) shows S<sub>ij</sub> = (gain of <i>i</i> with <i>j</i> on) − "
            "(gain of <i>i</i> with <i>j</i> off) = 2·INT<sub>ij</sub>, averaged over the other techniques, in "
            f"units of {_esc(mlabel)} oriented so that <b>blue (&gt; 0) = synergy</b> (the pair is better together "
            "than its parts) and <b>red (&lt; 0) = antagonism</b>. Upper triangle: S with its "
            f"<b>simultaneous</b> {int(round(100 * (1 - a.alpha)))}% interval over the {a.pairs.n_tested} tested "
            "pair(s) (Bonferroni, pure error); <b>*</b> = the interval excludes 0 (full colour); "
            "<b>muted colour, <i>n.s.</i></b> = not significant; <b>✕</b> = flagged incompatible; "
            "<i>aliased</i> = not separable in this fractional design; <i>partly aliased</i> = biased by omitted "
            "interactions because cells are missing or failed (never tested); <i>fails</i> = runs with both "
            "techniques failed, so no metric exists. Lower triangle: the p-value of the decision (Bonferroni over "
            "the tested pairs, consistent with the stars; the effects table also gives p<sub>adj</sub> by "
            f"{_esc(a.correction)}).",
            "No pairwise synergy is estimable here: a synergy needs the cells of a (fractional) factorial, and "
            "leave-one-out or ladder designs run too few of them (see the per-technique effects below)."
            if k >= 2
            else "A synergy matrix needs at least two techniques.",
        )
    )
    hn = fig_half_normal(a)
    if hn is not None:
        L = a.fit.lenth
        sections.append(
            figs.block(
                "fig-half-normal",
                hn,
                "Unreplicated screen: half-normal plot",
                "One run per cell gives no error estimate from replicates. Lenth's pseudo standard error (PSE = "
                f"{_num(L['pse'], 3)}, from the small effects) gives an individual margin ME = "
                f"{_num(L['margin'], 3)} and a simultaneous margin SME = {_num(L['simultaneous_margin'], 3)}; "
                "labelled red points exceed ME (active at the individual level; beyond SME they hold for the whole "
                f"family): {_esc(', '.join(L['significant']) or 'none')}. Run more seeds to confirm.",
                "",
            )
        )
    sections.append(
        figs.block(
            "fig-effects",
            fig_effects(a, fit.loo_ci),
            "Effect of each technique",
            "Blue: main effect (mean gain with the technique on minus off, averaged over the design) with its "
            f"individual {pct}% confidence interval (none for a partly aliased effect: biased by omitted "
            "interactions, never tested). Orange: exact Shapley value (its fair share of g(all) − g(none), "
            "averaged over all stacking orders; full factorials only; no interval). Green: leave-one-out effect "
            "against the full stack (g(all) − g(all without i))"
            + (
                f" with Welch's individual {pct}% interval over the seeds of the two cells"
                if fit.loo_ci
                else " (no interval: the two cells need two or more finished seeds each)"
            )
            + ". All in gain units: positive = the technique helps.",
            "",
        )
    )
    ov_caption, ov_missing = _over_steps_html(res, over_steps)
    sections.append(
        figs.block(
            "fig-over-steps",
            fig_over_steps(over_steps) if isinstance(over_steps, OverSteps) else None,
            "Effects over training",
            ov_caption,
            ov_missing,
        )
    )
    sections.append(
        figs.block(
            "fig-ladder",
            fig_ladder(a, fit.ladder_ci),
            "Cumulative ladder",
            "Techniques stacked one at a time (like the paper's chain). Each bar is the change in "
            f"{_esc(res.metric)} from the previous row; green bars improve the metric, red bars hurt it. "
            + (
                f"Error bars: Welch's individual {pct}% interval of each step's change, over the seeds of the two "
                "cells (one step at a time, not simultaneous). "
                if fit.ladder_ci
                else "No intervals: the cells need two or more finished seeds each. "
            )
            + "A ladder is one stacking order: compare its steps with the Shapley values above to see how much "
            "the order matters.",
            "No ladder: the design has no nested chain of cells from the baseline to the full stack.",
        )
    )
    return sections


def _cost_and_curves_sections(fit: ReportFit, figs: _Figures) -> list[str]:
    """Quality versus cost and the learning curves (drawn whether or not the primary metric was analysed)."""
    res, a = fit.results, fit.primary
    ok = isinstance(a, Analysis)
    sections: list[str] = []
    pareto = fig_pareto(res, a) if ok else None
    sections.append(
        figs.block(
            "fig-pareto",
            pareto,
            "Quality versus cost",
            "Each point is a cell (mean over finished seeds; bar = ± one standard deviation). Red points form the Pareto "
            "front: no other cell is at least as good on both axes and better on one. The cost axis says where "
            "its throughput comes from: the controlled bench (<code>srdit study bench</code>) when the study has "
            "one, otherwise the trials' own clocks.",
            f"No throughput metric ({', '.join(throughput_metrics())}) was recorded, so there is no "
            "quality-versus-cost view."
            if ok
            else "No quality-versus-cost view: the primary metric was not analysed (see the summary).",
        )
    )
    idx = {f: i for i, f in enumerate(res.factors)}

    def stack(name: str) -> tuple[int, list[int]]:  # without an analysis: fewer techniques first, study order
        on = [idx[x] for x in name.split("+") if x in idx]
        return len(on), on

    by_names = sorted(res.cell_names().items(), key=lambda kv: stack(kv[1]))
    order = [c.cell for c in _cell_order(a.attribution.cells, res.factors)] if ok else [c for c, _ in by_names]
    base_cell = (
        next((c.cell for c in a.attribution.cells if not c.on), None)
        if ok
        else next((c for c, n in by_names if stack(n)[0] == 0), None)
    )
    sections.append(
        figs.block(
            "fig-curves",
            fig_curves(_without_evaluations(res) if fit.protocol_error else res, order, base_cell),
            "Learning curves",
            "Mean over seeds of each logged quantity against the training step, one line per cell (dashed, thicker: "
            "the baseline, no technique on; a quantity evaluated once per run shows as markers). "
            "Use the menu at the top right to switch quantities; click legend entries to hide cells.",
            "No learning curves were recorded.",
        )
    )
    return sections


def _without_evaluations(res: StudyResults) -> StudyResults:
    """`res` without the evaluated metrics' curves (those of different protocols must not share a chart)."""
    import dataclasses

    evaluated = {n for n, m in metric_registry.METRICS.items() if "train" not in m.producers}
    c = res.curves
    keep = c[~c["key"].isin(evaluated)] if c is not None and "key" in c.columns else c
    return dataclasses.replace(res, curves=keep)


def _exploratory_reading(analyses: dict[str, Analysis | AnalysisFailure], primary: str, alpha: float) -> str:
    """How to read the secondary metrics' matrices: the FCR-adjusted intervals of their BH family (Benjamini &
    Yekutieli 2005) with R, m and the marginal level, the star and the lower triangle's q."""
    fam = [am for m, am in analyses.items() if m != primary and isinstance(am, Analysis) and am.pairs.fcr_level]
    conf = int(round(100 * (1 - alpha)))
    if not fam:
        lenth = any(
            isinstance(am, Analysis) and (am.fit.lenth or {}).get("significant_simultaneous")
            for m, am in analyses.items()
            if m != primary
        )
        lead = (
            "; a star on this unreplicated screen is the metric's own Lenth simultaneous margin (as in the "
            "half-normal plot), a lead only."
        )
        return (
            "No pair of these metrics has a t test here (no replicates, or every pair aliased or untested), so no "
            "Benjamini-Hochberg family is formed and no interval is FCR-adjusted" + (lead if lenth else ".")
        )
    m = sum(1 for am in fam for q in am.pairs.p_adj.values() if q is not None)
    r = sum(len(am.pairs.significant) for am in fam)
    level = level_pct(fam[0].pairs.fcr_level)
    return (
        f"Upper triangle: S with its <b>FCR-adjusted (Benjamini-Yekutieli) {conf}% interval for the BH "
        f"family</b>: each a t interval at the marginal level 1 − R·α/m = {level} (R = {r} pair(s) selected of "
        f"m = {m} tested, α = {alpha}{'; with none selected, Bonferroni’s level' if r == 0 else ''}), so that the "
        f"selected intervals miss their true synergy at a rate of at most α (false coverage rate, Benjamini &amp; "
        "Yekutieli 2005). <b>*</b> (full colour) = selected by BH, which is exactly an interval that excludes 0; "
        "<b>muted colour, <i>n.s.</i></b> = not selected (its interval covers 0); <b>✕</b> = flagged "
        "incompatible (a selected antagonism, or runs that fail together). Lower triangle: the pair's "
        "Benjamini-Hochberg q (the decision: q &lt; α). Unlike the main matrix, these intervals are not "
        "simultaneous: they hold on average over the selected pairs."
    )


def _tables_sections(fit: ReportFit, figs: _Figures) -> list[str]:
    """The other metrics' synergy matrices (exploratory), the table of all effects and the cells table."""
    res, a, analyses = fit.results, fit.primary, fit.analyses
    sections: list[str] = []
    others = [m for m in analyses if m != res.metric]
    blocks = []
    for m in others:
        am = analyses[m]
        if isinstance(am, AnalysisFailure):
            blocks.append(f'<p class="caption">{_esc(m)}: {_esc(am.error)}</p>')
            continue
        if am.notes and am.notes[0] in (BENCH_NOTE, CONTENTION_NOTE):  # where a wall-clock metric comes from
            warn = am.notes[0] == CONTENTION_NOTE
            blocks.append(
                f'<p class="caption"><span class="tag {"warn" if warn else "good"}">'
                f"{'caveat' if warn else 'bench'}</span> {_esc(m)}: {_esc(am.notes[0])}</p>"
            )
        if len(res.factors) >= 2:
            fid = "fig-synergy-" + _safe_name(m)
            fig = fig_synergy(am, title=f"Synergy on {_metric_label(m, am.direction, am.scale == 'log')}")
            if fig is not None:
                figs.add(fid, fig)
                blocks.append(f'<div class="plot">@@FIG:{fid}@@</div>')
    if blocks:
        sections.append(
            '<section id="sec-other"><h2>Synergy on the other metrics <span class="tag warn">'
            'exploratory</span></h2><p class="caption">Each metric is oriented so that positive = better '
            "(throughput on the log scale: S = 0.1 means the pair is ≈10% faster together than their separate "
            "speed-ups predict). The primary metric is the confirmatory test; these are exploratory: their pair "
            "tests form one family over all secondary metrics, controlled by Benjamini-Hochberg (false discovery "
            f"rate {a.alpha}), and a star here is a lead to confirm, not a finding. "
            + _exploratory_reading(analyses, res.metric, a.alpha)
            + "</p>"
            + "".join(blocks)
            + "</section>"
        )
    sections.append(
        '<section id="sec-effects-table"><h2>All effects</h2><p class="caption">Estimates on the '
        "gain scale (positive = better; the metric's own scale before orientation, in the textbook convention "
        "ME = mean(y|on) − mean(y|off) and INT = half the difference of conditional effects, is in "
        '<a href="effects.json">effects.json</a>).'
        f"</p>{_effects_table(a, fit)}"
        + (f"<h3>Aliasing</h3>{_alias_html(res, a)}" if (a.fit.aliased or res.aliases) else "")
        + "</section>"
    )
    sections.append(
        f'<section id="sec-cells"><h2>Cells</h2><p class="caption">Mean ± standard deviation over '
        f"finished seeds for every metric, and the primary metric of every run by seed. The same data beside this "
        f'page: <a href="cells.csv">cells.csv</a> (one row per cell) and <a href="effects.json">effects.json</a> '
        f"(every metric's analysis).{_runs_caption(res)}</p>{_cells_table(res, analyses)}</section>"
    )
    return sections


def _closing_sections(res: StudyResults, a: Analysis | AnalysisFailure) -> list[str]:
    """Failed and excluded cells, the sample grids and the notes of the analysis."""
    ok = isinstance(a, Analysis)
    sections: list[str] = []
    infra = (
        f" <b>{a.n_infrastructure} run(s) failed for a reason outside the training code</b> (crash cause "
        "infrastructure: a lost worker or node, a missing file, the driver's own error): they are left out of "
        "both analyses and not listed here; a rerun of the study retries them."
        if ok and a.n_infrastructure
        else ""
    )
    sections.append(
        '<section id="sec-failures"><h2>Failed and excluded cells</h2><p class="caption">Failed runs '
        "(diverged = NaN/inf loss, oom = out of memory, crashed = an exception the training code raised) are kept "
        "as data: they are left out of the metric models and used as evidence of failure interactions (a pair is "
        "flagged "
        "when runs with both techniques fail more often than runs with each alone, one-sided Boschloo "
        "exact tests, <i>and</i> more than the two techniques' own failure rates predict together, a "
        "likelihood-ratio test of independent failures). Runs with another status (blank, cancelled) "
        "are not evidence and are left out of both analyses. Excluded cells were never run because a "
        f"constraint of the study forbids them.{infra}"
        f"</p>{_failures_table(res, a) if ok else ''}{_failure_tests_table(a) if ok else ''}</section>"
    )
    sections.append(
        f'<section id="sec-samples"><h2>Samples</h2><p class="caption">Sample grid recorded '
        f"for each cell, embedded in this page.</p>{_samples_html(res, a)}</section>"
    )
    if ok and a.notes:
        sections.append(
            '<section id="sec-notes"><h2>Notes on the analysis</h2><ul class="notes">'
            + "".join(f"<li>{_esc(n)}</li>" for n in a.notes)
            + "</ul></section>"
        )
    return sections


def _protocol_header(fit: ReportFit) -> str:
    """The header's line on the evaluation protocol every metric was computed under (or the refusal)."""
    ps = fit.protocols
    if not ps:
        return (
            'evaluation protocol <span class="tag warn">not recorded</span> (the runs carry no sample / eval '
            "config): compare these metrics only with runs you know were evaluated the same way"
        )
    if fit.protocol_error:
        return (
            f'evaluation protocol <span class="tag bad">{len(ps)} different protocols</span>: no comparison is '
            'made (<a href="#sec-protocols">which cells used which</a>)'
        )
    items = " · ".join(
        f"{_esc(PROTOCOL_COLUMNS[c])} <b>{_esc(v or 'not recorded')}</b>" for c, v in ps[0].values.items()
    )
    return f"every metric evaluated under one protocol: {items}"


def _protocols_section(ps: list[Protocol], error: str) -> str:
    """The refusal of a mixed-protocol study: the message and the protocols side by side."""
    cols = list(ps[0].values)
    rows = [
        [str(i + 1), str(p.n_runs), _esc(", ".join(p.cells)), *(_esc(p.values[c] or "not recorded") for c in cols)]
        for i, p in enumerate(ps)
    ]
    return (
        '<section id="sec-protocols"><h2>Evaluation protocols <span class="tag bad">not comparable</span></h2>'
        f'<p class="caption">{_esc(error[0].upper() + error[1:])}.</p>'
        + _table(["protocol", "runs", "cells", *(_esc(PROTOCOL_COLUMNS[c]) for c in cols)], rows, num_cols=[1])
        + "</section>"
    )


def _page_html(fit: ReportFit, body: str) -> str:
    """The whole page around the sections: header (design, techniques, commit, context, evaluation protocol),
    navigation, footer."""
    res, a = fit.results, fit.primary
    ok = isinstance(a, Analysis)
    nav = "".join(
        f'<a href="#{sid}">{name}</a>'
        for sid, name in [
            ("sec-summary", "Summary"),
            ("sec-fig-synergy", "Synergy"),
            ("sec-fig-effects", "Effects"),
            ("sec-fig-over-steps", "Over training"),
            ("sec-fig-ladder", "Ladder"),
            ("sec-fig-pareto", "Pareto"),
            ("sec-fig-curves", "Curves"),
            ("sec-cells", "Cells"),
            ("sec-failures", "Failures"),
            ("sec-samples", "Samples"),
        ]
    )
    techniques = ", ".join(f"<code>{_esc(f)}</code>" for f in res.factors)
    meta = (
        f"design <code>{_esc(res.design)}</code> · techniques {techniques}"
        f" · commit <code>{_esc(res.commit or 'unknown')}</code> · {_esc(res.date or '')}"
    )
    meta += "<br>" + _header_context(res, a if ok else None)
    meta += '<br><span id="protocol">' + _protocol_header(fit) + "</span>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(res.study)} — srdit study report</title>
<style>{CSS}</style>
{ERROR_HOOK}
</head><body>
<header><div class="wrap"><h1>{_esc(res.study)}</h1><div class="meta">{meta}</div><nav>{nav}</nav></div></header>
<main>
<pre id="js-errors"></pre>
{body}
</main>
<footer>Generated by srdit on {_esc(_dt.datetime.now().strftime("%Y-%m-%d %H:%M"))}.
Self-contained: opens offline.</footer>
</body></html>
"""


def _write_side_files(fit: ReportFit, out: Path) -> None:
    """effects.json (every metric), effects_over_steps.json (when analysed), cells.csv and summary.json (the
    index page reads it)."""
    res, a, analyses, over_steps = fit.results, fit.primary, fit.analyses, fit.over_steps
    ok = isinstance(a, Analysis)
    (out / "effects.json").write_text(
        json.dumps({m: am.to_json() for m, am in analyses.items()}, indent=1, default=_json_default), encoding="utf-8"
    )
    if isinstance(over_steps, OverSteps):
        (out / "effects_over_steps.json").write_text(
            json.dumps(over_steps.to_json(), indent=1, default=_json_default), encoding="utf-8"
        )
    if ok:
        pd.DataFrame(
            [
                {k: (v if not isinstance(v, (list, dict)) else json.dumps(v)) for k, v in c.to_json().items()}
                for c in a.attribution.cells
            ]
        ).to_csv(out / "cells.csv", index=False)
    summary = {
        "study": res.study,
        "design": res.design,
        "factors": list(res.factors),
        "metric": res.metric,
        "direction": res.direction,
        "commit": res.commit,
        "date": res.date,
        "n_runs": a.n_runs if ok else None,
        "n_failed": a.n_failed if ok else None,
        "best": a.attribution.best.to_json() if ok and a.attribution.best else None,
        "strongest_synergy": a.pairs.strongest.to_json() if ok and a.pairs.strongest else None,
        "incompatible": sorted({fl.pair for fl in a.incompatible}) if ok else [],
        "error": None if ok else a.error,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default), encoding="utf-8")


def render_report(fit: ReportFit, out_dir: str | Path) -> Path:
    """Write `out_dir/index.html` (self-contained) plus effects.json, effects_over_steps.json, cells.csv and
    summary.json from a fitted report (`report_fit.fit_report`, or a `ReportFit` built from analyses already at
    hand); return the HTML path. Renders only: it fits nothing (the numbers on the page are those of `fit`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res, a = fit.results, fit.primary
    ok = isinstance(a, Analysis)
    figs = _Figures()
    sections = [_summary_section(res, a)]
    if fit.protocol_error:
        sections.append(_protocols_section(fit.protocols, fit.protocol_error))
    if ok:
        sections += _primary_sections(fit, figs)
    sections += _cost_and_curves_sections(fit, figs)
    if ok:
        sections += _tables_sections(fit, figs)
    sections += _closing_sections(res, a)
    page = _page_html(fit, figs.inline("\n".join(sections)))
    path = out / "index.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    _write_side_files(fit, out)
    return path


def render_index(dashboards_dir: str | Path) -> Path:
    """Write `dashboards_dir/index.html` listing every study folder that holds an index.html."""
    root = Path(dashboards_dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and (p / "index.html").exists()):
        s: dict = {}
        try:
            s = json.loads((d / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        best = s.get("best") or {}
        best_txt = f"{_esc(best.get('combo', ''))} ({_num(best.get('mean'), 4)})" if best else "–"
        inc = s.get("incompatible") or []
        rows.append(
            [
                f'<a href="{_esc(d.name)}/index.html">{_esc(s.get("study", d.name))}</a>',
                _esc(s.get("design", "")),
                _esc(", ".join(s.get("factors", []))),
                _esc(f"{s.get('metric', '')} ({s.get('direction', '')})") if s else "",
                best_txt,
                (" ".join(f'<span class="tag bad">{_esc(p)}</span>' for p in inc) or "none"),
                f"<code>{_esc((s.get('commit') or '')[:10])}</code>",
                _esc(s.get("date", "")),
            ]
        )
    table = (
        _table(["study", "design", "techniques", "metric", "best combination", "incompatible", "commit", "date"], rows)
        if rows
        else '<p class="caption">No study reports yet: run <code>make study</code>.</p>'
    )
    records = root / "RECORDS.md"
    rec = '<p class="caption">Records table: <a href="RECORDS.md">RECORDS.md</a>.</p>' if records.exists() else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>srdit studies</title><style>{CSS}</style></head><body>
<header><div class="wrap"><h1>srdit studies</h1><div class="meta">{len(rows)} study report(s)</div></div></header>
<main><section><h2>Studies</h2><p class="caption">One report per study; each opens offline.</p>{table}{rec}</section>
</main></body></html>
"""
    path = root / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
