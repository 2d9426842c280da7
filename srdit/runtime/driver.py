"""Run a study on Ray Tune: one trial per cell x seed (a grid over an explicit list of trial specs), or an Optuna
search through Ray Tune's OptunaSearch.

- A private local Ray by default (all cores, every Ray process listening on 127.0.0.1 only); an existing cluster
  only when RAY_ADDRESS / `--address` is given (the state folder must then be on storage every node sees, or
  tracking must point at a server). The line "Ray: ..." says which one is used.
- Preflight (srdit.study.preflight) before anything is recorded: every input of the trials to run, the metrics,
  and whether a trial fits the cluster; a problem raises PreflightError (the CLI: exit 2).
- Trial workers are reused (reuse_actors=True); torch threads per trial = CPUs per trial.
- Infrastructure failures (a worker or node lost) are retried by Tune (FailureConfig.max_failures); the trainer
  resumes from the checkpoint in the trial folder and the trial reuses its MLflow child run. A trial whose worker
  Ray's memory monitor kills is recorded as `oom` by the driver.
- A trial that diverges, runs out of memory or raises is recorded (status + reason) and the study goes on: the
  trainable catches it and reports it; it never becomes a Tune ERROR.
- Rerunning after an interruption runs only the trials whose child run is not done (MLflow is the source of truth;
  `srdit.runtime.tracking.is_done` is the rule: crashed trials run again, diverged / oom ones stay).
- A trial whose run key matches a finished run anywhere in the same MLflow store (another study, an earlier version
  of this one) is adopted from it instead of trained (`srdit.runtime.reuse`; `reuse=False` / `--no-reuse` opts
  out); when nothing is left to run, Ray is not started at all.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srdit import stop
from srdit.analysis.results import INFRASTRUCTURE
from srdit.metric_registry import headline
from srdit.provenance import plugin_sources, srdit_code_version
from srdit.runtime import attempts, shipping
from srdit.runtime.console import StudyView, tune_callback
from srdit.runtime.jobs import EvaluationJob, Job, TrainingJob, TrialJob, trial_job
from srdit.runtime.ray_parts import shutdown_ray
from srdit.runtime.state import StudyState
from srdit.runtime.tracking import StudyTracking, has_ended, is_done
from srdit.runtime.worker import MAX_FAILURES, TrialContext, execute_trial, is_oom, record_outcome, trainable
from srdit.study import preflight
from srdit.study.designs import Plan, plan_study, search_objectives, submission_order
from srdit.study.spec import StudySpec

HOST_TRIAL_RESOURCES = {"cpu": preflight.HOST_TRIAL_CPU, "memory": 1 << 20}
"""What the Tune trial hosting a data-parallel run reserves: no CPU (its workers' bundles hold the CPUs and GPUs);
Tune needs some resource in a bundle, so 1 MiB of Ray's `memory` resource."""


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
    reused: int = 0
    "Trials adopted from finished runs of the store by this invocation (`srdit.runtime.reuse`)."

    @property
    def complete(self) -> bool:
        return not self.unfinished


@contextlib.contextmanager
def _ray_session(num_cpus: int | None, echo: Callable[[str], None], address: str | None = None, plugins: tuple = ()):
    """Ray for the body of the block: the cluster at `address` / RAY_ADDRESS, else a private local Ray bound to
    127.0.0.1 (shut down afterwards if this block started it), its workers given the file and folder `plugins`
    (`srdit.runtime.shipping`). Ctrl-C inside ends the block quietly: finished trials are already recorded in
    MLflow."""

    with _ray_started(num_cpus, echo, address, plugins):
        try:
            yield
        except KeyboardInterrupt:
            echo("interrupted")


QUIET_ENV = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
"Environment of the driver and every trial worker: library chatter that srdit's own lines replace."


@contextlib.contextmanager
def _ray_started(num_cpus: int | None, echo: Callable[[str], None], address: str | None = None, plugins: tuple = ()):
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        unshipped = [s["name"] for s in plugins if s.get("shipped")]
        note = f" (plugins {', '.join(unshipped)} not shipped: workers load them from these paths)" if unshipped else ""
        echo("Ray: the Ray this process is already connected to" + note)
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    with tempfile.TemporaryDirectory(prefix="srdit-plugins-") as staging:
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": "WARNING",
            "log_to_driver": True,
            # SIGINT or SIGHUP to a trial's worker process stops that trial with a checkpoint at its current step;
            # the file and folder plugins travel as py_modules (uploaded by ray.init, unpacked on every node)
            "runtime_env": shipping.runtime_env(plugins, staging),
        }
        # MLflow prints "View run / View experiment" links to stdout when a run ends on a tracking server: twice
        # per trial, from every worker; the study's own lines name the server once
        kwargs["runtime_env"]["env_vars"] = {**kwargs["runtime_env"].get("env_vars", {}), **QUIET_ENV}
        with _ray_connected(num_cpus, echo, address, kwargs):
            yield


@contextlib.contextmanager
def _ray_connected(num_cpus: int | None, echo: Callable[[str], None], address: str | None, kwargs: dict):
    import ray

    if address:
        echo(f"Ray: the cluster at {address} (RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE', 'unset')})")
        ray.init(address=address, **kwargs)
        try:
            yield
        finally:
            ray.shutdown()
        return
    with _loopback_only():
        with _without_auth_advice():
            # "local": never join a `ray start` cluster. No workers prestarted for the driver: Ray would start one
            # per CPU in the default environment, which a study's trials never use (their job carries a runtime_env
            # with the setup hook), so each cost a Python start-up, competing with the study's own start
            ray.init(
                address="local", num_cpus=num_cpus, _system_config={"prestart_worker_first_driver": False}, **kwargs
            )
        auth = os.environ.get("RAY_AUTH_MODE") or "token, Ray's default"
        echo(f"Ray: a private local Ray on 127.0.0.1 ({ray.cluster_resources().get('CPU', 0):g} CPUs; auth {auth})")
        try:
            yield
        finally:
            shutdown_ray()


