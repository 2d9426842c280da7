"""The study driver on a real private Ray: it starts its own Ray bound to loopback (no socket on another address
while a study runs), data-parallel trials of `workers x cpus` equal to the machine's cores run (the hosting trial
reserves no CPU), a deterministic worker error is recorded at once (no Ray Train retry) and retried only by a rerun
(crashed = infrastructure, not a result), a memory-monitor kill is recorded as oom and the driver goes on, and a
search with a diverging sample evaluates its whole budget in one run, never training one key twice, and a
search's repeated proposals are not samples: a budget equal to a tiny space trains every point of it."""

import os
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

BASE = {
    "train": {"steps": 4, "batch_size": 16, "log_every": 2, "ckpt_every": 2},
    "eval": {"n_samples": 40, "batch_size": 40},
    "sample": {"sampler": "euler", "steps": 2},
}
BAD_TEACHER = {"name": "bad_teacher", "diff": {"model.repa.enabled": True, "model.repa.teacher_dim": 32}}
"Passes validation and preflight; every rank raises when it builds the teacher (64-d tokens, not 32)."


def _write(path: Path, **kw) -> Path:
    data = {"name": path.stem, "base": BASE, "seeds": [0], "metrics": {"primary": "fd", "direction": "min"}, **kw}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p))
    out, todo = [], [root]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += children.get(q, [])
    return out


def listening_sockets(pids: list[int]) -> list[tuple[str, int, bool, str]]:
    """(hex address, port, is loopback, process) of every TCP socket in LISTEN state held by `pids` (/proc/net/tcp{,6})."""
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:
            pass
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A = LISTEN
                continue
            addr, port = f[1].split(":")
            loop = (
                addr in ("0" * 31 + "1", "0000000000000000FFFF00000100007F")
                if v6
                else bytes.fromhex(addr)[::-1][0] == 127
            )
            try:
                name = Path(f"/proc/{inodes[f[9]]}/cmdline").read_text().replace("\0", " ")[:80]
            except OSError:
                name = "?"
            out.append((addr, int(port, 16), loop, name))
    return out


