"""Plotly figures of a study report (synergy matrix, effects, effects over training, ladder, quality versus cost,
learning curves) and the number formatting the report page shares with them. Each figure reads a typed `Analysis`
(or `OverSteps`)."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from scipy import stats

from srdit import metric_registry
from srdit.analysis.effects import CONTENTION_NOTE, OK_STATUSES, Analysis, Cell, combo_label, contended
from srdit.analysis.over_steps import OverSteps
from srdit.analysis.results import CURVE_COLUMNS, StudyResults


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


def _cell_order(cells: Iterable[Cell], factors: Sequence[str]) -> list[Cell]:
    idx = {f: i for i, f in enumerate(factors)}
    return sorted(cells, key=lambda c: (len(c.on), [idx[f] for f in c.on]))


PALETTE = [
    "#4C78A8",
    "#F58518",
    "#54A24B",
    "#E45756",
    "#72B7B2",
    "#EECA3B",
    "#B279A2",
    "#FF9DA6",
    "#9D755D",
    "#BAB0AC",
    "#1F77B4",
    "#2CA02C",
    "#D62728",
    "#9467BD",
    "#8C564B",
    "#17BECF",
]
LAYOUT = dict(
    template="plotly_white",
    font=dict(family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size=13),
    margin=dict(l=70, r=30, t=50, b=60),
    height=440,
)


def decision_p(a: Analysis, pair: str) -> tuple[float | None, str]:
    """(p-value, its HTML label) that decides pair `pair` in the synergy matrix, consistent with its interval:
    Bonferroni over the tested pairs beside the simultaneous interval (confirmatory), the Benjamini-Hochberg q of
    the secondary metrics' family beside its FCR-adjusted interval (exploratory: q < alpha exactly when that
    interval excludes 0). None for a pair that is not tested (aliased, partly aliased, no error estimate)."""
    if a.role == "exploratory":
        return a.pairs.p_adj.get(pair), "q<sub>BH</sub>"
    raw = a.fit.p.get(pair) if pair in a.fit.clean_pairs else None
    return (min(1.0, a.pairs.n_tested * raw) if raw is not None else None), "p<sub>Bonf</sub>"


def interval_label(a: Analysis) -> str:
    """What the synergy intervals of `a` are, in two words: "FCR-adjusted" for the exploratory family's
    Benjamini-Yekutieli intervals (`effects.bh_fcr_intervals`), else "simultaneous" (Bonferroni)."""
    return "FCR-adjusted" if a.pairs.fcr_level is not None else "simultaneous"


# --------------------------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------------------------
def fig_synergy(a: Analysis, title: str | None = None) -> go.Figure | None:
    """Matrix of S_ij (oriented). Upper triangle: S with its interval (`interval_label`: simultaneous, or
    FCR-adjusted for an exploratory metric), in full colour when significant (the interval excludes 0) and muted
    (faded, "n.s.") when not; aliased, partially aliased ("partly aliased") and failed cells are labelled. Lower
    triangle: the p-value of the decision (`decision_p`, no colour). None when no pair is estimable (leave-one-
    out and ladder designs lack the cells): an all-empty heatmap has no colour range and plotly fails on it."""
    incompatible = a.incompatible
    if not any(v is not None for v in a.pairs.synergy.values()) and not incompatible and not a.fit.aliased:
        return None
    f = a.factors
    k = len(f)
    z_sig = [[None] * k for _ in range(k)]
    z_ns = [[None] * k for _ in range(k)]
    txt = [[""] * k for _ in range(k)]
    hover = [[""] * k for _ in range(k)]
    flagged = {fl.pair: fl for fl in incompatible}
    aliased = {n: al.label for al in a.fit.aliased for n in al.effects}
    partial = a.fit.partial_aliases
    inest = {i.effect: i.reason for i in a.fit.inestimable}
    significant = set(a.pairs.significant)
    untested = bool(a.notes) and a.notes[0] == CONTENTION_NOTE  # no significance claimed on a contended clock
    lenth_sig = set((a.fit.lenth or {}).get("significant_simultaneous", []))
    ci_label = interval_label(a)
    adj_label = "q<sub>BH</sub>" if a.role == "exploratory" else "p_adj"
    for i in range(k):
        for j in range(k):
            if i == j:
                txt[i][j] = f"<i>{_esc(f[i])}</i>"
                hover[i][j] = f"{f[i]}"
                continue
            n = f"{f[min(i, j)]}:{f[max(i, j)]}"
            s = a.pairs.synergy.get(n)
            padj = a.pairs.p_adj.get(n)
            if i > j:  # lower triangle: the p-value that made the decision (consistent with the star)
                p_dec, lab = decision_p(a, n)
                txt[i][j] = f"<span style='color:#6b7280'>{lab} {_pv(p_dec)}</span>" if p_dec is not None else ""
                hover[i][j] = f"{n}: {lab} {_pv(p_dec)}"
                continue
            sig = not untested and (n in significant or (a.fit.lenth is not None and n in lenth_sig))
            mark = "*" if sig else ""
            if n in flagged:
                mark += " ✕"
            if s is not None and n in partial:
                z_ns[i][j] = s
                al = ", ".join(partial[n])
                txt[i][j] = f"≈{_num(s, 3)}<br><i>partly aliased</i>"
                hover[i][j] = f"S({n}) ≈ {_num(s)}: partially aliased with {al} (missing or failed cells); not tested"
            elif s is not None:
                (z_sig if sig else z_ns)[i][j] = s
                ci = a.pairs.synergy_ci.get(n)
                verdict = "not tested" if untested else "n.s."
                txt[i][j] = (f"<b>{_num(s, 3)}{mark}</b>" if sig else f"{_num(s, 3)}{mark} <i>{verdict}</i>") + (
                    f"<br>{_ci(ci, 2)}" if ci else ""
                )
                hover[i][j] = (
                    f"S({n}) = {_num(s)}<br>{ci_label} CI {_ci(ci)}<br>{adj_label} {_pv(padj)}"
                    + ("<br>not tested: clocks of trials sharing the machine" if untested else "")
                    + ("" if sig or untested else "<br>not significant")
                    + (f"<br>flagged: {flagged[n].kind}" if n in flagged else "")
                )
            elif n in aliased:
                txt[i][j] = "aliased"
                hover[i][j] = f"{n}: aliased ({aliased[n]})"
            elif n in flagged:
                txt[i][j] = "fails ✕"
                hover[i][j] = f"{n}: runs with both fail ({flagged[n].kind})"
            else:
                txt[i][j] = "n/a"
                hover[i][j] = f"{n}: {inest.get(n, 'inestimable')}"
    vals = [abs(v) for z in (z_sig, z_ns) for row in z for v in row if v is not None]
    zmax = max(vals) if vals else 1.0
    common = dict(x=f, y=f, colorscale="RdBu", zmid=0, zmin=-zmax, zmax=zmax, xgap=3, ygap=3, hoverinfo="skip")
    fig = go.Figure()
    # one transparent layer with the hover of every cell and the text of the uncoloured ones, then the muted cells
    # (faded colours) and the significant ones in full colour, each with its own text (plotly picks a readable
    # text colour per cell)
    t_sig = [[txt[i][j] if z_sig[i][j] is not None else "" for j in range(k)] for i in range(k)]
    t_ns = [[txt[i][j] if z_ns[i][j] is not None else "" for j in range(k)] for i in range(k)]
    t_rest = [[txt[i][j] if z_sig[i][j] is None and z_ns[i][j] is None else "" for j in range(k)] for i in range(k)]
    fig.add_trace(
        go.Heatmap(
            z=[[0.0] * k for _ in range(k)],
            x=f,
            y=f,
            text=t_rest,
            texttemplate="%{text}",
            hoverinfo="skip",
            showscale=False,
            opacity=1.0,
            colorscale=[[0, "rgba(0,0,0,0)"], [1, "rgba(0,0,0,0)"]],
            xgap=3,
            ygap=3,
            textfont=dict(size=12, color="#1d2330"),
        )
    )
    fig.add_trace(
        go.Heatmap(
            z=z_ns,
            opacity=0.28,
            showscale=False,
            name="not significant",
            text=t_ns,
            texttemplate="%{text}",
            textfont=dict(size=12, color="#1d2330"),
            **common,
        )
    )
    fig.add_trace(
        go.Heatmap(
            z=z_sig,
            colorbar=dict(title=dict(text="S<sub>ij</sub><br>(gain)")),
            name="significant",
            text=t_sig,
            texttemplate="%{text}",
            textfont=dict(size=12),
            **common,
        )
    )
    fig.add_trace(
        go.Heatmap(
            z=[[0.0] * k for _ in range(k)],
            x=f,
            y=f,
            hovertext=hover,
            hoverinfo="text",
            showscale=False,
            opacity=0.0,
            colorscale=[[0, "rgba(0,0,0,0)"], [1, "rgba(0,0,0,0)"]],
            xgap=3,
            ygap=3,
        )
    )
    fig.update_layout(**LAYOUT, title=title or "Synergy matrix S<sub>ij</sub>")
    fig.update_layout(height=max(380, 90 * k + 140), width=None)
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain")
    fig.update_xaxes(side="bottom", constrain="domain")
    return fig


def fig_half_normal(a: Analysis) -> go.Figure | None:
    """Half-normal plot of |effects| of an unreplicated design with Lenth's margins (Daniel 1959; Lenth 1989):
    effects far above the line through the small ones, and beyond the margins, are active."""
    L = a.fit.lenth
    if not L or not L.get("effects"):
        return None
    items = sorted(((abs(v), n) for n, v in L["effects"].items() if v is not None))
    m = len(items)
    q = [float(stats.halfnorm.ppf((i + 0.5) / m)) for i in range(m)]
    absv = [v for v, _ in items]
    names = [n for _, n in items]
    sig = set(L["significant"])
    fig = go.Figure()
    fig.add_scatter(
        x=q,
        y=absv,
        mode="markers+text",
        text=[n if n in sig else "" for n in names],
        textposition="middle left",
        marker=dict(size=9, color=["#b3261e" if n in sig else "#4C78A8" for n in names]),
        hovertext=[f"{n}: |effect| {_num(v)}" for v, n in items],
        hoverinfo="text",
        name="|effect|",
    )
    if L.get("pse"):
        xs = [0, max(q)]
        fig.add_scatter(
            x=xs, y=[0, L["pse"] * max(q)], mode="lines", line=dict(dash="dot", color="#888"), name="PSE line"
        )
    for key, label, dash in (
        ("margin", "ME (individual)", "dash"),
        ("simultaneous_margin", "SME (simultaneous)", "longdash"),
    ):
        if L.get(key):
            fig.add_hline(y=L[key], line=dict(dash=dash, color="#9a6700"), annotation_text=label)
    fig.update_layout(
        **LAYOUT,
        title="Half-normal plot of the effects (Lenth's margins)",
        xaxis_title="half-normal quantile",
        yaxis_title=f"|effect| ({a.metric})",
    )
    return fig


def fig_effects(a: Analysis, loo_ci: dict[str, list[float]] | None = None) -> go.Figure:
    """Main effects (oriented, with CI), Shapley attribution and leave-one-out effects side by side; `loo_ci`:
    technique -> interval of its leave-one-out effect (gain units; `report_fit.step_intervals`) drawn as error
    bars."""
    sign = 1 if a.direction == "max" else -1
    f = a.factors
    main_effects, ci, att = a.fit.main_effects, a.fit.ci, a.attribution
    me = [None if main_effects.get(x) is None else sign * main_effects[x] for x in f]
    lo, hi = [], []
    for x, v in zip(f, me):
        c = None if x in a.fit.partial_aliases else ci.get(x)  # partly aliased: biased, no interval drawn
        if c and v is not None:
            cc = sorted([sign * c[0], sign * c[1]])
            lo.append(v - cc[0])
            hi.append(cc[1] - v)
        else:
            lo.append(0)
            hi.append(0)
    fig = go.Figure()
    fig.add_bar(
        name="main effect (avg. over design)",
        x=f,
        y=me,
        marker_color=PALETTE[0],
        error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo, visible=bool(ci)),
    )
    if att.shapley:
        fig.add_bar(
            name="Shapley (share of all − none)", x=f, y=[att.shapley.get(x) for x in f], marker_color=PALETTE[1]
        )
    if any(v is not None for v in att.loo.values()):
        loo_ci = loo_ci or {}
        y = [att.loo.get(x) for x in f]
        cis = [loo_ci.get(x) if v is not None else None for x, v in zip(f, y)]
        fig.add_bar(
            name="leave-one-out (all − all∖i)",
            x=f,
            y=y,
            marker_color=PALETTE[2],
            error_y=dict(
                type="data",
                symmetric=False,
                array=[c[1] - v if c else 0 for c, v in zip(cis, y)],
                arrayminus=[v - c[0] if c else 0 for c, v in zip(cis, y)],
                visible=any(cis),
            ),
        )
    fig.add_hline(y=0, line_color="#444", line_width=1)
    fig.update_layout(
        **LAYOUT,
        barmode="group",
        title="Effect of each technique (gain, positive = better)",
        yaxis_title=f"gain in {'log ' if a.scale == 'log' else ''}{a.metric}",
        legend=dict(orientation="h", y=-0.15),
    )
    return fig


def fig_ladder(a: Analysis, ladder_ci: dict[int, list[float]] | None = None) -> go.Figure | None:
    """Waterfall of the cumulative ladder (metric units): the baseline, each step's change of the mean and the final
    mean. `ladder_ci`: step -> interval of that step's change (`report_fit.step_intervals`), drawn as an error bar
    at the end of the step's bar."""
    rows = a.attribution.ladder
    if not rows or rows[0].mean is None:
        return None
    x, y, measure, text = [], [], [], []
    for r in rows:
        if r.mean is None:
            break
        if r.step == 0:
            x.append("baseline")
            y.append(r.mean)
            measure.append("absolute")
            text.append(_num(r.mean, 4))
        else:
            x.append(f"+ {r.added}")
            y.append(r.delta)
            measure.append("relative")
            text.append(("+" if r.delta >= 0 else "") + _num(r.delta, 3))
    x.append("final")
    y.append(None)
    measure.append("total")
    text.append(_num(rows[len(x) - 2].mean, 4))
    good, bad = "#3B8B5A", "#C0504D"
    up, down = (good, bad) if a.direction == "max" else (bad, good)
    fig = go.Figure(
        go.Waterfall(
            x=x,
            y=y,
            measure=measure,
            text=text,
            textposition="outside",
            increasing=dict(marker_color=up),
            decreasing=dict(marker_color=down),
            totals=dict(marker_color="#4C78A8"),
            connector=dict(line=dict(color="#999", width=1, dash="dot")),
        )
    )
    drawn = [r for r in rows[: len(x) - 1] if r.step > 0 and r.step in (ladder_ci or {})]
    if drawn:
        pct = int(round(100 * (1 - a.alpha)))
        fig.add_scatter(
            x=[f"+ {r.added}" for r in drawn],
            y=[r.mean for r in drawn],
            mode="markers",
            marker=dict(size=4, color="#1d2330"),
            error_y=dict(
                type="data",
                symmetric=False,
                array=[ladder_ci[r.step][1] - r.delta for r in drawn],
                arrayminus=[r.delta - ladder_ci[r.step][0] for r in drawn],
                color="#1d2330",
                thickness=1.5,
                width=8,
            ),
            hovertext=[f"+ {r.added}: step {_num(r.delta)}, {pct}% CI {_ci(ladder_ci[r.step])}" for r in drawn],
            hoverinfo="text",
            name=f"{pct}% CI of the step",
        )
    means = [r.mean for r in rows if r.mean is not None]
    lows = [r.mean - r.delta + ladder_ci[r.step][0] for r in drawn] if drawn else []
    highs = [r.mean - r.delta + ladder_ci[r.step][1] for r in drawn] if drawn else []
    lo_y, hi_y = min(means + lows), max(means + highs)
    span = hi_y - lo_y if len(means) > 1 else abs(means[0]) or 1.0
    fig.update_layout(
        **LAYOUT, title=f"Cumulative ladder ({a.attribution.ladder_kind} order)", yaxis_title=a.metric, showlegend=False
    )
    fig.update_yaxes(range=[lo_y - 0.6 * span, hi_y + 0.4 * span])
    return fig


