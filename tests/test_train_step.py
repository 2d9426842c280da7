"""The training step at GPU scale: no host synchronisation per step, divergence found at the next log point, the
on-device skip of a non-finite update, and the same numbers as the per-parameter AdamW / EMA loop."""

import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import srdit.train as train_module
from srdit.config import RunConfig, apply_diff
from srdit.model import build_model
from srdit.techniques import with_techniques
from srdit.train import TrainStep, load_optimizer_state, make_batches, make_optimizer, train
from srdit.transport.objective import StepNoise, training_losses

TINY = {
    "train.steps": 12,
    "train.log_every": 4,
    "train.ckpt_every": 1000,
    "train.threads": 1,
    "train.batch_size": 16,
    "eval.n_samples": 20,
    "eval.batch_size": 20,
    "sample.steps": 2,
}

# Operators that copy a device value to the host (and so wait for the device): `item`, `bool(t)`, `float(t)` and
# `int(t)` all dispatch `_local_scalar_dense`; the others have data-dependent output shapes.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}


class SyncCounter(TorchDispatchMode):
    """Counts host synchronisations on CPU: the dispatcher operators above, plus `tolist` / `numpy` / `cpu`
    (which on CPU bypass the dispatcher, so they are patched).

    Not counted: reads of the optimizer's step counters (`opt`), which live on the host by design (torch keeps
    them there for the foreach AdamW, so reading them never waits on a GPU; on CUDA the trainer's fused AdamW keeps
    them on the device and never reads them back)."""

    def __init__(self):
        super().__init__()
        self.count, self.where = 0, []
        self.active = False
        self.opt = None

    def _host_counter(self, t) -> bool:
        if self.opt is None or not isinstance(t, torch.Tensor) or t.dim() != 0:
            return False
        return any(s.get("step") is not None and s["step"].data_ptr() == t.data_ptr() for s in self.opt.state.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and func.__name__.split(".")[0] in SYNC_OPS and not self._host_counter(args[0]):
            self.count += 1
            self.where.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def sync_counter(monkeypatch):
    counter = SyncCounter()
    for name in ("tolist", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def patched(self, *a, _original=original, _name=name, **k):
            if counter.active:
                counter.count += 1
                counter.where.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, patched)
    with counter:
        yield counter


def test_the_counter_sees_every_kind_of_host_sync(sync_counter):
    """The counter must see the conversions the old step made (else the next test could not fail)."""
    x = torch.tensor([1.5, float("nan")])
    sync_counter.active = True
    float(x[0]), bool(torch.isfinite(x[1])), int(x[0]), x.tolist(), x[0].item(), x.nonzero()
    assert sync_counter.count == 6, sync_counter.where


@pytest.mark.parametrize("techniques", [[], ["sprint", "repa", "reg", "cfm"]])
def test_at_most_one_host_sync_per_log_window(tmp_path, monkeypatch, sync_counter, techniques):
    """The real training loop, from the first step to the final checkpoint: 12 steps logged every 4 make at most 3
    host synchronisations (the metrics all-reduce of each window); every step between logs makes none."""
    cfg = apply_diff(with_techniques(RunConfig(), techniques), TINY)
    per_step, real_call = [], TrainStep.__call__

    def counted_call(self, *a, **k):
        sync_counter.active, sync_counter.opt = True, self.opt
        before = sync_counter.count
        out = real_call(self, *a, **k)
        per_step.append(sync_counter.count - before)
        return out

    real_save = train_module.save_atomic

    def save_and_stop_counting(*a, **k):
        sync_counter.active = False
        return real_save(*a, **k)

    monkeypatch.setattr(TrainStep, "__call__", counted_call)
    monkeypatch.setattr(train_module, "save_atomic", save_and_stop_counting)
    result = train(cfg, tmp_path, progress=False)
    assert result.status == "finished" and len(per_step) == 12
    assert per_step == [0] * 12, sync_counter.where  # the step itself never waits on the device
    windows = cfg.train.steps // cfg.train.log_every
    assert sync_counter.count <= windows, sync_counter.where


def test_divergence_is_recorded_with_its_first_step_at_the_next_log_point(tmp_path):
    """log_every 5: the first non-finite step is found at the next log point and recorded as itself, with no
    metrics of the broken window reported."""
    cfg = apply_diff(
        RunConfig(), {**TINY, "train.steps": 30, "train.log_every": 5, "train.lr": 1e6, "train.grad_clip": 0.0}
    )
    rows = []

    class Rec:
        def report(self, step, metrics):
            rows.append((step, dict(metrics)))

    result = train(cfg, tmp_path, Rec(), progress=False)
    assert result.status == "diverged"
    bad = result.step + 1
    assert result.reason.endswith(f"at step {bad}") and "non-finite" in result.reason
    assert rows[-1] == (result.step, {"diverged_step": float(bad)})
    logged = [s for s, m in rows if "loss" in m]
    assert all(s < bad for s in logged) and all(math.isfinite(m["loss"]) for s, m in rows if "loss" in m)
    # the step-by-step reference: the first step whose loss or gradient norm is not finite
    ref = apply_diff(cfg, {"train.log_every": 1})
    assert train(ref, tmp_path / "ref", progress=False).step + 1 == bad


def _setup(cfg, fused=None):
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cpu")
    data = make_batches(cfg, device)
    model = build_model(cfg.model)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    return data, model, ema, make_optimizer(model, cfg, device, fused=fused)


def test_skip_nonfinite_leaves_weights_optimizer_and_ema_untouched():
    cfg = apply_diff(RunConfig(), TINY)
    data, model, ema, opt = _setup(cfg, fused=True)
    step = TrainStep(cfg, model, ema, opt, torch.device("cpu"), skip_nonfinite=True)
    model.train()
    x0, y, *teacher = data.next()
    step(x0, y, teacher, 1)
    before = copy.deepcopy((model.state_dict(), ema.state_dict(), opt.state_dict()))
    x0, y, *teacher = data.next()
    x0[0, 0, 0, 0] = float("nan")  # a non-finite input: non-finite loss and gradients
    step(x0, y, teacher, 2)
    after = (model.state_dict(), ema.state_dict(), opt.state_dict())
    for a, b in zip(before[:2], after[:2]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = before[2]["state"], after[2]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])  # moments and step count kept
    assert step.flush()[1] == (2, "loss")
    x0, y, *teacher = data.next()
    step(x0, y, teacher, 3)  # finite again: updates resume
    assert not torch.equal(before[0]["final.linear.bias"], model.state_dict()["final.linear.bias"])