@contextlib.contextmanager
def _without_auth_advice():
    """Keep Ray's "Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out" off the console while
    a private local Ray starts: it reads as advice to turn authentication off; srdit's own line names the mode."""
    import logging

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")

    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


@contextlib.contextmanager
def _loopback_only():
    """Make a local Ray take 127.0.0.1 as its node address, so that GCS, raylet, object manager, agents and
    workers listen on loopback only. On Linux Ray replaces a loopback node address by the machine's address unless
    its single-machine mode is on (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read by Ray's processes from the
    environment and by this one from `ray._private.ray_constants`)."""
    import ray._private.ray_constants as rc

    old_flag, rc.ENABLE_RAY_CLUSTER = rc.ENABLE_RAY_CLUSTER, False
    try:
        with scoped_env({rc.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}):
            yield
    finally:
        rc.ENABLE_RAY_CLUSTER = old_flag


def progress_line(n: int, total: int, key: str, result: dict, primary: str | None = None) -> str:
    """One finished trial: `[n/total] key: status (reason)  <headline metrics>  <wall> s`. The metrics shown are
    the registry's headline of what the result carries (`srdit.metric_registry.headline`), the study's primary
    metric first."""
    r = result
    shown = headline([k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)], primary)
    extra = "  ".join(f"{k} {r[k]:.4g}" for k in shown)
    reason = f" ({r.get('reason')})" if r.get("reason") else ""
    return f"[{n}/{total}] {key}: {r.get('status', '?')}{reason}  {extra}  {r.get('trial_wall_s', 0):.0f} s"


def _trial_error(trial) -> str:
    """The last error of a Tune trial, as one line of text: the exception Tune pickled, else the last failure of its
    error text. Tune writes both into the trial's folder on the driver (`Trial.pickled_error_file`, `Trial.error_file`) just
    before it calls a callback (`Trial.handle_error`); their copies under the storage path (`get_pickled_error`,
    `get_error`) appear only at Tune's next sync. "" when Tune recorded no error."""
    from ray import cloudpickle

    text = ""
    try:
        if trial.pickled_error_file and os.path.isfile(trial.pickled_error_file):
            with open(trial.pickled_error_file, "rb") as f:
                e = cloudpickle.load(f)
            text = f"{type(e).__name__}: {e}"
        elif trial.error_file and os.path.isfile(trial.error_file):  # every failure so far, appended: the last one
            text = "Failure # " + Path(trial.error_file).read_text().split("Failure # ")[-1]
    except Exception:  # noqa: BLE001 - an unreadable record: no reason rather than no record
        pass
    return " ".join(text.split())  # Ray's messages span lines (the actor's id, pid, ...)


def _progress_callback(
    total: int,
    done_before: int,
    echo: Callable[[str], None],
    primary: str | None = None,
    ctx: TrialContext | None = None,
    jobs: dict[str, Job] | None = None,
    max_failures: int = MAX_FAILURES,
):
    """The Tune callback that prints one line per finished trial (see `progress_line`), records a trial whose
    worker Ray killed for memory as `oom` (Tune's retries of it are then answered from that record), and records a
    trial that Ray lost beyond `max_failures` retries (a node or worker gone: any Tune ERROR that is not a memory
    kill) as `crashed` with crash_cause `infrastructure`: the trainable catches every exception of the training
    code and reports it as a result, so a Tune ERROR is never evidence about the techniques (the analysis leaves
    it out with a note; a rerun retries it). `jobs`: the grid's jobs by key (a Tune trial's config names its job
    by key); a search sample, whose key only its worker knows, is left unrecorded (unfinished)."""
    jobs = jobs or {}
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self):
            self.n = done_before
            self.oom: set[str] = set()
            self.restarts: dict[str, int] = {}  # trial key -> the last attempt reported
            self.polled = 0.0

        def _record_oom(self, trial) -> bool:
            job = jobs.get(trial.config.get("job"))
            error = _trial_error(trial)
            if ctx is None or job is None or not is_oom(error) or job.key in self.oom:
                return job is not None and job.key in self.oom
            reason = "killed for memory by Ray: " + error[:400]
            members = job.todo()  # a shared training: every member
            try:
                for m in members:
                    record_outcome(m, ctx, "oom", reason)
            except Exception as e:  # noqa: BLE001 - the driver goes on; the trial stays unfinished
                echo(f"  {job.key}: could not record oom ({type(e).__name__}: {e})")
                return False
            self.oom.add(job.key)
            self.n += len(members)
            echo(progress_line(self.n, total, job.key, {"status": "oom", "reason": reason[:120]}, primary))
            return True

        def on_trial_recover(self, iteration, trials, trial, **info):
            if not self._record_oom(trial) and ctx is not None and trial.config.get("job") in jobs:
                attempts.end(Path(ctx.trials_dir) / trial.config["job"], "lost by Ray: " + _trial_error(trial)[:300])

        def on_step_end(self, iteration, trials, **info):
            if ctx is not None and time.monotonic() - self.polled > 1.0:  # a trial started again: one line
                self.polled = time.monotonic()
                for t in trials:
                    key = t.config.get("job")
                    if t.status == "RUNNING" and key in jobs:
                        for line in attempts.restart_lines(Path(ctx.trials_dir) / key, key, self.restarts):
                            echo(line)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            if r.get("trial_key") in self.oom:
                return  # already counted when recorded
            if r.get("status") == "interrupted":  # told to stop: not done, a rerun resumes it
                if not r.get("reason", "").startswith("not started"):
                    echo(f"  {r.get('trial_key')}: {r.get('reason', 'interrupted')}")
                return
            if r.get("status") == "excluded":
                echo(f"  search sample excluded: {r.get('reason', '')}")
                return
            n = int(r.get("members_done", 1))
            self.n += n
            shared = f" (+{n - 1} evaluation(s) of the same training)" if n > 1 else ""
            echo(progress_line(self.n, total, (r.get("trial_key") or trial.trial_id) + shared, r, primary))

        def on_trial_error(self, iteration, trials, trial, **info):
            if self._record_oom(trial):
                return
            key = trial.config.get("job") or trial.trial_id
            error = _trial_error(trial)
            job = jobs.get(trial.config.get("job"))
            if ctx is not None and job is not None:
                reason = f"lost by Ray after {max_failures} retries: " + error[:400]
                try:
                    for m in job.todo():
                        record_outcome(m, ctx, "crashed", reason, INFRASTRUCTURE)
                except Exception as e:  # noqa: BLE001 - the driver goes on; the trial stays unfinished
                    echo(f"  {key}: could not record the failure ({type(e).__name__}: {e})")
            echo(
                f"  {key}: infrastructure failure after {max_failures} retries "
                f"({error[:200]}); rerun the study to resume it"
            )

    return Progress()


