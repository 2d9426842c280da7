"""Content keys and reuse of finished runs across studies (srdit.runtime.reuse, srdit.provenance.code_version).

Fast: the code version follows the syntax tree (not comments or docstrings); the keys follow the training part, the
evaluation part, file contents (not path names) and the code version. Slow: studies into one real SQLite store on
a real local Ray, where a second study adopts the finished runs whose keys match and trains only the rest."""

from pathlib import Path

import pytest
import yaml

from srdit.config import RunConfig, apply_diff, to_dict
from srdit.provenance import code_version, source_digest
from srdit.runtime.reuse import RUN_KEY, TRAINING_KEY, content_keys

# ----------------------------------------------------------------------------------------------------------------
# code version
# ----------------------------------------------------------------------------------------------------------------

MODULE = '''"""A module docstring."""
import math


def scale(x):
    """Double it."""
    return 2 * x  # the factor


class Box:
    size: int = 3
    "an attribute docstring"
'''


def _version(tmp_path: Path, source: str) -> str:
    pkg = tmp_path / f"v{abs(hash(source))}"
    (pkg / "model").mkdir(parents=True)
    (pkg / "model" / "net.py").write_text(source)
    (pkg / "train.py").write_text("STEPS = 10\n")
    return code_version(("model", "train.py"), pkg)


def test_code_version_ignores_comments_docstrings_and_layout(tmp_path):
    base = _version(tmp_path, MODULE)
    assert len(base) == 16
    edited = (
        MODULE.replace("# the factor", "# a new comment")
        .replace("Double it.", "Twice x.")
        .replace("A module docstring.", "Other words.")
        .replace('"an attribute docstring"', '"changed"')
        .replace("return 2 * x", "return 2*x")
    )
    assert edited != MODULE and _version(tmp_path, edited) == base
    assert _version(tmp_path, MODULE + "\n\n# trailing comment\n") == base


@pytest.mark.parametrize(
    "change",
    [
        ("return 2 * x", "return 3 * x"),
        ("size: int = 3", "size: int = 4"),
        ("import math", "import cmath"),
        ("def scale(x):", "def scale(y):"),
    ],
)
def test_code_version_changes_with_the_code(tmp_path, change):
    assert _version(tmp_path, MODULE.replace(*change)) != _version(tmp_path, MODULE)


def test_code_version_covers_every_file_of_its_parts(tmp_path):
    pkg = tmp_path / "p"
    (pkg / "model").mkdir(parents=True)
    (pkg / "model" / "a.py").write_text("A = 1\n")
    before = code_version(("model",), pkg)
    (pkg / "model" / "b.py").write_text("B = 2\n")  # a new module in a covered folder
    pkg2 = tmp_path / "p2"
    (pkg2 / "model").mkdir(parents=True)
    (pkg2 / "model" / "a.py").write_text("A = 1\n")
    (pkg2 / "model" / "b.py").write_text("B = 2\n")
    assert code_version(("model",), pkg2) != before
    assert code_version(("model",), pkg) == before  # cached per process: the tree under a running process


def test_source_digest_rejects_broken_source():
    with pytest.raises(SyntaxError):
        source_digest("def broken(:\n")


# ----------------------------------------------------------------------------------------------------------------
# content keys
# ----------------------------------------------------------------------------------------------------------------


def _cfg(**diff) -> dict:
    return to_dict(apply_diff(RunConfig(), diff).validate())


def test_evaluation_settings_change_the_run_key_only():
    base = content_keys(_cfg())
    for diff in ({"sample.cfg_scale": 2.0}, {"sample.steps": 7}, {"eval.n_samples": 700}, {"eval.seed": 5}):
        k = content_keys(_cfg(**diff))
        assert k[TRAINING_KEY] == base[TRAINING_KEY] and k[RUN_KEY] != base[RUN_KEY], diff
    for diff in ({"train.lr": 2e-3}, {"train.seed": 1}, {"model.norm": "rmsnorm"}, {"train.steps": 7}):
        k = content_keys(_cfg(**diff))
        assert k[TRAINING_KEY] != base[TRAINING_KEY] and k[RUN_KEY] != base[RUN_KEY], diff
    assert content_keys(_cfg()) == base  # deterministic


