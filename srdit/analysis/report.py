"""Study dashboards: one self-contained HTML page per study (plotly.js inline once, PNG samples as data URIs, opens
offline), an index of all studies, and a markdown records table.

Built from a `StudyResults` (a plain dataclass the study layer fills from MLflow, or anyone fills from a CSV).
plotly.py docs: `Figure.to_html(full_html=False, include_plotlyjs=True|False)` embeds the library once and then
reuses the global `Plotly` object (https://plotly.com/python/interactive-html-export/).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from scipy import stats

from srdit.analysis.effects import OK_STATUSES, AnalysisError, analyze, combo_label

__all__ = ["StudyResults", "render_report", "render_index", "write_records", "is_log_metric", "analyze_study"]

CURVE_COLUMNS = ["trial", "cell", "seed", "key", "step", "value"]
TABLE_BASE_COLUMNS = ["trial", "cell", "seed", "status", "status_reason"]


def is_log_metric(name: str) -> bool:
    """Throughput-like metrics (speed-ups multiply) are analysed on the log scale."""
    return "per_s" in name or name.startswith("throughput")


@dataclass
class StudyResults:
    """Everything a study report needs; one row per trial in `table`.

    Fields:
        study: study name (also the dashboard folder name).
        design: design name, e.g. "full", "frac(res=5)", "ladder", "loo".
        factors: technique names; each is a 0/1 column of `table`.
        metric: primary metric column (e.g. "fd").
        direction: "min" or "max" for the primary metric.
        other_metrics: other metric columns -> direction (names containing "per_s" are analysed on the log scale).
        table: one row per trial: trial, cell (str id), seed, status ("finished"/"diverged"/"oom"/"crashed"),
            status_reason, one 0/1 column per factor, metric columns (NaN for failed trials).
        curves: learning curves: trial, cell, seed, key, step, value.
        samples: cell id -> path to a PNG sample grid.
        excluded: cells excluded by constraints: {"cell": ..., "techniques": [...], "reason": ...}.
        aliases: effect -> aliased effects (fractional designs, as emitted by the design generator).
        ladder_order: factor order of a ladder design (None: inferred from the cells when possible).
        commit: git commit of the code that produced the runs.
        date: date of the study (ISO string).
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


# --------------------------------------------------------------------------------------------------------------------
# analysis of a study (all metrics)
# --------------------------------------------------------------------------------------------------------------------
def analyze_study(results: StudyResults, *, alpha: float = 0.05, threshold: float = 0.0,
                  bootstrap: bool = True) -> dict[str, dict]:
    """Run `analyze` for the primary metric and every other metric; value is the analysis dict or {"error": msg}."""
    out: dict[str, dict] = {}
    metrics = {results.metric: results.direction, **{m: d for m, d in results.other_metrics.items()
                                                      if m != results.metric}}
    for m, d in metrics.items():
        try:
            out[m] = analyze(results.table, results.factors, m, d, log=is_log_metric(m), alpha=alpha,
                             threshold=threshold if m == results.metric else 0.0, bootstrap=bootstrap,
                             ladder_order=results.ladder_order, strict=False)
        except AnalysisError as e:
            out[m] = {"error": str(e), "metric": m, "direction": d}
    return out


# --------------------------------------------------------------------------------------------------------------------
# small formatting helpers
# --------------------------------------------------------------------------------------------------------------------
def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, nd: int = 4) -> str:
    if x is None:
        return "–"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return _esc(x)
    if not math.isfinite(v):
        return "–"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.{max(nd - 1, 1)}e}"
    return f"{v:.{nd}g}"


def _pv(p: Any) -> str:
    if p is None:
        return "–"
    p = float(p)
    return "<1e-4" if p < 1e-4 else f"{p:.3g}"


def _ci(c: Any, nd: int = 3) -> str:
    return "–" if not c else f"[{_num(c[0], nd)}, {_num(c[1], nd)}]"


def _metric_label(metric: str, direction: str, log: bool) -> str:
    arrow = "↑" if direction == "max" else "↓"
    return f"{'log ' if log else ''}{metric} ({arrow} better)"


def _cell_order(cells: Iterable[dict], factors: Sequence[str]) -> list[dict]:
    idx = {f: i for i, f in enumerate(factors)}
    return sorted(cells, key=lambda c: (len(c["on"]), [idx[f] for f in c["on"]]))


PALETTE = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2", "#FF9DA6", "#9D755D",
           "#BAB0AC", "#1F77B4", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#17BECF"]
LAYOUT = dict(template="plotly_white", font=dict(family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif",
                                                    size=13),
              margin=dict(l=70, r=30, t=50, b=60), height=440)