def test_private_loopback_ray_runs_data_parallel_trials_and_records_worker_errors_at_once(tmp_path, monkeypatch):
    import ray
    from mlflow import MlflowClient

    from srdit.runtime.driver import run_study
    from srdit.study.spec import load_study

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    spec = load_study(_write(tmp_path / "dp.yaml", techniques=[BAD_TEACHER], resources={"workers": 2, "cpus": 1}))
    state, lines, seen = tmp_path / "state", [], []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            seen.extend(listening_sockets(_descendants(os.getpid())))
            time.sleep(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        res = run_study(spec, state, num_cpus=2, echo=lines.append)  # workers x cpus = the 2 cores
    finally:
        stop.set()
        t.join(5)
    assert not ray.is_initialized()  # the private Ray is shut down again
    assert any(line.startswith("Ray: a private local Ray on 127.0.0.1 (2 CPUs; auth ") for line in lines), lines
    ray_ports = {s[1] for s in seen}
    assert len(ray_ports) >= 3, seen  # GCS, raylet, object manager, workers ... were seen listening
    assert sorted(set(s for s in seen if not s[2])) == [], "a socket listened on a non-loopback address"

    assert res.statuses == {"finished": 1, "crashed": 1}, lines
    assert len(res.unfinished) == 1 and not res.complete  # a crash is not a result
    key = res.unfinished[0]
    client = MlflowClient(res.uri)
    runs = {
        r.data.tags["cell"]: r
        for r in client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    }
    assert runs["1"].data.tags["trial_key"] == key
    crashed = runs["1"].data.tags
    assert crashed["status"] == "crashed" and "gives 64-d tokens" in crashed["status_reason"]
    assert crashed["status_reason"].startswith("rank ")
    train_runs = sorted(p.name for p in (state / "ray_results" / "train").iterdir() if p.name.startswith(f"dp-{key}"))
    assert train_runs == [f"dp-{key}-0"], train_runs  # one attempt: the error was not retried by Ray Train

    again = run_study(spec, state, num_cpus=2, echo=lines.append)  # a rerun retries the crashed trial only
    assert again.skipped == 1 and again.ran == 1 and again.statuses == {"finished": 1, "crashed": 1}
    children = client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(children) == 2  # the crashed trial reused its child run


def test_search_with_a_diverging_sample_completes_its_budget_in_one_run(tmp_path, monkeypatch):
    import optuna
    import ray
    from mlflow import MlflowClient

    from srdit.runtime.driver import run_study
    from srdit.runtime.ray_parts import shutdown_ray
    from srdit.study.spec import load_study

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    explode = {"name": "explode", "diff": {"train.lr": 1.0e6}}
    design = {
        "kind": "search",
        "trials": 5,
        "objectives": ["fd"],
        "max_concurrent": 2,
        "space": {"train.batch_size": {"choices": [16, 32]}},
    }
    spec = load_study(_write(tmp_path / "srch.yaml", techniques=[explode], design=design))
    lines = []
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        res = run_study(spec, tmp_path / "state", echo=lines.append)
    finally:
        shutdown_ray()
    study = optuna.load_study(study_name="srch", storage=f"sqlite:///{tmp_path / 'state' / 'optuna' / 'srch.db'}")
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert all(s.is_finished() for s in states), states  # none left RUNNING
    # a budget of 5 over 4 distinct settings: each evaluated once, repeats are not samples, and the search ends
    assert len({tuple(sorted(t.params.items())) for t in trials if not t.user_attrs.get("repeat")}) == 4
    assert "study srch: the space has only 4 distinct points; all evaluated" in lines, lines
    assert res.complete, lines
    client = MlflowClient(res.uri)
    runs = client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    keys = [r.data.tags["trial_key"] for r in runs]
    assert len(keys) == len(set(keys))  # one run per key: repeated proposals were answered, not retrained
    diverged = [r for r in runs if r.data.tags["status"] == "diverged"]
    assert diverged, [r.data.tags["status"] for r in runs]  # 4 distinct settings, 5 samples: explode came up
    assert optuna.trial.TrialState.FAIL in states
    for r in runs:  # each trained once: no logging step twice
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert len(steps) == len(set(steps)), steps


def test_a_search_runs_its_trials_inside_the_private_ray_it_starts(tmp_path, monkeypatch):
    """With no Ray connected, a search starts its private loopback Ray, runs Tune inside it (never a Ray that Tune
    would start on its own, which would outlive the study) and shuts it down."""
    import ray

    from srdit.runtime.driver import run_study
    from srdit.study.spec import load_study

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    design = {"kind": "search", "trials": 1, "objectives": ["fd"]}
    spec = load_study(_write(tmp_path / "one_sample.yaml", techniques=["rmsnorm"], design=design))
    lines: list[str] = []
    res = run_study(spec, tmp_path / "state", num_cpus=2, echo=lines.append)
    assert not ray.is_initialized()  # the private Ray is shut down, and Tune started none of its own
    assert any(line.startswith("Ray: a private local Ray on 127.0.0.1") for line in lines), lines
    assert res.complete and res.statuses == {"finished": 1}, lines


def test_search_repeats_do_not_spend_the_budget(tmp_path, monkeypatch):
    """Two techniques, no knobs: 4 distinct points, budget 4, two samples at a time. The seeded sampler proposes
    points already evaluated or in flight; they are told to Optuna with that point's outcome and not counted, so
    all 4 points train, each once. A rerun with a budget larger than the space ends at once with one line."""
    import optuna
    import ray
    from mlflow import MlflowClient

    from srdit.runtime.driver import run_study
    from srdit.runtime.ray_parts import shutdown_ray
    from srdit.study.spec import load_study

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    design = {"kind": "search", "trials": 4, "objectives": ["fd"], "max_concurrent": 2}
    path = _write(tmp_path / "tiny_space.yaml", techniques=["rmsnorm", "qk_norm"], design=design)
    lines: list[str] = []
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        res = run_study(load_study(path), tmp_path / "state", echo=lines.append)
    finally:
        shutdown_ray()
    assert res.complete and res.statuses == {"finished": 4}, lines
    client = MlflowClient(res.uri)
    runs = client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    keys = {r.data.tags["trial_key"] for r in runs}
    assert len(runs) == 4 and len(keys) == 4, keys  # every point trained, none twice
    assert {(r.data.tags["tech.rmsnorm"], r.data.tags["tech.qk_norm"]) for r in runs} == {
        ("0", "0"),
        ("0", "1"),
        ("1", "0"),
        ("1", "1"),
    }
    for r in runs:  # each trained once: no logging step twice
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert len(steps) == len(set(steps)), steps
    study = optuna.load_study(
        study_name="tiny_space", storage=f"sqlite:///{tmp_path / 'state' / 'optuna' / 'tiny_space.db'}"
    )
    trials = study.get_trials(deepcopy=False)
    assert all(t.state.is_finished() for t in trials), [t.state for t in trials]
    repeats = [t for t in trials if t.user_attrs.get("repeat")]
    assert len(trials) - len(repeats) == 4
    assert repeats, "the seeded sampler repeated no point: the test no longer exercises repeats"
    by_point = {tuple(sorted(t.params.items())): t.value for t in trials if not t.user_attrs.get("repeat")}
    for t in repeats:  # a repeat is told the outcome of the point it repeats
        assert t.state == optuna.trial.TrialState.COMPLETE and t.value == by_point[tuple(sorted(t.params.items()))]

    bigger = {**design, "trials": 6}  # a budget larger than the space: nothing left to draw
    path = _write(tmp_path / "tiny_space.yaml", techniques=["rmsnorm", "qk_norm"], design=bigger)
    lines.clear()
    again = run_study(load_study(path), tmp_path / "state", echo=lines.append)
    assert not ray.is_initialized()  # nothing to run: Ray was not started
    assert "study tiny_space: search, budget 6 trials; the space has only 4 distinct points; all evaluated" in lines
    assert again.complete and again.ran == 0 and again.statuses == {"finished": 4}, lines
    assert len(client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")) == 4


def test_a_trial_killed_by_rays_memory_monitor_is_recorded_as_oom_and_the_driver_goes_on(tmp_path, monkeypatch):
    """Ray's memory monitor (threshold lowered so that it kills every trial worker) kills the trials: each is
    recorded as `oom` with the reason, none is left RUNNING, and run_study returns."""
    import ray
    from mlflow import MlflowClient

    from srdit.runtime.driver import run_study
    from srdit.study.spec import load_study

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_memory_usage_threshold", "0.001")
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "50")
    spec = load_study(_write(tmp_path / "mem.yaml", techniques=["rmsnorm"]))
    lines = []
    res = run_study(spec, tmp_path / "state", num_cpus=2, max_failures=1, echo=lines.append)
    assert not ray.is_initialized()
    assert res.statuses == {"oom": 2} and res.complete, lines  # oom is a result: nothing left to rerun
    client = MlflowClient(res.uri)
    runs = client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}
    assert all(r.data.tags["status_reason"].startswith("killed for memory by Ray") for r in runs)
    assert client.get_run(res.parent_run_id).info.status != "RUNNING"


