"""`srdit cache-teacher --ray N`: the teacher cache's parts (`srdit.data.teacher_cache`) computed as N Ray tasks
over the cluster in RAY_ADDRESS, or a local Ray; here, in the layer that may use Ray, like `preprocess_ray`."""

from __future__ import annotations

import os

import torch

from srdit.data.teacher_cache import build_part
from srdit.runtime.ray_parts import run_parts


def cache_teacher_on_ray(
    latent_root: str | os.PathLike,
    out: str | os.PathLike,
    teacher_name: str,
    teacher_path: str | None,
    *,
    parts: int,
    batch_size: int = 256,
    gpus_per_part: float | None = None,
    cpus_per_part: float = 1.0,
) -> int:
    """Compute every missing part of the cache in `out` (its meta.json already written by the driver) as one Ray
    task per part; each task takes one GPU when the cluster has GPUs (`gpus_per_part` None). Every part is
    written by its own task into its own files, so tasks on different nodes never share a file. Returns the
    number of parts computed now."""
    import ray

    from srdit.data.teacher_cache import part_done
    from srdit.encoders import load_teacher

    latent_root, out = (os.path.abspath(os.path.expanduser(p)) for p in (latent_root, out))
    teacher_path = os.path.abspath(os.path.expanduser(teacher_path)) if teacher_path else None
    todo = [k for k in range(parts) if not part_done(out, k, parts)]

    def run_part(k: int) -> bool:
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        teacher = load_teacher(teacher_name, teacher_path, device)
        return build_part(latent_root, out, teacher, k, batch_size, device)

    return sum(run_parts(run_part, todo, gpus_per_part=gpus_per_part, cpus_per_part=cpus_per_part))
