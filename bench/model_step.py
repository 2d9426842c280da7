"""Training step time (forward + backward) of the SR-DiT-B/1 shape (SiT-B/1 on a 32x16x16 latent) with some
techniques on.

`--arms a;b;c` times several arms in one process, interleaved step by step, so that a noisy machine slows every
arm alike; `--memory ARM` runs one arm alone in a fresh process and reports its peak RSS. With --matmul it also
measures a dense fp32 matmul of the block's MLP shape in the same process. Prints one JSON line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import time

import torch

from srdit.config import ModelConfig, RunConfig
from srdit.techniques import preset, with_techniques
from srdit.model import build_model, count_macs


def arm_config(techniques: list[str]) -> RunConfig:
    """SiT-B/1 on 32x16x16 with only `techniques` on (the REPA / REG widths are the paper's, switched off)."""
    srdit = preset("SR-DiT-B/1")
    model = ModelConfig(size="B", patch_size=1, in_channels=32, input_size=16, num_classes=1000,
                        repa=dataclasses.replace(srdit.model.repa, enabled=False),
                        reg=dataclasses.replace(srdit.model.reg, enabled=False))
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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory is not None:
        cfg = arm_config([t for t in args.memory.split(",") if t])
        step = make_step(build_model(cfg.model), cfg, args.batch)
        for _ in range(2):
            step()
        print(json.dumps({"arm": args.memory, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
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
    for arm, cfg, model, ts in zip(arms, cfgs, models, times):
        out["arms"][arm] = {"step_s": statistics.median(ts), "step_s_all": ts,
                            "fwd_gmacs_per_image": count_macs(model) / 1e9}
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
