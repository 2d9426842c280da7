"""Kill-and-resume through the CLI: kill the driver (and its local Ray) after some trials finished, run the same
command again, and find every trial exactly once (no trial trains twice, no duplicate MLflow runs)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _children(uri: str, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("srdit.role") == "trial"]


def _cli(study: Path, state: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "srdit", "study", "run", str(study), "--state", str(state), "--num-cpus", "2"],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_kill_and_resume_runs_every_trial_exactly_once(tmp_path):
    study = tmp_path / "resume.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "resume",
                "techniques": ["rmsnorm"],
                "seeds": [0, 1, 2],
                "base": {
                    "train": {"steps": 80, "batch_size": 16, "log_every": 5, "ckpt_every": 5},
                    "eval": {"n_samples": 50, "batch_size": 50},
                    "sample": {"sampler": "euler", "steps": 2},
                },
            }
        )
    )
    state = tmp_path / "state"
    uri = f"sqlite:///{(state / 'mlflow.db').resolve()}"
    log = tmp_path / "cli.log"

    proc = _cli(study, state, log)
    deadline = time.time() + 240
    killed_mid_trial = False
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        # Poll MLflow only once the driver has created the store (it prints the plan line after that): a second
        # process opening a half-initialised SQLite store would race the driver's table migrations.
        if "already done" not in log.read_text(errors="replace"):
            continue
        try:
            runs = _children(uri, "resume")
        except Exception:  # the driver may be creating the tables
            continue
        finished = [r for r in runs if r.info.status == "FINISHED"]
        running = [r for r in runs if r.info.status == "RUNNING" and r.data.metrics.get("loss") is not None]
        if len(finished) >= 2 and running:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its process group
            killed_mid_trial = True
            break
    proc.wait(30)
    assert killed_mid_trial, log.read_text()[-3000:]
    for _ in range(60):  # Ray's own processes follow the driver (its reaper)
        if not _group_alive(proc.pid):
            break
        time.sleep(0.5)

    before = {r.data.tags["trial_key"]: r for r in _children(uri, "resume")}
    done_before = {k: r.info.run_id for k, r in before.items() if r.info.status == "FINISHED"}
    interrupted = {k: r.info.run_id for k, r in before.items() if r.info.status == "RUNNING"}
    assert len(done_before) >= 2 and interrupted and len(before) < 6
    ckpt_dirs = [state / "trials" / "resume" / k / "checkpoints" / "last.pt" for k in interrupted]
    assert any(p.exists() for p in ckpt_dirs)  # the interrupted trial left a checkpoint to resume from

    second = _cli(study, state, log)
    assert second.wait(400) == 0, log.read_text()[-3000:]
    out = log.read_text()
    assert f"{len(done_before)} already done, {6 - len(done_before)} to run" in out

    after = _children(uri, "resume")
    keys = [r.data.tags["trial_key"] for r in after]
    assert len(after) == 6 and len(set(keys)) == 6  # every trial exactly once, no duplicate runs
    assert {r.info.status for r in after} == {"FINISHED"}
    by_key = {r.data.tags["trial_key"]: r for r in after}
    for k, run_id in {**done_before, **interrupted}.items():
        assert by_key[k].info.run_id == run_id  # finished runs untouched, interrupted runs reused
    for k, run_id in done_before.items():  # a finished trial did not train again: its curve was logged once
        from mlflow import MlflowClient

        steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "steps_per_s")]
        assert steps == list(range(5, 81, 5)), (k, steps)
    parents = [r for r in _children_all(uri, "resume") if r.data.tags.get("srdit.role") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def _children_all(uri: str, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(name).experiment_id])
