"""Effects over training time (srdit.analysis.over_steps): planted truths per step, exact equality with a single-step
analysis, the first-to-last change against statsmodels, a study's long table, `srdit analyze --step / --all-steps`
and their errors, and the report's effects-over-training panel."""

from __future__ import annotations

import io
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats

from srdit.analysis.effects import AnalysisError, analyze, analyze_study
from srdit.analysis.over_steps import analyze_over_steps, rows_at_step, study_over_steps, study_table
from srdit.analysis.page import render_report
from srdit.analysis.report_fit import fit_report
from srdit.analysis.results import StudyResults
from srdit.commands.analyze import main

STEPS = (100, 200, 300, 400)
FACTORS = ["A", "B", "C"]


def long_table(seed: int = 1, fading: bool = True, noise: float = 0.3) -> pd.DataFrame:
    """2^3 x 3 seeds x 4 evaluated steps of fd (min), one trial per cell and seed with its own offset.
    fading: A's gain 4.9 (1 - w) fades to 0 at the end (w = step / 400), B's gain (1 - w) + 3 w grows and the
    synergy S(A:B) = 2 (1 - w) fades (`truth`); otherwise every effect is the same at every step."""
    rng = np.random.default_rng(seed)
    rows = []
    for a, b, c in itertools.product([0, 1], repeat=3):
        for s in range(3):
            offset = rng.normal(0, noise)
            for step in STEPS:
                w = step / 400
                ka, kb, kab = (3.9 * (1 - w), 3 * w, 2 * (1 - w)) if fading else (1.5, 1.0, 1.0)
                fd = 20 - 10 * w - ka * a - kb * b - kab * a * b - 0.2 * c + offset + rng.normal(0, noise)
                rows.append(
                    {
                        "trial": f"{a}{b}{c}-s{s}",
                        "A": a,
                        "B": b,
                        "C": c,
                        "seed": s,
                        "step": step,
                        "status": "finished",
                        "fd": fd,
                    }
                )
    return pd.DataFrame(rows)


def truth(step: int) -> dict[str, float]:
    """The planted oriented effects (gain units, positive = better) of `long_table(fading=True)` at `step`."""
    w = step / 400
    # ME_A = 3.9 (1 - w) + mean over B of 2 (1 - w) b = 3.9 (1 - w) + (1 - w); ME_B = 3 w + (1 - w)
    return {"A": 4.9 * (1 - w), "B": 3 * w + (1 - w), "C": 0.2, "A:B": 2 * (1 - w), "A:C": 0.0, "B:C": 0.0}


def test_planted_effects_are_recovered_at_every_step_and_the_change_is_stated():
    ov = analyze_over_steps(long_table(noise=0.15), FACTORS, "fd", "min", bootstrap=False)
    assert ov.steps == list(STEPS) and ov.analysed_steps == list(STEPS)
    by = {s.effect: {p.step: p for p in s.points} for s in ov.series}
    for step in STEPS:
        for name, true in truth(step).items():
            p = by[name][step]
            assert p.ci[0] - 0.1 < true < p.ci[1] + 0.1, (name, step, p)  # within its interval (plus slack)
            assert abs(p.estimate - true) < (0.3 if p.step and len(name) == 1 else 0.5), (name, step, p.estimate)
    assert by["A"][100].significant and not by["A"][400].significant
    assert by["A"][100].estimate > by["A"][200].estimate > by["A"][300].estimate > by["A"][400].estimate
    assert by["B"][100].estimate < by["B"][400].estimate
    change = {c.effect: c for c in ov.changes}
    assert change["A"].significant and change["A"].estimate < 0 and change["A"].ci[1] < 0
    assert change["B"].significant and change["B"].estimate > 0
    assert change["A:B"].significant and change["A:B"].estimate < 0
    assert not change["C"].significant and not change["A:C"].significant and not change["B:C"].significant
    text = "\n".join(ov.statements)
    assert "A: helps at step 100, no clear effect at step 400; the gain shrinks significantly" in text
    assert "B: helps at step 100, helps at step 400; the gain grows significantly" in text
    assert "A:B: synergy at step 100" in text and "the synergy shrinks significantly" in text
    assert not any(s.startswith("C:") for s in ov.statements)
    json.dumps(ov.to_json(), allow_nan=False)  # JSON-safe


def test_constant_effects_carry_no_statement_about_training_time():
    ov = analyze_over_steps(long_table(seed=3, fading=False), FACTORS, "fd", "min", bootstrap=False)
    assert all(c.significant is False for c in ov.changes)
    assert len(ov.statements) == 1 and "carry no statement such as 'helps early, not at the end'" in ov.statements[0]


