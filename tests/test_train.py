"""The trainer: exact resume, divergence as a result, the CLI's one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from srdit.config import RunConfig, apply_diff
from srdit.techniques import with_techniques
from srdit.train import load_checkpoint, train

TINY = {
    "train.steps": 20,
    "train.log_every": 1,
    "train.ckpt_every": 10,
    "train.threads": 1,
    "eval.n_samples": 60,
    "eval.batch_size": 60,
    "sample.steps": 4,
}


class Recorder:
    def __init__(self, stop_at=None):
        self.rows, self.stop_at = [], stop_at

    def report(self, step, metrics):
        self.rows.append((step, dict(metrics)))
        if self.stop_at is not None and step == self.stop_at:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of a run

    def losses(self):
        return {s: m["loss"] for s, m in self.rows if "loss" in m}


def test_resume_is_exact(tmp_path):
    """Stopped at step 15 (last checkpoint at 10) and resumed: same losses and bit-identical final weights."""
    cfg = apply_diff(with_techniques(RunConfig(), ["sprint", "repa", "cfm"]), TINY)
    full = Recorder()
    train(cfg, tmp_path / "a", full, progress=False)
    part = Recorder(stop_at=15)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", part, progress=False)
    assert load_checkpoint(tmp_path / "b/checkpoints/last.pt")["step"] == 10
    rest = Recorder()
    result = train(cfg, tmp_path / "b", rest, progress=False)
    assert result.status == "finished" and result.step == 20
    assert rest.losses() == {s: v for s, v in full.losses().items() if s > 10}
    a = load_checkpoint(tmp_path / "a/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "b/checkpoints/last.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_absurd_learning_rate_diverges_with_its_step(tmp_path):
    cfg = apply_diff(RunConfig(), {**TINY, "train.lr": 1e6, "train.grad_clip": 0.0})
    rec = Recorder()
    result = train(cfg, tmp_path, rec, progress=False)
    assert result.status == "diverged"
    assert f"step {result.step + 1}" in result.reason and result.step < 20
    assert rec.rows[-1][1]["diverged_step"] == result.step + 1


def test_run_folder_contents(tmp_path):
    cfg = apply_diff(RunConfig(), TINY)
    result = train(cfg, tmp_path, progress=False)
    assert {"fd", "kd", "kd_std", "precision", "recall"} <= set(result.metrics)
    for name in ("config.yaml", "samples.png", "samples.npz", "checkpoints/last.pt", "result.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def srdit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "srdit", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "missing.yaml"], "missing.yaml: no such file"),
        (["train", "BAD"], "BAD: YAML syntax error at line 3"),
        (["train", "train.steps=many"], "train.steps: expected an integer"),
        (["train", "model.flash=true"], "model.flash: unknown key; allowed keys in model"),
        (["train", "TECH"], "unknown technique 'flash'"),
        (["train", "IMPOSSIBLE"], "model.repa.depth (4) lies inside the SPRINT sparse path"),
        (["evaluate", "FOREIGN"], "not a readable srdit checkpoint"),
        (["sample", "OTHER", "--out", "x"], "not an srdit checkpoint"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "BAD").write_text("train:\n  steps: [1\n")
    (tmp_path / "TECH").write_text("techniques: [flash]\n")
    (tmp_path / "IMPOSSIBLE").write_text("techniques: [sprint, repa]\nmodel:\n  repa:\n    depth: 4\n")
    (tmp_path / "FOREIGN").write_bytes(b"not a checkpoint")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "OTHER")
    r = srdit(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_train_sample_evaluate(tmp_path):
    r = srdit(
        "train",
        "train.steps=30",
        "train.log_every=10",
        "eval.n_samples=100",
        "sample.steps=8",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == "finished"
    ckpt = str(tmp_path / "run/checkpoints/last.pt")
    r = srdit("sample", ckpt, "--n", "20", "--sampler", "heun", "--steps", "5", "--out", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["nfe"] == 10 and (tmp_path / "s/samples.png").is_file()
    r = srdit("evaluate", ckpt, "--n", "100", "--steps", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"fd", "kd", "kd_std", "precision", "recall", "n"} and out["n"] == 100


def test_an_interrupted_evaluation_runs_again_on_resume(tmp_path):
    """Killed while evaluating at step 10 (the checkpoint of step 10 is written): the resumed run evaluates step 10
    before training on, and each completed evaluation leaves evals/step_N.json."""
    cfg = apply_diff(RunConfig(), {**TINY, "train.eval_every": 10})

    class StopAtEval(Recorder):
        def report(self, step, metrics):
            if "fd" in metrics:
                raise KeyboardInterrupt
            super().report(step, metrics)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, StopAtEval(), progress=False)
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 10
    assert not (tmp_path / "evals" / "step_0000010.json").exists()
    rec = Recorder()
    train(cfg, tmp_path, rec, progress=False)
    evals = [s for s, m in rec.rows if "fd" in m]
    assert evals == [10, 20] and rec.rows[0][0] == 10  # step 10's evaluation first, then training from step 11
    assert json.loads((tmp_path / "evals" / "step_0000010.json").read_text())["fd"] > 0
    assert (tmp_path / "evals" / "step_0000020.json").is_file()
