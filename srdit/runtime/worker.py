"""What runs inside a Ray worker (or the benchmark's plain loop): one trial of a study.

- `TrialContext`: what every trial needs besides its own job, built once by the driver (`srdit.runtime.driver`).
- `execute_trial`: train one trial (`srdit.runtime.jobs.TrialJob`) into its folder and record it in its MLflow
  child run; a crash, a divergence or an OOM is a result (status + reason), never an exception.
- `execute_group`: one Ray trial's job: a training shared by the trials whose configs train the same model (a
  `TrainingJob`: it trains once and evaluates every member under its own settings, each member in its own child
  run), or an `EvaluationJob`.
- `evaluate_from`: a trial evaluated from a finished training's snapshots (or a fixed checkpoint), no training.
- `trainable`: the Ray Tune function trainable (a grid job, or a search sample via `search_trial`).

The jobs carry their resolved configs and content keys; a worker checks them (`srdit.runtime.jobs.check_job`) and
recomputes neither. Nothing here starts Ray or a Tuner; the driver does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from srdit import stop
from srdit.analysis.results import CODE, INFRASTRUCTURE
from srdit.config import ConfigError
from srdit.runtime import attempts, shipping
from srdit.runtime.jobs import (
    EvaluationJob,
    Job,
    JobMismatch,
    SearchSample,
    TrainingJob,
    TrialJob,
    check_job,
    trial_job,
)
from srdit.runtime.occupancy import Occupancy
from srdit.runtime.state import STOP_FILE
from srdit.runtime.tracking import RUN_JOURNAL, ChildRun, TrialReporter, is_done, runtime_tags
from srdit.study.designs import TrialSpec, make_cell, make_trial, search_objectives, violated
from srdit.study.spec import StudySpec

MAX_FAILURES = 3
"""Tune retries of a trial after an infrastructure failure (lost worker or node); also Ray Train's restarts of a
data-parallel trial's worker group."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a study needs besides its own job. Built once by the driver; it travels to the Ray
    workers in the Tune param space (pickled), so every field is a plain value or a frozen dataclass."""

    study: str
    "Study name (the `study` tag of every child run; also names a data-parallel trial's Ray Train run)."
    design: str
    "Design label of the plan (full, frac(res=5), ladder, loo, search): the `design` tag."
    factors: tuple[str, ...]
    "Technique (factor) names of the study, in order: one `tech.<name>` 0/1 tag each."
    uri: str
    "MLflow tracking URI the child runs are logged to."
    experiment_id: str
    "MLflow experiment of the study."
    parent_run_id: str
    "The study's parent run; every trial is a child run under it."
    trials_dir: str
    "Folder holding one subfolder per trial key (checkpoints, samples, a data-parallel trial's outcome file)."
    cpus: float = 1
    "CPUs per trial process (torch threads = floor(cpus), at least 1); per worker for a data-parallel trial."
    gpus: float = 0
    "GPUs per trial (split evenly over the workers of a data-parallel trial)."
    workers: int = 1
    "Data-parallel workers per trial; > 1 runs the trial as a Ray Train data-parallel run."
    train_storage: str = ""
    "Storage folder of the Ray Train runs of data-parallel trials."
    cwd: str = "."
    "Working directory of the driver: relative paths in the study are meant from here."
    loopback: bool = False
    "A local study whose Ray listens on 127.0.0.1 only: data-parallel workers rendezvous through a file, not TCP."
    spec: StudySpec | None = None
    "Search designs: the parsed study, from which each sample's trial spec is made (None for grid designs)."
    objectives: tuple[str, ...] = ()
    """Search designs: the objectives Optuna optimises; the trial then reports only its final result to Tune,
    which always carries them. Empty for grid designs (every training report goes to Tune)."""
    plugins: tuple[Mapping[str, str], ...] = ()
    """The plugin techniques of the study (`srdit.runtime.driver.study_plugins`: name, where the driver loaded it
    from, its code version, where the shipped copy of a file or folder plugin is): a worker loads them and checks
    their versions before it runs a trial (`srdit.runtime.shipping.refusal`)."""
    code: str = ""
    """srdit's code version in the driver ("training/evaluation", `srdit.provenance`): a worker whose own differs
    refuses the trial (`srdit.runtime.shipping.refusal`); "" = not checked."""


def is_oom(e: BaseException | str) -> bool:
    """Out of memory: torch's OutOfMemoryError (CUDA), a MemoryError, torch's CPU allocator refusing memory
    ("can't allocate memory"), or Ray's memory monitor killing the worker."""
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    lower = text.lower()
    return "MemoryError" in text or "out of memory" in lower or "can't allocate memory" in lower


