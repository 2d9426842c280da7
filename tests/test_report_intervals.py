"""The report's effects as the decisions were made: one convention per effects table, the synergy matrix's
simultaneous intervals and decisions in the pair table, Welch intervals on the ladder's steps and the leave-one-out
effects (checked against statsmodels), and the Pareto panel saying where its throughput comes from."""

from __future__ import annotations

import dataclasses
import itertools
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

from srdit.analysis.figures import _ci, _num, fig_effects, fig_ladder, fig_pareto, fig_synergy
from srdit.analysis.page import render_report
from srdit.analysis.report_fit import fit_report, welch_interval
from srdit.analysis.results import StudyResults

sys.path.insert(0, str(Path(__file__).parent))
from test_report import make_results  # noqa: E402


def _welch_statsmodels(a, b, level: float) -> tuple[float, float]:
    """mean(b) - mean(a): statsmodels' unequal-variance t interval (independent of scipy's ttest_ind)."""
    return CompareMeans(DescrStatsW(np.asarray(b, float)), DescrStatsW(np.asarray(a, float))).tconfint_diff(
        alpha=1 - level, usevar="unequal"
    )


def test_welch_interval_is_statsmodels_unequal_variance_interval():
    rng = np.random.default_rng(3)
    for n_a, n_b in [(2, 2), (3, 5), (8, 4)]:
        a, b = rng.normal(0, 1, n_a), rng.normal(2, 3, n_b)
        for level in (0.9, 0.95):
            assert welch_interval(a, b, level) == pytest.approx(_welch_statsmodels(a, b, level), rel=1e-10)
    assert welch_interval([1.0], [2.0, 3.0], 0.95) is None  # one run: no error estimate
    assert welch_interval([1.0, 1.0], [2.0, 2.0, 2.0], 0.95) is None  # identical values: no error estimate either
    assert welch_interval([1.0, 1.0], [2.0, 3.0], 0.95) == pytest.approx(
        _welch_statsmodels([1.0, 1.0], [2.0, 3.0], 0.95), rel=1e-10
    )


def factorial(seeds: int, rng_seed: int = 0, k: int = 3, synergy: float = 0.0, noise: float = 0.5) -> StudyResults:
    """A complete 2^k full factorial x `seeds` on fd (min): planted main effects 3, 2, 1, ... and a synergy of
    `synergy` (fd units, oriented) between the first two techniques."""
    rng = np.random.default_rng(rng_seed)
    F = ["repa", "rope", "sprint", "reg"][:k]
    rows = []
    for lv in itertools.product([0, 1], repeat=k):
        x = dict(zip(F, lv))
        cell = "+".join(f for f in F if x[f]) or "baseline"
        for s in range(seeds):
            fd = 30 - sum((3 - i) * x[f] for i, f in enumerate(F)) - synergy * x[F[0]] * x[F[1]]
            rows.append(
                {
                    "trial": f"{cell}-{s}",
                    "cell": cell,
                    "seed": s,
                    "status": "finished",
                    "status_reason": "",
                    **x,
                    "fd": fd + rng.normal(0, noise),
                }
            )
    return StudyResults(study="fac", design="full", factors=F, metric="fd", direction="min", table=pd.DataFrame(rows))


def _cell_values(res: StudyResults, on: set[str]) -> np.ndarray:
    t = res.table
    mask = np.ones(len(t), bool)
    for f in res.factors:
        mask &= (t[f] == (1 if f in on else 0)).to_numpy()
    return t.loc[mask, res.metric].to_numpy(float)


