"""The cluster path on one machine: a two-node Ray cluster (ray.cluster_utils.Cluster) runs a study; removing the
worker node while trials run on it loses no trial (Tune retries it; the trainer resumes from its checkpoint and
the trial reuses its MLflow child run)."""

import threading
import time

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_study_on_a_two_node_cluster_survives_a_lost_node(tmp_path):
    import ray
    from mlflow import MlflowClient
    from ray.cluster_utils import Cluster

    from srdit.runtime.driver import run_study
    from srdit.study.spec import load_study

    path = tmp_path / "cluster.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "cluster",
                "techniques": ["rmsnorm", "qk_norm"],
                "seeds": [0],
                "base": {
                    "train": {"steps": 80, "batch_size": 16, "log_every": 5, "ckpt_every": 5},
                    "eval": {"n_samples": 50, "batch_size": 50},
                    "sample": {"sampler": "euler", "steps": 2},
                },
            }
        )
    )
    spec = load_study(path)
    state = tmp_path / "state"
    uri = f"sqlite:///{(state / 'mlflow.db').resolve()}"

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    removed = threading.Event()

    def remove_worker_mid_study():
        client = None
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(0.2)
            try:
                client = client or MlflowClient(uri)
                exp = client.get_experiment_by_name("cluster")
                runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") if exp else []
            except Exception:
                continue
            # two trials training at once on a 1 + 1 CPU cluster: one of them is on the worker node
            if len([r for r in runs if r.data.tags.get("srdit.role") == "trial" and "loss" in r.data.metrics]) >= 2:
                cluster.remove_node(worker)
                removed.set()
                return

    t = threading.Thread(target=remove_worker_mid_study, daemon=True)
    t.start()
    try:
        res = run_study(spec, state)
    finally:
        t.join(5)
        ray.shutdown()
        cluster.shutdown()
    assert removed.is_set()
    assert res.complete and res.statuses == {"finished": 4}
    client = MlflowClient(uri)
    runs = client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(runs) == 4 and len({r.data.tags["trial_key"] for r in runs}) == 4
    assert {r.info.status for r in runs} == {"FINISHED"}
    # the trial that lost its node resumed: its curve has every logging step, possibly some twice, none missing
    for r in runs:
        steps = sorted({m.step for m in client.get_metric_history(r.info.run_id, "steps_per_s")})
        assert steps == list(range(5, 81, 5)), steps
