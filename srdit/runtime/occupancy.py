"""How many trials of a study share a machine: the context of every wall-clock metric a trial reports.

Each running trial keeps a marker file `<trials dir>/.running/<host>__<pid>__<trial key>` for its lifetime; a
trial counts the live markers of its own host (a marker whose process died is ignored and removed) whenever it
reports, and records the most it saw as `trials_on_host` (1 = it ran alone; its throughput is then the
configuration's, not the machine's load).
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

_SEP = "__"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with that pid: alive
        return True


class Occupancy:
    """The marker of one running trial; `sample()` updates `max_seen` (trials of the study on this host)."""

    def __init__(self, trials_dir: str | Path, key: str):
        self.dir = Path(trials_dir) / ".running"
        self.host = platform.node().replace(_SEP, "_")
        self.marker = self.dir / f"{self.host}{_SEP}{os.getpid()}{_SEP}{key}"
        self.max_seen = 1

    def __enter__(self) -> Occupancy:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.marker.touch()
        self.sample()
        return self

    def __exit__(self, *exc) -> None:
        self.sample()
        self.marker.unlink(missing_ok=True)

    def sample(self) -> int:
        """Trials of the study running on this host now (this one included); raises `max_seen` to it."""
        n = 0
        with contextlib.suppress(OSError):
            for p in self.dir.iterdir():
                host, _, rest = p.name.partition(_SEP)
                pid, _, _ = rest.partition(_SEP)
                if host != self.host or not pid.isdigit():
                    continue
                if _alive(int(pid)):
                    n += 1
                else:
                    p.unlink(missing_ok=True)  # left by a killed trial
        self.max_seen = max(self.max_seen, n)
        return n


__all__ = ["Occupancy"]
