"""The training objective (srdit.transport.objective): which terms exist per technique, how they are weighted,
and that they are the closed forms of the path (t = 1 noise, x_t = (1 - t) x0 + t eps, target eps - x0)."""

import math

import pytest
import torch
import torch.nn.functional as F

from srdit.config import RunConfig, apply_diff
from srdit.model import build_model
from srdit.parallel import DataParallel
from srdit.techniques import with_techniques
from srdit.transport.objective import StepNoise, teacher_widths, training_losses

COMBOS = [[], ["repa"], ["reg"], ["cfm"], ["repa", "reg"], ["sprint", "repa", "reg", "cfm", "value_residual"]]
WEIGHTS = {"loss.repa": 0.7, "loss.reg": 0.2}


def _setup(techs, seed=0):
    cfg = apply_diff(with_techniques(RunConfig(), techs), {"train.batch_size": 6, **WEIGHTS})
    m = cfg.model
    torch.manual_seed(seed)
    model = build_model(m).train()
    with torch.no_grad():  # non-zero heads, so that every term carries signal
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape))
    g = torch.Generator().manual_seed(seed + 1)
    b, grid = cfg.train.batch_size, m.input_size // m.patch_size
    x0 = torch.randn(b, m.in_channels, m.input_size, m.input_size, generator=g)
    y = torch.randint(0, m.num_classes, (b,), generator=g)
    teacher_out = None
    if teacher_widths(m):
        teacher_out = (
            torch.randn(b, grid * grid, m.repa.teacher_dim, generator=g),
            torch.randn(b, m.reg.dim, generator=g),
        )
    noise = StepNoise.draw(cfg, model, x0.shape, cfg.shift_value(), "cpu", DataParallel())
    return cfg, model, x0, y, teacher_out, noise


@pytest.mark.parametrize("techs", COMBOS, ids=lambda t: "+".join(t) or "plain")
def test_training_losses_terms_and_weighted_total(techs):
    cfg, model, x0, y, teacher_out, noise = _setup(techs)
    losses = training_losses(model, x0, y, teacher_out, cfg, noise)
    m = cfg.model
    expect = ["loss", "fm"] + ["repa"] * m.repa.enabled + ["reg"] * m.reg.enabled + ["cfm"] * ("cfm" in techs)
    assert list(losses) == expect
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    weights = {"fm": 1.0, "repa": cfg.loss.repa, "reg": cfg.loss.reg, "cfm": cfg.loss.cfm}
    weighted = sum(weights[k] * float(v.detach()) for k, v in losses.items() if k != "loss")
    assert math.isclose(float(losses["loss"]), weighted, rel_tol=1e-6)
    losses["loss"].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("techs", COMBOS, ids=lambda t: "+".join(t) or "plain")
def test_training_losses_are_the_closed_forms(techs):
    """Each term recomputed by hand from the same noise and the same model call (same RNG state for SPRINT's
    path drop): dropped labels -> null label, x_t = (1 - t) x0 + t eps, v* = eps - x0; REG noises the class token
    on the same path; REPA's target starts with the class token when REG is on; CFM uses the supplied roll."""
    cfg, model, x0, y, teacher_out, noise = _setup(techs)
    m = cfg.model
    roll = lambda v: v.roll(2, dims=0)  # noqa: E731  any pairing: the objective must use the one it is given
    torch.manual_seed(9)
    losses = training_losses(model, x0, y, teacher_out, cfg, noise, roll=roll)

    t = noise.t[:, None, None, None]
    y_in = torch.where(noise.drop, torch.full_like(y, m.num_classes), y)
    cls_t = None
    if m.reg.enabled:
        cls0 = teacher_out[1]
        cls_t = (1 - noise.t[:, None]) * cls0 + noise.t[:, None] * noise.eps_cls
    torch.manual_seed(9)
    pred, aux = model((1 - t) * x0 + t * noise.eps, noise.t, y_in, cls_t, route_noise=noise.route)
    target = noise.eps - x0
    close = lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-7)  # noqa: E731
    assert close(losses["fm"], ((pred - target) ** 2).mean())
    if m.repa.enabled:
        patches = teacher_out[0]
        want = torch.cat([teacher_out[1][:, None], patches], 1) if m.reg.enabled else patches
        assert close(losses["repa"], -F.cosine_similarity(aux["repa"], want, dim=-1).mean())
    if m.reg.enabled:
        assert close(losses["reg"], ((aux["reg"] - (noise.eps_cls - teacher_out[1])) ** 2).mean())
    if "cfm" in techs:
        assert close(losses["cfm"], -((pred - roll(target)) ** 2).mean())


def test_default_roll_pairs_each_sample_with_the_previous_one():
    cfg, model, x0, y, teacher_out, noise = _setup(["cfm"])
    torch.manual_seed(3)
    a = training_losses(model, x0, y, teacher_out, cfg, noise)
    torch.manual_seed(3)
    b = training_losses(model, x0, y, teacher_out, cfg, noise, roll=lambda v: v.roll(1, dims=0))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_widths():
    assert teacher_widths(RunConfig().model) == set()
    both = apply_diff(with_techniques(RunConfig(), ["repa", "reg"]), {"model.repa.teacher_dim": 32}).model
    assert teacher_widths(both) == {32, both.reg.dim}


def test_alignment_and_cfm_settings_are_read_only_in_model_transport_and_config():
    """REPA / REG / CFM live in model, transport and config: no other module reads their settings (attribute reads
    such as `cfg.model.reg.enabled` or `cfg.loss.cfm`). `srdit convert` is the exception by design: a checkpoint map
    names every part of the model, the REPA projector's block included."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "srdit"
    homes = ("model/", "transport/", "config.py", "techniques.py", "convert.py")
    settings = {"enabled", "dim", "depth", "teacher_dim", "projector_dim"}

    def reads(node) -> bool:
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)):
            return False
        return (node.value.attr in ("reg", "repa") and node.attr in settings) or (
            node.value.attr == "loss" and node.attr in ("cfm", "repa", "reg")
        )

    strays = [
        f"{p.relative_to(root)}:{n.lineno}"
        for p in root.rglob("*.py")
        if not str(p.relative_to(root)).startswith(homes)
        for n in ast.walk(ast.parse(p.read_text()))
        if reads(n)
    ]
    assert not strays, strays