def test_evaluation_time_techniques_do_not_change_the_training_key():
    from srdit.techniques import with_techniques

    plain = to_dict(with_techniques(RunConfig(), []))
    balanced = to_dict(with_techniques(RunConfig(), ["balanced_labels"]))
    a, b = content_keys(plain), content_keys(balanced)
    assert a[TRAINING_KEY] == b[TRAINING_KEY] and a[RUN_KEY] != b[RUN_KEY]


def test_paths_enter_the_keys_by_content_not_by_name(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "init.pt").write_bytes(b"weights-1")
    (tmp_path / "b.pt").write_bytes(b"weights-1")
    same_rel = content_keys(_cfg(**{"train.init": "a/init.pt"}), tmp_path)
    same_abs = content_keys(_cfg(**{"train.init": str(tmp_path / "b.pt")}), "/")
    assert same_rel == same_abs  # another name, the same bytes
    (tmp_path / "b.pt").write_bytes(b"weights-2")
    other = content_keys(_cfg(**{"train.init": str(tmp_path / "b.pt")}), "/")
    assert other[TRAINING_KEY] != same_rel[TRAINING_KEY]  # the same name, other bytes
    (tmp_path / "ref.npz").write_bytes(b"stats-1")
    r1 = content_keys(_cfg(**{"eval.reference": "ref.npz"}), tmp_path)
    (tmp_path / "ref.npz").write_bytes(b"stats-22")
    r2 = content_keys(_cfg(**{"eval.reference": "ref.npz"}), tmp_path)
    assert r1[TRAINING_KEY] == r2[TRAINING_KEY] and r1[RUN_KEY] != r2[RUN_KEY]


def test_code_versions_are_part_of_the_keys(monkeypatch):
    import srdit.provenance as prov

    base = content_keys(_cfg())
    monkeypatch.setattr(prov, "training_code_version", lambda: "another-training-code")
    k = content_keys(_cfg())
    assert k[TRAINING_KEY] != base[TRAINING_KEY] and k[RUN_KEY] != base[RUN_KEY]
    monkeypatch.undo()
    monkeypatch.setattr(prov, "evaluation_code_version", lambda: "another-evaluation-code")
    k = content_keys(_cfg())
    assert k[TRAINING_KEY] == base[TRAINING_KEY] and k[RUN_KEY] != base[RUN_KEY]


def test_latent_data_enters_by_its_index_checksum(tmp_path, monkeypatch):
    import srdit.data.latents as latents

    monkeypatch.setattr(latents, "index_fingerprint", lambda root: "idx-" + Path(root).name[-1])
    cfg = lambda p: _cfg(**{"data.dataset": "latents", "data.path": p})  # noqa: E731
    assert content_keys(cfg("x/lat1"), tmp_path) == content_keys(cfg("y/other1"), tmp_path)
    assert content_keys(cfg("x/lat1"), tmp_path)[TRAINING_KEY] != content_keys(cfg("x/lat2"), tmp_path)[TRAINING_KEY]


def test_plan_reuse_without_a_store_reads_nothing_and_creates_nothing(tmp_path):
    from srdit.commands.study import plan_reuse
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    spec = load_study(write_study(tmp_path / "a.yaml", "a"))
    out = plan_reuse(spec, plan_study(spec), tmp_path / "state")
    assert out["reused"] == 0 and out["done"] == 0 and "no finished run" in out["line"]
    assert not (tmp_path / "state").exists()


# ----------------------------------------------------------------------------------------------------------------
# studies in one store
# ----------------------------------------------------------------------------------------------------------------

TINY_BASE = {
    "train": {"steps": 4, "batch_size": 16, "log_every": 2, "ckpt_every": 4},
    "eval": {"n_samples": 50, "batch_size": 50},
    "sample": {"sampler": "euler", "steps": 2},
}
LR_X = {"name": "x", "diff": {"train.lr": 2.0e-3}}
LR_Y = {"name": "y", "diff": {"train.lr": 3.0e-3, "train.grad_clip": 0.5}}
X_WINS = [{"wins": "x", "over": "y"}]


