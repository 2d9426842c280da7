"""SIGTERM / SIGINT / SIGHUP are interruptions, not crashes: `srdit train`, a study's driver and a trial worker
write a checkpoint at the step they are on, end `interrupted` with one line naming the resume command, and the
rerun resumes and ends equal to an uninterrupted run. Real processes, real signals, a real local Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import study_command

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
ENV.pop("RAY_ADDRESS", None)
TRAIN = [
    "train.steps=160",
    "train.batch_size=16",
    "train.log_every=10",
    "train.ckpt_every=100000",  # no periodic checkpoint: the one a rerun finds is the signal's
    "train.threads=1",  # as a study's trial on one CPU; torch's default threads spin when other work shares the CPUs
    "eval.n_samples=50",
    "eval.batch_size=50",
    "sample.sampler=euler",
    "sample.steps=2",
]
TIMING = ("steps_per_s", "images_per_s", "steps_per_s_median", "images_per_s_median", "throughput_windows")


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a terminal's foreground job has it (a background test: ignored)


def _train(out: Path, wait_for_step: int | None = None, sig: int | None = None) -> subprocess.CompletedProcess:
    """`srdit train` into `out`; with `sig`: sent once metrics.jsonl has reached `wait_for_step`."""
    args = [sys.executable, "-m", "srdit", "train", *TRAIN, "--out", str(out), "--quiet"]
    p = subprocess.Popen(
        args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
    )
    if sig is not None:
        deadline = time.time() + 300
        log = out / "metrics.jsonl"
        while time.time() < deadline and p.poll() is None:
            lines = log.read_text().splitlines() if log.is_file() else []
            if lines and json.loads(lines[-1])["step"] >= wait_for_step:
                break
            time.sleep(0.05)
        time.sleep(0.1)  # between two logging steps
        p.send_signal(sig)
    out_, err = p.communicate(timeout=600)
    return subprocess.CompletedProcess(args, p.returncode, out_, err)


def _curve(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (out / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    r = _train(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_srdit_train_checkpoints_the_current_step_on_a_signal_and_resumes_equal(sig, uninterrupted, tmp_path):
    out = tmp_path / "run"
    r = _train(out, wait_for_step=40, sig=sig)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 128 + sig, r.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith(f"srdit train: interrupted by {sig.name}: checkpoint at step ")
    assert lines[0].endswith("; rerun the same command to resume")
    step = int(lines[0].split("checkpoint at step ")[1].split()[0])
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == step and 40 <= step < 160  # the step it was on, not a periodic one (there are none)
    r = _train(out)  # the rerun resumes
    assert r.returncode == 0, r.stderr[-3000:]
    assert _curve(out) == _curve(uninterrupted)  # every logged mean, the window across the signal included
    a = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(uninterrupted / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in b[part]), part


def test_a_second_signal_stops_at_once_and_says_whether_a_checkpoint_exists(tmp_path):
    """No checkpoint yet: the hard stop must not promise a resume (it says the rerun starts over)."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "srdit", "train", *TRAIN, "--out", str(out), "--quiet"]
    env = {**ENV, "SRDIT_STOP_GRACE_S": "0"}  # the grace period is over at once: the hard stop
    p = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "config.yaml").is_file():
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert p.returncode == 143 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    if (out / "checkpoints" / "last.pt").exists():  # the trainer reached a step boundary first: it saved
        assert "interrupted by SIGTERM: checkpoint at step" in lines[0]
    else:
        assert lines[0] == "srdit train: interrupted; no checkpoint was written yet, so a rerun starts from step 0"


STUDY_STEPS = 200
"""Steps of each trial: the signals come in its first few dozen steps (once a report is logged) and must find it
still training; the rest is the resumed run the curves are compared over."""
STUDY_BASE = {
    "train": {"steps": STUDY_STEPS, "batch_size": 16, "log_every": 5, "ckpt_every": 100000},
    "eval": {"n_samples": 50, "batch_size": 50},
    "sample": {"sampler": "euler", "steps": 2},
}


def _study_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "sg.yaml"
    p.write_text(yaml.safe_dump({"name": "sg", "techniques": ["rmsnorm"], "seeds": [0], "base": STUDY_BASE}))
    return p


