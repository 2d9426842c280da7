"""Path, time shift, losses and samplers, checked against closed forms."""

import math

import pytest
import torch

from srdit.transport import (
    interpolate,
    sample,
    sample_times,
    score_from_velocity,
    shift_time,
    time_grid,
    velocity_target,
)
from srdit.transport.losses import flow_matching, total


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
    from srdit.builtins.cfm import contrastive
    from srdit.builtins.common import mean_squared_error
    from srdit.builtins.repa import alignment

    pred, target = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    aux = {"repa": torch.randn(4, 64, 16), "reg": torch.randn(4, 16)}
    fm = flow_matching(pred, target)
    terms = {
        "repa": alignment(aux["repa"], aux["repa"].clone()),
        "reg": mean_squared_error(aux["reg"], aux["reg"].clone()),
        "cfm": contrastive(pred, target),
    }
    assert torch.isclose(terms["repa"], torch.tensor(-1.0)) and float(terms["reg"]) == 0.0
    assert torch.isclose(terms["cfm"], -((pred - target.roll(1, 0)) ** 2).mean())
    w = {"repa": 0.5, "reg": 0.03, "cfm": 0.05}
    assert torch.isclose(total(fm, terms, w), fm + 0.5 * terms["repa"] + 0.05 * terms["cfm"])


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


@pytest.mark.parametrize(
    "sampler,steps,nfe,tol", [("sde", 100, 100, 0.08), ("euler", 100, 100, 0.05), ("heun", 20, 40, 0.02)]
)
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


def _per_step_draw_sampler(velocity, noise, sampler, steps, shift, generator):
    """The sampling loop as it was before the noise buffers (a transcription kept as the reference): the SDE noise
    drawn with torch.randn in float64 at every step, the time tensor built with torch.full at every call."""

    def v_at(state, t):
        tt = torch.full((state[0].shape[0],), float(t), dtype=torch.float32, device=state[0].device)
        return [v.double() for v in velocity(state, tt)]

    grid = time_grid(sampler, steps, shift)
    state = [x.double() for x in noise]
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        dt = t_next - t
        v = v_at(state, t)
        if sampler == "euler" or (sampler == "sde" and i == len(grid) - 2):
            if sampler == "sde":
                v = [vi - t * score_from_velocity(x, vi, torch.tensor(t)) for x, vi in zip(state, v)]
            state = [x + vi * dt for x, vi in zip(state, v)]
        elif sampler == "heun":
            pred = [x + vi * dt for x, vi in zip(state, v)]
            v2 = v_at(pred, t_next)
            state = [x + 0.5 * (a + b) * dt for x, a, b in zip(state, v, v2)]
        else:
            new = []
            for x, vi in zip(state, v):
                drift = vi - t * score_from_velocity(x, vi, torch.tensor(t))
                noise_i = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
                new.append(x + drift * dt + (2 * t * abs(dt)) ** 0.5 * noise_i)
            state = new
    return state


def _two_tensor_velocity(state, t):
    """A velocity on an image and a REG-like token, nonlinear in both and in t (float32, as a model returns)."""
    x, c = state[0].float(), state[1].float()
    tt = t.reshape(-1, 1, 1, 1)
    return [
        torch.tanh(x) * tt - 0.3 * x + c.mean(1).reshape(-1, 1, 1, 1),
        torch.sin(c) * t.reshape(-1, 1) + x.flatten(1)[:, :1],
    ]


# chunk sizes: the default (one chunk), one step per chunk, and 3 steps per chunk (the last chunk partial); each with
# and without the background thread that fills the next chunk while the current one is used
@pytest.mark.parametrize("chunk_steps", [None, 1, 3])
@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("sampler,shift", [("sde", 1.0), ("sde", 3.0), ("euler", 2.0), ("heun", 1.0)])
def test_noise_buffers_leave_the_samples_bit_identical(sampler, shift, chunk_steps, background, monkeypatch):
    """The sampler with its noise drawn into preallocated buffers (SdeNoise) and the time grid moved once per batch
    equals the per-step-draw loop bit for bit on CPU (same seed); an odd image size (3x5x7 per sample, not a
    multiple of the 16 values torch's normal kernel fills at once) and a second state tensor keep the draw order
    honest."""
    import srdit.transport.samplers as samplers

    shapes = [(6, 3, 5, 7), (6, 11)]
    per_step = 8 * sum(math.prod(s) for s in shapes)
    chunk_bytes = samplers.NOISE_CHUNK_BYTES if chunk_steps is None else chunk_steps * per_step
    real = samplers.SdeNoise
    monkeypatch.setattr(samplers, "SdeNoise", lambda *a, **k: real(*a, **{**k, "background": background}))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    state = [torch.randn(s, generator=g1) for s in shapes]
    assert all(torch.equal(a, torch.randn(s, generator=g2)) for a, s in zip(state, shapes))
    new = sample(_two_tensor_velocity, state, sampler, 10, shift, generator=g1, noise_chunk_bytes=chunk_bytes)
    old = _per_step_draw_sampler(_two_tensor_velocity, state, sampler, 10, shift, g2)
    for a, b in zip(new.state, old):
        assert a.dtype == torch.float64 and torch.equal(a, b)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # the generators end in step


