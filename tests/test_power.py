"""Power before launch (srdit/analysis/power.py, srdit/study/sizing.py, `srdit study plan --noise-sd / --pilot /
--target-mde`).

- the design model: per contrast, SE / sigma and the pure-error df equal what the analysis itself computes
  (fit.se / sqrt(fit.mse), fit.df_resid), and the tested mains / pairs and the Bonferroni family are the analysis's,
  on full, fractional (III, IV, V), holed, constrained, ladder and leave-one-out designs;
- the power formula against statsmodels' independent t-test power;
- the MDE against a simulation: data planted with effects = the reported MDE and the given noise sd, analysed by the
  report's own function (`analyze_study`), detected in 80% +- 8% of the cases (10% of 0.8); at 0.9 x and 1.1 x the
  MDE the rate falls below / rises above 80% (so the simulated MDE is within 10% of the reported one);
- `--target-mde`: the proposal reaches 80% in simulation, the next-smaller candidate does not;
- `--pilot`: the pooled within-cell sd of a real SQLite MLflow store's finished runs; bad input: one line, exit 2.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from srdit.analysis.effects import Options, analyze, analyze_study
from srdit.analysis.power import ALPHA, POWER, PowerError, design_power, mde, pooled_sd, power_at
from srdit.analysis.results import StudyResults
from srdit.commands.study import main as study_main
from srdit.study.designs import fractional_matrix, plan_study
from srdit.study.sizing import _variant, format_power, plan_cells, power_block, propose
from srdit.study.spec import load_study

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "studies" / "digits_quick.yaml"
FACTORIAL = ROOT / "studies" / "digits_factorial.yaml"


def _cells(levels) -> np.ndarray:
    return np.array(levels, dtype=float)


def _full(k: int) -> np.ndarray:
    return _cells(list(itertools.product([0, 1], repeat=k)))


def _frac(k: int, res: int) -> np.ndarray:
    return (fractional_matrix(k, res)[0] + 1) / 2


DESIGNS = {
    "full 2^3": (_full(3), "abc"),
    "2^(5-1) res V": (_frac(5, 5), "abcde"),
    "2^(4-1) res IV": (_frac(4, 4), "abcd"),
    "2^(5-2) res III": (_frac(5, 3), "abcde"),
    "2^3 without the all-on cell": (_full(3)[:-1], "abc"),
    "a requires b (12 of 16 cells)": (
        _cells([c for c in itertools.product([0, 1], repeat=4) if not (c[0] == 1 and c[1] == 0)]),
        "abcd",
    ),
    "a excludes b (unbalanced)": (
        _cells([c for c in itertools.product([0, 1], repeat=3) if not (c[0] and c[1])]),
        "abc",
    ),
    "ladder": (_cells([[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]]), "abc"),
    "leave one out": (_cells([[1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0]]), "abc"),
}


def _table(cells: np.ndarray, factors, n_seeds: int, y: np.ndarray) -> pd.DataFrame:
    """One row per (seed, cell) with metric `fd` = y (seed-major order)."""
    rows = [
        {
            **{f: int(v) for f, v in zip(factors, c)},
            "seed": s,
            "status": "finished",
            "cell": "".join(str(int(v)) for v in c),
        }
        for s in range(n_seeds)
        for c in cells
    ]
    df = pd.DataFrame(rows)
    df["fd"] = y
    return df


def test_alpha_is_the_reports():
    assert ALPHA == Options().alpha == inspect.signature(analyze_study).parameters["alpha"].default
    assert POWER == 0.8


@pytest.mark.parametrize("name", list(DESIGNS))
def test_the_design_model_is_the_analysis_model(name):
    cells, factors = DESIGNS[name]
    factors = list(factors)
    rng = np.random.default_rng(0)
    for n_seeds in (2, 3):
        y = rng.normal(size=len(cells) * n_seeds)
        a = analyze(_table(cells, factors, n_seeds, y), factors, "fd", "min", bootstrap=False)
        p = design_power(cells, factors, n_seeds, sigma=1.0)
        fit = a.fit
        assert p.df == fit.df_resid and p.seed_block == fit.seed_block
        assert {d.effect for d in p.pairs} == set(fit.clean_pairs)
        assert p.m_pairs == a.pairs.n_tested
        assert {d.effect for d in p.mains} == {e for e in fit.p if ":" not in e}
        sd = math.sqrt(fit.mse)
        for d in p.mains:  # main effect: SE(ME)
            assert d.se_per_sd * sd == pytest.approx(fit.se[d.effect], rel=1e-9)
            assert d.level == ALPHA
        for d in p.pairs:  # synergy: SE(S) = 2 SE(INT)
            assert d.se_per_sd * sd == pytest.approx(2 * fit.se[d.effect], rel=1e-9)
            assert d.level == pytest.approx(ALPHA / a.pairs.n_tested)
        # whatever the analysis leaves untested is named, with a reason
        untested = {
            e
            for e in [*factors, *(f"{x}:{z}" for x, z in itertools.combinations(factors, 2))]
            if e not in {d.effect for d in (*p.mains, *p.pairs)}
        }
        assert untested == set(p.untested)


def test_orthogonal_design_standard_errors_are_the_textbook_ones():
    p = design_power(_full(3), list("abc"), 2)
    n = 16
    assert all(d.se_per_sd == pytest.approx(2 / math.sqrt(n)) for d in p.mains) and len(p.mains) == 3
    assert all(d.se_per_sd == pytest.approx(4 / math.sqrt(n)) for d in p.pairs) and len(p.pairs) == 3
    assert p.df == 16 - 8 - 1


def test_power_formula_matches_statsmodels():
    from statsmodels.stats.power import TTestPower

    for df, level, ncp in [(7, 0.05, 2.0), (14, 0.05 / 3, 3.3), (30, 0.005, 4.1), (3, 0.05, 5.0)]:
        nobs = df + 1  # a one-sample t test with nobs has df = nobs - 1 and ncp = d sqrt(nobs)
        ref = TTestPower().power(effect_size=ncp / math.sqrt(nobs), nobs=nobs, alpha=level, alternative="two-sided")
        assert power_at(ncp, 1.0, df, level) == pytest.approx(ref, abs=1e-6)
    for df, level in [(7, 0.05), (14, 0.0167), (200, 0.005)]:
        d = mde(1.0, df, level)
        assert power_at(d, 1.0, df, level) == pytest.approx(POWER, abs=1e-8)
        approx = stats_t(1 - level / 2, df) + stats_t(POWER, df)  # the textbook approximation
        assert d == pytest.approx(approx, rel=0.02)


def test_power_and_mde_stay_defined_where_a_tail_underflows():
    """At 1-3 error df scipy's nct.cdf returns NaN once the lower rejection tail underflows (df 1, ncp 8); the power
    must stay the statsmodels value and the MDE a finite root, for every small df."""
    from scipy import stats
    from statsmodels.stats.power import TTestPower

    for df in (1, 2, 3):
        for ncp in (0.5, 2.0, 8.0, 12.0, 15.08, 40.0):
            nobs = df + 1
            ref = TTestPower().power(effect_size=ncp / math.sqrt(nobs), nobs=nobs, alpha=0.05, alternative="two-sided")
            got = power_at(ncp, 1.0, df, 0.05)
            assert math.isfinite(got)
            if math.isfinite(ref):
                assert got == pytest.approx(ref, abs=1e-6)
            else:  # statsmodels hits the same NaN; the lower tail is below P(T < 0) = Phi(-ncp)
                upper = stats.nct.sf(stats.t.ppf(0.975, df), df, ncp)
                assert 0 <= got - upper <= stats.norm.sf(ncp)
        d = mde(1.0, df, 0.05)
        assert math.isfinite(d) and power_at(d, 1.0, df, 0.05) == pytest.approx(POWER, abs=1e-8)


def test_one_factor_two_seeds_plans_with_one_error_df(tmp_path, capsys):
    """2 cells x 2 seeds leave 1 pure-error df after the seed block: the plan prints its power block."""
    study = tmp_path / "one.yaml"
    study.write_text(
        "name: one\nbase: {preset: digits}\ntechniques: [rmsnorm]\ndesign: full_factorial\nseeds: [0, 1]\n"
    )
    assert study_main(["plan", str(study), "--noise-sd", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "1 pure-error df" in out and "detectable |ME| >=" in out


def stats_t(q, df):
    from scipy import stats

    return stats.t.ppf(q, df)


# --------------------------------------------------------------------------------------------------------------------
# simulation: the report's own analysis on data planted at the reported MDE
# --------------------------------------------------------------------------------------------------------------------
def _simulate(
    cells: np.ndarray, factors, n_seeds: int, sigma: float, main: float, synergy: float, pairs, n_sims: int, seed: int
) -> tuple[float, float]:
    """Detection rates (mains: p < alpha; pairs: in `significant`) over n_sims datasets with every main effect
    = `main` and every pair in `pairs` with synergy = `synergy` (gain units; fd is minimised, so y carries the
    opposite sign), random seed offsets (the seed block absorbs them) and N(0, sigma^2) noise."""
    rng = np.random.default_rng(seed)
    factors = list(factors)
    pm = 2 * np.tile(cells, (n_seeds, 1)) - 1
    mean = 10.0 - (main / 2) * pm.sum(axis=1)  # ME = 2 b; gain = -y
    for a, b in pairs:
        i, j = factors.index(a), factors.index(b)
        mean -= (synergy / 4) * pm[:, i] * pm[:, j]  # S = 4 b
    seed_of = np.repeat(np.arange(n_seeds), len(cells))
    hits_m = hits_p = 0
    n_mains = len(factors)
    for _ in range(n_sims):
        y = mean + rng.normal(0, 1.0, n_seeds)[seed_of] + rng.normal(0, sigma, len(mean))
        res = StudyResults(
            study="sim",
            design="full",
            factors=factors,
            metric="fd",
            direction="min",
            table=_table(cells, factors, n_seeds, y),
        )
        a = analyze_study(res, bootstrap=False)["fd"]
        hits_m += sum(1 for f in factors if (a.fit.p.get(f) is not None and a.fit.p[f] < ALPHA))
        hits_p += sum(1 for x, z in pairs if f"{x}:{z}" in a.pairs.significant)
    return hits_m / (n_sims * n_mains), hits_p / (n_sims * max(len(pairs), 1))


def test_digits_quick_mde_matches_a_simulation_of_its_design():
    spec = load_study(QUICK)
    plan = plan_study(spec)
    sigma = 0.7
    p = design_power(plan_cells(plan), plan.factors, len(spec.seeds), sigma=sigma)
    assert (p.n_runs, p.df, p.m_pairs) == (16, 7, 3)
    pairs = list(itertools.combinations(plan.factors, 2))
    rate_m, rate_p = _simulate(plan_cells(plan), plan.factors, 2, sigma, p.mde_main, p.mde_pair, pairs, 300, 1)
    assert abs(rate_m - POWER) <= 0.08, rate_m
    assert abs(rate_p - POWER) <= 0.08, rate_p


def test_fractional_mde_matches_a_simulation():
    # 2^(5-1) resolution V, 2 seeds: 10 clean pairs, Bonferroni over 10
    cells = _frac(5, 5)
    p = design_power(cells, list("abcde"), 2, sigma=1.0)
    assert p.m_pairs == 10 and p.df == 15
    pairs = list(itertools.combinations("abcde", 2))
    rate_m, rate_p = _simulate(cells, "abcde", 2, 1.0, p.mde_main, p.mde_pair, pairs, 80, 2)
    assert abs(rate_m - POWER) <= 0.08, rate_m
    assert abs(rate_p - POWER) <= 0.08, rate_p


@pytest.mark.slow
def test_unbalanced_design_mde_matches_a_simulation():
    # a excludes b: 6 of 8 cells, non-orthogonal; a:b is inestimable, the others' SEs differ from the full design's
    cells, fac = DESIGNS["a excludes b (unbalanced)"]
    p = design_power(cells, list(fac), 3, sigma=1.0)
    assert "a:b" in p.untested and p.m_pairs == 2
    for d in p.pairs:  # each pair at its own MDE: they share the SE here (symmetric in a, b)
        assert d.mde == pytest.approx(p.mde_pair)
    rate_m, rate_p = _simulate(cells, fac, 3, 1.0, 0.0, p.mde_pair, [("a", "c"), ("b", "c")], 150, 3)
    assert abs(rate_p - POWER) <= 0.08, rate_p


@pytest.mark.slow
def test_simulated_synergy_mde_is_within_ten_percent_of_the_reported_one():
    spec = load_study(QUICK)
    plan = plan_study(spec)
    cells, sigma = plan_cells(plan), 1.0
    p = design_power(cells, plan.factors, 2, sigma=sigma)
    pairs = list(itertools.combinations(plan.factors, 2))
    _, low = _simulate(cells, plan.factors, 2, sigma, 0.0, 0.9 * p.mde_pair, pairs, 150, 4)
    _, high = _simulate(cells, plan.factors, 2, sigma, 0.0, 1.1 * p.mde_pair, pairs, 150, 5)
    assert low < POWER < high, (low, high)


def test_target_mde_proposal_reaches_it_and_the_next_smaller_does_not():
    spec = load_study(QUICK)
    cells = plan_cells(plan_study(spec))
    m3 = design_power(cells, spec.factor_names, 3).mde_pair_sd
    m4 = design_power(cells, spec.factor_names, 4).mde_pair_sd
    sigma = 0.5
    target = sigma * (m3 + m4) / 2
    prop = propose(spec, sigma, target, 7.0, 2)
    assert prop["reached"] and prop["design"] == "full" and prop["n_seeds"] == 4 and prop["trials"] == 32
    assert prop["worst_mde"] <= target < prop["next_smaller"]["worst_mde"]
    assert prop["next_smaller"]["n_seeds"] == 3
    # the cost is the plan's own
    assert prop["cost"] == plan_study(_variant(spec, spec.design, 4)).cost(7.0, 2)
    assert prop["seeds"] == [0, 1, 2, 3]
    # exact power at the target: the proposal reaches 80%, the next smaller does not (each pair; mains reach more)
    for n, reaches in ((4, True), (3, False)):
        q = design_power(cells, spec.factor_names, n, sigma=sigma)
        assert all((power_at(target, d.se_per_sd * sigma, q.df, d.level) >= POWER) == reaches for d in q.pairs)
        assert all(power_at(target, d.se_per_sd * sigma, q.df, d.level) >= POWER for d in q.mains)


@pytest.mark.slow
def test_target_mde_proposal_is_checked_by_simulation():
    spec = load_study(QUICK)
    cells = plan_cells(plan_study(spec))
    m3 = design_power(cells, spec.factor_names, 3).mde_pair_sd
    m4 = design_power(cells, spec.factor_names, 4).mde_pair_sd
    sigma = 0.5
    target = sigma * (m3 + m4) / 2
    prop = propose(spec, sigma, target, 7.0, 2)
    n, n_next = prop["n_seeds"], prop["next_smaller"]["n_seeds"]
    pairs = list(itertools.combinations(spec.factor_names, 2))
    _, rate = _simulate(cells, spec.factor_names, n, sigma, target, target, pairs, 250, 6)
    _, rate_next = _simulate(cells, spec.factor_names, n_next, sigma, target, target, pairs, 250, 7)
    assert rate >= POWER > rate_next, (rate, rate_next)


def test_target_mde_prefers_a_resolution_v_fraction_when_it_is_cheaper():
    spec = load_study(FACTORIAL)  # 5 techniques: the 2^(5-1) res V keeps every pair clean
    prop = propose(spec, 1.0, 1.6, 7.0, 1)
    assert prop["reached"] and prop["design"] == "frac(res=5)" and prop["cells"] == 16
    assert prop["worst_mde"] <= 1.6 < prop["next_smaller"]["worst_mde"]
    assert prop["trials"] > prop["next_smaller"]["trials"]
    full32 = design_power(_full(5), list("abcde"), prop["n_seeds"] // 2 + 1).worst_sd()
    assert prop["worst_mde"] <= full32 + 1e-9 or prop["trials"] < 32 * (prop["n_seeds"] // 2 + 1)
    # a target no design reaches is said so
    far = propose(spec, 1.0, 1e-4, 7.0, 1)
    assert not far["reached"] and "no factorial design" in far["note"]


# --------------------------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------------------------
def _plan_json(capsys, *args) -> dict:
    assert study_main(["plan", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_prints_and_json_carries_the_power_block(capsys):
    assert study_main(["plan", str(QUICK), "--noise-sd", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "16 runs = 8 cells x 2 seeds, 7 pure-error df (seed block)" in out
    assert "detectable |ME| >= 0.817 (1.63 noise sd)" in out
    assert "0.05/3 = 0.0167" in out and "detectable |S| >= 2.05 (4.1 noise sd)" in out
    d = _plan_json(capsys, QUICK, "--noise-sd", "0.5")["power"]
    assert d["sigma"] == 0.5 and d["design"]["df"] == 7 and d["design"]["m_pairs"] == 3
    assert d["design"]["mde_pair"] == pytest.approx(0.5 * d["design"]["mde_pair_sd"])
    # without a noise sd: the MDEs in noise sds, and a hint
    d = _plan_json(capsys, QUICK)["power"]
    assert d["sigma"] is None and d["design"]["mde_pair"] is None and d["design"]["mde_pair_sd"] > 0
    assert study_main(["plan", str(QUICK)]) == 0
    assert "pass --noise-sd X or --pilot STUDY" in capsys.readouterr().out
    # with a target: the proposal and its cost
    d = _plan_json(capsys, QUICK, "--noise-sd", "0.5", "--target-mde", "1.0")["power"]["proposal"]
    assert d["reached"] and d["worst_mde"] <= 1.0 and d["cost"]["trials"] == d["trials"]


def test_non_factorial_designs_say_power_is_for_factorials_only():
    data = yaml.safe_load(QUICK.read_text())
    data["design"] = {"kind": "ladder", "order": ["sprint", "rope", "logit_normal"]}
    specs = [
        load_study(ROOT / "studies" / "digits_stack_loo.yaml"),
        load_study_from(data),
        load_study(ROOT / "studies" / "imagenet256_search.yaml"),
    ]
    for spec in specs:
        block = power_block(spec, plan_study(spec), sigma=1.0, target=1.0)
        assert block["design"] is None and block["proposal"] is None and "factorial designs only" in block["note"]
        assert "factorial designs only" in format_power(block)


def test_unreplicated_plan_says_so_and_still_proposes(tmp_path, capsys):
    data = yaml.safe_load(QUICK.read_text())
    data["seeds"] = [0]
    path = tmp_path / "one_seed.yaml"
    path.write_text(yaml.safe_dump(data))
    assert study_main(["plan", str(path), "--noise-sd", "1", "--target-mde", "4"]) == 0
    out = capsys.readouterr().out
    assert "unreplicated: no pure error" in out and "detectable" not in out
    assert "target MDE 4: full x 3 seeds [0, 1, 2]" in out


def _log_pilot(tmp_path: Path, seeds, values) -> Path:
    """A finished pilot study (techniques rope, logit_normal; metric fd only) in a real SQLite MLflow store under
    tmp_path / "state", logged through the study's own tracking code; values(cell, seed) -> fd or None (diverged)."""
    from srdit.runtime.tracking import ChildRun, open_study, resolve_uri

    data = yaml.safe_load(QUICK.read_text())
    data.update(
        name="pilot",
        seeds=list(seeds),
        techniques=["rope", "logit_normal"],
        metrics={"primary": "fd", "direction": "min"},
    )
    path = tmp_path / "pilot.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_study(path)
    state = (tmp_path / "state").resolve()
    uri = resolve_uri(spec.tracking.uri, state)
    tr = open_study(uri, spec.name, spec.name, state)
    for t in plan_study(spec).trials:
        tags = {
            "study": spec.name,
            "cell": t.cell,
            "seed": t.seed,
            "design": "full",
            **{f"tech.{n}": int(n in t.on) for n in spec.factor_names},
        }
        child = ChildRun.open(uri, tr.experiment_id, tr.parent_run_id, t.key, f"{t.cell}-s{t.seed}", tags, {})
        v = values(t.cell, t.seed)
        if v is not None:
            child.log_metrics(6, {"fd": v})
        child.finish("finished" if v is not None else "diverged", "" if v is not None else "loss is nan")
    return path


