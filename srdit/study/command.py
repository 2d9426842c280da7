"""Commands of the study layer (dispatched by srdit.cli; also `python -m srdit.study.command ...`):

    srdit study plan STUDY.yaml [--json]              cells, excluded cells, aliases, trial count, cost, and the
                                                      preflight (missing inputs, unreported metrics, resources)
    srdit study run STUDY.yaml [--state DIR]          preflight, then every unfinished trial (Ray Tune; a private
                      [--address ADDR]                local Ray on 127.0.0.1, or the cluster at ADDR / RAY_ADDRESS)
    srdit study resume STUDY.yaml [--state DIR]       the same as run (finishes what is unfinished)
    srdit study status STUDY.yaml [--state DIR]       trials done / unfinished, from MLflow
    srdit ui [--state DIR] [--port N]                 mlflow server on 127.0.0.1 over the embedded store

Bad input (a malformed study file, a missing path, a wrong argument) prints one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from srdit.config import ConfigError

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no config box / TensorBoard hint; the runner prints progress

DEFAULT_STATE = "state"
DEFAULT_DASHBOARDS = "dashboards"  # where `srdit report` (srdit/report_command.py) writes


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of the usage dump
        raise _ArgError(f"{self.prog}: {message}")


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def _concurrency(spec) -> int:
    cpus = os.cpu_count() or 1
    n = max(1, int(cpus // max(spec.resources.cpus, 1e-9)))
    return min(n, spec.resources.max_concurrent) if spec.resources.max_concurrent else n


def _study_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="srdit study", description="Plan, run and resume ablation studies.")
    sub = p.add_subparsers(dest="cmd", parser_class=_Parser)
    sub.required = True
    pl = sub.add_parser("plan", help="print the cells, excluded cells, aliases, trial count and cost; run nothing")
    pl.add_argument("study")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--steps-per-s", type=float, default=None, help="throughput assumption of the time estimate")
    pl.add_argument("--concurrency", type=int, default=None, help="trials at once (default: cores / cpus per trial)")
    for name, help_ in (("run", "run every unfinished trial"), ("resume", "finish an interrupted study (= run)")):
        r = sub.add_parser(name, help=help_)
        r.add_argument("study")
        r.add_argument("--state", default=DEFAULT_STATE, help="state folder (MLflow store, trial folders)")
        r.add_argument("--retry-failed", action="store_true",
                       help="also rerun trials that ended diverged or oom (crashed trials are always rerun)")
        r.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
        r.add_argument("--address", default=None,
                       help="Ray cluster to run on (default: $RAY_ADDRESS, else a private local Ray on 127.0.0.1)")
    st = sub.add_parser("status", help="trials done and unfinished (from MLflow)")
    st.add_argument("study")
    st.add_argument("--state", default=DEFAULT_STATE)
    return p


def _quiet() -> None:
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """`srdit study ...`; returns the exit code."""
    _quiet()
    try:
        args = _study_parser().parse_args(argv)
    except _ArgError as e:
        return _err(str(e))
    try:
        if args.cmd == "plan":
            return _plan(args)
        if args.cmd in ("run", "resume"):
            return _run(args)
        return _status(args)
    except ConfigError as e:
        return _err(str(e))
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _plan(args) -> int:
    from srdit.study.designs import ASSUMED_STEPS_PER_S, format_plan, plan_study
    from srdit.study.spec import load_study

    spec = load_study(args.study)
    plan = plan_study(spec)
    from srdit.study import preflight

    sps = args.steps_per_s or ASSUMED_STEPS_PER_S
    conc = args.concurrency or _concurrency(spec)
    where = ("this machine (`study run` checks the cluster at RAY_ADDRESS once connected)"
             if os.environ.get("RAY_ADDRESS") else "this machine")
    problems = (preflight.input_and_metric_problems(spec, plan) +
                preflight.resource_problems(spec, preflight.local_nodes(), where))
    if args.json:
        print(json.dumps({**plan.to_json(sps, conc), "preflight": problems}, indent=1))
    else:
        print(format_plan(plan, sps, conc))
        if problems:
            print(f"preflight: {len(problems)} problem(s); `srdit study run` refuses to start until they are fixed")
            print("\n".join(f"  - {p}" for p in problems))
        else:
            print("preflight: every input present, every metric reported, a trial fits this machine")
    return 0


def _run(args) -> int:
    from srdit.study.runner import run_study
    from srdit.study.spec import load_study

    spec = load_study(args.study)
    from srdit.study.designs import plan_study

    plan = plan_study(spec)  # plan errors are input errors: raise before anything starts
    res = run_study(spec, args.state, retry_failed=args.retry_failed, num_cpus=args.num_cpus, plan=plan,
                    address=args.address)
    state = Path(args.state)
    print(f"MLflow: {res.uri} (experiment {spec.tracking.experiment or spec.name}, parent run {res.parent_run_id}); "
          f"browse with `srdit ui --state {state}`")
    print(f"report: `srdit report {args.study} --state {state}` writes {DEFAULT_DASHBOARDS}/{spec.name}/index.html")
    return 0 if res.complete else 1


def _status(args) -> int:
    from srdit.study.designs import plan_study
    from srdit.study.results import open_tracking
    from srdit.study.spec import load_study
    from srdit.study.tracking import is_done

    spec = load_study(args.study)
    plan = plan_study(spec)
    tracking = open_tracking(spec, args.state)
    children = tracking.children_by_key()
    keys = [t.key for t in plan.trials] if plan.trials else list(children)
    n_done = 0
    for k in keys:
        r = children.get(k)
        state = "not started" if r is None else (r.data.tags.get("status", "?") if is_done(r) else
                                                  f"unfinished ({r.info.status.lower()})")
        n_done += r is not None and is_done(r)
        reason = r.data.tags.get("status_reason", "") if r is not None else ""
        print(f"{k}  {state}{'  ' + reason if reason else ''}")
    total = plan.search_budget or len(keys)
    print(f"{n_done}/{total} trials done; MLflow {tracking.uri}, parent run {tracking.parent_run_id}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# srdit ui
# ----------------------------------------------------------------------------------------------------------------


def _ui_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="srdit ui", description="MLflow UI over the embedded store (Ctrl-C stops it).")
    p.add_argument("--state", default=DEFAULT_STATE)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    return p


def ui_main(argv: list[str] | None = None) -> int:
    """`srdit ui [--state DIR]`: start `mlflow server` on loopback, print the URL, stop cleanly on Ctrl-C."""
    import time

    from srdit.study.tracking import default_tracking_uri, port_free, start_server, stop_server

    try:
        args = _ui_parser().parse_args(argv)
    except _ArgError as e:
        return _err(str(e))
    state = Path(args.state)
    db = state / "mlflow.db"
    if not db.exists():
        return _err(f"no MLflow store at {db}; run `srdit study run STUDY.yaml --state {state}` first")
    if not port_free(args.host, args.port):
        return _err(f"port {args.port} on {args.host} is in use; pass --port N")
    print(f"starting the MLflow UI over {db} ...", flush=True)
    try:
        proc = start_server(default_tracking_uri(state), state / "mlartifacts", args.host, args.port,
                            log_path=state / "mlflow-ui.log")
    except RuntimeError as e:
        return _err(str(e))
    print(f"MLflow UI: http://{args.host}:{args.port}  (Ctrl-C to stop; log in {state / 'mlflow-ui.log'})", flush=True)

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored)
        signal.signal(sig, _interrupt)
    try:
        while proc.poll() is None:
            time.sleep(0.5)
        return _err(f"mlflow server exited with code {proc.returncode}; see {state / 'mlflow-ui.log'}")
    except KeyboardInterrupt:
        print("stopping the MLflow UI ...", flush=True)
        stop_server(proc)
        return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["ui"]:
        sys.exit(ui_main(argv[1:]))
    sys.exit(main(argv))
