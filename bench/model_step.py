"""One benchmark arm in a fresh process (so that its peak RSS is its own): training step time (forward +
backward) of the SR-DiT-B/1 shape (SiT-B/1 on a 32x16x16 latent) with some techniques on.

Prints one JSON line: median step seconds, peak RSS, forward MACs, and (with --matmul) the FLOP/s of a dense
fp32 matmul of the block's MLP shape measured in the same process."""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from srdit.config import RunConfig, preset, with_techniques
from srdit.model import build_model, count_macs


def arm_config(techniques: list[str]) -> RunConfig:
    srdit = preset("SR-DiT-B/1")
    plain = RunConfig(model=srdit.model.__class__(size="B", patch_size=1, in_channels=32, input_size=16,
                                                   num_classes=1000, repa=srdit.model.repa, reg=srdit.model.reg),
                      data=srdit.data)
    return with_techniques(plain, techniques) if techniques else plain.validate()


def step_times(model, cfg, batch: int, steps: int, warmup: int = 2) -> list[float]:
    m = cfg.model
    x = torch.randn(batch, m.in_channels, m.input_size, m.input_size)
    t, y = torch.rand(batch), torch.randint(0, m.num_classes, (batch,))
    cls = torch.randn(batch, m.reg.dim) if m.reg.enabled else None
    model.train()
    out = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        pred, aux = model(x, t, y, cls)
        loss = pred.square().mean() + sum(v.square().mean() for v in aux.values())
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            out.append(time.perf_counter() - start)
    return out


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
    p.add_argument("--techniques", default="")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--matmul", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = arm_config([t for t in args.techniques.split(",") if t])
    model = build_model(cfg.model)
    macs = count_macs(model)
    times = step_times(model, cfg, args.batch, args.steps)
    # min over steps: the step least disturbed by other load on a shared machine; all steps are kept too.
    result = {"techniques": args.techniques, "batch": args.batch, "step_s": min(times),
              "step_s_all": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "fwd_gmacs_per_image": macs / 1e9, "threads": args.threads}
    if args.matmul:
        tokens = args.batch * (cfg.model.input_size // cfg.model.patch_size) ** 2
        result["matmul_flops"] = matmul_flops(tokens, model.dim, 4 * model.dim)
        # forward + backward = 3x the forward MACs, 2 FLOPs per MAC
        result["achieved_flops"] = 6 * macs * args.batch / result["step_s"]
        result["flops_fraction_of_matmul"] = result["achieved_flops"] / result["matmul_flops"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
