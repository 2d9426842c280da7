"""The typed jobs between the study driver and its workers (srdit.runtime.jobs): the driver resolves each trial's
config and content keys once; the worker records the keys it received and recomputes none; a job planned for
other code is refused before anything is recorded. The worker runs through its Ray Tune entry point
(`srdit.runtime.worker.trainable`, outside a Tuner: its `tune.report` calls are then no-ops), on a job that went
through pickling as it does into a Ray worker."""

import dataclasses
import os

import cloudpickle
import pytest

from srdit.config import RunConfig, from_dict, resolve_paths
from srdit.runtime import reuse
from srdit.runtime.driver import _context, prepare, work_units
from srdit.runtime.jobs import EvaluationJob, JobMismatch, TrainingJob, TrialJob, check_job, trial_job
from srdit.runtime.reuse import RUN_KEY, TRAINING_KEY, content_keys
from srdit.runtime.state import StudyState
from srdit.runtime.worker import trainable
from srdit.study.spec import study_from_dict

TINY = {
    "train": {"steps": 4, "batch_size": 16, "log_every": 2, "ckpt_every": 2, "eval_every": 4},
    "eval": {"n_samples": 40, "batch_size": 40},
    "sample": {"sampler": "euler", "steps": 2},
}


def _spec():
    # cfg2 changes only the evaluation: both cells share one training (a TrainingJob with two members)
    return study_from_dict(
        {
            "name": "jobs",
            "base": TINY,
            "seeds": [0],
            "techniques": [{"name": "cfg2", "diff": {"sample.cfg_scale": 2.0}}],
            "metrics": {"primary": "fd", "direction": "min"},
        }
    )


def test_a_job_carries_the_resolved_config_and_the_keys():
    spec = _spec()
    state = StudyState.of(spec, "state")
    from srdit.study.designs import plan_study

    plan = plan_study(spec)
    t = plan.trials[0]
    job = trial_job(t, os.getcwd())
    assert job.config == resolve_paths(from_dict(RunConfig, t.config), os.getcwd())
    assert job.keys.tags() == content_keys(t.config, os.getcwd())
    assert state.trials == state.root / "trials" / "jobs" and state.root.is_absolute()
    back = cloudpickle.loads(cloudpickle.dumps(job))
    assert back == job and isinstance(back, TrialJob)
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.run_id = "x"  # frozen


@pytest.mark.filterwarnings("ignore:`report` is meant to only be called inside:UserWarning")
def test_the_worker_records_the_drivers_keys_and_recomputes_none(tmp_path, monkeypatch):
    spec = _spec()
    plan, tracking, state = prepare(spec, tmp_path / "state")
    jobs = work_units(plan, [trial_job(t, os.getcwd()) for t in plan.trials], {})
    assert [type(j) for j in jobs] == [TrainingJob] and len(jobs[0].members) == 2
    sent = {m.key: m.keys.tags() for m in jobs[0].members}
    expected = {t.key: content_keys(t.config, os.getcwd()) for t in plan.trials}
    assert sent == expected
    ctx = _context(spec, tracking, state, plan)

    def recomputed(*a, **k):
        raise AssertionError("the worker recomputed a content key")

    monkeypatch.setattr(reuse, "content_keys", recomputed)
    handed = cloudpickle.loads(cloudpickle.dumps({jobs[0].key: jobs[0]}))  # as tune.with_parameters hands them over
    trainable({"job": jobs[0].key, "ctx": ctx}, jobs=handed)
    children = tracking.children_by_key()
    assert set(children) == set(sent)
    for key, run in children.items():
        assert run.data.tags["status"] == "finished"
        seen = {k: run.data.tags[k] for k in (TRAINING_KEY, RUN_KEY)}
        assert seen == sent[key]
    assert len({r.data.tags[TRAINING_KEY] for r in children.values()}) == 1  # one training, two runs


def test_a_job_for_other_code_is_refused_before_anything_is_recorded(tmp_path):
    spec = _spec()
    plan, tracking, state = prepare(spec, tmp_path / "state")
    job = trial_job(plan.trials[0], os.getcwd())
    other = dataclasses.replace(job, keys=dataclasses.replace(job.keys, training_code="0" * 16))
    with pytest.raises(JobMismatch, match="other srdit code than the driver"):
        check_job(other)
    ctx = _context(spec, tracking, state, plan)
    with pytest.raises(JobMismatch):
        trainable({"job": other.key, "ctx": ctx}, jobs={other.key: TrainingJob((other,))})
    with pytest.raises(JobMismatch):
        trainable({"job": other.key, "ctx": ctx}, jobs={other.key: EvaluationJob((other,), str(tmp_path / "x.pt"))})
    with pytest.raises(JobMismatch, match="no such job"):
        trainable({"job": "nope", "ctx": ctx}, jobs={other.key: TrainingJob((other,))})
    corrupt = dataclasses.replace(job, trial=dataclasses.replace(job.trial, config={**job.trial.config, "x": 1}))
    with pytest.raises(JobMismatch, match="does not name its config"):
        check_job(corrupt)
    assert tracking.children_by_key() == {}
