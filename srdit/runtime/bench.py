"""`srdit study bench STUDY`: the controlled throughput measurement of a study's cells.

The trials of a study run side by side and share the machine, so their wall-clock throughput carries the load of
their neighbours. The bench times one training step of every cell's model in one process, interleaved: round r
times cell 1, cell 2, ..., cell n (the order rotated every round), each on the same fixed batch and the same
noise, after warm-up rounds; a cell's step time is the median over the rounds, and its ratio to the baseline cell
(all techniques off; else the plan's first cell) the median of the per-round ratios. Whatever load the machine
has then falls on every cell alike within a round, and the ratios measure the configurations.

Clock: CUDA wall time (synchronised) on a GPU; the process's CPU time on CPUs (the work of the step: on a
shared machine the wall clock also counts the waits for a core).

One training step = what `srdit.train.train` does per step: `StepNoise.draw`, `training_losses`, backward,
gradient clipping, AdamW and the EMA update, under the run's autocast; CPU threads as a trial gets them
(`resources.cpus`).

Output: `<state>/bench/<study>.json` (per cell: trial key, step time per round and median, ratio, images/s;
the rounds are kept so that the report can put confidence intervals on throughput effects, rounds acting as
blocks), also logged on the study's parent run (metrics `bench/step_s/<cell>`, `bench/ratio/<cell>` and the file
under `bench/`). The report (`srdit.runtime.results.load_results`) uses it for throughput effects and the Pareto
front when it matches the current plan.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from srdit.config import RunConfig, from_dict
from srdit.study.designs import Plan, TrialSpec
from srdit.study.spec import StudySpec

DEFAULT_ROUNDS = 15
DEFAULT_WARMUP = 3
BENCH_VERSION = 1


def bench_path(state_dir: str | Path, study: str) -> Path:
    return Path(state_dir) / "bench" / f"{study}.json"


class _Cell:
    """One cell's model, optimiser and fixed batch, ready to time a training step."""

    def __init__(self, trial: TrialSpec, device):
        import copy

        import torch

        from srdit.model import build_model
        from srdit.train import TrainStep, make_batches, make_optimizer

        cfg = from_dict(RunConfig, trial.config).validate()
        self.cfg, self.device, self.trial = cfg, device, trial
        torch.manual_seed(cfg.train.seed)
        data = make_batches(cfg, device)
        self.batch = data.next()
        model = build_model(cfg.model, cfg.ext).to(device).train()
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.train_step = TrainStep(cfg, model, ema, make_optimizer(model, cfg, device), device)  # the trainer's step
        self.batch_size = cfg.train.batch_size

    def step(self) -> float:
        """Seconds of one training step (the same batch and noise every time): on a GPU the wall clock after
        synchronising; on CPUs the process's CPU time, which counts the step's work and not the time spent waiting
        for a core that other processes hold (a loaded machine slows the wall clock, not the work)."""
        import torch

        tc = self.cfg.train
        x0, y, *teacher_out = self.batch
        torch.manual_seed(tc.seed)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        clock = time.perf_counter if self.device.type == "cuda" else time.process_time
        sync()
        t0 = clock()
        self.train_step(x0, y, teacher_out, 1)
        sync()
        return clock() - t0


def baseline_cell(plan: Plan) -> str:
    """The cell ratios are taken against: all techniques off when the plan runs it, else its first cell."""
    return next((c.id for c in plan.cells if not c.on), plan.cells[0].id)


