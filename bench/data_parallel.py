"""Data-parallel overhead on this machine: the digits default at global batch 64 on one process (all threads)
versus W gloo workers (one thread each) with the same global batch, side by side in one run.

Prints one JSON line: images/s of each arm (median over logging windows after the first) and their ratio, plus the
largest relative loss difference between the arms (they follow the same trajectory; see srdit.parallel).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from srdit.config import RunConfig, apply_diff  # noqa: E402
from srdit.train import JsonlReporter, train  # noqa: E402


def _cfg(steps: int, threads: int) -> RunConfig:
    return apply_diff(
        RunConfig(),
        {
            "train.steps": steps,
            "train.log_every": 25,
            "train.ckpt_every": 10**6,
            "train.threads": threads,
            "eval.n_samples": 20,
            "eval.batch_size": 20,
            "sample.steps": 2,
        },
    )


def _worker(rank: int, world: int, port: int, out: str, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(_cfg(steps, 1), out, JsonlReporter(Path(out) / "metrics.jsonl"), progress=False)
    finally:
        dist.destroy_process_group()


def _read(out: Path) -> tuple[float, dict[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "images_per_s" in r]
    return statistics.median(r["images_per_s"] for r in rows[1:]), {r["step"]: r["loss"] for r in rows}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        t0 = time.perf_counter()
        train(_cfg(args.steps, args.workers), one, JsonlReporter(_mk(one) / "metrics.jsonl"), progress=False)
        t1 = time.perf_counter()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(args.workers, port, str(_mk(many)), args.steps), nprocs=args.workers)
        t2 = time.perf_counter()
        ips_one, loss_one = _read(one)
        ips_many, loss_many = _read(many)
    diff = max(abs(loss_many[k] - v) / abs(v) for k, v in loss_one.items())
    print(
        json.dumps(
            {
                "workers": args.workers,
                "steps": args.steps,
                "global_batch": 64,
                "threads_total": args.workers,
                "images_per_s_one_process": ips_one,
                "images_per_s_workers": ips_many,
                "ratio_workers_vs_one": ips_many / ips_one,
                "max_rel_loss_diff": diff,
                "wall_one_s": t1 - t0,
                "wall_workers_s": t2 - t1,
                "torch": torch.__version__,
            }
        )
    )


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


if __name__ == "__main__":
    main()
