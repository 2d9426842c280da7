"""`srdit study ...`: plan, run, resume, export, status, bench and submit a study YAML.

    srdit study plan STUDY.yaml [--json]              cells, excluded cells, aliases, trial count, cost, the
                      [--state DIR]                   preflight (missing inputs, unreported metrics, resources),
                                                      the trials the store's finished runs would supply,
                      [--noise-sd X | --pilot STUDY2]  and what the design detects at 80% power (srdit.study.sizing)
                      [--target-mde Y]                 with the cheapest seeds / design reaching Y
    srdit study run STUDY.yaml [--state DIR]          preflight, then every unfinished trial (Ray Tune; a private
                      [--address ADDR]                local Ray on 127.0.0.1, or the cluster at ADDR / RAY_ADDRESS);
                      [--no-reuse]                    trials matching a finished run of the store are adopted from
                                                      it unless --no-reuse (srdit.runtime.reuse)
    srdit study resume STUDY.yaml [--state DIR]       the same as run (finishes what is unfinished)
    srdit study status STUDY.yaml [--state DIR]       each trial's status, counts, the driver, what a rerun will do
    srdit study export STUDY.yaml [--csv PATH]        one row per trial from MLflow, for `srdit analyze`
    srdit study bench STUDY.yaml [--state DIR]        time one training step of every cell, interleaved
    srdit study submit STUDY.yaml --slurm --state DIR  a Slurm batch job: Ray on N nodes, then `study run` on them
                      [--nodes N] [--gpus-per-node G]  (srdit.runtime.slurm); prints the job id, or the script
                      [--cpus-per-node C] [--partition P] [--time T] [--account A] [--dry-run]
    srdit study submit STUDY.yaml --kuberay           a KubeRay RayJob running `study run` on Kubernetes
                      --image IMG [--workers N ...]   (srdit.runtime.kuberay); printed, --out FILE or --apply

Bad input (a malformed study file, a missing path, a wrong argument) prints one line on stderr
(`srdit study <sub-command>: error: ...`), exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from srdit.commands.errors import ArgError, OneLineParser, count, fail, positive_number
from srdit.config import ConfigError
from srdit.runtime.console import SUMMARY_EVERY_S

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no config box / TensorBoard hint; the runner prints progress
# Ctrl-C ends `study run` at once with srdit's own resume line: Tune's handler would save an experiment state that
# srdit never restores from (MLflow is the record) and print `Tuner.restore` advice that does not apply.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")

DEFAULT_STATE = "state"
DEFAULT_DASHBOARDS = "dashboards"  # where `srdit report` (srdit/commands/report.py) writes


def _concurrency(spec, cpus: int | None = None) -> int:
    """Trials at once on this machine (`cpus`: the local Ray's CPUs, default all)."""
    cpus = cpus or os.cpu_count() or 1
    n = max(1, int(cpus // max(spec.resources.cpus, 1e-9)))
    return min(n, spec.resources.max_concurrent) if spec.resources.max_concurrent else n


def study_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="srdit study", description="Plan, run and resume ablation studies.")
    sub = p.add_subparsers(dest="cmd", parser_class=OneLineParser)
    sub.required = True
    pl = sub.add_parser("plan", help="print the cells, excluded cells, aliases, trial count and cost; run nothing")
    pl.add_argument("study", help="the study YAML")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument(
        "--steps-per-s", type=positive_number, default=None, help="throughput assumption of the time estimate"
    )
    pl.add_argument(
        "--concurrency", type=count(1), default=None, help="trials at once (default: cores / cpus per trial)"
    )
    noise = pl.add_mutually_exclusive_group()
    noise.add_argument(
        "--noise-sd",
        type=float,
        default=None,
        metavar="X",
        help="noise sd of the primary metric (its analysis scale): print the detectable effects",
    )
    noise.add_argument(
        "--pilot",
        default=None,
        metavar="STUDY",
        help="estimate the noise sd from a finished study's replicates (its runs under --state)",
    )
    pl.add_argument(
        "--state",
        default=DEFAULT_STATE,
        help="state folder of the --pilot study, and whose MLflow store is searched for reusable "
        "finished runs (read only)",
    )
    pl.add_argument(
        "--target-mde",
        type=float,
        default=None,
        metavar="Y",
        help="propose the seeds / smallest factorial design whose effects are detectable at Y",
    )
    pl.add_argument("--no-share", action="store_true", help="plan one training per trial (as `study run --no-share`)")
    for name, help_ in (("run", "run every unfinished trial"), ("resume", "finish an interrupted study (= run)")):
        r = sub.add_parser(name, help=help_)
        r.add_argument("study", help="the study YAML")
        r.add_argument("--state", default=DEFAULT_STATE, help="state folder (MLflow store, trial folders)")
        r.add_argument(
            "--retry-failed",
            action="store_true",
            help="also rerun trials that ended diverged or oom (crashed trials are always rerun)",
        )
        r.add_argument("--num-cpus", type=count(1), default=None, help="CPUs of the local Ray (default: all)")
        r.add_argument(
            "--no-share",
            action="store_true",
            help="train every trial, also those that differ from another only in evaluation-time "
            "settings (default: they share one training)",
        )
        r.add_argument(
            "--address",
            default=None,
            help="Ray cluster to run on (default: $RAY_ADDRESS, else a private local Ray on 127.0.0.1)",
        )
        r.add_argument(
            "--no-reuse",
            action="store_true",
            help="train every trial, even one whose finished run (same training config, data, code and "
            "evaluation settings) is already in the store",
        )
        r.add_argument(
            "--summary-every",
            type=positive_number,
            default=SUMMARY_EVERY_S,
            metavar="S",
            help="off a terminal: seconds between two progress summary lines (a terminal shows a live view)",
        )
    ex = sub.add_parser("export", help="write one row per trial (factors, seed, status, every metric) from MLflow")
    ex.add_argument("study", help="the study YAML")
    ex.add_argument(
        "--csv", nargs="?", const="", default="", metavar="PATH", help="CSV file to write (default: <study>_runs.csv)"
    )
    ex.add_argument("--state", default=DEFAULT_STATE, help="state folder (MLflow store, trial folders)")
    st = sub.add_parser("status", help="each trial's status, counts, and what a rerun will do")
    st.add_argument("study", help="the study YAML")
    st.add_argument("--state", default=DEFAULT_STATE, help="state folder (MLflow store, trial folders)")
    rp = sub.add_parser(
        "repair",
        help="rebuild the study's MLflow records from its trial folders (a damaged store is kept aside, renamed)",
    )
    rp.add_argument("study", help="the study YAML")
    rp.add_argument("--state", default=DEFAULT_STATE, help="state folder (MLflow store, trial folders)")
    sm = sub.add_parser(
        "submit", help="run the study as a cluster job: a Slurm batch job (--slurm) or a KubeRay RayJob (--kuberay)"
    )
    sm.add_argument("study", help="the study YAML (--kuberay: its path relative to the folder copied to the volume)")
    sm.add_argument(
        "--state",
        default=DEFAULT_STATE,
        help="state folder on shared storage (--slurm: an absolute path; --kuberay: on the volume, relative: "
        "under --mount)",
    )
    where = sm.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--slurm", action="store_true", help="submit with sbatch: Ray on the job's nodes, then the study"
    )
    where.add_argument("--kuberay", action="store_true", help="a KubeRay RayJob manifest (srdit.runtime.kuberay)")
    sm.add_argument("--dry-run", action="store_true", help="Slurm: print the job's script; submit nothing")
    sm.add_argument("--nodes", type=int, default=1, help="Slurm: nodes of the job (default 1)")
    sm.add_argument("--gpus-per-node", type=int, default=0, help="Slurm: GPUs per node (default 0)")
    sm.add_argument("--cpus-per-node", type=int, default=None, help="Slurm: CPUs per node (default: Slurm's)")
    for flag in ("--partition", "--time", "--account"):
        sm.add_argument(flag, default=None, help=f"Slurm: sbatch {flag}")
    sm.add_argument("--image", default=None, metavar="IMG", help="KubeRay: container image with srdit installed")
    sm.add_argument("--workers", type=int, default=1, metavar="N", help="KubeRay: Ray worker pods")
    sm.add_argument("--gpus-per-worker", type=int, default=1, metavar="G", help="KubeRay: nvidia.com/gpu per worker")
    sm.add_argument("--cpus-per-worker", type=int, default=8, metavar="C", help="KubeRay: CPUs per worker pod")
    sm.add_argument("--memory", default="32Gi", metavar="M", help="KubeRay: memory per worker pod (a quantity)")
    sm.add_argument("--volume-claim", default="srdit-shared", metavar="PVC", help="KubeRay: the shared volume's claim")
    sm.add_argument("--mount", default="/shared", metavar="PATH", help="KubeRay: where every pod mounts the volume")
    sm.add_argument(
        "--token-secret",
        default="ray-auth-token",
        metavar="NAME",
        help="KubeRay: Secret of the Ray token (key auth_token)",
    )
    sm.add_argument(
        "--namespace", default=None, metavar="NS", help="KubeRay: namespace (default: kubectl's current one)"
    )
    sm.add_argument("--apply", action="store_true", help="KubeRay: apply the manifest with `kubectl apply -f -`")
    sm.add_argument("--out", default=None, metavar="FILE", help="KubeRay: write the manifest to FILE (default: print)")
    b = sub.add_parser("bench", help="time one training step of every cell, interleaved in one process")
    b.add_argument("study", help="the study YAML")
    b.add_argument("--state", default=DEFAULT_STATE, help="state folder (MLflow store, trial folders)")
    b.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15)")
    b.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 3)")
    return p


