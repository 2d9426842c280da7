"""What `srdit study run` prints while a study runs: srdit's own lines on the console, everything else in a log
file.

- `library_output_to(path)`: for the body of the block the process's stdout and stderr (file descriptors 1 and 2,
  inherited by every process it starts) go to a log file, so that MLflow's lines, Ray's warnings, state dumps and
  tracebacks, and the trial workers' output that Ray forwards to the driver (torch's warnings among them) land
  there; the console it yields is the terminal (or pipe) the command was started with.
- `StudyView`: srdit's lines on that console. An event (a trial started, ended, failed; the study's own lines) is
  one line, written whole. On a terminal a live view (rich) stays below the event lines: trials done / running / to
  run, an ETA, and per running trial its step / total, loss and speed. Off a terminal (a pipe, nohup, a batch job)
  a plain summary line every `summary_every` seconds instead.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

SUMMARY_EVERY_S = 60.0
"Off a terminal: seconds between two summary lines of a running study (`srdit study run --summary-every`)."


@contextlib.contextmanager
def library_output_to(path: Path, header: str = "") -> Iterator[IO[str]]:
    """Send file descriptors 1 and 2 (this process's stdout and stderr, and those of every process it starts:
    Ray's, whose workers' output Ray forwards to this process's stdout / stderr) to the file `path` (appended) for
    the body of the block; yields a text stream on the original stdout for srdit's own lines. Python-level
    `sys.stdout` / `sys.stderr` keep their objects (libraries hold them) and now write to the file. `header`: a
    line written to the file first (what wrote it, and when)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's prefix of forwarded worker lines, without colour codes
    saved = os.dup(1), os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if header:
        os.write(log, (header.rstrip("\n") + "\n").encode())
    console = open(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        yield console
    finally:
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log):
            os.close(fd)
        console.close()


@dataclass
class _Running:
    """A running Tune trial as the view shows it."""

    key: str
    members: int
    "Study trials it stands for (a shared training: every member)."
    total: int
    "Training steps of the trial (0: unknown)."
    started: float
    step: int = 0
    loss: float | None = None
    steps_per_s: float | None = None


@dataclass
class StudyView:
    """srdit's lines while a study runs: `event(line)` for each event; the driver (`srdit.runtime.driver`) and its
    Tune callback (`tune_callback`) feed the live state (`begin`, `started`, `result`, `ended`, `tick`).

    `terminal`: a live view (rich) below the event lines; otherwise a plain summary line every `summary_every`
    seconds while trials run. `assumed_steps_per_s`: the speed the ETA assumes until a trial has reported
    (the plan's assumption, `srdit.study.designs.ASSUMED_STEPS_PER_S`)."""

    out: IO[str]
    terminal: bool
    summary_every: float = SUMMARY_EVERY_S
    assumed_steps_per_s: float | None = None
    "None: `srdit.study.designs.ASSUMED_STEPS_PER_S`."
    study: str = ""
    total: int = 0
    "Study trials (search: the budget)."
    done: int = 0
    running: dict[str, _Running] = field(default_factory=dict)
    durations: list[float] = field(default_factory=list)
    "Wall seconds of each trial that ended in this invocation (started here)."
    steps_of_trial: int = 0
    "Training steps of a trial of the study (the base config's; shown when a trial's own is unknown)."
    slots: int = 1
    "How many trials the ETA assumes side by side until some have run (the planned concurrency)."
    seen: int = 0
    "The most trials seen running at once: how many run side by side, once known."
    t0: float = field(default_factory=time.monotonic)
    last_summary: float = field(default_factory=time.monotonic)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    "Guards the state (the live view renders it from rich's refresh thread)."
    _print_lock: threading.Lock = field(default_factory=threading.Lock)
    "One line at a time; never held with `_lock` (rich's refresh thread takes its own lock, then `_lock`)."
    _live: object | None = None
    begun: bool = False
    "Whether the study's counts are known (`begin`, before Ray starts): until then the view says it is starting."

    def __reduce__(self):
        # Tune pickles its callbacks with the experiment's state (for a restore srdit never does): the copy prints
        # to this process's stdout
        return _detached, ()

    # -- lines ---------------------------------------------------------------------------------------------------

    def event(self, line: str) -> None:
        """One of srdit's lines, written whole (above the live view on a terminal)."""
        with self._print_lock:
            if self._live is not None:
                from rich.text import Text

                self._live.console.print(Text(line), soft_wrap=True)
            else:
                self.out.write(line + "\n")
                self.out.flush()

    # -- state, from the driver's Tune callback -----------------------------------------------------------------

    def begin(self, study: str, total: int, done: int, steps: int) -> None:
        with self._lock:
            self.study, self.total, self.done, self.steps_of_trial = study, total, done, steps
            self.begun, self.last_summary = True, time.monotonic()

    def started(self, tune_id: str, key: str, members: int = 1, steps: int = 0) -> None:
        with self._lock:
            self.running[tune_id] = _Running(key, members, steps or self.steps_of_trial, time.monotonic())
            self.seen = max(self.seen, len(self.running))

    def result(self, tune_id: str, result: dict) -> None:
        """An intermediate report of a running trial (`tune.report`: step, loss, steps_per_s, ...)."""
        with self._lock:
            r = self.running.get(tune_id)
            if r is None:
                return
            if isinstance(result.get("trial_key"), str) and result.get("status"):
                return  # the trial's final result: `ended` follows
            step = result.get("step")
            if isinstance(step, (int, float)):
                r.step = max(r.step, int(step))
            if isinstance(result.get("loss"), (int, float)):
                r.loss = float(result["loss"])
            if isinstance(result.get("steps_per_s"), (int, float)):
                r.steps_per_s = float(result["steps_per_s"])

    def ended(self, tune_id: str, done: int) -> None:
        """A Tune trial ended (finished, failed, stopped); `done`: study trials done so far."""
        with self._lock:
            r = self.running.pop(tune_id, None)
            if r is not None:
                self.durations.append(time.monotonic() - r.started)
            self.done = done

    def tick(self) -> None:
        """Called often by the driver's loop: off a terminal, the summary line when it is due."""
        if self.terminal or not self.running:
            return
        now = time.monotonic()
        if now - self.last_summary >= self.summary_every:
            self.last_summary = now
            self.event(self.summary())

    # -- figures ---------------------------------------------------------------------------------------------

    def assumed_speed(self) -> float:
        from srdit.study.designs import ASSUMED_STEPS_PER_S

        return self.assumed_steps_per_s or ASSUMED_STEPS_PER_S

    def eta_s(self) -> tuple[float, bool] | None:
        """(seconds left, measured) for the trials left: each running trial's remaining steps at its speed, and
        the trials to run at the time a trial takes (the median of those that ended, else measured from the
        running trials' progress, else the plan's assumed speed; `measured` False), as many at a time as ran at once
        so far (before any: `slots`). Trials to run are counted as study trials (a shared training's members each
        count as one: an overestimate). None when the trial's steps are unknown."""
        now = time.monotonic()
        with self._lock:
            rates = [r.step / (now - r.started) for r in self.running.values() if r.step and now > r.started]
            steps = self.steps_of_trial or max((r.total for r in self.running.values()), default=0)
            if self.durations:
                per_trial, measured = statistics.median(self.durations), True
            elif rates and steps:
                per_trial, measured = steps / statistics.mean(rates), True
            elif steps:
                per_trial, measured = steps / self.assumed_speed(), False
            else:
                return None
            left = 0.0
            for r in self.running.values():
                if r.step and r.total:
                    left += max(0.0, r.total - r.step) * (now - r.started) / r.step
                else:
                    left += max(0.0, per_trial - (now - r.started))
            members = sum(r.members for r in self.running.values())
            to_run = max(0, self.total - self.done - members)
            return (left + to_run * per_trial) / max(1, self.seen or self.slots), measured

    def counts(self) -> tuple[int, int, int]:
        """(done, running, to run) in study trials."""
        with self._lock:
            running = sum(r.members for r in self.running.values())
            return self.done, running, max(0, self.total - self.done - running)

    def eta_text(self) -> str:
        eta = self.eta_s()
        if eta is None:
            return "ETA unknown"
        s, measured = eta
        return f"ETA {duration(s)}" + ("" if measured else f" (assuming {self.assumed_speed():g} steps/s)")

    def summary(self) -> str:
        """The plain summary line: `study S: 3/16 done, 2 running, 11 to run; 1m02s elapsed, ETA 4m10s | key
        step 120/240 loss 0.4123 35.1 it/s | ...`."""
        done, running, to_run = self.counts()
        head = (
            f"study {self.study}: {done}/{self.total} done, {running} running, {to_run} to run; "
            f"{duration(time.monotonic() - self.t0)} elapsed, {self.eta_text()}"
        )
        with self._lock:
            parts = [_trial_text(r) for r in self.running.values()]
        return " | ".join([head, *parts])

    # -- the live view ---------------------------------------------------------------------------------------

    def _render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        elapsed = f"{duration(time.monotonic() - self.t0)} elapsed"
        head = Text(f"study {self.study}", style="bold")
        if not self.begun:
            return head.append(f" · starting (the store, the preflight) · {elapsed}", style="not bold")
        done, running, to_run = self.counts()
        head.append(f" · {done}/{self.total} done · {running} running · {to_run} to run · {elapsed} · ", "not bold")
        head.append(self.eta_text(), style="bold cyan")
        table = Table.grid(padding=(0, 2))
        with self._lock:
            rows = list(self.running.values())
        for r in rows:
            table.add_row(Text("  " + r.key), *_trial_cells(r))
        return Group(head, table)

    @contextlib.contextmanager
    def live(self) -> Iterator[StudyView]:
        """The live view for the body of the block (on a terminal; otherwise nothing changes)."""
        if not self.terminal:
            yield self
            return
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.out, force_terminal=True)
        view = self

        class _Now:
            def __rich__(self):
                # the size of the terminal the console writes to (rich asks file descriptors 0-2: 1 and 2 are
                # the log file now, 0 may be anything)
                with contextlib.suppress(OSError, ValueError):
                    console.size = os.get_terminal_size(view.out.fileno())
                return view._render()

        # library output goes to the log file (`library_output_to`): the live view must not capture sys.stdout
        live = Live(
            _Now(), console=console, refresh_per_second=2, transient=True, redirect_stdout=False, redirect_stderr=False
        )
        with live as lv:
            self._live = lv
            try:
                yield self
            finally:
                self._live = None


