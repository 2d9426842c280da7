"""Plain SiT vs the full SR-DiT stack on the digits default at equal steps, several seeds each.

Prints and writes JSON with FD (and KD, precision, recall) mean +- std per arm. Usage:
    python bench/digits_stack.py --seeds 0 1 2 --out bench/digits_stack.json
Seeds are independent (a CPU run is deterministic given its seed), so they may run as separate processes and be
combined afterwards:
    python bench/digits_stack.py --seeds 1 --out s1.json   (one per seed, or per seed and --arms, at once)
    python bench/digits_stack.py --merge s0.json s1.json s2.json --out bench/digits_stack.json"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from srdit.config import RunConfig, apply_diff
from srdit.techniques import SRDIT_STACK, with_techniques
from srdit.train import train


def summarize(rows: list[dict], arms: list[str]) -> dict:
    summary = {}
    for name in [a for a in arms if any(r["arm"] == a for r in rows)]:
        fds = [r["fd"] for r in rows if r["arm"] == name and r["status"] == "finished"]
        summary[name] = {
            "fd_mean": statistics.mean(fds),
            "fd_std": statistics.stdev(fds) if len(fds) > 1 else 0.0,
            "n": len(fds),
        }
        for k in ("kd", "precision", "recall"):
            summary[name][k + "_mean"] = statistics.mean(
                r[k] for r in rows if r["arm"] == name and r["status"] == "finished"
            )
    return summary


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/digits_stack.json")
    p.add_argument("--arms", nargs="+", help="run only these arms (default: both)")
    p.add_argument("--merge", nargs="+", help="combine the rows of these outputs (runs of other seeds) instead")
    args = p.parse_args()
    arms = {"plain SiT": RunConfig(), "SR-DiT stack": with_techniques(RunConfig(), SRDIT_STACK)}
    rows = []
    if args.merge:
        for f in args.merge:
            rows += json.loads(Path(f).read_text())["rows"]
        rows.sort(key=lambda r: (r["seed"], list(arms).index(r["arm"])))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.seeds:
                for name, cfg in arms.items():
                    if args.arms and name not in args.arms:
                        continue
                    cfg = apply_diff(cfg, {"train.seed": seed, "train.threads": args.threads})
                    start = time.perf_counter()
                    r = train(cfg, Path(tmp) / f"{name}-{seed}", progress=False)
                    rows.append(
                        {
                            "arm": name,
                            "seed": seed,
                            "status": r.status,
                            "wall_s": time.perf_counter() - start,
                            **{k: r.metrics.get(k) for k in ("fd", "kd", "precision", "recall", "images_per_s")},
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    summary = summarize(rows, list(arms))
    out = {"steps": RunConfig().train.steps, "techniques": list(SRDIT_STACK), "rows": rows, "summary": summary}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
