"""One driver per study on a state, status that tells the truth after a killed driver, each step logged once after
a resume, no leftover checkpoint temporaries, a relocatable embedded store. Real SQLite MLflow stores, real
processes (killed with SIGKILL), no Ray."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
TINY = {
    "train": {"steps": 4, "batch_size": 16, "log_every": 2, "ckpt_every": 2},
    "eval": {"n_samples": 50, "batch_size": 50},
    "sample": {"sampler": "euler", "steps": 2},
}


def _study(tmp_path: Path, name: str = "safe") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "techniques": ["rmsnorm", "qk_norm"], "seeds": [0], "base": TINY}))
    return p


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "srdit", "study", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )


def _holder(state: Path, study: str) -> subprocess.Popen:
    """A process that holds the study's driver lock, then sleeps until killed."""
    code = "\n".join(
        [
            "import sys, time",
            "from srdit.runtime.lock import study_lock",
            f"with study_lock({str(state)!r}, {study!r}):",
            "    print('held', flush=True)",
            "    time.sleep(600)",
        ]
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held", "the lock holder did not start"
    return proc


def test_a_second_driver_exits_at_once_and_a_dead_drivers_lock_is_taken_over(tmp_path):
    from srdit.runtime.lock import StudyBusy, holder, study_lock

    study, state = _study(tmp_path), tmp_path / "state"
    proc = _holder(state, "safe")
    try:
        h = holder(state, "safe")
        assert h["pid"] == proc.pid
        r = _cli("run", str(study), "--state", str(state))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr
        assert f"study safe is running on this state (pid {proc.pid}, host " in lines[0]
        assert not (state / "mlflow.db").exists()  # it touched nothing
        with pytest.raises(StudyBusy):
            with study_lock(state, "safe"):
                pass
        with study_lock(state, "other"):  # another study on the same state is not blocked
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert holder(state, "safe") is None  # the kernel dropped the dead driver's lock
    with study_lock(state, "safe") as stale:
        assert stale["pid"] == proc.pid  # taken over, and the previous holder is known
        assert holder(state, "safe")["pid"] == os.getpid()
    assert holder(state, "safe") is None
    with study_lock(state, "safe") as stale:
        assert stale is None  # a clean release leaves no stale record


def test_concurrent_drivers_create_a_new_store_once(tmp_path):
    state = tmp_path / "state"
    code = textwrap.dedent(f"""
        from srdit.runtime.tracking import open_study, default_tracking_uri
        t = open_study(default_tracking_uri({str(state)!r}), "race", "race", {str(state)!r})
        print(t.experiment_id, t.parent_run_id)
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1  # one experiment, one parent run


def test_status_after_a_driver_sigkill_shows_no_running_trial(tmp_path):
    from mlflow import MlflowClient

    study, state = _study(tmp_path), tmp_path / "state"
    code = "\n".join(
        [
            "import sys, time",
            "from srdit.runtime.lock import study_lock",
            "from srdit.runtime.driver import prepare",
            "from srdit.study.spec import load_study",
            "from srdit.runtime.tracking import ChildRun",
            "with study_lock(sys.argv[2], 'safe'):",
            "    spec = load_study(sys.argv[1])",
            "    plan, tracking, paths = prepare(spec, sys.argv[2])",
            "    tracking.set_parent_status('RUNNING')",
            "    t = plan.trials[0]",
            "    c = ChildRun.open(tracking.uri, tracking.experiment_id, tracking.parent_run_id, t.key, 'x', {}, {})",
            "    c.log_metrics(2, {'loss': 1.0})",
            "    print('held', flush=True)",
            "    time.sleep(600)",
        ]
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(study), str(state)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        live = _cli("status", str(study), "--state", str(state))  # the driver lives: its trial is running
        assert live.returncode == 0, live.stderr
        assert " running" in live.stdout and f"a driver is running this study now (pid {proc.pid}" in live.stdout
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = _cli("status", str(study), "--state", str(state))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert " running" not in out and "interrupted" in out, out
    assert "0/4 trials done (3 not started, 1 interrupted)" in out, out
    assert "a rerun (`srdit study run" in out and "will run 4 trial(s): 3 not started, 1 interrupted" in out
    client = MlflowClient(f"sqlite:///{(state / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("safe").experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"}  # the child and the parent


def test_status_counts_and_retry_line_follow_is_done(tmp_path):
    from srdit.runtime.driver import prepare
    from srdit.runtime.tracking import ChildRun, is_done
    from srdit.study.spec import load_study

    study, state = _study(tmp_path), tmp_path / "state"
    spec = load_study(study)
    plan, tracking, _ = prepare(spec, state)
    for t, status in zip(plan.trials, ["finished", "diverged", "crashed"]):
        c = ChildRun.open(tracking.uri, tracking.experiment_id, tracking.parent_run_id, t.key, "x", {}, {})
        c.finish(status, "" if status == "finished" else "because")
    r = _cli("status", str(study), "--state", str(state))
    assert r.returncode == 0, r.stderr
    runs = tracking.children_by_key()
    plain = 1 + sum(not is_done(runs[t.key]) for t in plan.trials[:3])  # + the trial not started
    both = 1 + sum(not is_done(runs[t.key], retry_failed=True) for t in plan.trials[:3])
    assert f"will run {plain} trial(s)" in r.stdout, r.stdout
    assert "1 finished" in r.stdout and "1 diverged" in r.stdout and "1 crashed" in r.stdout
    if both > plain:
        assert f"with --retry-failed it would also rerun {both - plain}" in r.stdout


def test_a_resumed_child_run_logs_each_step_once(tmp_path):
    from srdit.runtime.tracking import ChildRun, default_tracking_uri, open_study

    uri = default_tracking_uri(tmp_path)
    t = open_study(uri, "dup", "dup", tmp_path)
    c = ChildRun.open(uri, t.experiment_id, t.parent_run_id, "k", "k", {}, {})
    for s in range(2, 12, 2):  # killed after step 10; its checkpoint was at step 6
        c.log_metrics(s, {"loss": 1.0 / s, "grad_norm": float(s)})
    c.log_metrics(10, {"fd": 3.0})
    r = ChildRun.open(uri, t.experiment_id, t.parent_run_id, "k", "k", {}, {}, run_id=c.run_id)
    assert r.reused and r.logged_upto == {"loss": 10, "grad_norm": 10, "fd": 10}
    for s in range(8, 16, 2):  # the resumed trainer replays steps 8 and 10
        r.log_metrics(s, {"loss": 1.0 / s, "grad_norm": float(s)})
    r.log_metrics(10, {"fd": 3.0})
    client = c.client
    for key, want in (("loss", [2, 4, 6, 8, 10, 12, 14]), ("fd", [10])):
        assert sorted(m.step for m in client.get_metric_history(c.run_id, key)) == want


def _tiny_cfg(steps=12):
    from srdit.techniques import load_run_config

    return load_run_config(
        None,
        [
            f"train.steps={steps}",
            "train.batch_size=16",
            "train.log_every=2",
            "train.ckpt_every=4",
            "eval.n_samples=50",
            "eval.batch_size=50",
            "sample.steps=2",
            "train.eval_every=0",
        ],
    )


class _Killed(Exception):
    pass


def test_metrics_jsonl_holds_each_step_once_after_a_kill_and_leftover_temporaries_go(tmp_path):
    """A trainer killed between checkpoints (step 4) after logging step 6, resumed: metrics.jsonl holds every step
    once, with the values of an uninterrupted run; a checkpoint temporary left by a killed write is removed."""
    from srdit.train import CHECKPOINT, JsonlReporter, train

    cfg = _tiny_cfg()
    ref = tmp_path / "ref"
    train(cfg, ref, JsonlReporter(ref / "metrics.jsonl"), progress=False)

    class KillAt(JsonlReporter):
        def report(self, step, metrics):
            super().report(step, metrics)
            if step == 6:
                raise _Killed

    out = tmp_path / "run"
    with pytest.raises(_Killed):
        train(cfg, out, KillAt(out / "metrics.jsonl"), progress=False)
    tmp = (out / CHECKPOINT).parent / ".last.pt.abc123.tmp"
    tmp.write_bytes(b"")  # what a kill inside save_atomic leaves
    train(cfg, out, JsonlReporter(out / "metrics.jsonl"), progress=False)
    assert not tmp.exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    key_steps = [(r["step"], k) for r in rows for k in r if k != "step"]
    assert len(key_steps) == len(set(key_steps))
    timing = {"steps_per_s", "images_per_s"}
    strip = lambda rs: {(r["step"], k): v for r in rs for k, v in r.items() if k != "step" and k not in timing}  # noqa: E731
    assert strip(rows) == strip(ref_rows)


def test_throughput_summary_is_the_median_of_post_warmup_windows():
    import statistics

    from srdit.train import throughput_summary

    windows = [(10, 1.0, 16.0), (20, 9.0, 144.0), (30, 5.0, 80.0), (40, 7.0, 112.0), (50, 6.0, 96.0)]
    s = throughput_summary(windows, steps=50)  # warm-up: the first window (and steps <= 5)
    assert s["steps_per_s_median"] == statistics.median([9.0, 5.0, 7.0, 6.0])
    assert s["images_per_s_median"] == statistics.median([144.0, 80.0, 112.0, 96.0])
    assert s["throughput_windows"] == 4
    assert throughput_summary([(10, 2.0, 32.0)], steps=10)["steps_per_s_median"] == 2.0  # nothing after warm-up
    assert throughput_summary([], steps=10) == {}


def test_a_copied_state_writes_its_artifacts_into_the_copy(tmp_path):
    from mlflow import MlflowClient

    from srdit.runtime.tracking import default_tracking_uri, open_study

    a = tmp_path / "a"
    t = open_study(default_tracking_uri(a), "reloc", "reloc", a)
    f = tmp_path / "note.txt"
    f.write_text("one")
    MlflowClient(t.uri).log_artifact(t.parent_run_id, str(f))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    tb = open_study(default_tracking_uri(b), "reloc", "reloc", b, create=False)
    assert tb.parent_run_id == t.parent_run_id
    client = MlflowClient(tb.uri)
    assert client.get_experiment(tb.experiment_id).artifact_location.startswith((b.resolve()).as_uri())
    run = client.get_run(tb.parent_run_id)
    assert run.info.artifact_uri.startswith(b.resolve().as_uri())
    # a new process, as `srdit report` on the copy (MLflow caches a run's artifact store per process)
    code = "\n".join(
        [
            "import sys",
            "from mlflow import MlflowClient",
            "from srdit.runtime.tracking import default_tracking_uri, open_study",
            "t = open_study(default_tracking_uri(sys.argv[1]), 'reloc', 'reloc', sys.argv[1], create=False)",
            "MlflowClient(t.uri).log_artifact(t.parent_run_id, sys.argv[2], 'again')",
        ]
    )
    subprocess.run([sys.executable, "-c", code, str(b), str(f)], cwd=ROOT, env=ENV, check=True, timeout=120)
    assert list(b.rglob("again/note.txt")) and not list(a.rglob("again/note.txt"))
    # the original is unchanged and still its own
    ta = open_study(default_tracking_uri(a), "reloc", "reloc", a, create=False)
    assert MlflowClient(ta.uri).get_run(ta.parent_run_id).info.artifact_uri.startswith(a.resolve().as_uri())


def test_child_runs_are_named_by_techniques_and_the_submission_order_interleaves_cells():
    from srdit.runtime.worker import run_name
    from srdit.study.designs import plan_study, submission_order
    from srdit.study.spec import load_study

    plan = plan_study(load_study(ROOT / "studies" / "digits_quick.yaml"))
    t = next(t for t in plan.trials if t.cell == "011" and t.seed == 0)
    assert run_name(t) == "rope+logit_normal · s0"
    assert run_name(next(t for t in plan.trials if t.cell == "000")) == "baseline · s0"
    order = submission_order(plan.trials)
    assert sorted(x.key for x in order) == sorted(x.key for x in plan.trials)
    cells = [x.cell for x in order]
    assert all(a != b for a, b in zip(cells, cells[1:]))  # seeds of one cell never side by side
    firsts = [x.cell for x in order if x.seed == 0]
    seconds = [x.cell for x in order if x.seed == 1]
    assert firsts != seconds  # each round pairs different neighbours
    assert firsts != [c.id for c in plan.cells]  # not the design's order
    assert [x["key"] for x in submission_order([t.to_dict() for t in plan.trials])] == [x.key for x in order]


CC_STEPS = 200
"""Steps of each Ctrl-C trial: the signal comes once the first checkpoint (step 10) is written and must find the
first trial still training; the rerun trains the rest of it and all of the second (one CPU: one trial at a time)."""


@pytest.mark.slow
def test_ctrl_c_prints_srdits_resume_line_and_the_rerun_resumes_without_duplicates(tmp_path):
    """Ctrl-C (SIGINT to the driver's process group, as a terminal sends it) mid-trial: srdit's own resume line,
    no Tune `Tuner.restore` advice, no traceback; `status` shows the trial interrupted, and the rerun finishes it
    with each step logged once."""
    from mlflow import MlflowClient

    study = tmp_path / "cc.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "cc",
                "techniques": ["rmsnorm"],
                "seeds": [0],
                "base": {
                    "train": {"steps": CC_STEPS, "batch_size": 16, "log_every": 5, "ckpt_every": 10},
                    "eval": {"n_samples": 50, "batch_size": 50},
                    "sample": {"sampler": "euler", "steps": 2},
                },
            }
        )
    )
    state = tmp_path / "state"
    env = {**ENV, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    args = [sys.executable, "-m", "srdit", "study", "run", str(study), "--state", str(state), "--num-cpus", "1"]
    # A terminal's foreground job: Ctrl-C's default disposition. A test run started in the background of a
    # non-interactive shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 400
    while time.time() < deadline and not list((state / "trials" / "cc").glob("*/checkpoints/last.pt")):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]  # 128 + SIGINT: stopped, each running trial saved its step
    assert "SIGINT: stopping; the running trials write a checkpoint at their current step" in out
    assert "Tuner.restore" not in out and "Traceback" not in out, out[-3000:]
    assert "rerun the same command" in out
    r = _cli("status", str(study), "--state", str(state))
    assert " running" not in r.stdout and "interrupted" in r.stdout, r.stdout
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "2/2 trials done (2 finished)" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{(state / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("cc")
    for run in client.search_runs([exp.experiment_id], "tags.`srdit.role` = 'trial'"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(steps) == list(range(5, CC_STEPS + 1, 5)), run.info.run_name


def test_two_identical_proposals_at_the_same_instant_train_once(tmp_path):
    """Two search proposals of the same configuration start at the same instant (two threads behind a barrier, as
    two Tune workers would): one trains; the other waits on the trial key's lock and is answered from the first's
    child run. One MLflow child run for the key, one training in the trial folder."""
    import threading

    from mlflow import MlflowClient

    from srdit.runtime.driver import _context, prepare
    from srdit.runtime.jobs import trial_job
    from srdit.runtime.tracking import KEY_TAG, PARENT_TAG
    from srdit.study.designs import make_cell, make_trial
    from srdit.study.spec import study_from_dict

    spec = study_from_dict(
        {
            "name": "twin",
            "techniques": ["rmsnorm"],
            "seeds": [0],
            "base": TINY,
            "design": {
                "kind": "search",
                "trials": 2,
                "objectives": ["fd"],
                "space": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
            },
        }
    )
    state = tmp_path / "state"
    plan, tracking, study_state = prepare(spec, state)
    ctx = _context(spec, tracking, study_state, plan, search=True)
    assert ctx.objectives == ("fd",)
    trial = trial_job(make_trial(spec, make_cell(spec, ["rmsnorm"]), 0, {"train.lr": 2e-3}), ctx.cwd)
    from srdit.runtime.worker import execute_trial

    barrier, out = threading.Barrier(2), [None, None]

    def propose(i):
        barrier.wait()
        out[i] = execute_trial(trial, ctx)

    threads = [threading.Thread(target=propose, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert all(o is not None for o in out), out
    assert sorted(o.get("cached", 0) for o in out) == [0, 1], out
    assert out[0]["run_id"] == out[1]["run_id"] and out[0]["status"] == out[1]["status"] == "finished"
    assert out[0]["fd"] == out[1]["fd"]
    runs = MlflowClient(tracking.uri).search_runs(
        [tracking.experiment_id], f"tags.`{PARENT_TAG}` = '{tracking.parent_run_id}' and tags.{KEY_TAG} = '{trial.key}'"
    )
    assert len(runs) == 1


def test_the_cell_param_is_a_label_that_never_reads_as_a_number():
    """MLflow's parallel coordinates read a param that parses as a number as one (`011` -> 11, as JavaScript's
    Number() does): the `study.cell` param is the cell's techniques; the `cell` tag keeps the bit string."""
    from srdit.runtime.worker import trial_params
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    plan = plan_study(load_study(ROOT / "studies" / "digits_quick.yaml"))
    labels = {t.cell: trial_params(t)["study.cell"] for t in plan.trials}
    assert labels["011"] == "rope+logit_normal" and labels["000"] == "baseline"
    for label in labels.values():
        with pytest.raises(ValueError):
            float(label)