# --------------------------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------------------------
def fig_synergy(a: dict, title: str | None = None) -> go.Figure | None:
    """Symmetric matrix of S_ij (oriented), text = value, CI, significance mark; aliased / failed cells labelled.
    None when no pair is estimable (leave-one-out and ladder designs lack the cells): an all-empty heatmap has no
    colour range and plotly fails on it."""
    if not any(v is not None for v in a["synergy"].values()) and not a["incompatible"] and not a["aliased"]:
        return None
    f = a["factors"]
    k = len(f)
    z = [[None] * k for _ in range(k)]
    txt = [[""] * k for _ in range(k)]
    hover = [[""] * k for _ in range(k)]
    flagged = {fl["pair"]: fl for fl in a["incompatible"]}
    aliased = {n: al["label"] for al in a["aliased"] for n in al["effects"]}
    inest = {i["effect"]: i["reason"] for i in a["inestimable"]}
    for i in range(k):
        for j in range(k):
            if i == j:
                txt[i][j] = f"<i>{_esc(f[i])}</i>"
                hover[i][j] = f"{f[i]}"
                continue
            n = f"{f[min(i, j)]}:{f[max(i, j)]}"
            s = a["synergy"].get(n)
            mark = ""
            padj = a["p_adj"].get(n)
            if padj is not None and padj < a["alpha"]:
                mark = "*"
            if n in flagged:
                mark += " ✕"
            if s is not None:
                z[i][j] = s
                ci = a["synergy_ci"].get(n)
                txt[i][j] = f"<b>{_num(s, 3)}{mark}</b>" + (f"<br>{_ci(ci, 2)}" if ci else "")
                hover[i][j] = (f"S({n}) = {_num(s)}<br>CI {_ci(ci)}<br>p_adj {_pv(padj)}"
                               + (f"<br>flagged: {flagged[n]['kind']}" if n in flagged else ""))
            elif n in aliased:
                txt[i][j] = "aliased"
                hover[i][j] = f"{n}: aliased ({aliased[n]})"
            elif n in flagged:
                txt[i][j] = "fails ✕"
                hover[i][j] = f"{n}: runs with both fail ({flagged[n]['kind']})"
            else:
                txt[i][j] = "n/a"
                hover[i][j] = f"{n}: {inest.get(n, 'inestimable')}"
    vals = [abs(v) for row in z for v in row if v is not None]
    zmax = max(vals) if vals else 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=f, y=f, text=txt, texttemplate="%{text}", hovertext=hover, hoverinfo="text",
        colorscale="RdBu", zmid=0, zmin=-zmax, zmax=zmax, xgap=3, ygap=3, textfont=dict(size=12),
        colorbar=dict(title=dict(text="S<sub>ij</sub><br>(gain)")),
    ))
    fig.update_layout(**LAYOUT, title=title or "Synergy matrix S<sub>ij</sub>")
    fig.update_layout(height=max(380, 90 * k + 140), width=None)
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain")
    fig.update_xaxes(side="bottom", constrain="domain")
    return fig


def fig_effects(a: dict) -> go.Figure:
    """Main effects (oriented, with CI), Shapley attribution and leave-one-out effects side by side."""
    sign = 1 if a["direction"] == "max" else -1
    f = a["factors"]
    me = [None if a["main_effects"].get(x) is None else sign * a["main_effects"][x] for x in f]
    lo, hi = [], []
    for x, v in zip(f, me):
        c = a["ci"].get(x)
        if c and v is not None:
            cc = sorted([sign * c[0], sign * c[1]])
            lo.append(v - cc[0])
            hi.append(cc[1] - v)
        else:
            lo.append(0)
            hi.append(0)
    fig = go.Figure()
    fig.add_bar(name="main effect (avg. over design)", x=f, y=me, marker_color=PALETTE[0],
                error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo, visible=bool(a["ci"])))
    if a.get("shapley"):
        fig.add_bar(name="Shapley (share of all − none)", x=f, y=[a["shapley"].get(x) for x in f],
                    marker_color=PALETTE[1])
    if any(v is not None for v in a["loo"].values()):
        fig.add_bar(name="leave-one-out (all − all∖i)", x=f, y=[a["loo"].get(x) for x in f],
                    marker_color=PALETTE[2])
    fig.add_hline(y=0, line_color="#444", line_width=1)
    fig.update_layout(**LAYOUT, barmode="group", title="Effect of each technique (gain, positive = better)",
                      yaxis_title=f"gain in {'log ' if a['scale'] == 'log' else ''}{a['metric']}",
                      legend=dict(orientation="h", y=-0.15))
    return fig


