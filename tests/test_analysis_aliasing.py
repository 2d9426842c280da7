"""Partial aliasing from the rows that are there: a cell absent from the table, a cell whose runs all failed and a
cell a study's constraint excludes are the same missing cell. Planted truths (a real three-factor interaction, no
pair synergy) and the alias matrix A = (X1'X1)^-1 X1'X2 against an independent numpy least-squares computation,
with the block fitted where the table has one."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from srdit.analysis.effects import analyze, analyze_study
from srdit.analysis.results import StudyResults
from srdit.study.designs import plan_study
from srdit.study.spec import study_from_dict

F = list("ABC")
PAIRS = ["A:B", "A:C", "B:C"]


def _pm(cells: pd.DataFrame, term: str) -> np.ndarray:
    """The +-1 column of an effect ("A:B:C") on 0/1 cell levels."""
    return np.prod([2.0 * cells[f].to_numpy() - 1.0 for f in term.split(":")], axis=0)


TOL = 1e-6  # srdit reports alias coefficients to 6 decimals


def _alias_matrix(cells: pd.DataFrame, fitted: list[str], omitted: list[str], extra=()) -> np.ndarray:
    """A = (X1'X1)^-1 X1'X2 by numpy least squares: X1 = intercept, the fitted +-1 columns and `extra` columns (the
    block dummy), one row per cell; rows of A in the order of `fitted`."""
    X1 = np.column_stack([np.ones(len(cells)), *[_pm(cells, t) for t in fitted], *extra])
    X2 = np.column_stack([_pm(cells, t) for t in omitted])
    return np.linalg.lstsq(X1, X2, rcond=None)[0][1 : 1 + len(fitted)]


def _abc_table(seed: int, missing: tuple[int, ...] | None, how: str) -> pd.DataFrame:
    """2^3 x 3 seeds, y = 10 + 1.0 A + 1.5 ABC (+-1 coding) + noise: main A effect 2, ABC effect 3, no pair
    synergy. The cell `missing` is absent (`how` = "absent") or present with every run out of memory ("oom")."""
    rng = np.random.default_rng(seed)
    rows = []
    for lv in itertools.product([0, 1], repeat=3):
        a, b, c = (2 * v - 1 for v in lv)
        for s in range(3):
            y = 10 + 1.0 * a + 1.5 * a * b * c + rng.normal(0, 0.3)
            if lv == missing and how == "absent":
                continue
            st = "oom" if lv == missing else "finished"
            rows.append({**dict(zip(F, lv)), "seed": s, "status": st, "y": y if st == "finished" else np.nan})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_absent_cell_marks_every_estimate_partially_aliased_and_flags_no_pair(seed):
    # the full stack absent (not marked oom): each estimate of the saturated mains + pairs model is biased by -ABC
    r = analyze(_abc_table(seed, (1, 1, 1), "absent"), F, "y", "max", bootstrap=False)
    for t in [*F, *PAIRS]:
        assert r.fit.partial_aliases[t] == {"A:B:C": pytest.approx(-1.0)}
    assert sorted(r.pairs.partially_aliased) == PAIRS
    assert r.incompatible == [] and r.pairs.antagonism == [] and r.pairs.significant == []
    assert r.pairs.synergy_ci == {} and all(v is None for v in r.pairs.p_adj.values())
    assert any(n.startswith("partially aliased (missing or failed cells)") for n in r.notes)
    # the mark explains the bias: each pair estimates its truth (0) + A * ABC (-1 x 3.0)
    for n in PAIRS:
        lo, hi = r.fit.ci[n]
        assert lo <= -3.0 <= hi
    # the same rows present as out of memory: the same metric model, the same marks, still no antagonism
    r_oom = analyze(_abc_table(seed, (1, 1, 1), "oom"), F, "y", "max", bootstrap=False)
    assert r_oom.fit.partial_aliases == r.fit.partial_aliases
    assert r_oom.fit.interactions == pytest.approx(r.fit.interactions)
    assert r_oom.pairs.antagonism == [] and r_oom.pairs.significant == []


@pytest.mark.parametrize("missing", list(itertools.product([0, 1], repeat=3)))
def test_the_partial_alias_coefficients_of_any_absent_cell_equal_numpy_least_squares(missing):
    df = _abc_table(5, missing, "absent")
    r = analyze(df, F, "y", "max", bootstrap=False)
    cells = df[F].drop_duplicates().reset_index(drop=True)
    A = _alias_matrix(cells, [*F, *PAIRS], ["A:B:C"])
    for t, row in zip([*F, *PAIRS], A):
        assert r.fit.partial_aliases[t] == {"A:B:C": pytest.approx(row[0], abs=TOL)}
        assert abs(row[0]) == pytest.approx(1.0)  # one cell short of the 2^3: A:B:C = -+(sum of the 7 columns)
    assert r.incompatible == [] and r.pairs.significant == []


def test_complete_designs_have_no_partial_aliasing():
    r = analyze(_abc_table(0, None, "absent"), F, "y", "max", bootstrap=False)
    assert r.fit.partial_aliases == {} and r.pairs.partially_aliased == []
    # a regular half fraction (I = ABCD): its pairs are completely aliased with each other and its mains with
    # three-factor interactions; that is its resolution (the alias chains), not partial aliasing
    rows = [
        dict(A=a, B=b, C=c, D=(a + b + c) % 2, seed=s)
        for a, b, c in itertools.product([0, 1], repeat=3)
        for s in (0, 1)
    ]
    df = pd.DataFrame(rows)
    df["y"] = 3.0 * df.A + np.random.default_rng(0).normal(0, 0.3, len(df))
    r = analyze(df, list("ABCD"), "y", "max", bootstrap=False)
    assert r.fit.partial_aliases == {} and {a.label for a in r.fit.aliased} == {"A:B + C:D", "A:C + B:D", "A:D + B:C"}


TINY = {"train": {"steps": 4, "batch_size": 16}, "eval": {"n_samples": 50, "batch_size": 50}, "sample": {"steps": 2}}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_study_whose_constraint_excludes_cells_marks_what_they_alias_and_flags_nothing(seed):
    # swiglu and relu2 exclude each other: the study plans 12 of the 16 cells and the table has rows for those only.
    # Planted: a real swiglu:rope:qk_norm interaction (every pair of it runs together) and no pair synergy. Without
    # the four cells rope:qk_norm is biased by it (read as a synergy before); it must be marked, not tested.
    names = ["swiglu", "relu2", "rope", "qk_norm"]
    spec = study_from_dict(
        {
            "name": "t",
            "base": TINY,
            "techniques": names,
            "seeds": [0, 1, 2],
            "constraints": [{"excludes": ["swiglu", "relu2"]}, {"wins": "swiglu", "over": "relu2"}],
            "metrics": {"primary": "fd", "direction": "min"},
        }
    )
    plan = plan_study(spec)
    assert len(plan.cells) == 12 and len(plan.excluded) == 4
    rng = np.random.default_rng(seed)
    rows = []
    for t in plan.trials:
        x = {f: int(f in t.on) for f in names}
        pm = {f: 2 * v - 1 for f, v in x.items()}
        fd = 20 - 1.0 * pm["rope"] + 1.5 * pm["swiglu"] * pm["rope"] * pm["qk_norm"] + rng.normal(0, 0.3)
        rows.append({"trial": t.key, "cell": t.cell, "seed": t.seed, "status": "finished", "status_reason": ""})
        rows[-1].update({**x, "fd": fd})
    table = pd.DataFrame(rows)
    res = StudyResults(
        study="t", design=plan.design, factors=names, metric="fd", direction="min", table=table, excluded=plan.excluded
    )
    a = analyze_study(res, bootstrap=False)["fd"]
    assert a.incompatible == [] and a.pairs.significant == []
    assert "rope:qk_norm" in a.pairs.partially_aliased
    cells = table[names].drop_duplicates().reset_index(drop=True)
    omitted = ["swiglu:rope:qk_norm", "relu2:rope:qk_norm"]
    fitted = [*names, *[f"{x}:{z}" for x, z in itertools.combinations(names, 2) if (x, z) != ("swiglu", "relu2")]]
    A = dict(zip(fitted, _alias_matrix(cells, fitted, omitted)))
    got = a.fit.partial_aliases["rope:qk_norm"]
    assert set(got) == set(omitted)
    assert [got[o] for o in omitted] == pytest.approx(list(A["rope:qk_norm"]), abs=TOL)
    # swiglu and relu2 never run together: no interaction containing both is defined, so none is counted
    assert not any("swiglu" in o and "relu2" in o for h in a.fit.partial_aliases.values() for o in h)


# ------------------------------------------------------------------------------------------------------------------
# the block in the alias matrix
# ------------------------------------------------------------------------------------------------------------------
def _folded(missing: tuple[int, ...]) -> pd.DataFrame:
    """The 2^(4-1) fraction I = ABCD (block 0) and its fold-over (block 1), 3 seeds, with the cell `missing` out of
    memory: the halves are the two signs of ABCD."""
    rng = np.random.default_rng(3)
    rows = []
    for lv in itertools.product([0, 1], repeat=4):
        x = dict(zip("ABCD", lv))
        block = int(np.prod([2 * v - 1 for v in lv]) < 0)
        for s in range(3):
            st = "oom" if lv == missing else "finished"
            y = 3 + 1.0 * x["A"] - 0.5 * x["B"] + 1.5 * block + 0.2 * s + rng.normal(0, 0.3)
            rows.append({**x, "seed": s, "block": block, "status": st, "y": y if st == "finished" else np.nan})
    return pd.DataFrame(rows)


def test_the_alias_matrix_includes_the_fitted_block():
    G = list("ABCD")
    fitted = [*G, *[f"{x}:{z}" for x, z in itertools.combinations(G, 2)]]
    omitted = ["A:B:C", "A:B:D", "A:C:D", "B:C:D", "A:B:C:D"]
    df = _folded((1, 0, 0, 0))
    fin = df[df.status == "finished"].drop_duplicates(G).reset_index(drop=True)
    r = analyze(df, G, "y", "max", bootstrap=False)
    assert r.fit.block is not None
    A = _alias_matrix(fin[G], fitted, omitted, extra=[fin["block"].to_numpy(dtype=float)])
    for t, row in zip(fitted, A):
        expected = {o: v for o, v in zip(omitted, row) if abs(v) > 1e-9}
        assert set(r.fit.partial_aliases[t]) == set(expected)
        assert [r.fit.partial_aliases[t][o] for o in expected] == pytest.approx(list(expected.values()), abs=TOL)
    # with the block fitted: 1 / (16 - 12) for the three-factor terms, and A:B:C:D is the block (absorbed, 0)
    assert set(np.round(np.abs(A[:, :4]), 12).ravel()) == {0.25} and np.allclose(A[:, 4], 0.0)
    assert "A:B:C:D" not in r.fit.partial_aliases["A"]
    # without the block column the model has no block: 1 / (16 - 11), A:B:C:D included
    r0 = analyze(df.drop(columns="block"), G, "y", "max", bootstrap=False)
    A0 = _alias_matrix(fin[G], fitted, omitted)
    assert set(np.round(np.abs(A0).ravel(), 12)) == {0.2}
    for t, row in zip(fitted, A0):
        assert [r0.fit.partial_aliases[t][o] for o in omitted] == pytest.approx(list(row), abs=TOL)
