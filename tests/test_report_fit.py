"""The report page renders a fitted `ReportFit` and fits nothing (srdit.analysis.report_fit, page)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

import srdit.analysis.effects as effects
import srdit.analysis.over_steps as over_steps
import srdit.analysis.page as page
import srdit.analysis.power as power
import srdit.analysis.report_fit as report_fit
from srdit.analysis.figures import _num
from srdit.analysis.report_fit import ReportFit, fit_report

sys.path.insert(0, str(Path(__file__).parent))
from test_report import make_results  # noqa: E402

#: every function of the analysis layer that estimates something from the table
FITTING = [
    (effects, "analyze"),
    (effects, "analyze_study"),
    (effects, "prepare"),
    (effects, "fit_effects"),
    (effects, "pair_synergies"),
    (effects, "failure_interactions"),
    (effects, "bootstrap_cis"),
    (effects, "attribute"),
    (over_steps, "analyze_over_steps"),
    (over_steps, "study_over_steps"),
    (power, "design_power"),
    (power, "pooled_sd"),
    (report_fit, "fit_report"),
    (report_fit, "step_intervals"),
    (report_fit, "welch_interval"),
    (report_fit, "protocols"),
]


def _forbid_fitting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every fitting function raise, under each name any srdit.analysis module binds it to."""
    originals = {id(getattr(mod, name)): f"{mod.__name__}.{name}" for mod, name in FITTING}

    def refuse(what: str):
        def fitted(*args, **kwargs):
            raise AssertionError(f"the page refitted: {what} was called")

        return fitted

    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("srdit.analysis") or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if id(value) in originals:
                monkeypatch.setattr(mod, attr, refuse(originals[id(value)]))


def _section(html: str, start: str, end: str) -> str:
    return html[html.index(f'id="{start}"') : html.index(f'id="{end}"')]


def test_the_page_renders_the_passed_fit_and_never_refits(tmp_path, monkeypatch):
    res = make_results(tmp_path)
    fit = fit_report(res, bootstrap=False)
    a = fit.primary
    assert isinstance(a, effects.Analysis) and isinstance(fit.over_steps, over_steps.OverSteps)
    # numbers no fit of this table gives: if the page refitted, they would not appear
    planted = {f: 100.0 + 11.1 * (i + 1) for i, f in enumerate(res.factors)}  # 111.1, 122.2, 133.3
    a2 = dataclasses.replace(a, fit=dataclasses.replace(a.fit, main_effects=planted))
    fit2 = dataclasses.replace(fit, analyses={**fit.analyses, res.metric: a2})
    _forbid_fitting(monkeypatch)
    with pytest.raises(AssertionError, match="the page refitted"):
        effects.analyze_study(res)  # the guard is armed
    html = page.render_report(fit2, tmp_path / "dash").read_text(encoding="utf-8")

    table = _section(html, "sec-effects-table", "sec-cells")
    sign = 1 if a.direction == "max" else -1  # the table is in gain units (positive = better)
    for f, v in planted.items():
        tag = a.fit.alias_tag(f)  # the study's excluded cell leaves its estimates partly aliased
        name = f + (f' <span class="tag warn">{tag}</span>' if tag else "")
        approx = "≈" if f in a.fit.partial_aliases else ""  # biased by omitted interactions: never tested
        assert f'<td>{name}</td><td class="num">{approx}{_num(sign * v)}</td>' in table
    for pair, v in a.pairs.synergy.items():
        assert f'<td class="num">{_num(v)}</td>' in table, pair
    summary = _section(html, "sec-summary", "sec-fig-synergy")
    best = a.attribution.best
    assert best.combo in summary and f"{res.metric} = {_num(best.mean, 4)}" in summary
    assert f"{a.n_finished} finished / {a.n_runs}" in summary
    # the side files are the passed results, serialised
    out = tmp_path / "dash"
    written = json.loads((out / "effects.json").read_text(encoding="utf-8"))
    assert written[res.metric]["main_effects"] == planted
    assert set(written) == set(fit.analyses)
    for m, am in fit.analyses.items():
        if m != res.metric:
            assert written[m] == json.loads(json.dumps(am.to_json(), default=page._json_default))
    assert json.loads((out / "effects_over_steps.json").read_text(encoding="utf-8")) == json.loads(
        json.dumps(fit.over_steps.to_json(), default=page._json_default)
    )
    summary_json = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary_json["best"] == json.loads(json.dumps(best.to_json(), default=page._json_default))
    assert summary_json["n_runs"] == a.n_runs and summary_json["n_failed"] == a.n_failed


def test_an_unanalysable_primary_metric_renders_without_fitting(tmp_path, monkeypatch):
    res = make_results(tmp_path)
    failure = effects.AnalysisFailure(metric=res.metric, direction=res.direction, error="planted: cannot analyse")
    _forbid_fitting(monkeypatch)
    html = page.render_report(ReportFit(res, {res.metric: failure}), tmp_path / "dead").read_text(encoding="utf-8")
    assert "not possible" in html and "planted: cannot analyse" in html
    assert json.loads((tmp_path / "dead" / "summary.json").read_text())["error"] == "planted: cannot analyse"


def test_fit_report_holds_what_the_page_shows(tmp_path):
    res = make_results(tmp_path)
    fit = fit_report(res, alpha=0.1, bootstrap=False)
    assert list(fit.analyses) == [res.metric, *res.other_metrics]
    assert fit.primary is fit.analyses[res.metric] and fit.primary.alpha == 0.1
    assert fit.over_steps.metric == res.metric and fit.over_steps.alpha == 0.1
    # nothing finished: the primary analysis fails, and there is nothing to analyse over training
    dead = dataclasses.replace(res, table=res.table.assign(status="crashed"))
    fit = fit_report(dead, bootstrap=False)
    assert isinstance(fit.primary, effects.AnalysisFailure) and fit.over_steps is None


def test_a_fit_without_the_primary_metric_is_refused(tmp_path):
    res = make_results(tmp_path)
    with pytest.raises(ValueError, match="lack the primary metric 'fd'"):
        ReportFit(res, {})