def test_pilot_noise_is_the_pooled_within_cell_sd_of_its_finished_runs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    vals = {(c, s): float(20 + int(c, 2) + rng.normal(0, 0.4)) for c in ("00", "01", "10", "11") for s in range(3)}
    vals[("11", 2)] = None  # a diverged run is no replicate
    pilot = _log_pilot(tmp_path, [0, 1, 2], lambda c, s: vals[(c, s)])
    d = _plan_json(capsys, QUICK, "--pilot", pilot, "--state", tmp_path / "state")["power"]
    table = pd.DataFrame([{"cell": c, "fd": v, "status": "finished"} for (c, s), v in vals.items() if v is not None])
    groups = [g.to_numpy() for _, g in table.groupby("cell")["fd"]]
    ss = sum(((g - g.mean()) ** 2).sum() for g in groups)
    df = sum(len(g) - 1 for g in groups)
    assert df == 7
    assert d["sigma"] == pytest.approx(math.sqrt(ss / df), rel=1e-9)
    assert d["pilot"]["df"] == 7 and d["pilot"]["upper90"] > d["sigma"]
    assert d["design"]["mde_pair"] == pytest.approx(d["sigma"] * d["design"]["mde_pair_sd"])
    out = format_power(d)
    assert "pooled within-cell sd of pilot pilot (7 df over 4 replicated cell(s))" in out
    assert "one-sided 90% upper bound" in out and "with the noise sd at its 90% upper bound" in out