def _not_tune_resume_advice(record) -> bool:
    """Drop Ray Tune's "Resume experiment with: Tuner.restore(...)" lines: srdit resumes by rerunning its command."""
    msg = record.getMessage()
    return "Tuner.restore" not in msg and "Resume experiment with" not in msg and "Resume training with" not in msg


def _quiet() -> None:
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for name in ("ray.tune.tune", "ray.tune"):
        logging.getLogger(name).addFilter(_not_tune_resume_advice)


def main(argv: list[str] | None = None) -> int:
    """`srdit study ...`; returns the exit code."""
    _quiet()
    try:
        args = study_parser().parse_args(argv)
    except ArgError as e:
        return fail(e.prog, e.message)
    prog = f"srdit study {args.cmd}"
    try:
        if args.cmd == "plan":
            return _plan(args)
        if args.cmd in ("run", "resume"):
            return _run(args)
        if args.cmd == "export":
            return _export(args)
        if args.cmd == "bench":
            return _bench(args)
        if args.cmd == "repair":
            return _repair(args)
        if args.cmd == "submit":
            return _submit(args)
        return _status(args)
    except ConfigError as e:
        return fail(prog, str(e))
    except KeyboardInterrupt:
        cmd = " ".join(["srdit", "study", *(argv if argv is not None else sys.argv[1:])])
        print(f"interrupted; `{cmd}` resumes it (finished trials are kept)", file=sys.stderr)
        return 130


