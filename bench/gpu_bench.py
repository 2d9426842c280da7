"""GPU benchmark of SR-DiT-B/1 training and evaluation (a few minutes on one GPU; prints one JSON document).

    python bench/gpu_bench.py                                   # CUDA: 4 training arms + the evaluation arm
    python bench/gpu_bench.py --device cpu --batch 2 --steps 2  # CPU smoke check (eager, fp32 arms only)

Each training arm times the trainer's own step function, `srdit.train.TrainStep` (one code path with `srdit.train`:
step noise, objective, forward, backward, gradient clipping, the fused AdamW, the one-call EMA, metrics kept on the
device), on fixed random inputs of the `SR-DiT-B/1` preset (no data loading, no teacher: random DINOv2-shaped tokens
stand in for the cached teacher). Compilation is excluded: the warm-up steps (the first compiles) are untimed, and
the timed window reports whether dynamo recompiled inside it. Steady state: `--steps` steps timed as one window
with a single synchronisation at its end. Arms are independent: each builds its own model, dynamo is reset and the
CUDA caches and peak-memory counters are cleared between arms.

Reported per training arm: images/s, mean step time, peak GPU memory (`torch.cuda.max_memory_allocated`), the
step's FLOPs counted by torch's FlopCounterMode on one eager step (forward + backward; SPRINT's token drop included)
and model FLOP utilisation against the device's dense bf16 peak (H100 / H200 SXM: 989 TFLOP/s; detected by name,
or `--peak-tflops`). The evaluation arm times `srdit.generate.generate` (the evaluation's sampler, bf16 autocast on
CUDA) at NFE 250 and reports samples/s. An arm that runs out of memory is reported with status "oom" and the rest
go on. A last entry measures peak memory at batch 32 (the reference logged ~8.9 GB per GPU at batch 32 with RMSNorm).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from srdit.config import apply_diff  # noqa: E402
from srdit.model import build_model  # noqa: E402
from srdit.techniques import preset  # noqa: E402
from srdit.train import TrainStep, make_optimizer  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
]


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown (not a CUDA device)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{name} (table: {key})"
    return None, f"{name} (not in the table: pass --peak-tflops)"


def arm_config(sprint: bool):
    cfg = preset("SR-DiT-B/1")
    if not sprint:
        cfg = dataclasses.replace(
            apply_diff(cfg, {"model.sprint.enabled": False}),
            techniques=tuple(t for t in cfg.techniques if t != "sprint"),
        ).validate()
    return cfg


class Step:
    """The trainer's step (`srdit.train.TrainStep`) on fixed random inputs of the preset's shapes."""

    def __init__(self, cfg, device: torch.device, batch: int, compile_: bool, bf16: bool = True):
        precision = "bf16" if bf16 else "fp32"
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch, precision=precision))
        self.cfg, self.device, self.batch = cfg, device, batch
        torch.manual_seed(0)
        self.model = build_model(cfg.model).to(device)
        ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        net = torch.compile(self.model) if compile_ else self.model
        self.step = TrainStep(cfg, self.model, ema, make_optimizer(self.model, cfg, device), device, net=net)
        m = cfg.model
        g = torch.Generator(device="cpu").manual_seed(1)
        self.x0 = torch.randn(batch, m.in_channels, m.input_size, m.input_size, generator=g).to(device)
        self.y = torch.randint(0, m.num_classes, (batch,), generator=g).to(device)
        tokens = (m.input_size // m.patch_size) ** 2
        c0 = torch.randn(batch, m.reg.dim, generator=g).to(device) if m.reg.enabled else None
        patches = torch.randn(batch, tokens, m.repa.teacher_dim, generator=g).to(device) if m.repa.enabled else None
        self.teacher = [patches, c0]
        self.count = 0
        self.model.train()

    def __call__(self) -> None:
        self.count += 1
        self.step(self.x0, self.y, self.teacher, self.count)

    def finish(self) -> dict[str, float]:
        """The one synchronisation of a timed window: the window's mean metrics (and divergence) from the device."""
        means, diverged = self.step.flush()
        if diverged is not None:
            raise FloatingPointError(f"non-finite {diverged[1]} at step {diverged[0]}")
        return means


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_step_flops(cfg, device: torch.device, batch: int, bf16: bool) -> float:
    """FLOPs of one eager training step (forward + backward) as FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    step = Step(cfg, device, batch, compile_=False, bf16=bf16)
    torch.manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def reset(device: torch.device) -> None:
    """Nothing of an earlier arm carries over: dynamo's caches, the allocator's cache and the peak counter."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_arm(
    name: str,
    cfg,
    device: torch.device,
    batch: int,
    steps: int,
    warmup: int,
    compile_: bool,
    peak: float | None,
    bf16: bool,
) -> dict:
    from torch._dynamo.utils import counters

    out = {
        "arm": name,
        "sprint": cfg.model.sprint.enabled,
        "compile": compile_,
        "batch": batch,
        "precision": "bf16" if bf16 else "fp32",
    }
    step = None
    try:
        reset(device)
        step = Step(cfg, device, batch, compile_, bf16)
        t0 = time.perf_counter()
        step()
        step.finish()
        out["first_step_s"] = round(time.perf_counter() - t0, 3)  # includes compilation for compiled arms
        for _ in range(max(0, warmup - 1)):
            step()
        step.finish()
        graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        for _ in range(steps):  # steady state: no synchronisation inside the window
            step()
        step.finish()
        total_s = time.perf_counter() - t0
        out["recompiled_while_timed"] = counters["stats"]["unique_graphs"] != graphs
        out.update(
            status="ok", images_per_s=round(batch * steps / total_s, 2), step_ms_mean=round(1e3 * total_s / steps, 2)
        )
        if device.type == "cuda":
            out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        del step
        step = None
        flops = count_step_flops(cfg, device, batch, bf16)
        out["tflop_per_step"] = round(flops / 1e12, 4)
        achieved = flops * steps / total_s / 1e12
        out["achieved_tflops"] = round(achieved, 3)
        out["mfu"] = round(achieved / peak, 4) if peak and bf16 else None  # the peak is the bf16 one
    except torch.OutOfMemoryError as e:
        out.update(status="oom", reason=str(e).splitlines()[0][:200])
    except Exception as e:  # report and go on with the other arms
        out.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    finally:
        del step
        reset(device)
    return out