def fig_ladder(a: dict) -> go.Figure | None:
    rows = a.get("ladder")
    if not rows or rows[0]["mean"] is None:
        return None
    x, y, measure, text = [], [], [], []
    for r in rows:
        if r["mean"] is None:
            break
        if r["step"] == 0:
            x.append("baseline")
            y.append(r["mean"])
            measure.append("absolute")
            text.append(_num(r["mean"], 4))
        else:
            x.append(f"+ {r['added']}")
            y.append(r["delta"])
            measure.append("relative")
            text.append(("+" if r["delta"] >= 0 else "") + _num(r["delta"], 3))
    x.append("final")
    y.append(None)
    measure.append("total")
    text.append(_num(rows[len(x) - 2]["mean"], 4))
    good, bad = "#3B8B5A", "#C0504D"
    up, down = (good, bad) if a["direction"] == "max" else (bad, good)
    fig = go.Figure(go.Waterfall(
        x=x, y=y, measure=measure, text=text, textposition="outside",
        increasing=dict(marker_color=up), decreasing=dict(marker_color=down), totals=dict(marker_color="#4C78A8"),
        connector=dict(line=dict(color="#999", width=1, dash="dot")),
    ))
    means = [r["mean"] for r in rows if r["mean"] is not None]
    span = max(means) - min(means) if len(means) > 1 else abs(means[0]) or 1.0
    fig.update_layout(**LAYOUT, title=f"Cumulative ladder ({a['ladder_kind']} order)", yaxis_title=a["metric"],
                      showlegend=False)
    fig.update_yaxes(range=[min(means) - 0.6 * span, max(means) + 0.4 * span])
    return fig


def _pareto_mask(xs: Sequence[float], ys: Sequence[float]) -> list[bool]:
    """Non-dominated points when both coordinates are to be maximised."""
    out = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        dom = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(zip(xs, ys)) if j != i)
        out.append(not dom)
    return out


def _cost_metric(res: StudyResults) -> tuple[str, str] | None:
    if "images_per_s" in res.table.columns:
        return "images_per_s", res.other_metrics.get("images_per_s", "max")
    for m, d in res.other_metrics.items():
        if is_log_metric(m) and m in res.table.columns:
            return m, d
    return None


def fig_pareto(res: StudyResults, a: dict) -> go.Figure | None:
    cm = _cost_metric(res)
    if cm is None:
        return None
    cost, cdir = cm
    t = res.table
    ok = t["status"].astype(str).str.lower().isin(OK_STATUSES) if "status" in t.columns else pd.Series(True, t.index)
    ok &= np.isfinite(pd.to_numeric(t[res.metric], errors="coerce")) & np.isfinite(
        pd.to_numeric(t[cost], errors="coerce"))
    cell_of = {c["combo"]: c for c in a["cells"]}
    pts = []
    for combo, g in t[ok].assign(_combo=[combo_label(f for f in res.factors if int(r[f]) == 1)
                                         for _, r in t[ok].iterrows()]).groupby("_combo"):
        pts.append({"combo": combo, "cell": cell_of.get(combo, {}).get("cell", combo),
                    "x": float(np.exp(np.log(g[cost].astype(float)).mean())) if is_log_metric(cost) else
                    float(g[cost].astype(float).mean()),
                    "y": float(g[res.metric].astype(float).mean()),
                    "ysd": float(g[res.metric].astype(float).std(ddof=1)) if len(g) > 1 else 0.0,
                    "n": len(g)})
    if not pts:
        return None
    sx = 1 if cdir == "max" else -1
    sy = 1 if res.direction == "max" else -1
    front = _pareto_mask([sx * p["x"] for p in pts], [sy * p["y"] for p in pts])
    fig = go.Figure()
    dom = [p for p, f_ in zip(pts, front) if not f_]
    fr = sorted([p for p, f_ in zip(pts, front) if f_], key=lambda p: p["x"])
    for group, name, color, size in ((dom, "dominated", "#9AA5B1", 10), (fr, "Pareto front", "#E45756", 13)):
        if not group:
            continue
        fig.add_scatter(
            x=[p["x"] for p in group], y=[p["y"] for p in group], mode="markers+text", name=name,
            text=[p["cell"] for p in group], textposition="top center", marker=dict(size=size, color=color),
            error_y=dict(type="data", array=[p["ysd"] for p in group], color=color, thickness=1),
            hovertemplate="%{text}<br>" + cost + " %{x:.4g}<br>" + res.metric + " %{y:.4g}<extra></extra>",
        )
    if len(fr) > 1:
        fig.add_scatter(x=[p["x"] for p in fr], y=[p["y"] for p in fr], mode="lines", name="front",
                        line=dict(color="#E45756", dash="dot"), hoverinfo="skip", showlegend=False)
    fig.update_layout(**LAYOUT, title=f"Quality versus cost: {res.metric} against {cost}",
                      xaxis_title=f"{cost} ({'↑' if cdir == 'max' else '↓'} better, geometric mean over seeds)",
                      yaxis_title=f"{res.metric} ({'↑' if res.direction == 'max' else '↓'} better, mean ± sd)")
    if is_log_metric(cost):
        fig.update_xaxes(type="log")
    return fig


