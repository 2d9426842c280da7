"""Sizing a study before launch (`srdit study plan --noise-sd X | --pilot STUDY [--target-mde Y]`): what the plan's
design and seeds can detect, a noise sd estimated from a finished pilot study, and the cheapest design (seeds,
full or fractional factorial) whose every tested effect reaches a target.

The maths is `srdit.analysis.power` (the analysis's model, tests and multiplicity family); this module feeds it
the plan's cells and seeds and prices the proposals with `Plan.cost` / `Plan.gpu_estimate`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd

from srdit import metric_registry
from srdit.analysis.power import ALPHA, POWER, DesignPower, PowerError, design_power, pooled_sd, sd_upper
from srdit.config import ConfigError
from srdit.study.designs import Plan, _fmt_s, plan_study
from srdit.study.spec import MAX_SEEDS, Design, StudySpec

FACTORIAL = ("full_factorial", "fractional_factorial")
"Design kinds whose effects the analysis tests (ladder and leave-one-out cells leave every effect inestimable)."
MIN_SEEDS = 2
"Fewest seeds a proposal has: with one seed there is no pure error and no t test."


def plan_cells(plan: Plan) -> np.ndarray:
    """The plan's runnable cells as a (cells x techniques) 0/1 matrix (from the cell ids)."""
    return np.array([[int(b) for b in c.id] for c in plan.cells], dtype=float).reshape(
        len(plan.cells), len(plan.factors)
    )


def plan_power(spec: StudySpec, plan: Plan, sigma: float | None = None) -> DesignPower | None:
    """What the plan detects (None for a design that tests no effect: ladder, leave-one-out, search)."""
    if spec.design.kind not in FACTORIAL or not plan.cells:
        return None
    return design_power(plan_cells(plan), plan.factors, len(spec.seeds), alpha=ALPHA, power=POWER, sigma=sigma)


def pilot_noise(pspec: StudySpec, table: pd.DataFrame, metric: str, pilot: str | Path, state: str | Path) -> dict:
    """The noise sd of `metric` from a finished study's replicates: the pooled within-cell sd of its finished child
    runs (`table`: the pilot study `pspec`'s results table, read from `state` by the runtime's `load_results`), on
    the metric's analysis scale, with its degrees of freedom and a one-sided 90% upper bound. `pilot` and `state`
    only word the errors. Raises ConfigError (one line) when the pilot lacks the metric or has no replicates."""
    log = metric_registry.is_log(metric)
    finished = table["status"] == "finished" if "status" in table.columns else pd.Series(True, index=table.index)
    if metric not in table.columns or (
        finished.any()
        and not np.isfinite(pd.to_numeric(table.loc[finished, metric], errors="coerce").astype(float)).any()
    ):
        raise ConfigError(
            f"pilot study {pspec.name} ({pilot}) does not record '{metric}' (it records "
            f"{', '.join(pspec.metrics.all())}): it cannot size the noise of this study's primary metric"
        )
    try:
        sd, df, n_cells = pooled_sd(table, metric, log=log)
    except PowerError as e:
        n = int((table["status"] == "finished").sum()) if "status" in table.columns else 0
        raise ConfigError(
            f"pilot study {pspec.name} ({pilot}, state {state}): {e} ({n} finished run(s)); run it with "
            f"2 or more seeds (`seeds: [0, 1]`) and `srdit study run {pilot} --state {state}`"
        ) from None
    if not sd > 0:
        raise ConfigError(
            f"pilot study {pspec.name} ({pilot}): its replicates of '{metric}' are identical (sd 0): no noise estimate"
        )
    return {
        "sd": sd,
        "df": df,
        "cells": n_cells,
        "upper90": sd_upper(sd, df, 0.9),
        "study": pspec.name,
        "source": f"pooled within-cell sd of pilot {pspec.name} ({df} df over {n_cells} replicated cell(s))",
    }


def _seeds(spec: StudySpec, n: int) -> tuple[int, ...]:
    """n seeds: the study's own first, then the next unused integers."""
    out = list(spec.seeds[:n])
    x = 0
    while len(out) < n:
        if x not in out:
            out.append(x)
        x += 1
    return tuple(out)


def _variant(spec: StudySpec, design: Design, n_seeds: int) -> StudySpec:
    return dataclasses.replace(spec, design=design, seeds=_seeds(spec, n_seeds))


def _candidate_designs(spec: StudySpec) -> list[tuple[Design, np.ndarray]]:
    """The full factorial and every fraction of resolution >= 5 with fewer cells (pairs stay clear of each other
    and of the mains), with their runnable cells (constraints applied)."""
    k = len(spec.factors)
    out: list[tuple[Design, np.ndarray]] = []
    seen: set[bytes] = set()
    for d in [*(Design("fractional_factorial", resolution=r) for r in range(5, k + 1)), Design("full_factorial")]:
        cells = plan_cells(plan_study(_variant(spec, d, 1)))
        key = np.unique(cells, axis=0).tobytes()
        if key not in seen:
            seen.add(key)
            out.append((d, cells))
    return out


