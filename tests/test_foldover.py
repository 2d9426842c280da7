"""The fold-over design (`design: {kind: foldover, of: OTHER.yaml, factor: NAME}`): the mirror-image maths, the
combined design's resolution and aliases, the refusals, what the fold-over inherits from the study it folds, its
first half being exactly that study's trials (same trial keys, so finished runs are reused), and the block term of
the analysis against statsmodels' OLS with C(block)."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
import yaml
from scipy import stats

from srdit.analysis.effects import AnalysisError, analyze
from srdit.config import ConfigError
from srdit.study import designs as D
from srdit.study.designs import (
    alias_map,
    defining_words,
    foldover,
    format_plan,
    full_factorial_matrix,
    plan_study,
    resolution,
)
from srdit.study.spec import load_study

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "train": {"steps": 4, "batch_size": 16, "log_every": 2, "ckpt_every": 2},
    "eval": {"n_samples": 50, "batch_size": 50},
    "sample": {"sampler": "euler", "steps": 2},
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _fraction(tmp_path: Path, techniques: list, resolution_: int, name: str = "frac", **extra) -> Path:
    return _write(
        tmp_path / f"{name}.yaml",
        {
            "name": name,
            "base": BASE,
            "techniques": techniques,
            "design": {"kind": "fractional_factorial", "resolution": resolution_},
            "seeds": [0, 1],
            **extra,
        },
    )


def _fold(tmp_path: Path, of: str = "frac.yaml", name: str = "fold", factor: str | None = None, **extra) -> Path:
    design = {"kind": "foldover", "of": of, **({"factor": factor} if factor else {})}
    return _write(tmp_path / f"{name}.yaml", {"name": name, "design": design, **extra})


def _pm(plan, names) -> np.ndarray:
    return np.array([[1 if n in c.on else -1 for n in names] for c in plan.cells])


# ------------------------------------------------------------------------------------------------------------------
# design maths
# ------------------------------------------------------------------------------------------------------------------
def test_mirror_rows_flip_every_sign_or_one_column():
    m = np.array([[-1, -1, 1], [1, -1, -1], [-1, 1, -1], [1, 1, 1]])  # 2^(3-1), I = ABC
    assert (foldover(m) == -m).all()
    one = foldover(m, [1])
    assert (one[:, [0, 2]] == m[:, [0, 2]]).all() and (one[:, 1] == -m[:, 1]).all()
    assert (m == np.array([[-1, -1, 1], [1, -1, -1], [-1, 1, -1], [1, 1, 1]])).all()  # the input is left alone
    # full fold-over of a resolution III fraction: the odd word leaves, the two halves make the full 2^3
    assert resolution(m) == 3 and math.isinf(resolution(np.vstack([m, foldover(m)])))
    assert sorted(map(tuple, np.vstack([m, foldover(m)]).tolist())) == sorted(
        map(tuple, full_factorial_matrix(3).tolist())
    )


def test_full_foldover_of_a_resolution_three_fraction_frees_every_main_effect(tmp_path):
    names = ["sprint", "rope", "qk_norm", "logit_normal", "rmsnorm"]
    other = load_study(_fraction(tmp_path, names, 3))
    first = plan_study(other)
    f1 = _pm(first, names)
    assert len(f1) == 8 and resolution(f1) == 3  # 2^(5-2)
    before = alias_map(f1, names)
    assert any(":" not in e and any(a.lstrip("-").count(":") == 1 for a in al) for e, al in before.items())
    fold = plan_study(load_study(_fold(tmp_path)))
    m = _pm(fold, names)
    assert len(m) == 16 and (m[:8] == f1).all() and (m[8:] == -f1).all()
    assert resolution(m) == 4  # odd words leave: resolution IV
    # no main effect is aliased with a pair or another main effect any more (pairs still with pairs)
    for eff, al in fold.aliases.items():
        if ":" not in eff:
            assert all(a.lstrip("-").count(":") >= 2 for a in al), (eff, al)
    assert any(a.lstrip("-").count(":") == 1 for e, al in fold.aliases.items() if e.count(":") == 1 for a in al)
    assert (
        fold.resolution == 4
        and fold.defining_relation
        and all(len(w.split("= ")[1].lstrip("-").split(":")) % 2 == 0 for w in fold.defining_relation)
    )
    # the defining relation printed is the combined matrix's: exactly the even words of the first half
    even = {(w, sg) for w, sg in defining_words(f1) if len(w) % 2 == 0}
    assert set(defining_words(m)) == even


def test_single_factor_foldover_of_the_resolution_four_digits_study_is_the_full_factorial():
    other = load_study(ROOT / "studies" / "digits_frac4.yaml")
    fold = load_study(ROOT / "studies" / "digits_frac4_foldover.yaml")
    p1, p2 = plan_study(other), plan_study(fold)
    names = other.factor_names
    assert p1.resolution == 4 and len(p1.cells) == 8 and len(p1.aliases) == 10  # every pair aliased with another
    m = _pm(p2, names)
    assert len(m) == 16 and math.isinf(resolution(m)) and math.isinf(p2.resolution)
    assert p2.aliases == {} and p2.defining_relation == []
    j = names.index(fold.design.factor)
    assert (m[8:, j] == -m[:8, j]).all() and (np.delete(m[8:], j, 1) == np.delete(m[:8], j, 1)).all()
    text = format_plan(p2)
    assert "no main effect or pair is aliased with another main effect or pair" in text
    assert "aliases: none among main effects, 2- and 3-technique interactions" in text
    assert "from digits_frac4 (reused when its runs are finished): cells " + ", ".join(c.id for c in p1.cells) in text
    assert "combined design: the full 2^4 factorial (16 cells)" in text
    assert "  0000  baseline  [half 1: from digits_frac4]" in text and "  1000  sprint  [half 2: mirror]" in text
    assert "[half" not in format_plan(p1)
    assert p2.to_json()["foldover"] == {
        "of": "digits_frac4",
        "of_path": other.path,
        "factor": "sprint",
        "first": [c.id for c in p1.cells],
        "mirror": [c.id for c in p2.cells[8:]],
    }


def test_single_factor_foldover_frees_that_factors_pairs_only(tmp_path):
    names = ["sprint", "rope", "qk_norm", "logit_normal", "rmsnorm"]
    _fraction(tmp_path, names, 3)
    fold = plan_study(load_study(_fold(tmp_path, factor="rope")))
    m = _pm(fold, names)
    low = {e: [a for a in al if a.lstrip("-").count(":") <= 1] for e, al in alias_map(m, names, 2).items()}
    low = {e: a for e, a in low.items() if a}
    assert low  # other pairs are still aliased with each other
    assert all(
        "rope" not in e.split(":") and all("rope" not in a.lstrip("-").split(":") for a in al) for e, al in low.items()
    )
    assert "rope" not in alias_map(m, names)  # rope's main effect is clear of every pair and triple
    assert "main effects and pairs still aliased with each other: " in format_plan(fold)


def test_full_foldover_of_an_even_word_fraction_is_refused_with_the_fix(tmp_path):
    _fraction(tmp_path, ["sprint", "rope", "qk_norm", "logit_normal"], 4)
    with pytest.raises(ConfigError) as e:
        load_study(_fold(tmp_path))
    msg = str(e.value)
    assert msg.startswith(
        str(tmp_path / "fold.yaml") + ": design: flipping every sign of frac's fraction gives back the same 8 cells"
    )
    assert "I = sprint:rope:qk_norm:logit_normal" in msg and "even length" in msg
    assert "give design.factor: NAME" in msg and "allowed: sprint, rope, qk_norm, logit_normal" in msg
    assert "\n" not in msg


def test_folding_on_a_factor_in_no_word_is_refused(tmp_path, monkeypatch):
    import pyDOE3

    # 2^(5-1) with E = ABC: D is in no word, so flipping D gives back the same cells
    monkeypatch.setattr(
        D, "fractional_matrix", lambda k, res: (np.asarray(pyDOE3.fracfact("a b c d abc"), dtype=int), "a b c d abc")
    )
    _fraction(tmp_path, ["sprint", "rope", "qk_norm", "logit_normal", "rmsnorm"], 4)
    with pytest.raises(
        ConfigError,
        match=r"design\.factor: flipping logit_normal gives back frac's own 16 cells: "
        r"logit_normal is in no word of its defining relation \(I = sprint:rope:"
        r"qk_norm:rmsnorm\); fold on a technique that is: sprint, rope, qk_norm, "
        r"rmsnorm$",
    ):
        load_study(_fold(tmp_path, factor="logit_normal"))


# ------------------------------------------------------------------------------------------------------------------
# what the fold-over inherits, and its input errors
# ------------------------------------------------------------------------------------------------------------------
def test_foldover_inherits_the_folded_study(tmp_path):
    techs = ["sprint", {"rope": {}}, {"name": "wide_lr", "diff": {"train.lr": 3e-3}}]
    other = load_study(
        _fraction(
            tmp_path,
            techs,
            3,
            constraints=[{"excludes": ["sprint", "wide_lr"]}],
            metrics={"primary": "fd", "others": ["kd"]},
            resources={"cpus": 1},
        )
    )
    spec = load_study(_fold(tmp_path, description="the mirror"))
    assert spec.name == "fold" and spec.description == "the mirror"
    for f in ("base", "factors", "constraints", "seeds", "metrics", "resources", "tracking"):
        assert getattr(spec, f) == getattr(other, f), f
    assert spec.design.kind == "foldover" and spec.design.of.name == "frac" and spec.design.factor is None
    assert spec.design.label == "foldover(of=frac)"
    assert load_study(_fold(tmp_path, factor="rope")).design.label == "foldover(of=frac, factor=rope)"
    # no description: the folded study's; metrics, resources and tracking may be overridden (they train nothing)
    spec2 = load_study(
        _fold(tmp_path, metrics={"primary": "kd"}, resources={"cpus": 2}, tracking={"uri": "http://127.0.0.1:5000"})
    )
    assert spec2.description == other.description and spec2.metrics.primary == "kd"
    assert spec2.resources.cpus == 2 and spec2.tracking.uri == "http://127.0.0.1:5000"
    # the inherited keys may be repeated unchanged (the base by path or inline)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    same = load_study(
        _fold(
            tmp_path,
            base="base.yaml",
            techniques=techs,
            seeds=[0, 1],
            constraints=[{"excludes": ["sprint", "wide_lr"]}],
        )
    )
    assert same.factors == other.factors and same.base == other.base
    # constraints carry over: the excluded cells are the folded study's cells' and their mirrors'
    plan = plan_study(spec)
    assert all(not {"sprint", "wide_lr"} <= set(c.on) for c in plan.cells)


@pytest.mark.parametrize(
    "key, value, where",
    [
        ("techniques", ["sprint", "rope", "rmsnorm"], "techniques"),
        ("techniques", ["rope", "sprint", "qk_norm"], "techniques"),  # another order is other cells
        ("techniques", [{"sprint": {"drop_ratio": 0.5}}, "rope", "qk_norm"], "techniques"),
        ("base", {**BASE, "train": {**BASE["train"], "steps": 5}}, "base"),
        ("seeds", [0, 1, 2], "seeds"),
        ("constraints", [{"excludes": ["sprint", "rope"]}], "constraints"),
    ],
)
def test_a_conflicting_inherited_key_is_one_error_naming_it(tmp_path, key, value, where):
    _fraction(tmp_path, ["sprint", "rope", "qk_norm"], 3)
    with pytest.raises(ConfigError) as e:
        load_study(_fold(tmp_path, **{key: value}))
    assert str(e.value) == (
        f"{tmp_path / 'fold.yaml'}: {where}: differs from the {where} of frac.yaml; a fold-over "
        f"inherits {where} from the study it folds (its first half must be that study's trials): "
        f"remove {where} here or make it equal"
    )


@pytest.mark.parametrize(
    "design, match",
    [
        ({"kind": "foldover"}, r"design\.of: required; the path of the study"),
        (
            {"kind": "foldover", "of": "nope.yaml"},
            r"design\.of: 'nope\.yaml': no such study file .*relative to this file",
        ),
        (
            {"kind": "foldover", "of": "frac.yaml", "factor": "rmsnorm"},
            r"design\.factor: 'rmsnorm' is not a technique of frac\.yaml; allowed: sprint, rope, qk_norm$",
        ),
        (
            {"kind": "foldover", "of": "frac.yaml", "resolution": 3},
            r"design\.resolution: unknown key; allowed keys in design: kind, of, factor",
        ),
        (
            {"kind": "foldover", "of": "full.yaml"},
            r"design\.of: full\.yaml has design full_factorial; a fold-over completes a fractional_factorial",
        ),
        ({"kind": "foldover", "of": "fold0.yaml", "factor": "rope"}, r"design\.of: fold0\.yaml is itself a fold-over"),
        ({"kind": "foldover", "of": "bad.yaml"}, r"design\.of: .*bad\.yaml: seeds: expected a non-empty list"),
        ("foldover", r"design\.of: required; the path of the study"),
    ],
)
def test_foldover_input_errors(tmp_path, design, match):
    _fraction(tmp_path, ["sprint", "rope", "qk_norm"], 3)
    _write(tmp_path / "full.yaml", {"name": "full", "techniques": ["sprint", "rope"]})
    _write(tmp_path / "bad.yaml", {"name": "bad", "techniques": ["sprint", "rope"], "seeds": []})
    _fold(tmp_path, name="fold0")
    _write(tmp_path / "fold.yaml", {"name": "fold", "design": design})
    with pytest.raises(ConfigError, match=match):
        load_study(tmp_path / "fold.yaml")


def test_foldover_must_have_its_own_name(tmp_path):
    _fraction(tmp_path, ["sprint", "rope", "qk_norm"], 3)
    _write(tmp_path / "f.yaml", {"name": "frac", "design": {"kind": "foldover", "of": "frac.yaml"}})
    with pytest.raises(ConfigError, match=r"name: 'frac' is the name of the study it folds \(frac\.yaml\)"):
        load_study(tmp_path / "f.yaml")


def test_cli_refusal_is_one_line_and_exit_2(tmp_path):
    _fraction(tmp_path, ["sprint", "rope", "qk_norm", "logit_normal"], 4)
    _fold(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "srdit", "study", "plan", str(tmp_path / "fold.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "give design.factor: NAME" in r.stderr


# ------------------------------------------------------------------------------------------------------------------
# the first half is the folded study's trials (reuse); the halves are tagged
# ------------------------------------------------------------------------------------------------------------------
def test_first_half_trials_equal_the_folded_studys_trials():
    other = load_study(ROOT / "studies" / "digits_frac4.yaml")
    fold = load_study(ROOT / "studies" / "digits_frac4_foldover.yaml")
    p1, p2 = plan_study(other), plan_study(fold)
    first = [t for t in p2.trials if t.block == 0]
    assert [t.key for t in first] == [t.key for t in p1.trials]  # the same keys: finished runs are found
    assert [t.config for t in first] == [t.config for t in p1.trials]
    from srdit.techniques import training_config

    assert [training_config(t.config) for t in first] == [training_config(t.config) for t in p1.trials]
    mirror = [t for t in p2.trials if t.block == 1]
    assert len(mirror) == len(first) and not {t.key for t in mirror} & {t.key for t in p1.trials}
    assert {t.cell for t in mirror} == set(p2.foldover["mirror"])
    assert all(t.to_dict()["block"] in (0, 1) for t in p2.trials)
    assert all("block" not in t.to_dict() for t in p1.trials)  # other designs: no block


def test_trial_tags_carry_the_block():
    from srdit.runtime.jobs import trial_job
    from srdit.runtime.worker import TrialContext, trial_tags

    fold = load_study(ROOT / "studies" / "digits_frac4_foldover.yaml")
    plan = plan_study(fold)
    ctx = TrialContext(
        study=fold.name,
        design=plan.design,
        factors=tuple(fold.factor_names),
        uri="sqlite:///x.db",
        experiment_id="1",
        parent_run_id="p",
        trials_dir="t",
    )
    tags = [trial_tags(trial_job(t, "."), ctx) for t in plan.trials]
    assert [tg["block"] for tg in tags] == [t.block for t in plan.trials] == [0] * 16 + [1] * 16
    other = plan_study(load_study(ROOT / "studies" / "digits_frac4.yaml"))
    assert "block" not in trial_tags(trial_job(other.trials[0], "."), ctx)


# ------------------------------------------------------------------------------------------------------------------
# the block term of the analysis
# ------------------------------------------------------------------------------------------------------------------
F = ["a", "b", "c", "d"]  # lower case: patsy reads C(...) as a categorical


def _folded_table(seed: int = 7, n_seeds: int = 3, block_effect: float = 1.5) -> pd.DataFrame:
    """The 2^(4-1) fraction I = abcd (block 0) and its fold-over on a (block 1), with a planted block effect."""
    rng = np.random.default_rng(seed)
    rows = [
        {**dict(zip(F, lv)), "seed": s, "block": int(np.prod([2 * x - 1 for x in lv]) < 0)}
        for lv in itertools.product([0, 1], repeat=4)
        for s in range(n_seeds)
    ]
    df = pd.DataFrame(rows)
    pm = 2 * df[F] - 1
    df["y"] = (
        3
        + 1.0 * pm.a
        - 0.5 * pm.b
        + 0.8 * pm.a * pm.b
        - 0.6 * pm.a * pm.c
        + block_effect * df.block
        + 0.3 * df.seed
        + rng.normal(0, 0.4, len(df))
    )
    df["status"] = "finished"
    return df


def _coded(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({f: 2 * df[f] - 1 for f in F}).assign(
        y=df["y"], seed=df["seed"], block=df["block"], cell=df[F].astype(str).agg("".join, axis=1)
    )


@pytest.mark.parametrize("direction", ["max", "min"])
def test_block_term_equals_statsmodels_ols_with_c_block(direction):
    # unbalanced (three runs lost): the block is no longer orthogonal to the effects, so it changes them
    df = _folded_table().drop(index=[5, 17, 30]).reset_index(drop=True)
    r = analyze(df, F, "y", direction, bootstrap=False)
    coded = _coded(df)
    ref = smf.ols("y ~ (a + b + c + d)**2 + C(seed) + C(block)", data=coded).fit()
    pure = smf.ols("y ~ C(cell) + C(seed)", data=coded).fit()  # the block is nested in the cells: pure error
    se = pd.Series(np.sqrt(np.diag(ref.cov_params(scale=pure.mse_resid))), index=ref.params.index)
    t = stats.t.ppf(0.975, pure.df_resid)
    assert r.fit.error_df == pure.df_resid
    for n in [*F, *(f"{x}:{z}" for x, z in itertools.combinations(F, 2))]:
        est = r.fit.main_effects[n] if ":" not in n else r.fit.interactions[n]
        assert est == pytest.approx(2 * ref.params[n], abs=1e-10)
        assert r.fit.se[n] == pytest.approx(2 * se[n], rel=1e-9)
        assert r.fit.ci[n] == pytest.approx(
            [2 * (ref.params[n] - t * se[n]), 2 * (ref.params[n] + t * se[n])], abs=1e-10
        )
        assert r.fit.p[n] == pytest.approx(2 * stats.t.sf(abs(ref.params[n] / se[n]), pure.df_resid), rel=1e-8)
    b = r.fit.block["effects"]["1"]
    assert b["estimate"] == pytest.approx(ref.params["C(block)[T.1]"], abs=1e-10)
    assert b["se"] == pytest.approx(se["C(block)[T.1]"], rel=1e-9)
    assert b["ci"][0] < 1.5 < b["ci"][1]  # the planted block effect
    assert r.to_json()["block"]["levels"] == ["0", "1"]
    assert any(n.startswith("additive block term C(block) (2 blocks: 0, 1); block 1 - block 0 = ") for n in r.notes)
    # the lack of fit is tested against the model with the block: df one less, the block no longer pooled into it
    r0 = analyze(df.drop(columns="block"), F, "y", direction, bootstrap=False)
    assert r.fit.lack_of_fit["df"] == r0.fit.lack_of_fit["df"] - 1
    assert r0.fit.lack_of_fit["p"] < 1e-6 < r.fit.lack_of_fit["p"]
    assert r0.fit.main_effects["a"] != pytest.approx(r.fit.main_effects["a"], abs=1e-6)  # the block mattered
    assert r0.fit.block is None and r0.to_json()["block"] is None


def test_block_term_on_a_complete_foldover_leaves_the_orthogonal_estimates_alone():
    df = _folded_table()
    r, r0 = (
        analyze(df, F, "y", "max", bootstrap=False),
        analyze(df.drop(columns="block"), F, "y", "max", bootstrap=False),
    )
    for n in F:
        assert r.fit.main_effects[n] == pytest.approx(r0.fit.main_effects[n], abs=1e-10)
        assert r.fit.ci[n] == pytest.approx(r0.fit.ci[n], abs=1e-10)  # pure error either way
    # the block is the defining word abcd of the first half: its estimate is the abcd contrast, planted at 1.5
    assert r.fit.block["effects"]["1"]["estimate"] == pytest.approx(
        df[df.block == 1].y.mean() - df[df.block == 0].y.mean(), abs=1e-10
    )


def test_block_without_seeds_and_unreplicated():
    df = _folded_table(n_seeds=2)
    r = analyze(df, F, "y", "max", seed_col=None, bootstrap=False)
    ref = smf.ols("y ~ (a + b + c + d)**2 + C(block)", data=_coded(df)).fit()
    assert r.fit.block is not None and r.fit.seed_block is False
    assert r.fit.main_effects["a"] == pytest.approx(2 * ref.params["a"], abs=1e-10)
    assert r.fit.block["effects"]["1"]["estimate"] == pytest.approx(ref.params["C(block)[T.1]"], abs=1e-10)
    one = _folded_table(n_seeds=1)  # one run per cell: no pure error, Lenth's screen on the cell means
    r1 = analyze(one, F, "y", "max", bootstrap=False)
    assert r1.fit.error_df is None and r1.fit.lenth is not None
    assert r1.fit.block["effects"]["1"]["se"] is None and r1.fit.block["effects"]["1"]["ci"] is None
    # the halves are the two signs of a:b:c:d, so Lenth's a:b:c:d contrast is the block's too (planted 1.5)
    assert "Lenth's contrast a:b:c:d is confounded with the block (block)" in " ".join(r1.notes)
    assert r1.fit.lenth["effects"]["a:b:c:d"] == pytest.approx(-r1.fit.block["effects"]["1"]["estimate"], abs=1e-9)


def test_a_block_confounded_with_a_factor_is_dropped_with_a_note():
    df = _folded_table()
    df["block"] = df["a"]
    r = analyze(df, F, "y", "max", bootstrap=False)
    r0 = analyze(df.drop(columns="block"), F, "y", "max", bootstrap=False)
    assert r.fit.block is None
    assert any(n.startswith("block term (block) dropped: it is confounded with a (") for n in r.notes)
    assert r.fit.main_effects == r0.fit.main_effects


def test_block_column_errors_and_opt_out():
    df = _folded_table()
    df.loc[3, "block"] = np.nan
    with pytest.raises(AnalysisError, match=r"column 'block' is empty in 1 row\(s\)"):
        analyze(df, F, "y", "max", bootstrap=False)
    assert analyze(df, F, "y", "max", bootstrap=False, block_col=None).fit.block is None
    df["block"] = np.nan  # an all-empty column is no block
    assert analyze(df, F, "y", "max", bootstrap=False).fit.block is None


# ------------------------------------------------------------------------------------------------------------------
# end to end: the folded study, then its fold-over, on a real local Ray into a real SQLite MLflow store
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_foldover_study_runs_tags_its_halves_and_is_analysed_with_the_block(tmp_path):
    import ray
    from mlflow import MlflowClient

    from srdit.analysis.effects import analyze_study
    from srdit.commands.report import make_report
    from srdit.runtime.driver import run_study
    from srdit.runtime.ray_parts import shutdown_ray
    from srdit.runtime.results import load_results

    names = ["rmsnorm", "qk_norm", "rope"]
    other = load_study(
        _write(
            tmp_path / "frac.yaml",
            {
                "name": "frac",
                "base": BASE,
                "techniques": names,
                "seeds": [0],
                "design": {"kind": "fractional_factorial", "resolution": 3},
                "metrics": {"primary": "fd", "direction": "min", "others": {"kd": "min"}},
            },
        )
    )
    fold = load_study(_fold(tmp_path))
    state = tmp_path / "state"
    from srdit.commands.study import plan_reuse

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        first = run_study(other, state)
        # the plan shows the first half as reused: the folded study's finished runs have the same run keys
        reuse = plan_reuse(fold, plan_study(fold), state)
        assert reuse["reused"] == 4 and reuse["from"] == {"frac": 4}
        assert reuse["line"].startswith("4 of 8 trials would be reused from study frac")
        res = run_study(fold, state)
    finally:
        shutdown_ray()
    assert first.complete and res.complete and res.statuses == {"finished": 8}
    assert res.reused == 4 and res.ran == 4  # only the mirror half trained
    client = MlflowClient(res.uri)
    children = [
        r for r in client.search_runs([res.experiment_id]) if r.data.tags.get("mlflow.parentRunId") == res.parent_run_id
    ]
    plan = plan_study(fold)
    blocks = {t.key: str(t.block) for t in plan.trials}
    assert {r.data.tags["trial_key"]: r.data.tags["block"] for r in children} == blocks
    assert {r.data.tags["design"] for r in children} == {"foldover(of=frac)"}
    results, _ = load_results(fold, state, curves=False, samples=False)
    table = results.table.set_index("trial")
    assert table["block"].to_dict() == {k: int(v) for k, v in blocks.items()}
    assert sorted(table.loc[table["block"] == 0, "cell"]) == sorted(c.id for c in plan_study(other).cells)
    out = analyze_study(results, bootstrap=False)
    a = out["fd"]
    assert a.fit.block is not None and a.fit.block["levels"] == ["0", "1"]
    assert a.fit.n_cells == 8 and a.fit.aliased == []  # the full 2^3: nothing aliased
    html = make_report(tmp_path / "fold.yaml", state, tmp_path / "dashboards", bootstrap=False)
    assert "additive block term C(block)" in html.read_text()


def test_exported_foldover_table_has_the_block_and_analyze_fits_it(tmp_path, monkeypatch):
    """The halves travel MLflow tag -> study table -> CSV -> `srdit analyze` (the trials are logged through the study's
    own tracking code, without training); a run without the tag (e.g. logged by an older version) takes its half
    from the plan."""
    import io
    import json

    from srdit.commands.analyze import main as analyze_main
    from srdit.commands.study import main as study_main
    from srdit.runtime.results import load_results
    from srdit.runtime.tracking import ChildRun, open_study, resolve_uri

    names = ["rmsnorm", "qk_norm", "rope"]
    _write(
        tmp_path / "frac.yaml",
        {
            "name": "frac",
            "base": BASE,
            "techniques": names,
            "seeds": [0, 1, 2],
            "design": {"kind": "fractional_factorial", "resolution": 3},
            "metrics": {"primary": "fd", "direction": "min"},
        },
    )
    spec = load_study(_fold(tmp_path))
    plan = plan_study(spec)
    state = (tmp_path / "state").resolve()
    uri = resolve_uri(spec.tracking.uri, state)
    tr = open_study(uri, spec.name, spec.name, state)
    rng = np.random.default_rng(0)
    for t in plan.trials:
        on = set(t.on)
        tags = {
            "study": spec.name,
            "cell": t.cell,
            "seed": t.seed,
            "design": plan.design,
            **{f"tech.{n}": int(n in on) for n in names},
            **({"block": t.block} if t.block else {}),
        }
        child = ChildRun.open(uri, tr.experiment_id, tr.parent_run_id, t.key, t.key, tags, {})
        fd = 10.0 - 2 * ("rmsnorm" in on) + 1.0 * t.block + 0.1 * t.seed + rng.normal(0, 0.05)
        child.log_metrics(4, {"fd": fd, "loss": 0.5})
        child.finish("finished", "")
    table = load_results(spec, state, curves=False, samples=False)[0].table
    assert dict(zip(table["trial"], table["block"])) == {t.key: t.block for t in plan.trials}
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs.csv"
    assert study_main(["export", str(tmp_path / "fold.yaml"), "--state", str(state), "--csv", str(out)]) == 0
    assert sorted(pd.read_csv(out)["block"]) == [0] * 12 + [1] * 12
    buf = io.StringIO()
    assert (
        analyze_main(
            [
                str(out),
                "--factors",
                ",".join(names),
                "--metric",
                "fd",
                "--direction",
                "min",
                "--format",
                "json",
                "--no-bootstrap",
            ],
            stdout=buf,
            stderr=io.StringIO(),
        )
        == 0
    )
    res = json.loads(buf.getvalue())
    assert res["block"]["effects"]["1"]["estimate"] == pytest.approx(1.0, abs=0.1)
    assert res["main_effects"]["rmsnorm"] == pytest.approx(-2.0, abs=0.1) and res["aliased"] == []


@pytest.mark.parametrize(
    "files, says",
    [
        ({"self": "self.yaml"}, "design.of: self.yaml is this study itself; a fold-over completes another study's"),
        (
            {"a": "b.yaml", "b": "a.yaml"},
            "design.of: b.yaml is itself a fold-over; fold the original fraction (a.yaml)",
        ),
        (
            {"a": "b.yaml", "b": "c.yaml", "c": "frac.yaml"},
            "design.of: b.yaml is itself a fold-over; fold the original fraction (c.yaml)",
        ),
    ],
    ids=["itself", "cycle", "chain"],
)
def test_a_foldover_of_a_foldover_is_one_short_line(tmp_path, capsys, files, says):
    """Loading the folded study loaded its own `of`, and so on: a study folding itself (or a cycle) nested one
    `design.of:` per level into a line of several KB. The fold-over's design is read before the study is loaded."""
    from srdit.commands import main

    _fraction(tmp_path, ["sprint", "rope", "qk_norm"], 3)
    for name, of in files.items():
        _write(tmp_path / f"{name}.yaml", {"name": name, "design": {"kind": "foldover", "of": of}})
    first = tmp_path / f"{next(iter(files))}.yaml"
    assert main(["study", "plan", str(first)]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"srdit study plan: error: {first}: {says}"), err
    assert len(err) < 300 and err.count("design.of") == 1
