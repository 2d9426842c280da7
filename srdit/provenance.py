"""What every run records about itself: git commit (+ dirty flag), versions, device."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

import torch

import srdit

ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def git_commit() -> tuple[str, bool]:
    """(commit, dirty) of the source tree srdit runs from; ("unknown", False) outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return (commit or "unknown"), dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device: torch.device | str = "cpu") -> dict[str, str]:
    commit, dirty = git_commit()
    return {
        "commit": commit, "dirty": str(dirty).lower(), "srdit": srdit.__version__, "torch": str(torch.__version__),
        "python": platform.python_version(), "device": device_name(device),
    }
