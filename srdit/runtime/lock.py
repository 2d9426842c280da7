"""One driver per study on a state folder, and one creator of the state's MLflow tables.

A driver holds an exclusive `flock` on `<state>/locks/<study>.lock` for as long as it runs; the file also names
the holder (pid, host, start time) for the message a second driver prints. The kernel drops a flock when its
process dies however it dies (SIGKILL included), so a lock left by a killed driver is stale by construction:
the next driver takes it over, and `study status` knows that a child run still marked RUNNING has no driver.
flock works across hosts on NFSv4 (it is mapped onto POSIX byte-range locks there).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

from srdit.config import ConfigError


class StudyBusy(ConfigError):
    """Another live driver runs this study on this state (one line, exit code 2)."""


def lock_path(state_dir: str | Path, study: str) -> Path:
    return Path(state_dir) / "locks" / f"{study}.lock"


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def holder(state_dir: str | Path, study: str) -> dict | None:
    """{"pid", "host", "started"} of the live driver of `study` on this state, or None when no driver runs it
    (no lock file, or a lock whose driver has died)."""
    path = lock_path(state_dir, study)
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(path) or {"pid": "?", "host": "?"}
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def study_lock(state_dir: str | Path, study: str) -> Iterator[dict | None]:
    """Hold the study's driver lock for the block; yields the previous holder's record when the lock was left by
    a driver that died (taken over), else None. Raises StudyBusy at once when a live driver holds it."""
    path = lock_path(state_dir, study)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+b")  # not truncated before we hold it: the holder's record stays readable
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        h = _read_holder(path)
        raise StudyBusy(
            f"study {study} is running on this state (pid {h.get('pid', '?')}, host {h.get('host', '?')}, "
            f"since {h.get('started', '?')}); wait for it or stop it (`srdit study status` shows its "
            f"progress)"
        ) from None
    try:
        f.seek(0)
        try:
            previous = json.loads(f.read() or b"{}") or None
        except ValueError:
            previous = None
        f.seek(0)
        f.truncate()
        f.write(
            json.dumps(
                {"pid": os.getpid(), "host": platform.node(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            ).encode()
        )
        f.flush()
        yield previous
    finally:
        with contextlib.suppress(OSError):
            f.seek(0)
            f.truncate()  # a clean release leaves no holder record
            f.flush()
        f.close()  # closing drops the flock


@contextlib.contextmanager
def state_init_lock(state_dir: str | Path) -> Iterator[None]:
    """Serialise the creation of the state's MLflow store (tables, experiment, parent run) between drivers:
    concurrent first opens of a new SQLite store race in alembic's migrations otherwise."""
    path = Path(state_dir) / "locks" / "mlflow-init.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


__all__ = ["StudyBusy", "study_lock", "holder", "lock_path", "state_init_lock"]