def test_sde_noise_buffers_are_filled_once_per_chunk():
    """10 stochastic steps in chunks of 4: the buffers are allocated once, three chunks are drawn, and the step's
    noise equals a fresh per-step draw."""
    from srdit.transport.samplers import SdeNoise

    shapes = [(2, 3), (2, 5)]
    g, ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    noise = SdeNoise(shapes, 10, g, chunk_bytes=4 * 8 * 16, background=True)
    assert noise.chunk == 4
    buffers = [b.data_ptr() for b in noise._dev]
    try:
        for step in range(10):
            got = noise[step]
            assert [b.data_ptr() for b in noise._dev] == buffers
            for x, s in zip(got, shapes):
                assert torch.equal(x, torch.randn(s, generator=ref, dtype=torch.float64))
        with pytest.raises(IndexError, match="step 10 of 10"):
            noise[10]
    finally:
        noise.close()


def test_sampler_rejects_unknown():
    with pytest.raises(ValueError, match="allowed: sde, euler, heun"):
        time_grid("ddim", 10)


# ------------------------------------------------------------------------------------------------------------------
# Guidance: the semantics stated in srdit.transport.samplers, case by case, and one batched forward = two passes
# ------------------------------------------------------------------------------------------------------------------

from srdit.config import ModelConfig, RegConfig, SprintConfig  # noqa: E402
from srdit.model import build_model  # noqa: E402
from srdit.transport import guided_velocity  # noqa: E402

# Round-off bound for "one [2B] forward equals two [B] forwards": the same float32 arithmetic per sample, but the
# batched matmul kernels may sum in another order; float32 round-off through six blocks stays below 1e-5 here.
BATCH_TOL = 1e-5


