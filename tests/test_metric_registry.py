"""The metric registry (srdit.metric_registry) against what runs really report.

Every metric name a run can report is in the registry with its producers and its kind (curve: reported at several
steps and a study metric; otherwise a final or bookkeeping value), and every registry entry is reported by
something. The trainer and the digits evaluation are run for real (a tiny CPU training with every technique that
can be on together, evaluated twice); the latent evaluation's metric functions are run on small synthetic features
(the Inception / DINOv2 networks are local files the suite does not have); what only a failure or a study trial
reports is read from the code."""

from __future__ import annotations

import ast
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

import srdit
from srdit import metric_registry
from srdit.config import ConfigError, RunConfig, apply_diff
from srdit.metric_registry import METRICS
from srdit.techniques import TECHNIQUES, with_techniques
from srdit.train import EVALS, TRAIN_LOG, train

SRC = Path(srdit.__file__).parent
TINY = {
    "train.steps": 4,
    "train.log_every": 1,
    "train.ckpt_every": 100,
    "train.eval_every": 2,
    "train.threads": 1,
    "eval.n_samples": 40,
    "eval.batch_size": 40,
    "sample.steps": 2,
}


class Recorder:
    """A Reporter keeping every report: name -> steps at which it was reported."""

    def __init__(self):
        self.steps: dict[str, list[int]] = defaultdict(list)

    def report(self, step, metrics):
        for k in metrics:
            self.steps[k].append(step)


def _all_compatible_techniques() -> list[str]:
    """Every registered technique, in registry order, skipping one that cannot be on with those before it."""
    on: list[str] = []
    for name in TECHNIQUES:
        try:
            with_techniques(RunConfig(), [*on, name])
        except ConfigError:
            continue
        on.append(name)
    return on


def _jsonl_keys(path: Path) -> set[str]:
    """Metric names of a JSON-lines log of reports ({"step": ..., name: value, ...} per line)."""
    return {k for line in path.read_text().splitlines() if line.strip() for k in json.loads(line) if k != "step"}


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> dict[str, dict]:
    """name -> {"producers": {...}, "several_steps": bool} of what real runs report."""
    out: dict[str, dict] = defaultdict(lambda: {"producers": set(), "several_steps": False})

    def seen(names, producer: str, steps: dict[str, list[int]] | None = None) -> None:
        for n in names:
            out[n]["producers"].add(producer)
            if steps is not None and len(set(steps.get(n, []))) > 1:
                out[n]["several_steps"] = True

    # a tiny digits training with every technique that can be on together, evaluated at step 2 and at the end
    on = _all_compatible_techniques()
    assert {"repa", "reg", "cfm"} <= set(on)  # the techniques that add loss terms
    cfg = apply_diff(with_techniques(RunConfig(), on), TINY)
    run = tmp_path_factory.mktemp("digits")
    rec = Recorder()
    res = train(cfg, run, rec, progress=False, snapshots=True)
    assert res.status == "finished"
    train_names = _jsonl_keys(run / TRAIN_LOG)  # every training report (and the throughput summary)
    eval_names = {k for p in (run / EVALS).glob("*.json") for k in json.loads(p.read_text())}
    assert len(list((run / EVALS).glob("*.json"))) == 2
    # what the reporter saw and what the run returns all come from one of the two logs
    assert set(rec.steps) | set(res.metrics) == train_names | eval_names
    assert not train_names & eval_names
    seen(train_names, "train", rec.steps)
    seen(eval_names, "digits", rec.steps)

    # a run that diverges reports the step at which it did
    cfg = apply_diff(
        RunConfig(), {**TINY, "train.steps": 20, "train.eval_every": 0, "train.lr": 1e6, "train.grad_clip": 0.0}
    )
    run = tmp_path_factory.mktemp("diverged")
    rec = Recorder()
    assert train(cfg, run, rec, progress=False, snapshots=True).status == "diverged"
    seen(_jsonl_keys(run / TRAIN_LOG), "train", rec.steps)

    # the latent evaluation: FID / sFID / IS / precision / recall and KD_DINOv2 on small synthetic features, plus
    # what `_evaluate_latents` adds (nfe); reported at every evaluation like the digits metrics
    from srdit.metrics.dinov2_kd import kd_dinov2
    from srdit.metrics.inception import Reference, metrics_from_features

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(64, 6)), rng.normal(size=(48, 6))
    ref = Reference(
        mu=real.mean(0),
        sigma=np.cov(real, rowvar=False),
        mu_s=real.mean(0),
        sigma_s=np.cov(real, rowvar=False),
        pool=real,
    )
    latents = set(metrics_from_features({"pool": fake, "spatial": fake, "logits": rng.normal(size=(48, 10))}, ref))
    latents |= set(kd_dinov2(real, fake, subset_size=32))
    latents |= _returned_dict_keys(SRC / "evaluate.py", "_evaluate_latents")
    for n in latents:  # evaluate_target reports them at each evaluation, as it did the digits metrics above
        out[n]["producers"].add("latents")
        out[n]["several_steps"] = True

    # read from the code: the failure steps the trainer reports, and what a study trial adds to its run's metrics
    failures = _report_training_keys(SRC / "train.py")
    assert "diverged_step" in failures  # the static reading agrees with the diverged run
    for n in failures:
        out[n]["producers"].add("train")
    for n in _trial_metric_keys():
        out[n]["producers"].add("trial")
    return dict(out)