def _plan(args) -> int:
    from srdit.study.designs import ASSUMED_STEPS_PER_S, format_plan, plan_study
    from srdit.study.spec import load_study

    _check_power_args(args)
    spec = load_study(args.study)
    plan = plan_study(spec, share=not args.no_share)
    from srdit.runtime.driver import local_node
    from srdit.study import preflight

    sps = args.steps_per_s or ASSUMED_STEPS_PER_S
    conc = args.concurrency or _concurrency(spec)
    power = _power(args, spec, plan, sps, conc)  # a bad --pilot fails before the preflight runs
    where = (
        "this machine (`study run` checks the cluster at RAY_ADDRESS once connected)"
        if os.environ.get("RAY_ADDRESS")
        else "this machine"
    )
    problems = preflight.input_and_metric_problems(spec, plan) + preflight.resource_problems(
        spec, [local_node()], where
    )
    reuse = plan_reuse(spec, plan, args.state)
    if args.json:
        print(json.dumps({**plan.to_json(sps, conc), "preflight": problems, "reuse": reuse, "power": power}, indent=1))
    else:
        print(format_plan(plan, sps, conc))
        print(f"reuse: {reuse['line']}")
        from srdit.study.sizing import format_power

        print(format_power(power))
        if problems:
            print(f"preflight: {len(problems)} problem(s); `srdit study run` refuses to start until they are fixed")
            print("\n".join(f"  - {p}" for p in problems))
        else:
            print("preflight: every input present, every metric reported, a trial fits this machine")
    return 0