def fig_curves(res: StudyResults, cells_order: Sequence[str]) -> go.Figure | None:
    c = res.curves
    if c is None or c.empty or not set(CURVE_COLUMNS) <= set(c.columns):
        return None
    c = c.copy()
    c["value"] = pd.to_numeric(c["value"], errors="coerce")
    keys = list(dict.fromkeys([k for k in (res.metric, "loss") if k in set(c["key"])] + list(c["key"].unique())))
    keys = keys[:6]
    order = {cell: i for i, cell in enumerate(cells_order)}
    cells = sorted(c["cell"].astype(str).unique(), key=lambda x: (order.get(x, 1e9), x))
    fig = go.Figure()
    vis_by_key = []
    for ki, key in enumerate(keys):
        sub = c[c["key"] == key]
        start = len(fig.data)
        for ci, cell in enumerate(cells):
            g = sub[sub["cell"].astype(str) == cell]
            if g.empty:
                continue
            m = g.groupby("step")["value"].agg(["mean", "std", "count"]).reset_index()
            color = PALETTE[ci % len(PALETTE)]
            fig.add_scatter(x=m["step"], y=m["mean"], mode="lines", name=cell, legendgroup=cell, visible=ki == 0,
                            line=dict(color=color, width=2, dash="dash" if cell in ("baseline", "none") else None),
                            hovertemplate=cell + " step %{x}: %{y:.4g}<extra></extra>")
        vis_by_key.append((start, len(fig.data)))
    if not fig.data:
        return None
    buttons = []
    for ki, key in enumerate(keys):
        vis = [vis_by_key[ki][0] <= i < vis_by_key[ki][1] for i in range(len(fig.data))]
        buttons.append(dict(label=key, method="update", args=[{"visible": vis}, {"yaxis.title.text": key}]))
    fig.update_layout(**LAYOUT, title="Learning curves (mean over seeds, per cell)", xaxis_title="step",
                      yaxis_title=keys[0])
    if len(keys) > 1:
        fig.update_layout(updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.15,
                                            yanchor="top", showactive=True)])
    return fig


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
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="data"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _figure_html(fig: go.Figure, div_id: str, first: bool) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=bool(first), div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def _png_data_uri(path: str | Path) -> str | None:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _flag_text(fl: dict, a: dict) -> str:
    if fl["kind"] == "antagonism":
        return (f"<b>{_esc(fl['pair'])}</b> — antagonism: S = {_num(fl['estimate'], 3)} "
                f"(CI {_ci(fl['ci'])}, p<sub>adj</sub> = {_pv(fl['p_adj'])}; threshold {_num(fl['threshold'])})")
    c = fl["counts"]
    parts = ", ".join(f"{_esc(k.replace('_alone', ' alone'))} {v['failed']}/{v['n']}" for k, v in c.items())
    st = ", ".join(f"{_esc(k)} ×{v}" for k, v in fl.get("statuses", {}).items())
    return (f"<b>{_esc(fl['pair'])}</b> — runs fail together: {parts} failed"
            f"{' (' + st + ')' if st else ''}; Fisher p<sub>adj</sub> = {_pv(fl['p_adj'])}")


def _summary_cards(res: StudyResults, a: dict) -> str:
    cards = []
    if "error" in a:
        return f'<div class="card bad"><div class="label">analysis</div><div class="value">not possible</div>' \
               f'<div class="detail">{_esc(a["error"])}</div></div>'
    b = a.get("best")
    if b:
        sd = f" ± {_num(b['sd'], 3)}" if b.get("sd") is not None else ""
        cards.append(f'<div class="card good"><div class="label">best combination</div>'
                     f'<div class="value">{_esc(b["combo"])}</div>'
                     f'<div class="detail">{_esc(res.metric)} = {_num(b["mean"], 4)}{sd} '
                     f'({b["n_finished"]}/{b["n"]} runs finished)</div></div>')
    s = a.get("strongest_synergy")
    if s and s["estimate"] is not None and s["estimate"] > 0:
        sig = ""
        if s.get("p_adj") is not None:
            sig = f", p<sub>adj</sub> = {_pv(s['p_adj'])}"
        cards.append(f'<div class="card"><div class="label">strongest synergy</div>'
                     f'<div class="value">{_esc(s["pair"])}</div>'
                     f'<div class="detail">S = {_num(s["estimate"], 3)} gain'
                     f'{" (CI " + _ci(s["ci"]) + ")" if s.get("ci") else ""}{sig}</div></div>')
    elif not any(v is not None for v in a.get("synergy", {}).values()):  # ladder, leave-one-out
        cards.append('<div class="card"><div class="label">strongest synergy</div><div class="value">not estimable'
                     '</div><div class="detail">this design does not vary pairs of techniques independently'
                     '</div></div>')
    else:
        cards.append('<div class="card"><div class="label">strongest synergy</div><div class="value">none</div>'
                     '<div class="detail">no pair gains more together than apart</div></div>')
    flags = a.get("incompatible", [])
    if flags:
        pairs = sorted({fl["pair"] for fl in flags})
        cards.append(f'<div class="card bad"><div class="label">incompatible pairs</div>'
                     f'<div class="value">{_esc(", ".join(pairs))}</div>'
                     f'<div class="detail">{len(flags)} flag(s), details below</div></div>')
    else:
        cards.append('<div class="card"><div class="label">incompatible pairs</div>'
                     '<div class="value">none flagged</div>'
                     f'<div class="detail">at α = {a["alpha"]} after {_esc(a["correction"])} correction</div></div>')
    n_fail = a["n_failed"]
    cards.append(f'<div class="card{" warn" if n_fail else ""}"><div class="label">runs</div>'
                 f'<div class="value">{a["n_finished"]} finished / {a["n_runs"]}</div>'
                 f'<div class="detail">{n_fail} failed, {len(res.excluded)} cell(s) excluded by constraints, '
                 f'{a["n_cells"]} cells</div></div>')
    html_ = '<div class="summary">' + "".join(cards) + "</div>"
    if flags:
        html_ += '<ul class="flags">' + "".join(f"<li>{_flag_text(fl, a)}</li>" for fl in flags) + "</ul>"
    return html_


