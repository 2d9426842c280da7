"""The cluster path on one machine: a two-node Ray cluster (ray.cluster_utils.Cluster) runs a study; removing the
worker node while trials run on it loses no trial (Tune retries it; the trainer resumes from its checkpoint and
the trial reuses its MLflow child run). Without retries the lost trial is recorded as an infrastructure failure:
the analysis of the study (as `srdit report` fits it) counts it as no failure of its cell and flags nothing from
it, and says that it left it out."""

import threading
import time

import pytest
import yaml

pytestmark = pytest.mark.slow


def _run_losing_the_worker(tmp_path, **kw):
    """Run a 2-technique study (4 trials) on a 1 + 1 CPU cluster and remove the worker node while two trials
    train (one of them on it). Returns the StudyRun, the spec, the state folder and the driver's lines."""
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
            if not (state / "mlflow.db").exists():  # opening a missing store would build one in place
                continue
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
    lines: list[str] = []
    try:
        res = run_study(spec, state, echo=lines.append, **kw)
    finally:
        t.join(5)
        ray.shutdown()
        cluster.shutdown()
    assert removed.is_set()
    return res, spec, state, lines


def _analysed(spec, state):
    """The study's analyses as `srdit report` fits them (its MLflow runs -> results table -> every metric)."""
    from srdit.analysis.effects import Analysis
    from srdit.analysis.report_fit import fit_report
    from srdit.runtime.results import load_results

    results, _ = load_results(spec, state, samples=False)
    fit = fit_report(results, bootstrap=False)
    analyses = [a for a in fit.analyses.values() if isinstance(a, Analysis)]
    assert analyses and isinstance(fit.primary, Analysis), fit.analyses
    return results, analyses


def _nothing_found_from_the_lost_node(analyses) -> None:
    """No failure counted, no pair flagged incompatible (antagonism or failures) or significant."""
    for a in analyses:
        assert a.n_failed == 0 and all(c.n_failed == 0 for c in a.attribution.cells), a.metric
        assert a.incompatible == [] and a.failures.flagged == [], a.metric
        assert a.pairs.significant == [], a.metric


def test_study_on_a_two_node_cluster_survives_a_lost_node(tmp_path):
    from mlflow import MlflowClient

    res, spec, state, lines = _run_losing_the_worker(tmp_path)
    assert res.complete and res.statuses == {"finished": 4}, lines
    client = MlflowClient(res.uri)
    runs = client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(runs) == 4 and len({r.data.tags["trial_key"] for r in runs}) == 4
    assert {r.info.status for r in runs} == {"FINISHED"}
    # the trial that lost its node: its first attempt names the loss as Ray recorded it, not only that it was lost
    restarted = [r.data.tags for r in runs if int(r.data.tags["attempts"]) > 1]
    assert restarted, [r.data.tags["attempts"] for r in runs]
    for tags in restarted:
        assert tags["attempt.1.ended_by"].startswith("lost by Ray: ") and "Error" in tags["attempt.1.ended_by"], tags
    # the trial that lost its node resumed: its curve has every logging step, possibly some twice, none missing
    for r in runs:
        steps = sorted({m.step for m in client.get_metric_history(r.info.run_id, "steps_per_s")})
        assert steps == list(range(5, 81, 5)), steps
    results, analyses = _analysed(spec, state)
    assert len(results.table) == 4 and set(results.table["status"]) == {"finished"}
    _nothing_found_from_the_lost_node(analyses)
    assert all(a.n_infrastructure == 0 for a in analyses)


def test_a_trial_lost_with_its_node_and_not_retried_is_no_finding(tmp_path):
    """max_failures=0: the trial on the removed node is not retried. Its run records it as crashed, caused by the
    infrastructure (the driver's rule for a trial Ray lost), a rerun would retry it, and the analysis leaves it
    out with a note: no failure of its cell, no flag."""
    from mlflow import MlflowClient

    from srdit.analysis.results import CRASH_CAUSE, INFRASTRUCTURE
    from srdit.runtime.tracking import is_done

    res, spec, state, lines = _run_losing_the_worker(tmp_path, max_failures=0)
    assert res.statuses == {"finished": 3, "crashed": 1}, lines
    assert not res.complete and len(res.unfinished) == 1, res.unfinished
    lost = res.unfinished[0]
    client = MlflowClient(res.uri)
    runs = {
        r.data.tags["trial_key"]: r
        for r in client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    }
    assert len(runs) == 4 and runs[lost].info.status == "FAILED"
    tags = runs[lost].data.tags
    assert tags["status"] == "crashed" and tags[CRASH_CAUSE] == INFRASTRUCTURE, tags
    assert not is_done(runs[lost])  # a rerun retries it
    assert any(lost in line and "infrastructure failure" in line for line in lines), lines

    results, analyses = _analysed(spec, state)
    row = results.table.set_index("trial").loc[lost]
    assert row["status"] == "crashed" and row[CRASH_CAUSE] == INFRASTRUCTURE
    _nothing_found_from_the_lost_node(analyses)
    for a in analyses:  # the count and the note say what happened
        assert a.n_infrastructure == 1 and a.to_json()["n_infrastructure"] == 1, a.metric
        assert any("1 run(s) failed for a reason outside the training code" in n for n in a.notes), a.notes