def _pareto_mask(xs: Sequence[float], ys: Sequence[float]) -> list[bool]:
    """Non-dominated points when both coordinates are to be maximised."""
    out = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        dom = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(zip(xs, ys)) if j != i)
        out.append(not dom)
    return out


def throughput_metrics() -> list[str]:
    """The registry's log-scale `max` metrics: what the quality-versus-cost view can use as its cost axis."""
    return [n for n, m in metric_registry.METRICS.items() if m.log and m.direction == "max"]


def _cost_metric(res: StudyResults) -> tuple[str, str] | None:
    """The cost axis of the quality-versus-cost view: a log-scale `max` metric (throughput) of the metric registry
    that the table has; the study's own metrics first, then the registry's order."""
    declared = [m for m, d in res.other_metrics.items() if d == "max" and metric_registry.is_log(m)]
    for m in dict.fromkeys([*declared, *throughput_metrics()]):
        if m in res.table.columns:
            return m, res.other_metrics.get(m, "max")
    return None


def fig_pareto(res: StudyResults, a: Analysis) -> go.Figure | None:
    cm = _cost_metric(res)
    if cm is None:
        return None
    cost, cdir = cm
    t = res.table
    ok = t["status"].astype(str).str.lower().isin(OK_STATUSES) if "status" in t.columns else pd.Series(True, t.index)
    ok &= np.isfinite(pd.to_numeric(t[res.metric], errors="coerce")) & np.isfinite(
        pd.to_numeric(t[cost], errors="coerce")
    )
    cell_of = {c.combo: c.cell for c in a.attribution.cells}
    bench = res.bench if res.bench is not None and cost in res.bench.columns else None  # `srdit study bench`
    xb = None if bench is None else bench.groupby("cell")[cost].apply(lambda v: float(np.exp(np.log(v).mean())))
    pts = []
    for combo, g in (
        t[ok]
        .assign(_combo=[combo_label(f for f in res.factors if int(r[f]) == 1) for _, r in t[ok].iterrows()])
        .groupby("_combo")
    ):
        pts.append(
            {
                "combo": combo,
                "cell": cell_of.get(combo, combo),
                "x": float(xb[g["cell"].iloc[0]])
                if xb is not None
                else float(np.exp(np.log(g[cost].astype(float)).mean()))
                if metric_registry.is_log(cost)
                else float(g[cost].astype(float).mean()),
                "y": float(g[res.metric].astype(float).mean()),
                "ysd": float(g[res.metric].astype(float).std(ddof=1)) if len(g) > 1 else 0.0,
                "n": len(g),
            }
        )
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
            x=[p["x"] for p in group],
            y=[p["y"] for p in group],
            mode="markers+text",
            name=name,
            text=[p["combo"] for p in group],
            customdata=[p["cell"] for p in group],
            textposition="top center",
            cliponaxis=False,  # a label at the edge of the axis stays whole
            marker=dict(size=size, color=color),
            error_y=dict(type="data", array=[p["ysd"] for p in group], color=color, thickness=1),
            hovertemplate="%{text} (cell %{customdata})<br>" + cost + " %{x:.4g}<br>" + res.metric + " %{y:.4g}"
            "<extra></extra>",
        )
    if len(fr) > 1:
        fig.add_scatter(
            x=[p["x"] for p in fr],
            y=[p["y"] for p in fr],
            mode="lines",
            name="front",
            line=dict(color="#E45756", dash="dot"),
            hoverinfo="skip",
            showlegend=False,
        )
    if xb is not None:
        source = "controlled: srdit study bench"
    elif contended(res.table):
        source = "trials' clocks on a shared machine"
        fig.add_annotation(
            text=f"⚠ {cost} measured while trials shared the machine: neighbours' load is in it "
            "(srdit study bench measures it alone)",
            xref="paper",
            yref="paper",
            x=0,
            y=1.0,
            xanchor="left",
            yanchor="bottom",
            showarrow=False,
            font=dict(size=12, color="#9a6700"),
            bgcolor="#fffbef",
            bordercolor="#f0dfa8",
        )
    else:
        source = "trials' clocks, one trial per machine"
    fig.update_layout(
        **{**LAYOUT, "margin": dict(LAYOUT["margin"], t=80)},
        title=f"Quality versus cost: {res.metric} against {cost}",
        xaxis_title=f"{cost} ({'↑' if cdir == 'max' else '↓'} better; {source})",
        yaxis_title=f"{res.metric} ({'↑' if res.direction == 'max' else '↓'} better, mean ± sd)",
    )
    if metric_registry.is_log(cost):
        fig.update_xaxes(type="log")
    return fig