def _effects_table(a: dict) -> str:
    rows = []
    scale = "log " if a["scale"] == "log" else ""
    for f_, v in a["main_effects"].items():
        rows.append([_esc(f_), "main", _num(v), _ci(a["ci"].get(f_)), _pv(a["p"].get(f_)), "", "", "", "",
                     _num(a["shapley"].get(f_)) if a.get("shapley") else "–", _num(a["loo"].get(f_))])
    alias = {n: al["label"] for al in a["aliased"] for n in al["effects"]}
    for n, v in a["interactions"].items():
        note = ""
        if n in alias:
            note = f' <span class="tag warn">aliased: {_esc(alias[n])}</span>'
        rows.append([_esc(n) + note, "pair", _num(v), _ci(a["ci"].get(n)), _pv(a["p"].get(n)),
                     _num(a["synergy"].get(n)), _pv(a["p_adj"].get(n)), _num(a["dividends"].get(n)),
                     _num(a["dividends_full"].get(n)), "", ""])
    return _table(["effect", "kind", f"estimate ({scale}{_esc(a['metric'])})", "CI", "p", "synergy S",
                   "p<sub>adj</sub>", "D vs baseline", "D vs full stack", "Shapley", "leave-one-out"],
                  rows, num_cols=[2, 4, 5, 6, 7, 8, 9, 10])


def _cells_table(res: StudyResults, analyses: dict[str, dict]) -> str:
    a = analyses[res.metric]
    metrics = [m for m in analyses if "error" not in analyses[m]]
    by_metric = {m: {c["combo"]: c for c in analyses[m]["cells"]} for m in metrics}
    rows = []
    for c in _cell_order(a["cells"], res.factors):
        cells = []
        for m in metrics:
            cc = by_metric[m].get(c["combo"])
            if cc is None or cc["mean"] is None:
                cells.append("–")
            else:
                cells.append(_num(cc["mean"], 4) + (f" ± {_num(cc['sd'], 2)}" if cc["sd"] is not None else ""))
        status = f"{c['n_finished']}/{c['n']}"
        if c["n_failed"]:
            status += " " + " ".join(f'<span class="tag bad">{_esc(k)} ×{v}</span>' for k, v in c["failures"].items())
        best = a.get("best") and a["best"]["combo"] == c["combo"]
        name = _esc(c["cell"]) + (' <span class="tag good">best</span>' if best else "")
        rows.append([name, _esc(c["combo"]), status, *cells])
    return _table(["cell", "techniques on", "finished", *[f"{_esc(m)} ({analyses[m]['direction']})"
                                                          for m in metrics]],
                  rows, num_cols=range(3, 3 + len(metrics)))


def _failures_table(res: StudyResults, a: dict) -> str:
    rows = []
    for c in _cell_order(a["cells"], res.factors):
        if c["n_failed"]:
            st = " ".join(f'<span class="tag bad">{_esc(k)} ×{v}</span>' for k, v in c["failures"].items())
            rows.append([_esc(c["cell"]), _esc(c["combo"]), f"failed {c['n_failed']}/{c['n']}", st,
                         _esc("; ".join(c["reasons"])) or "–"])
    for e in res.excluded:
        tech = e.get("techniques") or []
        rows.append([_esc(e.get("cell", "")), _esc(combo_label(tech)), '<span class="tag warn">excluded</span>',
                     "", _esc(e.get("reason", ""))])
    if not rows:
        return '<p class="caption">No failed runs and no excluded cells.</p>'
    return _table(["cell", "techniques on", "outcome", "status", "reason"], rows)


