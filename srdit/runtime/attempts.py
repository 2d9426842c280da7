"""The attempts of a trial: each time its training starts (the first time, after Ray restarted it because its
process, a worker or its node was lost, after a data-parallel worker group failed, after a rerun of an interrupted
study), and what ended each one.

Kept in the trial folder (`ATTEMPTS`, one JSON line per event, appended: `{"event": "start", "attempt": n, "t":
unix s, "host": name}` and `{"event": "end", "attempt": n, "t": unix s, "ended_by": text}`) so that they survive
the process, the driver and reruns; recorded on the trial's child run as tags (`tags`), and read by the driver to
print one line when a trial starts again (`restart_lines`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

ATTEMPTS = "trial_attempts.jsonl"
LOST = "lost without a record (its process, a worker or its node ended)"
"What ended an attempt that never recorded its end and that no one else recorded either."
ATTEMPTS_TAG = "attempts"
"Tag: how many times the trial's training started."
WALL_TAG = "attempts.wall_s"
"Tag: seconds of wall time over all attempts (each from its start to its end or, when lost, its last write)."


def ended_by_tag(n: int) -> str:
    """Tag: what ended attempt `n` (1-based): a trial status (finished, interrupted, ...) or the failure."""
    return f"attempt.{n}.ended_by"


@dataclass(frozen=True)
class Attempt:
    n: int
    start: float
    "Unix seconds."
    end: float | None
    "Unix seconds; None while it runs (or when it was lost and nobody recorded it yet)."
    ended_by: str
    host: str


def read(folder: str | Path) -> list[Attempt]:
    """The attempts recorded in a trial folder, in order (none when the trial never started). A torn last line (a
    process killed while writing it) is skipped."""
    path = Path(folder) / ATTEMPTS
    if not path.is_file():
        return []
    starts: dict[int, dict] = {}
    ends: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        (starts if e.get("event") == "start" else ends)[int(e["attempt"])] = e
    return [
        Attempt(n, s["t"], ends.get(n, {}).get("t"), ends.get(n, {}).get("ended_by", ""), s.get("host", ""))
        for n, s in sorted(starts.items())
    ]


def _append(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ATTEMPTS, "a+b") as f:
        f.seek(0, os.SEEK_END)
        torn = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
        f.write((("\n" if torn else "") + json.dumps(record) + "\n").encode())  # after a torn line: its own


def _last_write(folder: Path, since: float) -> float:
    """When the trial folder was last written (what its files' modification times say), at least `since`: the
    end of an attempt that was lost without a word."""
    times = [since]
    for p in folder.iterdir():
        if p.name != ATTEMPTS and not p.name.startswith("."):
            try:
                times.append(p.stat().st_mtime)
            except OSError:  # removed meanwhile
                pass
    return max(times)


def end(folder: str | Path, ended_by: str, at: float | None = None) -> None:
    """Record what ended the trial's running attempt (nothing when none runs: its end is already recorded). `at`:
    when it ended (unix s; default now)."""
    folder = Path(folder)
    attempts = read(folder)
    if attempts and attempts[-1].end is None:
        _append(folder, {"event": "end", "attempt": attempts[-1].n, "t": at or time.time(), "ended_by": ended_by})


def start(folder: str | Path) -> int:
    """Record that the trial's training starts; returns the attempt's number (1 for the first). An earlier attempt
    whose end nobody recorded was lost: it is recorded as such, ended at the folder's last write."""
    folder = Path(folder)
    attempts = read(folder)
    if attempts and attempts[-1].end is None:
        end(folder, LOST, _last_write(folder, attempts[-1].start))
    n = attempts[-1].n + 1 if attempts else 1
    _append(folder, {"event": "start", "attempt": n, "t": time.time(), "host": platform.node(), "pid": os.getpid()})
    return n


def tags(folder: str | Path, now: float | None = None) -> dict[str, str]:
    """The child run's attempt tags: count, what ended each ended attempt, and wall seconds over all of them (a
    running attempt counts up to `now`)."""
    attempts = read(folder)
    now = now or time.time()
    wall = sum((a.end if a.end is not None else now) - a.start for a in attempts)
    out = {ATTEMPTS_TAG: str(len(attempts)), WALL_TAG: f"{wall:.1f}"}
    out.update({ended_by_tag(a.n): a.ended_by for a in attempts if a.end is not None})
    return out


def restart_lines(folder: str | Path, key: str, reported: dict[str, int]) -> list[str]:
    """srdit's line for each attempt of trial `key` after the first that started since the last call (`reported`:
    trial key -> last attempt reported, updated), e.g. `  KEY: attempt 2 started (attempt 1: lost by Ray: ...);
    it resumes from its checkpoint`."""
    attempts = read(folder)
    lines = []
    for a in attempts:
        if a.n > max(reported.get(key, 1), 1):
            before = attempts[a.n - 2].ended_by  # numbered 1, 2, ... in order; `start` ended the one before
            lines.append(
                f"  {key}: attempt {a.n} started (attempt {a.n - 1}: {before or LOST}); it resumes from its checkpoint"
            )
            reported[key] = a.n
    return lines


__all__ = ["ATTEMPTS", "LOST", "Attempt", "read", "start", "end", "tags", "restart_lines", "ended_by_tag"]