def fig_curves(res: StudyResults, cells_order: Sequence[str], baseline_cell: str | None = None) -> go.Figure | None:
    """Mean over seeds of each logged quantity against the step, one line per cell; a menu switches quantities.
    Opens on the quantity with the most points per series (a real curve, e.g. the loss, rather than a metric
    evaluated once), preferring the primary metric and the loss on ties; series of one point are drawn as markers;
    the baseline cell (`baseline_cell`, no technique on) is dashed."""
    c = res.curves
    if c is None or c.empty or not set(CURVE_COLUMNS) <= set(c.columns):
        return None
    c = c.copy()
    c["value"] = pd.to_numeric(c["value"], errors="coerce")
    c = c[np.isfinite(c["value"])]
    if c.empty:
        return None
    pref = {res.metric: 0, "loss": 1}
    points = c.groupby(["key", "cell"])["step"].nunique().groupby(level=0).median()
    keys = sorted(points.index, key=lambda k_: (-min(points[k_], 3), pref.get(k_, 2), str(k_)))[:6]
    order = {cell: i for i, cell in enumerate(cells_order)}
    cells = sorted(c["cell"].astype(str).unique(), key=lambda x: (order.get(x, 1e9), x))
    base_ids = {"baseline", "none"} | ({str(baseline_cell)} if baseline_cell else set())
    names = res.cell_names()  # technique names, not cell ids, in the legend
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
            is_base = cell in base_ids
            name = names.get(cell, cell)
            fig.add_scatter(
                x=m["step"],
                y=m["mean"],
                mode="lines+markers" if len(m) <= 2 else "lines",
                name=name + (" (baseline)" if is_base and name not in ("baseline", "none") else ""),
                legendgroup=cell,
                visible=ki == 0,
                marker=dict(size=8, color=color),
                line=dict(color=color, width=3 if is_base else 2, dash="dash" if is_base else None),
                hovertemplate=f"{name} (cell {cell})" + " step %{x}: %{y:.4g}<extra></extra>",
            )
        vis_by_key.append((start, len(fig.data)))
    if not fig.data:
        return None
    buttons = []
    for ki, key in enumerate(keys):
        vis = [vis_by_key[ki][0] <= i < vis_by_key[ki][1] for i in range(len(fig.data))]
        buttons.append(dict(label=key, method="update", args=[{"visible": vis}, {"yaxis.title.text": key}]))
    fig.update_layout(
        **LAYOUT, title="Learning curves (mean over seeds, per cell)", xaxis_title="step", yaxis_title=keys[0]
    )
    if len(keys) > 1:
        fig.update_layout(
            updatemenus=[
                dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.15, yanchor="top", showactive=True)
            ]
        )
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