def _failure_tests_table(a: dict) -> str:
    rows = []
    for t in a.get("failure_tests", []):
        if not t.get("counts"):
            continue
        c = t["counts"]
        if c["both"]["failed"] == 0:
            continue
        alone = [f"{_esc(k.removesuffix('_alone'))} alone: {v['failed']}/{v['n']}" for k, v in c.items()
                 if k != "both"]
        rows.append([_esc(t["pair"]), f"{c['both']['failed']}/{c['both']['n']}", *alone,
                     _pv(t["p"]), _pv(t["p_adj"])])
    if not rows:
        return ""
    return ("<h3>Failure interaction tests</h3><p class=\"caption\">Failed / total runs with both techniques on and "
            "with each one alone (others at any level). p: the larger of the two one-sided Fisher tests (both-on "
            "must fail more than <i>each</i> alone); p<sub>adj</sub>: step-down across pairs.</p>" + _table(
        ["pair", "both on (failed/n)", "first alone", "second alone", "p (Fisher)", "p<sub>adj</sub>"], rows,
        num_cols=[4, 5]))


def _samples_html(res: StudyResults, a: dict) -> str:
    if not res.samples:
        return '<p class="caption">No sample grids were recorded for this study.</p>'
    order = {c["cell"]: i for i, c in enumerate(_cell_order(a["cells"], res.factors))} if "cells" in a else {}
    figs = []
    for cell in sorted(res.samples, key=lambda c: (order.get(c, 1e9), c)):
        uri = _png_data_uri(res.samples[cell])
        img = f'<img alt="samples of {_esc(cell)}" src="{uri}">' if uri else \
            '<div class="caption">(sample grid missing or not a PNG)</div>'
        figs.append(f"<figure>{img}<figcaption>{_esc(cell)}</figcaption></figure>")
    return '<div class="samples">' + "".join(figs) + "</div>"


def _alias_html(res: StudyResults, a: dict) -> str:
    rows = [[_esc(al["label"]), _num(al.get("estimate")), _ci(al.get("ci"))] for al in a.get("aliased", [])]
    design_rows = [[_esc(k), _esc(" = ".join(v))] for k, v in (res.aliases or {}).items()]
    out = ""
    if rows:
        out += _table(["alias chain (detected from the design matrix)", "estimate (metric scale)", "CI"], rows,
                      num_cols=[1])
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


