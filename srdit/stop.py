"""Stopping a run on request: a signal (SIGTERM, SIGINT, SIGHUP) or a stop file asks the trainer to stop; it
writes a checkpoint at the step it is on and raises `Interrupted`, and a rerun resumes from there.

Schedulers end jobs with SIGTERM and a grace period before SIGKILL (Slurm's KillWait and `--signal`, Kubernetes'
terminationGracePeriodSeconds: 30 s by default); a terminal sends SIGINT, a closed session SIGHUP. All three mean
"stop soon, keep the work". A second signal, or the grace period running out, stops at once (KeyboardInterrupt:
the last periodic checkpoint is what a rerun resumes from).

Processes that no signal reaches directly learn of a stop from a file (`watch`): the trial workers of a study poll
the study's stop file, which the driver writes when it is told to stop. Polling is rate-limited (a stat every
`POLL_S` at most), so the check costs nothing per step.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")
"The signals that ask a run to stop and keep its work."
DEFAULT_GRACE_S = 25.0
"""Seconds between the first signal and the hard stop: inside Kubernetes' default 30 s grace period and Slurm's
default KillWait (30 s); `SRDIT_STOP_GRACE_S` overrides it."""
POLL_S = 0.5
"The stop file is looked at most this often."


class Interrupted(Exception):
    """A run stopped on request (`requested`): its checkpoint holds `step`, and a rerun resumes from it."""

    def __init__(self, why: str, step: int, checkpoint: str | None):
        self.why, self.step, self.checkpoint = why, step, checkpoint
        where = f"checkpoint at step {step} in {checkpoint}" if checkpoint else f"at step {step}"
        super().__init__(f"interrupted by {why}: {where}")


_why: str | None = None
_watched: list[Path] = []
_last_poll = 0.0
_lock = threading.Lock()


def request(why: str) -> None:
    """Ask the runs of this process to stop (`why`: the signal's or the stop file's name)."""
    global _why
    _why = _why or why


def reset() -> None:
    """Forget a request and the watched files (a process that runs several trials, one after another)."""
    global _why, _last_poll
    with _lock:
        _why, _last_poll = None, 0.0
        _watched.clear()


def watch(path: str | Path) -> None:
    """Treat the existence of `path` as a stop request (its text, if any, says why)."""
    with _lock:
        _watched.append(Path(path))


def requested() -> str | None:
    """Why this process was asked to stop, or None. Looks at the watched files at most every `POLL_S`."""
    global _last_poll
    if _why is not None or not _watched:
        return _why
    now = time.monotonic()
    if now - _last_poll >= POLL_S:
        _last_poll = now
        for p in list(_watched):
            try:
                request(p.read_text().strip() or p.name)
                break
            except OSError:
                continue
    return _why


def grace_s() -> float:
    try:
        return max(0.0, float(os.environ.get("SRDIT_STOP_GRACE_S", DEFAULT_GRACE_S)))
    except ValueError:
        return DEFAULT_GRACE_S


@contextlib.contextmanager
def on_signals(on_first=None) -> Iterator[None]:
    """For the block (main thread only; elsewhere it does nothing): the first SIGTERM / SIGINT / SIGHUP requests a
    stop (`request`) and calls `on_first(signal name)`; a second one, or `grace_s()` seconds without the block
    ending, raises KeyboardInterrupt in the main thread. The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    timer: list[threading.Timer] = []

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if _why is not None or timer:
            raise KeyboardInterrupt
        request(name)
        t = threading.Timer(grace_s(), _thread.interrupt_main)
        t.daemon = True
        t.start()
        timer.append(t)
        if on_first is not None:
            on_first(name)

    previous = {}
    for name in SIGNALS:
        sig = getattr(signal, name)
        if signal.getsignal(sig) is signal.SIG_IGN:  # nohup's SIGHUP, a background job's SIGINT: left ignored
            continue
        try:
            previous[sig] = signal.signal(sig, handler)
        except (OSError, ValueError):
            continue
    try:
        yield
    finally:
        for t in timer:
            t.cancel()
        for sig, h in previous.items():
            signal.signal(sig, h)


_interrupt_main = _thread.interrupt_main
"Python's `_thread.interrupt_main`, which Ray's task cancellation calls (see `install_in_worker`)."
_cancelling = False
"True from Ray's `_thread.interrupt_main(SIGINT)` until the SIGINT handler it triggers has run."


def _interrupt_main_marked(signum: int = signal.SIGINT, /) -> None:
    """`_thread.interrupt_main` in a trial worker: marks the SIGINT it simulates (Ray's task cancellation)."""
    global _cancelling
    if signum == signal.SIGINT:
        _cancelling = True
    _interrupt_main(signum)


def _on_sigint_in_worker(signum, frame) -> None:
    global _cancelling
    if _cancelling:  # simulated (Ray's cancellation): what Python's default handler does
        _cancelling = False
        raise KeyboardInterrupt
    request("SIGINT")


def install_in_worker() -> None:
    """Ray's `worker_process_setup_hook` for a study's workers (in each worker's main thread, at its start):
    SIGINT and SIGHUP to the worker process ask the trial it runs to stop (`request`): the trial writes a
    checkpoint at its current step and ends `interrupted`. SIGTERM is Ray's exit
    (`srdit.runtime.worker.trial_stop` hooks it).

    Ray's task cancellation (`ray.cancel`) stays as it is: Ray's `kill_main_task` (Ray 2.x, `_raylet.pyx`)
    calls `_thread.interrupt_main()`, looked up at each call, which runs the SIGINT handler in the main thread.
    That name is wrapped here to mark the call, and the handler raises KeyboardInterrupt for it as Python's
    default handler does (Ray turns it into `TaskCancelledError`); so does any other simulated SIGINT. Only a
    SIGINT from the operating system is a stop request; one arriving in the same instant as a cancellation is
    taken as the cancellation.

    Ray starts its processes with SIGINT blocked, so that a terminal's Ctrl-C reaches the driver only; each
    worker is its own process group, which a terminal's Ctrl-C does not reach either, so unblocking SIGINT in
    the worker lets through only a SIGINT sent to it on purpose (`kill -INT`, Slurm signalling a job step's
    processes). A signal the worker inherited as ignored (a driver started as a background job has SIGINT
    ignored, nohup SIGHUP) stays ignored, as in the driver and `srdit train` (`on_signals`); Ray's cancellation
    of a running task is then as without srdit."""
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, lambda signum, frame: request("SIGHUP"))
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return
    _thread.interrupt_main = _interrupt_main_marked
    signal.signal(signal.SIGINT, _on_sigint_in_worker)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def exit_code(why: str | None) -> int:
    """The shell's exit status of a process ended by the signal `why` (128 + its number; 130 otherwise)."""
    sig = getattr(signal, why, None) if why else None
    return 128 + int(sig) if sig is not None else 130


__all__ = [
    "DEFAULT_GRACE_S",
    "Interrupted",
    "SIGNALS",
    "exit_code",
    "grace_s",
    "install_in_worker",
    "on_signals",
    "request",
    "requested",
    "reset",
    "watch",
]