def _tested(p: DesignPower) -> set[str]:
    return {d.effect for d in (*p.mains, *p.pairs)}


def _cost(spec: StudySpec, design: Design, n_seeds: int, steps_per_s: float, concurrency: int) -> dict:
    plan = plan_study(_variant(spec, design, n_seeds))
    return {"cost": plan.cost(steps_per_s, concurrency), "gpu": plan.gpu_estimate()}


def propose(spec: StudySpec, sigma: float, target: float, steps_per_s: float, concurrency: int) -> dict:
    """The cheapest (fewest trials) factorial design and seed count whose every tested main effect and pair synergy
    has an MDE <= `target` (metric units, analysis scale), testing all that the full factorial tests; with the
    next-smaller candidate (the most trials below it), which by construction does not reach the target."""
    if not (math.isfinite(target) and target > 0):
        raise ConfigError(f"--target-mde must be a positive number, got {target}")
    designs = _candidate_designs(spec)
    full_tested = _tested(design_power(designs[-1][1], spec.factor_names, MIN_SEEDS))
    if not full_tested:
        return {"target": target, "reached": False, "note": "the analysis tests no effect of this study's cells"}
    goal = target / sigma  # in noise sds

    def worst(cells: np.ndarray, n: int) -> tuple[float, DesignPower]:
        p = design_power(cells, spec.factor_names, n, sigma=sigma)
        return p.worst_sd(), p

    eligible = [
        (d, cells) for d, cells in designs if _tested(design_power(cells, spec.factor_names, MIN_SEEDS)) == full_tested
    ]
    found = []
    for d, cells in eligible:
        if worst(cells, MAX_SEEDS)[0] > goal:
            continue
        lo, hi = MIN_SEEDS, MAX_SEEDS  # the MDE falls with the seeds: bisect for the fewest that reach the goal
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if worst(cells, mid)[0] <= goal else (mid + 1, hi)
        found.append((len(cells) * lo, worst(cells, lo)[0], d, cells, lo))
    if not found:
        return {
            "target": target,
            "reached": False,
            "note": f"no factorial design reaches an MDE of {target:g} with up to {MAX_SEEDS} seeds per cell",
        }
    trials, _, d, cells, n = min(found, key=lambda f: (f[0], f[1]))
    out = {"target": target, "reached": True, **_entry(spec, d, worst(cells, n)[1], steps_per_s, concurrency)}
    # the next-smaller candidate: per design the most seeds below the proposal's trials; the largest of those
    smaller = [
        (len(c2) * n2, d2, c2, n2) for d2, c2 in eligible for n2 in [-(-trials // len(c2)) - 1] if n2 >= MIN_SEEDS
    ]
    if smaller:
        _, d2, c2, n2 = max(smaller, key=lambda x: (x[0], -worst(x[2], x[3])[0]))
        out["next_smaller"] = _entry(spec, d2, worst(c2, n2)[1], steps_per_s, concurrency)
    return out


def _entry(spec: StudySpec, d: Design, p: DesignPower, steps_per_s: float, concurrency: int) -> dict:
    seeds = _seeds(spec, p.n_seeds)
    return {
        "design": d.label,
        "resolution": d.resolution,
        "seeds": list(seeds),
        "n_seeds": p.n_seeds,
        "cells": p.n_cells,
        "trials": p.n_runs,
        "df": p.df,
        "mde_main": p.mde_main,
        "mde_pair": p.mde_pair,
        "worst_mde": p.worst_sd() * p.sigma if p.sigma is not None else None,
        **_cost(spec, d, p.n_seeds, steps_per_s, concurrency),
    }


def power_block(
    spec: StudySpec,
    plan: Plan,
    *,
    sigma: float | None = None,
    source: str | None = None,
    pilot: dict | None = None,
    target: float | None = None,
    steps_per_s: float = 7.0,
    concurrency: int = 1,
) -> dict:
    """The `power` block of `srdit study plan --json` (also what the text output prints)."""
    metric = spec.metrics.primary
    log = metric_registry.is_log(metric)
    block: dict = {
        "metric": metric,
        "scale": "log" if log else "linear",
        "alpha": ALPHA,
        "power": POWER,
        "sigma": sigma,
        "sigma_source": source,
        "pilot": pilot,
        "design": None,
        "proposal": None,
        "note": None,
    }
    if spec.design.kind not in FACTORIAL:
        block["note"] = (
            f"power is computed for factorial designs only: the analysis tests no effect of a "
            f"{plan.design} design (its cells leave every main effect and pair inestimable; the "
            f"{'ladder steps' if spec.design.kind == 'ladder' else 'contrasts'} are descriptive)"
            if spec.design.kind != "search"
            else "power is computed for factorial designs only (a search design's cells are chosen while it runs)"
        )
        return block
    p = plan_power(spec, plan, sigma)
    block["design"] = p.to_json() if p is not None else None
    if metric in metric_registry.WALL_CLOCK:
        block["note"] = (
            f"{metric} is a wall-clock metric: the report tests it only when the trials did not share a "
            "machine or from `srdit study bench` (rounds as blocks); the power assumes such a measurement"
        )
    if target is not None and sigma is not None:
        block["proposal"] = propose(spec, sigma, target, steps_per_s, concurrency)
    return block


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _cost_s(e: dict) -> str:
    if e.get("gpu"):
        return f"about {e['gpu']['gpu_hours']:g} GPU-hours"
    c = e["cost"]
    return f"{c['total_steps']} training steps, about {_fmt_s(c['wall_seconds'])} wall at {c['concurrency']} at once"


def format_power(block: dict) -> str:
    """Text lines of the power block for `srdit study plan`."""
    metric, log = block["metric"], block["scale"] == "log"
    head = (
        f"power ({metric}{', log scale' if log else ''}; alpha {block['alpha']:g}, "
        f"{int(round(100 * block['power']))}% power)"
    )
    if block["design"] is None:
        return f"{head}: {block['note']}"
    p, sigma = block["design"], block["sigma"]
    lines = [
        f"{head}: {p['n_runs']} runs = {p['n_cells']} cells x {p['n_seeds']} seeds, {p['df']} pure-error df"
        + (" (seed block)" if p["seed_block"] else "")
    ]
    if sigma is None:
        lines.append("  noise sd not given: detectable effects in noise sds (pass --noise-sd X or --pilot STUDY)")
    else:
        src = block["sigma_source"]
        extra = ""
        if block["pilot"]:
            extra = f"; one-sided 90% upper bound {block['pilot']['upper90']:.3g}"
        lines.append(f"  noise sd {sigma:.3g}{' (log scale)' if log else ''}: {src}{extra}")

    def amount(x_sd: float | None, x: float | None) -> str:
        if x_sd is None:
            return "-"
        s = f"{x_sd:.3g} noise sd"
        if x is not None:
            s = f"{x:.3g} ({s})" + (f", a ratio of {math.exp(x):.3g}" if log else "")
        return s

    n_main, n_pair = len(p["mains"]), len(p["pairs"])
    if n_main:
        lines.append(
            f"  main effect (each of {n_main}; two-sided t at alpha {p['alpha']:g}, as the report's "
            f"intervals): detectable |ME| >= {amount(p['mde_main_sd'], p['mde_main'])}"
        )
    if n_pair:
        lines.append(
            f"  pair synergy (each of {n_pair}; two-sided t at {p['alpha']:g}/{n_pair} = "
            f"{p['pair_level']:.3g}, Bonferroni as the report's simultaneous intervals): detectable |S| >= "
            f"{amount(p['mde_pair_sd'], p['mde_pair'])}"
        )
    if block["pilot"] and sigma is not None:
        k = block["pilot"]["upper90"] / sigma
        lines.append(
            f"  with the noise sd at its 90% upper bound: main {_n(_mul(p['mde_main'], k))}, synergy "
            f"{_n(_mul(p['mde_pair'], k))}"
        )
    if p["untested"]:
        shown = [f"{e} ({why})" for e, why in list(p["untested"].items())[:4]]
        more = len(p["untested"]) - len(shown)
        lines.append(f"  not tested: {'; '.join(shown)}{f'; and {more} more' if more > 0 else ''}")
    lines += [f"  {n}" for n in p["notes"]] + ([f"  note: {block['note']}"] if block["note"] else [])
    prop = block["proposal"]
    if prop is not None:
        if not prop["reached"]:
            lines.append(f"target MDE {prop['target']:g}: {prop['note']}")
        else:
            lines.append(f"target MDE {prop['target']:g}: {_entry_s(prop)}; {_cost_s(prop)}")
            if prop.get("next_smaller"):
                ns = prop["next_smaller"]
                lines.append(f"  next smaller: {_entry_s(ns)}: does not reach {prop['target']:g}")
    return "\n".join(lines)


def _mul(x: float | None, k: float) -> float | None:
    return None if x is None else x * k


def _entry_s(e: dict) -> str:
    seeds = e["seeds"]
    shown = f"{seeds}" if len(seeds) <= 8 else f"[{seeds[0]}..{seeds[-1]}]"
    return (
        f"{e['design']} x {e['n_seeds']} seeds {shown} = {e['trials']} trials ({e['cells']} cells), worst MDE "
        f"{_n(e['worst_mde'])} (main {_n(e['mde_main'])}, synergy {_n(e['mde_pair'])})"
    )