def test_an_untested_change_says_why():
    t = long_table()
    one_seed = analyze_over_steps(t[t["seed"] == 0], FACTORS, "fd", "min", bootstrap=False)
    assert one_seed.statements == [
        "The change of the effects between step 100 and step 400 is not tested (no "
        "replicated runs evaluated at both steps): the data carry no statement about it."
    ]
    half = t[(t["A"] + t["B"] + t["C"]) % 2 == 0]  # resolution III: every main effect aliased with a pair
    assert (
        "no effect is estimable free of aliasing"
        in analyze_over_steps(half, FACTORS, "fd", "min", bootstrap=False).statements[0]
    )
    anonymous = analyze_over_steps(t.drop(columns=["trial", "seed"]), FACTORS, "fd", "min", bootstrap=False)
    assert "rows of one step do not identify their trial" in anonymous.statements[0]
    assert all(c.significant is None for c in one_seed.changes + anonymous.changes)


@pytest.mark.slow
def test_false_statements_about_training_time_stay_within_alpha():
    # no effect changes: the family of change intervals (Bonferroni over 6) is wrong at most alpha of the time;
    # individual intervals would make a false statement in about a quarter of the studies
    n, hits = 100, 0
    for rep in range(n):
        rng = np.random.default_rng(1000 + rep)
        t = long_table(seed=rep, fading=False)
        t = t.assign(fd=t["fd"] + rng.normal(0, 0.3, len(t)))
        hits += any(c.significant for c in analyze_over_steps(t, FACTORS, "fd", "min", bootstrap=False).changes)
    assert hits / n <= 0.05 + 3 * (0.05 * 0.95 / n) ** 0.5, hits


def test_each_step_equals_a_single_step_analysis_of_its_rows_exactly():
    t = long_table()
    t.loc[(t["step"] == 300) & (t["trial"] == "110-s1"), ["status", "fd"]] = ["diverged", np.nan]
    ov = analyze_over_steps(t, FACTORS, "fd", "min", bootstrap=False, threshold=0.1)
    for step in STEPS:
        single = analyze(t[t["step"] == step], FACTORS, "fd", "min", bootstrap=False, threshold=0.1)
        assert ov.analyses[step].to_json() == single.to_json(), step


def test_change_equals_the_difference_of_the_steps_and_statsmodels_paired_ols():
    t = long_table(seed=7)
    ov = analyze_over_steps(t, FACTORS, "fd", "min", bootstrap=False)
    by = {s.effect: {p.step: p.estimate for p in s.points} for s in ov.series}
    for c in ov.changes:  # every trial finished at both steps: the paired change is the difference of the effects
        assert c.estimate == pytest.approx(by[c.effect][400] - by[c.effect][100], abs=1e-9), c.effect
    # independent: OLS of y(400) - y(100) on +-1 columns with a seed block (statsmodels), Bonferroni over 6 effects
    a = t[t["step"] == 100].set_index("trial")
    b = t[t["step"] == 400].set_index("trial")
    d = b[FACTORS + ["seed"]].assign(y=-(b["fd"] - a["fd"]))  # oriented: fd is minimised
    for f in FACTORS:  # +-1 coding, renamed: a column named C would hide patsy's C()
        d["x" + f] = 2 * d.pop(f) - 1
    fit = smf.ols("y ~ xA * xB * xC + C(seed)", data=d).fit()
    tcrit = stats.t.ppf(1 - 0.05 / (2 * 6), fit.df_resid)
    for c in ov.changes:
        term = ":".join("x" + f for f in c.effect.split(":"))
        mult = 2.0 if c.kind == "main" else 4.0  # ME = 2 beta; S = 2 INT = 4 beta
        assert c.estimate == pytest.approx(mult * fit.params[term], abs=1e-9)
        half = tcrit * mult * fit.bse[term]
        assert c.ci == pytest.approx([c.estimate - half, c.estimate + half], abs=1e-9)
        assert c.p == pytest.approx(fit.pvalues[term], rel=1e-6)


