"""The study's MLflow store: never left half-built by a kill, a damaged one named in one line, and rebuilt from the
trial folders by `srdit study repair`. Real SQLite stores, real processes killed with SIGKILL, a real study on a
local Ray."""

import csv
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from srdit.runtime.store import store_problem

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
TINY = {
    "train": {"steps": 4, "batch_size": 16, "log_every": 2, "ckpt_every": 2},
    "eval": {"n_samples": 50, "batch_size": 50},
    "sample": {"sampler": "euler", "steps": 2},
}


def _killed_after(code: str, delay: float, env: dict | None = None) -> None:
    """Run `code` in a fresh interpreter once its imports are done, and SIGKILL it `delay` s after it starts."""
    prog = (
        "import sys\n" + textwrap.dedent(code.split("#go")[0]) + "\nprint('ready', flush=True)\nsys.stdin.readline()\n"
    )
    prog += textwrap.dedent(code.split("#go")[1])
    p = subprocess.Popen(
        [sys.executable, "-c", prog],
        cwd=ROOT,
        env=env or ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert p.stdout.readline().strip() == "ready"
    p.stdin.write("\n")
    p.stdin.flush()
    time.sleep(delay)
    p.kill()
    p.wait()


def test_a_driver_killed_while_it_builds_the_store_never_leaves_it_half_built(tmp_path, monkeypatch):
    """Killed at moments through MLflow's own build (a fresh cache folder: the empty store every later store is a
    copy of is built in the killed process) and through the copy: neither the store nor that empty store is ever
    left half-built."""
    from srdit.runtime.tracking import default_tracking_uri, open_study

    for i, delay in enumerate((0.1, 0.3, 0.5, 0.8, 1.2)):
        state, cache = tmp_path / f"s{i}", tmp_path / f"cache{i}"
        _killed_after(
            f"""
            from srdit.runtime.tracking import default_tracking_uri, open_study
            #go
            open_study(default_tracking_uri({str(state)!r}), "k", "k", {str(state)!r})
            """,
            delay,
            env={**ENV, "SRDIT_CACHE_DIR": str(cache)},
        )
        db = state / "mlflow.db"
        assert not db.exists() or store_problem(db) == "", (delay, store_problem(db))
        for template in cache.glob("mlflow-*-empty.db"):
            assert store_problem(template) == "", (delay, store_problem(template))
        monkeypatch.setenv("SRDIT_CACHE_DIR", str(cache))
        t = open_study(default_tracking_uri(state), "k", "k", state)  # the next start works
        assert t.parent_run_id
        assert [p.name for p in state.glob(".mlflow.db.building-*")] == []  # the stray temporary is gone
        assert [p.name for p in cache.glob(".*.building-*")] == []


def test_a_new_store_is_mlflows_own_build_with_its_own_default_experiment(tmp_path, monkeypatch):
    """A store copied from the empty store in the cache has the schema, schema revision and rows of a store MLflow
    builds in place, its Default experiment's artifact location as MLflow sets it; a damaged empty store in the
    cache is built again, never copied."""
    import sqlite3

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from srdit.runtime.store import ensure_store

    def dump(db: Path) -> tuple:
        con = sqlite3.connect(db)
        try:
            # MLflow's own builds list a table's constraints in an order that varies with the hash seed, so a
            # statement is compared as the set of its clauses.
            schema = sorted(
                (kind, name, sorted(line.strip().rstrip(",").strip() for line in (sql or "").splitlines()))
                for kind, name, sql in con.execute("SELECT type, name, sql FROM sqlite_master")
            )
            rows = {
                t: sorted(con.execute(f'SELECT * FROM "{t}"'))
                for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        finally:
            con.close()
        rows["experiments"] = [(e[0], e[1], e[2], e[3], e[6]) for e in rows["experiments"]]  # without the two times
        return schema, rows

    monkeypatch.setenv("SRDIT_CACHE_DIR", str(tmp_path / "cache"))
    mlflows = tmp_path / "mlflows"
    mlflows.mkdir()
    SqlAlchemyStore(f"sqlite:///{mlflows / 'mlflow.db'}", mlflows.as_uri()).engine.dispose()
    want = dump(mlflows / "mlflow.db")
    assert want[1]["experiments"][0][2] == f"{mlflows.as_uri()}/0"
    for name in ("first", "second"):  # the first builds the empty store, the second copies it
        folder = tmp_path / name
        ensure_store(f"sqlite:///{folder / 'mlflow.db'}")
        got = dump(folder / "mlflow.db")
        assert got[0] == want[0]
        assert got[1] == {**want[1], "experiments": [(0, "Default", f"{folder.as_uri()}/0", "active", "default")]}
    (template,) = (tmp_path / "cache").glob("mlflow-*-empty.db")
    template.write_bytes(b"\0" * 4096)
    ensure_store(f"sqlite:///{tmp_path / 'third' / 'mlflow.db'}")
    assert store_problem(template) == "" and store_problem(tmp_path / "third" / "mlflow.db") == ""


def test_a_store_left_half_built_by_an_older_srdit_is_set_aside_and_built_again(tmp_path):
    """MLflow building a store in place (what srdit did before) and killed between two migrations leaves a store
    that some later opens fail on; a driver that finds one with no runs keeps it aside and starts a new one."""
    from srdit.runtime.state import StudyState
    from srdit.study.spec import load_study

    state = tmp_path / "state"
    state.mkdir()
    db = state / "mlflow.db"
    for delay in (0.3, 0.2, 0.45, 0.15, 0.6):
        db.unlink(missing_ok=True)
        _killed_after(
            f"""
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
            #go
            SqlAlchemyStore("sqlite:///{db}", {str(state)!r})
            """,
            delay,
        )
        if db.exists() and store_problem(db):
            break
    else:
        pytest.skip("no kill landed between two of MLflow's migrations on this machine")
    p = tmp_path / "hb.yaml"
    p.write_text(yaml.safe_dump({"name": "hb", "techniques": ["rmsnorm"], "seeds": [0], "base": TINY}))
    lines = []
    tracking = StudyState.of(load_study(p), state).open(echo=lines.append)
    assert tracking.parent_run_id and store_problem(db) == ""
    assert len(lines) == 1 and "left half-built with no runs in it; kept as mlflow.db.damaged-" in lines[0]
    assert len([p for p in state.glob("mlflow.db.damaged-*") if p.name.endswith("Z")]) == 1  # kept


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "srdit", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600
    )


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "run_id"} for r in csv.DictReader(f)]


