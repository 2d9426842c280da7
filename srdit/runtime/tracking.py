"""MLflow run tree of a study: one experiment per study, one parent run per study, one child run per trial.

The study layer owns the tree itself (no MLflowLoggerCallback): the driver creates the experiment and the parent
run; each trial finds its child run by the deterministic trial-key tag (or creates it with `mlflow.parentRunId`),
logs params, tags, batched metric curves (one `log_batch` per report) and artifacts, and ends it. The child runs
are the source of truth for resume: a child with a terminal `status` tag is done; any other is reused.

Works with a SQLite store (`sqlite:////abs/path.db`) and with a tracking server over HTTP.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from srdit.analysis.results import CRASH_CAUSE
from srdit.config import flatten_dict

logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
logging.getLogger("alembic").setLevel(logging.WARNING)

PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"Experiment tag that makes MLflow's UI open the experiment on its runs (model training), not GenAI traces."
UI_QUERY = "?workflowType=machine_learning"
"""URL query (after the `#/...` route) of MLflow's UI for its model-training view: MLflow 3.17's UI starts on its
GenAI pages whatever the experiment's kind tag says, unless the URL or an earlier choice in the browser says
otherwise. The server srdit starts (`start_server`) stores that choice on a first visit (`srdit.runtime.mlflow_app`);
the query serves a server started without it."""
ROLE_TAG = "srdit.role"
KEY_TAG = "trial_key"
VIEW_ID = "srdit"
"""Id of the study's saved view of its runs (MLflow 3.16+: an experiment tag `mlflow.sharedViewState.<id>`, listed
in the runs page's Views menu and opened by the URL query `viewStateShareKey=<id>`; `runs_view`)."""
VIEW_TAG = "mlflow.sharedViewState." + VIEW_ID
TERMINAL = ("finished", "diverged", "oom", "crashed")
"Trial statuses that end a trial: the trial is data and does not run again."
MLFLOW_STATUS = {
    "finished": "FINISHED",
    "diverged": "FAILED",
    "oom": "FAILED",
    "crashed": "FAILED",
    "interrupted": "KILLED",
}
"MLflow run status of each trial status (`interrupted`: not an end, a rerun resumes it)."
_BATCH_ENTITIES = 100  # MLflow's log_batch limit on params + tags per request (metrics: 1000)


def runs_view(primary_metric: str, direction: str, factors: Iterable[str]) -> dict:
    """The page state of the study's saved view: its trials as rows (the filter leaves the parent run out, so its
    children are not folded under it), sorted best first by the primary metric, with the primary metric, the
    techniques (the label and one 0/1 `tech.NAME` column each), seed and status as columns.

    What MLflow 3.17's UI lets an experiment set: a saved view restores the search facets (filter, order) and the
    table's columns, but not which parent rows are expanded (`runsExpanded`, like pins and hidden runs, is left out
    of a view and kept per browser), and no view, tag or server option is the experiment's default: the UI opens a
    view from its Views menu or from a link with `viewStateShareKey` (`view_url`)."""
    from srdit.metric_registry import SUMMARY

    key = SUMMARY.get(primary_metric, primary_metric)  # throughput: the run's median, as the results table reads it
    columns = [
        f"metrics.`{key}`",
        "tags.`techniques`",
        *(f"tags.`tech.{f}`" for f in factors),
        "tags.`seed`",
        "tags.`status`",
    ]
    return {
        "searchFilter": f"tags.`{ROLE_TAG}` = 'trial'",
        "orderByKey": f"metrics.`{key}`",
        "orderByAsc": direction == "min",
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": columns,
        "columnOrder": columns,
        "runsHiddenMode": "SHOW_ALL",
    }