def _check_power_args(args) -> None:
    """--noise-sd and --target-mde: positive finite numbers; --target-mde needs a noise sd. ConfigError (exit 2)."""
    import math

    for flag, v, what in (
        ("--noise-sd", args.noise_sd, "the noise sd"),
        ("--target-mde", args.target_mde, "an effect"),
    ):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ConfigError(
                f"{flag} must be a positive number ({what} of the primary metric on its analysis scale), got {v}"
            )
    if args.target_mde is not None and args.noise_sd is None and args.pilot is None:
        raise ConfigError("--target-mde needs a noise sd: pass --noise-sd X or --pilot STUDY")


def _power(args, spec, plan, sps: float, conc: int) -> dict:
    """The plan's power block (srdit.study.sizing) from --noise-sd / --pilot / --target-mde."""
    from srdit.study.sizing import pilot_noise, power_block

    sigma, source, pilot = args.noise_sd, None, None
    if sigma is not None:
        source = "given by --noise-sd"
    elif args.pilot is not None:
        pilot = pilot_noise(*_pilot_results(args.pilot, args.state), spec.metrics.primary, args.pilot, args.state)
        sigma, source = pilot["sd"], pilot["source"]
    return power_block(
        spec, plan, sigma=sigma, source=source, pilot=pilot, target=args.target_mde, steps_per_s=sps, concurrency=conc
    )


def _pilot_results(pilot: str, state: str):
    """(the pilot study, its results table) for `--pilot`; ConfigError (one line) when it is not found or has not
    run."""
    from srdit.runtime.results import load_results
    from srdit.study.spec import load_study

    try:
        pspec = load_study(pilot)
        results, _ = load_results(pspec, state, curves=False, samples=False)
    except ConfigError as e:
        raise ConfigError(f"--pilot: {e}") from None
    return pspec, results.table