def test_ladder_and_leave_one_out_intervals_are_welch_over_the_two_cells():
    res = factorial(seeds=3)
    fit = fit_report(res, bootstrap=False)
    a = fit.primary
    rows = a.attribution.ladder
    assert len(rows) == 4 and set(fit.ladder_ci) == {1, 2, 3}
    for prev, r in zip(rows, rows[1:]):
        lo, hi = _welch_statsmodels(_cell_values(res, set(prev.on)), _cell_values(res, set(r.on)), 0.95)
        assert fit.ladder_ci[r.step] == pytest.approx([lo, hi], rel=1e-9)
        assert lo < r.delta < hi and hi < 0  # planted: each technique lowers fd by 1 to 3 (noise sd 0.5)
    full = set(res.factors)
    for f in res.factors:
        # leave-one-out in gain units (fd is min: gain = -fd)
        lo, hi = _welch_statsmodels(-_cell_values(res, full - {f}), -_cell_values(res, full), 0.95)
        assert fit.loo_ci[f] == pytest.approx([lo, hi], rel=1e-9)
        assert lo < a.attribution.loo[f] < hi
    assert fit.loo_ci["repa"][0] > 0  # planted gain 3 is distinguishable
    # drawn: the waterfall's error bars span the interval of each step at the end of its bar
    lad = fig_ladder(a, fit.ladder_ci)
    bars = next(tr for tr in lad.data if tr.type == "scatter")
    for x, y, up, down in zip(bars.x, bars.y, bars.error_y.array, bars.error_y.arrayminus):
        r = next(r for r in rows if f"+ {r.added}" == x)
        assert y == pytest.approx(r.mean)
        assert (y - down - (r.mean - r.delta), y + up - (r.mean - r.delta)) == pytest.approx(fit.ladder_ci[r.step])
    eff = fig_effects(a, fit.loo_ci)
    loo = next(tr for tr in eff.data if tr.name.startswith("leave-one-out"))
    for f, y, up, down in zip(loo.x, loo.y, loo.error_y.array, loo.error_y.arrayminus):
        assert (y - down, y + up) == pytest.approx(fit.loo_ci[f])


def test_one_run_per_cell_gives_no_interval_and_the_page_says_so(tmp_path):
    fit = fit_report(factorial(seeds=1), bootstrap=False)
    assert fit.ladder_ci == {} and fit.loo_ci == {}
    html = render_report(fit, tmp_path).read_text(encoding="utf-8")
    assert "No intervals: the cells need two or more finished seeds each" in html
    assert "no interval: the two cells need two or more finished seeds each" in html


def _significant_individually_not_simultaneously() -> StudyResults:
    """A planted repa:rope synergy whose individual interval excludes 0 while the simultaneous one over the six
    pairs of four techniques does not (the first noise draw that shows it)."""
    for seed in range(200):
        res = factorial(seeds=2, rng_seed=seed, k=4, synergy=1.2, noise=1.0)
        a = fit_report(res, bootstrap=False).primary
        ind = a.fit.ci["repa:rope"]
        if (ind[0] > 0 or ind[1] < 0) and "repa:rope" not in a.pairs.significant:
            return res
    raise AssertionError("no draw separates the two intervals")


def test_the_pair_table_prints_the_matrix_intervals_and_decisions_in_gain_units(tmp_path):
    res = _significant_individually_not_simultaneously()
    fit = fit_report(res, bootstrap=False)
    a = fit.primary
    html = render_report(fit, tmp_path).read_text(encoding="utf-8")
    sec = html[html.index('id="sec-effects-table"') : html.index('id="sec-cells"')]
    tech_html, pair_html = sec[sec.index("<h3>Per technique") :].split("<h3>Per pair", 1)
    # one convention per table: every value column says gain, no raw-scale estimate, intervals labelled
    assert "individual 95% CI" in tech_html and "simultaneous" not in tech_html.split("<tbody>")[0]
    assert "simultaneous 95% CI" in pair_html and "individual" not in pair_html.split("<thead>")[1].split("</thead>")[0]
    assert "main" not in re.findall(r"<td>([^<]*)</td>", pair_html)
    ind = a.fit.ci["repa:rope"]  # INT on the metric scale: an individual interval of S would be -2 x this
    individual_s = _ci(sorted([-2 * ind[0], -2 * ind[1]]))
    row = re.search(r"<tr><td>repa:rope</td>(.*?)</tr>", pair_html).group(1)
    assert _ci(a.pairs.synergy_ci["repa:rope"]) in row and individual_s not in row
    assert f'<td class="num">{_num(a.pairs.synergy["repa:rope"])}</td>' in row
    assert "<td>n.s.</td>" in row  # as the matrix decides: never a finding the simultaneous interval does not carry
    # the decision of every pair is the matrix's star
    syn = fig_synergy(a)
    starred = {t.split("<")[0] for tr in syn.data if tr.text is not None for r in tr.text for t in r if "*" in t}
    for pair in a.pairs.synergy:
        r = re.search(rf"<tr><td>{re.escape(pair)}</td>(.*?)</tr>", pair_html).group(1)
        assert ("significant" in r) == (pair in a.pairs.significant)
    assert len(starred) == len(a.pairs.significant)
    # the technique table is in gain units: fd is min, so the main effect's sign flips
    row = re.search(r"<tr><td>repa</td>(.*?)</tr>", tech_html).group(1)
    assert f'<td class="num">{_num(-a.fit.main_effects["repa"])}</td>' in row


