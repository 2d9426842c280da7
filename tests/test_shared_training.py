"""Train once, evaluate many: trials whose configs train the same model (equal training_config) share one
training; every member keeps its own evaluations. Planner grouping and cost, the trainer's extra evaluations,
evaluation from EMA snapshots, the fixed-checkpoint arm, and bad input."""

from pathlib import Path

import pytest
import yaml

from srdit.config import ConfigError, RunConfig, apply_diff, from_dict, to_dict
from srdit.study.designs import format_plan, plan_study
from srdit.study.spec import load_study, study_from_dict

TRAIN_METRICS = ("loss", "grad_norm")
"Training metrics that must agree between members (throughput is wall-clock and differs)."

TINY = {
    "train": {"steps": 6, "batch_size": 16, "log_every": 2, "ckpt_every": 3, "eval_every": 3},
    "eval": {"n_samples": 40, "batch_size": 40},
    "sample": {"sampler": "euler", "steps": 2},
}


def shared_study(**kw) -> dict:
    return {
        "name": "shared",
        "base": TINY,
        "techniques": ["rope", "logit_normal", "balanced_labels", {"name": "cfg2", "diff": {"sample.cfg_scale": 2.0}}],
        "seeds": [0, 1],
        "metrics": {"primary": "fd", "direction": "min"},
        **kw,
    }


# ------------------------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------------------------


def test_plan_groups_trials_that_train_the_same_model():
    plan = plan_study(study_from_dict(shared_study()))
    assert len(plan.trials) == 32 and len(plan.trainings) == 8
    by_key = {t.key: t for t in plan.trials}
    seen = set()
    for g in plan.trainings:
        members = [by_key[k] for k in g.members]
        assert len(members) == 4 and g.trial_key == g.members[0]
        # planted truth: a group is one (rope, logit_normal, seed) combination, over every evaluation-time setting
        assert len({(t.cell[:2], t.seed) for t in members}) == 1
        assert sorted(t.cell[2:] for t in members) == ["00", "01", "10", "11"]
        assert members[0].cell[2:] == "00"  # the training run is the plan's first member
        seen.add((members[0].cell[:2], members[0].seed))
        seen.update(g.members)
    assert len(seen) == 8 + 32  # every trial in exactly one training
    unshared = plan_study(study_from_dict(shared_study()), share=False)
    assert len(unshared.trainings) == 32 and all(len(g.members) == 1 for g in unshared.trainings)


def test_a_custom_diff_of_a_training_key_is_not_shared():
    spec = study_from_dict(
        {**shared_study(), "techniques": ["balanced_labels", {"name": "lr", "diff": {"train.lr": 3e-3}}]}
    )
    plan = plan_study(spec)
    assert len(plan.trials) == 8 and len(plan.trainings) == 4  # lr (x seeds) trains; balanced_labels does not


def test_cost_counts_trainings_and_evaluations_apart():
    spec = study_from_dict(shared_study())
    shared, unshared = plan_study(spec), plan_study(spec, share=False)
    a, b = shared.cost(concurrency=2), unshared.cost(concurrency=2)
    assert (a["trainings"], a["evaluations"], b["trainings"], b["evaluations"]) == (8, 32, 32, 32)
    assert a["total_steps"] == 8 * 6 and b["total_steps"] == a["unshared_steps"] == 32 * 6
    assert a["evaluation_seconds"] == b["evaluation_seconds"]  # every member is still evaluated
    assert a["training_seconds"] * 4 == pytest.approx(b["training_seconds"], abs=0.4)  # each rounded to 0.1 s
    text = format_plan(shared)
    assert "trainings: 8 (instead of 32), evaluations: 32" in text and "sharing saves 24 trainings" in text
    assert "trainings: 32 (one per trial), evaluations: 32" in format_plan(unshared)
    js = shared.to_json()
    assert js["cost"]["trainings"] == 8 and len(js["trainings"]) == 8
    assert {m for g in js["trainings"] for m in g["members"]} == {t.key for t in shared.trials}