def _run(args) -> int:
    from srdit import stop
    from srdit.runtime.driver import run_study
    from srdit.runtime.state import StudyState
    from srdit.runtime.tracking import view_url
    from srdit.study.spec import load_study

    spec = load_study(args.study)
    from srdit.study.designs import plan_study

    plan = plan_study(spec, share=not args.no_share)  # plan errors are input errors: raise before anything starts
    from srdit.runtime.console import StudyView, library_output_to
    from srdit.runtime.lock import study_lock
    from srdit.study.preflight import PreflightError

    new_state = not Path(args.state).exists()
    state = StudyState.of(spec, args.state)
    log = state.logs / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--state {args.state}: cannot make the folder {log.parent} ({e.strerror})") from None
    try:
        # srdit's lines on the console, everything else (MLflow, Ray, the trial workers) in the log file
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        header = (
            f"{when} srdit study {args.cmd} {args.study} (pid {os.getpid()}): what MLflow, Ray and the workers print"
        )
        with library_output_to(log, header) as console:
            local = not (args.address or os.environ.get("RAY_ADDRESS"))  # a cluster's size is known once up
            slots = _concurrency(spec, args.num_cpus) if local else 1
            view = StudyView(console, console.isatty(), args.summary_every, study=spec.name, slots=slots)
            view.event(f"log: library output (MLflow, Ray, trial workers) goes to {log}")
            with view.live(), study_lock(args.state, spec.name) as stale:  # StudyBusy (exit 2): another driver
                if stale:
                    view.event(
                        f"the previous driver of study {spec.name} (pid {stale.get('pid')}, host "
                        f"{stale.get('host')}) stopped without finishing; taking over"
                    )
                mark_dead_trials(spec, state, stale)
                res = run_study(
                    spec,
                    state,
                    retry_failed=args.retry_failed,
                    num_cpus=args.num_cpus,
                    plan=plan,
                    address=args.address,
                    reuse=not args.no_reuse,
                    echo=view.event,
                    live=view,
                )
    except PreflightError:
        if new_state:  # refused before anything ran: leave no state behind (the lock made the folder)
            shutil.rmtree(args.state, ignore_errors=True)
        raise
    state = Path(args.state)
    server = res.uri.startswith(("http://", "https://"))
    print(
        f"MLflow: {res.uri} (experiment {spec.tracking.experiment or spec.name}, parent run {res.parent_run_id}); "
        + (f"browse at {view_url(res.uri, res.experiment_id)}" if server else f"browse with `srdit ui --state {state}`")
    )
    print(f"report: `srdit report {args.study} --state {state}` writes {DEFAULT_DASHBOARDS}/{spec.name}/index.html")
    why = stop.requested()
    if why:
        print(
            f"stopped by {why}: the running trials wrote a checkpoint at their current step; "
            f"`srdit study run {args.study} --state {state}` resumes the study",
            file=sys.stderr,
        )
        return stop.exit_code(why)
    return 0 if res.complete else 1


def plan_reuse(spec, plan, state: str | Path) -> dict:
    """What a `study run` in `state` would take from finished runs of its MLflow store: {"done": trials already done
    in this study, "reused": trials another finished run would supply, "from": study -> count, "line": a sentence}.
    Reads only; no store yet (or one that cannot be read) is "nothing to reuse", never an error."""
    from srdit.runtime.driver import reuse_sources, scoped_env
    from srdit.runtime.jobs import trial_job
    from srdit.runtime.reuse import format_reused
    from srdit.runtime.state import StudyState
    from srdit.runtime.tracking import is_done

    out: dict = {"done": 0, "reused": 0, "from": {}, "line": ""}
    if spec.design.kind == "search" or not plan.trials:
        out["line"] = "not for a search design (its trials are chosen while it runs)"
        return out
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}  # a server that is down
    try:
        with scoped_env(quick):
            where = StudyState.of(spec, state)
            existing = where.existing_runs()
            out["done"] = sum(1 for t in plan.trials if t.key in existing and is_done(existing[t.key]))
            cwd = os.getcwd()
            sources = reuse_sources(spec, where, [trial_job(t, cwd) for t in plan.trials if t.key not in existing])
    except Exception as e:  # noqa: BLE001 - the plan must not fail on the store (a server down, an old store)
        out["line"] = f"the store in {state} could not be read ({type(e).__name__}); `study run` looks again"
        return out
    for src in sources.values():
        out["from"][src.study] = out["from"].get(src.study, 0) + 1
    out["reused"] = len(sources)
    done = f"{out['done']} of {len(plan.trials)} trials already done in this study; " if out["done"] else ""
    if sources:
        out["line"] = (
            done
            + format_reused(out["from"], len(plan.trials), "would be reused")
            + f" (finished runs with the same run key in {state}; `study run --no-reuse` trains them)"
        )
    else:
        out["line"] = done + f"no finished run with a matching run key in {state}"
    return out