def test_a_local_study_never_joins_a_ray_started_on_the_machine(tmp_path, monkeypatch):
    """A `ray start --head` of another job runs on the machine, discoverable the way `ray.init()` finds one (same
    Ray temp dir): a study without RAY_ADDRESS starts its own private Ray, and the other cluster sees no job."""
    import signal
    import subprocess
    import sys
    import tempfile

    import ray

    from srdit.runtime.driver import run_study
    from srdit.study.spec import load_study

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    temp = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # Ray's socket paths must stay short
    monkeypatch.setenv("RAY_TMPDIR", temp)
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            "--num-cpus=1",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "RAY_TMPDIR": temp},
    )
    try:
        current = Path(temp) / "ray" / "ray_current_cluster"  # where ray.init() looks for a running cluster
        for _ in range(600):  # a loaded machine can take minutes
            if current.exists() and current.read_text().strip():
                break
            time.sleep(0.5)
        address = current.read_text().strip()
        assert address, "the other job's Ray did not start"
        spec = load_study(_write(tmp_path / "alone.yaml", techniques=["rmsnorm"]))
        lines: list[str] = []
        res = run_study(spec, tmp_path / "state", num_cpus=2, echo=lines.append)
        assert res.complete and res.statuses == {"finished": 2}, lines
        assert any(line.startswith("Ray: a private local Ray on 127.0.0.1 (2 CPUs; auth ") for line in lines), lines
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        try:  # the other cluster's jobs: only this check's own connection
            jobs = ray._private.state.jobs()
            assert len(jobs) == 1, jobs
        finally:
            ray.shutdown()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