def test_study_table_counts_failures_at_the_steps_they_failed_and_matches_the_report_at_the_end():
    rng = np.random.default_rng(0)
    rows, curves = [], []
    for i, (a, b) in enumerate(itertools.product([0, 1], repeat=2)):
        for s in range(3):
            trial = f"t{i}{s}"
            status = "oom" if a and b and s == 0 else "finished"
            fd = {st: 10 - a * st / 100 - b + rng.normal(0, 0.2) for st in (100, 200, 300)}
            rows.append(
                {
                    "trial": trial,
                    "cell": f"{a}{b}",
                    "seed": s,
                    "status": status,
                    "status_reason": "out of memory at step 250" if status == "oom" else "",
                    "A": a,
                    "B": b,
                    "fd": fd[300] if status == "finished" else np.nan,
                }
            )
            for st in (100, 200, 300):
                if status == "oom" and st == 300:
                    continue  # it failed before its last evaluation
                if trial == "t01" and st == 200:
                    continue  # an evaluation that was not logged
                curves.append({"trial": trial, "cell": f"{a}{b}", "seed": s, "key": "fd", "step": st, "value": fd[st]})
    res = StudyResults(
        study="s",
        design="full",
        factors=["A", "B"],
        metric="fd",
        direction="min",
        table=pd.DataFrame(rows),
        curves=pd.DataFrame(curves),
        steps=300,
    )
    lt = study_table(res)
    at = {st: lt[lt["step"] == st].set_index("trial") for st in (100, 200, 300)}
    assert at[100].loc["t30", "status"] == "finished" and at[300].loc["t30", "status"] == "oom"
    assert at[200].loc["t01", "status"] == "not evaluated"
    pd.testing.assert_frame_equal(at[300].reset_index()[res.table.columns], res.table, check_dtype=False)
    ov = study_over_steps(res, bootstrap=False)
    assert ov.analyses[300].to_json() == analyze_study(res, bootstrap=False)["fd"].to_json()
    assert ov.analyses[100].n_failed == 0 and ov.analyses[300].n_failed == 1
    assert any("not evaluated are excluded" in n for n in ov.analyses[200].notes)


def test_errors_name_the_column_and_the_steps_present():
    t = long_table()
    with pytest.raises(AnalysisError, match=r"step 250 is not in the table; evaluated steps: 100, 200, 300, 400"):
        rows_at_step(t, 250)
    with pytest.raises(AnalysisError, match=r"has no 'step' column"):
        analyze_over_steps(t.drop(columns="step"), FACTORS, "fd", "min")
    with pytest.raises(AnalysisError, match=r"column 'step' must hold a number in every row \(row 1: 'early'"):
        analyze_over_steps(t.assign(step=["early"] + list(t["step"][1:])), FACTORS, "fd", "min")