def _guided_model(reg=True, sprint=True):
    cfg = ModelConfig(
        size="debug",
        sprint=SprintConfig(enabled=sprint),
        reg=RegConfig(enabled=reg, dim=16),
        norm="rmsnorm",
        qk_norm=True,
        value_residual=True,
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, cfg


def _state(cfg, n=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(n, 1, 8, 8, generator=g)]
    return s + ([torch.randn(n, cfg.reg.dim, generator=g)] if cfg.reg.enabled else [])


def _two_pass(model, y, null, cfg_scale, cls_cfg_scale, path_drop, low=0.0, high=1.0):
    """The guided velocity as two separate model calls (the pre-batching sampler), guiding every output in
    [low, high]."""

    def v(state, t):
        x, cls = state[0].float(), (state[1].float() if len(state) > 1 else None)
        c, ca = model(x, t, y, cls)
        if not low <= float(t[0]) <= high:
            return [c] + ([ca["reg"]] if "reg" in ca else [])
        u, ua = model(x, t, torch.full_like(y, null), cls, drop_sparse_path=path_drop)
        out = [u + cfg_scale * (c - u)]
        return out + ([ua["reg"] + cls_cfg_scale * (ca["reg"] - ua["reg"])] if "reg" in ca else [])

    return v


Y = torch.tensor([0, 3, 7])


@pytest.mark.parametrize("path_drop", [False, True])
def test_guidance_at_scale_one_is_the_conditional_model_in_one_pass(path_drop):
    model, cfg = _guided_model()
    state, t = _state(cfg), torch.full((3,), 0.6)
    counter = []
    v = guided_velocity(model, Y, 10, 1.0, 1.0, unconditional={"drop_sparse_path": path_drop}, counter=counter)(
        state, t
    )
    c, aux = model(state[0], t, Y, state[1])
    assert counter == [1]
    assert torch.equal(v[0], c) and torch.equal(v[1], aux["reg"])


def test_guidance_outside_its_interval_is_one_conditional_pass():
    model, cfg = _guided_model()
    state = _state(cfg)
    counter = []
    vel = guided_velocity(model, Y, 10, 4.0, 2.0, low=0.2, high=0.5, counter=counter)
    for t0, passes in ((0.9, 1), (0.1, 1), (0.35, 2), (0.5, 2)):
        counter.clear()
        t = torch.full((3,), t0)
        v = vel(state, t)
        assert sum(counter) == passes and len(counter) == 1
        if passes == 1:
            assert torch.equal(v[0], model(state[0], t, Y, state[1])[0])


@pytest.mark.parametrize("cfg_scale", [0.0, 0.5, 2.0, 4.0])
def test_image_guidance_takes_any_scale_as_written(cfg_scale):
    """w = 0 is the unconditional model, 0 < w < 1 weaker conditioning, w > 1 guidance: one doubled forward."""
    model, cfg = _guided_model()
    state, t = _state(cfg), torch.full((3,), 0.6)
    counter = []
    v = guided_velocity(model, Y, 10, cfg_scale, 1.0, counter=counter)(state, t)
    ref = _two_pass(model, Y, 10, cfg_scale, 1.0, False)(state, t)
    assert counter == [2]
    assert torch.allclose(v[0], ref[0], atol=BATCH_TOL, rtol=0)
    c, aux = model(state[0], t, Y, state[1])
    assert torch.allclose(v[1], aux["reg"], atol=BATCH_TOL, rtol=0)  # the class token stays conditional (scale 1)
    if cfg_scale == 0.0:
        u = model(state[0], t, torch.full_like(Y, 10), state[1])[0]
        assert torch.allclose(v[0], u, atol=BATCH_TOL, rtol=0)


def test_class_token_guidance_alone_runs_the_second_branch_with_reg_only():
    model, cfg = _guided_model(reg=True)
    state, t = _state(cfg), torch.full((3,), 0.6)
    counter = []
    v = guided_velocity(model, Y, 10, 1.0, 3.0, counter=counter)(state, t)
    ref = _two_pass(model, Y, 10, 1.0, 3.0, False)(state, t)
    assert counter == [2]
    assert torch.allclose(v[1], ref[1], atol=BATCH_TOL, rtol=0)
    assert torch.allclose(v[0], model(state[0], t, Y, state[1])[0], atol=BATCH_TOL, rtol=0)
    assert not torch.allclose(v[1], model(state[0], t, Y, state[1])[1]["reg"], atol=1e-3)
    plain, pcfg = _guided_model(reg=False)  # without the REG token cls_cfg_scale applies to nothing: one pass
    pstate = _state(pcfg)
    counter.clear()
    v = guided_velocity(plain, Y, 10, 1.0, 3.0, counter=counter)(pstate, t)
    assert counter == [1] and torch.equal(v[0], plain(pstate[0], t, Y)[0])


def test_path_drop_guidance_drops_the_sparse_path_in_the_unconditional_half_only():
    model, cfg = _guided_model()
    state, t = _state(cfg), torch.full((3,), 0.6)
    v = guided_velocity(model, Y, 10, 2.5, 1.5, unconditional={"drop_sparse_path": True})(state, t)
    ref = _two_pass(model, Y, 10, 2.5, 1.5, True)(state, t)
    no_drop = _two_pass(model, Y, 10, 2.5, 1.5, False)(state, t)
    for a, b in zip(v, ref):
        assert torch.allclose(a, b, atol=BATCH_TOL, rtol=0)
    assert not torch.allclose(v[0], no_drop[0], atol=1e-3)


def test_guidance_matches_the_reference_formula_where_the_reference_guides():
    """SR-DiT's sampler (cfg_scale > 1, cls_cfg_scale > 0) guides the SDE drift d = v - t s(v); s is affine in v at
    fixed (x, t), so guiding the velocity gives the same drift."""
    model, cfg = _guided_model()
    state, t0 = _state(cfg), 0.6
    t = torch.full((3,), t0)
    v = guided_velocity(model, Y, 10, 4.0, 2.0)(state, t)
    x = state[0]
    c, ca = model(x, t, Y, state[1])
    u, ua = model(x, t, torch.full_like(Y, 10), state[1])
    drift = lambda vel: vel - t0 * score_from_velocity(x, vel, torch.tensor(t0))
    assert torch.allclose(drift(v[0]), drift(u) + 4.0 * (drift(c) - drift(u)), atol=1e-4)


@pytest.mark.parametrize("sampler,path_drop", [("sde", True), ("heun", False)])
def test_batched_guidance_sampler_equals_the_two_call_sampler(sampler, path_drop):
    """Whole sampling runs: one [2B] forward per step vs two [B] forwards (BATCH_TOL: float32 round-off of the
    batched kernels, amplified over 8 steps; the state itself is integrated in float64)."""
    model, cfg = _guided_model()
    for low in (0.0, 0.3):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        counter = []
        batched = sample(
            guided_velocity(
                model, Y, 10, 3.0, 2.0, low=low, unconditional={"drop_sparse_path": path_drop}, counter=counter
            ),
            _state(cfg),
            sampler,
            8,
            generator=g1,
        )
        two = sample(_two_pass(model, Y, 10, 3.0, 2.0, path_drop, low), _state(cfg), sampler, 8, generator=g2)
        assert batched.nfe == two.nfe and len(counter) == batched.nfe
        assert (sum(counter) == 2 * batched.nfe) == (low == 0.0)
        for a, b in zip(batched.state, two.state):
            assert torch.allclose(a, b, atol=10 * BATCH_TOL, rtol=0)