def view_url(base: str, experiment_id: str) -> str:
    """The MLflow UI's address of a study's saved view (`runs_view`) on the server at `base`, in its
    model-training workflow (`UI_QUERY`)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs{UI_QUERY}&viewStateShareKey={VIEW_ID}"


def default_tracking_uri(state_dir: str | Path) -> str:
    """The embedded store: an absolute sqlite URI (workers chdir into trial folders)."""
    return "sqlite:///" + str((Path(state_dir) / "mlflow.db").resolve())


def resolve_uri(uri: str | None, state_dir: str | Path) -> str:
    if uri is None:
        return default_tracking_uri(state_dir)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())  # relative to the cwd, made absolute
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:")


def retry(fn: Callable, *args, tries: int = 8, **kwargs):
    """Call an MLflow client method, retrying transient failures ("database is locked", connection resets)."""
    delay = 0.1
    for attempt in range(tries):
        try:
            return fn(*args, **kwargs)
        except MlflowException as e:
            text = str(e).lower()
            transient = "locked" in text or "busy" in text or "temporarily" in text or "connection" in text
            if not transient or attempt == tries - 1:
                raise
        except Exception as e:  # sqlalchemy OperationalError / requests ConnectionError surface unwrapped at times
            name = type(e).__name__
            if name not in ("OperationalError", "ConnectionError") or attempt == tries - 1:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _now_ms() -> int:
    return int(time.time() * 1000)


def runtime_tags() -> dict[str, str]:
    """Git commit, versions and device of the process that trains (called inside the trial)."""
    import mlflow
    import ray
    import torch

    from srdit.provenance import provenance

    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = provenance(device)
    return {
        "git_commit": p["commit"],
        "git_dirty": p["dirty"],
        "mlflow.source.git.commit": p["commit"],
        "version.srdit": p["srdit"],
        "version.torch": p["torch"],
        "version.python": p["python"],
        "version.ray": ray.__version__,
        "version.mlflow": mlflow.__version__,
        "device": p["device"],
        "host": platform.node(),
    }


def list_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    """Every run matching the filter (all pages)."""
    runs, token = [], None
    while True:
        page = retry(client.search_runs, [experiment_id], filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


RESULTS = ("finished", "diverged", "oom")
"""Trial statuses that are results: the run says something about its configuration (it trained, its loss blew up,
it did not fit in memory), so a rerun keeps it. `crashed` is not: a failure outside the trial (a missing file, a
lost node, the driver's own error) that a rerun retries."""


def has_ended(run) -> bool:
    """A child run with a recorded outcome (any terminal status, crashed included)."""
    return run.info.status in ("FINISHED", "FAILED") and run.data.tags.get("status") in TERMINAL


def is_done(run, retry_failed: bool = False) -> bool:
    """Whether a rerun of the study skips this trial: the one retry rule (`study run`, the search's budget,
    `study status`'s "what a rerun does").

    finished, diverged and oom are results and stay; crashed (an infrastructure failure) is retried by default;
    with retry_failed (`--retry-failed`) only finished stays, so diverged and oom trials run again too."""
    if not has_ended(run):
        return False
    status = run.data.tags.get("status")
    return status == "finished" if retry_failed else status in RESULTS


# ----------------------------------------------------------------------------------------------------------------
# driver side
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StudyTracking:
    """The study's experiment and parent run (created or found by the driver)."""

    uri: str
    experiment_id: str
    experiment_name: str
    parent_run_id: str
    artifact_location: str | None

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def children(self) -> list:
        return list_runs(self.client, self.experiment_id, f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'")

    def children_by_key(self) -> dict[str, Any]:
        """trial key -> child run (if a key has several runs, the most advanced one: done first, then latest)."""
        out: dict[str, Any] = {}
        for r in sorted(self.children(), key=lambda r: (has_ended(r), r.info.start_time or 0)):
            key = r.data.tags.get(KEY_TAG)
            if key:
                out[key] = r
        return out

    def set_parent_status(self, status: str) -> None:
        if status in ("FINISHED", "FAILED", "KILLED"):
            retry(self.client.set_terminated, self.parent_run_id, status)
        else:
            retry(self.client.update_run, self.parent_run_id, status)

    def tag_parent(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(items, _BATCH_ENTITIES):
            retry(self.client.log_batch, self.parent_run_id, tags=chunk)

    def log_parent_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        ts = _now_ms()
        retry(
            self.client.log_batch,
            self.parent_run_id,
            metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()],
        )

    def mark_dead(self, why: str) -> list[str]:
        """Record the trials of a driver that no longer runs: every child run still RUNNING (or tagged running)
        becomes KILLED with status `interrupted` (not an end: a rerun resumes it from its checkpoint), and a RUNNING
        parent becomes KILLED. Call only while no driver runs the study (`lock.holder` is None, or this process
        holds the lock). Returns the trial keys marked."""
        marked = []
        for r in self.children():
            if r.info.status == "RUNNING" or r.data.tags.get("status") == "running":
                retry(
                    self.client.log_batch,
                    r.info.run_id,
                    tags=[RunTag("status", "interrupted"), RunTag("status_reason", why)],
                )
                retry(self.client.set_terminated, r.info.run_id, "KILLED")
                marked.append(r.data.tags.get(KEY_TAG, r.info.run_id))
        if retry(self.client.get_run, self.parent_run_id).info.status == "RUNNING":
            self.set_parent_status("KILLED")
        return marked

    def describe(self, spec, plan) -> None:
        """What a researcher browsing the parent run needs: design, techniques, seeds and trial counts as params
        (first value kept: MLflow params are immutable; the current values are also tags), the study YAML and the
        resolved plan as artifacts. `spec`: StudySpec, `plan`: Plan (duck-typed: no import of the designs here)."""
        values = {
            "design": plan.design,
            "techniques": ",".join(spec.factor_names),
            "seeds": ",".join(map(str, spec.seeds)),
            "n_cells": len(plan.cells),
            "n_trials": len(plan.trials) or plan.search_budget,
            "n_excluded": len(plan.excluded),
            "primary_metric": spec.metrics.primary,
            "direction": spec.metrics.direction,
            "steps": spec.base.train.steps,
            "dataset": spec.base.data.dataset,
        }
        have = retry(self.client.get_run, self.parent_run_id).data.params
        new = [Param(k, str(v)) for k, v in values.items() if k not in have]
        if new:
            retry(self.client.log_batch, self.parent_run_id, params=new)
        note = (
            f"{spec.description}\n\nDesign {plan.design}: {len(plan.cells)} cells x {len(spec.seeds)} seeds, "
            f"techniques {', '.join(spec.factor_names)}; primary metric {spec.metrics.primary} "
            f"({spec.metrics.direction}). Study file and resolved plan under study/, the report under report/."
        )
        self.tag_parent({**{f"plan.{k}": v for k, v in values.items()}, "mlflow.note.content": note})
        state = json.dumps(runs_view(spec.metrics.primary, spec.metrics.direction, spec.factor_names))
        old = retry(self.client.get_experiment, self.experiment_id).tags.get(VIEW_TAG)
        try:
            created = int(json.loads(old)["createdAt"]) if old else _now_ms()
        except (ValueError, KeyError, TypeError):
            created = _now_ms()
        name = f"{self.experiment_name}: trials by {spec.metrics.primary}"
        view = json.dumps({"name": name, "createdAt": created, "state": state})  # MLflow's saved-view envelope
        if view != old:
            retry(self.client.set_experiment_tag, self.experiment_id, VIEW_TAG, view)
        if spec.path and Path(spec.path).is_file():
            retry(self.client.log_text, self.parent_run_id, Path(spec.path).read_text(), "study/study.yaml")
        retry(self.client.log_text, self.parent_run_id, json.dumps(plan.to_json(), indent=1), "study/plan.json")


STATE_ARTIFACTS = "mlartifacts"
"Artifact folder of the embedded store, inside the state folder."


def experiment_artifact_location(uri: str, state_dir: str | Path, study: str, explicit: str | None) -> str | None:
    if explicit:
        return explicit
    if is_local_store(uri):
        return (Path(state_dir).resolve() / STATE_ARTIFACTS / study).as_uri()
    if uri.startswith("http"):
        return f"mlflow-artifacts:/{study}"  # the server's artifact store (proxied over HTTP)
    return None


def relocate_store(state_dir: str | Path) -> int:
    """Point the embedded store's artifact locations at this state folder (resolved at open).

    MLflow records absolute `file://` artifact URIs (experiments and runs); after the state folder is moved or
    copied they would still name the original, and a report on a copy would write into it. Every location under
    some `.../mlartifacts/` that is not this state's is rewritten to this state's `mlartifacts/`. Returns the
    number of experiments rewritten (0 when the store is where it was written)."""
    import sqlite3

    db = Path(state_dir) / "mlflow.db"
    if not db.is_file():
        return 0
    want = (Path(state_dir).resolve() / STATE_ARTIFACTS).as_uri()
    marker = f"/{STATE_ARTIFACTS}/"
    moved = 0
    con = sqlite3.connect(db, timeout=60)
    try:
        with con:
            for eid, loc in con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall():
                if not loc or not loc.startswith("file:") or marker not in loc:
                    continue
                old = loc[: loc.rindex(marker) + len(marker) - 1]
                if old == want:
                    continue
                con.execute(
                    "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                    (want + loc[len(old) :], eid),
                )
                con.execute(
                    "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                    "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                    (want, len(old) + 1, eid, len(old), old),
                )
                moved += 1
    except sqlite3.OperationalError:  # not an MLflow store yet (no tables)
        return 0
    finally:
        con.close()
    return moved


def open_study(
    uri: str,
    experiment_name: str,
    study: str,
    state_dir: str | Path,
    *,
    artifact_location: str | None = None,
    create: bool = True,
    tags: Mapping[str, Any] | None = None,
) -> StudyTracking | None:
    """Find (or create, in the driver) the study's experiment and parent run. A resumed study continues under the
    same parent. Returns None when `create` is False and nothing exists yet.

    On the embedded store (SQLite in the state folder) drivers serialise this (`lock.state_init_lock`): concurrent
    first opens race in MLflow's table creation otherwise; a new SQLite store is built aside and moved in
    complete (`srdit.runtime.store.ensure_store`); and artifact locations are resolved against the state
    folder (`relocate_store`), so that a moved or copied state writes into itself."""
    from srdit.runtime.store import ensure_store

    if is_local_store(uri) and uri == default_tracking_uri(state_dir):
        from srdit.runtime.lock import state_init_lock

        with state_init_lock(state_dir):
            if create:
                ensure_store(uri)
            relocate_store(state_dir)
            return _open_study(uri, experiment_name, study, state_dir, artifact_location, create, tags)
    if create:
        ensure_store(uri)
    return _open_study(uri, experiment_name, study, state_dir, artifact_location, create, tags)


def _open_study(uri, experiment_name, study, state_dir, artifact_location, create, tags) -> StudyTracking | None:
    client = MlflowClient(uri)
    exp = retry(client.get_experiment_by_name, experiment_name)
    if exp is None:
        if not create:
            return None
        loc = experiment_artifact_location(uri, state_dir, study, artifact_location)
        try:
            exp_id = retry(
                client.create_experiment,
                experiment_name,
                artifact_location=loc,
                tags={"study": study, **EXPERIMENT_KIND},
            )
        except MlflowException:  # created meanwhile by another driver
            exp_id = retry(client.get_experiment_by_name, experiment_name).experiment_id
        exp = retry(client.get_experiment, exp_id)
    elif exp.lifecycle_stage == "deleted":
        if not create:
            return None
        retry(client.restore_experiment, exp.experiment_id)
    if create and any(exp.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):  # stores made before the tag
        for k, v in EXPERIMENT_KIND.items():
            retry(client.set_experiment_tag, exp.experiment_id, k, v)
    parents = list_runs(client, exp.experiment_id, f"tags.`{ROLE_TAG}` = 'study' and tags.study = '{study}'")
    if parents:
        parent = sorted(parents, key=lambda r: r.info.start_time or 0)[0]
        parent_id = parent.info.run_id
    elif create:
        parent = retry(
            client.create_run,
            exp.experiment_id,
            run_name=study,
            tags={ROLE_TAG: "study", "study": study, **{k: str(v) for k, v in (tags or {}).items()}},
        )
        parent_id = parent.info.run_id
    else:
        return None
    return StudyTracking(uri, exp.experiment_id, experiment_name, parent_id, exp.artifact_location)


# ----------------------------------------------------------------------------------------------------------------
# trial side
# ----------------------------------------------------------------------------------------------------------------


RUN_JOURNAL = "mlflow_run.jsonl"
"""A trial folder's copy of everything its child run recorded in MLflow, one JSON line per call (`ChildRun`):
the MLflow store is rebuilt from these (`srdit study repair`, `srdit.runtime.repair`)."""


class ChildRun:
    """The MLflow child run of one trial; the trial's Reporter writes through it.

    With `journal` (the trial folder's `RUN_JOURNAL`), every record that reaches MLflow is also appended there
    (`{"op": "create" | "open" | "tags" | "params" | "metrics" | "artifact" | "text" | "end", ...}`, in call
    order), so that the trial folder holds the run as well as the store does."""

    def __init__(self, uri: str, run_id: str, reused: bool, journal: str | Path | None = None):
        self.uri, self.run_id, self.reused = uri, run_id, reused
        self.journal = Path(journal) if journal else None
        self.client = MlflowClient(uri)
        self.logged_upto: dict[str, int] = self.last_steps() if reused else {}
        """Metric key -> last step already in the run (a resumed trial does not log those steps again; also for a
        data-parallel trial's rank 0, which opens its run by id)."""

    @classmethod
    def open(
        cls,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        key: str,
        run_name: str,
        tags: Mapping[str, Any],
        params: Mapping[str, Any],
        run_id: str | None = None,
        journal: str | Path | None = None,
    ) -> ChildRun:
        """Reuse the child run with this trial key (given, or looked up), else create it; set it RUNNING and log
        the params and tags (and to `journal`, see the class)."""
        client = MlflowClient(uri)
        if run_id is None:
            found = list_runs(
                client, experiment_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.{KEY_TAG} = '{key}'"
            )
            found = [r for r in found if not is_done(r)] or found
            run_id = found[0].info.run_id if found else None
        if run_id is None:
            run = retry(
                client.create_run,
                experiment_id,
                run_name=run_name,
                tags={PARENT_TAG: parent_run_id, KEY_TAG: key, ROLE_TAG: "trial"},
            )
            child = cls(uri, run.info.run_id, reused=False, journal=journal)
            child._note("create", run_name=run_name, start_time=run.info.start_time, tags=dict(run.data.tags))
        else:
            retry(client.update_run, run_id, "RUNNING")
            child = cls(uri, run_id, reused=True, journal=journal)
            child._note("open", run_name=run_name)
        child.log_tags({**tags, "status": "running", "status_reason": ""})
        if not child.reused or not retry(client.get_run, run_id).data.params:
            child.log_params(params)  # params are immutable in MLflow: logged once per run
        return child

    def last_steps(self) -> dict[str, int]:
        """Metric key -> the largest step logged so far in this run."""
        keys = retry(self.client.get_run, self.run_id).data.metrics
        return {
            k: max((m.step for m in retry(self.client.get_metric_history, self.run_id, k)), default=-1) for k in keys
        }

    def _note(self, op: str, **record: Any) -> None:
        """Append one record to the journal (none without one)."""
        if self.journal is None:
            return
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(json.dumps({"op": op, "run_id": self.run_id, **record}) + "\n")

    def log_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(items, _BATCH_ENTITIES):
            retry(self.client.log_batch, self.run_id, tags=chunk)
        self._note("tags", tags={t.key: t.value for t in items})

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten_dict(params)
        items = [Param(k, json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)) for k, v in flat.items()]
        for chunk in _chunks(items, _BATCH_ENTITIES):
            retry(self.client.log_batch, self.run_id, params=chunk)
        self._note("params", params={p.key: p.value for p in items})

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """One round trip for all keys of a report. A key already logged at this step or later (by the run this
        one resumes: training resumes bit-exactly from its checkpoint, so the values agree) is not logged again."""
        ts = _now_ms()
        items = []
        for k, v in metrics.items():
            if self.logged_upto.get(k, -1) >= int(step):
                continue
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            items.append(Metric(k, v if math.isfinite(v) or v != v else math.copysign(1.7e308, v), ts, int(step)))
        for chunk in _chunks(items, 1000):
            retry(self.client.log_batch, self.run_id, metrics=chunk)
        if items:
            self._note("metrics", metrics=[[m.key, m.value, m.timestamp, m.step] for m in items])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        retry(self.client.log_artifact, self.run_id, str(path), artifact_path)
        self._note("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_text(self, text: str, name: str) -> None:
        retry(self.client.log_text, self.run_id, text, name)
        self._note("text", text=text, name=name)

    def finish(self, status: str, reason: str, cause: str = "") -> None:
        """End the run with its outcome; a crashed run also records why (`cause`: CRASH_CAUSE, code or
        infrastructure; a run crashed before the tag existed has none)."""
        tags = {"status": status, "status_reason": reason}
        if status == "crashed" and cause:
            tags[CRASH_CAUSE] = cause
        self.log_tags(tags)
        retry(self.client.set_terminated, self.run_id, MLFLOW_STATUS.get(status, "FAILED"))
        self._note("end", status=MLFLOW_STATUS.get(status, "FAILED"), end_time=_now_ms())


class TrialReporter:
    """The trainer's Reporter inside a study trial: each report goes to the MLflow child run (one log_batch) and,
    when running under Ray Tune, to `tune.report`."""

    def __init__(self, child: ChildRun | None, to_tune: bool):
        self.child, self.to_tune = child, to_tune
        self.last_step = 0
        self.n_reports = 0
        self.at_last_step: dict[str, float] = {}
        "Everything reported at the last step (the final metrics are not logged twice)."
        self.on_report: Callable[[], Any] | None = None
        "Called at every report (the trial samples how many trials share its machine)."

    def report(self, step: int, metrics: dict[str, float]) -> None:
        if step != self.last_step:
            self.at_last_step = {}
        self.last_step, self.n_reports = step, self.n_reports + 1
        self.at_last_step.update(metrics)
        if self.on_report is not None:
            self.on_report()
        if self.child is not None:
            self.child.log_metrics(step, metrics)
        if self.to_tune:
            from ray import tune

            tune.report({**{k: float(v) for k, v in metrics.items()}, "step": step})

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.child is not None:
            self.child.log_artifact(path, artifact_path)


# ----------------------------------------------------------------------------------------------------------------
# a local tracking server (srdit ui, tests)
# ----------------------------------------------------------------------------------------------------------------


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now. SO_REUSEADDR as servers use it, so that connections of a
    stopped server left in TIME_WAIT do not count as "in use" (Linux still refuses a port that is listened on)."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_WATCHDOG = """
import os, signal, sys, time
group, parent = int(sys.argv[1]), int(sys.argv[2])
def alive():
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
while alive() and os.getppid() == parent:
    time.sleep(0.5)
if alive():
    os.killpg(group, signal.SIGTERM)
    end = time.time() + 10
    while alive() and time.time() < end:
        time.sleep(0.2)
    if alive():
        os.killpg(group, signal.SIGKILL)
"""
"""Run beside a server: when the process that started the server dies (however: SIGKILL included, the watchdog is
re-parented), stop the server's process group. Exits by itself when the group is gone."""


def start_server(
    backend_uri: str,
    artifacts_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 5000,
    timeout: float = 90.0,
    log_path: str | Path | None = None,
    watch_parent: bool = True,
):
    """Start `mlflow server` (one worker, no job runner) in its own process group and wait until /health answers.
    With `watch_parent`, a watchdog stops the server when this process dies. Returns the Popen, with `.url` (the
    server's address); stop it with `stop_server`.

    `port` 0: a free port, and another one when the server could not take it (a port found free is free only
    until some other process binds it: the server listens seconds later); a few tries."""
    if port == 0:
        for tries in range(3):
            port = free_port(host)
            try:
                return start_server(backend_uri, artifacts_dir, host, port, timeout, log_path, watch_parent)
            except RuntimeError:
                if port_free(host, port) or tries == 2:  # not a port taken meanwhile: the server's own failure
                    raise
    import os
    import subprocess
    import sys
    import urllib.request

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    from importlib.metadata import entry_points

    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        "--artifacts-destination",
        str(Path(artifacts_dir).resolve()),
    ]
    if entry_points(group="mlflow.app", name="srdit"):  # srdit.runtime.mlflow_app (opens on Runs), when installed
        cmd += ["--app-name", "srdit"]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    if watch_parent:  # the server's own session outlives a SIGKILL of this process: a watchdog ties them
        subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(proc.pid), str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.time() + timeout
    url = f"http://{host}:{port}/health"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with code {proc.returncode}" + (f"; see {log_path}" if log_path else "")
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    proc.url = f"http://{host}:{port}"
                    return proc
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not answer on {url} within {timeout:.0f} s")


def stop_server(proc, timeout: float = 15.0) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left."""
    import os
    import signal
    import subprocess

    def group_alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    # Wait for the whole group, not only its leader: the uvicorn worker can outlive the leader and hold the port.
    deadline = time.time() + timeout
    while time.time() < deadline and (proc.poll() is None or group_alive()):
        time.sleep(0.1)
    if group_alive():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


__all__ = [
    "StudyTracking",
    "ChildRun",
    "runs_view",
    "view_url",
    "TrialReporter",
    "open_study",
    "default_tracking_uri",
    "resolve_uri",
    "is_done",
    "has_ended",
    "RESULTS",
    "list_runs",
    "runtime_tags",
    "TERMINAL",
    "RunStatus",
    "start_server",
    "stop_server",
    "free_port",
    "port_free",
]