def test_skip_nonfinite_needs_the_fused_optimizer():
    cfg = apply_diff(RunConfig(), TINY)
    _, model, ema, opt = _setup(cfg, fused=False)
    with pytest.raises(ValueError, match="fused"):
        TrainStep(cfg, model, ema, opt, torch.device("cpu"), skip_nonfinite=True)


@pytest.mark.parametrize("techniques", [[], ["sprint", "rope", "value_residual", "cfm"]])
def test_step_equals_the_per_parameter_adamw_and_ema_loop(techniques):
    """The foreach AdamW and the one-call EMA give bit for bit the numbers of the single-tensor AdamW and the
    per-parameter EMA loop (the trainer before them)."""
    cfg = apply_diff(with_techniques(RunConfig(), techniques), TINY)
    data, model, ema, opt = _setup(cfg)
    assert opt.param_groups[0]["foreach"] is True
    step = TrainStep(cfg, model, ema, opt, torch.device("cpu"))
    _, ref_model, ref_ema, _ = _setup(cfg)
    ref_opt = torch.optim.AdamW(
        [p for p in ref_model.parameters() if p.requires_grad],
        lr=cfg.train.lr,
        betas=cfg.train.betas,
        weight_decay=cfg.train.weight_decay,
        foreach=False,
    )
    model.train(), ref_model.train()
    shift = cfg.shift_value()
    for i in range(4):
        x0, y, *teacher = data.next()
        rng = torch.get_rng_state()
        step(x0, y, teacher, i + 1)
        torch.set_rng_state(rng)
        noise = StepNoise.draw(cfg, ref_model, x0.shape, shift, "cpu", data.dp)
        loss = training_losses(ref_model, x0, y, teacher, cfg, noise)["loss"]
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), cfg.train.grad_clip)
        ref_opt.step()
        with torch.no_grad():
            for e, p in zip(ref_ema.parameters(), ref_model.parameters()):
                if p.requires_grad:
                    e.lerp_(p, 1.0 - cfg.train.ema_decay)
    for a, b in ((model, ref_model), (ema, ref_ema)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_optimizer_state_from_another_implementation_loads_into_this_one():
    """A checkpoint's optimizer state written by the fused (CUDA) or the older default optimizer resumes here
    with this device's implementation and the same moments."""
    cfg = apply_diff(RunConfig(), TINY)
    data, model, ema, fused = _setup(cfg, fused=True)
    model.train()
    x0, y, *teacher = data.next()
    TrainStep(cfg, model, ema, fused, torch.device("cpu"))(x0, y, teacher, 1)
    state = fused.state_dict()
    mine = make_optimizer(model, cfg, torch.device("cpu"))
    load_optimizer_state(mine, state)
    assert mine.param_groups[0]["foreach"] is True and not mine.param_groups[0]["fused"]
    assert mine.param_groups[0]["lr"] == cfg.train.lr
    s = mine.state_dict()["state"]
    assert all(torch.equal(s[i]["exp_avg"], state["state"][i]["exp_avg"]) for i in s)
