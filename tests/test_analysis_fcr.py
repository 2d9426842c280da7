"""The exploratory family's decisions and intervals agree: a study's secondary metrics are one Benjamini-Hochberg
family, and the interval beside each decision is its false-coverage-rate adjusted interval (Benjamini & Yekutieli
2005, JASA 100:71-81), so a star (q < alpha) is exactly an interval that excludes 0. Planted draws where the
metric's own simultaneous (Bonferroni) interval disagreed with q, a property test over random t statistics and
p-values, the FCR level against statsmodels' BH selection and scipy's t quantile, and the page that says so."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import stats
from statsmodels.stats.multitest import multipletests

from srdit.analysis.effects import Analysis, analyze, analyze_study, bh_fcr_intervals, level_pct
from srdit.analysis.figures import fig_synergy
from srdit.analysis.page import render_report
from srdit.analysis.report_fit import fit_report
from srdit.analysis.results import StudyResults

F = ["repa", "rope", "sprint", "reg"]
ALPHA = 0.05


def _study(seed: int, effects: dict[str, dict[tuple[str, str], float]], seeds: int = 3) -> StudyResults:
    """2^4 x `seeds` on fd (min, the confirmatory metric: main effects only) and secondary metrics (max) with the
    planted pair synergies `effects[metric]` (on 0/1 products, noise sd 1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for lv in itertools.product([0, 1], repeat=len(F)):
        x = dict(zip(F, lv))
        cell = "+".join(f for f in F if x[f]) or "baseline"
        for s in range(seeds):
            r = {"trial": f"{cell}-{s}", "cell": cell, "seed": s, "status": "finished", "status_reason": "", **x}
            r["fd"] = 30 - 3 * x["repa"] - 2 * x["rope"] + rng.normal(0, 0.5)
            for m, e in effects.items():
                r[m] = 5 + rng.normal(0, 1.0) + sum(c * x[a] * x[b] for (a, b), c in e.items())
            rows.append(r)
    return StudyResults(
        study="fcr",
        design="full",
        factors=F,
        metric="fd",
        direction="min",
        other_metrics={m: "max" for m in effects},
        table=pd.DataFrame(rows),
    )


def _excludes_0(ci) -> bool:
    return ci[0] > 0 or ci[1] < 0


def _old_interval(res: StudyResults, m: str, pair: str) -> list[float]:
    """What the page drew beside q before: the metric's own simultaneous (Bonferroni) interval."""
    return analyze(res.table, F, m, "max", bootstrap=False, strict=False).pairs.synergy_ci[pair]


def _first_disagreement(effects, q_significant: bool) -> tuple[StudyResults, dict, str, str]:
    """The first noise draw where BH's q and the metric's own Bonferroni interval disagree: q < alpha with an
    interval covering 0 (`q_significant`), or q >= alpha with an interval excluding 0."""
    for seed in range(60):
        res = _study(seed, effects)
        out = analyze_study(res, bootstrap=False)
        for m in effects:
            for n, q in out[m].pairs.p_adj.items():
                if q is not None and (q < ALPHA) == q_significant:
                    if _excludes_0(_old_interval(res, m, n)) != q_significant:
                        return res, out, m, n
    raise AssertionError("no draw separates q from the Bonferroni interval")


def _matrix(a: Analysis) -> tuple[set[str], set[str], dict[str, str]]:
    """The synergy matrix as drawn: starred pairs, muted ("n.s.") pairs, and each pair's upper-triangle text."""
    fig = fig_synergy(a)
    k = len(a.factors)
    text = {}
    for tr in fig.data:
        if tr.text is None:
            continue
        for i, j in itertools.product(range(k), range(k)):
            if i < j and tr.text[i][j]:
                text[f"{a.factors[i]}:{a.factors[j]}"] = tr.text[i][j]
    starred = {n for n, t in text.items() if "*" in t}
    muted = {n for n, t in text.items() if "n.s." in t}
    return starred, muted, text


def _assert_one_rule(out: dict, primary: str) -> None:
    """Every secondary metric: star == q < alpha == the FCR interval excludes 0; antagonism == selected with S < 0
    (its interval below 0); the matrix draws exactly the significant pairs in full colour."""
    for m, a in out.items():
        if m == primary or not isinstance(a, Analysis):
            continue
        tested = {n: q for n, q in a.pairs.p_adj.items() if q is not None}
        assert tested and a.pairs.fcr_level is not None and "FCR-adjusted" in a.pairs.interval
        for n, q in tested.items():
            ci = a.pairs.synergy_ci[n]
            assert (q < ALPHA) == (n in a.pairs.significant) == _excludes_0(ci), (m, n, q, ci)
        ant = {fl.pair: fl for fl in a.pairs.antagonism}
        assert set(ant) == {n for n in a.pairs.significant if a.pairs.synergy[n] < 0}
        for n, fl in ant.items():
            assert fl.ci == a.pairs.synergy_ci[n] and fl.ci[1] < 0 and fl.p_adj == a.pairs.p_adj[n] < ALPHA
        starred, muted, _ = _matrix(a)
        assert starred == set(a.pairs.significant) and muted == set(tested) - starred


# ---------------------------------------------------------------------------------------------------------------------
# planted: where the Bonferroni interval disagreed with q, the FCR interval agrees
# ---------------------------------------------------------------------------------------------------------------------
STRONG_FAMILY = {  # many strong synergies make BH lenient: a moderate pair is selected at p above alpha / 6
    "m1": {("repa", "rope"): 3.0, ("repa", "sprint"): 3.0, ("rope", "sprint"): 3.0, ("repa", "reg"): 3.0},
    "m2": {("sprint", "reg"): 1.6},
}
ONE_AMONG_NULLS = {  # one real synergy among many null pairs: BH is stricter than the metric's own Bonferroni
    "m1": {("sprint", "reg"): 2.0},
    "m2": {},
    "m3": {},
    "m4": {},
    "m5": {},
}


def test_a_star_whose_bonferroni_interval_covered_0_now_has_an_fcr_interval_that_excludes_it():
    res, out, m, n = _first_disagreement(STRONG_FAMILY, q_significant=True)
    a = out[m]
    assert a.pairs.p_adj[n] < ALPHA and not _excludes_0(_old_interval(res, m, n))  # the old page: * beside 0
    assert n in a.pairs.significant and _excludes_0(a.pairs.synergy_ci[n])
    starred, _, text = _matrix(a)
    assert n in starred and f"[{a.pairs.synergy_ci[n][0]:.2g}" in text[n]
    _assert_one_rule(out, "fd")


def test_a_muted_pair_whose_bonferroni_interval_excluded_0_now_has_an_fcr_interval_that_covers_it():
    res, out, m, n = _first_disagreement(ONE_AMONG_NULLS, q_significant=False)
    a = out[m]
    assert a.pairs.p_adj[n] >= ALPHA and _excludes_0(_old_interval(res, m, n))  # the old page: n.s. beside ≠ 0
    assert n not in a.pairs.significant and not _excludes_0(a.pairs.synergy_ci[n])
    _, muted, _ = _matrix(a)
    assert n in muted
    _assert_one_rule(out, "fd")


# ---------------------------------------------------------------------------------------------------------------------
# the level against an independent computation; the confirmatory path is untouched
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("effects", [STRONG_FAMILY, {"m1": {}, "m2": {}}], ids=["selected", "none-selected"])
def test_fcr_level_is_one_minus_r_alpha_over_m_from_statsmodels_bh_and_scipy_t(effects):
    res = _study(1, effects)
    out = analyze_study(res, bootstrap=False)
    rows = []  # metric, pair, S, se(S), df, p as the analysis reports it
    for m in effects:
        a = out[m]
        for n in a.pairs.synergy:
            rows.append((m, n, a.pairs.synergy[n], 2 * a.fit.se[n], a.fit.df_resid, a.fit.p[n]))
    s, se, df, p = (np.array([r[i] for r in rows]) for i in (2, 3, 4, 5))
    # the p-values fed to BH are the two-sided t p-values of the intervals: same estimate, standard error and df
    np.testing.assert_allclose(p, 2 * stats.t.sf(np.abs(s / se), df), rtol=1e-12)
    reject, q, *_ = multipletests(p, alpha=ALPHA, method="fdr_bh")
    r, m_tests = int(reject.sum()), len(rows)
    assert (r > 0) == (effects is STRONG_FAMILY)
    level = 1 - max(r, 1) * ALPHA / m_tests
    tcrit = stats.t.ppf(1 - (1 - level) / 2, df)
    for (m, n, *_), si, sei, tc, qi, rej in zip(rows, s, se, tcrit, q, reject):
        a = out[m]
        assert a.pairs.fcr_level == pytest.approx(level, rel=1e-12)
        assert a.pairs.synergy_ci[n] == pytest.approx([si - tc * sei, si + tc * sei], rel=1e-9)
        assert a.pairs.p_adj[n] == pytest.approx(qi, rel=1e-9)
        assert (n in a.pairs.significant) == bool(rej) == _excludes_0(a.pairs.synergy_ci[n])
        assert f"= {level_pct(level)} (R = {r} of m = {m_tests}" in a.pairs.interval
    if r == 0:  # no selection: Bonferroni's level over the family, and every interval covers 0
        assert level == 1 - ALPHA / m_tests
        assert not any(_excludes_0(out[m].pairs.synergy_ci[n]) for m, n, *_ in rows)
    # the confirmatory metric keeps its own simultaneous (Bonferroni) intervals and decisions, unchanged
    alone = analyze(res.table, F, "fd", "min", bootstrap=False, strict=False)
    assert out["fd"].to_json() == alone.to_json() and out["fd"].pairs.fcr_level is None
    assert "Bonferroni" in out["fd"].pairs.interval


# ---------------------------------------------------------------------------------------------------------------------
# property: for any t statistics or p-values, the selection and the interval never disagree
# ---------------------------------------------------------------------------------------------------------------------
def _check_family(est, se, df, alpha):
    fam = bh_fcr_intervals(est, se, df, alpha)
    p = np.asarray(fam.p)
    m = len(est)
    # away from the one float tie the rule leaves open: p exactly at a BH threshold j alpha / m
    thresholds = np.arange(1, m + 1) * alpha / m
    assume(np.min(np.abs(p[:, None] / thresholds[None, :] - 1)) > 1e-9)
    reject = multipletests(p, alpha=alpha, method="fdr_bh")[0]
    r = int(reject.sum())
    assert fam.selected == reject.tolist() and fam.n_selected == r
    assert fam.level == pytest.approx(1 - max(r, 1) * alpha / m, rel=1e-12)
    tcrit = stats.t.ppf(1 - max(r, 1) * alpha / (2 * m), df)
    for e, s, tc, ci, sel in zip(est, se, tcrit, fam.ci, fam.selected):
        assert ci == pytest.approx([e - tc * s, e + tc * s], rel=1e-9, abs=1e-12)
        assert _excludes_0(ci) == sel  # the star and the interval never disagree
    if r == 0:
        assert not any(_excludes_0(ci) for ci in fam.ci)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    tests=st.lists(
        st.tuples(
            st.floats(-12, 12, allow_nan=False),  # t statistic
            st.floats(1e-3, 1e3),  # standard error
            st.integers(1, 60),  # df
        ),
        min_size=1,
        max_size=40,
    ),
    alpha=st.sampled_from([0.01, 0.05, 0.1, 0.2]),
)
def test_star_and_fcr_interval_agree_for_random_t_statistics(tests, alpha):
    t, se, df = (np.array([x[i] for x in tests], dtype=float) for i in range(3))
    _check_family(t * se, se, df, alpha)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    tests=st.lists(
        st.tuples(
            st.floats(1e-10, 1.0, exclude_min=False),  # two-sided p-value
            st.booleans(),  # sign of the estimate
            st.floats(1e-2, 1e2),  # standard error
            st.integers(2, 60),  # df
        ),
        min_size=1,
        max_size=40,
    ),
    alpha=st.sampled_from([0.05, 0.1]),
)
def test_star_and_fcr_interval_agree_for_random_p_values(tests, alpha):
    p, sign, se, df = (np.array([x[i] for x in tests], dtype=float) for i in range(4))
    est = np.where(sign > 0, 1.0, -1.0) * stats.t.isf(p / 2, df) * se
    _check_family(est, se, df, alpha)