def test_gpu_hours_count_a_shared_training_once():
    long = {**TINY, "train": {**TINY["train"], "steps": 1_000_000, "batch_size": 256, "eval_every": 0}}
    spec = study_from_dict({**shared_study(), "base": long, "resources": {"cpus": 1, "gpus": 1}})
    shared, unshared = plan_study(spec).gpu_estimate(), plan_study(spec, share=False).gpu_estimate()
    from srdit.study.compute import trial_flops

    trials = plan_study(spec).trials
    train = sum(trial_flops(t.config, evaluate=False) for t in trials)
    evals = sum(trial_flops(t.config, train=False) for t in trials)
    assert shared["pflops"] == pytest.approx((train / 4 + evals) / 1e15, abs=0.01)
    assert unshared["pflops"] == pytest.approx((train + evals) / 1e15, abs=0.01)
    assert shared["training_gpu_hours"] * 4 == pytest.approx(unshared["training_gpu_hours"], abs=0.4)
    assert shared["gpu_hours_unshared"] == unshared["gpu_hours"] > shared["gpu_hours"]
    text = format_plan(plan_study(spec))
    assert "summed over the 32 trials: " in text and " for 8 trainings, " in text and " for 32 evaluations; " in text


# ------------------------------------------------------------------------------------------------------------------
# the trainer: one training, several evaluations; evaluation from snapshots
# ------------------------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def report(self, step, metrics):
        self.rows.append((step, dict(metrics)))

    def at(self, keys) -> list[tuple[int, dict]]:
        return [(s, {k: v for k, v in m.items() if k in keys}) for s, m in self.rows if set(m) & set(keys)]


EVAL_KEYS = ("fd", "kd", "kd_std", "precision", "recall", "nfe")


def _cfgs():
    from srdit.techniques import with_techniques

    base = from_dict(RunConfig, {**to_dict(RunConfig()), **{}})
    base = apply_diff(
        base,
        {
            "train.steps": 6,
            "train.batch_size": 16,
            "train.log_every": 2,
            "train.ckpt_every": 3,
            "train.eval_every": 3,
            "eval.n_samples": 40,
            "eval.batch_size": 40,
            "sample.sampler": "euler",
            "sample.steps": 2,
        },
    )
    return base, apply_diff(base, {"sample.cfg_scale": 2.0}), with_techniques(base, ["balanced_labels"])


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """One training with two further evaluations, and the member configs trained alone."""
    from srdit.train import Evaluation, train

    root = tmp_path_factory.mktemp("shared")
    base, cfg2, bal = _cfgs()
    reps = [Recorder() for _ in range(3)]
    res = train(
        base,
        root / "lead",
        reps[0],
        progress=False,
        snapshots=True,
        evaluations=[Evaluation(cfg2, root / "cfg2", reps[1]), Evaluation(bal, root / "bal", reps[2])],
    )
    alone = Recorder()
    res_alone = train(cfg2, root / "alone", alone, progress=False)
    return root, res, reps, res_alone, alone


def test_group_training_reports_training_to_every_member_and_each_its_own_evaluation(shared_run):
    root, res, reps, res_alone, alone = shared_run
    assert res.status == "finished" and len(res.evaluations) == 2
    curves = [r.at(TRAIN_METRICS) for r in reps]
    assert curves[0] and curves[0] == curves[1] == curves[2]
    evals = [r.at(EVAL_KEYS) for r in reps]
    assert [s for s, _ in evals[0]] == [s for s, _ in evals[1]] == [3, 6]
    assert evals[0] != evals[1] and evals[0] != evals[2]  # each member is evaluated under its own settings
    # equivalence: a member evaluated inside the shared training equals that cell trained alone
    assert evals[1] == alone.at(EVAL_KEYS)
    assert reps[1].at(TRAIN_METRICS) == alone.at(TRAIN_METRICS)
    assert {k: v for k, v in res_alone.metrics.items() if k in EVAL_KEYS} == {
        k: v for k, v in res.evaluations[0].items() if k in EVAL_KEYS
    }
    for name in ("cfg2", "bal"):
        assert (root / name / "samples.png").is_file() and (root / name / "config.yaml").is_file()
        assert sorted(p.name for p in (root / name / "evals").iterdir()) == ["step_0000003.json", "step_0000006.json"]
    assert sorted(p.name for p in (root / "lead" / "checkpoints").glob("ema_step*.pt")) == [
        "ema_step0000003.pt",
        "ema_step0000006.pt",
    ]


def test_evaluation_from_snapshots_equals_the_in_training_evaluation(shared_run, tmp_path):
    from srdit.train import evaluate_trained

    root, res, reps, _, _ = shared_run
    _, cfg2, _ = _cfgs()
    rec = Recorder()
    out = evaluate_trained(root / "lead", cfg2, tmp_path / "later", rec)
    assert out.status == "finished" and out.step == 6
    assert rec.at(EVAL_KEYS) == reps[1].at(EVAL_KEYS)  # bit-identical: same weights, same sampling
    assert rec.at(TRAIN_METRICS) == reps[1].at(TRAIN_METRICS)  # the whole training curve
    assert {k: out.metrics[k] for k in EVAL_KEYS} == {k: res.evaluations[0][k] for k in EVAL_KEYS}
    assert (tmp_path / "later" / "samples.png").is_file()


