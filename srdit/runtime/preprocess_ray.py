"""`srdit preprocess --ray N`: the single-process preprocessing of `srdit.data.preprocess` fanned out as N Ray tasks
(parts k/N of the shards) over the cluster in RAY_ADDRESS, or a local Ray. Here, in the layer that may use Ray, so
that the data layer stays free of it."""

from __future__ import annotations

import os

import torch

from srdit.data.preprocess import finalize, prepare, preprocess
from srdit.encoders import load_tokenizer
from srdit.runtime.ray_parts import run_parts


def preprocess_on_ray(
    source: str | os.PathLike,
    out: str | os.PathLike,
    tokenizer_name: str,
    weights: str,
    *,
    parts: int,
    gpus_per_part: float | None = None,
    cpus_per_part: float = 1.0,
    **kw,
) -> dict | None:
    """`preprocess` split into `parts` Ray tasks (parts k/N; RAY_ADDRESS, or a local Ray), then index.json. Each
    task takes one GPU when the cluster has GPUs (`gpus_per_part` None), else `cpus_per_part` CPUs. The driver
    writes the settings first (parts started together would race to create them), loading the tokenizer on CPU
    only for that. The shards are identical to a single-process run's."""
    import ray

    # The tasks may run on other nodes and in other working directories (the storage must be shared).
    source, out, weights = (os.path.abspath(os.path.expanduser(p)) for p in (source, out, weights))
    folder, settings = prepare(
        source,
        out,
        load_tokenizer(tokenizer_name, weights, "cpu"),
        **{
            k: v
            for k, v in kw.items()
            if k in ("resolution", "shard_size", "batch_size", "seed", "keep_images", "dtype", "limit")
        },
    )

    def run_part(k: int) -> None:
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        preprocess(source, out, load_tokenizer(tokenizer_name, weights, device), part=(k, parts), progress=False, **kw)

    run_parts(run_part, range(parts), gpus_per_part=gpus_per_part, cpus_per_part=cpus_per_part)
    return finalize(out, folder, settings)