# ------------------------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------------------------
def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    rc = main([str(a) for a in argv], stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


BASE = ["--factors", "A,B,C", "--metric", "fd", "--direction", "min", "--no-bootstrap"]


@pytest.fixture
def long_csv(tmp_path) -> Path:
    p = tmp_path / "long.csv"
    long_table().to_csv(p, index=False)
    return p


def test_cli_step_and_all_steps(long_csv, tmp_path):
    rc, out, err = run_main([long_csv, *BASE, "--step", "200", "--format", "json"])
    assert rc == 0, err
    t = pd.read_csv(long_csv)
    assert json.loads(out) == json.loads(
        json.dumps(analyze(t[t["step"] == 200], FACTORS, "fd", "min", bootstrap=False).to_json())
    )
    rc, out, err = run_main([long_csv, *BASE, "--all-steps", "--format", "json"])
    assert rc == 0, err
    j = json.loads(out)
    assert j["steps"] == list(STEPS) and set(j["per_step"]) == {str(s) for s in STEPS}
    assert (
        j["per_step"]["200"]["main_effects"]
        == json.loads(run_main([long_csv, *BASE, "--step", "200", "--format", "json"])[1])["main_effects"]
    )
    assert any(s.startswith("A: helps at step 100") for s in j["statements"])
    rc, out, err = run_main([long_csv, *BASE, "--all-steps"])
    assert rc == 0, err
    assert "Effects over training on fd" in out and "Change from step 100 to step 400" in out
    assert "the gain shrinks significantly" in out and "A:B" in out


def _one_line(rc, out, err, *needles):
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_cli_bad_step_input_is_one_line(long_csv, tmp_path):
    flat = tmp_path / "flat.csv"
    pd.read_csv(long_csv).drop(columns="step").drop_duplicates("trial").to_csv(flat, index=False)
    _one_line(*run_main([flat, *BASE, "--all-steps"]), str(flat), "no 'step' column", "--step-col")
    _one_line(*run_main([flat, *BASE, "--step", "100"]), str(flat), "no 'step' column")
    _one_line(
        *run_main([long_csv, *BASE, "--step", "250"]),
        "step 250 is not in",
        str(long_csv),
        "evaluated steps: 100, 200, 300, 400",
    )
    _one_line(*run_main([long_csv, *BASE]), "4 evaluated steps in column 'step'", "--step N", "--all-steps")
    _one_line(*run_main([long_csv, *BASE, "--all-steps", "--step-col", "iteration"]), "--step-col", "iteration")
    _one_line(*run_main([long_csv, *BASE, "--all-steps", "--step", "100"]), "not allowed with")
    _one_line(*run_main([long_csv, *BASE, "--step", "late"]), "--step", "late")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _one_line(
        *run_main([long_csv, *BASE, "--all-steps", "--report", blocker / "rep"]), "--report", "cannot write the report"
    )
    text = tmp_path / "text.csv"
    pd.read_csv(long_csv).assign(step="late").to_csv(text, index=False)
    _one_line(*run_main([text, *BASE, "--all-steps"]), "must hold a number", "'late'")


def test_cli_report_has_the_panel_or_says_one_step(long_csv, tmp_path):
    rc, out, err = run_main([long_csv, *BASE, "--all-steps", "--report", tmp_path / "rep"])
    assert rc == 0, err
    page = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")
    sec = page[page.index('id="sec-fig-over-steps"') : page.index('id="sec-fig-ladder"')]
    assert 'id="fig-over-steps"' in sec and "helps at step 100" in sec and "pointwise" in sec
    ov = json.loads((tmp_path / "rep" / "effects_over_steps.json").read_text())
    assert ov["steps"] == list(STEPS)
    rc, out, err = run_main([long_csv, *BASE, "--step", "400", "--report", tmp_path / "one"])
    assert rc == 0, err
    page = (tmp_path / "one" / "index.html").read_text(encoding="utf-8")
    sec = page[page.index('id="sec-fig-over-steps"') : page.index('id="sec-fig-ladder"')]
    assert 'id="fig-over-steps"' not in sec and "this report analyses step 400 of the 4 steps" in sec


def test_report_panel_from_study_curves_and_plain_words_for_one_step(tmp_path):
    t = long_table()
    last = t[t["step"] == 400].drop(columns="step").assign(cell=lambda d: d["trial"].str[:3], status_reason="")
    curves = t.assign(cell=t["trial"].str[:3], key="fd", value=t["fd"])[
        ["trial", "cell", "seed", "key", "step", "value"]
    ]
    res = StudyResults(
        study="over", design="full", factors=FACTORS, metric="fd", direction="min", table=last, curves=curves, steps=400
    )
    page = render_report(fit_report(res, bootstrap=False), tmp_path / "over").read_text(encoding="utf-8")
    sec = page[page.index('id="sec-fig-over-steps"') : page.index('id="sec-fig-ladder"')]
    assert 'id="fig-over-steps"' in sec and "A: helps at step 100" in sec
    assert re.search(r'<a href="#sec-fig-over-steps">', page)
    one = StudyResults(
        study="one",
        design="full",
        factors=FACTORS,
        metric="fd",
        direction="min",
        table=last,
        curves=curves[curves["step"] == 400],
        steps=400,
    )
    page = render_report(fit_report(one, bootstrap=False), tmp_path / "one").read_text(encoding="utf-8")
    sec = page[page.index('id="sec-fig-over-steps"') : page.index('id="sec-fig-ladder"')]
    assert 'id="fig-over-steps"' not in sec
    assert "fd was evaluated at one step only (step 400)" in sec and "eval_every" in sec
    none = StudyResults(study="none", design="full", factors=FACTORS, metric="fd", direction="min", table=last)
    page = render_report(fit_report(none, bootstrap=False), tmp_path / "none").read_text(encoding="utf-8")
    assert "no evaluation of fd during training was recorded" in page


def test_wall_clock_primary_metric_is_not_analysed_over_training(tmp_path):
    t = long_table()
    last = (
        t[t["step"] == 400]
        .drop(columns="step")
        .assign(cell=lambda d: d["trial"].str[:3], status_reason="", images_per_s=lambda d: 100 + d["A"] * 10.0)
    )
    curves = t.assign(cell=t["trial"].str[:3], key="images_per_s", value=100.0)[
        ["trial", "cell", "seed", "key", "step", "value"]
    ]
    res = StudyResults(
        study="ips",
        design="full",
        factors=FACTORS,
        metric="images_per_s",
        direction="max",
        table=last,
        curves=curves,
        steps=400,
    )
    with pytest.raises(AnalysisError, match="not analysed over training"):
        study_over_steps(res)
    page = render_report(fit_report(res, bootstrap=False), tmp_path / "ips").read_text(encoding="utf-8")
    sec = page[page.index('id="sec-fig-over-steps"') : page.index('id="sec-fig-ladder"')]
    assert 'id="fig-over-steps"' not in sec and "could not be analysed" in sec and "srdit study bench" in sec
