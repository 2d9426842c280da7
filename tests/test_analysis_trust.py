"""Conclusions a researcher can trust: planted truths for the situations real studies produce (failed, missing and
re-run cells, a technique that always fails, a fraction with a failed cell, non-failure statuses, failure
interactions at small n), intervals that agree with the flags, multiplicity across metrics, pure error on the
textbook replicated 2^3 (plasma etch) and Lenth's method on the textbook unreplicated 2^4 (filtration rate).
Every estimate is checked against its own interval around the truth; no flag where the truth is 0."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats

from srdit.analysis.effects import analyze, analyze_study
from srdit.analysis.results import StudyResults


def _study(factors, n_seeds, effects, sigma=0.5, seed=0, seeds_of=None, status_of=None):
    """Full factorial x seeds. effects: {term tuple: coefficient on 0/1 products}; seeds_of(cell) -> seeds;
    status_of(cell, seed) -> status."""
    rng = np.random.default_rng(seed)
    rows = []
    for lv in itertools.product([0, 1], repeat=len(factors)):
        x = dict(zip(factors, lv))
        on = tuple(f for f in factors if x[f])
        for s in seeds_of(on) if seeds_of else range(n_seeds):
            y = 10.0 + sum(c * np.prod([x[f] for f in t]) for t, c in effects.items()) + rng.normal(0, sigma)
            st = status_of(on, s) if status_of else "finished"
            rows.append({**x, "seed": s, "status": st, "y": y if st == "finished" else np.nan})
    return pd.DataFrame(rows)


def _covers(ci, truth):
    return ci is not None and ci[0] <= truth <= ci[1]


# ---------------------------------------------------------------------------------------------------------------------
# section 1: failed, missing and re-run cells
# ---------------------------------------------------------------------------------------------------------------------
def test_rerun_cell_with_fresh_seeds_drops_the_disconnected_seed_block():
    # A+B crashed and was re-run with seeds 3, 4, 5; the others used 0, 1, 2. Truth: main A = +2 (pm effect on 0/1
    # coding with a real three-way interaction), no pair synergy in the +-1 model except what A:B:C implies: none.
    F = list("ABC")
    pm = {("A",): 1.0, ("A", "B", "C"): 0.0}
    rng = np.random.default_rng(4)
    rows = []
    for lv in itertools.product([0, 1], repeat=3):
        a, b, c = (2 * v - 1 for v in lv)
        on = tuple(f for f, v in zip(F, lv) if v)
        for s in (3, 4, 5) if on == ("A", "B") else (0, 1, 2):
            y = 10 + pm[("A",)] * a + 0.8 * a * b * c + rng.normal(0, 0.3)  # ME_A = 2, ABC real, pairs 0
            rows.append({**dict(zip(F, lv)), "seed": s, "status": "finished", "y": y})
    r = analyze(pd.DataFrame(rows), F, "y", "max", bootstrap=False)
    assert r.fit.seed_block is False
    assert any("seed block dropped" in n and "not connected" in n for n in r.notes)
    assert _covers(r.fit.ci["A"], 2.0)
    assert r.incompatible == [] and r.pairs.significant == []
    for n in ("A:B", "A:C", "B:C"):
        assert _covers(r.pairs.synergy_ci[n], 0.0)
    # the connected layout keeps the block (same data, every cell on seeds 0, 1, 2)
    rows2 = [dict(rw, seed=rw["seed"] - 3) if rw["seed"] >= 3 else rw for rw in rows]
    assert analyze(pd.DataFrame(rows2), F, "y", "max", bootstrap=False).fit.seed_block is True


def test_all_failed_cell_makes_effects_partially_aliased_and_no_pair_is_flagged():
    # the full stack runs out of memory; a real three-way interaction biases every pair estimate of the saturated
    # mains + pairs model (each b estimates b - b_ABC): none may be flagged
    F = list("ABC")
    rng = np.random.default_rng(2)
    rows = []
    for lv in itertools.product([0, 1], repeat=3):
        a, b, c = (2 * v - 1 for v in lv)
        for s in range(3):
            oom = all(lv)
            y = 10 + 1.0 * a + 1.5 * a * b * c + rng.normal(0, 0.3)
            rows.append(
                {**dict(zip(F, lv)), "seed": s, "status": "oom" if oom else "finished", "y": np.nan if oom else y}
            )
    r = analyze(pd.DataFrame(rows), F, "y", "max", bootstrap=False)
    for t in ["A", "B", "C", "A:B", "A:C", "B:C"]:
        assert r.fit.partial_aliases[t] == {"A:B:C": pytest.approx(-1.0)}
    assert sorted(r.pairs.partially_aliased) == ["A:B", "A:C", "B:C"]
    assert r.pairs.antagonism == [] and r.pairs.significant == [] and r.pairs.synergy_ci == {}
    assert all(v is None for v in r.pairs.p_adj.values())
    assert r.pairs.strongest is None
    assert any("partially aliased" in n for n in r.notes)
    js = r.to_json()
    assert js["partial_aliases"]["A:B"] == {"A:B:C": pytest.approx(-1.0)}


def test_technique_that_always_fails_is_dropped_from_the_metric_model_only():
    # every run with D on OOMs; the D-off half is a complete 2^3: A = +2, B = -1 (ME on the metric), A:B synergy
    F = list("ABCD")
    df = _study(
        F,
        3,
        {("A",): 2.0, ("B",): -1.0, ("A", "B"): 1.0},
        sigma=0.3,
        seed=5,
        status_of=lambda on, s: "oom" if "D" in on else "finished",
    )
    r = analyze(df, F, "y", "max", bootstrap=False)
    assert r.fit.dropped_factors == ["D"]
    assert any(n.startswith("D is off in every finished run") for n in r.notes)
    assert r.fit.main_effects["D"] is None and any(i.effect == "D" for i in r.fit.inestimable)
    # on 0/1 coding with an A:B product of 1.0: ME_A = 2 + 0.5, ME_B = -1 + 0.5, INT_AB = 0.5, S_AB = 1.0
    assert _covers(r.fit.ci["A"], 2.5) and _covers(r.fit.ci["B"], -0.5) and _covers(r.fit.ci["C"], 0.0)
    assert _covers(r.pairs.synergy_ci["A:B"], 1.0)
    assert r.pairs.antagonism == []
    # the failure analysis keeps D: its runs are failures, counted per cell
    assert sum(c.n_failed for c in r.attribution.cells if "D" in c.on) == 24


def test_fraction_with_one_failed_cell_falls_back_to_the_estimable_model():
    # 2^(4-1), I = ABCD, two seeds; cell "ad" fails: mains are estimated, one alias chain is dropped with a note
    rng = np.random.default_rng(9)
    rows = []
    for a, b, c in itertools.product([0, 1], repeat=3):
        dd = (a + b + c) % 2
        x = dict(A=a, B=b, C=c, D=dd)
        for s in range(2):
            fail = (a, b, c, dd) == (1, 0, 0, 1)
            y = 10 + 3 * a - 2 * b + 1 * c + 0 * dd + rng.normal(0, 0.2)
            rows.append({**x, "seed": s, "status": "crashed" if fail else "finished", "y": np.nan if fail else y})
    r = analyze(pd.DataFrame(rows), list("ABCD"), "y", "max", bootstrap=False)
    truth = {"A": 3.0, "B": -2.0, "C": 1.0, "D": 0.0}
    for f, t in truth.items():
        assert r.fit.main_effects[f] is not None and _covers(r.fit.ci[f], t)
    dropped = [i for i in r.fit.inestimable if i.reason.startswith("no finished runs")]
    assert len(dropped) == 1
    assert any("inestimable because runs failed" in n for n in r.notes)
    assert r.incompatible == []


def test_only_explicit_failures_count_blank_and_cancelled_are_excluded():
    F = ["A", "B"]
    df = _study(F, 3, {("A",): 1.0}, sigma=0.2, seed=1)
    both = (df.A == 1) & (df.B == 1)
    df.loc[both, "status"] = ["cancelled", "", None]
    r = analyze(df, F, "y", "max", bootstrap=False)
    assert r.n_excluded == 3 and r.n_failed == 0 and r.failures.flagged == []
    assert any("excluded" in n and "cancelled" in n and "(blank)" in n for n in r.notes)
    assert r.to_json()["n_excluded"] == 3
    # the same runs as explicit failures are evidence
    df.loc[both, "status"] = "oom"
    r = analyze(df, F, "y", "max", bootstrap=False)
    assert [t.pair for t in r.failures.flagged] == ["A:B"]


def test_pair_failing_three_of_three_is_flagged_where_fisher_cannot():
    F = ["A", "B"]
    df = _study(F, 3, {}, seed=3, status_of=lambda on, s: "oom" if on == ("A", "B") else "finished")
    assert stats.fisher_exact([[3, 0], [0, 3]], alternative="greater").pvalue == pytest.approx(0.05)
    r = analyze(df, F, "y", "max", bootstrap=False)
    (t,) = r.failures.flagged
    assert t.p_excess == pytest.approx(stats.boschloo_exact([[3, 0], [0, 3]], alternative="greater").pvalue)
    assert t.p_excess < 0.05 and t.p_interaction < 0.05 and t.p_adj < 0.05


# ---------------------------------------------------------------------------------------------------------------------
# section 2: intervals and flags that agree
# ---------------------------------------------------------------------------------------------------------------------
def test_flags_and_stars_agree_with_the_printed_simultaneous_intervals():
    F = list("ABCD")
    for seed in range(6):
        df = _study(F, 3, {("A",): 1.0, ("C", "D"): 1.2 * (seed % 3), ("A", "B"): -0.5 * (seed % 2)}, seed=seed)
        r = analyze(df, F, "y", "min", bootstrap=False, threshold=0.1)
        assert "simultaneous" in r.pairs.interval and "Bonferroni" in r.pairs.interval
        for fl in r.pairs.antagonism:
            assert fl.ci[1] < -0.1 and fl.p_adj < 0.05
        for n, c in r.pairs.synergy_ci.items():
            assert (n in r.pairs.significant) == (c[0] > 0 or c[1] < 0)
            if n in r.pairs.significant:
                assert r.pairs.p_adj[n] < 0.05  # Holm p_adj is never larger than the Bonferroni decision's
            flagged = any(fl.pair == n for fl in r.pairs.antagonism)
            assert flagged == (c[1] < -0.1 and r.pairs.synergy[n] < -0.1)
    js = r.to_json()
    assert "Bonferroni" in js["intervals"]["synergy_ci"] and "INT = S/2" in js["intervals"]["ci"]


def test_secondary_metrics_are_one_exploratory_benjamini_hochberg_family():
    F = ["A", "B", "C"]
    df = _study(F, 3, {("A", "B"): 2.0}, seed=8)
    rng = np.random.default_rng(0)
    for m in ("m1", "m2", "m3"):
        df[m] = rng.normal(size=len(df)) + (1.5 * df.A * df.C if m == "m2" else 0.0)
    res = StudyResults(
        study="s",
        design="full",
        factors=F,
        metric="y",
        direction="max",
        other_metrics={"m1": "max", "m2": "max", "m3": "min"},
        table=df,
    )
    out = analyze_study(res, bootstrap=False)
    assert out["y"].role == "confirmatory" and out["y"].to_json()["role"] == "confirmatory"
    ps, keys = [], []
    for m in ("m1", "m2", "m3"):
        a = out[m]
        assert a.role == "exploratory" and "Benjamini-Hochberg" in a.family and a.correction == "fdr_bh"
        for n in a.pairs.synergy:
            ps.append(a.fit.p[n])
            keys.append((m, n))
    from statsmodels.stats.multitest import multipletests

    q = dict(zip(keys, multipletests(ps, method="fdr_bh")[1]))
    for (m, n), qq in q.items():
        assert out[m].pairs.p_adj[n] == pytest.approx(qq)
        assert (n in out[m].pairs.significant) == (qq < 0.05)


def test_bootstrap_only_where_calibrated_and_labelled():
    F = ["A", "B"]
    small = analyze(_study(F, 3, {("A",): 1.0}), F, "y", "max", n_resamples=199)
    assert small.bootstrap.ci == {} and any("bootstrap skipped" in n and ">= 20" in n for n in small.notes)
    assert small.to_json()["intervals"]["ci_boot"] is None
    big = analyze(_study(F, 20, {("A",): 1.0}), F, "y", "max", n_resamples=199)
    assert set(big.bootstrap.ci) == {"A", "B", "A:B"}
    assert "INT = S/2" in big.to_json()["intervals"]["ci_boot"]


PLASMA_ETCH = {  # Montgomery, Design and Analysis of Experiments, Example 6.1 (Table 6.4): etch rate, 2^3 x 2
    "1": [550, 604],
    "a": [669, 650],
    "b": [633, 601],
    "ab": [642, 635],
    "c": [1037, 1052],
    "ac": [749, 868],
    "bc": [1075, 1063],
    "abc": [729, 860],
}
# the published ANOVA (Table 6.6): sums of squares and p-values, pure error 18,020.50 on 8 df
PLASMA_SS = {"A": 41310.5625, "B": 217.5625, "C": 374850.0625, "A:B": 2475.0625, "A:C": 94402.5625, "B:C": 18.0625}
PLASMA_P = {"A": 0.0027, "B": 0.7639, "C": 0.0001, "A:B": 0.3252, "A:C": 0.0002, "B:C": 0.9308}


def test_replicated_plasma_etch_reproduces_the_published_anova():
    df = pd.DataFrame(
        [
            {f.upper(): int(f in lab) for f in "abc"} | {"etch": v, "rep": i}
            for lab, vals in PLASMA_ETCH.items()
            for i, v in enumerate(vals)
        ]
    )
    r = analyze(df, list("ABC"), "etch", "max", seed_col=None, bootstrap=False)
    assert r.fit.error_df == 8
    assert r.fit.lack_of_fit["pure_error_ss"] == pytest.approx(18020.50)
    assert r.fit.lack_of_fit["p"] == pytest.approx(0.8186, abs=6e-5)  # published: ABC, F = 0.06
    assert r.fit.lack_of_fit["df"] == 1 and r.fit.lack_of_fit["ss"] == pytest.approx(126.5625)  # the ABC term
    for n, p in PLASMA_P.items():
        eff = r.fit.main_effects.get(n, r.fit.interactions.get(n))
        assert 16 * (eff / 2) ** 2 == pytest.approx(PLASMA_SS[n])  # SS = N (effect/2)^2
        if p > 0.001:
            assert r.fit.p[n] == pytest.approx(p, abs=6e-5)
        else:
            assert r.fit.p[n] < 0.001
    # and against statsmodels' full model
    coded = pd.DataFrame({f: 2 * df[f] - 1 for f in "ABC"}).assign(y=df.etch)
    ref = smf.ols("y ~ A * B * C", data=coded).fit()
    for n in PLASMA_P:
        assert r.fit.p[n] == pytest.approx(ref.pvalues[n], rel=1e-8)


def test_unreplicated_filtration_rate_gets_lenths_published_significant_effects():
    # Montgomery, Example 6.2 (filtration rate, 2^4 unreplicated): Lenth's method finds A, C, D, AC, AD
    labels = ["1", "a", "b", "ab", "c", "ac", "bc", "abc", "d", "ad", "bd", "abd", "cd", "acd", "bcd", "abcd"]
    vals = [45, 71, 48, 65, 68, 60, 80, 65, 43, 100, 45, 104, 75, 86, 70, 96]
    df = pd.DataFrame([{f.upper(): int(f in lab) for f in "abcd"} | {"y": v} for lab, v in zip(labels, vals)])
    r = analyze(df, list("ABCD"), "y", "max")
    L = r.fit.lenth
    assert L["pse"] == pytest.approx(2.625)  # 1.5 x median of the 10 |c| below 2.5 s0 (s0 = 1.5 x 2.625)
    assert L["margin"] == pytest.approx(stats.t.ppf(0.975, 5) * 2.625)  # ME = 6.75
    assert sorted(L["significant"]) == ["A", "A:C", "A:D", "C", "D"]
    assert len(L["effects"]) == 15 and L["effects"]["A:B:C:D"] == pytest.approx(1.375)
    assert set(L["significant_simultaneous"]) <= set(L["significant"])
    # a null unreplicated screen: nothing significant at the simultaneous margin
    rng = np.random.default_rng(1)
    r0 = analyze(df.assign(y=rng.normal(size=16)), list("ABCD"), "y", "max")
    assert r0.fit.lenth["significant_simultaneous"] == []


def test_resolution_three_main_effects_are_tagged_aliased():
    # 2^(3-1), C = AB: a planted A:B clash reads as main effect C; C is tagged, not a clean effect
    rows = [dict(A=a, B=b, C=int(a == b), seed=s) for a in (0, 1) for b in (0, 1) for s in range(3)]
    df = pd.DataFrame(rows)
    df["y"] = 5 - 2.0 * ((2 * df.A - 1) * (2 * df.B - 1)) + 0.01 * df.seed
    r = analyze(df, list("ABC"), "y", "max", bootstrap=False)
    assert r.fit.aliased_effects["C"] == "C + A:B" and r.fit.aliased_effects["A:B"] == "C + A:B"
    assert {"A", "B", "C"} <= set(r.to_json()["aliased_effects"])
