"""One graph under torch.compile: every technique's forward compiles with fullgraph=True (no graph break), and
training steps that take both SPRINT path-drop outcomes never recompile (the decision is a tensor drawn with the
step's noise, applied without a Python branch). CPU, `aot_eager` backend: dynamo's tracing and AOT autograd's
joint graph without inductor's code generation."""

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from srdit.config import RunConfig, apply_diff
from srdit.model import build_model
from srdit.techniques import SRDIT_STACK, TECHNIQUES, with_techniques
from srdit.train import TrainStep, make_batches, make_optimizer
from srdit.transport.objective import StepNoise, training_losses

SMALL = {"train.batch_size": 8, "train.threads": 1, "model.sprint.path_drop_prob": 0.5}
# Techniques that change the network or the objective around it (the others act on sampling or evaluation only).
MODEL_TECHNIQUES = [
    n for n, t in TECHNIQUES.items() if any(k.startswith(("model.", "loss.", "transport.")) for k in t.diff)
]


def _config(techniques):
    return apply_diff(with_techniques(RunConfig(), techniques), SMALL)


def _compiled_step(cfg, model):
    """Forward + losses + backward of one training step through the fullgraph-compiled model."""
    torch.manual_seed(0)
    data = make_batches(cfg, torch.device("cpu"))
    net = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.train()
    x0, y, *teacher = data.next()
    noise = StepNoise.draw(cfg, model, x0.shape, cfg.shift_value(), "cpu", data.dp)
    losses = training_losses(net, x0, y, teacher, cfg, noise)
    losses["loss"].backward()
    return losses, net


STACK = [t for t in SRDIT_STACK if t in MODEL_TECHNIQUES]


def _combos(slow: bool):
    """Fast: plain, the SR-DiT stack, and the stack with the other MLP kinds; slow: every technique alone."""
    if slow:
        return [[n] for n in MODEL_TECHNIQUES]
    return [[], STACK] + [STACK + [m] for m in ("swiglu", "relu2") if m in MODEL_TECHNIQUES]


def _valid(techniques):
    try:
        _config(techniques)
        return True
    except Exception:
        return False


def _check_one_graph(techniques):
    torch._dynamo.reset()
    cfg = _config(techniques)
    model = build_model(cfg.model)
    losses, net = _compiled_step(cfg, model)
    assert torch.isfinite(losses["loss"])
    model.eval()  # sampling: eval mode, Python-bool path-drop guidance, still one graph
    with torch.no_grad():
        x = torch.randn(2, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
        cls = torch.randn(2, cfg.model.reg.dim) if cfg.model.reg.enabled else None
        net(x, torch.rand(2), torch.zeros(2, dtype=torch.long), cls, drop_sparse_path=cfg.model.sprint.enabled)


@pytest.mark.parametrize("techniques", [c for c in _combos(False) if _valid(c)], ids=lambda c: "+".join(c) or "plain")
def test_the_stacks_compile_to_one_graph(techniques):
    _check_one_graph(techniques)


@pytest.mark.slow
@pytest.mark.parametrize("techniques", [c for c in _combos(True) if _valid(c)], ids=lambda c: "+".join(c))
def test_every_technique_compiles_to_one_graph(techniques):
    _check_one_graph(techniques)


def test_path_drop_outcomes_do_not_recompile(monkeypatch):
    """20 steps of the trainer's step with SPRINT (path drop 0.5) through the compiled model: both outcomes occur,
    dynamo traces one graph and never recompiles."""
    torch._dynamo.reset()
    counters.clear()
    cfg = _config(["sprint", "rope"])
    torch.manual_seed(0)
    data = make_batches(cfg, torch.device("cpu"))
    model = build_model(cfg.model)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    net = torch.compile(model, backend="aot_eager", fullgraph=True)
    step = TrainStep(cfg, model, ema, make_optimizer(model, cfg, torch.device("cpu")), torch.device("cpu"), net=net)
    drops, draw = [], StepNoise.draw

    def recorded(*a, **k):
        noise = draw(*a, **k)
        drops.append(bool(noise.path_drop))
        return noise

    monkeypatch.setattr(StepNoise, "draw", recorded)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    model.train()
    for i in range(20):
        x0, y, *teacher = data.next()
        step(x0, y, teacher, i + 1)
    assert set(drops) == {True, False}, drops
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    assert step.flush()[1] is None
