"""Benchmark of the study layer (not a test).

1. Per-trial orchestration overhead: the same trials (a small generated study) run
   (a) in a plain loop in this process (same trainer, same MLflow logging, no Ray), and
   (b) as a Ray Tune study, one trial at a time (apples to apples with the loop), through `run_study` as
       `srdit study run` calls it (it starts and stops its private Ray: that start-up is part of the overhead),
   (a) and (b) interleaved `--repeats` times (the run with the median wall time is kept), and
   (c) as a Ray Tune study with the default concurrency (all cores), for context;
   all in the same invocation, each into a fresh state folder.
   overhead_per_trial_s = (wall of b - wall of a) / trials. On a study this small most of it is paid once per
   study, so it is also split, from the child runs' own start and end times, into `startup_s` (before the first
   trial's run starts: Ray, Tune, the worker process and its imports), `between_trials_s` (median gap from one
   trial's run end to the next one's start: the steady per-trial cost) and `teardown_s` (after the last run ends),
   each arm's own, and their differences in `tune_minus_plain`.
2. Wall time of the default study (studies/digits_quick.yaml) through the CLI, as `make study` runs it, plus the
   report.

    python bench/study_overhead.py --out bench/study_overhead.json [--repeats 2] [--skip-default] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

SMALL = {
    "name": "bench_overhead",
    "techniques": ["rmsnorm", "qk_norm"],
    "seeds": [0, 1],
    "base": {
        "train": {"steps": 20, "batch_size": 32, "log_every": 5, "ckpt_every": 10},
        "eval": {"n_samples": 100, "batch_size": 100},
        "sample": {"sampler": "euler", "steps": 4},
    },
}


def _phases(runs: list, t_start: float, t_end: float) -> dict:
    """Where an arm's wall time went, from its child runs' start and end times (epoch ms) and the arm's own start
    and end (epoch s): before the first run starts, between one run's end and the next one's start (median), after
    the last run ends, and inside the runs (sum of their trial_wall_s)."""
    import itertools
    import statistics

    spans = sorted((r.info.start_time / 1000, r.info.end_time / 1000) for r in runs)
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
    return {
        "startup_s": spans[0][0] - t_start,
        "between_trials_s": statistics.median(gaps) if gaps else 0.0,
        "teardown_s": t_end - spans[-1][1],
        "sum_trial_wall_s": sum(r.data.metrics.get("trial_wall_s", 0.0) for r in runs),
    }


def _arm(study: Path, state: Path, tune: bool) -> dict:
    """One arm in a fresh Python process (both arms pay their imports, as a user's process does), into a fresh
    state folder: the plain loop, or `run_study` as `srdit study run` calls it (it starts its private Ray on
    loopback, never a `ray start` cluster of the machine, and stops it). Wall time from the process's start."""
    code = (
        "import sys; from srdit.study.spec import load_study; from srdit.runtime.driver import run_plain, run_study; "
        f"spec = load_study({str(study)!r}); "
        + (f"run_study(spec, {str(state)!r}, echo=lambda s: None)" if tune else f"run_plain(spec, {str(state)!r})")
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t, t_epoch = time.perf_counter(), time.time()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True)
    wall, t_end = time.perf_counter() - t, time.time()
    from srdit.runtime.state import StudyState
    from srdit.study.spec import load_study

    runs = StudyState.of(load_study(study), state).tracking().children()
    statuses: dict[str, int] = {}
    for r in runs:
        statuses[r.data.tags.get("status", "?")] = statuses.get(r.data.tags.get("status", "?"), 0) + 1
    return {"wall_s": wall, "trials": len(runs), **_phases(runs, t_epoch, t_end), "statuses": statuses}


def overhead(work: Path, repeats: int = 2) -> dict:
    import statistics

    out: dict = {"study": SMALL, "repeats": repeats}

    def study(name: str, resources: dict | None) -> Path:
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**SMALL, **({"resources": resources} if resources else {})}))
        return path

    plain, one = study("plain", None), study("one", {"cpus": 1, "max_concurrent": 1})
    arms: dict[str, list[dict]] = {"plain_loop": [], "tune_one_at_a_time": []}
    for r in range(repeats):  # interleaved, so that a change of the machine's load hits both arms alike
        arms["plain_loop"].append(_arm(plain, work / f"plain{r}", tune=False))
        arms["tune_one_at_a_time"].append(_arm(one, work / f"tune{r}", tune=True))
    for label, runs in arms.items():  # the run with the median wall time (the lower one of two)
        out[label] = sorted(runs, key=lambda a: a["wall_s"])[(len(runs) - 1) // 2]
        out[label]["wall_s_all"] = [a["wall_s"] for a in runs]
    conc = _arm(study("concurrent", {"cpus": 1}), work / "concurrent", tune=True)
    out["tune_concurrent"] = {**conc, "max_concurrent": os.cpu_count()}
    n = out["plain_loop"]["trials"]
    a, b = out["plain_loop"], out["tune_one_at_a_time"]
    out["overhead_per_trial_s"] = (b["wall_s"] - a["wall_s"]) / n
    out["overhead_per_trial_paired_s"] = statistics.median(
        (t["wall_s"] - p["wall_s"]) / n for p, t in zip(arms["plain_loop"], arms["tune_one_at_a_time"])
    )
    out["in_trial_slowdown"] = b["sum_trial_wall_s"] / a["sum_trial_wall_s"] if a["sum_trial_wall_s"] else None
    out["concurrent_speedup_vs_loop"] = a["wall_s"] / out["tune_concurrent"]["wall_s"]
    out["tune_minus_plain"] = {
        k: b[k] - a[k] for k in ("startup_s", "between_trials_s", "teardown_s", "sum_trial_wall_s")
    }
    return out


def default_study(work: Path, study: str) -> dict:
    state = work / "default_state"
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    t = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "srdit", "study", "run", study, "--state", str(state)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    run_s = time.perf_counter() - t
    t = time.perf_counter()
    rep = subprocess.run(
        [sys.executable, "-m", "srdit", "report", study, "--state", str(state), "--out", str(work / "dashboards")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    report_s = time.perf_counter() - t
    lines = run.stdout.strip().splitlines()
    return {
        "study": study,
        "run_wall_s": run_s,
        "report_wall_s": report_s,
        "total_wall_s": run_s + report_s,
        "run_exit_code": run.returncode,
        "report_exit_code": rep.returncode,
        "summary": [ln for ln in lines if ln.startswith("study ")][-1:],
        "stderr_tail": (run.stderr + rep.stderr).strip().splitlines()[-5:],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--study", default="studies/digits_quick.yaml")
    p.add_argument("--skip-default", action="store_true", help="only the overhead measurement")
    p.add_argument("--skip-overhead", action="store_true", help="only the default study")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of the loop and the Tune arm")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="srdit-bench-"))
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg(),
        },
    }
    try:
        from srdit.provenance import git_commit

        result["commit"] = git_commit()[0]
        if not args.skip_overhead:
            result["overhead"] = overhead(work, args.repeats)
            o = result["overhead"]
            d = o["tune_minus_plain"]
            print(
                f"overhead per trial: {o['overhead_per_trial_s']:.2f} s (Tune minus loop: startup "
                f"{d['startup_s']:.1f} s once, {d['between_trials_s']:.2f} s between trials, teardown "
                f"{d['teardown_s']:.1f} s, inside the trials {d['sum_trial_wall_s']:.1f} s in all)",
                flush=True,
            )
        if not args.skip_default:
            result["default_study"] = default_study(work, args.study)
            print(f"default study: {result['default_study']['total_wall_s']:.0f} s", flush=True)
        result["machine"]["load_avg_at_end"] = os.getloadavg()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
