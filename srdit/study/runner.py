"""Run a study on Ray Tune: one trial per cell x seed (a grid over an explicit list of trial specs), or an Optuna
search through Ray Tune's OptunaSearch.

- Local Ray by default (all cores); an existing cluster when RAY_ADDRESS is set (the state folder must then be on
  storage every node sees, or tracking must point at a server).
- Trial workers are reused (reuse_actors=True); torch threads per trial = CPUs per trial.
- Infrastructure failures (a worker or node lost) are retried by Tune (FailureConfig.max_failures); the trainer
  resumes from the checkpoint in the trial folder and the trial reuses its MLflow child run.
- A trial that diverges, runs out of memory or raises is recorded (status + reason) and the study goes on: the
  trainable catches it and reports it; it never becomes a Tune ERROR.
- Rerunning after an interruption runs only the trials whose child run is not done (MLflow is the source of truth).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from srdit.metric_registry import headline
from srdit.study.designs import Plan, plan_study, search_objectives, submission_order
from srdit.study.spec import StudySpec
from srdit.study.tracking import StudyTracking, is_done, open_study, resolve_uri
from srdit.study.trial import MAX_FAILURES, TrialContext, execute_trial, trainable

DRIVER_CPU = 0.01
"CPU share of a data-parallel trial's driver, which only waits on its workers."


@dataclass
class StudyRun:
    """What `run_study` did."""

    study: str
    uri: str
    experiment_id: str
    parent_run_id: str
    total: int
    "Trials in the plan (search: the budget)."
    skipped: int
    "Trials already done before this invocation."
    ran: int
    statuses: dict[str, int] = field(default_factory=dict)
    "status -> count over all trials of the plan, after this invocation."
    unfinished: list[str] = field(default_factory=list)
    "Trial keys still not done (interrupted, or infrastructure failures beyond the retries)."
    wall_s: float = 0.0
    state_dir: str = ""

    @property
    def complete(self) -> bool:
        return not self.unfinished


def state_paths(state_dir: str | Path, study: str) -> dict[str, Path]:
    root = Path(state_dir).resolve()
    return {"root": root, "trials": root / "trials" / study, "ray": root / "ray_results"}


@contextlib.contextmanager
def _ray_session(num_cpus: int | None, echo: Callable[[str], None]):
    """Ray for the body of the block: connect to RAY_ADDRESS or start a local Ray (shut down afterwards if this
    block started it). Ctrl-C inside ends the block quietly: finished trials are already recorded in MLflow."""
    import ray

    started = _ensure_ray(num_cpus, echo)
    try:
        yield
    except KeyboardInterrupt:
        echo("interrupted")
    finally:
        if started:
            ray.shutdown()


def _ensure_ray(num_cpus: int | None, echo: Callable[[str], None]) -> bool:
    """Connect to RAY_ADDRESS or start a local Ray; returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
    if address:
        echo(f"connecting to the Ray cluster at {address}")
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    return True


def progress_line(n: int, total: int, key: str, result: dict, primary: str | None = None) -> str:
    """One finished trial: `[n/total] key: status (reason)  <headline metrics>  <wall> s`. The metrics shown are
    the registry's headline of what the result carries (`srdit.metric_registry.headline`), the study's primary
    metric first."""
    r = result
    shown = headline([k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)], primary)
    extra = "  ".join(f"{k} {r[k]:.4g}" for k in shown)
    reason = f" ({r.get('reason')})" if r.get("reason") else ""
    return f"[{n}/{total}] {key}: {r.get('status', '?')}{reason}  {extra}  {r.get('trial_wall_s', 0):.0f} s"