def _export(args) -> int:
    from srdit.runtime.export import analyze_hint, export_csv
    from srdit.study.spec import load_study

    spec = load_study(args.study)
    path, n = export_csv(spec, args.state, args.csv or None)
    print(f"wrote {n} trial(s) to {path}; re-run the analysis anywhere with: {analyze_hint(spec, path)}")
    return 0


def mark_dead_trials(spec, state: str | Path, previous: dict | None = None) -> list[str]:
    """Mark the trials and parent run left RUNNING by a driver that no longer runs (see
    `StudyTracking.mark_dead`); call while no driver holds the study's lock, or while this process does. Nothing
    to do on a state without the study."""
    from srdit.runtime.state import StudyState

    try:
        tracking = StudyState.of(spec, state).tracking()
    except ConfigError:
        return []
    who = f" (pid {previous.get('pid')}, host {previous.get('host')})" if previous else ""
    return tracking.mark_dead(
        f"interrupted: the study's driver{who} stopped before the trial ended; a rerun resumes "
        f"it from its last checkpoint"
    )


def _status(args) -> int:
    """Per trial: its status (and reason); then counts per status, the driver (if one runs) and what a rerun
    will do (`tracking.is_done` decides, with and without --retry-failed)."""
    from srdit.runtime.lock import holder
    from srdit.runtime.reuse import REUSED_FROM, REUSED_FROM_STUDY, format_reused, reused_counts
    from srdit.runtime.state import StudyState
    from srdit.runtime.tracking import is_done
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    spec = load_study(args.study)
    plan = plan_study(spec)
    job = _slurm_status(spec.name, args.state)
    where = StudyState.of(spec, args.state)
    if job and where.find() is None:
        print("no trial has run yet: the job starts the study")
        return 0
    tracking = where.tracking()
    driver = holder(args.state, spec.name)
    marked = (
        []
        if driver is not None
        else tracking.mark_dead(
            "interrupted: the study's driver stopped before the trial ended; a rerun resumes it from its last checkpoint"
        )
    )
    children = tracking.children_by_key()
    search = spec.design.kind == "search"
    keys = list(children) if search else [t.key for t in plan.trials]
    counts: dict[str, int] = {}
    rerun: dict[str, int] = {}
    rerun_failed: dict[str, int] = {}
    for k in keys:
        r = children.get(k)
        state = "not started" if r is None else (r.data.tags.get("status") or r.info.status.lower())
        counts[state] = counts.get(state, 0) + 1
        if r is None or not is_done(r):
            rerun[state] = rerun.get(state, 0) + 1
        elif not is_done(r, retry_failed=True):
            rerun_failed[state] = rerun_failed.get(state, 0) + 1
        reason = r.data.tags.get("status_reason", "") if r is not None else ""
        name = r.data.tags.get("mlflow.runName", "") if r is not None else ""
        if r is not None and r.data.tags.get(REUSED_FROM):
            reason = (reason + "  " if reason else "") + (
                f"reused from study {r.data.tags.get(REUSED_FROM_STUDY)} (run {r.data.tags[REUSED_FROM]})"
            )
        print(f"{k}  {name + '  ' if name else ''}{state}{'  ' + reason if reason else ''}")
    fmt = lambda d: ", ".join(f"{n} {s}" for s, n in sorted(d.items(), key=lambda x: -x[1]))  # noqa: E731
    n_done = sum(1 for k in keys if children.get(k) is not None and is_done(children[k]))
    total = plan.search_budget or len(keys)
    print(
        f"{n_done}/{total} trials done ({fmt(counts) or 'none run'}); MLflow {tracking.uri}, parent run "
        f"{tracking.parent_run_id}"
    )
    reused = reused_counts(children[k] for k in keys if k in children and is_done(children[k]))
    if reused:
        print(format_reused(reused, total))
    if marked:
        print(f"marked {len(marked)} trial(s) interrupted: their driver is gone")
    if driver is not None:
        print(
            f"a driver is running this study now (pid {driver.get('pid')}, host {driver.get('host')}, since "
            f"{driver.get('started')})"
        )
    cmd = f"srdit study run {args.study} --state {args.state}"
    if search:
        print(f"a rerun (`{cmd}`) continues the search up to its budget of {total}")
    elif rerun:
        print(f"a rerun (`{cmd}`) will run {sum(rerun.values())} trial(s): {fmt(rerun)}")
    else:
        print(f"a rerun (`{cmd}`) has nothing to run")
    if rerun_failed:
        print(f"with --retry-failed it would also rerun {sum(rerun_failed.values())}: {fmt(rerun_failed)}")
    return 0


