"""Statistics of the analysis layer (srdit.analysis.effects): cross-checked against statsmodels OLS, published
textbook examples, exact Shapley by enumeration of orders, and planted synergy / incompatibility."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf

from srdit.analysis.effects import AnalysisError, analyze, shapley_values


def _design(factors, n_seeds=1):
    rows = []
    for lv in itertools.product([0, 1], repeat=len(factors)):
        for s in range(n_seeds):
            rows.append({**dict(zip(factors, lv)), "seed": s})
    return pd.DataFrame(rows)


def _from_yates(labels, values, factors="abcd"):
    """Rows from treatment-combination labels in Yates notation ("1", "a", "ab", ...)."""
    return pd.DataFrame([{f.upper(): int(f in lab) for f in factors} | {"y": v} for lab, v in zip(labels, values)])


# ---------------------------------------------------------------------------------------------------------------------
# cross-check against statsmodels' OLS
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["max", "min"])
def test_effects_equal_statsmodels_ols_on_random_replicated_factorial(direction):
    rng = np.random.default_rng(42)
    F = ["repa", "rope", "sprint"]
    df = _design(F, n_seeds=4)
    beta = rng.normal(size=7)
    pm = 2 * df[F] - 1
    a, b, c = pm.repa, pm.rope, pm.sprint
    df["y"] = (
        5
        + a * beta[0]
        + b * beta[1]
        + c * beta[2]
        + a * b * beta[3]
        + a * c * beta[4]
        + b * c * beta[5]
        + a * b * c * beta[6]
        + 0.7 * df["seed"]
        + rng.normal(0, 0.5, len(df))
    )
    df["status"] = "finished"
    r = analyze(df, F, "y", direction, bootstrap=False)

    coded = pd.DataFrame({f: 2 * df[f] - 1 for f in F}).assign(y=df["y"], seed=df["seed"])
    # replicated: the error is pure error, i.e. that of the full model (the three-way term is not pooled into it)
    ref = smf.ols("y ~ (repa + rope + sprint)**3 + C(seed)", data=coded).fit()
    ci = ref.conf_int(alpha=0.05)
    ci_sim = ref.conf_int(alpha=0.05 / 3)  # the pair intervals are simultaneous over the 3 pairs (Bonferroni)
    sign = 1 if direction == "max" else -1
    for f in F:  # effect = 2 * beta in +-1 coding
        assert r.fit.main_effects[f] == pytest.approx(2 * ref.params[f], abs=1e-10)
        assert r.fit.ci[f] == pytest.approx([2 * ci.loc[f, 0], 2 * ci.loc[f, 1]], abs=1e-10)
        assert r.fit.p[f] == pytest.approx(ref.pvalues[f], rel=1e-8)
    for x, z in itertools.combinations(F, 2):
        n = f"{x}:{z}"
        assert r.fit.interactions[n] == pytest.approx(2 * ref.params[n], abs=1e-10)
        assert r.pairs.synergy[n] == pytest.approx(sign * 4 * ref.params[n], abs=1e-10)
        assert r.fit.p[n] == pytest.approx(ref.pvalues[n], rel=1e-8)
        lo, hi = sorted([sign * 4 * ci_sim.loc[n, 0], sign * 4 * ci_sim.loc[n, 1]])
        assert r.pairs.synergy_ci[n] == pytest.approx([lo, hi], abs=1e-10)
    assert r.fit.error_df == ref.df_resid
    # balanced design: OLS effects are the textbook contrasts ME = mean(y|+) - mean(y|-)
    for f in F:
        assert r.fit.main_effects[f] == pytest.approx(df.loc[df[f] == 1, "y"].mean() - df.loc[df[f] == 0, "y"].mean())
    # synergy definition: gain of repa with rope on minus gain of repa with rope off (averaged over sprint)
    g = sign * df["y"]
    on = lambda col, v: df[col] == v  # noqa: E731
    me_on = g[on("repa", 1) & on("rope", 1)].mean() - g[on("repa", 0) & on("rope", 1)].mean()
    me_off = g[on("repa", 1) & on("rope", 0)].mean() - g[on("repa", 0) & on("rope", 0)].mean()
    assert r.pairs.synergy["repa:rope"] == pytest.approx(me_on - me_off)
    # the bootstrap interval brackets the estimate and is reported per effect (kept only with >= 20 seeds per cell)
    assert analyze(df, F, "y", direction, n_resamples=999).bootstrap.ci == {}
    df = _design(F, n_seeds=20)
    pm = 2 * df[F] - 1
    df["y"] = 5 + pm.repa * beta[0] + pm.rope * pm.sprint * beta[5] + rng.normal(0, 0.5, len(df))
    rb = analyze(df, F, "y", direction, bootstrap=True, n_resamples=999)
    for n, (lo, hi) in rb.bootstrap.ci.items():
        est = rb.fit.main_effects.get(n, rb.fit.interactions.get(n))
        assert lo <= est <= hi
    assert set(rb.bootstrap.ci) == set(F) | {"repa:rope", "repa:sprint", "rope:sprint"}


def test_multiplicity_correction_is_holm_across_pairs():
    rng = np.random.default_rng(3)
    F = list("ABCD")
    df = _design(F, n_seeds=3)
    df["y"] = rng.normal(size=len(df)) + 4.0 * df.A * df.B
    r = analyze(df, F, "y", "max", bootstrap=False)
    from statsmodels.stats.multitest import multipletests

    pairs = [f"{a}:{b}" for a, b in itertools.combinations(F, 2)]
    expected = multipletests([r.fit.p[n] for n in pairs], method="holm")[1]
    assert [r.pairs.p_adj[n] for n in pairs] == pytest.approx(list(expected))
    assert min(r.pairs.p_adj.values()) < 0.05 < max(r.pairs.p_adj.values())  # a non-trivial check
    rb = analyze(df, F, "y", "max", bootstrap=False, correction="fdr_bh")
    expected = multipletests([rb.fit.p[n] for n in pairs], method="fdr_bh")[1]
    assert [rb.pairs.p_adj[n] for n in pairs] == pytest.approx(list(expected))


# ---------------------------------------------------------------------------------------------------------------------
# published examples
# ---------------------------------------------------------------------------------------------------------------------
MONTGOMERY_6_2 = (  # Montgomery, Design and Analysis of Experiments (8th ed.), Example 6.2, Table 6.10:
    # filtration rate (gal/h), pilot plant, 2^4 unreplicated; A temperature, B pressure, C formaldehyde, D stirring
    ["1", "a", "b", "ab", "c", "ac", "bc", "abc", "d", "ad", "bd", "abd", "cd", "acd", "bcd", "abcd"],
    [45, 71, 48, 65, 68, 60, 80, 65, 43, 100, 45, 104, 75, 86, 70, 96],
)


def test_montgomery_example_6_2_filtration_rate():
    df = _from_yates(*MONTGOMERY_6_2)
    r = analyze(df, list("ABCD"), "y", "max")
    book = {"A": 21.625, "B": 3.125, "C": 9.875, "D": 14.625}
    book_int = {"A:B": 0.125, "A:C": -18.125, "A:D": 16.625, "B:C": 2.375, "B:D": -0.375, "C:D": -1.125}
    for k, v in book.items():
        assert r.fit.main_effects[k] == pytest.approx(v, abs=1e-9)
    for k, v in book_int.items():
        assert r.fit.interactions[k] == pytest.approx(v, abs=1e-9)
        assert r.pairs.synergy[k] == pytest.approx(2 * v, abs=1e-9)  # max: oriented = metric scale
    # unreplicated: no error estimate is invented
    assert r.fit.replicated is False
    assert r.fit.ci == {} and r.fit.p == {} and r.fit.error_df is None
    assert any("no error estimate" in n for n in r.notes)
    assert r.incompatible == []
    # full factorial: Shapley is efficient
    assert sum(r.attribution.shapley.values()) == pytest.approx(96 - 45)


def test_montgomery_problem_6_1_tool_life_replicated():
    # Montgomery (8th ed.) Problem 6.1 / solutions manual: tool life, 2^3 with 3 replicates; the solution's coded
    # model is life = 40.83 + 0.17 A + 5.67 B + 3.42 C - 4.42 AC (coefficients = effects / 2); B, C, AC significant
    data = {
        "1": [22, 31, 25],
        "a": [32, 43, 29],
        "b": [35, 34, 50],
        "ab": [55, 47, 46],
        "c": [44, 45, 38],
        "ac": [40, 37, 36],
        "bc": [60, 50, 54],
        "abc": [39, 41, 47],
    }
    df = pd.DataFrame(
        [{f.upper(): int(f in lab) for f in "abc"} | {"life": v} for lab, vals in data.items() for v in vals]
    )
    r = analyze(df, list("ABC"), "life", "max", n_resamples=999)
    assert r.fit.main_effects["A"] == pytest.approx(2 * 0.16667, abs=1e-3)
    assert r.fit.main_effects["B"] == pytest.approx(2 * 5.66667, abs=1e-3)
    assert r.fit.main_effects["C"] == pytest.approx(2 * 3.41667, abs=1e-3)
    assert r.fit.interactions["A:C"] == pytest.approx(-2 * 4.41667, abs=1e-3)
    assert r.fit.replicated is True
    significant = {n for n, p in r.fit.p.items() if p < 0.05}
    assert significant == {"B", "C", "A:C"}


def test_montgomery_half_fraction_reports_aliased_pairs_not_synergy():
    # Montgomery (8th ed.) Problem 8.1 / solutions manual: 2^(4-1), I = ABCD, replicate 1 of Problem 6.7;
    # effects A = -12, B = -1, C = 4, D = -1, AB(=CD) = 6, AC(=BD) = -1, AD(=BC) = -5
    labels = ["1", "ad", "bd", "ab", "cd", "ac", "bc", "abcd"]
    df = _from_yates(labels, [90, 72, 87, 83, 99, 81, 88, 80])
    r = analyze(df, list("ABCD"), "y", "max", strict=True)  # aliasing is not a hole: no error even when strict
    assert r.fit.main_effects == pytest.approx({"A": -12, "B": -1, "C": 4, "D": -1})
    assert all(v is None for v in r.pairs.synergy.values())
    assert all(v is None for v in r.fit.interactions.values())
    chains = {a.label: a.estimate for a in r.fit.aliased}
    assert chains == pytest.approx({"A:B + C:D": 6.0, "A:C + B:D": -1.0, "A:D + B:C": -5.0})
    assert r.incompatible == []
    assert r.attribution.shapley is None


def test_resolution_three_opposite_aliasing_detected_from_design_matrix():
    # 2^(3-1) with I = -ABC: C = -AB in +-1 coding (opposite columns)
    rows = [dict(A=a, B=b, C=int(not (a ^ b))) for a in (0, 1) for b in (0, 1)]
    # C = 1 exactly when A == B, so in +-1 coding C = +AB; flip to get C = -AB
    rows = [dict(A=r["A"], B=r["B"], C=1 - r["C"]) for r in rows]
    df = pd.DataFrame(rows).assign(y=[1.0, 4.0, 2.0, 7.0])
    r = analyze(df, list("ABC"), "y", "max")
    labels = {a.label for a in r.fit.aliased}
    assert labels == {"A - B:C", "B - A:C", "C - A:B"}
    assert r.pairs.synergy == {"A:B": None, "A:C": None, "B:C": None}
    assert r.fit.main_effects["A"] is not None


# ---------------------------------------------------------------------------------------------------------------------
# Shapley, dividends, leave-one-out, ladder
# ---------------------------------------------------------------------------------------------------------------------
def test_shapley_equals_average_marginal_contribution_over_orders_and_is_efficient():
    rng = np.random.default_rng(7)
    F = list("ABCD")
    v = {frozenset(s): float(rng.normal()) for r in range(5) for s in itertools.combinations(F, r)}
    phi = shapley_values(v, F)
    for f in F:  # definition by enumeration of all k! orders
        tot = 0.0
        for order in itertools.permutations(F):
            before = frozenset(order[: order.index(f)])
            tot += v[before | {f}] - v[before]
        assert phi[f] == pytest.approx(tot / math.factorial(len(F)))
    assert sum(phi.values()) == pytest.approx(v[frozenset(F)] - v[frozenset()])


def test_cell_based_quantities_min_direction():
    F = ["A", "B", "C"]
    df = _design(F, n_seeds=2)
    rng = np.random.default_rng(0)
    df["fd"] = 20 - 3 * df.A - 2 * df.B - 1 * df.C + 1.5 * df.A * df.B + rng.normal(0, 0.1, len(df))
    r = analyze(df, F, "fd", "min", bootstrap=False)
    means = df.groupby(F)["fd"].mean()

    def gain(*on):
        return -means[tuple(int(f in on) for f in F)]

    assert r.attribution.shapley is not None
    assert sum(r.attribution.shapley.values()) == pytest.approx(gain("A", "B", "C") - gain())
    assert r.attribution.dividends["A:B"] == pytest.approx(gain("A", "B") - gain("A") - gain("B") + gain())
    assert r.attribution.dividends_full["A:B"] == pytest.approx(
        gain("A", "B", "C") - gain("B", "C") - gain("A", "C") + gain("C")
    )
    assert r.attribution.loo["C"] == pytest.approx(gain("A", "B", "C") - gain("A", "B"))
    # positive = better: the planted +1.5 fd when A and B are both on is an antagonism
    assert r.pairs.synergy["A:B"] == pytest.approx(-1.5, abs=0.2)
    assert r.fit.interactions["A:B"] > 0  # metric scale, before orientation
    assert r.attribution.best.combo == "A+B+C"  # fd 15.5 against 16 for A+C


def test_ladder_design_chain_and_strict_holes():
    F = ["A", "B", "C"]
    chain = [(), ("A",), ("A", "B"), ("A", "B", "C")]
    rows = [
        {**{f: int(f in on) for f in F}, "seed": s, "y": 10 - 2 * len(on) + 0.1 * s} for on in chain for s in range(3)
    ]
    df = pd.DataFrame(rows)
    r = analyze(df, F, "y", "min", bootstrap=False)
    assert r.attribution.ladder_kind == "chain"
    assert [row.cell for row in r.attribution.ladder] == ["baseline", "A", "A+B", "A+B+C"]
    assert [row.delta for row in r.attribution.ladder[1:]] == pytest.approx([-2, -2, -2])
    assert [row.gain_step for row in r.attribution.ladder[1:]] == pytest.approx([2, 2, 2])
    assert r.fit.inestimable  # a ladder cannot separate interactions: they are reported, not invented
    with pytest.raises(AnalysisError, match="design has holes: .*A:B"):
        analyze(df, F, "y", "min", strict=True)


def test_log_scale_synergy_of_multiplicative_speedups():
    F = ["A", "B"]
    df = _design(F, n_seeds=2)
    df["images_per_s"] = 100 * 2.0**df.A * 3.0**df.B * 1.5 ** (df.A * df.B) * (1 + 0.001 * df.seed)
    r = analyze(df, F, "images_per_s", "max", log=True, bootstrap=False)
    assert r.scale == "log"
    assert r.pairs.synergy["A:B"] == pytest.approx(math.log(1.5), abs=1e-9)
    assert r.attribution.dividends["A:B"] == pytest.approx(math.log(1.5), abs=1e-9)
    bad = df.assign(images_per_s=0.0)
    with pytest.raises(AnalysisError, match="log scale"):
        analyze(bad, F, "images_per_s", "max", log=True)


# ---------------------------------------------------------------------------------------------------------------------
# planted synergy and incompatibility, null study
# ---------------------------------------------------------------------------------------------------------------------
def synthetic_study(seed: int, planted: bool, n_seeds: int = 3, sigma: float = 0.5) -> pd.DataFrame:
    """2^4 factorial (A..D) x seeds, metric fd (lower is better). Planted: synergy A:B (fd -2.5 when both on),
    antagonism C:D (fd +2.0 when both on), failure interaction B:D (all runs with B and D diverge). Random crashes
    (3%) independent of the techniques in both versions. Same noise draws with and without the plants."""
    rng = np.random.default_rng(seed)
    rows = []
    for lv in itertools.product([0, 1], repeat=4):
        x = dict(zip("ABCD", lv))
        for s in range(n_seeds):
            y = 10 - 1.0 * x["A"] - 0.8 * x["B"] - 0.6 * x["C"] - 0.4 * x["D"] + 0.3 * s + rng.normal(0, sigma)
            status, reason = "finished", ""
            if planted:
                y += -2.5 * x["A"] * x["B"] + 2.0 * x["C"] * x["D"]
                if x["B"] and x["D"]:
                    status, reason = "diverged", "loss is NaN"
            if rng.random() < 0.03:
                status, reason = "crashed", "worker died"
            rows.append(
                {**x, "seed": s, "status": status, "status_reason": reason, "fd": y if status == "finished" else np.nan}
            )
    return pd.DataFrame(rows)


def test_planted_synergy_and_incompatibilities_are_detected():
    r = analyze(synthetic_study(1, planted=True), list("ABCD"), "fd", "min", n_resamples=999)
    flags = {(f.pair, f.kind): f for f in r.incompatible}
    assert set(flags) == {("C:D", "antagonism"), ("B:D", "failure")}
    ant = flags[("C:D", "antagonism")]
    assert ant.estimate < 0 and ant.ci[1] < 0 and ant.p_adj < 0.05
    # planted +2.0 fd when C and D are both on: INT = 1.0 on the metric scale, S = -(2 INT) = -2.0 gain
    assert ant.ci[0] < -2.0 < ant.ci[1]
    fail = flags[("B:D", "failure")]
    assert fail.counts["both"] == {"failed": 12, "n": 12}
    assert fail.counts["B_alone"]["failed"] <= 1 and fail.p_adj < 0.05
    assert sum(fail.statuses.values()) == 12 and fail.statuses["diverged"] >= 11  # one random crash
    # synergy A:B (planted -2.5 fd when both on, i.e. S = +2.5 gain) is found, positive and significant
    assert r.pairs.synergy["A:B"] > 0 and r.pairs.p_adj["A:B"] < 0.05
    assert r.pairs.synergy_ci["A:B"][0] < 2.5 < r.pairs.synergy_ci["A:B"][1]
    assert r.pairs.strongest.pair == "A:B"
    # the failed pair has no metric: inestimable, never a number
    assert r.pairs.synergy["B:D"] is None
    assert any(i.effect == "B:D" for i in r.fit.inestimable)


def test_null_study_with_same_noise_flags_nothing():
    r = analyze(synthetic_study(1, planted=False), list("ABCD"), "fd", "min", n_resamples=999)
    assert r.incompatible == []
    assert all(p is None or p >= 0.05 for p in r.pairs.p_adj.values())


def test_null_studies_family_wise_false_flag_rate_is_controlled():
    flagged = 0
    for seed in range(100, 120):
        r = analyze(synthetic_study(seed, planted=False), list("ABCD"), "fd", "min", bootstrap=False)
        flagged += bool(r.incompatible)
    assert flagged <= 3  # Holm at alpha = 0.05: expected about 1 in 20


def test_threshold_suppresses_small_antagonism():
    df = synthetic_study(1, planted=True)
    r = analyze(df, list("ABCD"), "fd", "min", threshold=10.0, bootstrap=False)
    assert [f.kind for f in r.incompatible] == ["failure"]


def test_failure_of_a_single_technique_is_not_a_pair_incompatibility():
    F = ["A", "B", "C"]
    df = _design(F, n_seeds=4)
    df["status"] = np.where(df.A == 1, "oom", "finished")
    df["y"] = np.where(df.A == 1, np.nan, 1.0 + 0.1 * df.seed + 0.2 * df.B)
    r = analyze(df, F, "y", "max", bootstrap=False)
    assert [f for f in r.incompatible if f.kind == "failure"] == []


def test_failed_rows_are_excluded_from_the_metric_model():
    F = ["A", "B"]
    df = _design(F, n_seeds=3)
    df["y"] = 1.0 + df.A + 0.01 * df.seed
    df["status"] = "finished"
    clean = analyze(df, F, "y", "max", bootstrap=False)
    extra = df.iloc[[0]].assign(y=1000.0, status="crashed", seed=7)  # a crashed run with a garbage metric
    nan_row = df.iloc[[1]].assign(y=np.nan, status="finished", seed=8)  # NaN metric counts as diverged
    r = analyze(pd.concat([df, extra, nan_row]), F, "y", "max", bootstrap=False)
    assert r.fit.main_effects["A"] == pytest.approx(clean.fit.main_effects["A"])
    assert r.n_failed == 2
    statuses = {k: v for c in r.attribution.cells for k, v in c.failures.items()}
    assert statuses == {"crashed": 1, "diverged": 1}


# ---------------------------------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_one_line_errors():
    df = _design(["A", "B"], n_seeds=2).assign(y=1.0)
    cases = [
        (dict(table=df, factors=["A", "X"], metric="y"), "missing column"),
        (dict(table=df.assign(A=df.A * 2 + df.seed), factors=["A", "B"], metric="y"), "non-binary levels"),
        (dict(table=df.assign(A=1), factors=["A", "B"], metric="y"), "only one level"),
        (dict(table=df.iloc[:0], factors=["A", "B"], metric="y"), "no rows"),
        (dict(table=df.assign(y=np.nan), factors=["A", "B"], metric="y"), "no finished run"),
    ]
    for kw, msg in cases:
        with pytest.raises(AnalysisError, match=msg) as e:
            analyze(direction="max", **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(AnalysisError, match="direction"):
        analyze(df, ["A", "B"], "y", "up")
    # true/false and -1/+1 codings are accepted
    r = analyze(df.assign(A=df.A.map({0: "false", 1: "true"}), B=2 * df.B - 1), ["A", "B"], "y", "max")
    assert r.fit.main_effects["A"] == pytest.approx(0.0)


def test_analysis_layer_does_not_import_torch_ray_or_mlflow():
    code = (
        "import sys, srdit.analysis, srdit.analysis.results, srdit.analysis.figures, srdit.analysis.page, "
        "srdit.analysis.records, srdit.analysis.reading; "
        "bad = [m for m in ('torch', 'ray', 'mlflow') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_exact_replicates_with_a_three_factor_interaction_do_not_crash_the_lack_of_fit_note():
    # zero pure error (every seed of a cell gives the same value) and an ABC term: F is infinite, said in words
    import itertools

    rows = [
        {"A": a, "B": b, "C": c, "seed": s, "y": 10.0 + a + 3.0 * a * b * c}
        for a, b, c in itertools.product([0, 1], repeat=3)
        for s in range(2)
    ]
    res = analyze(pd.DataFrame(rows), ["A", "B", "C"], "y", "max", bootstrap=False)
    assert res.fit.lack_of_fit["f"] is None and res.fit.lack_of_fit["p"] == 0.0
    assert any("F = inf (no pure error)" in n for n in res.notes)
