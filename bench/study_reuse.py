"""Reuse across studies: the default study run once, then the same study under another name into the same state
(every trial adopted from the first run's finished runs, `srdit.runtime.reuse`), both through `srdit study run` in
one script, with the load average around each. Prints one JSON line; `--out` also writes it.

    python bench/study_reuse.py [--study studies/digits_quick.yaml] [--out bench/study_reuse.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(args: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "srdit", "study", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"srdit study {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return wall, out.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default=str(HERE.parent / "studies" / "digits_quick.yaml"))
    p.add_argument("--out", default=None)
    a = p.parse_args()
    text = Path(a.study).read_text()
    name = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("name:"))
    with tempfile.TemporaryDirectory(prefix="srdit-reuse-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "first.yaml").write_text(text)
        (tmp / "again.yaml").write_text(text.replace(f"name: {name}", f"name: {name}_again", 1))
        load0 = os.getloadavg()
        first, _ = _run(["run", "first.yaml", "--state", "state"], tmp)
        load1 = os.getloadavg()
        _, plan = _run(["plan", "again.yaml", "--state", "state"], tmp)
        again, out = _run(["run", "again.yaml", "--state", "state"], tmp)
        load2 = os.getloadavg()
    res = {
        "study": name,
        "first_s": round(first, 1),
        "again_s": round(again, 1),
        "ratio": round(again / first, 4),
        "load_before": load0,
        "load_after_first": load1,
        "load_after_again": load2,
        "plan_line": next((ln for ln in plan.splitlines() if ln.startswith("reuse:")), ""),
        "run_lines": [ln for ln in out.splitlines() if "reused" in ln or "Ray:" in ln],
        "date": time.strftime("%Y-%m-%d"),
    }
    line = json.dumps(res)
    print(line)
    if a.out:
        Path(a.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