def test_an_exact_estimate_is_selected_and_its_interval_is_the_point():
    fam = bh_fcr_intervals([0.5, 0.0, 0.01], [0.0, 0.0, 1.0], [4, 4, 4], 0.05)
    assert fam.selected == [True, False, False] and fam.ci[0] == [0.5, 0.5] and fam.ci[1] == [0.0, 0.0]
    assert bh_fcr_intervals([], [], [], 0.05).ci == []


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    sizes=st.lists(st.sampled_from([0.0, 0.8, 1.6, 2.4, -1.6]), min_size=12, max_size=12),
)
def test_the_drawn_matrices_follow_one_rule_for_random_planted_studies(seed, sizes):
    pairs = list(itertools.combinations(F, 2))
    effects = {"m1": dict(zip(pairs, sizes[:6])), "m2": dict(zip(pairs, sizes[6:]))}
    _assert_one_rule(analyze_study(_study(seed, effects, seeds=2), bootstrap=False), "fd")


# ---------------------------------------------------------------------------------------------------------------------
# the page says which intervals it draws
# ---------------------------------------------------------------------------------------------------------------------
def test_the_page_labels_the_exploratory_intervals_fcr_adjusted(tmp_path):
    res = _study(1, STRONG_FAMILY)
    fit = fit_report(res, bootstrap=False)
    out = render_report(fit, tmp_path)
    html = out.read_text(encoding="utf-8")
    sec = html[html.index('id="sec-other"') : html.index('id="sec-effects-table"')]
    a = fit.analyses["m1"]
    r = sum(len(fit.analyses[m].pairs.significant) for m in STRONG_FAMILY)
    assert "FCR-adjusted (Benjamini-Yekutieli) 95% interval for the BH family" in sec
    assert f"1 − R·α/m = {level_pct(a.pairs.fcr_level)} (R = {r} pair(s) selected of m = 12" in sec
    assert "Same reading as the main matrix" not in sec and "simultaneous" in sec  # says how it differs
    main = html[html.index('id="fig-synergy"') :][:4000]
    assert "simultaneous" in main and "FCR" not in main  # the confirmatory matrix keeps its caption
    effects = json.loads((tmp_path / "effects.json").read_text(encoding="utf-8"))
    assert "FCR-adjusted (Benjamini-Yekutieli)" in effects["m1"]["intervals"]["synergy_ci"]
    assert "Bonferroni" in effects["fd"]["intervals"]["synergy_ci"]
    assert effects["m1"]["synergy_ci"] == {n: list(c) for n, c in a.pairs.synergy_ci.items()}
    hover = [h for tr in fig_synergy(a).data if tr.hovertext is not None for row in tr.hovertext for h in row]
    assert any("FCR-adjusted CI" in h and "q<sub>BH</sub>" in h for h in hover)
    assert not any("simultaneous CI" in h for h in hover)


