"""`srdit ui [--state DIR] [--port N]`: the MLflow UI (`mlflow server` on 127.0.0.1) over a study state's
embedded store, with a link per study; Ctrl-C stops it."""

from __future__ import annotations

import argparse
from pathlib import Path

from srdit.commands.errors import ArgError, OneLineParser, fail
from srdit.commands.study import DEFAULT_STATE

PROG = "srdit ui"


def ui_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="MLflow UI over the embedded store (Ctrl-C stops it).")
    p.add_argument("--state", default=DEFAULT_STATE, help="state folder whose MLflow store (mlflow.db) to show")
    p.add_argument("--host", default="127.0.0.1", help="address the server listens on")
    p.add_argument("--port", type=int, default=5000, help="port the server listens on")
    return p


def main(argv: list[str] | None = None) -> int:
    """`srdit ui [--state DIR]`: start `mlflow server` on loopback, print the URL, stop cleanly on Ctrl-C."""
    import time

    from srdit.runtime.lock import state_init_lock
    from srdit.runtime.tracking import (
        UI_QUERY,
        VIEW_TAG,
        default_tracking_uri,
        port_free,
        relocate_store,
        start_server,
        stop_server,
        view_url,
    )

    try:
        args = ui_parser().parse_args(argv)
    except ArgError as e:
        return fail(e.prog, e.message)
    state = Path(args.state)
    db = state / "mlflow.db"
    if not db.exists():
        return fail(PROG, f"no MLflow store at {db}; run `srdit study run STUDY.yaml --state {state}` first")
    if not port_free(args.host, args.port):
        return fail(PROG, f"port {args.port} on {args.host} is in use; pass --port N")
    print(f"starting the MLflow UI over {db} ...", flush=True)
    with state_init_lock(state):
        relocate_store(state)  # a moved or copied state shows (and writes) its own artifacts
    studies = []
    try:  # links that open each study on its runs (MLflow's UI otherwise starts on its GenAI pages)
        from mlflow import MlflowClient

        studies = [
            (e.name, e.experiment_id, VIEW_TAG in e.tags)
            for e in MlflowClient(default_tracking_uri(state)).search_experiments()
            if e.name != "Default"
        ]
    except Exception:
        pass
    try:
        proc = start_server(
            default_tracking_uri(state), state / "mlartifacts", args.host, args.port, log_path=state / "mlflow-ui.log"
        )
    except RuntimeError as e:
        return fail(PROG, str(e))

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored)
        signal.signal(sig, _interrupt)
    try:
        base = f"http://{args.host}:{args.port}"
        print(f"MLflow UI: {base}/#/{UI_QUERY}  (Ctrl-C to stop; log in {state / 'mlflow-ui.log'})", flush=True)
        for name, eid, has_view in studies:  # the study's saved view: its trials with metric and technique columns
            url = view_url(base, eid) if has_view else f"{base}/#/experiments/{eid}{UI_QUERY}"
            print(f"  {name}: {url}", flush=True)
        while proc.poll() is None:
            time.sleep(0.5)
        return fail(PROG, f"mlflow server exited with code {proc.returncode}; see {state / 'mlflow-ui.log'}")
    except KeyboardInterrupt:
        print("stopping the MLflow UI ...", flush=True)
        stop_server(proc)
        return 0
