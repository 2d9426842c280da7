"""`srdit study repair`: rebuild a study's MLflow records from its trial folders.

Every child run also writes what it records into its trial folder (`tracking.RUN_JOURNAL`, in call order), so
the MLflow store is a cache of the folders, not the only copy. Repair sets a damaged SQLite store aside (kept,
renamed), opens the study as its driver does (experiment, parent run, the plan on it), and replays the journal of
every trial folder whose trial has no run in the store: tags, params, metric histories with their steps and
timestamps, artifacts still on disk, and the run's end. Run ids change; tags that named an old run id of the
study (a shared training's `train_run_id`) are pointed at the new one. A journal that ends before its run ended
(the store broke mid-trial) is ended `interrupted`, so that `srdit study run` resumes it from its checkpoint.

Not rebuilt: runs adopted from another study's store entry (`srdit.runtime.reuse.adopt`; a rerun adopts or trains
them again), trials run by an srdit without journals (a rerun resumes them from their last checkpoint, which
replays the final evaluation from its record, trains nothing), and the parent run's final summary metrics (the
next `study run` logs them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from srdit.runtime.state import StudyState
from srdit.runtime.store import set_aside, sqlite_path, store_problem
from srdit.runtime.tracking import (
    _BATCH_ENTITIES,
    KEY_TAG,
    PARENT_TAG,
    RUN_JOURNAL,
    StudyTracking,
    _chunks,
    retry,
)


@dataclass
class Repaired:
    """What `repair` did."""

    set_aside: Path | None = None
    "Where the damaged store was moved (None: the store was sound and kept)."
    rebuilt: dict[str, str] = field(default_factory=dict)
    "Trial key -> the status its rebuilt run ended with."
    present: int = 0
    "Trial folders whose run the store already had (left as they are)."
    no_journal: list[str] = field(default_factory=list)
    "Trial folders without a journal (a rerun resumes them from their checkpoints)."


def read_journal(path: Path) -> list[dict]:
    """The records of a journal; a last line torn by a kill is dropped."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def repair(spec, state_dir: str | Path, echo: Callable[[str], None] = print) -> Repaired:
    """Rebuild the MLflow records of `spec` (a StudySpec) under `state_dir` from its trial folders (see the module).
    Idempotent: a trial whose run the store has is left alone."""
    from srdit.runtime.driver import prepare

    state = StudyState.of(spec, state_dir)
    done = Repaired()
    db = sqlite_path(state.uri)
    if db is not None and db.exists():
        why = store_problem(db)
        if why:
            done.set_aside = set_aside(db)
            echo(f"the MLflow store {db} is damaged ({why}): kept as {done.set_aside.name}")
    _, tracking, _ = prepare(spec, state)
    existing = tracking.children_by_key()
    folders = sorted(p for p in state.trials.glob("*") if p.is_dir()) if state.trials.is_dir() else []
    ids: dict[str, str] = {}
    for folder in folders:
        journal = folder / RUN_JOURNAL
        if folder.name in existing:
            done.present += 1
        elif journal.is_file():
            records = read_journal(journal)
            if records:
                new_id, status = _replay(records, tracking, folder.name)
                ids.update({r["run_id"]: new_id for r in records if r.get("run_id")})
                done.rebuilt[folder.name] = status
        elif (folder / "checkpoints").is_dir() or (folder / "result.json").is_file():
            done.no_journal.append(folder.name)
    _relink(tracking, ids)
    return done


def _replay(records: list[dict], tracking: StudyTracking, key: str) -> tuple[str, str]:
    """Create one child run of `tracking`'s parent from a trial folder's journal; returns (new run id, status)."""
    from mlflow.entities import Metric, Param, RunTag

    client = tracking.client
    first = next((r for r in records if r["op"] in ("create", "open")), {})
    created = next((r for r in records if r["op"] == "create"), {})
    run = retry(
        client.create_run,
        tracking.experiment_id,
        start_time=created.get("start_time"),
        run_name=first.get("run_name"),
        tags={**created.get("tags", {}), PARENT_TAG: tracking.parent_run_id, KEY_TAG: key},
    )
    rid = run.info.run_id
    params: dict[str, str] = {}
    ended, tags = None, {}
    for r in records:
        op = r["op"]
        if op == "tags":
            tags.update(r["tags"])
            _batch(client, rid, tags=[RunTag(k, v) for k, v in r["tags"].items() if k != PARENT_TAG])
        elif op == "params":
            new = {k: v for k, v in r["params"].items() if k not in params}  # MLflow params are write-once
            params.update(new)
            _batch(client, rid, params=[Param(k, v) for k, v in new.items()])
        elif op == "metrics":
            _batch(client, rid, metrics=[Metric(k, v, ts, step) for k, v, ts, step in r["metrics"]])
        elif op == "artifact" and Path(r["path"]).exists():
            retry(client.log_artifact, rid, r["path"], r.get("artifact_path"))
        elif op == "text":
            retry(client.log_text, rid, r["text"], r["name"])
        elif op == "open":
            ended = None
        elif op == "end":
            ended = r
    status = tags.get("status", "running")
    if ended is None:  # the store broke while the trial ran: a rerun resumes it
        status = "interrupted"
        reason = "interrupted: the run's records end before the trial did; a rerun resumes it from its checkpoint"
        _batch(client, rid, tags=[RunTag("status", status), RunTag("status_reason", reason)])
        retry(client.set_terminated, rid, "KILLED")
    else:
        retry(client.set_terminated, rid, ended["status"], ended.get("end_time"))
    return rid, status


def _batch(client, run_id: str, metrics=(), params=(), tags=()) -> None:
    """`log_batch` within MLflow's limits per request (the chunks `ChildRun` logs in)."""
    for chunk in _chunks(list(metrics), 1000):
        retry(client.log_batch, run_id, metrics=chunk)
    for chunk in _chunks(list(params), _BATCH_ENTITIES):
        retry(client.log_batch, run_id, params=chunk)
    for chunk in _chunks(list(tags), _BATCH_ENTITIES):
        retry(client.log_batch, run_id, tags=chunk)


def _relink(tracking: StudyTracking, ids: dict[str, str]) -> None:
    """Point tags that name an old run id of the study (a shared training's `train_run_id`) at its new run."""
    if not ids:
        return
    client = tracking.client
    for run in tracking.children():
        if run.info.run_id not in ids.values():
            continue
        for k, v in run.data.tags.items():
            if v in ids and k != PARENT_TAG and v != ids[v]:
                retry(client.set_tag, run.info.run_id, k, ids[v])


__all__ = ["Repaired", "read_journal", "repair"]