def eval_arm(device: torch.device, n: int, nfe: int = 250, batch: int = 64) -> dict:
    """Evaluation sampling throughput: `generate` with the preset's SDE sampler at `nfe` steps (unguided, so NFE =
    steps), protocol batch `batch`, bf16 autocast on CUDA; samples/s over n samples after one untimed batch."""
    from srdit.generate import generate

    cfg = preset("SR-DiT-B/1")
    sc = dataclasses.replace(cfg.sample, steps=nfe, cfg_scale=1.0, cls_cfg_scale=1.0, path_drop_guidance=False)
    out = {
        "arm": "evaluation sampling",
        "nfe": nfe,
        "batch": batch,
        "n": n,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
    }
    try:
        reset(device)
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device).eval()
        generate(model, cfg, min(n, batch), 0, device, batch, sample_cfg=sc)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        _, _, got = generate(model, cfg, n, 1, device, batch, sample_cfg=sc)
        sync(device)
        dt = time.perf_counter() - t0
        out.update(
            status="ok",
            nfe=got,
            samples_per_s=round(n / dt, 2),
            minutes_for_50k_on_8=round(50_000 / (8 * n / dt) / 60, 2),
        )
        if device.type == "cuda":
            out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    except torch.OutOfMemoryError as e:
        out.update(status="oom", reason=str(e).splitlines()[0][:200])
    except Exception as e:
        out.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    finally:
        reset(device)
    return out


def reference_memory(device: torch.device, batch: int = 32, steps: int = 3) -> dict:
    """Peak memory of the full SR-DiT-B/1 step (SPRINT on, eager) at the reference's per-GPU batch."""
    if device.type != "cuda":
        return {"status": "skipped", "reason": "CUDA only"}
    reset(device)
    try:
        step = Step(arm_config(True), device, batch, compile_=False)
        for _ in range(steps):
            step()
        step.finish()
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        del step
        return {"status": "ok", "batch": batch, "peak_mem_gb": round(peak, 3), "reference_gb": 8.9}
    except torch.OutOfMemoryError as e:
        return {"status": "oom", "reason": str(e).splitlines()[0][:200]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256, help="global batch of the timed arms (SR-DiT: 256)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per arm (the first compiles)")
    p.add_argument(
        "--compile",
        choices=("auto", "both", "on", "off"),
        default="auto",
        help="torch.compile arms: auto = both on CUDA, off on CPU",
    )
    p.add_argument("--sprint", choices=("both", "on", "off"), default="both")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: bf16 autocast on CUDA, fp32 on CPU (as srdit.train; CPU bf16 is very slow)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (TFLOP/s)")
    p.add_argument(
        "--eval-n",
        type=int,
        default=None,
        help="samples of the evaluation arm (default 512 on CUDA, 2 on CPU; 0 = skip)",
    )
    p.add_argument("--eval-nfe", type=int, default=None, help="NFE of the evaluation arm (default 250; 2 on CPU)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(json.dumps({"error": "CUDA is not available; run with --device cpu --batch 2 --steps 2"}))
            return 2
        torch.backends.cuda.matmul.allow_tf32 = True  # as srdit.train does on CUDA
        torch.backends.cudnn.allow_tf32 = True
    compile_mode = args.compile if args.compile != "auto" else ("both" if device.type == "cuda" else "off")
    compiles = {"both": [False, True], "on": [True], "off": [False]}[compile_mode]
    sprints = {"both": [True, False], "on": [True], "off": [False]}[args.sprint]
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    cfg = arm_config(True)
    model = build_model(cfg.model)
    result = {
        "benchmark": "SR-DiT-B/1: the trainer's step (srdit.train.TrainStep) on random data; evaluation sampling",
        "precision": "bf16 autocast" if bf16 else "fp32",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_bf16_tflops": peak,
        "peak_source": peak_source,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "tokens": (cfg.model.input_size // cfg.model.patch_size) ** 2 + (1 if cfg.model.reg.enabled else 0),
        "arms": [],
    }
    del model
    for sprint in sprints:
        for compile_ in compiles:
            name = f"{'sprint' if sprint else 'dense'}{'+compile' if compile_ else ''}"
            arm = run_arm(name, arm_config(sprint), device, args.batch, args.steps, args.warmup, compile_, peak, bf16)
            result["arms"].append(arm)
            print(f"# {name}: {arm.get('status')} {arm.get('images_per_s', '')} img/s", file=sys.stderr, flush=True)
    eval_n = args.eval_n if args.eval_n is not None else (512 if device.type == "cuda" else 2)
    if eval_n:
        nfe = args.eval_nfe or (250 if device.type == "cuda" else 2)
        result["evaluation"] = eval_arm(device, eval_n, nfe, batch=min(64, eval_n))
        print(
            f"# evaluation: {result['evaluation'].get('status')} {result['evaluation'].get('samples_per_s', '')} "
            f"samples/s",
            file=sys.stderr,
            flush=True,
        )
    result["reference_memory"] = reference_memory(device)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(a["status"] in ("ok", "oom") for a in result["arms"]) else 1


if __name__ == "__main__":
    sys.exit(main())