def _run(folder: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "srdit", "study", "run", "sg.yaml", "--state", "st", "--num-cpus", "2"],
        cwd=folder,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _wait_training(folder: Path, n: int) -> list[str]:
    """Wait until `n` trials have logged a training report; returns the running trials' worker markers."""
    deadline = time.time() + 400
    while time.time() < deadline:
        logged = list((folder / "st" / "trials" / "sg").glob("*/train_metrics.jsonl"))
        if len([p for p in logged if p.stat().st_size]) >= n:
            return [p.name for p in (folder / "st" / "trials" / "sg" / ".running").glob("*")]
        time.sleep(0.1)
    raise AssertionError("the trials did not start training")


def _trials(folder: Path, study: str = "sg") -> dict:
    """Trial key -> status, reason, loss curve and final fd of the study's child runs (store `folder/st`)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'st' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    out = {}
    for r in client.search_runs([exp.experiment_id], "tags.`srdit.role` = 'trial'"):
        curve = {(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss")}
        out[r.data.tags["trial_key"]] = {
            "status": r.data.tags["status"],
            "reason": r.data.tags.get("status_reason", ""),
            "loss": sorted(curve),
            "fd": r.data.metrics.get("fd"),
        }
    return out


@pytest.fixture(scope="module")
def uninterrupted_study(tmp_path_factory) -> dict:
    """The study's trials run once without a signal, in a plain loop in this process (`run_plain`: the same trainer
    and MLflow records, no Ray, one torch thread as a one-CPU trial has): what each signal's stopped and resumed
    study must end equal to."""
    from srdit.runtime.driver import run_plain
    from srdit.study.spec import load_study

    whole = tmp_path_factory.mktemp("whole_study")
    res = run_plain(load_study(_study_file(whole)), whole / "st")
    assert res.statuses == {"finished": 2}, res
    return _trials(whole)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_study_stops_on_a_signal_to_its_driver_or_a_trial_worker_and_resumes_equal(
    sig, uninterrupted_study, tmp_path
):
    folder = tmp_path / "stopped"
    _study_file(folder)
    p = _run(folder)
    _wait_training(folder, 2)
    p.send_signal(sig)  # to the driver only (a Kubernetes pod's main process; Slurm's batch step)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 128 + sig, out[-3000:] + err[-3000:]
    assert f"{sig.name}: stopping; the running trials write a checkpoint at their current step" in out
    assert "Traceback" not in out + err, out[-3000:] + err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"stopped by {sig.name}: the running trials wrote a checkpoint at their current step; "
        "`srdit study run sg.yaml --state st` resumes the study"
    )
    got = _trials(folder)
    assert {t["status"] for t in got.values()} == {"interrupted"}
    for key, t in got.items():  # each trial's checkpoint holds the step its status names
        step = int(t["reason"].split("checkpoint at step ")[1].split()[0])
        ckpt = torch.load(folder / "st" / "trials" / "sg" / key / "checkpoints" / "last.pt", weights_only=False)
        assert ckpt["step"] == step and 0 < step < STUDY_STEPS
    status = study_command("status", str(folder / "sg.yaml"), "--state", str(folder / "st"))
    assert "will run 2 trial(s): 2 interrupted" in status

    # the rerun; the same signal to one trial's worker process (Slurm signals every process of a job step): that
    # trial saves the step it is on and records it
    p = _run(folder)
    running = folder / "st" / "trials" / "sg" / ".running"
    deadline = time.time() + 400
    while time.time() < deadline and not list(running.glob("*")):
        time.sleep(0.1)
    marker = next(running.glob("*")).name.split("__")
    victim, key = int(marker[1]), marker[2]
    log = folder / "st" / "trials" / "sg" / key / "train_metrics.jsonl"
    size = log.stat().st_size
    while time.time() < deadline and log.stat().st_size == size:  # it trains again (resumed, past a report)
        time.sleep(0.1)
    os.kill(victim, sig)
    out, err = p.communicate(timeout=900)
    journal = (folder / "st" / "trials" / "sg" / key / "mlflow_run.jsonl").read_text()
    says = f"interrupted by {sig.name}: checkpoint at step"
    status_records = journal.count(f'"status_reason": "{says}')  # the run's status; the attempt tags repeat it
    assert f'"attempt.1.ended_by": "interrupted: {says}' in journal  # the attempt the signal ended, recorded
    if sig == signal.SIGTERM:
        # Ray ends a worker on SIGTERM: the trial saved its step and recorded it first, then Tune retried it
        assert p.returncode == 0, out[-3000:] + err[-3000:]
        assert status_records == 2, (victim, key, out[-4000:])  # the driver's, then the worker's
    else:
        # the worker lives on: its trial ended interrupted, the study ran the rest; a rerun finishes it
        assert p.returncode == 1, out[-3000:] + err[-3000:]
        assert status_records == 2 and f"  {key}: {says}" in out, (victim, key, out[-4000:])
        assert "1 trial(s) unfinished" in out
        p = _run(folder)
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    got = _trials(folder)
    assert {t["status"] for t in got.values()} == {"finished"}
    assert got.keys() == uninterrupted_study.keys()
    for key, want in uninterrupted_study.items():  # every logged loss and the final evaluation as uninterrupted
        assert got[key]["loss"] == want["loss"], key
        assert got[key]["fd"] == want["fd"], key


def test_in_a_study_worker_sigint_asks_to_stop_and_ray_cancel_still_interrupts_the_task(tmp_path, monkeypatch):
    """Ray cancels a running task by simulating a SIGINT in its worker (`ray.cancel`: `_thread.interrupt_main`);
    the SIGINT handler of a study's workers (`srdit.stop.install_in_worker`) must pass that on as a
    KeyboardInterrupt and take only a real SIGINT as a stop request. The study's own Ray (its worker setup hook),
    one CPU: one worker runs the tasks in turn, a cancellation before and after a real signal."""
    import ray

    from srdit.runtime.driver import _ray_started

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def wait_then_say_why(started: str, interrupted: str) -> str | None:
        """A Ray task (defined here, so that Ray sends it by value): writes its worker's pid to `started`, waits
        until its process is asked to stop (`srdit.stop`) and returns why; notes a KeyboardInterrupt (Ray's
        cancellation) in `interrupted`."""
        from srdit import stop

        stop.reset()
        Path(started).write_text(str(os.getpid()))
        t = time.monotonic()
        try:
            while time.monotonic() - t < 120 and stop.requested() is None:
                time.sleep(0.02)
        except KeyboardInterrupt:
            Path(interrupted).write_text("KeyboardInterrupt")
            raise
        return stop.requested()

    task = ray.remote(max_retries=0)(wait_then_say_why)

    def start(name: str):
        started, interrupted = tmp_path / f"{name}.pid", tmp_path / f"{name}.interrupted"
        ref = task.remote(str(started), str(interrupted))
        deadline = time.time() + 300
        while time.time() < deadline and not (started.is_file() and started.read_text()):
            if ray.wait([ref], timeout=0.05)[0]:  # ended before it started waiting: its error
                raise AssertionError(f"the task ended at once: {ray.get(ref)}")
        return ref, int(started.read_text()), interrupted

    def cancelled(name: str) -> None:
        ref, _, interrupted = start(name)
        ray.cancel(ref)
        with pytest.raises(ray.exceptions.TaskCancelledError):
            ray.get(ref, timeout=300)
        assert interrupted.read_text() == "KeyboardInterrupt"  # interrupted mid-wait, as without srdit

    # Ray's processes inherit this process's SIGINT disposition: a foreground job's default, as a terminal gives
    # it (pytest started in the background has SIGINT ignored, and so would every worker: no cancellation at all)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _ray_started(1, lambda line: None):
            cancelled("cancelled")
            ref, pid, interrupted = start("signalled")
            os.kill(pid, signal.SIGINT)
            assert ray.get(ref, timeout=300) == "SIGINT"  # a stop request: the task ends on its own, not cancelled
            assert not interrupted.exists()
            cancelled("cancelled_after_a_signal")
    finally:
        signal.signal(signal.SIGINT, previous)
