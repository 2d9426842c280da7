"""Training step time (forward + backward) of the SR-DiT-B/1 shape (SiT-B/1 on a 32x16x16 latent) with some
techniques on.

`--arms a;b;c` times several arms in one process, interleaved step by step, so that a noisy machine slows every
arm alike; `--memory ARM` runs one arm alone in a fresh process and reports its peak RSS. With --matmul it also
measures a dense fp32 matmul of the block's MLP shape in the same process. `--trainer ARM` times, interleaved on
one configuration, the bare model step (forward + backward), the trainer's own step (`srdit.train.TrainStep`: noise,
objective, backward, clip, AdamW, EMA, metrics kept on the device) and the step as the trainer ran it before
(`legacy_step`: per-parameter AdamW and EMA loops, the metrics read back with `float` every step), so the CPU
side of the step is a number. Prints one JSON line."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import resource
import statistics
import time

import torch

from srdit.config import ModelConfig, RunConfig
from srdit.model import build_model, count_macs
from srdit.parallel import DataParallel
from srdit.techniques import preset, with_techniques
from srdit.train import TrainStep, make_optimizer
from srdit.transport.objective import StepNoise, training_losses


def arm_config(techniques: list[str]) -> RunConfig:
    """SiT-B/1 on 32x16x16 with only `techniques` on (the REPA / REG widths are the paper's, switched off)."""
    srdit = preset("SR-DiT-B/1")
    model = ModelConfig(
        size="B",
        patch_size=1,
        in_channels=32,
        input_size=16,
        num_classes=1000,
        repa=dataclasses.replace(srdit.model.repa, enabled=False),
        reg=dataclasses.replace(srdit.model.reg, enabled=False),
    )
    plain = RunConfig(model=model, data=srdit.data)
    return with_techniques(plain, techniques) if techniques else plain.validate()


def make_step(model, cfg, batch: int):
    m = cfg.model
    x = torch.randn(batch, m.in_channels, m.input_size, m.input_size)
    t, y = torch.rand(batch), torch.randint(0, m.num_classes, (batch,))
    cls = torch.randn(batch, m.reg.dim) if m.reg.enabled else None
    model.train()

    def step() -> float:
        start = time.perf_counter()
        pred, aux = model(x, t, y, cls)
        loss = pred.square().mean() + sum(v.square().mean() for v in aux.values())
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def batch_for(cfg, batch: int):
    """Fixed random inputs of the trainer: latents, labels and teacher tokens (REPA patches, REG class token)."""
    m = cfg.model
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, m.in_channels, m.input_size, m.input_size, generator=g)
    y = torch.randint(0, m.num_classes, (batch,), generator=g)
    tokens = (m.input_size // m.patch_size) ** 2
    patches = torch.randn(batch, tokens, m.repa.teacher_dim, generator=g) if m.repa.enabled else None
    cls0 = torch.randn(batch, m.reg.dim, generator=g) if m.reg.enabled else None
    return x0, y, [patches, cls0]


def trainer_step(cfg, batch: int):
    """The trainer's step function on fixed inputs (`srdit.train.TrainStep`), as `srdit.train` builds it."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
    device = torch.device("cpu")
    model = build_model(cfg.model)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    step_fn = TrainStep(cfg, model, ema, make_optimizer(model, cfg, device), device)
    x0, y, teacher = batch_for(cfg, batch)
    model.train()
    count = [0]

    def step() -> float:
        start = time.perf_counter()
        count[0] += 1
        step_fn(x0, y, teacher, count[0])
        return time.perf_counter() - start

    return step


def legacy_step(cfg, batch: int):
    """The step as `srdit.train` ran it before the device-side step (kept here as the benchmark's baseline):
    torch's default AdamW (per-parameter loop on CPU), a per-parameter EMA loop, the finiteness of the loss and
    the gradient norm and every metric read back on the host each step."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
    tc, dp, device = cfg.train, DataParallel(), torch.device("cpu")
    model = build_model(cfg.model)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay
    )
    x0, y, teacher = batch_for(cfg, batch)
    shift = cfg.shift_value()
    sums: dict[str, float] = {}
    model.train()

    def step() -> float:
        start = time.perf_counter()
        noise = StepNoise.draw(cfg, model, x0.shape, shift, device, dp)
        losses = training_losses(model, x0, y, teacher, cfg, noise)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError("non-finite gradient norm")
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                if p.requires_grad:
                    e.lerp_(p.detach(), 1.0 - tc.ema_decay)
        for k, v in [("loss", loss), ("grad_norm", grad_norm)] + [(k, v) for k, v in losses.items() if k != "loss"]:
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        return time.perf_counter() - start

    return step


def trainer_summary(arm: str, batch: int, threads: int, times: dict[str, list[float]]) -> dict:
    """Medians of each kind and the paired ratio to the bare model step: one ratio per round (the steps of one round
    ran back to back, so a load that changes slowly cancels), summarised by its median, quartiles and range."""
    bare = times["bare model step"]
    ratios = {k: [a / b for a, b in zip(v, bare)] for k, v in times.items()}

    def spread(values: list[float]) -> dict:
        q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
        return {"median": q2, "q1": q1, "q3": q3, "min": min(values), "max": max(values), "rounds": len(values)}

    return {
        "arm": arm,
        "batch": batch,
        "threads": threads,
        "step_s": {k: statistics.median(v) for k, v in times.items()},
        "step_s_all": times,
        "overhead_vs_bare": {k: statistics.median(v) for k, v in ratios.items()},
        "ratio_vs_bare": {k: spread(v) for k, v in ratios.items() if k != "bare model step"},
    }


def matmul_flops(tokens: int, dim: int, hidden: int, repeats: int = 20) -> float:
    """Best of `repeats` (the least disturbed by other load) of the block's MLP matmul shape."""
    a, b = torch.randn(tokens, dim), torch.randn(dim, hidden)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * tokens * dim * hidden / min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arms", default="", help="';'-separated arms, each a comma-separated technique list")
    p.add_argument("--memory", default=None, help="one arm: report only its peak RSS")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--matmul", action="store_true")
    p.add_argument(
        "--trainer",
        default=None,
        help="one arm: bare model step vs the trainer's step, before and after "
        "(--steps rounds, each runs every kind once)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.trainer is not None:
        cfg = arm_config([t for t in args.trainer.split(",") if t])
        model = build_model(cfg.model)
        kinds = {
            "bare model step": make_step(model, cfg, args.batch),
            "trainer step (before)": legacy_step(cfg, args.batch),
            "trainer step": trainer_step(cfg, args.batch),
        }
        for step in kinds.values():  # warm-up (allocations, optimizer state)
            step()
            step()
        times: dict[str, list[float]] = {k: [] for k in kinds}
        names = list(kinds)
        for r in range(args.steps):  # the order rotates each round, so no arm always runs after the same one
            for kind in names[r % len(names) :] + names[: r % len(names)]:
                times[kind].append(kinds[kind]())
        print(json.dumps(trainer_summary(args.trainer, args.batch, args.threads, times)))
        return
    if args.memory is not None:
        cfg = arm_config([t for t in args.memory.split(",") if t])
        step = make_step(build_model(cfg.model), cfg, args.batch)
        for _ in range(2):
            step()
        print(
            json.dumps({"arm": args.memory, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        )
        return
    arms = args.arms.split(";")
    cfgs = [arm_config([t for t in a.split(",") if t]) for a in arms]
    models = [build_model(c.model) for c in cfgs]
    steps = [make_step(m, c, args.batch) for m, c in zip(models, cfgs)]
    for step in steps:  # warm-up
        step()
        step()
    times: list[list[float]] = [[] for _ in arms]
    for _ in range(args.steps):
        for i, step in enumerate(steps):
            times[i].append(step())
    out = {"batch": args.batch, "threads": args.threads, "arms": {}}
    for arm, model, ts in zip(arms, models, times):
        out["arms"][arm] = {
            "step_s": statistics.median(ts),
            "step_s_all": ts,
            "fwd_gmacs_per_image": count_macs(model) / 1e9,
        }
    if args.matmul:  # against the first arm (the plain backbone)
        first = out["arms"][arms[0]]
        tokens = args.batch * (cfgs[0].model.input_size // cfgs[0].model.patch_size) ** 2
        out["matmul_flops"] = matmul_flops(tokens, models[0].dim, 4 * models[0].dim)
        # forward + backward = 3x the forward MACs, 2 FLOPs per MAC
        out["achieved_flops"] = 6 * first["fwd_gmacs_per_image"] * 1e9 * args.batch / first["step_s"]
        out["flops_fraction_of_matmul"] = out["achieved_flops"] / out["matmul_flops"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