def run_bench(
    spec: StudySpec,
    plan: Plan,
    *,
    rounds: int = DEFAULT_ROUNDS,
    warmup: int = DEFAULT_WARMUP,
    echo: Callable[[str], None] = lambda s: None,
) -> dict:
    """Time one training step of every cell of the plan, interleaved (see the module docstring); returns the
    bench record (what `bench_path` holds)."""
    import torch

    from srdit.train import resolve_device

    if not plan.cells:
        raise ValueError(f"study {spec.name}: the bench needs the cells of a grid design (a search has none)")
    if rounds < 3:
        raise ValueError("the bench needs at least 3 rounds (a median of fewer is no median)")
    threads = max(1, int(math.floor(spec.resources.cpus)))
    torch.set_num_threads(threads)
    first = {}
    for t in plan.trials:
        first.setdefault(t.cell, t)  # the first seed's trial of each cell: its resolved config
    device = resolve_device(spec.base.train.device)
    echo(f"bench {spec.name}: building {len(plan.cells)} cells on {device} ({threads} thread(s)) ...")
    cells = {c.id: _Cell(first[c.id], device) for c in plan.cells}
    ids = list(cells)
    times: dict[str, list[float]] = {c: [] for c in ids}
    t_start = time.perf_counter()
    for r in range(warmup + rounds):
        order = ids[r % len(ids) :] + ids[: r % len(ids)]  # rotate: no cell always first (or always after another)
        for c in order:
            dt = cells[c].step()
            if r >= warmup:
                times[c].append(dt)
        if r == warmup - 1:
            echo(f"  warm-up done ({warmup} rounds, {time.perf_counter() - t_start:.0f} s); timing {rounds} rounds")
    base = baseline_cell(plan)
    out_cells = {}
    for c in ids:
        med = statistics.median(times[c])
        ratio = statistics.median(a / b for a, b in zip(times[c], times[base]))
        out_cells[c] = {
            "techniques": list(cells[c].trial.on),
            "trial_key": cells[c].trial.key,
            "step_s": med,
            "ratio": ratio,
            "images_per_s": cells[c].batch_size / med,
            "steps_per_s": 1.0 / med,
            "round_step_s": times[c],
        }
    return {
        "version": BENCH_VERSION,
        "study": spec.name,
        "baseline": base,
        "rounds": rounds,
        "warmup": warmup,
        "threads": threads,
        "device": str(device),
        "clock": "cuda wall time" if device.type == "cuda" else "process CPU time",
        "host": platform.node(),
        "batch_size": spec.base.train.batch_size,
        "seconds": time.perf_counter() - t_start,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cells": out_cells,
    }


def format_bench(rec: dict) -> str:
    lines = [
        f"bench {rec['study']}: median of {rec['rounds']} interleaved rounds ({rec['warmup']} warm-up), "
        f"{rec['threads']} thread(s) on {rec['device']}, {rec['clock']}; ratio = step time / baseline "
        f"{rec['baseline']}'s"
    ]
    lines.append(f"  {'cell':<10} {'techniques':<34} {'step ms':>9} {'ratio':>7} {'images/s':>10}")
    for c, v in rec["cells"].items():
        lines.append(
            f"  {c:<10} {'+'.join(v['techniques']) or 'baseline':<34} {1000 * v['step_s']:9.2f} "
            f"{v['ratio']:7.3f} {v['images_per_s']:10.0f}"
        )
    return "\n".join(lines)


def save_bench(rec: dict, state_dir: str | Path, tracking=None) -> Path:
    """Write the record into the state (and on the parent run when `tracking` is given)."""
    path = bench_path(state_dir, rec["study"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1))
    if tracking is not None:
        metrics = {}
        for c, v in rec["cells"].items():
            metrics[f"bench/step_s/{c}"] = v["step_s"]
            metrics[f"bench/ratio/{c}"] = v["ratio"]
        tracking.log_parent_metrics(metrics)
        tracking.client.log_artifact(tracking.parent_run_id, str(path), "bench")
    return path


def load_bench(state_dir: str | Path, plan: Plan) -> dict | None:
    """The bench record of this plan, or None: none was run, or it was run for other cells or configs (its trial
    keys, which hash the resolved config, differ from the plan's)."""
    path = bench_path(state_dir, plan.study)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except ValueError:
        return None
    first = {}
    for t in plan.trials:
        first.setdefault(t.cell, t.key)
    cells = rec.get("cells", {})
    if (
        rec.get("version") != BENCH_VERSION
        or set(cells) != set(first)
        or any(cells[c].get("trial_key") != k for c, k in first.items())
    ):
        return None
    return rec


def bench_table(rec: dict, factors: list[str]):
    """The bench as a study table: one row per cell x round (`seed` = round, a block: every cell was timed within
    it), the factor columns, and the throughput metrics of one step (steps_per_s, images_per_s and their
    `_median` names)."""
    import pandas as pd

    rows = []
    for c, v in rec["cells"].items():
        on = set(v["techniques"])
        for r, dt in enumerate(v["round_step_s"]):
            sps, ips = 1.0 / dt, rec["batch_size"] / dt
            rows.append(
                {
                    "trial": f"bench-{c}-r{r}",
                    "cell": c,
                    "seed": r,
                    "status": "finished",
                    "status_reason": "",
                    **{f: int(f in on) for f in factors},
                    "steps_per_s": sps,
                    "images_per_s": ips,
                    "steps_per_s_median": sps,
                    "images_per_s_median": ips,
                }
            )
    return pd.DataFrame(rows)


__all__ = ["run_bench", "save_bench", "load_bench", "bench_table", "bench_path", "format_bench", "baseline_cell"]
