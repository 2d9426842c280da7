"""Accelerator-time estimate of a plan from the model's MACs and a stated throughput assumption.

FLOPs of a trial = training (forward + backward = 3x the forward MACs, 2 FLOPs per MAC, per image per step; SPRINT
runs its sparse blocks on the kept tokens only) + sampling at every evaluation (2 FLOPs per MAC per image per
NFE, twice with classifier-free guidance). GPU-hours = FLOPs / (MFU x peak)."""

from __future__ import annotations

import functools
import json

ASSUMED_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
ASSUMED_MFU = 0.35  # achieved model FLOP utilisation of a well-tuned DiT training step


@functools.lru_cache(maxsize=16)
def _plain_macs(model_json: str) -> float:
    from srdit.config import ModelConfig, from_dict
    from srdit.model import build_model, count_macs

    m = from_dict(ModelConfig, json.loads(model_json))
    return count_macs(build_model(m))


def trial_flops(config: dict, train: bool = True, evaluate: bool = True, final_only: bool = False) -> float:
    """FLOPs of a trial's training (`train`) and of its evaluations (`evaluate`: every evaluation step, or the final
    one only: an evaluation of a fixed checkpoint)."""
    m, tr, ev, sa = config["model"], config["train"], config["eval"], config["sample"]
    base = {k: m[k] for k in ("size", "patch_size", "in_channels", "input_size", "num_classes")}
    macs = _plain_macs(json.dumps(base, sort_keys=True))
    frac = 1.0
    if m["sprint"]["enabled"]:
        from srdit.model.sizes import SIZES

        depth = SIZES[m["size"]][0]
        s = m["sprint"]
        dense = s["dense_in"] + s["dense_out"]
        frac = (dense + (depth - dense) * (1 - s["drop_ratio"])) / depth
    training = 6 * macs * frac * tr["batch_size"] * tr["steps"]
    n_evals = 1 if final_only else (tr["steps"] - 1) // tr["eval_every"] + 1 if tr["eval_every"] else 1
    guided = 2 if (sa["cfg_scale"] != 1.0 or sa["path_drop_guidance"]) else 1
    nfe = sa["steps"] * (2 if sa["sampler"] == "heun" else 1) * guided
    sample = 2 * macs * n_evals * ev["n_samples"] * nfe
    return training * train + sample * evaluate


def gpu_hours(
    configs: list[dict],
    peak_tflops: float = ASSUMED_PEAK_TFLOPS,
    mfu: float = ASSUMED_MFU,
    train: bool = True,
    evaluate: bool = True,
    final_only: bool = False,
) -> dict:
    """PFLOPs and GPU-hours of `configs` (training and / or evaluation: see `trial_flops`)."""
    flops = sum(trial_flops(c, train, evaluate, final_only) for c in configs)
    return {
        "pflops": round(flops / 1e15, 2),
        "gpu_hours": round(flops / (mfu * peak_tflops * 1e12) / 3600, 1),
        "assumption": f"{mfu:.0%} MFU of {peak_tflops:g} TFLOP/s (H100 dense bf16); excludes the online teacher "
        f"forward (DINOv2-B adds ~12 TFLOP per batch-256 step unless its features are cached)",
    }