def test_pareto_says_where_its_throughput_comes_from(tmp_path):
    res = make_results(tmp_path)  # no trials_on_host: the trials' clocks may carry neighbours' load
    a = fit_report(res, bootstrap=False).primary
    fig = fig_pareto(res, a)
    notes = [an.text for an in fig.layout.annotations]
    assert any("shared the machine" in n for n in notes)
    assert "shared machine" in fig.layout.xaxis.title.text
    alone = dataclasses.replace(res, table=res.table.assign(trials_on_host=1.0))
    fig = fig_pareto(alone, a)
    assert not fig.layout.annotations and "one trial per machine" in fig.layout.xaxis.title.text
    # with the controlled bench: its numbers, and the axis says so
    cells = res.table.drop_duplicates("cell")[["cell", *res.factors]]
    bench = pd.concat([cells.assign(seed=r, status="finished", images_per_s=500.0 + r) for r in range(3)])
    benched = dataclasses.replace(res, bench=bench)
    fig = fig_pareto(benched, a)
    assert not fig.layout.annotations and "controlled: srdit study bench" in fig.layout.xaxis.title.text
    assert {round(x) for tr in fig.data if tr.mode == "markers+text" for x in tr.x} == {501}


def test_a_partly_aliased_main_effect_is_an_estimate_not_a_test(tmp_path):
    """The study's excluded cell and failed runs leave every main effect partly aliased: the technique table and
    the effects panel give the estimate and no interval or p-value, as the matrix does for such pairs."""
    res = make_results(tmp_path)
    fit = fit_report(res, bootstrap=False)
    a = fit.primary
    assert set(res.factors) <= set(a.fit.partial_aliases) and a.fit.p["repa"] < 0.05  # a p the data cannot carry
    html = render_report(fit, tmp_path / "d").read_text(encoding="utf-8")
    row = re.search(r"<tr><td>repa <span[^>]*>[^<]*</span></td>(.*?)</tr>", html).group(1)
    cols = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cols[:3] == [f"≈{_num(-a.fit.main_effects['repa'])}", "–", "not tested"]
    bars = fig_effects(a).data[0]
    assert list(bars.error_y.array) == [0, 0, 0] and list(bars.error_y.arrayminus) == [0, 0, 0]


def test_a_shared_machine_clock_is_never_called_significant_or_not_in_the_matrix():
    """Throughput from trials that shared the machine carries no significance: its matrix cells say "not tested",
    never "n.s." beside an interval that excludes 0, and no star."""
    from srdit.analysis.effects import CONTENTION_NOTE

    res = factorial(seeds=3)
    rng = np.random.default_rng(5)
    t = res.table.assign(
        images_per_s=100 * np.exp(0.3 * res.table["repa"] * res.table["rope"] + rng.normal(0, 0.01, len(res.table)))
    )
    res = dataclasses.replace(res, table=t, other_metrics={"images_per_s": "max"})
    a = fit_report(res, bootstrap=False).analyses["images_per_s"]
    assert a.notes[0] == CONTENTION_NOTE
    ci = a.pairs.synergy_ci["repa:rope"]
    assert ci[0] > 0  # the planted speed-up's interval excludes 0 ...
    texts = [x for tr in fig_synergy(a).data if tr.text is not None for r in tr.text for x in r if x]
    cell = next(x for x in texts if x.startswith(_num(a.pairs.synergy["repa:rope"], 3)))
    assert "not tested" in cell and "n.s." not in cell and "*" not in cell  # ... and no verdict is drawn from it
    assert not any("n.s." in x or "*" in x for x in texts)
