"""Analysis at scale: `srdit analyze` on a large results CSV, timed and with its peak memory (the child process's
maximum RSS), one process per case.

Cases (default): 1,000,000 rows, 8 factors x 5 seeds (256 cells, ~780 runs per cell and seed) with the default
options (bootstrap on: skipped by its calibration rule, 5 seeds per cell); and 1,000 seeds x 6 factors
(64,000 rows), where the seed bootstrap is kept and runs on (cell, seed) aggregates.
Prints one JSON line: {"cases": [{"rows", "factors", "seeds", "csv_mb", "wall_s", "peak_rss_mb"}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def make_csv(path: Path, n_rows: int, k: int, n_seeds: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    F = [f"t{i}" for i in range(k)]
    lv = rng.integers(0, 2, size=(n_rows, k))
    cells = np.arange(1 << k)
    lv[: len(cells)] = (cells[:, None] >> np.arange(k)) & 1  # every cell present
    s = rng.integers(0, n_seeds, size=n_rows)
    pm = 2 * lv - 1
    y = 10 + pm @ np.linspace(-1, 1, k) + 0.3 * pm[:, 0] * pm[:, 1] + 0.1 * s + rng.normal(0, 1, n_rows)
    status = np.where(rng.random(n_rows) < 0.01, "crashed", "finished")
    y = np.where(status == "finished", y, np.nan)
    df = pd.DataFrame(lv, columns=F)
    df["seed"], df["status"], df["fd"] = s, status, y
    df.to_csv(path, index=False, float_format="%.6g")


def run_case(n_rows: int, k: int, n_seeds: int, tmp: Path) -> dict:
    csv = tmp / f"runs_{n_rows}_{k}_{n_seeds}.csv"
    make_csv(csv, n_rows, k, n_seeds)
    code = (
        "import resource, sys, time; from srdit.commands.analyze import main; t = time.perf_counter(); "
        "rc = main(sys.argv[1:], stdout=open('/dev/null', 'w')); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rc)"
    )
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(csv),
            "--factors",
            ",".join(f"t{i}" for i in range(k)),
            "--metric",
            "fd",
            "--direction",
            "min",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    inner_s, rss_kb, rc = out.stdout.split()
    assert rc == "0", out.stderr[-2000:]
    return {
        "rows": n_rows,
        "factors": k,
        "seeds": n_seeds,
        "csv_mb": csv.stat().st_size / 2**20,
        "wall_s": wall,
        "analyze_s": float(inner_s),
        "peak_rss_mb": int(rss_kb) / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the script)")
    args = p.parse_args()
    cases = [(20_000, 8, 5), (2_000, 4, 100)] if args.quick else [(args.rows, 8, 5), (64_000, 6, 1000)]
    res = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, k, s in cases:
            r = run_case(n, k, s, Path(tmp))
            print(
                f"  analyze {n:,} rows, {k} factors, {s} seeds: {r['wall_s']:.1f} s, peak RSS "
                f"{r['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
            )
            res.append(r)
    print(json.dumps({"cases": res}))


if __name__ == "__main__":
    main()