def fig_over_steps(ov: OverSteps) -> go.Figure | None:
    """Effects over training: one line per technique (oriented main effect, top) and per pair (synergy S, bottom)
    against the training step, each with its interval as a band (as the step's analysis gives it: individual t
    intervals for main effects, simultaneous over the pairs for synergies). None with fewer than two analysed
    steps: a chart of one step says nothing about training time."""
    steps = ov.analysed_steps
    if len(steps) < 2 or not ov.series:
        return None
    pairs = [s for s in ov.series if s.kind == "pair"]
    rows = 2 if pairs else 1
    fig = make_subplots(
        rows=rows,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.1,
        subplot_titles=["Main effect of each technique (gain)", "Pair synergy S"][:rows],
    )
    for i, s in enumerate(ov.series):
        row = 2 if s.kind == "pair" else 1
        color = PALETTE[i % len(PALETTE)]
        pts = [p for p in s.points if p.estimate is not None]
        x = [p.step for p in pts]
        band = [p for p in pts if p.ci]
        if len(band) >= 2:
            fig.add_scatter(
                x=[p.step for p in band],
                y=[p.ci[1] for p in band],
                mode="lines",
                line=dict(width=0),
                legendgroup=s.effect,
                showlegend=False,
                hoverinfo="skip",
                row=row,
                col=1,
            )
            fig.add_scatter(
                x=[p.step for p in band],
                y=[p.ci[0] for p in band],
                mode="lines",
                line=dict(width=0),
                fill="tonexty",
                fillcolor=_rgba(color, 0.16),
                legendgroup=s.effect,
                showlegend=False,
                hoverinfo="skip",
                row=row,
                col=1,
            )
        hover = [
            f"{s.effect} step {p.step}: {_num(p.estimate)}"
            + (f" CI {_ci(p.ci)}" + ("" if p.significant else " (includes 0)") if p.ci else " (no interval)")
            for p in pts
        ]
        fig.add_scatter(
            x=x,
            y=[p.estimate for p in pts],
            mode="lines+markers",
            name=s.effect,
            legendgroup=s.effect,
            line=dict(color=color, width=2, dash="dot" if s.kind == "pair" else None),
            marker=dict(size=7, color=color, symbol=["circle" if p.significant else "circle-open" for p in pts]),
            hovertext=hover,
            hoverinfo="text",
            row=row,
            col=1,
        )
    for r in range(1, rows + 1):
        fig.add_hline(y=0, line_color="#444", line_width=1, row=r, col=1)
    unit = f"{'log ' if ov.scale == 'log' else ''}{ov.metric}"
    fig.update_layout(
        **{**LAYOUT, "height": 380 * rows + 80},
        title=f"Effects over training on {unit} (positive = better)",
        legend=dict(orientation="v", x=1.02, y=1, xanchor="left"),
    )
    fig.update_yaxes(title_text=f"gain in {unit}", row=1, col=1)
    if rows == 2:
        fig.update_yaxes(title_text=f"S in {unit}", row=2, col=1)
    fig.update_xaxes(title_text="training step", row=rows, col=1)
    return fig