SLURM_ONLY = ("dry_run", "nodes", "gpus_per_node", "cpus_per_node", "partition", "time", "account")
KUBERAY_ONLY = (
    "image", "workers", "gpus_per_worker", "cpus_per_worker", "memory", "volume_claim", "mount", "token_secret",
    "namespace", "apply", "out",
)  # fmt: skip


def _submit(args) -> int:
    """`srdit study submit --slurm | --kuberay`; an option of the other mode is refused, never ignored."""
    other = KUBERAY_ONLY if args.slurm else SLURM_ONLY
    defaults = study_parser().parse_args(["submit", "x", "--slurm"])
    given = [k for k in other if getattr(args, k) != getattr(defaults, k)]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise ConfigError(f"{flag} is an option of {'--kuberay' if args.slurm else '--slurm'}, not of this mode")
    return _submit_slurm(args) if args.slurm else _submit_kuberay(args)


def _submit_slurm(args) -> int:
    """`srdit study submit --slurm`: the study's sbatch script (srdit.runtime.slurm), printed (--dry-run) or
    submitted (the job id printed, one line)."""
    from srdit.runtime import slurm
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    spec = load_study(args.study)
    plan_study(spec)  # a design error is the user's now, not the job's in the queue
    job = slurm.slurm_job(
        spec.name,
        args.study,
        args.state,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_node=args.cpus_per_node,
        partition=args.partition,
        time=args.time,
        account=args.account,
    )
    if args.dry_run:
        print(slurm.sbatch_script(job), end="")
        return 0
    print(slurm.submit(job))
    return 0


def _slurm_status(name: str, state: str) -> str | None:
    """Print the line of the Slurm job `study submit` recorded for the study, if any (its state and its log);
    returns its id."""
    from srdit.runtime.slurm import job_state, recorded_job

    job_id = recorded_job(state, name)
    if job_id:
        log = Path(state) / "slurm" / f"{name}-{job_id}.out"
        print(f"Slurm job {job_id}: {job_state(job_id)} (log {log})", flush=True)
    return job_id


def _repair(args) -> int:
    """`srdit study repair`: the study's MLflow records rebuilt from its trial folders (`srdit.runtime.repair`);
    refused while a driver runs the study."""
    from srdit.runtime.lock import study_lock
    from srdit.runtime.repair import repair
    from srdit.study.spec import load_study

    spec = load_study(args.study)
    with study_lock(args.state, spec.name):
        done = repair(spec, args.state, echo=lambda s: print(s, flush=True))
    counts: dict[str, int] = {}
    for status in done.rebuilt.values():
        counts[status] = counts.get(status, 0) + 1
    what = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda x: -x[1])) or "none"
    print(f"rebuilt {len(done.rebuilt)} trial run(s) from their folders ({what}); {done.present} already in the store")
    if done.no_journal:
        print(
            f"{len(done.no_journal)} trial folder(s) hold no record of their run (written by an older srdit): "
            f"`srdit study run {args.study} --state {args.state}` resumes them from their checkpoints"
        )
    print(f"next: `srdit study status {args.study} --state {args.state}`")
    return 0


