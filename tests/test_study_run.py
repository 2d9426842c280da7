"""A small study on a real local Ray (2 CPUs) into a real SQLite MLflow store: the run tree, tags, curves,
artifacts, idempotent rerun, the report; and failures (a crash, a divergence) recorded as data."""

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

TINY_BASE = {
    "train": {"steps": 6, "batch_size": 16, "log_every": 2, "ckpt_every": 3},
    "eval": {"n_samples": 50, "batch_size": 50},
    "sample": {"sampler": "euler", "steps": 2},
}


def write_study(path: Path, **kw) -> Path:
    data = {
        "name": "tiny",
        "base": TINY_BASE,
        "techniques": ["rmsnorm", "qk_norm"],
        "seeds": [0, 1],
        "metrics": {"primary": "fd", "direction": "min", "others": {"images_per_s": "max"}},
        **kw,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_full_factorial_study_into_sqlite(tmp_path, ray_local_2cpus, capsys):
    from mlflow import MlflowClient

    from srdit.commands.report import make_report
    from srdit.runtime.driver import run_study
    from srdit.runtime.results import load_results
    from srdit.study.spec import load_study

    spec = load_study(write_study(tmp_path / "tiny.yaml"))
    state = tmp_path / "state"
    res = run_study(spec, state)
    assert res.complete and res.ran == 8 and res.statuses == {"finished": 8}
    assert res.uri == f"sqlite:///{(state / 'mlflow.db').resolve()}"

    client = MlflowClient(res.uri)
    exp = client.get_experiment_by_name("tiny")
    assert exp.artifact_location == (state.resolve() / "mlartifacts" / "tiny").as_uri()
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("srdit.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res.parent_run_id]
    assert len(parents) == 1 and len(runs) == 9 and len(children) == 8
    assert {r.info.status for r in children} == {"FINISHED"}
    cells = {}
    for r in children:
        t = r.data.tags
        assert t["study"] == "tiny" and t["design"] == "full" and t["status"] == "finished"
        assert t["status_reason"] == "" and t["trial_key"].startswith(t["cell"] + "-s" + t["seed"])
        assert t["tech.rmsnorm"] == t["cell"][0] and t["tech.qk_norm"] == t["cell"][1]
        for k in ("git_commit", "version.torch", "version.ray", "version.mlflow", "device"):
            assert t[k]
        cells.setdefault(t["cell"], set()).add(t["seed"])
        assert r.data.params["train.steps"] == "6" and r.data.params["train.seed"] == t["seed"]
        assert r.data.params["model.norm"] == ("rmsnorm" if t["cell"][0] == "1" else "layernorm")
        for key in ("fd", "kd", "precision", "recall", "loss", "images_per_s", "steps_per_s"):
            assert key in r.data.metrics
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")][:3] == [2, 4, 6]
        assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {"config.yaml", "samples.png"}
    assert cells == {c: {"0", "1"} for c in ("00", "01", "10", "11")}

    # rerunning runs nothing and adds no run
    again = run_study(spec, state)
    assert again.ran == 0 and again.skipped == 8 and again.parent_run_id == res.parent_run_id
    assert len(client.search_runs([exp.experiment_id])) == 9

    results, _ = load_results(spec, state)
    assert len(results.table) == 8 and set(results.table["status"]) == {"finished"}
    assert set(results.curves["key"]) >= {"loss", "fd"} and len(results.samples) == 4
    assert results.table["fd"].notna().all() and results.factors == ["rmsnorm", "qk_norm"]

    html = make_report(tmp_path / "tiny.yaml", state, tmp_path / "dashboards", bootstrap=False)
    assert html == tmp_path / "dashboards" / "tiny" / "index.html" and html.stat().st_size > 10_000
    assert (tmp_path / "dashboards" / "index.html").exists() and (tmp_path / "dashboards" / "RECORDS.md").exists()
    parent_files = {a.path for a in client.list_artifacts(res.parent_run_id, "report")}
    assert "report/index.html" in parent_files
    _report_states_the_protocol_links_the_runs_and_refuses_a_mixed_protocol(tmp_path, spec, state, exp, capsys)


def _report_states_the_protocol_links_the_runs_and_refuses_a_mixed_protocol(tmp_path, spec, state, exp, capsys):
    """The report of the real study above: the protocol its runs recorded in the header, a link per run to the
    UI `srdit ui` serves, and, once one cell's runs are planted with another sampler step count in the store, one
    line of refusal from `srdit report` and no comparison on the page."""
    import sqlite3

    from srdit.commands.report import main as report_main
    from srdit.runtime.results import load_results

    results, _ = load_results(spec, state, curves=False, samples=False)
    t = results.table
    assert set(t["protocol.sampler"]) == {"euler"} and set(t["protocol.sampling_steps"]) == {"2"}
    assert set(t["protocol.n_samples"]) == {"50"} and set(t["protocol.precision"]) == {"fp32 (auto)"}
    html = (tmp_path / "dashboards" / "tiny" / "index.html").read_text(encoding="utf-8")
    header = html[html.index("<header>") : html.index("</header>")]
    assert "every metric evaluated under one protocol" in header and "sampler <b>euler</b>" in header
    for rid in t["run_id"]:
        assert f'href="http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{rid}"' in html

    planted = t.loc[t["cell"] == "11", "run_id"].tolist()
    with sqlite3.connect(state / "mlflow.db") as db:
        db.executemany(
            "UPDATE params SET value = '25' WHERE key = 'sample.steps' AND run_uuid = ?", [(r,) for r in planted]
        )
    capsys.readouterr()
    rc = report_main([str(tmp_path / "tiny.yaml"), "--state", str(state), "--out", str(tmp_path / "mixed")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("srdit report: error: study tiny: the runs' metrics were computed under 2 different")
    assert "sampling steps: 2 (baseline, rmsnorm, qk_norm), 25 (rmsnorm+qk_norm)" in err[0]
    mixed = (tmp_path / "mixed" / "tiny" / "index.html").read_text(encoding="utf-8")
    assert 'id="sec-protocols"' in mixed and '<div id="fig-synergy"' not in mixed


def test_crash_and_divergence_are_recorded_and_the_study_completes(tmp_path, ray_local_2cpus):
    from mlflow import MlflowClient

    from srdit.runtime.driver import run_study
    from srdit.runtime.results import load_results
    from srdit.study.spec import load_study

    path = write_study(
        tmp_path / "fail.yaml",
        name="fail",
        seeds=[0],
        techniques=[
            {"name": "explode", "diff": {"train.lr": 1e6}},
            # passes validation and the preflight, raises when the trainer builds the teacher (64-d tokens, not 32)
            {"name": "broken", "diff": {"model.repa.enabled": True, "model.repa.teacher_dim": 32}},
        ],
        constraints=[{"excludes": ["explode", "broken"]}],
    )
    spec = load_study(path)
    res = run_study(spec, tmp_path / "state")
    assert res.statuses == {"finished": 1, "diverged": 1, "crashed": 1}
    # a crash is a failure outside the trial's result: the study is not complete until a rerun retries it
    assert not res.complete and [k.split("-")[0] for k in res.unfinished] == ["01"]

    client = MlflowClient(res.uri)
    runs = {
        r.data.tags["cell"]: r
        for r in client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    }
    assert set(runs) == {"00", "01", "10"}
    assert runs["00"].info.status == "FINISHED" and runs["00"].data.tags["status"] == "finished"
    diverged, crashed = runs["10"], runs["01"]
    assert diverged.info.status == "FAILED" and diverged.data.tags["status"] == "diverged"
    assert diverged.data.tags["status_reason"].startswith("non-finite")
    assert crashed.info.status == "FAILED" and crashed.data.tags["status"] == "crashed"
    assert crashed.data.tags["status_reason"].startswith("ValueError: teacher digits-cnn gives 64-d tokens")
    assert "traceback.txt" in {a.path for a in client.list_artifacts(crashed.info.run_id)}

    results, _ = load_results(spec, tmp_path / "state")
    assert dict(zip(results.table["cell"], results.table["status"])) == {
        "00": "finished",
        "10": "diverged",
        "01": "crashed",
    }
    assert results.excluded == [
        {
            "cell": "11",
            "techniques": ["explode", "broken"],
            "reason": "constraint: explode and broken exclude each other",
        }
    ]
    # diverged is a result and stays; crashed is retried by a rerun (and reuses its child run)
    again = run_study(spec, tmp_path / "state")
    assert again.ran == 1 and again.skipped == 2
    assert len(client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")) == 3


def test_search_design_runs_optuna_through_tune_and_continues(tmp_path, ray_local_2cpus):
    from mlflow import MlflowClient

    from srdit.runtime.driver import run_study
    from srdit.study.spec import load_study

    design = {
        "kind": "search",
        "trials": 3,
        "objectives": ["fd", "images_per_s"],
        "space": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
    }
    spec = load_study(write_study(tmp_path / "search.yaml", name="search", seeds=[0], design=design))
    res = run_study(spec, tmp_path / "state")
    assert res.complete and res.total == 3
    client = MlflowClient(res.uri)
    runs = client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert 1 <= len(runs) <= 3 and {r.data.tags["status"] for r in runs} == {"finished"}
    lrs = {float(r.data.params["train.lr"]) for r in runs}
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(lrs) == len(runs)
    assert all("search.params" in r.data.tags and r.data.tags["design"] == "search" for r in runs)
    assert (tmp_path / "state" / "optuna" / "search.db").exists()
    again = run_study(spec, tmp_path / "state")  # the budget is spent: nothing runs
    assert again.complete and len(client.search_runs([res.experiment_id])) == len(runs) + 1


def test_the_driver_reads_the_error_tune_has_just_recorded(tmp_path, ray_local_2cpus):
    """Tune records a trial's failure in the trial's folder on the driver (under the Ray session) and then calls
    the callbacks; the copy under the study's storage path appears only at its next sync. The driver's callback reads
    the local record at once: a retried trial's attempt names what ended it, and a memory kill is told apart from a
    lost worker at the first failure, not after a retry."""
    from ray.exceptions import RayActorError
    from ray.train._internal.storage import StorageContext
    from ray.tune.error import TuneError
    from ray.tune.experiment import Trial
    from ray.tune.registry import register_trainable

    from srdit.runtime.driver import _trial_error

    register_trainable("error_record", lambda config: None)
    storage = StorageContext(storage_path=str(tmp_path / "results"), experiment_dir_name="e", trial_dir_name="t")
    trial = Trial("error_record", config={}, storage=storage)
    Path(trial.local_path).mkdir(parents=True)
    assert _trial_error(trial) == ""  # nothing recorded yet
    trial.handle_error(TuneError("the first failure"))  # text only (not a Ray error): the error file
    trial.handle_error(TuneError("the node died"))
    assert trial.get_error() is None  # the storage copy: not synced yet
    assert _trial_error(trial).startswith("Failure # 2 (occurred at ")  # the last failure of the text
    assert _trial_error(trial).endswith("the node died") and "first" not in _trial_error(trial)
    trial.handle_error(RayActorError(error_msg="The actor died because its node was lost.\n\tpid: 7"))
    assert trial.get_pickled_error() is None
    # one line, for the restart line and the run's tags, as Ray's message spans several
    assert _trial_error(trial) == "RayActorError: The actor died because its node was lost. pid: 7"


def test_the_driver_imports_no_torch_before_the_trials_start(tmp_path):
    """The checks before a study and Tune's loggers in the driver import no torch (seconds of a study's start on a
    small machine; the trials' workers import it): Tune logs each trial as CSV and JSON, not as TensorBoard files,
    whose writer imports torch."""
    import subprocess
    import sys

    path = write_study(tmp_path / "tiny.yaml")
    code = f"""
import sys
from ray.tune.utils.callback import _create_default_callbacks
from srdit.runtime import driver
from srdit.runtime.state import StudyState
from srdit.study import preflight
from srdit.study.designs import plan_study
from srdit.study.spec import load_study
spec = load_study({str(path)!r})
plan = plan_study(spec)
preflight.check(spec, plan, [t.to_dict() for t in plan.trials], [driver.local_node()])
_, run_config = driver._tuner_common(spec, StudyState.of(spec, {str(tmp_path / "state")!r}), 1, [])
with driver.scoped_env(driver.TUNE_LOGGERS_ENV):
    print(sorted(type(c).__name__ for c in _create_default_callbacks(run_config.callbacks)))
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "['CSVLoggerCallback', 'JsonLoggerCallback', 'TrialProgressCallback']", out
    assert out[1] == "False", out