def tune_callback(view: StudyView, progress, jobs: dict | None = None):
    """The Ray Tune callback that feeds `view` each trial's start, intermediate reports (`tune.report`: step,
    loss, steps_per_s) and end, and ticks it at every step of Tune's loop. `progress`: the driver's progress
    callback (`srdit.runtime.driver._progress_callback`), listed before this one: its `n` is the count of study
    trials done. `jobs`: the grid's jobs by key (a Tune trial's config names its job), for the trial's key, how
    many study trials it stands for and its steps; a search sample is shown by its Tune name. Off a terminal a
    trial's start is an event line."""
    from ray import tune

    from srdit import stop
    from srdit.runtime.jobs import TrainingJob

    jobs = jobs or {}

    class Live(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            job = jobs.get(trial.config.get("job"))
            key = job.key if job is not None else f"search_{trial.trial_id}"
            members = len(job.todo()) if job is not None else 1
            steps = job.members[0].config.train.steps if isinstance(job, TrainingJob) else 0
            view.started(trial.trial_id, key, members, steps)
            if not view.terminal and not stop.requested():  # once told to stop, trials start only to end at once
                shared = f", training shared by {members} trials" if members > 1 else ""
                view.event(f"  {key}: started" + (f" ({steps} steps{shared})" if steps else ""))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            view.result(trial.trial_id, result)

        def on_step_end(self, iteration, trials, **info):
            view.tick()

        def on_trial_complete(self, iteration, trials, trial, **info):
            view.ended(trial.trial_id, progress.n)

        def on_trial_error(self, iteration, trials, trial, **info):
            view.ended(trial.trial_id, progress.n)

    return Live()


def _detached() -> StudyView:
    return StudyView(sys.stdout, False)


def _trial_cells(r: _Running) -> list:
    from rich.text import Text

    total = f"/{r.total}" if r.total else ""
    return [
        Text(f"step {r.step}{total}"),
        Text(f"loss {r.loss:.4f}" if r.loss is not None else "loss -"),
        Text(f"{r.steps_per_s:.1f} it/s" if r.steps_per_s is not None else "- it/s"),
    ]


def _trial_text(r: _Running) -> str:
    total = f"/{r.total}" if r.total else ""
    loss = f" loss {r.loss:.4f}" if r.loss is not None else ""
    speed = f" {r.steps_per_s:.1f} it/s" if r.steps_per_s is not None else ""
    return f"{r.key} step {r.step}{total}{loss}{speed}"


def duration(s: float) -> str:
    """Seconds as `42s`, `4m10s`, `3h05m`."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
