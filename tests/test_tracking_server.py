"""The same study layer through a real `mlflow server` on a free loopback port (HTTP tracking, proxied
artifacts)."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    from srdit.runtime.tracking import start_server, stop_server

    proc = start_server(  # port 0: a free one, another if it was taken before the server listened
        f"sqlite:///{tmp_path / 'server.db'}",
        tmp_path / "server-artifacts",
        port=0,
        log_path=tmp_path / "server.log",
    )
    yield proc.url
    stop_server(proc)
    assert proc.poll() is not None


def test_study_through_a_tracking_server(tmp_path, server, capfd):
    from mlflow import MlflowClient

    from srdit.runtime.driver import run_study
    from srdit.runtime.results import load_results
    from srdit.study.spec import load_study

    path = tmp_path / "srv.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "srv",
                "techniques": ["rmsnorm", "qk_norm"],
                "seeds": [0],
                "tracking": {"uri": server},
                "base": {
                    "train": {"steps": 4, "batch_size": 16, "log_every": 2, "ckpt_every": 2},
                    "eval": {"n_samples": 50, "batch_size": 50},
                    "sample": {"sampler": "euler", "steps": 2},
                },
            }
        )
    )
    spec = load_study(path)
    state = tmp_path / "state"
    res = run_study(spec, state, num_cpus=2)
    assert res.complete and res.statuses == {"finished": 4} and res.uri == server
    assert not (state / "mlflow.db").exists()  # everything went to the server
    printed = capfd.readouterr()
    assert "View run" not in printed.out + printed.err  # MLflow's links from every worker: the study names the server

    client = MlflowClient(server)
    exp = client.get_experiment_by_name("srv")
    assert exp.artifact_location == "mlflow-artifacts:/srv"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["cell"] for r in children} == {"00", "01", "10", "11"}
    run = children[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "samples.png", "evals"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "evals")] == ["evals/step_0000004.json"]
    assert (tmp_path / "server-artifacts").exists()  # the server stored the artifacts
    # plain REST, as the UI reads it
    url = f"{server}/api/2.0/mlflow/metrics/get-history?run_id={run.info.run_id}&metric_key=loss"
    with urllib.request.urlopen(url, timeout=10) as r:
        hist = json.load(r)["metrics"]
    assert [m["step"] for m in hist][:2] == [2, 4]

    results, _ = load_results(spec, state)
    assert len(results.table) == 4 and len(results.samples) == 4 and results.table["fd"].notna().all()
    # the CLI, all done: nothing runs, and the end names the server, not `srdit ui` (its state holds no store)
    again = subprocess.run(
        [sys.executable, "-m", "srdit", "study", "run", str(path), "--state", str(state)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "all done" in again.stdout and f"browse at {server}" in again.stdout and "srdit ui" not in again.stdout
    assert f"browse at {server}/#/experiments/{exp.experiment_id}/runs?" in again.stdout  # the study's saved view
    assert "viewStateShareKey=srdit" in again.stdout and "mlflow.sharedViewState.srdit" in exp.tags
    assert {r.data.params["study.cell"] for r in children} == {"baseline", "rmsnorm", "qk_norm", "rmsnorm+qk_norm"}


def test_ui_command_serves_the_embedded_store_and_stops_on_ctrl_c(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from mlflow import MlflowClient

    from srdit.runtime.tracking import default_tracking_uri, free_port

    state = tmp_path / "state"
    state.mkdir()
    MlflowClient(default_tracking_uri(state)).create_experiment("ui_probe")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "srdit", "ui", "--state", str(state), "--port", str(port)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = ""
        deadline = time.time() + 90
        while time.time() < deadline and "MLflow UI:" not in line:
            line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200 and b"MLflow" in r.read()
        body = json.dumps({"max_results": 10}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert "ui_probe" in {e["name"] for e in json.load(r)["experiments"]}
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    time.sleep(1)
    from srdit.runtime.tracking import port_free

    assert port_free("127.0.0.1", port)  # the server is gone with it
    assert os.path.exists(state / "mlflow-ui.log")
