"""The embedded MLflow store on disk (an SQLite file): created atomically, checked before use.

MLflow builds a new SQLite store in steps (its initial tables, then each schema migration). A process killed
between two steps leaves a store that every later open fails on (`duplicate column name: step`), so srdit never
lets MLflow build a store in place: `ensure_store` builds it under a temporary name beside the target and links
it in only when complete (`os.link` fails on an existing name, so a store another driver linked in first is
never replaced). `check_store` tells a damaged store (truncated, overwritten, half-built) from a sound one
before anything reads it, with one line that names the file and the way out: the trial folders are the other
copy of every record (`srdit.runtime.repair`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

from srdit.config import ConfigError

_BUILDING = threading.Lock()


class StoreDamaged(ConfigError):
    """The study's SQLite MLflow store cannot be read (one line: the file, why, and the command that rebuilds it)."""


def sqlite_path(uri: str) -> Path | None:
    """The file of an SQLite tracking URI (`sqlite:///...`), else None (a tracking server)."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def ensure_store(uri: str) -> None:
    """Make the SQLite store of `uri` exist, complete, atomically (a no-op for a server or an existing file).

    The store is MLflow's own empty store (`_empty_store`: its tables and migrations) written under a temporary
    name in the same folder, then hard-linked to its name and the temporary name removed; a kill at any point
    leaves either no store or a complete one (and at most a stray temporary file, removed by the next call)."""
    db = sqlite_path(uri)
    if db is None or db.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time in a process: alembic's migration context is process-global, so two threads migrating
    # two stores at once would run each other's migrations (other code that opens a missing store builds it in
    # place through alembic too: open a store only once it exists).
    with _BUILDING:
        if db.exists():
            return
        tmp = _temporary(db)
        _empty_store(tmp, db.parent.as_uri())
        try:
            os.link(tmp, db)
        except FileExistsError:  # another process linked its store in first: use that one
            pass
        finally:
            tmp.unlink(missing_ok=True)


def _empty_store(path: Path, artifact_root: str) -> None:
    """A new, empty store at `path` whose Default experiment keeps its artifacts under `artifact_root`, as MLflow
    builds it. MLflow's build (its tables, then some fifty schema migrations: about 0.7 s of CPU) runs once per
    MLflow version, into srdit's cache folder (`srdit.cache.cache_dir`); every store after is a copy of that one,
    its Default experiment given its own artifact location and time (the only row of an empty store that names
    either)."""
    import mlflow
    from mlflow.utils.uri import append_to_uri_path

    from srdit.cache import cache_dir

    template = cache_dir() / f"mlflow-{mlflow.__version__}-empty.db"
    if not template.is_file() or store_problem(template):
        _built_by_mlflow(template)
    shutil.copyfile(template, path)
    now = int(time.time() * 1000)
    with contextlib.closing(sqlite3.connect(path)) as con, con:
        con.execute(
            "UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
            "WHERE experiment_id = 0",
            (append_to_uri_path(artifact_root, "0"), now, now),
        )


def _built_by_mlflow(template: Path) -> None:
    """MLflow's own build of an empty store, put in place as `template` only when complete (concurrent builders:
    the last one's copy stays, the same schema)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = _temporary(template)
    try:
        SqlAlchemyStore(f"sqlite:///{tmp}", tmp.parent.as_uri()).engine.dispose()  # every table and migration
        os.replace(tmp, template)
    finally:
        tmp.unlink(missing_ok=True)


def _temporary(path: Path) -> Path:
    """This process's temporary name for a build of `path` (`.<name>.building-<pid>`, in its folder), with what
    earlier builds left there removed: this process's own, and those of processes that are gone (killed
    mid-build)."""
    for stray in path.parent.glob(f".{path.name}.building-*"):
        pid = stray.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid)):
            stray.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.building-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def store_problem(db: Path) -> str:
    """Why the SQLite store `db` cannot be used ("" when it can): not a database, damaged pages, or a schema that
    MLflow did not finish building (a store created in place by an older srdit and killed meanwhile)."""
    try:
        # read-write, as MLflow opens it: a hot journal left by a killed writer is rolled back, not taken for damage
        con = sqlite3.connect(db, timeout=60)
    except sqlite3.Error as e:
        return str(e)
    try:
        check = con.execute("PRAGMA quick_check").fetchone()
        if not check or check[0] != "ok":
            return f"integrity check: {check[0] if check else 'no answer'}"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return "it holds no tables"
        missing = {"experiments", "runs", "tags", "metrics", "params", "alembic_version"} - tables
        if missing:
            return f"MLflow's tables are missing ({', '.join(sorted(missing))}): its creation was interrupted"
        version = con.execute("SELECT version_num FROM alembic_version").fetchone()
        if (version is None or version[0] != _head_revision()) and not con.execute("SELECT 1 FROM runs").fetchone():
            # no run yet and not at MLflow's head: a creation interrupted between two migrations (a store of an
            # older MLflow that holds runs is MLflow's to upgrade: it says how)
            return "MLflow's schema was left half-built (its creation was interrupted)"
    except sqlite3.Error as e:
        return str(e)
    finally:
        con.close()
    return ""


@functools.cache
def _head_revision() -> str:
    """MLflow's latest schema revision (what a complete store of this MLflow records in alembic_version)."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    return ScriptDirectory.from_config(_get_alembic_config("sqlite://")).get_current_head()


def holds_runs(db: Path) -> bool:
    """Whether a (possibly damaged) store has any run recorded; False when that cannot be read."""
    try:
        con = sqlite3.connect(db, timeout=60)
        try:
            return bool(con.execute("SELECT 1 FROM runs LIMIT 1").fetchone())
        finally:
            con.close()
    except sqlite3.Error:
        return False


def set_aside(db: Path) -> Path:
    """Rename a store (and its journal files) out of the way, keeping it: `<name>.damaged-<UTC time>`."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = db.with_name(f"{db.name}.damaged-{stamp}")
    for suffix in ("", "-journal", "-wal", "-shm"):
        src = db.with_name(db.name + suffix)
        if src.exists():
            src.rename(dest.with_name(dest.name + suffix))
    return dest


def check_store(uri: str, study_file: str, state_dir: str | Path) -> None:
    """Raise `StoreDamaged` (one line) when the SQLite store of `uri` exists and cannot be used; nothing for a
    sound store, a missing one or a tracking server. The line names the file, why, that the trial folders hold
    every trial's records, and the command that rebuilds the store from them."""
    db = sqlite_path(uri)
    if db is None or not db.exists():
        return
    why = store_problem(db)
    if why:
        raise StoreDamaged(
            f"the MLflow store {db} is damaged ({why}); the trial folders under {Path(state_dir) / 'trials'} are "
            f"intact (checkpoints, metrics, results): rebuild the records from them with `srdit study repair "
            f"{study_file} --state {state_dir}` (the damaged file is kept beside it)"
        )


__all__ = ["StoreDamaged", "check_store", "ensure_store", "holds_runs", "set_aside", "sqlite_path", "store_problem"]