def test_pooled_sd_counts_finished_replicates_only():
    t = pd.DataFrame(
        {
            "cell": ["a", "a", "a", "b", "b"],
            "fd": [1.0, 3.0, np.nan, 5.0, 9.0],
            "status": ["finished", "finished", "finished", "finished", "diverged"],
        }
    )
    assert pooled_sd(t, "fd") == (pytest.approx(math.sqrt(2.0)), 1, 1)
    t["fd"] = [1.0, 2.0, 4.0, 8.0, 16.0]
    t["status"] = "finished"
    sd, df, _ = pooled_sd(t, "fd", log=True)  # on the log scale: each cell's logs are spread by log 2 steps
    assert df == 3 and sd == pytest.approx(math.sqrt((2 * math.log(2) ** 2 + 0.5 * math.log(2) ** 2) / 3))
    with pytest.raises(PowerError, match="no replicates"):
        pooled_sd(t.assign(status=["finished", "diverged", "diverged", "finished", "diverged"]), "fd")


def _error(capsys, *args) -> str:
    assert study_main(["plan", *map(str, args)]) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("srdit study plan: error: "), cap.err
    assert "Traceback" not in cap.err
    return lines[0]


def test_bad_power_input_is_one_line_and_exit_2(tmp_path, capsys):
    for bad in ("0", "-1", "nan", "inf"):
        assert "--noise-sd must be a positive number" in _error(capsys, QUICK, "--noise-sd", bad)
    assert "not allowed with" in _error(capsys, QUICK, "--noise-sd", "1", "--pilot", QUICK)
    assert "--target-mde needs a noise sd" in _error(capsys, QUICK, "--target-mde", "1")
    for bad in ("0", "-2", "nan"):
        assert "--target-mde must be a positive number" in _error(capsys, QUICK, "--noise-sd", "1", "--target-mde", bad)
    assert "no such file" in _error(capsys, QUICK, "--pilot", tmp_path / "nope.yaml")
    msg = _error(capsys, QUICK, "--pilot", QUICK, "--state", tmp_path / "empty")
    assert "--pilot" in msg and "srdit study run" in msg
    # a pilot without replicates (one seed)
    one = _log_pilot(tmp_path, [0], lambda c, s: 20.0 + int(c, 2))
    msg = _error(capsys, QUICK, "--pilot", one, "--state", tmp_path / "state")
    assert "no replicates" in msg and "2 or more seeds" in msg
    # a pilot that does not record the study's primary metric
    data = yaml.safe_load(QUICK.read_text())
    data["metrics"] = {"primary": "kd", "direction": "min"}
    kd = tmp_path / "kd.yaml"
    kd.write_text(yaml.safe_dump(data))
    assert "does not record 'kd'" in _error(capsys, kd, "--pilot", one, "--state", tmp_path / "state")


def test_power_block_of_a_constrained_plan_uses_its_runnable_cells():
    data = yaml.safe_load(QUICK.read_text())
    data["constraints"] = [{"excludes": ["sprint", "rope"]}]
    spec = load_study_from(data)
    plan = plan_study(spec)
    block = power_block(spec, plan, sigma=1.0)
    assert block["design"]["n_cells"] == 6 and "sprint:rope" in block["design"]["untested"]
    assert block["design"]["m_pairs"] == 2


def load_study_from(data: dict):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "s.yaml"
        p.write_text(yaml.safe_dump(data))
        return load_study(p)


def test_throughput_primary_is_sized_on_the_log_scale_with_the_wall_clock_caveat():
    data = yaml.safe_load(QUICK.read_text())
    data["metrics"] = {"primary": "images_per_s", "direction": "max"}
    spec = load_study_from(data)
    block = power_block(spec, plan_study(spec), sigma=0.05)
    assert block["scale"] == "log" and "wall-clock metric" in block["note"]
    out = format_power(block)
    me = block["design"]["mde_main"]
    assert f"a ratio of {math.exp(me):.3g}" in out and "(log scale)" in out