def test_an_evaluation_that_trains_another_model_is_refused(shared_run, tmp_path):
    from srdit.train import Evaluation, evaluate_trained, train

    root = shared_run[0]
    base, _, _ = _cfgs()
    other = apply_diff(base, {"train.lr": 3e-3})
    with pytest.raises(ValueError, match=r"trains another model .*train\.lr"):
        train(base, tmp_path / "x", evaluations=[Evaluation(other, tmp_path / "y", Recorder())], progress=False)
    with pytest.raises(ValueError, match=r"trains another model .*train\.lr"):
        evaluate_trained(root / "lead", other, tmp_path / "z")
    with pytest.raises(ValueError, match="no finished training here"):
        evaluate_trained(tmp_path, base, tmp_path / "z")


# ------------------------------------------------------------------------------------------------------------------
# the fixed-checkpoint arm
# ------------------------------------------------------------------------------------------------------------------


def test_fixed_checkpoint_plan_trains_nothing_and_refuses_a_training_factor(shared_run):
    ckpt = str(shared_run[0] / "lead" / "checkpoints" / "last.pt")
    spec = study_from_dict(
        {
            **shared_study(),
            "checkpoint": ckpt,
            "techniques": ["balanced_labels", {"name": "cfg2", "diff": {"sample.cfg_scale": 2.0}}],
        }
    )
    plan = plan_study(spec)
    assert plan.trainings == [] and len(plan.trials) == 8 and plan.cost()["trainings"] == 0
    assert plan.cost()["total_steps"] == 0
    assert "trainings: 0 (instead of 8), evaluations: 8; nothing trains" in format_plan(plan)
    assert {t.config["eval"]["seed"] for t in plan.trials} == {0, 1}  # a seed draws the evaluation
    with pytest.raises(ConfigError, match=r"checkpoint: technique rope changes the training \(model\.rope"):
        plan_study(study_from_dict({**shared_study(), "checkpoint": ckpt}))


@pytest.mark.parametrize("value", ["", 3, ["a.pt"]])
def test_fixed_checkpoint_bad_value_names_the_key(value):
    with pytest.raises(ConfigError, match=r"^checkpoint: .* is not allowed; expected the path of a checkpoint"):
        study_from_dict({**shared_study(), "checkpoint": value})


def test_preflight_checks_the_fixed_checkpoint(shared_run, tmp_path):
    from srdit.study.preflight import input_and_metric_problems

    techs = ["balanced_labels"]
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    for path, want in [
        (tmp_path / "missing.pt", "no such checkpoint file; train one with `srdit train`"),
        (text, "a text file, not a PyTorch checkpoint"),
    ]:
        spec = study_from_dict({**shared_study(), "techniques": techs, "checkpoint": str(path)})
        problems = input_and_metric_problems(spec, plan_study(spec))
        assert any(p.startswith(f"checkpoint {path}: ") and want in p for p in problems), problems
    other = {**TINY, "model": {"norm": "rmsnorm"}}
    spec = study_from_dict(
        {
            **shared_study(),
            "base": other,
            "techniques": techs,
            "checkpoint": str(shared_run[0] / "lead" / "checkpoints" / "last.pt"),
        }
    )
    problems = input_and_metric_problems(spec, plan_study(spec))
    assert any("another model (model.norm: 'layernorm' there, 'rmsnorm' here)" in p for p in problems), problems
    good = study_from_dict(
        {**shared_study(), "techniques": techs, "checkpoint": str(shared_run[0] / "lead" / "checkpoints" / "last.pt")}
    )
    assert input_and_metric_problems(good, plan_study(good)) == []


def test_evaluate_checkpoint_equals_the_training_final_evaluation(shared_run, tmp_path):
    from srdit.train import evaluate_checkpoint

    root, res, reps, _, _ = shared_run
    _, cfg2, _ = _cfgs()
    rec = Recorder()
    out = evaluate_checkpoint(root / "lead" / "checkpoints" / "last.pt", cfg2, tmp_path / "ev", rec)
    assert out.step == 6 and rec.at(EVAL_KEYS) == reps[1].at(EVAL_KEYS)[-1:]


# ------------------------------------------------------------------------------------------------------------------
# studies on a real local Ray into a real SQLite MLflow store
# ------------------------------------------------------------------------------------------------------------------

