"""A search's repeated proposals, without starting Ray (Ray Tune's OptunaSearch is plain Python; the searcher is
driven as Tune drives it: suggest, then on_trial_complete): a proposal of a point already evaluated or in flight
is no sample (Optuna is told that point's outcome, as soon as it is known, and asked again), a space whose every
point is evaluated ends the search with one line, a sampler stuck on evaluated points stops after MAX_REPEATS, and
a continued search knows the points told before except those re-queued to run again."""

import math

import optuna
import pytest
from ray import tune
from ray.tune.search import Searcher

from srdit.runtime.driver import MAX_REPEATS, _fail_aware_optuna, search_point, search_space_size
from srdit.study.spec import study_from_dict

SPACE = {"tech.a": tune.choice([0, 1]), "tech.b": tune.choice([0, 1]), "ctx": "the TrialContext"}


@pytest.fixture(autouse=True)
def _quiet():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _searcher(n_points, storage=None, space=SPACE, **kw):
    s = _fail_aware_optuna(n_points, metric="fd", mode="min", seed=0, study_name="s", storage=storage, **kw)
    s.set_search_properties(None, None, dict(space))  # what Tune does with the Tuner's param_space
    return s


def _trials(s):
    return s._ot_study.get_trials(deepcopy=False)


def test_repeats_are_told_the_outcome_of_their_point_and_never_returned():
    s = _searcher(4)
    configs = [s.suggest(f"t{i}") for i in range(4)]  # four samples in flight
    assert len({search_point(c) for c in configs}) == 4  # four distinct points
    waiting = [t for t in _trials(s) if t.user_attrs.get("repeat") and t.state == optuna.trial.TrialState.RUNNING]
    assert waiting, "the seeded sampler repeated no point in flight"  # they wait for their point's outcome
    for i, fd in enumerate([3.0, math.nan, 1.0, 2.0]):  # t1 diverged: FAIL
        s.on_trial_complete(f"t{i}", {"fd": fd})
    assert s.suggest("t4") == Searcher.FINISHED  # nothing left to draw
    assert s.ended == "the space has only 4 distinct points; all evaluated"
    trials = _trials(s)
    assert all(t.state.is_finished() for t in trials)
    originals = {search_point(t.params): t for t in trials if not t.user_attrs.get("repeat")}
    repeats = [t for t in trials if t.user_attrs.get("repeat")]
    assert len(originals) == 4 and repeats
    for t in repeats:
        o = originals[search_point(t.params)]
        assert (t.state, t.value) == (o.state, o.value)
    assert {o.state for o in originals.values()} == {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}


def test_a_sampler_stuck_on_evaluated_points_stops_after_max_repeats():
    s = _searcher(None)  # as for a continuous space: no count of its points
    done = []
    while len(done) < 4:
        c = s.suggest(f"t{len(done)}")
        done.append(c)
        s.on_trial_complete(f"t{len(done) - 1}", {"fd": float(len(done))})
    assert s.suggest("t4") == Searcher.FINISHED
    assert s.ended == f"the sampler proposed only evaluated points {MAX_REPEATS} times in a row; stopped"
    trials = _trials(s)
    last = max(t.number for t in trials if not t.user_attrs.get("repeat"))
    assert len(trials) - 1 - last == MAX_REPEATS  # the repeats in a row after the last sample
    assert all(t.state.is_finished() for t in trials)


def test_a_continued_search_knows_the_points_told_before_except_the_requeued(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = _searcher(4, optuna.storages.RDBStorage(storage))
    told = [s.suggest("t0"), s.suggest("t1")]
    s.on_trial_complete("t0", {"fd": 1.0})
    s.on_trial_complete("t1", {"fd": math.nan})  # crashed: told FAIL, re-queued by the next run
    crashed = dict(told[1])
    again = _searcher(4, optuna.storages.RDBStorage(storage), points_to_evaluate=[crashed])
    first = again.suggest("u0")
    assert first == crashed  # the re-queued point runs again: it is no repeat
    rest = [again.suggest("u1")]
    assert search_point(rest[0]) not in {search_point(told[0]), search_point(crashed)}  # a new point


def test_the_size_of_a_search_space():
    def spec(space):
        return study_from_dict(
            {
                "name": "sz",
                "techniques": ["rmsnorm", "qk_norm"],
                "seeds": [0],
                "design": {"kind": "search", "trials": 4, "objectives": ["fd"], "space": space},
            }
        )

    assert search_space_size(spec({})) == 4
    assert search_space_size(spec({"train.batch_size": {"choices": [16, 32, 64]}})) == 12
    assert search_space_size(spec({"train.steps": {"low": 2, "high": 5, "type": "int"}})) == 16
    assert search_space_size(spec({"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}})) is None