def write_study(path: Path, name: str, techniques=(LR_X, LR_Y), **kw) -> Path:
    data = {
        "name": name,
        "base": TINY_BASE,
        "techniques": list(techniques),
        "seeds": [0],
        "constraints": X_WINS,
        "metrics": {"primary": "fd", "direction": "min"},
        **kw,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _children(uri: str, parent: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    return {r.data.tags["cell"]: r for r in runs}


@pytest.mark.slow
def test_a_second_study_adopts_matching_runs_and_trains_only_the_changed_cell(tmp_path, monkeypatch, capsys):
    """Study a: x (lr 2e-3) and y (lr 3e-3, grad clip 0.5), x wins over y. Study b: the same, but y's lr is 4e-3,
    which only cell 01 (y alone) sees: exactly one cell has another training config. b adopts 00, 10, 11 from a
    and trains 01; Ray starts only for that. A copy of a under a third name adopts everything without starting
    Ray; --no-reuse trains again."""
    from mlflow import MlflowClient

    from srdit.commands.study import main as study_main
    from srdit.commands.study import plan_reuse
    from srdit.runtime.driver import run_study
    from srdit.runtime.results import load_results
    from srdit.study.designs import plan_study
    from srdit.study.spec import load_study

    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"
    a = load_study(write_study(tmp_path / "a.yaml", "a"))
    b = load_study(
        write_study(
            tmp_path / "b.yaml", "b", techniques=[LR_X, {"name": "y", "diff": {**LR_Y["diff"], "train.lr": 4.0e-3}}]
        )
    )
    # one CPU: one trial worker runs the trials in turn; a second would add only its start-up (imports, MLflow
    # store) on a machine that the other test process keeps busy
    ra = run_study(a, state, num_cpus=1)
    assert ra.complete and ra.ran == 4 and ra.reused == 0
    uri = ra.uri
    client = MlflowClient(uri)
    src = _children(uri, ra.parent_run_id)
    assert all(r.data.tags.get(TRAINING_KEY) and r.data.tags.get(RUN_KEY) for r in src.values())

    plan_b = plan_study(b)
    pr = plan_reuse(b, plan_b, state)
    assert pr["reused"] == 3 and pr["from"] == {"a": 3} and "3 of 4 trials would be reused from study a" in pr["line"]

    lines: list[str] = []
    rb = run_study(b, state, num_cpus=1, echo=lines.append)
    assert rb.complete and rb.ran == 1 and rb.reused == 3 and rb.skipped == 3
    assert any("3 of 4 trials reused from study a" in ln for ln in lines)
    got = _children(uri, rb.parent_run_id)
    assert set(got) == {"00", "10", "01", "11"}
    for cell in ("00", "10", "11"):
        r, s = got[cell], src[cell]
        t = r.data.tags
        assert t["reused_from"] == s.info.run_id and t["reused_from_study"] == "a" and t["study"] == "b"
        assert t["trial_dir"] == s.data.tags["trial_dir"] and t["status"] == "finished"
        assert r.info.status == "FINISHED" and t[RUN_KEY] == s.data.tags[RUN_KEY]
        assert t["git_commit"] == s.data.tags["git_commit"] and t["device"] == s.data.tags["device"]
        assert r.data.metrics == s.data.metrics
        for key in ("loss", "fd"):
            assert [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, key)] == [
                (m.step, m.value) for m in client.get_metric_history(s.info.run_id, key)
            ]
        assert {x.path for x in client.list_artifacts(r.info.run_id)} >= {"samples.png", "config.yaml", "evals"}
        assert r.data.params["train.lr"] == s.data.params["train.lr"]
    trained = got["01"].data.tags
    assert "reused_from" not in trained and trained[TRAINING_KEY] != src["01"].data.tags[TRAINING_KEY]
    assert got["01"].data.params["train.lr"] == "0.004" and src["01"].data.params["train.lr"] == "0.003"
    assert got["11"].data.params["train.lr"] == "0.002"  # x wins: y's lr does not reach cell 11
    assert any(ln.startswith("Ray:") for ln in lines)  # one trial to train: Ray started

    results, _ = load_results(b, state, curves=False, samples=False)
    assert results.reused_from == {"a": 3} and len(results.table) == 4
    assert study_main(["status", str(tmp_path / "b.yaml"), "--state", str(state)]) == 0
    out = capsys.readouterr().out
    assert "3 of 4 trials reused from study a" in out and out.count("reused from study a (run ") == 3

    # a copy of a under another name: every trial adopted, Ray never started
    c = load_study(write_study(tmp_path / "c.yaml", "c"))
    lines = []
    rc = run_study(c, state, num_cpus=1, echo=lines.append)
    assert rc.complete and rc.ran == 0 and rc.reused == 4
    assert not any(ln.startswith("Ray:") for ln in lines)
    assert {cell: r.data.tags["reused_from"] for cell, r in _children(uri, rc.parent_run_id).items()} == {
        cell: r.info.run_id for cell, r in src.items()
    }
    # study d (one technique, x): its two cells are a's 00 and 10, but --no-reuse trains them
    d = load_study(write_study(tmp_path / "d.yaml", "d", techniques=[LR_X], constraints=[]))
    assert plan_reuse(d, plan_study(d), state)["reused"] == 2
    rd = run_study(d, state, num_cpus=1, reuse=False)
    assert rd.complete and rd.ran == 2 and rd.reused == 0
    trained_d = _children(uri, rd.parent_run_id)
    assert not any("reused_from" in r.data.tags for r in trained_d.values())
    # same content keys, trained again: the same metrics (a CPU run is deterministic given its seed)
    assert trained_d["1"].data.tags[RUN_KEY] == src["10"].data.tags[RUN_KEY]
    assert trained_d["1"].data.metrics["fd"] == pytest.approx(src["10"].data.metrics["fd"], rel=1e-6)


CFG2 = {"name": "cfg2", "diff": {"sample.cfg_scale": 2.0}}


@pytest.mark.slow
def test_same_training_other_evaluation_settings_evaluates_the_finished_training(tmp_path, monkeypatch):
    """Study a: x (training-time) and cfg2 (evaluation-time): 4 trials, 2 trainings (00 and 10 train, 01 and 11 are
    evaluation runs of them). Study b: the same with another sampler step count: its run keys all differ, its
    training keys match: nothing is adopted or trained, each trial is evaluated from a's training folder (its EMA
    snapshots), tagged with a's training run, with a's training curve and its own evaluation. Study c (cfg2 alone)
    adopts a's 00 and 01; the adopted evaluation run points at its training's folder."""
    from mlflow import MlflowClient

    from srdit.runtime.driver import run_study
    from srdit.study.spec import load_study

    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"
    a = load_study(write_study(tmp_path / "a.yaml", "a", techniques=[LR_X, CFG2], constraints=[]))
    b_base = {**TINY_BASE, "sample": {"sampler": "euler", "steps": 3}}
    b = load_study(write_study(tmp_path / "b.yaml", "b", techniques=[LR_X, CFG2], constraints=[], base=b_base))
    ra = run_study(a, state, num_cpus=1)
    assert ra.complete
    src = _children(ra.uri, ra.parent_run_id)
    assert src["01"].data.tags["train_run_id"] == src["00"].info.run_id  # a shared training (train once)
    lines: list[str] = []
    rb = run_study(b, state, num_cpus=1, echo=lines.append)
    assert rb.complete and rb.reused == 0
    assert any("4 trial(s) evaluated from finished trainings of study a (4)" in ln for ln in lines), lines
    assert any("0 training(s)" in ln for ln in lines), lines
    got = _children(rb.uri, rb.parent_run_id)
    client = MlflowClient(rb.uri)
    loss = lambda r: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss")]  # noqa: E731
    for cell, trained in (("00", "00"), ("01", "00"), ("10", "10"), ("11", "10")):
        t, s = got[cell].data.tags, src[cell].data.tags
        assert t["status"] == "finished" and "reused_from" not in t
        assert t[TRAINING_KEY] == s[TRAINING_KEY] and t[RUN_KEY] != s[RUN_KEY]
        assert t["train_run_id"] == src[trained].info.run_id and t["reused_training_from_study"] == "a"
        assert Path(t["evaluated_from"]) == Path(src[trained].data.tags["trial_dir"])
        assert not (Path(t["trial_dir"]) / "checkpoints").exists()  # evaluated, not trained
        assert loss(got[cell]) == loss(src[trained])  # the training's curve, from its folder
        assert "fd" in got[cell].data.metrics

    c = load_study(write_study(tmp_path / "c.yaml", "c", techniques=[CFG2], constraints=[]))
    lines = []
    rc = run_study(c, state, num_cpus=1, echo=lines.append)
    assert rc.complete and rc.ran == 0 and rc.reused == 2 and not any(ln.startswith("Ray:") for ln in lines)
    adopted = _children(rc.uri, rc.parent_run_id)
    assert adopted["1"].data.tags["reused_from"] == src["01"].info.run_id
    assert adopted["1"].data.tags["trial_dir"] == src["00"].data.tags["trial_dir"]  # where the model is
