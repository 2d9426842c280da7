"""Designs: full factorial, fractional (resolution and aliases from the design matrix), ladder, leave-one-out,
constraints (excluded cells with reasons), trial keys and the plan output."""

import itertools
import math

import numpy as np
import pytest

from srdit.config import ConfigError
from srdit.study.designs import (
    alias_map,
    defining_words,
    format_plan,
    fractional_matrix,
    plan_study,
    resolution,
    resolve_config,
)
from srdit.study.spec import study_from_dict

TINY = {"train": {"steps": 4, "batch_size": 16}, "eval": {"n_samples": 50, "batch_size": 50}, "sample": {"steps": 2}}


def study(**kw):
    data = {"name": "t", "base": TINY, "techniques": ["rmsnorm", "rope", "qk_norm"], **kw}
    return study_from_dict(data)


def two_factor_aliases(amap: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(effect, alias) pairs where both are main effects or two-technique interactions."""
    order = lambda e: len(e.lstrip("-").split(":"))  # noqa: E731
    return [(e, a) for e, al in amap.items() for a in al if order(e) <= 2 and order(a) <= 2]


def test_full_factorial_cells_and_trials():
    plan = plan_study(study(seeds=[0, 1]))
    assert [c.id for c in plan.cells] == ["".join(b) for b in itertools.product("01", repeat=3)]
    assert plan.cells[0].on == () and plan.cells[-1].on == ("rmsnorm", "rope", "qk_norm")
    assert len(plan.trials) == 16 and len({t.key for t in plan.trials}) == 16
    t = next(t for t in plan.trials if t.cell == "101" and t.seed == 1)
    assert t.config["model"]["norm"] == "rmsnorm" and t.config["model"]["qk_norm"] is True
    assert t.config["model"]["rope"]["enabled"] is False and t.config["train"]["seed"] == 1
    assert t.config["techniques"] == ["rmsnorm", "qk_norm"]
    assert plan.excluded == [] and plan.aliases == {}


def test_trial_keys_are_deterministic_and_follow_the_config():
    a, b = plan_study(study()), plan_study(study())
    assert [t.key for t in a.trials] == [t.key for t in b.trials]
    c = plan_study(study(base={**TINY, "train": {"steps": 5, "batch_size": 16}}))
    assert not {t.key for t in a.trials} & {t.key for t in c.trials}


@pytest.mark.parametrize("k,runs", [(5, 16), (6, 32), (7, 64), (8, 64)])
def test_resolution_v_leaves_no_pairwise_interaction_aliased(k, runs):
    names = [f"f{i}" for i in range(k)]
    m, _ = fractional_matrix(k, 5)
    assert m.shape == (runs, k)
    assert resolution(m) >= 5
    assert len({tuple(r) for r in m}) == runs  # distinct cells
    amap = alias_map(m, names)
    assert two_factor_aliases(amap) == []
    # every main effect and 2FI column is orthogonal to the others: the design estimates them all
    cols = [m[:, [i]].prod(1) for i in range(k)] + [m[:, list(p)].prod(1) for p in itertools.combinations(range(k), 2)]
    X = np.column_stack([np.ones(runs)] + cols)
    assert np.linalg.matrix_rank(X) == X.shape[1]


def test_resolution_iv_aliases_pairs_with_pairs_and_is_reported():
    names = list("abcdef")
    m, _ = fractional_matrix(6, 4)
    assert m.shape == (16, 6) and resolution(m) == 4
    amap = alias_map(m, names)
    pairs = two_factor_aliases(amap)
    assert pairs and all(":" in e and ":" in a.lstrip("-") for e, a in pairs)  # 2FI with 2FI, never main effects
    assert all(len(w) >= 4 for w, _ in defining_words(m))


def test_pydoe_generator_that_overpromises_is_rejected():
    # pyDOE3.fracfact_by_res(7, 5) returns a 32-run design whose defining relation has a 4-letter word.
    import pyDOE3

    m = np.asarray(pyDOE3.fracfact_by_res(7, 5), dtype=int)
    assert resolution(m) < 5
    assert resolution(fractional_matrix(7, 5)[0]) >= 5


def test_fractional_study_plan_has_aliases_and_resolution():
    s = study_from_dict(
        {
            "name": "f",
            "base": TINY,
            "techniques": ["rmsnorm", "rope", "qk_norm", "sprint", "logit_normal"],
            "design": {"kind": "fractional_factorial", "resolution": "V"},
        }
    )
    plan = plan_study(s)
    assert len(plan.cells) == 16 and plan.resolution == 5 and plan.design == "frac(res=5)"
    assert plan.defining_relation and two_factor_aliases(plan.aliases) == []
    assert "rmsnorm:rope" in plan.aliases  # aliased with a three-technique interaction only
    text = format_plan(plan)
    assert "defining relation" in text and "resolution 5" in text
    # resolution above the number of factors: the full factorial, said so
    small = plan_study(study(design={"kind": "fractional_factorial", "resolution": 5}))
    assert len(small.cells) == 8 and math.isinf(small.resolution) and "full factorial" in small.notes[0]


def test_ladder_and_leave_one_out():
    lad = plan_study(study(design={"kind": "ladder", "order": ["qk_norm", "rmsnorm", "rope"]}))
    assert [c.on for c in lad.cells] == [(), ("qk_norm",), ("rmsnorm", "qk_norm"), ("rmsnorm", "rope", "qk_norm")]
    assert lad.ladder_order == ["qk_norm", "rmsnorm", "rope"]
    loo = plan_study(study(design="leave_one_out"))
    assert [c.id for c in loo.cells] == ["111", "011", "101", "110"]


def test_constraints_exclude_cells_with_reasons():
    s = study_from_dict(
        {
            "name": "c",
            "base": TINY,
            "techniques": ["sprint", "path_drop_guidance", "swiglu", "relu2"],
            "constraints": [{"requires": ["path_drop_guidance", "sprint"]}, {"excludes": ["swiglu", "relu2"]}],
        }
    )
    plan = plan_study(s)
    assert len(plan.cells) + len(plan.excluded) == 16
    reasons = {e["cell"]: e["reason"] for e in plan.excluded}
    assert reasons["0100"] == "constraint: path_drop_guidance requires sprint"
    assert reasons["0011"] == "constraint: swiglu and relu2 exclude each other"
    assert len(plan.cells) == 9  # 3 sprint/pdg states x 3 mlp states
    assert "excluded cells (7)" in format_plan(plan)


def test_invalid_cell_is_excluded_with_the_config_error():
    # path_drop_guidance without sprint breaks a cross-field rule of RunConfig: excluded, not silently dropped
    plan = plan_study(study_from_dict({"name": "x", "base": TINY, "techniques": ["sprint", "path_drop_guidance"]}))
    assert [e["cell"] for e in plan.excluded] == ["01"]
    assert plan.excluded[0]["reason"].startswith("invalid config: sample.path_drop_guidance needs model.sprint")


def test_shared_keys_need_a_constraint_or_a_winner():
    with pytest.raises(ConfigError, match="swiglu and relu2 both set model.mlp"):
        study_from_dict({"name": "w", "base": TINY, "techniques": ["swiglu", "relu2"]})
    s = study_from_dict(
        {
            "name": "w",
            "base": TINY,
            "techniques": ["swiglu", "relu2"],
            "constraints": [{"wins": "relu2", "over": "swiglu"}],
        }
    )
    plan = plan_study(s)
    assert len(plan.cells) == 4
    assert resolve_config(s, ("swiglu", "relu2"), 0).model.mlp == "relu2"


def test_custom_diff_and_knobs():
    s = study_from_dict(
        {
            "name": "k",
            "base": TINY,
            "techniques": [{"sprint": {"drop_ratio": 0.5}}, {"name": "wide_lr", "diff": {"train.lr": 3e-3}}],
        }
    )
    cfg = resolve_config(s, ("sprint", "wide_lr"), 3)
    assert cfg.model.sprint.drop_ratio == 0.5 and cfg.train.lr == 3e-3 and cfg.train.seed == 3
    assert cfg.techniques == ("sprint",)  # custom diffs are recorded as tags, not as RunConfig techniques


def test_plan_json_and_cost():
    plan = plan_study(study(seeds=[0, 1]))
    j = plan.to_json(steps_per_s=2.0, concurrency=2)
    assert j["cost"]["trials"] == 16 and j["cost"]["total_steps"] == 64 and j["cost"]["concurrency"] == 2
    assert j["cost"]["wall_seconds"] > 0 and "steps/s" in j["cost"]["assumptions"]
    assert len(j["cells"]) == 8 and len(j["trials"]) == 16


def test_search_plan_has_a_budget():
    s = study(
        design={
            "kind": "search",
            "trials": 6,
            "objectives": ["fd", "images_per_s"],
            "space": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
        }
    )
    plan = plan_study(s)
    assert plan.trials == [] and plan.search_budget == 6
    assert plan.to_json()["cost"]["trials"] == 6
    assert s.metrics.all()["images_per_s"] == "max"


def shortest_word(m: np.ndarray, up_to: int) -> int:
    """Resolution by definition, independent of `defining_words`: the fewest columns whose elementwise product is
    constant (+1 or -1 in every run), searched up to `up_to` columns (up_to + 1 when there is none that short)."""
    m = np.asarray(m, dtype=int)
    for r in range(1, up_to + 1):
        for cols in itertools.combinations(range(m.shape[1]), r):
            if abs(int(m[:, list(cols)].prod(axis=1).sum())) == m.shape[0]:
                return r
    return up_to + 1


# The fewest runs, as the standard tables give them (Montgomery, Design and Analysis of Experiments, Table 8.14):
# resolution III: 2^m runs hold up to 2^m - 1 factors; resolution IV: up to 2^m / 2.
RES_III_RUNS = {3: 4, 4: 8, 5: 8, 6: 8, 7: 8, **{k: 16 for k in range(8, 16)}}
RES_IV_RUNS = {4: 8, 5: 16, 6: 16, 7: 16, 8: 16, **{k: 32 for k in range(9, 17)}}


@pytest.mark.parametrize("k", sorted(RES_III_RUNS))
def test_resolution_iii_has_the_textbook_fewest_runs(k):
    """pyDOE3 has no resolution III design for 7 factors (fracfact_by_res: 'design not possible', fracfact_opt:
    'Too many erased factors'); the plan must still find the 8-run 2^(7-4)_III, and every k its fewest runs."""
    m, _ = fractional_matrix(k, 3)
    assert m.shape == (RES_III_RUNS[k], k)
    assert len({tuple(r) for r in m}) == len(m)  # distinct cells
    assert shortest_word(m, 2) >= 3 and resolution(m) >= 3


@pytest.mark.parametrize("k", sorted(RES_IV_RUNS))
def test_resolution_iv_has_the_textbook_fewest_runs(k):
    m, _ = fractional_matrix(k, 4)
    assert m.shape == (RES_IV_RUNS[k], k)
    assert len({tuple(r) for r in m}) == len(m)
    assert shortest_word(m, 3) >= 4 and resolution(m) >= 4


@pytest.mark.parametrize("k", [10, 11])
def test_resolution_v_with_10_or_11_factors_needs_128_runs(k):
    """pyDOE3 gives 256 / 512 runs here; the standard 2^(10-3)_V and 2^(11-4)_V designs have 128."""
    m, _ = fractional_matrix(k, 5)
    assert m.shape == (128, k)
    assert len({tuple(r) for r in m}) == 128
    assert shortest_word(m, 4) >= 5 and resolution(m) >= 5


def test_every_table_design_has_its_resolution_and_the_fewest_runs():
    from srdit.study.designs import GENERATORS, _generator_matrix, min_runs

    for (k, res), words in GENERATORS.items():
        m, gen = _generator_matrix(k - len(words), words)
        assert m.shape == (min_runs(k, res), k), (k, res)
        assert shortest_word(m, res - 1) >= res, (k, res, gen)


def test_resolution_iii_study_of_seven_techniques_plans_eight_cells():
    s = study_from_dict(
        {
            "name": "r3",
            "base": TINY,
            "techniques": ["rmsnorm", "rope", "qk_norm", "sprint", "logit_normal", "value_residual", "cfm"],
            "design": {"kind": "fractional_factorial", "resolution": "III"},
        }
    )
    plan = plan_study(s)
    assert len(plan.cells) == 8 and plan.resolution == 3
