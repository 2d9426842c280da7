"""Path, time shift, losses and samplers, checked against closed forms."""

import math

import pytest
import torch

from srdit.config import LossConfig
from srdit.transport import interpolate, sample, sample_times, shift_time, time_grid, velocity_target
from srdit.transport.losses import loss_terms, total


def test_interpolant_endpoints_and_velocity():
    x0, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    assert torch.equal(interpolate(x0, eps, torch.zeros(4)), x0)  # t = 0 is data
    assert torch.equal(interpolate(x0, eps, torch.ones(4)), eps)  # t = 1 is noise
    t, h = torch.full((4,), 0.3, dtype=torch.float64), 1e-6
    fd = (interpolate(x0.double(), eps.double(), t + h) - interpolate(x0.double(), eps.double(), t - h)) / (2 * h)
    assert torch.allclose(fd, velocity_target(x0, eps).double(), atol=1e-6)


def test_time_shift_formula():
    t = torch.linspace(0, 1, 11)
    s = math.sqrt(32 * 16 * 16 / 4096)  # SR-DiT at 256 px: sqrt(2)
    assert torch.allclose(shift_time(t, s), s * t / (1 + (s - 1) * t))
    assert shift_time(t, s)[5] > 0.5  # mass moves toward noise
    assert torch.equal(shift_time(t, 1.0), t)
    assert float(shift_time(torch.tensor([1.0]), 3.0)) == 1.0 and float(shift_time(torch.tensor([0.0]), 3.0)) == 0.0


def test_sample_times_ranges():
    g = torch.Generator().manual_seed(0)
    for kind in ("uniform", "logit_normal"):
        t = sample_times(10_000, kind, shift=2.0, generator=g)
        assert 0 <= t.min() and t.max() <= 1
    u = sample_times(10_000, "uniform", generator=g)
    assert abs(float(u.mean()) - 0.5) < 0.02
    with pytest.raises(ValueError, match="allowed"):
        sample_times(3, "beta")


def test_sde_grid_matches_paper():
    grid = time_grid("sde", 250, shift=1.0)
    assert len(grid) == 251 and float(grid[0]) == 1.0 and float(grid[-1]) == 0.0
    assert abs(float(grid[-2]) - 0.04) < 1e-12


def test_losses_named_and_weighted_in_one_place():
    pred, target = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    aux = {"repa": torch.randn(4, 64, 16), "reg": torch.randn(4, 16)}
    terms = loss_terms(pred, target, aux, repa_target=aux["repa"].clone(), reg_target=aux["reg"].clone(), cfm=True)
    assert set(terms) == {"fm", "repa", "reg", "cfm"}
    assert torch.isclose(terms["repa"], torch.tensor(-1.0)) and float(terms["reg"]) == 0.0
    assert torch.isclose(terms["cfm"], -((pred - target.roll(1, 0)) ** 2).mean())
    w = LossConfig(repa=0.5, reg=0.03, cfm=0.05)
    assert torch.isclose(total(terms, w), terms["fm"] + 0.5 * terms["repa"] + 0.05 * terms["cfm"])


def gaussian_velocity(mu, sigma):
    """Exact velocity for data N(mu, sigma^2) per dimension on the linear path x_t = (1-t) x0 + t eps."""

    def v(state, t):
        x = state[0]
        tt = t.double().reshape(-1, *([1] * (x.dim() - 1)))
        var = (1 - tt) ** 2 * sigma**2 + tt**2
        r = x - (1 - tt) * mu
        e_eps = tt / var * r
        e_x0 = mu + (1 - tt) * sigma**2 / var * r
        return [e_eps - e_x0]

    return v


@pytest.mark.parametrize("sampler,steps,nfe,tol", [("sde", 100, 100, 0.08), ("euler", 100, 100, 0.05), ("heun", 20, 40, 0.02)])
@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_samplers_reproduce_gaussian_target(sampler, steps, nfe, tol, shift):
    """Tolerance: 20k samples give a standard error of ~0.01 on the std; the rest is discretisation error."""
    mu, sigma = 1.5, 0.5
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20_000, 1, generator=g)
    res = sample(gaussian_velocity(mu, sigma), [noise], sampler=sampler, steps=steps, shift=shift, generator=g)
    x = res.state[0]
    assert res.nfe == nfe
    assert abs(float(x.mean()) - mu) < tol
    assert abs(float(x.std()) - sigma) < tol


def test_sampler_rejects_unknown():
    with pytest.raises(ValueError, match="allowed: sde, euler, heun"):
        time_grid("ddim", 10)
