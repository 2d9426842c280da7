"""A rehearsal of a first cluster run, on CPU: a two-node Ray cluster (ray.cluster_utils.Cluster), a latent study on
the stand-in tokenizer / Inception weights / reference of test_imagenet_eval, data-parallel trials on two workers.
The preflight catches a deleted weight file (nothing recorded); then a full run during which the worker node is
removed (the trials it held start again: one line each, and their attempts on the child runs), a resume, and a
report that draws the FID curves."""

import shutil
import threading
import time

import pytest
import yaml
from test_imagenet_eval import _cfg, stand_ins  # noqa: F401  (stand_ins is a fixture)

from srdit.config import to_dict

pytestmark = pytest.mark.slow


def test_cluster_rehearsal(stand_ins, tmp_path):  # noqa: F811
    import ray
    from mlflow import MlflowClient
    from ray.cluster_utils import Cluster

    from srdit.commands.report import make_report
    from srdit.runtime.driver import run_study
    from srdit.study.preflight import PreflightError
    from srdit.study.spec import load_study

    weights = tmp_path / "weights" / stand_ins["weights"].name  # a copy the test can delete
    weights.parent.mkdir()
    shutil.copy(stand_ins["weights"], weights)
    cfg = to_dict(_cfg(stand_ins))
    cfg["train"].update(steps=6, eval_every=3, ckpt_every=1, log_every=1)
    cfg["eval"].update(inception_path=str(weights))
    study = {
        "name": "rehearsal",
        "base": {k: cfg[k] for k in ("model", "data", "train", "sample", "eval")},
        "techniques": ["rmsnorm"],
        "seeds": [0],
        "resources": {"workers": 2, "cpus": 1},
        "metrics": {"primary": "fid", "direction": "min"},
    }
    path = tmp_path / "rehearsal.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    spec, state = load_study(path), tmp_path / "state"

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    try:
        weights.unlink()  # preflight: refused before anything is recorded
        with pytest.raises(PreflightError) as e:
            run_study(spec, state)
        assert "eval.inception_path" in str(e.value) and str(weights) in str(e.value)
        assert not (state / "mlflow.db").exists()
        shutil.copy(stand_ins["weights"], weights)

        uri = f"sqlite:///{(state / 'mlflow.db').resolve()}"
        removed = threading.Event()

        def remove_worker_once_training():
            client, deadline = None, time.time() + 600
            while time.time() < deadline and not removed.is_set():
                time.sleep(0.2)
                if not (state / "mlflow.db").exists():  # opening a missing store would build one in place
                    continue
                try:
                    client = client or MlflowClient(uri)
                    exp = client.get_experiment_by_name("rehearsal")
                    runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") if exp else []
                except Exception:
                    continue
                if any(r.data.tags.get("srdit.role") == "trial" and "loss" in r.data.metrics for r in runs):
                    cluster.remove_node(worker)
                    removed.set()

        t = threading.Thread(target=remove_worker_once_training, daemon=True)
        t.start()
        lines = []
        first = run_study(spec, state, echo=lines.append)
        t.join(5)
        assert removed.is_set(), lines
        again = run_study(spec, state, echo=lines.append)  # resume: whatever the lost node left unfinished
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert first.ran == 2 and again.complete and again.statuses == {"finished": 2}, lines

    client = MlflowClient(again.uri)
    runs = client.search_runs([again.experiment_id], f"tags.`mlflow.parentRunId` = '{again.parent_run_id}'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    # the lost node's trials started again: srdit said so, one line each time, and their runs record the attempts
    restarted = [r for r in runs if int(r.data.tags["attempts"]) > 1]
    assert restarted, [(r.data.tags["trial_key"], r.data.tags["attempts"]) for r in runs]
    for r in runs:
        tags, n = r.data.tags, int(r.data.tags["attempts"])
        assert tags[f"attempt.{n}.ended_by"] == "finished" and float(tags["attempts.wall_s"]) > 0, tags
        for i in range(1, n):  # what ended each earlier attempt: the loss, as Ray or the worker group saw it
            assert tags[f"attempt.{i}.ended_by"].startswith(("lost", "worker group failed")), tags
            started = [ln for ln in lines if ln.startswith(f"  {tags['trial_key']}: attempt {i + 1} started ")]
            assert len(started) == 1 and tags[f"attempt.{i}.ended_by"][:40] in started[0], lines
            assert started[0].endswith("it resumes from its checkpoint"), started
    for r in runs:
        fid = client.get_metric_history(r.info.run_id, "fid")
        assert {m.step for m in fid} == {3, 6}, [(m.step, m.value) for m in fid]
    parent = client.get_run(again.parent_run_id)
    if parent.data.metrics:  # the parent run's summary, where the study logs one
        assert all(v == v for v in parent.data.metrics.values())

    page = make_report(path, state, tmp_path / "dash", bootstrap=False).read_text(encoding="utf-8")
    curves = page[page.index('id="sec-fig-curves"') : page.index('id="sec-cells"')].replace(" ", "")
    assert '"label":"fid"' in curves  # the fid learning curve is one of the figure's quantities