QUALITY = ("fd", "kd", "kd_std", "precision", "recall", "nfe", "loss", "grad_norm")
"Per-cell metrics that sharing must not change (throughput and wall time are measurements of the machine)."


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _children(res):
    from srdit.runtime.tracking import StudyTracking

    t = StudyTracking(res.uri, res.experiment_id, "", res.parent_run_id, None)
    return t.children_by_key()


def _cell_metrics(children) -> dict:
    return {r.data.tags["cell"]: {k: v for k, v in r.data.metrics.items() if k in QUALITY} for r in children.values()}


def _histories(uri, children, keys=("fd", "loss")) -> dict:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    return {
        r.data.tags["cell"]: {
            k: [(m.step, m.value) for m in sorted(c.get_metric_history(r.info.run_id, k), key=lambda m: m.step)]
            for k in keys
        }
        for r in children.values()
    }


@pytest.mark.slow
def test_shared_study_equals_the_unshared_study_per_cell(tmp_path, ray_local):
    """8 cells x 1 seed: one training-time technique and two evaluation-time ones. Shared: 2 trainings; unshared
    (--no-share): 8. Every cell's quality metrics and curves agree exactly; the evaluation runs name their training
    run; a lost member is evaluated again from the snapshots alone; the analysis sees the same effects."""
    from srdit.runtime.driver import run_study
    from srdit.runtime.results import load_results

    data = {
        **shared_study(),
        "techniques": ["rmsnorm", "balanced_labels", {"name": "cfg2", "diff": {"sample.cfg_scale": 2.0}}],
        "seeds": [0],
    }
    spec = load_study(_write(tmp_path / "shared.yaml", data))
    shared = run_study(spec, tmp_path / "a")
    unshared = run_study(spec, tmp_path / "b", share=False)
    assert shared.complete and unshared.complete and shared.statuses == unshared.statuses == {"finished": 8}

    ca, cb = _children(shared), _children(unshared)
    assert len(ca) == len(cb) == 8
    # the run trains 2 models: only the training runs' folders hold a training checkpoint
    trained = [k for k in ca if (tmp_path / "a" / "trials" / "shared" / k / "checkpoints" / "last.pt").is_file()]
    assert len(trained) == 2
    assert len([k for k in cb if (tmp_path / "b" / "trials" / "shared" / k / "checkpoints" / "last.pt").is_file()]) == 8
    train_ids = {ca[k].info.run_id: ca[k].data.tags["cell"][0] for k in trained}
    for k, r in ca.items():
        t = r.data.tags
        assert t["training_group"] and t["shared_by"] == "4"
        if k in trained:
            assert "train_run_id" not in t
        else:  # an evaluation run: linked to the training run of its rmsnorm level
            assert train_ids[t["train_run_id"]] == t["cell"][0]
    for r in cb.values():
        assert "train_run_id" not in r.data.tags and "training_group" not in r.data.tags
    ma, mb = _cell_metrics(ca), _cell_metrics(cb)
    assert set(ma) == set(mb) and all(set(ma[c]) == set(QUALITY) for c in ma)
    assert ma == mb  # exactly: the same trainings, the same sampling
    assert _histories(shared.uri, ca) == _histories(unshared.uri, cb)
    assert len({ma[c]["fd"] for c in ma}) == 8  # every cell evaluated under its own settings

    from srdit.analysis.effects import analyze

    ra, rb = load_results(spec, tmp_path / "a")[0], load_results(spec, tmp_path / "b")[0]
    cols = ["cell", "seed", "fd", "kd", "precision", "recall"]
    ta = ra.table[cols].sort_values("cell").reset_index(drop=True)
    tb = rb.table[cols].sort_values("cell").reset_index(drop=True)
    assert ta.equals(tb)
    for m in ("fd", "kd", "precision", "recall"):  # the effects the analysis reports: identical
        ea, eb = (analyze(t.table, spec.factor_names, m, bootstrap=False) for t in (ra, rb))
        assert ea.fit.main_effects == eb.fit.main_effects and ea.pairs.synergy == eb.pairs.synergy

    # a lost evaluation run (deleted from the store): the rerun evaluates only it, from the snapshots, untrained
    from mlflow import MlflowClient

    lost = next(k for k in ca if k not in trained)
    MlflowClient(shared.uri).delete_run(ca[lost].info.run_id)
    again = run_study(spec, tmp_path / "a")
    assert again.complete and again.skipped == 7 and again.ran == 1
    redone = _children(again)[lost]
    lead = next(k for k in trained if ca[k].info.run_id == ca[lost].data.tags["train_run_id"])
    assert Path(redone.data.tags["evaluated_from"]) == (tmp_path / "a" / "trials" / "shared" / lead).resolve()
    assert redone.data.tags["train_run_id"] == ca[lost].data.tags["train_run_id"]
    assert {k: v for k, v in redone.data.metrics.items() if k in QUALITY} == ma[redone.data.tags["cell"]]
    assert _histories(shared.uri, {lost: redone}) == {
        redone.data.tags["cell"]: _histories(shared.uri, ca)[redone.data.tags["cell"]]
    }
    # a done study is skipped whole
    assert run_study(spec, tmp_path / "a").ran == 0