def _submit_kuberay(args) -> int:
    """`srdit study submit --kuberay`: the study's RayJob manifest (srdit.runtime.kuberay), printed, written to
    --out, or applied with kubectl (--apply)."""
    import subprocess

    from srdit.runtime import kuberay
    from srdit.study.preflight import resource_problems
    from srdit.study.spec import load_study

    prog = "srdit study submit"
    spec = load_study(args.study)
    cwd = Path.cwd()
    state = kuberay.pod_path(args.state, args.mount, cwd, "--state")
    manifest = kuberay.rayjob_manifest(
        study=spec.name,
        study_path=kuberay.pod_path(args.study, args.mount, cwd, "study"),
        state=state,
        image=args.image,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        memory=args.memory,
        volume_claim=args.volume_claim,
        mount=args.mount,
        token_secret=args.token_secret,
        namespace=args.namespace,
        ray_version=_ray_version(),
    )
    pods = [{"CPU": float(args.cpus_per_worker), "GPU": float(args.gpus_per_worker)}] * args.workers
    problems = resource_problems(spec, pods, f"the RayJob's {args.workers} worker pod(s)")
    if problems:
        return fail(prog, f"{problems[0]}; or ask for more with --workers / --gpus-per-worker / --cpus-per-worker")
    text = kuberay.to_yaml(manifest)
    if args.apply and shutil.which("kubectl") is None:
        return fail(
            prog, "--apply needs kubectl on PATH; write the manifest with --out FILE and `kubectl apply -f FILE`"
        )
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote the RayJob {manifest['metadata']['name']} to {args.out}")
    elif not args.apply:
        print(text, end="")
        return 0
    if not args.apply:
        return 0
    ns = ["--namespace", args.namespace] if args.namespace else []
    done = subprocess.run(["kubectl", "apply", *ns, "-f", "-"], input=text, text=True)
    if done.returncode != 0:
        return fail(prog, f"kubectl apply failed (exit {done.returncode}); its message is above", code=1)
    name = manifest["metadata"]["name"]
    print(
        f"watch it with `{' '.join(['kubectl', 'get', 'rayjob', name, *ns])}`; the study's state is in {state} on "
        f"the volume "
        f"{args.volume_claim}"
    )
    return 0


def _ray_version() -> str | None:
    """The installed Ray's version (the image should carry the same), without importing Ray."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray")
    except PackageNotFoundError:
        return None


def _bench(args) -> int:
    """`srdit study bench`: the controlled throughput measurement (srdit.runtime.bench), into the state and onto the
    parent run. Refused while a driver runs the study: its trials would load the machine being measured."""
    from srdit.runtime.bench import DEFAULT_ROUNDS, DEFAULT_WARMUP, format_bench, run_bench, save_bench
    from srdit.runtime.driver import prepare
    from srdit.runtime.lock import study_lock
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    spec = load_study(args.study)
    plan = plan_study(spec)
    if not plan.cells:
        return fail(
            "srdit study bench", f"{args.study}: the bench times the cells of a grid design; a search design has none"
        )
    rounds = DEFAULT_ROUNDS if args.rounds is None else args.rounds
    warmup = DEFAULT_WARMUP if args.warmup is None else args.warmup
    if rounds < 3 or warmup < 0:
        return fail("srdit study bench", f"--rounds must be >= 3 and --warmup >= 0 (got {rounds}, {warmup})")
    with study_lock(args.state, spec.name):  # StudyBusy while a driver runs the study (and no run starts meanwhile)
        rec = run_bench(spec, plan, rounds=rounds, warmup=warmup, echo=lambda s: print(s, flush=True))
        _, tracking, _ = prepare(spec, args.state, plan)
        path = save_bench(rec, args.state, tracking)
    print(format_bench(rec))
    print(
        f"bench: {path} ({rec['seconds']:.0f} s); logged on parent run {tracking.parent_run_id}; "
        f"`srdit report` uses it for throughput effects and the Pareto front"
    )
    return 0
