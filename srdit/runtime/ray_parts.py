"""One job split into parts, one Ray task per part (`srdit preprocess --ray N`, `srdit cache-teacher --ray N`): over
the cluster in RAY_ADDRESS, or a local Ray started for the call and stopped after it; and the stop of a Ray this
process started (`shutdown_ray`), which every local Ray of srdit goes through."""

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
            shutdown_ray()


def shutdown_ray() -> None:
    """`ray.shutdown()`, with the autoscaler monitor of a Ray this process started stopped first.

    Ray's shutdown stops the GCS before that monitor, and the monitor's SIGTERM handler then tries to report to the
    stopped GCS until Ray kills it a second later (`ray._private.node.Node.kill_all_processes`: one second of grace
    per process, one process after another). A Ray started by `ray.init` autoscales nothing, so its monitor is
    killed at once: a shutdown took 1.35 s before, 0.36 s after. Connected to a Ray started elsewhere (a cluster,
    `ray start`), this is `ray.shutdown()`: it only disconnects."""
    import ray
    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)  # Ray's handle on the processes that ray.init started
    if node is not None and node.head and hasattr(node, "kill_monitor"):
        node.kill_monitor(check_alive=False)
    ray.shutdown()