def _returned_dict_keys(path: Path, function: str) -> set[str]:
    """String keys of the dict literals `function` returns."""
    fn = next(n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef) and n.name == function)
    return {
        k.value
        for r in ast.walk(fn)
        if isinstance(r, ast.Return) and isinstance(r.value, ast.Dict)
        for k in r.value.keys
        if isinstance(k, ast.Constant) and isinstance(k.value, str)
    }


def _report_training_keys(path: Path) -> set[str]:
    """Every string in the dict keys of the trainer's `report_training(...)` calls (the failure steps)."""
    out = set()
    for call in ast.walk(ast.parse(path.read_text())):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "report_training":
            for d in (a for a in call.args if isinstance(a, ast.Dict)):
                for k in d.keys:
                    out |= _key_values(k)
    return out


def _key_values(node: ast.expr) -> set[str]:
    """The strings a dict key expression can take: a constant, or either branch of `a if cond else b`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _key_values(node.body) | _key_values(node.orelse)
    return set()


def _trial_metric_keys() -> set[str]:
    """What the study runtime adds to a trial's metrics: in every function that logs a run's metrics
    (`.log_metrics(...)`), the string keys of the dict literals it logs and of the items it sets (`final[k] = ...`)."""
    out = set()
    for path in sorted(SRC.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            calls = [
                c
                for c in ast.walk(fn)
                if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "log_metrics"
            ]
            for c in calls:
                for d in (n for a in c.args for n in ast.walk(a) if isinstance(n, ast.Dict)):
                    out |= {k.value for k in d.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            if calls:
                out |= {
                    t.slice.value
                    for a in ast.walk(fn)
                    if isinstance(a, ast.Assign)
                    for t in a.targets
                    if isinstance(t, ast.Subscript)
                    and isinstance(t.slice, ast.Constant)
                    and isinstance(t.slice.value, str)
                }
    return out


def test_every_reported_metric_is_registered_with_its_producers(reported):
    missing = sorted(set(reported) - set(METRICS))
    assert not missing, f"reported but not in srdit.metric_registry: {missing}"
    wrong = {
        n: (sorted(METRICS[n].producers), sorted(r["producers"]))
        for n, r in reported.items()
        if set(METRICS[n].producers) != r["producers"]
    }
    assert not wrong, f"registry producers differ from the reporters (registry, reported): {wrong}"


def test_every_registered_metric_is_reported_by_something(reported):
    assert not sorted(set(METRICS) - set(reported)), "registered but reported by nothing"


def test_curve_metrics_are_the_study_metrics_reported_at_several_steps(reported):
    # curve: reported at several steps of a run (a learning curve); a value reported once per run (a summary,
    # a failure step, a trial's wall time) or a bookkeeping value (sample count, nfe) is not a curve
    wrong = {
        n: METRICS[n].curve
        for n, r in reported.items()
        if METRICS[n].curve != (r["several_steps"] and METRICS[n].analysable)
    }
    assert not wrong, f"registry `curve` is wrong for: {wrong}"


def test_the_evaluations_metric_lists_derive_from_the_registry(reported):
    from srdit.evaluate import EVAL_METRICS

    for dataset in ("digits", "latents"):
        assert set(EVAL_METRICS[dataset]) == {n for n, r in reported.items() if dataset in r["producers"]}
    assert set(metric_registry.produced_by("trial")) == {n for n, r in reported.items() if "trial" in r["producers"]}
