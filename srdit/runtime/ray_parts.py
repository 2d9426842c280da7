"""One job split into parts, one Ray task per part (`srdit preprocess --ray N`, `srdit cache-teacher --ray N`): over
the cluster in RAY_ADDRESS, or a local Ray started for the call and stopped after it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def run_parts(
    run_part: Callable[[int], Any],
    parts: Iterable[int],
    *,
    gpus_per_part: float | None = None,
    cpus_per_part: float = 1.0,
) -> list:
    """`run_part(k)` for every k of `parts` as Ray tasks; returns their results in order. Each task takes one GPU
    when the cluster has GPUs (`gpus_per_part` None), else `gpus_per_part`, and `cpus_per_part` CPUs."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, logging_level="WARNING")
    try:
        gpus = (1.0 if ray.cluster_resources().get("GPU") else 0.0) if gpus_per_part is None else gpus_per_part
        task = ray.remote(run_part).options(num_gpus=gpus, num_cpus=cpus_per_part)
        return ray.get([task.remote(k) for k in parts])
    finally:
        if started:
            ray.shutdown()
