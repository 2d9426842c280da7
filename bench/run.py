"""`make bench`: side-by-side measurements in one run, written to bench/results.json and printed as the README's
markdown table. Each model arm runs in its own process so that its peak memory is its own."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = {
    "plain": "",
    "sprint": "sprint",
    "full stack": "repa,reg,sprint,rmsnorm,rope,qk_norm,value_residual,cfm,time_shift,balanced_labels",
}


def run_json(cmd: list[str], timeout: int = 1800) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_arms(steps: int) -> dict:
    """Step times of all arms interleaved in one process; peak memory of each arm in its own process."""
    names = list(ARMS)
    timing = run_json(
        [
            sys.executable,
            str(HERE / "model_step.py"),
            "--arms",
            ";".join(ARMS.values()),
            "--steps",
            str(steps),
            "--matmul",
        ]
    )
    results = {name: timing["arms"][ARMS[name]] for name in names}
    for name in names:
        mem = run_json([sys.executable, str(HERE / "model_step.py"), "--memory", ARMS[name]])
        results[name]["peak_rss_mb"] = mem["peak_rss_mb"]
        print(
            f"  {name}: {results[name]['step_s']:.3f} s/step (median), peak RSS {mem['peak_rss_mb']:.0f} MB",
            file=sys.stderr,
        )
    plain = results["plain"]["step_s"]
    for r in results.values():
        r["speedup_vs_plain"] = plain / r["step_s"]
    return {"arms": results, **{k: timing[k] for k in ("matmul_flops", "achieved_flops", "flops_fraction_of_matmul")}}


def trainer_step(steps: int) -> dict:
    """The CPU side of the step: the bare model step (fwd + bwd), the trainer's step before (per-parameter AdamW /
    EMA loops, metrics read back every step) and now (`srdit.train.TrainStep`), interleaved in one process."""
    res = run_json([sys.executable, str(HERE / "model_step.py"), "--trainer", "", "--steps", str(steps)])
    for kind, s in res["step_s"].items():
        print(f"  {kind}: {s:.3f} s/step ({res['overhead_vs_bare'][kind]:.2f}x the bare model step)", file=sys.stderr)
    return res


def ratio_text(r: dict) -> str:
    """A paired ratio with its spread over rounds: median (quartiles; range)."""
    return (
        f"{r['median']:.3f}x (quartiles {r['q1']:.3f}-{r['q3']:.3f}, range {r['min']:.2f}-{r['max']:.2f} over "
        f"{r['rounds']} rounds)"
    )


def table(res: dict) -> str:
    arms = res["model_step"]["arms"]
    lines = ["| measurement (one run, CPU, 2 threads) | value |", "|---|---|"]
    for name, r in arms.items():
        lines.append(
            f"| SR-DiT-B/1 shape, batch 8, fwd+bwd (median, interleaved): {name} | {r['step_s']:.2f} s/step "
            f"({r['speedup_vs_plain']:.2f}x vs plain), peak RSS {r['peak_rss_mb']:.0f} MB |"
        )
    tr = res.get("trainer_step")
    if tr:
        for kind in ("trainer step (before)", "trainer step"):
            lines.append(
                f"| SR-DiT-B/1 shape, plain, batch {tr['batch']} (median, interleaved): {kind} vs the bare "
                f"model step (fwd+bwd), paired ratio per round | {tr['step_s'][kind]:.2f} vs "
                f"{tr['step_s']['bare model step']:.2f} s/step; {ratio_text(tr['ratio_vs_bare'][kind])} |"
            )
    p = res["model_step"]
    lines.append(
        f"| plain backbone FLOP/s as a fraction of a dense fp32 matmul | "
        f"{p['flops_fraction_of_matmul']:.2f} ({p['achieved_flops'] / 1e9:.0f} / "
        f"{p['matmul_flops'] / 1e9:.0f} GFLOP/s) |"
    )
    dp = res.get("data_parallel")
    if dp:
        lines.append(
            f"| digits default, global batch 64: {dp['workers']} gloo workers x 1 thread vs 1 process x "
            f"{dp['threads_total']} threads (same trajectory: max loss diff {dp['max_rel_loss_diff']:.1e} "
            f"rel.) | {dp['images_per_s_workers']:.0f} vs {dp['images_per_s_one_process']:.0f} images/s "
            f"({dp['ratio_workers_vs_one']:.2f}x) |"
        )
    for c in (res.get("analysis_scale") or {}).get("cases", []):
        lines.append(
            f"| `srdit analyze` (default options) on a {c['rows']:,}-row CSV ({c['csv_mb']:.0f} MB), "
            f"{c['factors']} factors x {c['seeds']} seeds | {c['wall_s']:.0f} s, peak RSS "
            f"{c['peak_rss_mb']:.0f} MB |"
        )
    s = res.get("study")
    if s:
        lines.append(
            f"| study orchestration overhead per trial (Ray Tune + MLflow vs the same trials in a plain "
            f"loop) | {s['overhead']['overhead_per_trial_s']:.1f} s |"
        )
        d = s["default_study"]
        lines.append(
            f"| default study (`studies/digits_quick.yaml`, 16 trials) run + report | "
            f"{d['total_wall_s'] / 60:.1f} min ({d['run_wall_s']:.0f} s + {d['report_wall_s']:.0f} s) |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip-study", action="store_true")
    p.add_argument("--skip-analysis", action="store_true", help="skip the analysis-at-scale benchmark")
    args = p.parse_args()
    res = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model_step": model_arms(args.steps),
        "trainer_step": trainer_step(args.steps),
        "data_parallel": run_json([sys.executable, str(HERE / "data_parallel.py")]),
    }
    if not args.skip_analysis:
        res["analysis_scale"] = run_json([sys.executable, str(HERE / "analysis_scale.py")])
    if not args.skip_study:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "study.json"
            subprocess.run(
                [sys.executable, str(HERE / "study_overhead.py"), "--out", str(out)],
                cwd=HERE.parent,
                check=True,
                timeout=3600,
            )
            res["study"] = json.loads(out.read_text())
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