def render_report(results: StudyResults, out_dir: str | Path, *, alpha: float = 0.05, threshold: float = 0.0,
                  bootstrap: bool = True, analyses: dict[str, dict] | None = None) -> Path:
    """Write `out_dir/index.html` (self-contained) plus effects.json, cells.csv and summary.json; return the HTML path.

    `analyses` (metric -> analyze() dict) may be passed to reuse a computed analysis."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = results
    analyses = analyses or analyze_study(res, alpha=alpha, threshold=threshold, bootstrap=bootstrap)
    a = analyses[res.metric]
    primary_log = is_log_metric(res.metric)
    figs: list[tuple[str, go.Figure]] = []
    sections: list[str] = []
    ok = "error" not in a

    def fig_block(div_id: str, fig: go.Figure | None, title: str, caption: str, missing: str) -> str:
        if fig is None:
            return f'<section id="sec-{div_id}"><h2>{title}</h2><p class="caption">{missing}</p></section>'
        figs.append((div_id, fig))
        return (f'<section id="sec-{div_id}"><h2>{title}</h2><p class="caption">{caption}</p>'
                f'<div class="plot">@@FIG:{div_id}@@</div></section>')

    mlabel = _metric_label(res.metric, res.direction, primary_log)
    log_note = ""
    if any(is_log_metric(m) for m in [res.metric, *res.other_metrics]):
        log_note = "; throughput-like metrics are compared on the log scale (speed-ups multiply)"
    sections.append(f'<section id="sec-summary"><h2>Summary</h2><p class="caption">Primary metric: {_esc(mlabel)}. '
                    f'Gains are oriented so that <b>positive = better</b> for every metric{log_note}.'
                    f'</p>{_summary_cards(res, a)}</section>')
    if ok:
        k = len(res.factors)
        syn_fig = fig_synergy(a) if k >= 2 else None
        sections.append(fig_block(
            "fig-synergy", syn_fig, "Synergy matrix",
            "Cell (row <i>i</i>, column <i>j</i>) shows S<sub>ij</sub> = (gain of <i>i</i> with <i>j</i> on) − "
            "(gain of <i>i</i> with <i>j</i> off) = 2·INT<sub>ij</sub>, averaged over the other techniques, in "
            f"units of {_esc(mlabel)} oriented so that <b>blue (&gt; 0) = synergy</b> (the pair is better together "
            "than its parts) and <b>red (&lt; 0) = antagonism</b>. Second line: confidence interval over seeds "
            f"(OLS with a seed block, {int(100 * (1 - a['alpha']))}%). <b>*</b> = significant after "
            f"{_esc(a['correction'])} correction across pairs; <b>✕</b> = flagged incompatible; "
            "<i>aliased</i> = not separable in this fractional design; <i>fails</i> = runs with both techniques "
            "failed, so no metric exists.",
            "No pairwise synergy is estimable here: a synergy needs the cells of a (fractional) factorial, and "
            "leave-one-out or ladder designs run too few of them (see the per-technique effects below)."
            if k >= 2 else "A synergy matrix needs at least two techniques."))
        sections.append(fig_block(
            "fig-effects", fig_effects(a), "Effect of each technique",
            "Blue: main effect (mean gain with the technique on minus off, averaged over the design) with its "
            "confidence interval. Orange: exact Shapley value (its fair share of g(all) − g(none), averaged over all "
            "stacking orders; full factorials only). Green: leave-one-out effect against the full stack "
            "(g(all) − g(all without i)). All in gain units: positive = the technique helps.", ""))
        sections.append(fig_block(
            "fig-ladder", fig_ladder(a), "Cumulative ladder",
            "Techniques stacked one at a time (like the paper's chain). Each bar is the change in "
            f"{_esc(res.metric)} from the previous row; green bars improve the metric, red bars hurt it. "
            "A ladder is one stacking order: compare its steps with the Shapley values above to see how much "
            "the order matters.",
            "No ladder: the design has no nested chain of cells from the baseline to the full stack."))
    pareto = fig_pareto(res, a) if ok else None
    sections.append(fig_block(
        "fig-pareto", pareto, "Quality versus cost",
        "Each point is a cell (mean over finished seeds; bar = ± one standard deviation). Red points form the Pareto "
        "front: no other cell is at least as good on both axes and better on one.",
        "No throughput metric (images_per_s) was recorded, so there is no quality-versus-cost view."))
    order = [c["cell"] for c in _cell_order(a["cells"], res.factors)] if ok else []
    sections.append(fig_block(
        "fig-curves", fig_curves(res, order), "Learning curves",
        "Mean over seeds of each logged quantity against the training step, one line per cell (dashed: baseline). "
        "Use the menu at the top right to switch quantities; click legend entries to hide cells.",
        "No learning curves were recorded."))
    if ok:
        others = [m for m in analyses if m != res.metric]
        blocks = []
        for m in others:
            am = analyses[m]
            if "error" in am:
                blocks.append(f'<p class="caption">{_esc(m)}: {_esc(am["error"])}</p>')
                continue
            if len(res.factors) >= 2:
                fid = "fig-synergy-" + _safe_name(m)
                fig = fig_synergy(am, title=f"Synergy on {_metric_label(m, am['direction'], am['scale'] == 'log')}")
                if fig is not None:
                    figs.append((fid, fig))
                    blocks.append(f'<div class="plot">@@FIG:{fid}@@</div>')
        if blocks:
            sections.append('<section id="sec-other"><h2>Synergy on the other metrics</h2><p class="caption">Same '
                            'reading as the main matrix; each metric is oriented so that positive = better '
                            '(throughput on the log scale: S = 0.1 means the pair is ≈10% faster together than '
                            'their separate speed-ups predict).</p>' + "".join(blocks) + "</section>")
        sections.append('<section id="sec-effects-table"><h2>All effects</h2><p class="caption">Estimates on the '
                        f'metric\'s own scale ({_esc(a["scale"])}) before orientation, in the textbook convention '
                        '(ME = mean(y|on) − mean(y|off); INT = half the difference of conditional effects). Synergy '
                        'S = 2·INT oriented (positive = better together). Dividends (gain units): D = g(ij) − '
                        'g(i) − g(j) + g(none) with the others off, and the same difference of differences against '
                        'the full stack. Shapley and leave-one-out (g(all) − g(all without i)) in gain units. '
                        'p<sub>adj</sub>: corrected across pairs; – = not estimable from the cells run.'
                        f'</p>{_effects_table(a)}'
                        + (f"<h3>Aliasing</h3>{_alias_html(res, a)}" if (a["aliased"] or res.aliases) else "")
                        + "</section>")
        sections.append(f'<section id="sec-cells"><h2>Cells</h2><p class="caption">Mean ± standard deviation over '
                        f'finished seeds for every metric. </p>{_cells_table(res, analyses)}</section>')
    sections.append('<section id="sec-failures"><h2>Failed and excluded cells</h2><p class="caption">Failed runs '
                    '(diverged = NaN/inf loss, oom = out of memory, crashed = exception) are kept as data: they are '
                    'left out of the metric models and used as evidence of failure interactions (a pair is flagged '
                    'when runs with both techniques fail more often than runs with each alone: one-sided Fisher '
                    'exact tests). Excluded cells were never run because a constraint of the study forbids them.'
                    f'</p>{_failures_table(res, a) if ok else ""}{_failure_tests_table(a) if ok else ""}</section>')
    sections.append(f'<section id="sec-samples"><h2>Samples</h2><p class="caption">Sample grid recorded '
                    f'for each cell, embedded in this page.</p>{_samples_html(res, a)}</section>')
    if ok and a.get("notes"):
        sections.append('<section id="sec-notes"><h2>Notes on the analysis</h2><ul class="notes">'
                        + "".join(f"<li>{_esc(n)}</li>" for n in a["notes"]) + "</ul></section>")

    body = "\n".join(sections)
    for i, (div_id, fig) in enumerate(figs):
        body = body.replace(f"@@FIG:{div_id}@@", _figure_html(fig, div_id, first=i == 0), 1)
    nav = "".join(f'<a href="#{sid}">{name}</a>' for sid, name in [
        ("sec-summary", "Summary"), ("sec-fig-synergy", "Synergy"), ("sec-fig-effects", "Effects"),
        ("sec-fig-ladder", "Ladder"), ("sec-fig-pareto", "Pareto"), ("sec-fig-curves", "Curves"),
        ("sec-cells", "Cells"), ("sec-failures", "Failures"), ("sec-samples", "Samples")])
    techniques = ", ".join(f"<code>{_esc(f)}</code>" for f in res.factors)
    meta = (f"design <code>{_esc(res.design)}</code> · techniques {techniques}"
            f" · commit <code>{_esc(res.commit or 'unknown')}</code> · {_esc(res.date or '')}")
    page = f"""<!DOCTYPE html>
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
    path = out / "index.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    (out / "effects.json").write_text(json.dumps(analyses, indent=1, default=_json_default), encoding="utf-8")
    if ok:
        pd.DataFrame([{k: (v if not isinstance(v, (list, dict)) else json.dumps(v)) for k, v in c.items()}
                      for c in a["cells"]]).to_csv(out / "cells.csv", index=False)
    summary = {
        "study": res.study, "design": res.design, "factors": list(res.factors), "metric": res.metric,
        "direction": res.direction, "commit": res.commit, "date": res.date,
        "n_runs": a.get("n_runs"), "n_failed": a.get("n_failed"),
        "best": a.get("best"), "strongest_synergy": a.get("strongest_synergy"),
        "incompatible": sorted({fl["pair"] for fl in a.get("incompatible", [])}),
        "error": a.get("error"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default), encoding="utf-8")
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
        rows.append([f'<a href="{_esc(d.name)}/index.html">{_esc(s.get("study", d.name))}</a>',
                     _esc(s.get("design", "")), _esc(", ".join(s.get("factors", []))),
                     _esc(f"{s.get('metric', '')} ({s.get('direction', '')})") if s else "",
                     best_txt, (" ".join(f'<span class="tag bad">{_esc(p)}</span>' for p in inc) or "none"),
                     f"<code>{_esc((s.get('commit') or '')[:10])}</code>", _esc(s.get("date", ""))])
    table = _table(["study", "design", "techniques", "metric", "best combination", "incompatible", "commit", "date"],
                   rows) if rows else '<p class="caption">No study reports yet: run <code>make study</code>.</p>'
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


