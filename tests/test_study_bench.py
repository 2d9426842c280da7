"""`srdit study bench` (structure of its record, never its timings), wall-clock metrics in the analysis (from the
bench when present, else a caveat and no significance), the parent run's description and headline results, the
GPU plan's wording, and the MLflow UI's life tied to `srdit ui`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
TINY = {
    "train": {"steps": 4, "batch_size": 16, "log_every": 2, "ckpt_every": 2},
    "eval": {"n_samples": 50, "batch_size": 50},
    "sample": {"sampler": "euler", "steps": 2},
}


def _study(tmp_path: Path) -> Path:
    p = tmp_path / "bq.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "name": "bq",
                "techniques": ["rmsnorm", "qk_norm"],
                "seeds": [0, 1],
                "base": TINY,
                "metrics": {"primary": "fd", "direction": "min", "others": {"images_per_s": "max"}},
            }
        )
    )
    return p


@pytest.mark.slow
def test_bench_command_writes_every_cell_with_its_ratio_to_the_baseline(tmp_path):
    from mlflow import MlflowClient

    from srdit.runtime.bench import bench_table, load_bench
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    study, state = _study(tmp_path), tmp_path / "state"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "srdit",
            "study",
            "bench",
            str(study),
            "--state",
            str(state),
            "--rounds",
            "3",
            "--warmup",
            "1",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((state / "bench" / "bq.json").read_text())
    plan = plan_study(load_study(study))
    assert set(rec["cells"]) == {c.id for c in plan.cells} and rec["baseline"] == "00" and rec["rounds"] == 3
    for c, v in rec["cells"].items():
        assert len(v["round_step_s"]) == 3 and v["step_s"] == float(np.median(v["round_step_s"]))
        assert v["ratio"] == pytest.approx(
            float(np.median(np.array(v["round_step_s"]) / np.array(rec["cells"]["00"]["round_step_s"])))
        )
        assert v["images_per_s"] == pytest.approx(16 / v["step_s"])
        assert v["trial_key"] == next(t.key for t in plan.trials if t.cell == c)
    assert rec["cells"]["00"]["ratio"] == 1.0
    assert "ratio" in r.stdout and "00" in r.stdout
    assert load_bench(state, plan) is not None
    t = bench_table(rec, plan.factors)
    assert len(t) == 4 * 3 and set(t["seed"]) == {0, 1, 2} and {"rmsnorm", "qk_norm", "images_per_s"} <= set(t)
    # on the parent run
    client = MlflowClient(f"sqlite:///{(state / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("bq")
    parent = client.search_runs([exp.experiment_id], "tags.`srdit.role` = 'study'")[0]
    assert parent.data.metrics["bench/ratio/00"] == 1.0 and "bench/step_s/11" in parent.data.metrics
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "bench")] == ["bench/bq.json"]
    # a changed study (another config) does not use the old bench
    study.write_text(study.read_text().replace("steps: 4", "steps: 6"))
    assert load_bench(state, plan_study(load_study(study))) is None
    # a bad argument: one line, exit 2
    r = subprocess.run(
        [sys.executable, "-m", "srdit", "study", "bench", str(study), "--state", str(state), "--rounds", "1"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--rounds" in r.stderr


def _results(table: pd.DataFrame, bench: pd.DataFrame | None = None):
    from srdit.analysis.results import StudyResults

    return StudyResults(
        study="t",
        design="full",
        factors=["a", "b"],
        metric="fd",
        direction="min",
        other_metrics={"images_per_s": "max"},
        table=table,
        bench=bench,
    )


def _table(rng, ips_of, n_seeds=3, **extra) -> pd.DataFrame:
    rows = []
    for s in range(n_seeds):
        for a in (0, 1):
            for b in (0, 1):
                rows.append(
                    {
                        "trial": f"{a}{b}-{s}",
                        "cell": f"{a}{b}",
                        "seed": s,
                        "status": "finished",
                        "status_reason": "",
                        "a": a,
                        "b": b,
                        "fd": 10 - a + rng.normal(0, 0.1),
                        "images_per_s": ips_of(a, b, s),
                        **extra,
                    }
                )
    return pd.DataFrame(rows)


def test_wall_clock_metrics_under_contention_carry_a_caveat_and_no_significance():
    from srdit.analysis.effects import CONTENTION_NOTE, analyze_study

    rng = np.random.default_rng(0)
    # a planted "effect" of b on throughput that is the machine's load (b's trials ran beside others)
    t = _table(rng, lambda a, b, s: 1000 * (0.6 if b else 1.0) * (1 + 0.01 * rng.normal()), trials_on_host=2)
    out = analyze_study(_results(t), bootstrap=False)
    a = out["images_per_s"]
    assert a.notes[0] == CONTENTION_NOTE
    assert all(v is None for v in a.pairs.p_adj.values()) and all(v is None for v in a.fit.p.values())
    assert not a.pairs.antagonism and a.fit.main_effects["b"] < 0  # the estimate stays, the claim goes
    assert out["fd"].fit.p["a"] is not None  # quality metrics keep their tests
    alone = analyze_study(_results(t.assign(trials_on_host=1)), bootstrap=False)["images_per_s"]
    assert alone.fit.p["b"] is not None and CONTENTION_NOTE not in alone.notes  # trials that ran alone


def test_the_bench_replaces_the_trials_wall_clock_in_effects():
    from srdit.analysis.effects import BENCH_NOTE, analyze_study

    rng = np.random.default_rng(1)
    t = _table(rng, lambda a, b, s: 1000 * (0.6 if b else 1.0), trials_on_host=2)
    bench = _table(rng, lambda a, b, s: 1000 * (0.8 if a else 1.0) * (1 + 0.005 * rng.normal()), n_seeds=5)
    a = analyze_study(_results(t, bench), bootstrap=False)["images_per_s"]
    assert a.notes[0] == BENCH_NOTE and a.n_runs == len(bench)
    assert a.fit.main_effects["a"] == pytest.approx(np.log(0.8), abs=0.01)  # log scale: a is 20 % slower
    assert abs(a.fit.main_effects["b"]) < 0.01 and a.fit.p["a"] < 0.05


def test_report_pareto_uses_the_bench_and_the_page_shows_the_caveat(tmp_path):
    from srdit.analysis.effects import analyze_study
    from srdit.analysis.figures import fig_pareto
    from srdit.analysis.page import render_report
    from srdit.analysis.report_fit import fit_report

    rng = np.random.default_rng(2)
    t = _table(rng, lambda a, b, s: 1000 * (0.6 if b else 1.0), trials_on_host=2)
    bench = _table(rng, lambda a, b, s: 1000 * (0.8 if a else 1.0), n_seeds=3)
    res = _results(t, bench)
    an = analyze_study(res, bootstrap=False)
    fig = fig_pareto(res, an["fd"])
    xs = {txt: x for tr in fig.data if tr.mode == "markers+text" for txt, x in zip(tr.text, tr.x)}
    assert sorted(round(x) for x in xs.values()) == [800, 800, 1000, 1000]
    html = render_report(fit_report(_results(t), bootstrap=False), tmp_path / "r").read_text()
    assert "caveat" in html and "no significance is claimed" in html


def test_parent_run_describes_the_study_and_carries_headline_results(tmp_path):
    from mlflow import MlflowClient

    from srdit.analysis.effects import analyze_study
    from srdit.commands.report import headline_results
    from srdit.runtime.driver import prepare
    from srdit.study.spec import load_study

    spec = load_study(_study(tmp_path))
    plan, tracking, _ = prepare(spec, tmp_path / "state")
    client = MlflowClient(tracking.uri)
    run = client.get_run(tracking.parent_run_id)
    assert run.data.params["design"] == "full" and run.data.params["techniques"] == "rmsnorm,qk_norm"
    assert run.data.params["seeds"] == "0,1" and run.data.params["n_trials"] == "8"
    arts = {a.path for a in client.list_artifacts(tracking.parent_run_id, "study")}
    assert arts == {"study/study.yaml", "study/plan.json"}
    exp = client.get_experiment(tracking.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on runs, not traces
    prepare(spec, tmp_path / "state")  # again: params are immutable, nothing fails

    rng = np.random.default_rng(3)
    t = _table(rng, lambda a, b, s: 1000.0, trials_on_host=1)
    metrics, tags = headline_results(analyze_study(_results(t), bootstrap=False), "fd")
    assert metrics["fd/main_effect/a"] == pytest.approx(-1, abs=0.2)
    assert {
        "fd/main_effect/a/ci_low",
        "fd/main_effect/a/ci_high",
        "fd/synergy/a-x-b",
        "fd/synergy/a-x-b/ci_low",
        "fd/synergy/a-x-b/p_adj",
    } <= set(metrics)
    assert tags["result.best_cell"].startswith("a (10)") and tags["result.fd.incompatible"] == "none flagged"
    tracking.log_parent_metrics(metrics)  # every name is one MLflow accepts
    tracking.tag_parent(tags)


def test_gpu_plan_says_what_wall_and_gpu_hours_mean():
    from srdit.study.designs import format_plan, plan_study
    from srdit.study.spec import load_study

    out = format_plan(plan_study(load_study(ROOT / "studies" / "imagenet256_sr_dit_ladder.yaml")))
    assert "GPU-hours = GPUs x hours, summed over the 9 trials" in out
    assert "elapsed with one trial at a time on 8 GPU(s)" in out and "estimated wall time" not in out


@pytest.mark.slow
def test_sigkill_of_srdit_ui_frees_its_port(tmp_path):
    from mlflow import MlflowClient

    from srdit.runtime.tracking import default_tracking_uri, free_port, port_free

    state = tmp_path / "state"
    state.mkdir()
    MlflowClient(default_tracking_uri(state)).create_experiment("ui_kill")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "srdit", "ui", "--state", str(state), "--port", str(port)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    line, deadline = "", time.time() + 120
    while time.time() < deadline and "MLflow UI:" not in line:
        line = proc.stdout.readline()
    assert f"http://127.0.0.1:{port}/#/?workflowType=machine_learning" in line
    assert not port_free("127.0.0.1", port)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.time() + 30
    while time.time() < deadline and not port_free("127.0.0.1", port):
        time.sleep(0.5)
    assert port_free("127.0.0.1", port)  # the watchdog stopped the server with its command