_INFRASTRUCTURE_PACKAGES = ("mlflow", "sqlalchemy", "sqlite3", "ray")
"Packages whose own exceptions are failures of what a trial runs on: the tracking store, Ray (a lost worker or node)."


def crash_cause(e: BaseException) -> str:
    """Why a trial crashed (`srdit.analysis.results.CRASH_CAUSE`): INFRASTRUCTURE when the exception, or one it
    was raised from or while handling, is a failure of what the trial runs on: the operating system (OSError: a
    missing or unreadable file, a full disk, a lost connection), the tracking store (mlflow, sqlalchemy, sqlite3),
    Ray (a lost worker or node; not RayTaskError, which carries an application's exception) or the transport of a
    data-parallel group (torch.distributed's DistError: a peer gone). Otherwise CODE: an exception the training code
    raised with this config (a bug, a config that cannot work), which recurs when retried."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        mro = type(x).__mro__
        if isinstance(x, OSError) or any(c.__name__ == "DistError" and c.__module__.startswith("torch") for c in mro):
            return INFRASTRUCTURE
        if type(x).__module__.split(".")[0] in _INFRASTRUCTURE_PACKAGES and "RayTaskError" not in {
            c.__name__ for c in mro
        }:
            return INFRASTRUCTURE
        stack += [x.__cause__, x.__context__]
    return CODE


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:500] if msg else type(e).__name__


def trial_tags(job: TrialJob, ctx: TrialContext) -> dict:
    """The tags of a trial's child run (besides status and runtime): study, cell, seed, design, techniques, and the
    content keys of its training and run (the job's: computed by the driver, `srdit.runtime.reuse.content_keys`)."""
    trial = job.trial
    on = set(trial.on)
    tags = {
        "study": ctx.study,
        "cell": trial.cell,
        "seed": trial.seed,
        "design": ctx.design,
        "techniques": "+".join(trial.on) or "baseline",
        "trial_key": trial.key,
        "trial_dir": str(Path(ctx.trials_dir) / trial.key),
        **{f"tech.{n}": int(n in on) for n in ctx.factors},
        **job.keys.tags(),
    }
    if trial.params:
        tags["search.params"] = json.dumps(trial.params, sort_keys=True)
    if trial.block is not None:  # fold-over: the half of the combined design (the analysis's block term)
        tags["block"] = trial.block
    return tags


def trial_params(trial: TrialSpec) -> dict:
    """The params of a trial's child run: its planned config (flattened when logged), cell, seed and knobs.

    The cell param is the cell's label (`cell_label`), not its bit string: MLflow's compare view plots params on
    parallel coordinates and reads any value that parses as a number as one (`011` -> 11). The bit string stays in
    the `cell` tag, which srdit reads back."""
    return {
        **trial.config,
        "study.cell": cell_label(trial),
        "study.seed": trial.seed,
        **{f"search.{k}": v for k, v in (trial.params or {}).items()},
    }


def open_child(job: TrialJob, ctx: TrialContext, extra_tags: dict | None = None) -> ChildRun:
    name = run_name(job.trial)
    # mlflow.runName also renames a child run made by an older version (named by its bit string)
    return ChildRun.open(
        ctx.uri,
        ctx.experiment_id,
        ctx.parent_run_id,
        job.key,
        name,
        {**trial_tags(job, ctx), "mlflow.runName": name, **(extra_tags or {})},
        trial_params(job.trial),
        run_id=job.run_id,
        journal=Path(ctx.trials_dir) / job.key / RUN_JOURNAL,
    )


def process_tags(ctx: TrialContext) -> dict:
    """The tags of the process that runs a trial (`runtime_tags`), and the code version and source of each plugin
    of the study it loaded (`srdit.runtime.shipping.loaded_tags`; none without plugins)."""
    return {**runtime_tags(), **shipping.loaded_tags(ctx.plugins)}


def _not_started(job: TrialJob, ctx: TrialContext, to_tune: bool) -> dict:
    """A trial that the study was told to stop before it began: nothing recorded, a rerun runs it."""
    out = {"trial_key": job.key, "status": "interrupted", "reason": f"not started: stopped by {stop.requested()}"}
    if to_tune:
        from ray import tune

        tune.report({**{o: math.nan for o in ctx.objectives}, **out})
    return out


_STOPPED = threading.Event()
"Set by a trial once it has saved its step and recorded itself `interrupted` (what a SIGTERM waits for)."


@contextlib.contextmanager
def trial_stop(ctx: TrialContext):
    """For one Ray trial: a stop request reaches its training (`srdit.stop`), which then writes a checkpoint at
    the current step and ends `interrupted`. Two ways:

    - the study's stop file (the driver was told to stop);
    - SIGTERM to this worker process (Slurm signals every process of a job step). Ray's handler for it, in the
      worker's main thread, ends the process through `ray._private.worker.raise_sys_exit_with_custom_error_message`;
      for the trial's lifetime that name is wrapped so that the handler first asks the trial to stop and waits
      (at most `stop.grace_s()`) until it has saved and recorded its step. A Ray without that name: the trial is
      retried from its last periodic checkpoint, as after any lost worker."""
    import ray._private.worker as ray_worker

    stop.reset()
    stop.watch(Path(ctx.trials_dir) / STOP_FILE)
    _STOPPED.clear()
    ended = threading.Event()
    exit_now = getattr(ray_worker, "raise_sys_exit_with_custom_error_message", None)

    def on_sigterm(*args, **kwargs):
        stop.request("SIGTERM")
        deadline = time.monotonic() + stop.grace_s()
        while not (_STOPPED.is_set() or ended.is_set()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return exit_now(*args, **kwargs)

    if exit_now is not None:
        ray_worker.raise_sys_exit_with_custom_error_message = on_sigterm
    try:
        yield
    finally:
        ended.set()
        if exit_now is not None:
            ray_worker.raise_sys_exit_with_custom_error_message = exit_now


def record_outcome(job: TrialJob, ctx: TrialContext, status: str, reason: str, cause: str = "") -> str:
    """Record a trial's outcome from outside the trial (the driver, after Ray killed or lost the trial's worker):
    open (or create) its child run with the usual tags and end it with `status`, `reason` and, for a crash, its
    `crash_cause`. A trial whose run is already done (`is_done`: it ended before its worker was lost) keeps its
    outcome. Returns the run id."""
    done = _done_run(ctx, job.key)
    if done is not None:
        return done.info.run_id
    child = open_child(job, ctx)
    child.finish(status, reason, cause)
    return child.run_id


@contextlib.contextmanager
def trial_lock(ctx: TrialContext, key: str):
    """Exclusive hold of a trial key's folder: a second training of the same key (an identical search proposal in
    flight, a duplicate driver) waits here until the first one has ended. The kernel drops the lock of a killed
    process, so a stale lock never blocks."""
    folder = Path(ctx.trials_dir) / key
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".trial.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _done_run(ctx: TrialContext, key: str):
    """The done child run of `key` (`is_done`: it does not run again), or None."""
    from mlflow import MlflowClient

    from srdit.runtime.tracking import KEY_TAG, PARENT_TAG, list_runs

    runs = list_runs(
        MlflowClient(ctx.uri),
        ctx.experiment_id,
        f"tags.`{PARENT_TAG}` = '{ctx.parent_run_id}' and tags.{KEY_TAG} = '{key}'",
    )
    done = [r for r in runs if is_done(r)]
    return done[0] if done else None


def _answer_from(run, job: TrialJob, ctx: TrialContext, to_tune: bool) -> dict:
    """A trial that has already ended (a repeated search proposal, an outcome the driver recorded): its result,
    read from its child run, instead of training it again."""
    m = run.data.metrics
    out = {
        "trial_key": job.key,
        "status": run.data.tags.get("status"),
        "reason": run.data.tags.get("status_reason", ""),
        "cached": 1,
        "run_id": run.info.run_id,
        **{k: float(v) for k, v in m.items()},
    }
    if to_tune:
        from ray import tune

        tune.report({**{o: math.nan for o in ctx.objectives}, **out})
    return out


def execute_trial(job: TrialJob, ctx: TrialContext, to_tune: bool = False) -> dict:
    """Train one trial into its folder under the state dir, logging to its MLflow child run.

    Returns {"status", "reason", "step", **final metrics}. Exceptions from training become status "crashed" (an
    out-of-memory error: "oom"), the run tagged with the crash's cause (`crash_cause`: the training code's or the
    infrastructure's). The trial holds its key's lock (`trial_lock`) while it trains; a search sample
    or a resumed trial whose key has meanwhile ended is answered from its run. Raises `JobMismatch` (before
    anything is recorded) when the job was planned for other code (`check_job`)."""
    check_job(job)
    if stop.requested():
        return _not_started(job, ctx, to_tune)
    with trial_lock(ctx, job.key):
        if ctx.objectives or job.run_id:
            done = _done_run(ctx, job.key)
            if done is not None:
                return _answer_from(done, job, ctx, to_tune)
        return _execute(job, ctx, to_tune)


def _execute(job: TrialJob, ctx: TrialContext, to_tune: bool) -> dict:
    import torch

    threads = max(1, int(math.floor(ctx.cpus)))
    torch.set_num_threads(threads)
    cfg = job.config
    out_dir = Path(ctx.trials_dir) / job.key
    child = open_child(job, ctx, process_tags(ctx))
    if attempts.start(out_dir) > 1:  # a restart: the run says so while it trains
        child.log_tags(attempts.tags(out_dir))
    objectives = ctx.objectives  # search: Tune sees only the final result, which always has the objectives
    reporter = TrialReporter(child, to_tune and not objectives)
    occupancy = Occupancy(ctx.trials_dir, job.key).__enter__()
    reporter.on_report = occupancy.sample
    t0 = time.perf_counter()
    logged: set[str] = set()
    cause = ""
    try:
        if ctx.workers > 1:  # rank 0 of a Ray Train group logs to the child run itself
            from srdit.runtime.data_parallel import train_data_parallel

            status, reason, step, metrics, logged, cause = train_data_parallel(
                cfg, out_dir, child.run_id, ctx, MAX_FAILURES
            )
        else:
            from srdit.train import train

            res = train(cfg, out_dir, reporter, resume=True, progress=False, snapshots=True)
            status, reason, step, metrics = res.status, res.reason, res.step, dict(res.metrics)
            logged = set(reporter.at_last_step) if reporter.last_step == step else set()
    except stop.Interrupted as e:  # told to stop: its checkpoint holds this step, a rerun resumes it
        status, reason = "interrupted", f"{e}; a rerun resumes it"
        step, metrics = e.step, {}
    except Exception as e:  # a crash is a result; the study goes on
        status, reason, cause = _crash(e, child)
        step, metrics = reporter.last_step, {}
    wall = time.perf_counter() - t0
    occupancy.__exit__(None, None, None)
    final = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    final["trials_on_host"] = float(occupancy.max_seen)
    child.log_metrics(step, {**{k: v for k, v in final.items() if k not in logged}, "trial_wall_s": wall})
    attempts.end(out_dir, f"{status}: {reason[:300]}" if reason and status != "finished" else status)
    child.log_tags(attempts.tags(out_dir))
    child.finish(status, reason, cause)
    if status == "interrupted":
        _STOPPED.set()
    out = {
        "trial_key": job.key,
        "status": status,
        "reason": reason,
        "step": step,
        "trial_wall_s": wall,
        "run_id": child.run_id,
        **final,
    }
    if to_tune:
        from ray import tune

        tune.report({**{o: math.nan for o in objectives}, **out})
    return out


TRAIN_RUN_TAG = "train_run_id"
"Tag of an evaluation run: the MLflow run id of the training run whose model it evaluates."
TRAINING_GROUP_TAG = "training_group"
"""Tag of every run of a shared training (training and evaluation runs): the plan's grouping key within the study
(`srdit.study.designs.training_group_key`; across studies a training is identified by its content key, the
`training_key` tag of srdit.runtime.reuse)."""


def _finish_member(
    job: TrialJob,
    child: ChildRun,
    reporter: TrialReporter,
    res,
    metrics: dict,
    wall: float,
    on_host: float,
    cause: str = "",
) -> dict:
    """Log a member's final metrics (those not already logged at its last step) and end its run (`cause`: why it
    crashed, when it did)."""
    final = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    final["trials_on_host"] = on_host
    logged = set(reporter.at_last_step) if reporter.last_step == res.step else set()
    child.log_metrics(res.step, {**{k: v for k, v in final.items() if k not in logged}, "trial_wall_s": wall})
    child.finish(res.status, res.reason, cause)
    return {
        "trial_key": job.key,
        "status": res.status,
        "reason": res.reason,
        "step": res.step,
        "trial_wall_s": wall,
        "run_id": child.run_id,
        **final,
    }


def _crash(e: BaseException, child: ChildRun | None = None) -> tuple[str, str, str]:
    """A training's exception as its outcome: (status oom or crashed, one-line reason, `crash_cause` of a crash,
    else ""); the traceback goes to the child run."""
    oom = is_oom(e)
    status, reason, cause = ("oom" if oom else "crashed"), _one_line(e), ("" if oom else crash_cause(e))
    if child is not None:
        with contextlib.suppress(Exception):
            child.log_text("".join(traceback.format_exception(e)), "traceback.txt")
    return status, reason, cause


def evaluate_from(
    source: str | Path,
    job: TrialJob,
    ctx: TrialContext,
    train_run_id: str | None = None,
    extra_tags: dict | None = None,
) -> dict:
    """Evaluate `job` without training it, into its own child run and trial folder: from a finished training's
    folder `source` (kept with snapshots: its run gets the training curve and the evaluation of every kept EMA
    snapshot under its own settings, `srdit.train.evaluate_trained`), or from a checkpoint file `source` (a fixed
    checkpoint: one evaluation at its step, `srdit.train.evaluate_checkpoint`). The run is tagged `train_run_id`
    (when given) and `evaluated_from`. A failure is a result (status + reason), as in `execute_trial`.

    Returns the same dict as `execute_trial`."""
    import torch

    from srdit.train import TrainResult, evaluate_checkpoint, evaluate_trained

    check_job(job)
    torch.set_num_threads(max(1, int(math.floor(ctx.cpus))))
    out_dir = Path(ctx.trials_dir) / job.key
    with trial_lock(ctx, job.key):
        tags = {
            **process_tags(ctx),
            "evaluated_from": str(source),
            **(extra_tags or {}),
            **({TRAIN_RUN_TAG: train_run_id} if train_run_id else {}),
        }
        child = open_child(job, ctx, tags)
        reporter = TrialReporter(child, False)
        t0 = time.perf_counter()
        cause = ""
        try:
            cfg = job.config
            if Path(source).is_dir():
                res = evaluate_trained(source, cfg, out_dir, reporter)
            else:
                res = evaluate_checkpoint(source, cfg, out_dir, reporter)
        except Exception as e:  # a failure is a result; the study goes on
            status, reason, cause = _crash(e, child)
            res = TrainResult(status, reason, reporter.last_step, {})
        return _finish_member(job, child, reporter, res, res.metrics, time.perf_counter() - t0, 1.0, cause)


def execute_group(job: Job, ctx: TrialContext, to_tune: bool = False) -> dict:
    """One Ray trial's job (`srdit.runtime.jobs`):

    - An `EvaluationJob`: every member is evaluated from its source (`evaluate_from`): a fixed checkpoint, or a
      finished training of another study (its runs tagged `training_group` and `reused_training_from_study`).
    - A `TrainingJob` of one member: `execute_trial`, exactly as an unshared trial.
    - Otherwise the group trains once in the training run's folder (`srdit.train.train` with the other members as
      `Evaluation`s): every member's child run gets the training reports and its own evaluations; the other
      members are tagged `train_run_id`. A crash of the training marks every member with its status and reason.
      When the training run is already done, only the missing members are evaluated, from its snapshots.

    Returns the training run's result (the evaluation-only runs' when it was done), with `members_done`: how many
    members this call ended."""
    todo = job.todo()
    if stop.requested() and todo:
        return {**_not_started(todo[0], ctx, to_tune), "members_done": 0}
    if isinstance(job, EvaluationJob):
        if job.from_study is None:  # a fixed checkpoint
            outs = [evaluate_from(job.source, m, ctx) for m in todo]
        else:  # a finished training of another study (srdit.runtime.reuse): evaluate, never train
            tags = {TRAINING_GROUP_TAG: job.group, "reused_training_from_study": job.from_study}
            outs = [evaluate_from(job.source, m, ctx, job.source_run_id, tags) for m in todo]
        return _group_answer(outs, ctx, to_tune)
    members = job.members
    if len(members) == 1:
        return {**execute_trial(members[0], ctx, to_tune), "members_done": 1}
    lead = members[0]
    tags = {TRAINING_GROUP_TAG: job.group}
    with trial_lock(ctx, lead.key):
        if lead.done or (ctx.workers > 1 and todo and todo[0] is lead):
            if not lead.done:  # data parallel: the Ray Train run trains; the others evaluate its snapshots
                out = execute_trial(lead, ctx, to_tune=False)
                todo = todo[1:]
                lead = dataclasses.replace(lead, run_id=out["run_id"])
                outs = [out]
            else:
                outs = []
            source = Path(lead.trial_dir or Path(ctx.trials_dir) / lead.key)  # adopted: its source's
            outs += [evaluate_from(source, m, ctx, lead.run_id, tags) for m in todo]
            return _group_answer(outs, ctx, to_tune)
        return _train_group(job, lead, todo, ctx, to_tune)


def _group_answer(outs: list[dict], ctx: TrialContext, to_tune: bool) -> dict:
    out = {**(outs[0] if outs else {"status": "finished", "reason": ""}), "members_done": len(outs)}
    if to_tune:
        from ray import tune

        tune.report({**{o: math.nan for o in ctx.objectives}, **out})
    return out


def _train_group(job: TrainingJob, lead: TrialJob, todo: list[TrialJob], ctx: TrialContext, to_tune: bool) -> dict:
    import torch

    from srdit.train import Evaluation, TrainResult, train

    for m in todo:
        check_job(m)
    torch.set_num_threads(max(1, int(math.floor(ctx.cpus))))
    others = [m for m in todo if m is not lead]
    runtime = {**process_tags(ctx), TRAINING_GROUP_TAG: job.group, "shared_by": len(job.members)}
    lead_child = open_child(lead, ctx, runtime)
    children = [open_child(m, ctx, {**runtime, TRAIN_RUN_TAG: lead_child.run_id}) for m in others]
    lead_rep = TrialReporter(lead_child, to_tune)
    reps = [TrialReporter(c, False) for c in children]
    occupancy = Occupancy(ctx.trials_dir, lead.key).__enter__()
    lead_rep.on_report = occupancy.sample
    t0 = time.perf_counter()
    res_of: list = []
    cause = ""
    try:
        evals = [Evaluation(m.config, Path(ctx.trials_dir) / m.key, r) for m, r in zip(others, reps)]
        res = train(
            lead.config,
            Path(ctx.trials_dir) / lead.key,
            lead_rep,
            resume=True,
            progress=False,
            evaluations=evals,
            snapshots=True,
        )
        metrics = [dict(res.metrics)] + [{**res.train_metrics, **e} for e in res.evaluations]
        res_of = [res] * len(todo)
    except stop.Interrupted as e:  # told to stop: the checkpoint holds this step, a rerun resumes every member
        res_of = [TrainResult("interrupted", f"{e}; a rerun resumes it", e.step, {}) for _ in [lead_rep, *reps]]
        metrics = [{} for _ in res_of]
    except Exception as e:  # the training crashed: every member's run records it
        status, reason, cause = _crash(e, lead_child)
        res_of = [TrainResult(status, reason, r.last_step, {}) for r in [lead_rep, *reps]]
        metrics = [{} for _ in res_of]
    wall = time.perf_counter() - t0
    occupancy.__exit__(None, None, None)
    outs = [
        _finish_member(m, c, r, res, mx, wall, float(occupancy.max_seen), cause)
        for m, c, r, res, mx in zip([lead, *others], [lead_child, *children], [lead_rep, *reps], res_of, metrics)
    ]
    if res_of and res_of[0].status == "interrupted":
        _STOPPED.set()
    if to_tune:
        from ray import tune

        tune.report({**{o: math.nan for o in ctx.objectives}, **outs[0], "members_done": len(outs)})
    return {**outs[0], "members_done": len(outs)}


def cell_label(trial: TrialSpec) -> str:
    """The cell as a label: its techniques (`rope+logit_normal`, `baseline`), the knob hash of a search sample
    after them (`rope · 3fa2`); never a number."""
    on = "+".join(trial.on) or "baseline"
    knobs = trial.cell.partition("-")[2]
    return f"{on}{' · ' + knobs if knobs else ''}"


def run_name(trial: TrialSpec) -> str:
    """The child run's name: its cell's label and seed (`rope+logit_normal · s0`); the cell's bit string stays in
    the `cell` tag."""
    return f"{cell_label(trial)} · s{trial.seed}"


def trainable(config: dict, jobs: dict[str, Job] | None = None) -> None:
    """The Ray Tune function trainable: a grid design's job (config["job"]: the key of a `TrainingJob` or
    `EvaluationJob` of `jobs`, which the driver binds with `tune.with_parameters`) or a search sample (config's
    tech.* and knobs); config["ctx"] is the study's `TrialContext`."""
    quiet_exit_on_sigterm()
    ctx: TrialContext = config["ctx"]
    refused = shipping.refusal(ctx.plugins, ctx.code)  # loads the plugins; other code than the driver keyed: refused
    key = config.get("job")
    with trial_stop(ctx):
        if key is None:
            try:
                trial = search_trial(config, ctx)
            except Exception as e:
                if refused:  # a plugin this worker cannot load: the sample cannot even be made here
                    raise JobMismatch(refused) from e
                raise
            if trial is not None:
                if refused:
                    refuse([trial], ctx, refused, to_tune=True)
                else:
                    execute_trial(trial, ctx, to_tune=True)
            return
        if not jobs or key not in jobs:
            raise JobMismatch(f"Ray trial {key}: no such job was handed to the worker")
        if refused:
            refuse(jobs[key].todo(), ctx, refused, to_tune=True)
        else:
            execute_group(jobs[key], ctx, to_tune=True)


def refuse(members: list[TrialJob], ctx: TrialContext, reason: str, to_tune: bool = False) -> dict:
    """Record trials that this worker must not run (`srdit.runtime.shipping.refusal`: it has other srdit or plugin
    code than the driver keyed): each member's run ends crashed, `reason` the one line, crash cause
    infrastructure (the node's, not the techniques'; a rerun retries it). Nothing is trained."""
    outs = [
        {
            "trial_key": m.key,
            "status": "crashed",
            "reason": reason,
            "run_id": record_outcome(m, ctx, "crashed", reason, INFRASTRUCTURE),
        }
        for m in members
    ]
    return _group_answer(outs, ctx, to_tune)


def search_trial(config: dict, ctx: TrialContext) -> TrialJob | None:
    """Turn a search sample (tech.<name> switches + knobs) into a trial job (its keys computed here, once: the
    driver never sees a sample's config); an infeasible sample is reported as excluded (no MLflow run) with
    non-finite objectives, which the searcher tells Optuna as FAIL (counted against the budget)."""
    from ray import tune

    spec = ctx.spec
    if spec is None:
        raise ValueError("a search trial needs the study spec in its TrialContext")
    sample = SearchSample.from_tune(config, spec)
    knobs = sample.knobs
    cell = make_cell(spec, sample.on)
    reason = violated(spec, cell.on)
    if reason is None:
        try:
            trial = make_trial(spec, cell, spec.seeds[0], knobs)
        except ConfigError as e:
            reason = f"invalid config: {e}"
    if reason is not None:
        tune.report({"status": "excluded", "reason": reason, **{m: float("nan") for m in search_objectives(spec)}})
        return None
    if knobs:
        cell_id = f"{cell.id}-{hashlib.sha1(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:4]}"
        trial = dataclasses.replace(trial, cell=cell_id, key=f"{cell_id}-s{trial.seed}-{trial.key.rsplit('-', 1)[-1]}")
    # Optuna may propose a configuration that already ran or is running (training is deterministic given the
    # seed): execute_trial waits for the key's lock and answers it from its MLflow run instead of training it twice.
    return trial_job(trial, ctx.cwd)


def _unraisable(args) -> None:
    """`sys.unraisablehook` of a trial worker: a SystemExit that Ray's SIGTERM handler raised inside a garbage
    collector or weakref callback (where Python can only print it, "Exception ignored in ...") ends the process
    with its code, as the SIGTERM meant; anything else goes to Python's default hook."""
    import os
    import sys

    if issubclass(args.exc_type, SystemExit):
        code = args.exc_value.code if args.exc_value is not None else 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code if isinstance(code, int) else 1)
    sys.__unraisablehook__(args)


def quiet_exit_on_sigterm() -> None:
    """Make a trial worker's shutdown quiet: when Ray stops the worker (the study is over, or Tune stops a
    reused actor), its SIGTERM handler raises SystemExit wherever the interpreter is; inside a callback Python
    prints that as a traceback on the driver's console and carries on. Every result is already recorded by then."""
    import sys

    sys.unraisablehook = _unraisable
