"""What a crash says: an exception the training code raised with a config (it recurs, and is evidence that the
techniques do not work together) against a failure of what the trial runs on (a lost node, a missing file, the
tracking store, the driver's own error: no evidence). The worker records which on the child run (`crash_cause`),
the results table carries it, and the analysis counts only the training code's crashes, with a note (JSON, CLI and
page) saying how many infrastructure failures it left out. A crash recorded without a cause (older stores, CSVs)
counts as before."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pandas as pd
import pytest

from srdit.analysis.effects import AnalysisError, analyze
from srdit.analysis.results import CODE, CRASH_CAUSE, INFRASTRUCTURE
from srdit.runtime.worker import crash_cause


# ------------------------------------------------------------------------------------------------------------------
# the classification (real exception types of the libraries the trial runs on)
# ------------------------------------------------------------------------------------------------------------------
def _raised(make):
    try:
        make()
    except Exception as e:  # noqa: BLE001 - the exception under test
        return e
    raise AssertionError("nothing was raised")


def test_infrastructure_failures_are_told_from_the_training_codes_exceptions():
    import ray.exceptions
    import torch.distributed as dist
    from mlflow.exceptions import MlflowException

    from srdit.config import ConfigError
    from srdit.train import CheckpointError, load_checkpoint

    def wrapped():  # the training code raising while the file system fails under it
        try:
            open("/nonexistent/shard-0007.npy", "rb")
        except OSError as e:
            raise RuntimeError("could not read the next shard") from e

    def during():  # an error while handling a lost connection
        try:
            raise ConnectionResetError("peer reset")
        except ConnectionError:
            raise ValueError("bad batch")  # noqa: B904 - the implicit context is what is tested

    infrastructure = [
        FileNotFoundError("data/train.npy"),
        OSError(28, "No space left on device"),
        ConnectionResetError("connection reset by peer"),
        _raised(wrapped),
        _raised(during),
        _raised(lambda: load_checkpoint("/nonexistent/init.pt")),  # a vanished train.init file
        MlflowException("database is locked"),
        dist.DistBackendError("NCCL communicator was aborted: a peer is gone"),
        ray.exceptions.NodeDiedError("node 10.0.0.3 died"),
        ray.exceptions.RayTaskError("f", "tb", FileNotFoundError("gone")).as_instanceof_cause(),
    ]
    code = [
        ValueError("teacher digits-cnn gives 64-d tokens, the model expects 32"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x64 and 32x8)"),
        AssertionError("heads must divide the width"),
        ConfigError("model.depth must be >= 1"),
        CheckpointError("x.pt: not an srdit checkpoint"),
        ray.exceptions.RayTaskError("f", "tb", ValueError("bad")).as_instanceof_cause(),  # an application error
    ]
    assert [crash_cause(e) for e in infrastructure] == [INFRASTRUCTURE] * len(infrastructure)
    assert [crash_cause(e) for e in code] == [CODE] * len(code)


# ------------------------------------------------------------------------------------------------------------------
# the worker records it on the child run; the results table carries it
# ------------------------------------------------------------------------------------------------------------------
TINY = {
    "train": {"steps": 4, "batch_size": 16, "log_every": 2, "ckpt_every": 2},
    "eval": {"n_samples": 40, "batch_size": 40},
    "sample": {"sampler": "euler", "steps": 2},
}


def test_the_worker_records_why_a_trial_crashed_and_the_table_carries_it(tmp_path):
    from srdit.runtime.driver import _context, prepare, work_units
    from srdit.runtime.jobs import trial_job
    from srdit.runtime.results import load_results
    from srdit.runtime.worker import execute_group
    from srdit.study.spec import study_from_dict

    spec = study_from_dict(
        {
            "name": "causes",
            "base": TINY,
            "seeds": [0],
            "techniques": [
                # passes validation, raises when the trainer builds the teacher (64-d tokens, not 32): the code's
                {"name": "broken", "diff": {"model.repa.enabled": True, "model.repa.teacher_dim": 32}},
                # its init checkpoint is not there (vanished after the preflight): the infrastructure's
                {"name": "gone", "diff": {"train.init": str(tmp_path / "vanished.pt")}},
            ],
            "constraints": [{"excludes": ["broken", "gone"]}],
            "metrics": {"primary": "fd", "direction": "min"},
        }
    )
    plan, tracking, state = prepare(spec, tmp_path / "state")
    ctx = _context(spec, tracking, state, plan)
    for unit in work_units(plan, [trial_job(t, ".") for t in plan.trials], {}):
        execute_group(unit, ctx)
    runs = {r.data.tags["cell"]: r.data.tags for r in tracking.children_by_key().values()}
    assert {c: t["status"] for c, t in runs.items()} == {"00": "finished", "10": "crashed", "01": "crashed"}
    assert runs["10"][CRASH_CAUSE] == CODE and "64-d tokens" in runs["10"]["status_reason"]
    assert runs["01"][CRASH_CAUSE] == INFRASTRUCTURE and "no such checkpoint file" in runs["01"]["status_reason"]
    assert CRASH_CAUSE not in runs["00"]
    results, _ = load_results(spec, state, curves=False, samples=False)
    table = results.table.set_index("cell")
    assert table[CRASH_CAUSE].to_dict() == {"00": "", "10": CODE, "01": INFRASTRUCTURE}


# ------------------------------------------------------------------------------------------------------------------
# the analysis counts only the training code's crashes
# ------------------------------------------------------------------------------------------------------------------
F = list("ABC")


def _crash_table(cause: str | None, seed: int = 0) -> pd.DataFrame:
    """2^3 x 3 seeds, no failure interaction among the techniques' code: every run with A and B on crashed (a node
    lost under exactly those runs, or their code raising), `cause` in the crash_cause column (None: no column)."""
    rng = np.random.default_rng(seed)
    rows = []
    for lv in itertools.product([0, 1], repeat=3):
        for s in range(3):
            crashed = lv[0] == 1 and lv[1] == 1
            y = 10 + 1.0 * lv[0] - 0.5 * lv[2] + rng.normal(0, 0.3)
            row = {**dict(zip(F, lv)), "seed": s, "status": "crashed" if crashed else "finished"}
            row["y"] = np.nan if crashed else y
            if cause is not None:
                row[CRASH_CAUSE] = cause if crashed else ""
            rows.append(row)
    return pd.DataFrame(rows)


def test_infrastructure_crashes_are_no_evidence_and_are_counted_in_a_note():
    r = analyze(_crash_table(INFRASTRUCTURE), F, "y", "max", bootstrap=False)
    assert r.failures.flagged == [] and r.incompatible == []
    assert r.n_infrastructure == 6 and r.n_runs == 18 and r.n_failed == 0
    assert all(c.n_failed == 0 for c in r.attribution.cells)
    (note,) = [n for n in r.notes if "outside the training code" in n]
    assert note.startswith("6 run(s) failed for a reason outside the training code (crash_cause = infrastructure")
    assert r.to_json()["n_infrastructure"] == 6
    # the same runs as the training code's exceptions are evidence: the pair is flagged
    r_code = analyze(_crash_table(CODE), F, "y", "max", bootstrap=False)
    assert [t.pair for t in r_code.failures.flagged] == ["A:B"] and r_code.n_infrastructure == 0
    assert r_code.failures.flagged[0].counts["both"] == {"failed": 6, "n": 6}
    # a crash without a recorded cause (a store from before the cause was recorded, a CSV) counts as before
    for old in (_crash_table(None), _crash_table("")):
        r_old = analyze(old, F, "y", "max", bootstrap=False)
        assert [t.pair for t in r_old.failures.flagged] == ["A:B"] and r_old.n_infrastructure == 0


def test_a_cause_that_is_neither_is_refused_in_one_line():
    bad = _crash_table(CODE)
    bad.loc[bad.status == "crashed", CRASH_CAUSE] = "cosmic ray"
    with pytest.raises(
        AnalysisError, match=r"column 'crash_cause' has value\(s\) \['cosmic ray'\]; expected code"
    ) as e:
        analyze(bad, F, "y", "max", bootstrap=False)
    assert "\n" not in str(e.value)


def test_the_cli_and_the_page_say_how_many_infrastructure_failures_were_left_out(tmp_path):
    from srdit.commands.analyze import main

    p = tmp_path / "runs.csv"
    _crash_table(INFRASTRUCTURE).to_csv(p, index=False)
    out, err = io.StringIO(), io.StringIO()
    # the runs lost to the infrastructure are no data: the two A+B cells are missing, as when a CSV lacks them
    argv = [
        str(p),
        "--factors",
        "A,B,C",
        "--metric",
        "y",
        "--direction",
        "max",
        "--no-bootstrap",
        "--allow-inestimable",
    ]
    assert main([*argv, "--report", str(tmp_path / "page")], stdout=out, stderr=err) == 0, err.getvalue()
    text = " ".join(out.getvalue().split())
    assert "note: 6 run(s) failed for a reason outside the training code" in text
    assert "Incompatible pairs" not in text
    html = (tmp_path / "page" / "index.html").read_text(encoding="utf-8")
    assert "<b>6 run(s) failed for a reason outside the training code</b>" in html
    out = io.StringIO()
    assert main([*argv, "--format", "json"], stdout=out, stderr=io.StringIO()) == 0
    js = json.loads(out.getvalue())
    assert js["n_infrastructure"] == 6 and js["incompatible"] == []


# ------------------------------------------------------------------------------------------------------------------
# a trial Ray lost (its worker or node gone, retries spent): the driver records it as the infrastructure's
# ------------------------------------------------------------------------------------------------------------------
def _ray_losses() -> list[BaseException]:
    """What Tune hands the driver when a trial's worker, actor or node is gone (Ray's own exception types, built as
    Ray builds them)."""
    import ray.exceptions as rx

    return [
        rx.ActorDiedError(),  # "The actor died unexpectedly before finishing this task."
        rx.NodeDiedError("The node with node id 3f2a has been marked dead because the detector has missed too many"),
        rx.WorkerCrashedError(),
        rx.ActorUnavailableError("The actor is temporarily unavailable: RpcError: connection lost", None),
        rx.RaySystemError("System error: raylet client is disconnected"),
        rx.LocalRayletDiedError(),
    ]


def test_rays_losses_are_infrastructure_and_never_oom():
    from srdit.runtime.worker import is_oom

    losses = _ray_losses()
    assert [crash_cause(e) for e in losses] == [INFRASTRUCTURE] * len(losses)
    assert not any(is_oom(e) for e in losses)


def test_a_trial_ray_lost_is_recorded_as_an_infrastructure_crash_and_is_no_evidence(tmp_path):
    """The driver's Tune callback gets a trial error (retries spent) for each of Ray's losses: each trial's run
    ends crashed with crash_cause infrastructure and a reason naming the loss, a rerun retries it, and a run that
    had already finished keeps its outcome."""
    from types import SimpleNamespace

    from ray import cloudpickle

    from srdit.runtime.driver import _context, _progress_callback, prepare, work_units
    from srdit.runtime.jobs import trial_job
    from srdit.runtime.tracking import is_done
    from srdit.runtime.worker import record_outcome
    from srdit.study.spec import study_from_dict

    spec = study_from_dict(
        {
            "name": "lost",
            "base": TINY,
            "seeds": [0],
            "techniques": ["rmsnorm", "qk_norm", "rope"],
            "metrics": {"primary": "fd", "direction": "min"},
        }
    )
    plan, tracking, state = prepare(spec, tmp_path / "state")
    ctx = _context(spec, tracking, state, plan)
    jobs = {j.key: j for j in work_units(plan, [trial_job(t, ".") for t in plan.trials], {})}
    keys = list(jobs)
    losses = _ray_losses()
    finished = keys[len(losses)]  # ended before its worker was lost: its outcome stays
    record_outcome(jobs[finished].members[0], ctx, "finished", "")
    lines: list[str] = []
    cb = _progress_callback(len(keys), 0, lines.append, "fd", ctx, jobs, max_failures=0)
    for i, (key, e) in enumerate([*zip(keys, losses), (finished, losses[0])]):
        pickled = tmp_path / f"error-{i}.pkl"  # as Tune records a Ray error in the trial's folder on the driver
        pickled.write_bytes(cloudpickle.dumps(e))
        trial = SimpleNamespace(config={"job": key}, trial_id=key, pickled_error_file=str(pickled), error_file=None)
        cb.on_trial_error(0, [], trial)
    runs = {r.data.tags["trial_key"]: r for r in tracking.children_by_key().values()}
    for key, e in zip(keys, losses):
        tags = runs[key].data.tags
        assert tags["status"] == "crashed" and tags[CRASH_CAUSE] == INFRASTRUCTURE, (type(e).__name__, tags)
        assert tags["status_reason"].startswith(f"lost by Ray after 0 retries: {type(e).__name__}")
        assert runs[key].info.status == "FAILED" and not is_done(runs[key])  # a rerun retries it
    assert runs[finished].data.tags["status"] == "finished" and CRASH_CAUSE not in runs[finished].data.tags
    assert sum("infrastructure failure after 0 retries" in line for line in lines) == len(losses) + 1, lines
