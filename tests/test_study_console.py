"""What a researcher sees while a study or a training runs: `srdit study run` writes srdit's own lines only (a
live view on a terminal, plain event and summary lines off it) and everything the libraries print into a log file
of the state folder; `srdit train` keeps its figures visible on a terminal and prints plain lines at logging steps
off it."""

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _study(tmp_path: Path, steps: int) -> Path:
    """Two trials (rmsnorm off / on, one seed) of `steps` steps of the debug SiT on digits."""
    path = tmp_path / "live.yaml"
    data = {
        "name": "live",
        "base": {
            "train": {"steps": steps, "batch_size": 16, "log_every": 10, "ckpt_every": steps},
            "eval": {"n_samples": 50, "batch_size": 50},
            "sample": {"sampler": "euler", "steps": 2},
        },
        "techniques": ["rmsnorm"],
        "seeds": [0],
        "metrics": {"primary": "fd", "direction": "min", "others": {"images_per_s": "max"}},
        "resources": {"cpus": 1, "gpus": 0},
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------------------
# the log file
# ---------------------------------------------------------------------------------------------------------------


def test_library_output_goes_to_the_log_file_and_srdit_lines_to_the_console(tmp_path):
    """Every way a library prints (Python's stdout / stderr, logging, warnings, a child process, a raw write to
    file descriptor 2) lands in the log file; the console gets srdit's lines only, and the streams are back after
    the block."""
    log = tmp_path / "logs" / "run.log"
    code = textwrap.dedent(f"""
        import logging, os, subprocess, sys, warnings
        from pathlib import Path
        from srdit.runtime.console import library_output_to
        logging.basicConfig()
        with library_output_to(Path({str(log)!r}), "a header") as console:
            console.write("srdit: first\\n")
            print("library stdout")
            print("library stderr", file=sys.stderr)
            logging.getLogger("mlflow").warning("library logging")
            warnings.warn("library warning", FutureWarning)
            subprocess.run(["echo", "child process"])
            os.write(2, b"raw fd 2\\n")
            console.write("srdit: second\\n")
        print("after the block")
        print("stderr after the block", file=sys.stderr)
    """)
    run = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "srdit: first\nsrdit: second\nafter the block\n"
    assert run.stderr == "stderr after the block\n"
    text = log.read_text()
    assert text.startswith("a header\n")
    for line in ("library stdout", "library stderr", "library logging", "FutureWarning: library warning"):
        assert line in text
    assert "child process" in text and "raw fd 2" in text and "srdit:" not in text


def test_a_state_folder_that_cannot_hold_the_log_is_one_line(tmp_path, capsys):
    from srdit.commands.study import main

    (tmp_path / "a_file").write_text("")
    state = tmp_path / "a_file" / "state"
    assert main(["run", str(_study(tmp_path, 10)), "--state", str(state)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"srdit study run: error: --state {state}: cannot make the folder {state / 'logs' / 'live'} (Not a directory)\n"
    )


# ---------------------------------------------------------------------------------------------------------------
# the view's figures
# ---------------------------------------------------------------------------------------------------------------


def _view(**kw):
    from srdit.runtime.console import StudyView

    out = io.StringIO()
    return StudyView(out, terminal=False, **kw), out


def test_counts_summary_and_eta_from_the_running_trials():
    view, out = _view(summary_every=0)
    view.begin("s", total=5, done=1, steps=100)
    view.started("t1", "01-s0-aa", members=1, steps=100)
    view.started("t2", "10-s0-bb", members=2, steps=100)  # a training shared by two trials
    now = time.monotonic()
    view.running["t1"].started = now - 10.0
    view.running["t2"].started = now - 40.0
    view.result("t1", {"step": 50, "loss": 0.5, "steps_per_s": 9.5})
    view.result("t2", {"step": 80, "loss": 0.25, "steps_per_s": 2.5})
    assert view.counts() == (1, 3, 1)
    # t1: 50 steps in 10 s -> 5 steps/s, 50 left = 10 s; t2: 2 steps/s, 20 left = 10 s; a trial to run takes
    # 100 steps at the mean speed 3.5 steps/s; two trials side by side
    eta, measured = view.eta_s()
    assert measured and eta == pytest.approx((10 + 10 + 100 / 3.5) / 2, abs=0.2)
    view.tick()
    (line,) = out.getvalue().splitlines()
    assert line.startswith("study s: 1/5 done, 3 running, 1 to run; ")
    assert line.endswith(
        "ETA 24s | 01-s0-aa step 50/100 loss 0.5000 9.5 it/s | 10-s0-bb step 80/100 loss 0.2500 2.5 it/s"
    )
    view.ended("t2", done=3)
    assert view.counts() == (3, 1, 1) and view.durations == [pytest.approx(40.0, abs=0.5)]
    eta, _ = view.eta_s()  # a trial to run now takes what the ended one took
    assert eta == pytest.approx((10 + 40) / 2, abs=0.2)


def test_eta_before_any_report_assumes_the_plans_speed_and_says_so():
    from srdit.study.designs import ASSUMED_STEPS_PER_S

    view, out = _view(summary_every=3600)
    view.begin("s", total=3, done=0, steps=70)
    view.started("t1", "0-s0-aa", steps=70)
    eta, measured = view.eta_s()
    assert not measured and eta == pytest.approx(3 * 70 / ASSUMED_STEPS_PER_S, abs=0.2)
    assert view.eta_text().endswith(f"(assuming {ASSUMED_STEPS_PER_S:g} steps/s)")
    view.tick()
    assert out.getvalue() == ""  # the next summary is not due yet
    view.event("[1/3] 0-s0-aa: finished")
    assert out.getvalue() == "[1/3] 0-s0-aa: finished\n"


def test_live_view_renders_counts_eta_and_each_running_trial():
    from rich.console import Console

    from srdit.runtime.console import StudyView

    view = StudyView(io.StringIO(), terminal=True, study="s")
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(view._render())
    assert console.export_text().startswith("study s · starting")
    view.begin("s", total=4, done=0, steps=200)
    view.started("t1", "01-s0-aa", steps=200)
    view.result("t1", {"step": 40, "loss": 0.75, "steps_per_s": 12.25})
    console.print(view._render())
    text = console.export_text()
    assert "study s · 0/4 done · 1 running · 3 to run · " in text and "ETA " in text
    assert re.search(r"01-s0-aa\s+step 40/200\s+loss 0\.7500\s+12\.2 it/s", text), text


def test_tune_callback_feeds_the_view_and_prints_starts_until_a_stop_is_requested():
    """Off a terminal each trial's start is a line, with its steps and how many trials a shared training stands
    for; once the study is told to stop, Tune starts the remaining trials only for them to end at once: no line."""
    from types import SimpleNamespace

    from srdit import stop
    from srdit.runtime.console import tune_callback
    from srdit.runtime.jobs import TrainingJob

    view, out = _view()
    view.begin("s", total=4, done=0, steps=50)
    progress = SimpleNamespace(n=0)
    config = SimpleNamespace(train=SimpleNamespace(steps=50))
    members = [SimpleNamespace(key=f"0{i}-s0-aa", done=False, config=config) for i in (1, 2)]
    shared = TrainingJob(tuple(members), "g")
    cb = tune_callback(view, progress, {shared.key: shared})
    trial = SimpleNamespace(trial_id="t1", config={"job": shared.key})
    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, {"step": 10, "loss": 1.5, "steps_per_s": 4.0})
    assert view.counts() == (0, 2, 2) and view.running["t1"].step == 10
    progress.n = 2  # the driver's progress callback counted the training's two trials
    cb.on_trial_complete(0, [], trial)
    assert view.counts() == (2, 0, 2)
    cb.on_trial_start(0, [], SimpleNamespace(trial_id="t2", config={}))  # a search sample
    try:
        stop.request("SIGTERM")
        cb.on_trial_start(0, [], SimpleNamespace(trial_id="t3", config={}))
    finally:
        stop.reset()
    assert out.getvalue().splitlines() == [
        "  01-s0-aa: started (50 steps, training shared by 2 trials)",
        "  search_t2: started",
    ]


def test_the_view_pickles_as_tune_pickles_its_callbacks():
    import cloudpickle

    view, _ = _view()
    back = cloudpickle.loads(cloudpickle.dumps(view.event))  # Tune pickles the callbacks, which print through it
    assert callable(back)


# ---------------------------------------------------------------------------------------------------------------
# srdit train
# ---------------------------------------------------------------------------------------------------------------


def test_train_piped_prints_a_plain_line_at_each_logging_step(tmp_path):
    args = ["train.steps=20", "train.log_every=5", "train.batch_size=8", "eval.n_samples=20", "eval.batch_size=20"]
    run = subprocess.run(
        [sys.executable, "-m", "srdit", "train", *args, "--out", str(tmp_path / "run")],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert [int(re.match(r"train step (\d+)/20  loss \d\.\d{4}  [\d.]+ it/s  \d+ img/s", s)[1]) for s in lines] == [
        5,
        10,
        15,
        20,
    ]
    assert "ETA" in lines[0] and "ETA" not in lines[-1]
    assert run.stdout.startswith('{"status": "finished"') and len(run.stdout.splitlines()) == 1


def test_train_bar_keeps_the_figures_of_the_last_logging_step():
    from srdit.train import _Progress

    bar = _Progress(total=30, start=0, enabled=True)
    try:
        bar.update(10, "loss 1.2345  5.0 it/s  80 img/s")
        bar.update(11)
        bar.update(12)
        assert bar.bar.tasks[0].fields["info"] == "loss 1.2345  5.0 it/s  80 img/s"
        assert bar.bar.tasks[0].completed == 12
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------------------------
# srdit study run, end to end (real local Ray, real SQLite MLflow store)
# ---------------------------------------------------------------------------------------------------------------

SRDIT_LINE = re.compile(
    r"^(log: library output \(MLflow, Ray, trial workers\) goes to .+\.log"
    r"|Ray: a private local Ray on 127\.0\.0\.1 .*"
    r"|study live: .*"
    r"|  \d-s0-[0-9a-f]+: started \(\d+ steps\)"
    r"|\[\d/2\] \d-s0-[0-9a-f]+: finished  fd .*"
    r"|MLflow: sqlite:.*|report: `srdit report .*)$"
)


@pytest.mark.slow
def test_study_run_piped_prints_srdits_lines_only_and_logs_the_libraries(tmp_path):
    """Python's warnings on (PYTHONWARNINGS=always, as a user debugging might set it): MLflow's store warns in the
    driver and in every trial worker, and Ray forwards the workers' output to the driver. None of it reaches the
    console, which holds srdit's lines only: events (trial start / end) and a summary line every second."""
    state = tmp_path / "state"
    run = subprocess.run(
        [sys.executable, "-m", "srdit", "study", "run", str(_study(tmp_path, 40)), "--state", str(state)]
        + ["--num-cpus", "2", "--summary-every", "1"],
        cwd=tmp_path,
        env={**ENV, "PYTHONWARNINGS": "always"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr == ""
    lines = run.stdout.splitlines()
    assert [s for s in lines if not SRDIT_LINE.match(s)] == []
    (log,) = (state / "logs" / "live").glob("run-*.log")
    assert lines[0] == f"log: library output (MLflow, Ray, trial workers) goes to {log}"
    assert sum(": started (40 steps)" in s for s in lines) == 2
    assert sum(re.match(r"\[\d/2\] ", s) is not None for s in lines) == 2
    summaries = [s for s in lines if re.match(r"study live: \d/2 done, \d running, \d to run; \d+s elapsed, ETA", s)]
    assert summaries, lines
    text = log.read_text()
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d .* srdit study run \S+live\.yaml \(pid \d+\): ", text), text[:300]
    # MLflow's warnings, from the driver and (forwarded by Ray, with its prefix) from a trial worker
    assert re.search(r"^\S*mlflow\S*: \w*Warning: ", text, re.M), text[:3000]
    assert re.search(r"^\(trainable pid=\d+\) \S*mlflow\S*: \w*Warning: ", text, re.M), text[:3000]
    assert "\x1b[" not in text  # Ray's prefix without colour codes


@pytest.mark.slow
def test_study_run_on_a_terminal_shows_the_live_view(tmp_path):
    """`srdit study run` in a tmux pane (a real terminal, on a tmux server of its own): the live view shows the
    trials done / running / to run, an ETA, and each running trial's step / total, loss and speed; it is gone at
    the end, where the event lines and srdit's closing lines stay."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux)")
    sock = f"srdit-test-{os.getpid()}"
    tmux = ["tmux", "-L", sock]
    state = tmp_path / "state"
    env = " ".join(f"{k}={shlex.quote(ENV[k])}" for k in ("PYTHONPATH", "OMP_NUM_THREADS", "RAY_AUTH_MODE") if k in ENV)
    cmd = (
        f"cd {shlex.quote(str(tmp_path))} && env {env} {shlex.quote(sys.executable)} -m srdit study run "
        f"{shlex.quote(str(_study(tmp_path, 200)))} --state {shlex.quote(str(state))} --num-cpus 2; echo EXIT=$?"
    )
    frames: list[tuple[float, str]] = []
    t0 = time.monotonic()
    subprocess.run([*tmux, "new-session", "-d", "-x", "150", "-y", "30", cmd], check=True, timeout=30)
    subprocess.run([*tmux, "set-option", "-t", "0", "remain-on-exit", "on"], timeout=30)

    def pane() -> str:
        out = subprocess.run([*tmux, "capture-pane", "-p", "-t", "0"], capture_output=True, text=True, timeout=30)
        return out.stdout

    try:
        live = None
        while time.monotonic() - t0 < 480:
            text = pane()
            frames.append((time.monotonic() - t0, text))
            if live is None and re.search(r"\d+s elapsed · ETA \d", text) and re.search(r"step \d+/200", text):
                live = text
            if "EXIT=" in text:
                break
            time.sleep(0.5)
        final = pane()
    finally:
        subprocess.run([*tmux, "kill-server"], timeout=30)
    first = next((f"{t:.0f} s after start:\n{f}" for t, f in frames if "ETA" in f), "no frame with an ETA")
    print(first)  # what the user saw (pytest -s shows it)
    assert live is not None, frames[-1][1]
    assert re.search(r"study live · \d/2 done · \d running · \d to run · \d+s elapsed · ETA ", live), live
    assert re.search(r"\d-s0-[0-9a-f]+\s+step \d+/200\s+loss (\d\.\d{4}|-)\s+([\d.]+|-) it/s", live), live
    assert "EXIT=0" in final, final
    assert "ETA" not in final and "[2/2] " in final and "study live: 2/2 trials done (2 finished)" in final
    assert "Warning" not in final and "pid=" not in final