def test_an_unreplicated_study_says_no_interval_is_fcr_adjusted(tmp_path):
    fit = fit_report(_study(2, STRONG_FAMILY, seeds=1), bootstrap=False)
    assert all(fit.analyses[m].pairs.fcr_level is None and not fit.analyses[m].pairs.synergy_ci for m in STRONG_FAMILY)
    html = render_report(fit, tmp_path).read_text(encoding="utf-8")
    sec = html[html.index('id="sec-other"') : html.index('id="sec-effects-table"')]
    assert "no Benjamini-Hochberg family is formed and no interval is FCR-adjusted" in sec
    assert "FCR-adjusted (Benjamini-Yekutieli) 95% interval" not in sec


def test_selected_intervals_miss_at_a_rate_of_at_most_alpha_where_unadjusted_ones_do_not():
    """Simulated false coverage rate (Benjamini & Yekutieli 2005: <= alpha for independent tests): 20
    independent t tests (df 20), 8 effects of 2 standard errors and 12 nulls, 2000 families. The unadjusted 95%
    interval on the same selected tests misses about three times as often (14%): the rate this guards against."""
    rng = np.random.default_rng(0)
    m, df, alpha = 20, 20, 0.05
    theta = np.r_[np.full(8, 2.0), np.zeros(12)]
    fcp, fcp_unadjusted = [], []
    for _ in range(2000):
        se = np.sqrt(rng.chisquare(df, m) / df)
        est = theta + rng.normal(size=m)
        fam = bh_fcr_intervals(est, se, np.full(m, df), alpha)
        sel, ci = np.array(fam.selected), np.array(fam.ci)
        r = max(sel.sum(), 1)
        fcp.append((sel & ((ci[:, 0] > theta) | (ci[:, 1] < theta))).sum() / r)
        h = stats.t.isf(alpha / 2, df) * se
        fcp_unadjusted.append((sel & ((est - h > theta) | (est + h < theta))).sum() / r)
    se_fcr = np.std(fcp) / np.sqrt(len(fcp))
    assert np.mean(fcp) < alpha + 3 * se_fcr  # measured 0.045 (se 0.003)
    assert np.mean(fcp_unadjusted) > 2 * alpha  # measured 0.14


def test_a_level_is_printed_with_the_digits_that_tell_it_from_100_percent():
    assert [level_pct(x) for x in (0.95, 1 - 0.05 * 5 / 12, 1 - 0.05 / 30, 1 - 0.05 / 300, 0.9)] == [
        "95%",
        "97.9%",
        "99.83%",
        "99.983%",
        "90%",
    ]
