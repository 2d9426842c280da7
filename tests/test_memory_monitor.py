"""Ray's memory monitor killing trial workers (while they start and while they train) makes those trials `oom`
results and the study goes on: the driver ends normally, the parent run is not left RUNNING, and a rerun with
--retry-failed trains them. A real local Ray whose memory monitor is set (RAY_memory_usage_threshold) below what
the machine already uses, so that it kills every trial worker it sees: the same kill as at 95 % memory. Two trials
on two CPUs, so that the monitor kills two workers at a time, as on a node that runs several."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import study_command

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
TINY = {
    "train": {"steps": 4, "batch_size": 16, "log_every": 2, "ckpt_every": 2},
    "eval": {"n_samples": 50, "batch_size": 50},
    "sample": {"sampler": "euler", "steps": 2},
}


def _study(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "srdit", "study", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def test_trials_killed_by_rays_memory_monitor_are_oom_results_and_the_study_goes_on(tmp_path):
    from mlflow import MlflowClient

    (tmp_path / "mm.yaml").write_text(
        yaml.safe_dump({"name": "mm", "techniques": ["rmsnorm"], "seeds": [0], "base": TINY})
    )
    starved = {**ENV, "RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "50"}
    r = _study("run", "mm.yaml", "--state", "st", "--num-cpus", "2", cwd=tmp_path, env=starved)
    assert "Traceback" not in r.stdout, r.stdout[-3000:]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "study mm: 2/2 trials done (2 oom)" in r.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'st' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mm")
    runs = client.search_runs([exp.experiment_id])
    parent = [x for x in runs if x.data.tags.get("srdit.role") == "study"][0]
    trials = [x for x in runs if x.data.tags.get("srdit.role") == "trial"]
    assert parent.info.status != "RUNNING"
    assert len(trials) == 2 and {t.data.tags["status"] for t in trials} == {"oom"}
    assert all(t.data.tags["status_reason"].startswith("killed for memory by Ray") for t in trials)
    assert all(t.info.status == "FAILED" for t in trials)

    assert "with --retry-failed it would also rerun 2: 2 oom" in study_command(
        "status", str(tmp_path / "mm.yaml"), "--state", str(tmp_path / "st")
    )
    r = _study("run", "mm.yaml", "--state", "st", "--num-cpus", "2", "--retry-failed", cwd=tmp_path, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "study mm: 2/2 trials done (2 finished)" in r.stdout
    study_command(
        "export", str(tmp_path / "mm.yaml"), "--state", str(tmp_path / "st"), "--csv", str(tmp_path / "mm.csv")
    )
    with open(tmp_path / "mm.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {x["status"] for x in rows} == {"finished"} and all(float(x["fd"]) > 0 for x in rows)