def prepare(
    spec: StudySpec, state_dir: str | Path | StudyState, plan: Plan | None = None
) -> tuple[Plan, StudyTracking, StudyState]:
    """Plan, make the state folders, and open (create) the experiment and parent run in the driver."""
    plan = plan or plan_study(spec)
    state = StudyState.of(spec, state_dir)
    state.make_folders()
    tags = {
        "design": plan.design,
        "factors": ",".join(spec.factor_names),
        "seeds": ",".join(map(str, spec.seeds)),
        "description": spec.description[:4000],
    }
    tracking = state.open(tags)
    tracking.tag_parent(
        {
            **tags,
            "n_cells": len(plan.cells),
            "n_trials": len(plan.trials) or plan.search_budget,
            "n_trainings": plan.cost()["trainings"],
            "n_excluded": len(plan.excluded),
            "state_dir": str(state.root),
        }
    )
    tracking.describe(spec, plan)  # params, study YAML and resolved plan on the parent run
    return plan, tracking, state


def run_study(
    spec: StudySpec,
    state_dir: str | Path,
    *,
    retry_failed: bool = False,
    num_cpus: int | None = None,
    max_failures: int = MAX_FAILURES,
    echo: Callable[[str], None] | None = None,
    plan: Plan | None = None,
    address: str | None = None,
    share: bool = True,
    reuse: bool = True,
    live: StudyView | None = None,
) -> StudyRun:
    """Run (or resume) every unfinished trial of the study; returns a summary. Ray is started when not running
    (the cluster at `address` / RAY_ADDRESS, else a private local Ray on loopback) and some trial is left to run.

    With `reuse` (the default; grid designs), a trial without a run in this study whose run key matches a finished
    run in the store is adopted from it first (`srdit.runtime.reuse.adopt`) and not run; a training whose training
    key matches a finished training of another study in the store is not trained again: its members are evaluated
    from that training's folder (`from_finished_trainings`, `srdit.runtime.worker.evaluate_from`).

    One Ray trial per training of the plan (`Plan.trainings`): trials whose configs train the same model train
    once and are evaluated under each member's settings (`srdit.runtime.worker.execute_group`); `share=False`
    (`--no-share`; ignored when `plan` is given) trains every trial. A fixed-checkpoint study runs one
    evaluation trial per trial. A group whose members are all done is skipped; a partly done one evaluates only
    its missing members.

    Raises `PreflightError` (nothing recorded, no trial started) when an input of a trial to run is missing, a
    study metric is not reported by its runs, or a trial cannot fit the cluster.

    `live`: the study's console (`srdit.runtime.console.StudyView`; `echo` then prints through it), fed the
    running trials' progress."""
    echo = echo or (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    plan = plan or plan_study(spec, share=share)
    state = StudyState.of(spec, state_dir)
    existing = state.existing_runs()
    if spec.design.kind == "search":
        preflight.check(spec, plan, [], _local_nodes(num_cpus, address))
        return _run_search(spec, plan, state, existing, retry_failed, num_cpus, max_failures, echo, t0, address, live)
    cwd = os.getcwd()  # relative paths in the study are meant from here
    todo, skipped = [], 0
    for t in plan.trials:
        run = existing.get(t.key)
        if run is not None and is_done(run, retry_failed):
            skipped += 1
            continue
        # unfinished: reuse its run (the trainer resumes from its checkpoint)
        todo.append(
            trial_job(t, cwd, run.info.run_id if run is not None and not (retry_failed and is_done(run)) else None)
        )
    todo = submission_order(todo)  # load must not line up with cells (wall-clock metrics)
    sources = reuse_sources(spec, state, [j for j in todo if j.run_id is None]) if reuse else {}
    adopting = [j for j in todo if j.key in sources]
    todo = [j for j in todo if j.key not in sources]
    # an adopted trial needs no inputs; a local run checks the resources with the files (a cluster: once up)
    preflight.check(spec, plan, [j.trial.to_dict() for j in todo], _local_nodes(num_cpus, address) if todo else None)
    adopted, prepared = 0, None
    if sources:
        prepared = plan, tracking, state = prepare(spec, state, plan)
        adopted = _adopt(spec, plan, tracking, state, sources, adopting, echo)
        skipped += adopted
        existing = state.existing_runs()  # adopted runs are done members of their trainings
    jobs = work_units(plan, todo, existing)
    if reuse and jobs:
        jobs = from_finished_trainings(spec, state, jobs, echo)
    if not jobs:
        plan, tracking, state = prepared or prepare(spec, state, plan)
        echo(f"study {spec.name}: {len(plan.trials)} trials; all done")
        return _finish(spec, plan, tracking, state, skipped, 0, echo, t0, adopted)
    tracking = None
    plugins = study_plugins(spec)  # their code versions, read once: the copies shipped are checked against them
    if live is not None:  # the ETA from here on
        live.begin(spec.name, len(plan.trials), skipped, spec.base.train.steps)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # A private local Ray takes seconds to start: the experiment and parent run are made meanwhile. On a
        # cluster, nothing is recorded before the cluster's resources are checked.
        early = pool.submit(prepare, spec, state, plan) if _starts_local_ray(address) else None
        with _ray_session(num_cpus, echo, address, plugins):
            _check_cluster(spec)
            plan, tracking, state = early.result() if early else prepare(spec, state, plan)
            n_todo = sum(len(j.todo()) for j in jobs)
            n_train = sum(1 for j in jobs if isinstance(j, TrainingJob) and not j.members[0].done)
            echo(
                f"study {spec.name}: {len(plan.trials)} trials ({len(plan.cells)} cells x {len(spec.seeds)} seeds, "
                f"design {plan.design}); {skipped} already done, {n_todo} to run in {n_train} training(s)"
                + (f" (fixed checkpoint {plan.checkpoint})" if plan.checkpoint else "")
            )
            if plan.excluded:
                echo(
                    f"  {len(plan.excluded)} cell(s) excluded: "
                    + "; ".join(f"{e['cell']} ({e['reason']})" for e in plan.excluded[:4])
                    + (" ..." if len(plan.excluded) > 4 else "")
                )
            tracking.set_parent_status("RUNNING")
            _fit_grid(spec, plan, tracking, state, jobs, max_failures, echo, skipped, plugins, live)
    if tracking is None:  # interrupted before anything was recorded
        raise KeyboardInterrupt
    return _finish(spec, plan, tracking, state, skipped, n_todo, echo, t0, adopted)


def reuse_sources(spec: StudySpec, state: StudyState, jobs: list[TrialJob]) -> dict:
    """trial key -> `srdit.runtime.reuse.Source`: the finished run in the study's MLflow store whose run key equals
    the trial's (grid designs only; {} when the store does not exist yet). Reads only."""
    from srdit.runtime.reuse import find_sources

    if spec.design.kind == "search" or not jobs:
        return {}
    return find_sources(state.uri, {j.key: j.keys.run for j in jobs})


def _adopt(spec, plan, tracking, state: StudyState, sources: dict, jobs: list[TrialJob], echo) -> int:
    """Adopt every trial of `sources` (trial key -> Source; `jobs` holds their jobs) into the study's run tree;
    returns how many."""
    from srdit.runtime.reuse import adopt, format_reused
    from srdit.runtime.worker import run_name, trial_params, trial_tags

    ctx = _context(spec, tracking, state, plan)
    job_of = {j.key: j for j in jobs}
    counts: dict[str, int] = {}
    for t in plan.trials:
        src = sources.get(t.key)
        if src is None:
            continue
        adopt(
            tracking.uri,
            tracking.experiment_id,
            tracking.parent_run_id,
            t.key,
            run_name(t),
            trial_tags(job_of[t.key], ctx),
            trial_params(t),
            src,
        )
        counts[src.study] = counts.get(src.study, 0) + 1
    n = sum(counts.values())
    echo(
        f"study {spec.name}: {format_reused(counts, len(plan.trials))} (finished runs with the same run key: "
        f"training config, data, code and evaluation settings; `--no-reuse` trains them again)"
    )
    return n


def from_finished_trainings(spec: StudySpec, state: StudyState, jobs: list[Job], echo) -> list[Job]:
    """Training jobs (`work_units`) whose training has not started in this study but whose training key matches a
    finished training in the store whose folder is reachable from here (its result, config and final EMA weights):
    turned into evaluation jobs (`source`: that training's folder; `execute_group` evaluates every member from
    it, no training)."""
    from srdit.runtime.reuse import TRAINING_KEY, find_sources

    fresh = [
        j for j in jobs if isinstance(j, TrainingJob) and not j.members[0].done and not any(m.run_id for m in j.members)
    ]
    if not fresh:
        return jobs
    # another study's trainings only: within the study, sharing is the plan's (`--no-share` trains every trial)
    found = find_sources(
        state.uri, {j.key: j.members[0].keys.training for j in fresh}, TRAINING_KEY, exclude_study=spec.name
    )
    if not found:
        return jobs
    from srdit.train import snapshot_steps  # here: torch is imported only when a finished training is found

    out: list[Job] = []
    counts: dict[str, int] = {}
    for j in jobs:
        src = found.get(j.key) if isinstance(j, TrainingJob) else None
        folder = Path(src.trial_dir) if src is not None and src.trial_dir else None
        usable = folder is not None and (folder / "result.json").is_file()
        if usable:  # what srdit.train.evaluate_trained needs: the recorded config and the final EMA weights
            usable = False
            with contextlib.suppress(OSError, ValueError, KeyError):
                res = json.loads((folder / "result.json").read_text())
                usable = "config" in res and (
                    res.get("step") in snapshot_steps(folder) or (folder / "checkpoints" / "last.pt").is_file()
                )
        if not usable or src is None:
            out.append(j)
            continue
        members = tuple(j.todo())
        out.append(EvaluationJob(members, str(folder), j.group, src.train_run_id, src.study))
        counts[src.study] = counts.get(src.study, 0) + len(members)
    if counts:
        where = ", ".join(f"study {s} ({n})" for s, n in counts.items())
        echo(
            f"study {spec.name}: {sum(counts.values())} trial(s) evaluated from finished trainings of {where} "
            f"(same training key, other evaluation settings; `--no-reuse` trains them)"
        )
    return out


def work_units(plan: Plan, todo: list[TrialJob], existing: dict) -> list[Job]:
    """The Ray trials of the unfinished trials `todo` (in submission order): one `TrainingJob` per training of the
    plan with an unfinished member (`srdit.runtime.worker.execute_group`: its members in plan order, the training
    run first, done ones marked done with their run id and folder), a `TrainingJob` of one for a training of one,
    one `EvaluationJob` per trial for a fixed checkpoint."""
    if plan.checkpoint:
        return [EvaluationJob((j,), plan.checkpoint) for j in todo]
    pending = {j.key: j for j in todo}
    specs = {t.key: t for t in plan.trials}
    group_of = {k: g for g in plan.trainings for k in g.members}
    cwd = os.getcwd()
    units: list[Job] = []
    seen = set()
    for j in todo:
        g = group_of.get(j.key)
        if g is None or len(g.members) == 1:
            units.append(TrainingJob((j,)))
            continue
        if g.key in seen:
            continue
        seen.add(g.key)
        members = []
        for k in g.members:
            if k in pending:
                members.append(pending[k])
            else:  # done: kept for its folder and run id (the training run), not run again
                run = existing[k]
                members.append(
                    trial_job(specs[k], cwd).with_run(
                        run.info.run_id, done=True, trial_dir=run.data.tags.get("trial_dir", "")
                    )
                )
        units.append(TrainingJob(tuple(members), g.key))  # an adopted run's trial_dir: its source's
    return units


def _is_loopback() -> bool:
    """Whether the connected Ray's node address is loopback (a private local Ray of `_ray_started`)."""
    import ray

    try:
        return ray.util.get_node_ip_address().startswith("127.")
    except Exception:  # noqa: BLE001 - not connected
        return False


def local_node() -> dict[str, float]:
    """This machine's CPUs and GPUs as a local Ray started here would count them: Ray's own GPU detection (NVML,
    honouring CUDA_VISIBLE_DEVICES), which, unlike asking torch, costs no torch import (~2 s) before a study starts."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    try:
        gpus = get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
    except Exception:  # noqa: BLE001 - no driver / no library: no GPU, as Ray would conclude
        gpus = 0
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}


def _starts_local_ray(address: str | None) -> bool:
    """Whether `_ray_started` will start a private local Ray (not join a cluster or the Ray already connected)."""
    import ray

    return not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())


def _local_nodes(num_cpus: int | None, address: str | None) -> list | None:
    """This machine as the local Ray will see it, or None when the study runs on a cluster (checked once up)."""
    if not _starts_local_ray(address):
        return None
    return [{**local_node(), "CPU": float(num_cpus or os.cpu_count() or 1)}]


def ray_nodes() -> list[dict[str, float]]:
    """The alive nodes of the connected Ray cluster and their total CPU / GPU."""
    import ray

    return [
        {"CPU": float(n["Resources"].get("CPU", 0)), "GPU": float(n["Resources"].get("GPU", 0))}
        for n in ray.nodes()
        if n.get("Alive")
    ]


def _check_cluster(spec: StudySpec) -> None:
    """Refuse (PreflightError) a trial that the connected Ray cluster cannot hold."""
    import ray

    problems = preflight.resource_problems(
        spec, ray_nodes(), "the Ray cluster" if len(ray.nodes()) > 1 else "this Ray node"
    )
    if problems:
        raise preflight.PreflightError(spec.name, problems)


def _tuner_common(
    spec: StudySpec, state: StudyState, max_failures: int, callbacks: list, jobs: dict[str, Job] | None = None
) -> tuple:
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    r = spec.resources
    # A data-parallel trial is a driver: its workers take the CPUs and GPUs (placement group of the Train run).
    res = {"cpu": r.cpus, "gpu": r.gpus} if r.workers == 1 else HOST_TRIAL_RESOURCES
    # the grid's jobs travel once through Ray's object store; a Tune trial's config names its job by key
    wrapped = tune.with_resources(tune.with_parameters(trainable, jobs=jobs) if jobs else trainable, res)
    run_config = tune.RunConfig(
        name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=str(state.ray),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        verbose=0,
        # Tune's CSV and JSON logs of each trial, as Tune adds them by default; not its TensorBoard files, whose
        # writer imports torch into the driver (seconds before the first trial starts; `_fit`)
        callbacks=[*callbacks, CSVLoggerCallback(), JsonLoggerCallback()],
    )
    return wrapped, run_config


def _trial_name(trial) -> str:
    return trial.config.get("job") or f"search_{trial.trial_id}"


def _fit_grid(
    spec, plan, tracking, state: StudyState, jobs: list[Job], max_failures, echo, skipped, plugins=None, live=None
):
    from ray import tune

    ctx = _context(spec, tracking, state, plan, plugins=plugins)
    by_key = {j.key: j for j in jobs}
    progress = _progress_callback(len(plan.trials), skipped, echo, spec.metrics.primary, ctx, by_key, max_failures)
    # the live view reads the progress callback's count: it comes second
    callbacks = [progress] + ([tune_callback(live, progress, by_key)] if live is not None else [])
    wrapped, run_config = _tuner_common(spec, state, max_failures, callbacks, by_key)
    tuner = tune.Tuner(
        wrapped,
        param_space={"job": tune.grid_search(list(by_key)), "ctx": ctx},
        tune_config=tune.TuneConfig(
            reuse_actors=True,
            max_concurrent_trials=_max_concurrent(spec.resources),
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=run_config,
    )
    _fit(tuner, echo, state)


def _fit(tuner, echo: Callable[[str], None], state: StudyState) -> None:
    """`tuner.fit()`, where a failure of Ray itself (its memory monitor killing a worker while Tune waits on it, a
    lost node) ends this round of trials, never the driver: the trials recorded so far are kept, the rest stay
    unfinished, and `_finish` says so and how to resume (the parent run is not left RUNNING).

    SIGTERM / SIGINT / SIGHUP (`srdit.stop`) ask the running trials to stop: the driver writes the study's stop
    file, each running trial writes a checkpoint at its current step and ends `interrupted`, trials not started
    end at once without a run, and the fit returns. A second signal, or the grace period over, stops at once."""

    def stopping(name: str) -> None:
        state.stop_file.write_text(name)
        echo(
            f"{name}: stopping; the running trials write a checkpoint at their current step "
            f"(up to {stop.grace_s():.0f} s; a second signal stops at once)"
        )

    state.stop_file.unlink(missing_ok=True)  # a stop file of an earlier run
    try:
        with stop.on_signals(on_first=stopping), scoped_env(TUNE_LOGGERS_ENV):  # after ray.init (its SIGTERM handler)
            tuner.fit()
    except Exception as e:
        if not (type(e).__module__.split(".")[0] == "ray" or is_oom(e)):
            raise
        what = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        echo(f"  Ray stopped the trials early ({what}); the trials recorded so far are kept")
    finally:
        state.stop_file.unlink(missing_ok=True)


TUNE_LOGGERS_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
"While Tune runs: it adds none of its default loggers; `_tuner_common` passes its CSV and JSON loggers itself."


@contextlib.contextmanager
def scoped_env(values: Mapping[str, str]):
    """These environment variables of this process for the body of the block, restored afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _max_concurrent(r) -> int | None:
    """The study's cap; for data-parallel trials at most as many as the cluster can give workers to, so that
    waiting drivers do not pile up (Ray's guidance for Tune + Train)."""
    if r.max_concurrent is not None or r.workers == 1:
        return r.max_concurrent
    import ray

    have = ray.cluster_resources()
    fit = have.get("CPU", 0) // (r.cpus * r.workers)
    if r.gpus:
        fit = min(fit, have.get("GPU", 0) // r.gpus)
    return max(1, int(fit))


def _context(
    spec: StudySpec,
    tracking: StudyTracking,
    state: StudyState,
    plan: Plan,
    search: bool = False,
    plugins: tuple | None = None,
) -> TrialContext:
    """What every trial needs besides its job (it travels pickled in the Tune param space). Search trials also
    get the parsed study and the objectives. `plugins`: the study's plugins as shipped (`study_plugins`), read
    once before Ray starts (default: read now)."""
    return TrialContext(
        study=spec.name,
        design=plan.design,
        factors=tuple(spec.factor_names),
        uri=tracking.uri,
        experiment_id=tracking.experiment_id,
        parent_run_id=tracking.parent_run_id,
        trials_dir=str(state.trials),
        cpus=spec.resources.cpus,
        gpus=spec.resources.gpus,
        workers=spec.resources.workers,
        train_storage=str(state.ray / "train"),
        loopback=_is_loopback(),
        cwd=os.getcwd(),  # relative paths in the study are meant from here
        spec=spec if search else None,
        objectives=tuple(search_objectives(spec)) if search else (),
        plugins=study_plugins(spec) if plugins is None else plugins,
        code=srdit_code_version(),
    )


def study_plugins(spec: StudySpec) -> tuple[dict[str, str], ...]:
    """The study's plugins as the workers get them: name, origin, source, code version (`plugin_sources`) and
    where a worker finds the shipped copy of a file or folder plugin (`srdit.runtime.shipping.shipped`)."""
    return shipping.shipped(plugin_sources(spec.plugins))


def _run_search(
    spec, plan, state: StudyState, existing, retry_failed, num_cpus, max_failures, echo, t0, address, live=None
) -> StudyRun:
    """Optuna (OptunaSearch) over technique switches and knobs. The Optuna study persists in
    <state>/optuna/<study>.db, so a rerun continues the same search; unfinished children are re-queued first (same
    params -> same trial key -> same MLflow run and checkpoint). A sample that fails, diverges or is excluded is
    told to Optuna as FAIL and counts against the budget, so one run evaluates the whole budget. A proposal of a
    point already evaluated or in flight is not a sample (`_fail_aware_optuna`): the budget counts distinct points,
    and a space with fewer distinct points than the budget ends when every one is evaluated ("the space has only N
    distinct points; all evaluated")."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    objectives = search_objectives(spec)
    directions = [spec.metrics.all()[o] for o in objectives]
    pending = [p for p in (_search_point(spec, r) for r in existing.values() if not is_done(r, retry_failed)) if p]
    n_done = _search_samples_done(state, existing)
    n_points = search_space_size(spec)
    remaining = max(0, _search_target(spec) - n_done)
    if not remaining:
        plan, tracking, state = prepare(spec, state, plan)
        echo(
            f"study {spec.name}: search, budget {spec.design.trials} trials; "
            + (_exhausted(n_points) if _search_target(spec) < spec.design.trials else "all evaluated")
        )
        return _finish(spec, plan, tracking, state, n_done, 0, echo, t0)
    tracking = None
    plugins = study_plugins(spec)  # their code versions, read once: the copies shipped are checked against them
    if live is not None:  # the ETA from here on
        live.begin(spec.name, _search_target(spec), n_done, spec.base.train.steps)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # A private local Ray takes seconds to start: the experiment and parent run are made meanwhile. On a
        # cluster, nothing is recorded before the cluster's resources are checked.
        early = pool.submit(prepare, spec, state, plan) if _starts_local_ray(address) else None
        with _ray_session(num_cpus, echo, address, plugins):
            _check_cluster(spec)
            plan, tracking, state = early.result() if early else prepare(spec, state, plan)
            echo(
                f"study {spec.name}: search, budget {spec.design.trials} trials; {n_done} already done, "
                f"{remaining} to run" + (f" ({len(pending[:remaining])} interrupted, re-queued)" if pending else "")
            )
            space: dict[str, Any] = {f"tech.{n}": tune.choice([0, 1]) for n in spec.factor_names}
            for p in spec.design.space:
                if p.type == "choice":
                    space[p.key] = tune.choice(list(p.choices))
                elif p.type == "int":
                    space[p.key] = (tune.lograndint if p.log else tune.randint)(int(p.low), int(p.high) + 1)
                else:
                    space[p.key] = (tune.loguniform if p.log else tune.uniform)(p.low, p.high)
            searcher = _fail_aware_optuna(
                n_points,
                metric=objectives if len(objectives) > 1 else objectives[0],
                mode=directions if len(directions) > 1 else directions[0],
                seed=spec.design.seed + n_done,  # a continued search draws new samples
                points_to_evaluate=pending[:remaining] or None,
                study_name=spec.name,
                storage=_optuna_storage(state),
            )
            ctx = _context(spec, tracking, state, plan, search=True, plugins=plugins)
            tracking.set_parent_status("RUNNING")
            conc = spec.design.max_concurrent or _max_concurrent(spec.resources)  # needs Ray up
            search_alg = ConcurrencyLimiter(searcher, max_concurrent=conc) if conc else searcher
            progress = _progress_callback(
                _search_target(spec), n_done, echo, spec.metrics.primary, max_failures=max_failures
            )
            callbacks = [progress] + ([tune_callback(live, progress)] if live is not None else [])
            wrapped, run_config = _tuner_common(spec, state, max_failures, callbacks)
            tuner = tune.Tuner(
                wrapped,
                param_space={**space, "ctx": ctx},
                tune_config=tune.TuneConfig(
                    search_alg=search_alg,
                    num_samples=remaining,
                    reuse_actors=True,
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name,
                ),
                run_config=run_config,
            )
            _fit(tuner, echo, state)
            ended = searcher.ended
            if not ended and _search_target(spec) < spec.design.trials:  # a budget larger than the space
                ended = _exhausted(n_points) if _search_samples_done(state, {}) >= n_points else ""
            if ended:
                echo(f"study {spec.name}: {ended}")
    if tracking is None:  # interrupted before anything was recorded
        raise KeyboardInterrupt
    return _finish(spec, plan, tracking, state, n_done, remaining, echo, t0)


def _search_target(spec: StudySpec) -> int:
    """The distinct samples a search evaluates: its budget, at most the points of its space."""
    n_points = search_space_size(spec)
    return spec.design.trials if n_points is None else min(spec.design.trials, n_points)


def _exhausted(n_points: int | None) -> str:
    return f"the space has only {n_points} distinct points; all evaluated"


MAX_REPEATS = 100
"""Proposals in a row of points already evaluated (or in flight) after which a search stops: its sampler keeps
returning to what it has seen (a converged TPE over a small discrete space)."""


def search_point(params: Mapping[str, Any]) -> tuple:
    """A search sample's identity: its sorted (name, value) pairs (tech.<name> switches and knobs). Two samples
    with the same point train the same trial."""
    return tuple(sorted(params.items()))


def search_space_size(spec: StudySpec) -> int | None:
    """How many distinct points a search design's space holds (2 per technique switch, times each choice knob's
    choices and each int knob's range), or None when a knob is continuous (float)."""
    n = 2 ** len(spec.factor_names)
    for p in spec.design.space:
        if p.type == "choice":
            n *= len(p.choices)
        elif p.type == "int":
            n *= int(p.high) - int(p.low) + 1
        else:
            return None
    return n


def _fail_aware_optuna(n_points: int | None = None, **kwargs):
    """Ray Tune's OptunaSearch, except that

    - a sample whose result lacks a finite objective (diverged, crashed, out of memory, excluded) or that errored
      is told to Optuna as FAIL. (Ray's own tells Optuna the NaN as a COMPLETE value, which Optuna refuses: the
      trial then stays RUNNING and never counts against the budget.)
    - a proposal of a point already evaluated (or in flight) is not a sample: it is told to Optuna with that
      point's outcome (as soon as it is known; user attribute `repeat`) and the sampler is asked again, the
      pattern of Optuna's FAQ ("How can I ignore duplicated samples?"). No Tune trial is made of it, so it does
      not count against Tune's num_samples (the budget). The search ends (Searcher.FINISHED, the reason in
      `ended`) when every one of the space's `n_points` distinct points is evaluated or in flight, or after
      MAX_REPEATS repeated proposals in a row.

    Points of `points_to_evaluate` (interrupted samples, re-queued) are not repeats even when the persisted
    Optuna study holds them as told (a crashed sample is told FAIL and runs again)."""
    import math

    from optuna.trial import TrialState
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class FailAwareOptunaSearch(OptunaSearch):
        def __init__(self, **kw):
            self.n_points = n_points
            self.ended = ""
            self._point_of: dict[str, tuple] = {}  # trial id -> point
            self._outcome: dict[tuple, Any] = {}  # point -> trial id in flight, or (state, value) once told
            self._waiting: dict[str, list] = {}  # trial id in flight -> its repeats, told its outcome with it
            super().__init__(**kw)  # sets the study up (`_setup_study`) when given the space

        def _setup_study(self, mode):
            super()._setup_study(mode)
            requeued = {search_point(p) for p in self._points_to_evaluate or ()}
            for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
                point = search_point(t.params)
                if point not in requeued:
                    value = None if t.state == TrialState.FAIL else (t.values if len(t.values) > 1 else t.value)
                    self._outcome.setdefault(point, (t.state, value))

        def suggest(self, trial_id: str):
            for _ in range(MAX_REPEATS):
                if self.n_points is not None and len(self._outcome) >= self.n_points:
                    self.ended = _exhausted(self.n_points)
                    return Searcher.FINISHED
                config = super().suggest(trial_id)
                ot_trial = self._ot_trials[trial_id]
                point = search_point(ot_trial.params)
                known = self._outcome.get(point)
                if known is None:
                    self._outcome[point] = trial_id
                    self._point_of[trial_id] = point
                    return config
                del self._ot_trials[trial_id]  # the next ask makes a new Optuna trial for this Tune trial
                ot_trial.set_user_attr("repeat", True)
                if isinstance(known, str):
                    self._waiting.setdefault(known, []).append(ot_trial)
                else:
                    self._ot_study.tell(ot_trial, known[1], state=known[0])
            self.ended = f"the sampler proposed only evaluated points {MAX_REPEATS} times in a row; stopped"
            return Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            values = [(result or {}).get(m) for m in metrics]
            finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            if error or not finite:
                result, error = None, True  # -> OptunaTrialState.FAIL
            super().on_trial_complete(trial_id, result, error)
            known = (
                (TrialState.FAIL, None) if error else (TrialState.COMPLETE, values if len(values) > 1 else values[0])
            )
            if trial_id in self._point_of:
                self._outcome[self._point_of[trial_id]] = known
            for repeat in self._waiting.pop(trial_id, []):
                self._ot_study.tell(repeat, known[1], state=known[0])

    return FailAwareOptunaSearch(**kwargs)


def _optuna_storage(state: StudyState):
    import optuna

    state.optuna_db.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{state.optuna_db}")


def _search_samples_done(state: StudyState, existing: dict) -> int:
    """Search samples already evaluated: the distinct points of the told trials of the persisted Optuna study (a
    failed or excluded sample is a sample too; a repeated proposal is not), at least the done MLflow children."""
    import optuna

    told = 0
    if state.optuna_db.exists():
        try:
            study = optuna.load_study(study_name=state.study, storage=_optuna_storage(state))
            told = len({search_point(t.params) for t in study.get_trials(deepcopy=False) if t.state.is_finished()})
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


def _finish(spec, plan, tracking, state: StudyState, skipped, ran, echo, t0, adopted: int = 0) -> StudyRun:
    from srdit.runtime.reuse import format_reused, reused_counts

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
        if r is not None and has_ended(r):  # crashed trials count as what they are, and stay to be retried
            s = r.data.tags.get("status", "?")
            statuses[s] = statuses.get(s, 0) + 1
        if r is None or not is_done(r):
            unfinished.append(k)
    n_samples = None
    if spec.design.kind == "search":
        n_samples = _search_samples_done(state, children)
        if n_samples < _search_target(spec):
            unfinished.append(f"(search: {_search_target(spec) - n_samples} sample(s) of the budget not run)")
    wall = time.perf_counter() - t0
    complete = not unfinished
    reused = reused_counts(children[k] for k in keys if k in children and is_done(children[k]))
    tracking.tag_parent(
        {
            "complete": str(complete).lower(),
            "n_reused": sum(reused.values()),
            **({"reused": format_reused(reused, total)} if reused else {}),
            **{f"n_{s}": n for s, n in statuses.items()},
        }
    )
    if stop.requested():  # told to stop (SIGTERM, SIGINT, SIGHUP): the parent says so until a rerun ends it
        tracking.tag_parent({"status": "interrupted", "status_reason": f"stopped by {stop.requested()}"})
    elif complete:
        tracking.tag_parent({"status": "finished", "status_reason": ""})
    tracking.set_parent_status("FINISHED" if complete else "KILLED")
    summary = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    if n_samples is None:
        echo(f"study {spec.name}: {sum(statuses.values())}/{total} trials done ({summary or 'none'}) in {wall:.0f} s")
    else:
        echo(
            f"study {spec.name}: {min(n_samples, total)}/{total} search samples evaluated, {sum(statuses.values())} "
            f"distinct runs ({summary or 'none'}) in {wall:.0f} s"
        )
    if reused:
        echo(f"  {format_reused(reused, total)}")
    if unfinished:
        crashed = statuses.get("crashed", 0)
        echo(
            f"  {len(unfinished)} trial(s) unfinished"
            + (f" ({crashed} crashed: a failure outside the trial, retried on rerun)" if crashed else "")
            + "; rerun the same command (or `srdit study resume`) to finish them"
        )
    return StudyRun(
        spec.name,
        tracking.uri,
        tracking.experiment_id,
        tracking.parent_run_id,
        total,
        skipped,
        ran,
        statuses,
        unfinished,
        wall,
        str(state.root),
        adopted,
    )


def run_plain(
    spec: StudySpec, state_dir: str | Path, plan: Plan | None = None, echo: Callable[[str], None] | None = None
) -> StudyRun:
    """The same trials in a plain loop in this process (no Ray): the benchmark's reference."""
    echo = echo or (lambda s: None)
    t0 = time.perf_counter()
    plan, tracking, state = prepare(spec, state_dir, plan)
    existing = tracking.children_by_key()
    ctx = _context(spec, tracking, state, plan)
    cwd = os.getcwd()
    ran = skipped = 0
    for t in plan.trials:
        run = existing.get(t.key)
        if run is not None and is_done(run):
            skipped += 1
            continue
        out = execute_trial(trial_job(t, cwd, run.info.run_id if run else None), ctx)
        ran += 1
        echo(f"{t.key}: {out['status']}")
    return _finish(spec, plan, tracking, state, skipped, ran, echo, t0)