@pytest.mark.slow
def test_fixed_checkpoint_study_evaluates_without_training(tmp_path, ray_local):
    from srdit.runtime.driver import run_study
    from srdit.train import train

    base, _, _ = _cfgs()
    train(base, tmp_path / "ref", progress=False)
    data = {
        **shared_study(),
        "techniques": ["balanced_labels", {"name": "cfg2", "diff": {"sample.cfg_scale": 2.0}}],
        "seeds": [0],
        "checkpoint": str(tmp_path / "ref" / "checkpoints" / "last.pt"),
    }
    spec = load_study(_write(tmp_path / "fixed.yaml", data))
    res = run_study(spec, tmp_path / "s")
    assert res.complete and res.statuses == {"finished": 4}
    children = _children(res)
    assert {r.data.tags["evaluated_from"] for r in children.values()} == {data["checkpoint"]}
    for k, r in children.items():
        assert not (tmp_path / "s" / "trials" / "fixed" / k / "checkpoints").exists()  # nothing trained
        assert "fd" in r.data.metrics and "loss" not in r.data.metrics
    assert len({r.data.metrics["fd"] for r in children.values()}) == 4


def test_a_crashed_group_training_marks_every_member(tmp_path):
    """The training raises (its train.init file vanished after the preflight): every member's run is crashed with
    the reason, and the group trial itself returns instead of raising."""
    from srdit.runtime.driver import _context, prepare, work_units
    from srdit.runtime.jobs import trial_job
    from srdit.runtime.worker import execute_group

    init = tmp_path / "init.pt"
    data = {
        **shared_study(),
        "techniques": ["balanced_labels", {"name": "cfg2", "diff": {"sample.cfg_scale": 2.0}}],
        "seeds": [0],
        "base": {**TINY, "train": {**TINY["train"], "init": str(init)}},
    }
    spec = load_study(_write(tmp_path / "crash.yaml", data))
    plan, tracking, paths = prepare(spec, tmp_path / "s")
    (unit,) = work_units(plan, [trial_job(t, ".") for t in plan.trials], {})
    assert len(unit.members) == 4
    out = execute_group(unit, _context(spec, tracking, paths, plan))
    assert out["status"] == "crashed" and out["members_done"] == 4
    children = tracking.children_by_key()
    assert len(children) == 4
    for r in children.values():
        assert r.data.tags["status"] == "crashed" and "init.pt: no such checkpoint file" in r.data.tags["status_reason"]


# ------------------------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------------------------


def test_study_plan_prints_trainings_and_no_share(tmp_path, capsys):
    from srdit.commands.study import main

    path = _write(tmp_path / "s.yaml", shared_study())
    assert main(["plan", str(path)]) == 0
    assert "trainings: 8 (instead of 32), evaluations: 32; sharing saves 24 trainings" in capsys.readouterr().out
    assert main(["plan", str(path), "--no-share"]) == 0
    out = capsys.readouterr().out
    assert "trainings: 32 (one per trial), evaluations: 32" in out and "sharing off (--no-share)" in out
    assert main(["plan", str(path), "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["cost"]["trainings"] == 8


def test_the_shipped_shared_study_plans_8_trainings_for_32_trials():
    plan = plan_study(load_study(Path(__file__).resolve().parents[1] / "studies" / "digits_shared.yaml"))
    assert (len(plan.cells), len(plan.trials), len(plan.trainings)) == (16, 32, 8)


@pytest.mark.parametrize(
    "data, want",
    [
        ({"checkpoint": 7}, "checkpoint: 7 is not allowed; expected the path of a checkpoint file"),
        ({"checkpoint": "x.pt"}, "checkpoint: technique rope changes the training"),
        (
            {"checkpoint": "x.pt", "techniques": ["balanced_labels"]},
            "checkpoint x.pt: no such checkpoint file; train one with `srdit train`",
        ),
    ],
)
def test_bad_checkpoint_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, data, want):
    from srdit.commands.study import main

    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "s.yaml", {**shared_study(), **data})
    code = main(["run", str(path), "--state", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 2 and want in err and "Traceback" not in err
    assert not (tmp_path / "state").exists()  # refused before anything was recorded