def _histories(state: Path, study: str) -> dict:
    from mlflow import MlflowClient

    from srdit.runtime.state import StudyState
    from srdit.study.spec import load_study

    tracking = StudyState.of(load_study(state.parent / f"{study}.yaml"), state).tracking()
    client = MlflowClient(tracking.uri)
    out = {}
    for key, run in tracking.children_by_key().items():
        out[key] = {
            "curves": {
                m: [(x.step, x.value) for x in client.get_metric_history(run.info.run_id, m)] for m in run.data.metrics
            },
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") and k != "host"},
            "params": dict(run.data.params),
            "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)),
            "status": run.info.status,
        }
    return out


@pytest.mark.slow
def test_a_damaged_store_is_named_in_one_line_and_repair_rebuilds_it_from_the_trial_folders(tmp_path):
    (tmp_path / "rp.yaml").write_text(
        yaml.safe_dump({"name": "rp", "techniques": ["rmsnorm", "qk_norm"], "seeds": [0], "base": TINY})
    )
    # one CPU: one trial worker runs the four trials in turn (a second adds only its start-up)
    r = _cli("study", "run", "rp.yaml", "--state", "st", "--num-cpus", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # srdit's one line names the Ray and its auth mode; Ray's advice to switch authentication off is not printed
    assert "Ray: a private local Ray on 127.0.0.1" in r.stdout and "RAY_AUTH_MODE=disabled" not in r.stdout + r.stderr
    assert _cli("study", "export", "rp.yaml", "--state", "st", "--csv", "before.csv", cwd=tmp_path).returncode == 0
    before = _histories(tmp_path / "st", "rp")
    assert all(h["status"] == "FINISHED" for h in before.values()) and len(before) == 4

    def damage_truncate(db: Path):
        db.write_bytes(db.read_bytes()[: db.stat().st_size // 3])

    def damage_random(db: Path):
        db.write_bytes(os.urandom(db.stat().st_size))

    for damage in (damage_truncate, damage_random):
        work = tmp_path / damage.__name__
        work.mkdir()
        shutil.copy(tmp_path / "rp.yaml", work / "rp.yaml")
        shutil.copytree(tmp_path / "st", work / "st")
        db = work / "st" / "mlflow.db"
        damage(db)
        for cmd in (["study", "status"], ["report"]):
            r = _cli(*cmd, "rp.yaml", "--state", "st", cwd=work)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (cmd, r.stderr[-2000:])
            assert f"the MLflow store {db.resolve()} is damaged" in lines[0]
            assert "trial folders" in lines[0] and "`srdit study repair rp.yaml --state" in lines[0]
        r = _cli("study", "repair", "rp.yaml", "--state", "st", cwd=work)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "rebuilt 4 trial run(s) from their folders (4 finished)" in r.stdout
        assert len(list((work / "st").glob("mlflow.db.damaged-*Z"))) == 1  # the damaged store is kept
        after = _histories(work / "st", "rp")
        for key, h in before.items():  # every curve, tag, param, artifact and end as they were
            want = {**h, "tags": {k: v for k, v in h["tags"].items() if k != "trial_dir"}}
            got = {**after[key], "tags": {k: v for k, v in after[key]["tags"].items() if k != "trial_dir"}}
            assert got == want, key
        assert _cli("study", "export", "rp.yaml", "--state", "st", "--csv", "after.csv", cwd=work).returncode == 0
        assert _rows(work / "after.csv") == _rows(tmp_path / "before.csv")
        again = _cli("study", "repair", "rp.yaml", "--state", "st", cwd=work)  # idempotent
        assert "rebuilt 0 trial run(s)" in again.stdout and "4 already in the store" in again.stdout

    # a store that broke while a trial ran: the trial's records end before it did; repair marks it interrupted and
    # a rerun resumes it (trains nothing it had, ends finished)
    work = tmp_path / "damage_random"
    (work / "st" / "mlflow.db").write_bytes(b"\0" * 4096)
    journal = next((work / "st" / "trials" / "rp").glob("11-*")) / "mlflow_run.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[: next(i for i, x in enumerate(lines) if '"op": "metrics"' in x) + 1]) + "\n")
    r = _cli("study", "repair", "rp.yaml", "--state", "st", cwd=work)
    assert "(3 finished, 1 interrupted)" in r.stdout, r.stdout
    status = _cli("study", "status", "rp.yaml", "--state", "st", cwd=work).stdout
    assert "will run 1 trial(s): 1 interrupted" in status
    r = _cli("study", "run", "rp.yaml", "--state", "st", "--num-cpus", "1", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _cli("study", "export", "rp.yaml", "--state", "st", "--csv", "rerun.csv", cwd=work).returncode == 0
    rerun = {r["trial"]: r for r in _rows(work / "rerun.csv")}
    for row in _rows(tmp_path / "before.csv"):  # the resumed trial ends with the same metrics
        assert rerun[row["trial"]]["status"] == "finished"
        assert rerun[row["trial"]]["fd"] == row["fd"]