def _progress_callback(total: int, done_before: int, echo: Callable[[str], None], primary: str | None = None):
    """The Tune callback that prints one line per finished trial (see `progress_line`)."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self):
            self.n = done_before

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            if r.get("status") == "excluded":
                echo(f"  search sample excluded: {r.get('reason', '')}")
                return
            self.n += 1
            echo(progress_line(self.n, total, r.get("trial_key") or trial.trial_id, r, primary))

        def on_trial_error(self, iteration, trials, trial, **info):
            key = trial.config.get("trial", {}).get("key", trial.trial_id)
            echo(f"  {key}: infrastructure failure (retried up to {MAX_FAILURES} times; rerun the study to resume)")

    return Progress()


def prepare(spec: StudySpec, state_dir: str | Path, plan: Plan | None = None) -> tuple[Plan, StudyTracking, dict]:
    """Plan, make the state folders, and open (create) the experiment and parent run in the driver."""
    plan = plan or plan_study(spec)
    paths = state_paths(state_dir, spec.name)
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    uri = resolve_uri(spec.tracking.uri, paths["root"])
    tags = {"design": plan.design, "factors": ",".join(spec.factor_names), "seeds": ",".join(map(str, spec.seeds)),
            "description": spec.description[:4000]}
    tracking = open_study(uri, spec.tracking.experiment or spec.name, spec.name, paths["root"],
                          artifact_location=spec.tracking.artifact_location, tags=tags)
    tracking.tag_parent({**tags, "n_cells": len(plan.cells), "n_trials": len(plan.trials) or plan.search_budget,
                         "n_excluded": len(plan.excluded), "state_dir": str(paths["root"])})
    tracking.describe(spec, plan)  # params, study YAML and resolved plan on the parent run
    return plan, tracking, paths


def run_study(spec: StudySpec, state_dir: str | Path, *, retry_failed: bool = False, num_cpus: int | None = None,
              max_failures: int = MAX_FAILURES, echo: Callable[[str], None] | None = None,
              plan: Plan | None = None) -> StudyRun:
    """Run (or resume) every unfinished trial of the study; returns a summary. Ray is started when not running."""
    echo = echo or (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    plan, tracking, paths = prepare(spec, state_dir, plan)
    existing = tracking.children_by_key()
    search = spec.design.kind == "search"
    if search:
        return _run_search(spec, plan, tracking, paths, existing, retry_failed, num_cpus, max_failures, echo, t0)
    todo, skipped = [], 0
    for t in plan.trials:
        run = existing.get(t.key)
        if run is not None and is_done(run, retry_failed):
            skipped += 1
            continue
        d = t.to_dict()
        if run is not None and not (retry_failed and is_done(run)):
            d["run_id"] = run.info.run_id  # unfinished: reuse it (the trainer resumes from its checkpoint)
        todo.append(d)
    todo = submission_order(todo)  # load must not line up with cells (wall-clock metrics)
    echo(f"study {spec.name}: {len(plan.trials)} trials ({len(plan.cells)} cells x {len(spec.seeds)} seeds, "
         f"design {plan.design}); {skipped} already done, {len(todo)} to run")
    if plan.excluded:
        echo(f"  {len(plan.excluded)} cell(s) excluded: " +
             "; ".join(f"{e['cell']} ({e['reason']})" for e in plan.excluded[:4]) +
             (" ..." if len(plan.excluded) > 4 else ""))
    ran = 0
    if todo:
        tracking.set_parent_status("RUNNING")
        with _ray_session(num_cpus, echo):
            _fit_grid(spec, plan, tracking, paths, todo, max_failures, echo, skipped)
            ran = len(todo)
    return _finish(spec, plan, tracking, paths, skipped, ran, echo, t0)


def _tuner_common(spec: StudySpec, paths: dict, max_failures: int, callbacks: list) -> tuple:
    from ray import tune

    r = spec.resources
    # A data-parallel trial is a driver: its workers take the CPUs and GPUs (placement group of the Train run).
    res = {"cpu": r.cpus, "gpu": r.gpus} if r.workers == 1 else {"cpu": DRIVER_CPU}
    wrapped = tune.with_resources(trainable, res)
    run_config = tune.RunConfig(
        name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(paths["ray"]),
        failure_config=tune.FailureConfig(max_failures=max_failures), verbose=0, callbacks=callbacks)
    return wrapped, run_config


def _trial_name(trial) -> str:
    t = trial.config.get("trial")
    return t["key"] if t else f"search_{trial.trial_id}"


def _fit_grid(spec, plan, tracking, paths, todo, max_failures, echo, skipped):
    from ray import tune

    ctx = _context(spec, tracking, paths, plan)
    progress = _progress_callback(len(plan.trials), skipped, echo, spec.metrics.primary)
    wrapped, run_config = _tuner_common(spec, paths, max_failures, [progress])
    tuner = tune.Tuner(
        wrapped,
        param_space={"trial": tune.grid_search(todo), "ctx": ctx},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=_max_concurrent(spec.resources),
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=run_config)
    return tuner.fit()


def _max_concurrent(r) -> int | None:
    """The study's cap; for data-parallel trials at most as many as the cluster can give workers to, so that
    waiting drivers do not pile up (Ray's guidance for Tune + Train)."""
    if r.max_concurrent is not None or r.workers == 1:
        return r.max_concurrent
    import ray

    have = ray.cluster_resources()
    fit = have.get("CPU", 0) // (r.cpus * r.workers + DRIVER_CPU)
    if r.gpus:
        fit = min(fit, have.get("GPU", 0) // r.gpus)
    return max(1, int(fit))


def _context(spec: StudySpec, tracking: StudyTracking, paths: dict, plan: Plan,
             search: bool = False) -> TrialContext:
    """What every trial needs besides its spec (it travels pickled in the Tune param space). Search trials also
    get the parsed study and the objectives."""
    return TrialContext(
        study=spec.name, design=plan.design, factors=tuple(spec.factor_names), uri=tracking.uri,
        experiment_id=tracking.experiment_id, parent_run_id=tracking.parent_run_id, trials_dir=str(paths["trials"]),
        cpus=spec.resources.cpus, gpus=spec.resources.gpus, workers=spec.resources.workers,
        train_storage=str(paths["ray"] / "train"),
        cwd=os.getcwd(),  # relative paths in the study are meant from here
        spec=spec if search else None, objectives=tuple(search_objectives(spec)) if search else ())


def _run_search(spec, plan, tracking, paths, existing, retry_failed, num_cpus, max_failures, echo, t0) -> StudyRun:
    """Optuna (OptunaSearch) over technique switches and knobs. The Optuna study persists in
    <state>/optuna/<study>.db, so a rerun continues the same search; unfinished children are re-queued first (same
    params -> same trial key -> same MLflow run and checkpoint)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    objectives = search_objectives(spec)
    directions = [spec.metrics.all()[o] for o in objectives]
    storage = _optuna_storage(paths, spec)
    pending = [p for p in (_search_point(spec, r) for r in existing.values() if not is_done(r, retry_failed)) if p]
    n_done = _search_samples_done(storage, spec, existing)
    remaining = max(0, spec.design.trials - n_done)
    echo(f"study {spec.name}: search, budget {spec.design.trials} trials; {n_done} already done, "
         f"{remaining} to run" + (f" ({len(pending[:remaining])} interrupted, re-queued)" if pending else ""))
    ran = 0
    if remaining:
        space: dict[str, Any] = {f"tech.{n}": tune.choice([0, 1]) for n in spec.factor_names}
        for p in spec.design.space:
            if p.type == "choice":
                space[p.key] = tune.choice(list(p.choices))
            elif p.type == "int":
                space[p.key] = (tune.lograndint if p.log else tune.randint)(int(p.low), int(p.high) + 1)
            else:
                space[p.key] = (tune.loguniform if p.log else tune.uniform)(p.low, p.high)
        searcher = OptunaSearch(metric=objectives if len(objectives) > 1 else objectives[0],
                                mode=directions if len(directions) > 1 else directions[0],
                                seed=spec.design.seed + n_done,  # a continued search draws new samples
                                points_to_evaluate=pending[:remaining] or None,
                                study_name=spec.name, storage=storage)
        ctx = _context(spec, tracking, paths, plan, search=True)
        tracking.set_parent_status("RUNNING")
        with _ray_session(num_cpus, echo):
            conc = spec.design.max_concurrent or _max_concurrent(spec.resources)  # needs Ray up
            search_alg = ConcurrencyLimiter(searcher, max_concurrent=conc) if conc else searcher
            progress = _progress_callback(spec.design.trials, n_done, echo, spec.metrics.primary)
            wrapped, run_config = _tuner_common(spec, paths, max_failures, [progress])
            tune.Tuner(wrapped, param_space={**space, "ctx": ctx},
                       tune_config=tune.TuneConfig(search_alg=search_alg, num_samples=remaining, reuse_actors=True,
                                                   trial_name_creator=_trial_name,
                                                   trial_dirname_creator=_trial_name),
                       run_config=run_config).fit()
            ran = remaining
    return _finish(spec, plan, tracking, paths, n_done, ran, echo, t0)


def _optuna_storage(paths: dict, spec: StudySpec):
    import optuna

    (paths["root"] / "optuna").mkdir(exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{paths['root'] / 'optuna' / (spec.name + '.db')}")


def _search_samples_done(storage, spec: StudySpec, existing: dict) -> int:
    """Search samples already evaluated: the told trials of the persisted Optuna study (a repeated proposal is a
    sample too), at least the done MLflow children."""
    import optuna

    told = 0
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        told = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    except KeyError:  # no such study yet
        pass
    return max(told, sum(is_done(r) for r in existing.values()))


def _search_point(spec: StudySpec, run) -> dict | None:
    tags = run.data.tags
    if not all(f"tech.{n}" in tags for n in spec.factor_names):
        return None
    point = {f"tech.{n}": int(tags[f"tech.{n}"]) for n in spec.factor_names}
    params = json.loads(tags.get("search.params", "{}"))
    point.update({p.key: params[p.key] for p in spec.design.space if p.key in params})
    if any(p.key not in point for p in spec.design.space):
        return None
    return point


def _finish(spec, plan, tracking, paths, skipped, ran, echo, t0) -> StudyRun:
    children = tracking.children_by_key()
    if spec.design.kind == "search":
        keys = list(children)
        total = spec.design.trials
    else:
        keys = [t.key for t in plan.trials]
        total = len(keys)
    statuses: dict[str, int] = {}
    unfinished = []
    for k in keys:
        r = children.get(k)
        if r is None or not is_done(r):
            unfinished.append(k)
            continue
        s = r.data.tags.get("status", "?")
        statuses[s] = statuses.get(s, 0) + 1
    n_samples = None
    if spec.design.kind == "search":
        n_samples = _search_samples_done(_optuna_storage(paths, spec), spec, children)
        if n_samples < total:
            unfinished.append(f"(search: {total - n_samples} sample(s) of the budget not run)")
    wall = time.perf_counter() - t0
    complete = not unfinished
    tracking.tag_parent({"complete": str(complete).lower(),
                         **{f"n_{s}": n for s, n in statuses.items()}})
    tracking.set_parent_status("FINISHED" if complete else "KILLED")
    summary = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    if n_samples is None:
        echo(f"study {spec.name}: {sum(statuses.values())}/{total} trials done ({summary or 'none'}) in {wall:.0f} s")
    else:
        echo(f"study {spec.name}: {min(n_samples, total)}/{total} search samples evaluated, {sum(statuses.values())} "
             f"distinct runs ({summary or 'none'}) in {wall:.0f} s")
    if unfinished:
        echo(f"  {len(unfinished)} trial(s) unfinished; rerun the same command (or `srdit study resume`) to "
             f"finish them")
    return StudyRun(spec.name, tracking.uri, tracking.experiment_id, tracking.parent_run_id, total, skipped, ran,
                    statuses, unfinished, wall, str(paths["root"]))


def run_plain(spec: StudySpec, state_dir: str | Path, plan: Plan | None = None,
              echo: Callable[[str], None] | None = None) -> StudyRun:
    """The same trials in a plain loop in this process (no Ray): the benchmark's reference."""
    echo = echo or (lambda s: None)
    t0 = time.perf_counter()
    plan, tracking, paths = prepare(spec, state_dir, plan)
    existing = tracking.children_by_key()
    ctx = _context(spec, tracking, paths, plan)
    ran = skipped = 0
    for t in plan.trials:
        run = existing.get(t.key)
        if run is not None and is_done(run):
            skipped += 1
            continue
        out = execute_trial(t.to_dict() | ({"run_id": run.info.run_id} if run else {}), ctx)
        ran += 1
        echo(f"{t.key}: {out['status']}")
    return _finish(spec, plan, tracking, paths, skipped, ran, echo, t0)
