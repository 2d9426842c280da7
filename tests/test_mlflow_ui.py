"""What MLflow's UI shows of a study: the saved view of its trials on the study's experiment, and the server of the
cluster step (`mlflow server --app-name srdit`, as docs/cluster.md gives it) on loopback."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_study_experiment_carries_a_saved_view_of_its_trials(tmp_path):
    from mlflow import MlflowClient

    from srdit.runtime.tracking import VIEW_TAG, default_tracking_uri, open_study, view_url
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    spec = load_study(ROOT / "studies" / "digits_quick.yaml")
    t = open_study(default_tracking_uri(tmp_path), spec.name, spec.name, tmp_path)
    t.describe(spec, plan_study(spec))
    tags = MlflowClient(t.uri).get_experiment(t.experiment_id).tags
    view = json.loads(tags[VIEW_TAG])  # MLflow's saved-view envelope: name, createdAt, state (the page state)
    assert view["name"] == f"{spec.name}: trials by {spec.metrics.primary}" and isinstance(view["createdAt"], int)
    state = json.loads(view["state"])
    metric = f"metrics.`{spec.metrics.primary}`"
    assert state["selectedColumns"][:2] == [metric, "tags.`techniques`"]
    assert [c for c in state["selectedColumns"] if c.startswith("tags.`tech.")] == [
        f"tags.`tech.{f}`" for f in spec.factor_names
    ]
    assert state["orderByKey"] == metric and state["orderByAsc"] == (spec.metrics.direction == "min")
    assert state["searchFilter"] == "tags.`srdit.role` = 'trial'"  # the trials as rows, not folded under the parent
    # MLflow's own parser of that filter (the UI sends it to the search API) takes it and finds no parent run
    runs = MlflowClient(t.uri).search_runs([t.experiment_id], state["searchFilter"])
    assert runs == []
    # a second describe (a rerun) keeps the view's creation time
    t.describe(spec, plan_study(spec))
    again = json.loads(MlflowClient(t.uri).get_experiment(t.experiment_id).tags[VIEW_TAG])
    assert again == view
    url = view_url("http://127.0.0.1:5000/", t.experiment_id)
    assert url == (
        f"http://127.0.0.1:5000/#/experiments/{t.experiment_id}/runs"
        "?workflowType=machine_learning&viewStateShareKey=srdit"
    )


def _documented_server_command() -> list[str]:
    """The tracking server command of docs/cluster.md's cluster step."""
    text = (ROOT / "docs" / "cluster.md").read_text(encoding="utf-8")
    found = re.search(r"`(mlflow server --app-name srdit [^`]+)`", text)
    assert found, "docs/cluster.md names no `mlflow server --app-name srdit ...` command"
    return shlex.split(found.group(1))


@pytest.mark.slow
def test_the_documented_srdit_mlflow_server_serves_on_loopback(tmp_path):
    """The cluster step's command, with a temporary store, loopback and a free port: MLflow's server with srdit's
    app (the index page carries the first-visit default of `srdit.runtime.mlflow_app`) and MLflow's API."""
    from srdit.runtime.mlflow_app import DEFAULT_SCRIPT
    from srdit.runtime.tracking import free_port, stop_server

    cmd = _documented_server_command()
    port = free_port()
    swap = {
        "sqlite:///shared/mlflow.db": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "0.0.0.0": "127.0.0.1",
        "5000": str(port),
    }
    args = [swap.get(a, a) for a in cmd[1:]]
    assert args[:3] == ["server", "--app-name", "srdit"] and str(port) in args and "127.0.0.1" in args
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", *args],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, up = time.time() + 120, False
        while time.time() < deadline and not up and proc.poll() is None:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    up = r.status == 200
            except OSError:
                time.sleep(0.3)
        assert up, (tmp_path / "server.log").read_text()[-2000:]
        with urllib.request.urlopen(base + "/", timeout=10) as r:
            page = r.read().decode()
        assert DEFAULT_SCRIPT in page and page.index(DEFAULT_SCRIPT) < page.index("</head>")  # srdit's app
        req = urllib.request.Request(
            base + "/api/2.0/mlflow/experiments/search",
            data=json.dumps({"max_results": 10}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert "Default" in {e["name"] for e in json.load(r)["experiments"]}
    finally:
        stop_server(proc)
        log.close()
    assert proc.poll() is not None