# --------------------------------------------------------------------------------------------------------------------
# records table (markdown)
# --------------------------------------------------------------------------------------------------------------------
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
    groups.sort(key=lambda kv: (0 if kv[0] == "baseline" else len(kv[0].split("+")),
                                [idx.get(f, 0) for f in kv[0].split("+")] if kv[0] != "baseline" else []))
    for combo, g in groups:
        vals = g.loc[g["_ok"], "_y"].to_numpy(dtype=float)
        cell = str(g["cell"].iloc[0]) if "cell" in g.columns else combo
        arm = cell if cell == combo else f"{cell} ({combo})"
        n, n_all = len(vals), len(g)
        if n:
            sd = f" ± {vals.std(ddof=1):.4g}" if n > 1 else ""
            ms = f"{vals.mean():.4g}{sd} (n={n}" + (f", {n_all - n} failed)" if n_all > n else ")")
        else:
            ms = f"– (0 of {n_all} finished)"
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
    lines = ["# srdit records", "",
             "Primary metric per arm: mean ± standard deviation over finished seeds; p-value of Welch's t-test "
             "against the study's baseline arm (all techniques off). Refreshed by `srdit report`.", "",
             "| " + " | ".join(RECORD_HEADER) + " |", "|" + "|".join("---" for _ in RECORD_HEADER) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p
