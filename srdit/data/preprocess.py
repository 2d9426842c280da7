"""`srdit preprocess`: an ImageNet-style image folder -> ADM center crops -> tokenizer latents -> latent shards.

    srdit preprocess IMAGE_DIR OUT --tokenizer invae --weights e2e-invae-400k.pt [--resolution 256] [--keep-images]
    srdit preprocess IMAGE_DIR OUT --tokenizer sdvae --weights sd-vae-ft-ema/ [--resolution 256]
    srdit preprocess --verify OUT [--quick]

As SR-DiT does (arXiv:2512.12386 section 1.2), each image is encoded **once**, and one posterior *sample* (not the
mean) is stored: latent = mean + std * eps. The noise eps of image i is drawn from a CPU generator seeded by (seed,
i) only, so the shards are a pure function of (images, tokenizer weights, settings): rerunning gives identical
files regardless of interruption or which process wrote which shard. The batch size is a setting too (convolution
kernels round differently for other batch shapes), and bit-identity holds on one software stack, device type
and (on CPU) thread count.
The stored tensors are the model latents, `scale * sample + bias` (INVAE: 0.3099, 0; SD-VAE: 0.18215, 0),
recorded in index.json.

`--keep-images` also stores the uint8 crops in parallel shards: the REPA / REG teacher (DINOv2) needs the pixels
(256 px ImageNet: ~196 KB per image, ~250 GB; or precompute the teacher features once with
`srdit.encoders.dinov2.precompute_features`).

Resume: rerun the same command. Complete shards whose checksums verify are skipped; a shard that was being
written when the run stopped is recomputed (files are renamed into place only when complete). Changing a setting
against an existing folder is an error (use another OUT).

Several devices: run one process per device on disjoint shards, e.g.
    for k in 0 1 2 3 4 5 6 7; do srdit preprocess IMAGE_DIR OUT ... --part $k/8 --device cuda:$k & done; wait
and then the same command once without --part: every shard is already complete, so it only verifies them and
writes index.json (a part that finds every shard complete writes it too). Or let Ray place the parts:
    srdit preprocess IMAGE_DIR OUT ... --ray 32      # 32 tasks, one GPU each, over the cluster in RAY_ADDRESS

This module is the single-process part (it takes a loaded `Tokenizer`); the command line is
`srdit.commands.preprocess` and the Ray fan-out `srdit.runtime.preprocess_ray`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from srdit.data import latents as store
from srdit.data.imagenet import ImageFolder, load_crop, scan_image_folder, to_unit_range

DTYPES = ("float32", "float16")


def image_seed(seed: int, index: int) -> int:
    """Seed of image `index`'s posterior noise: a 63-bit mix of (seed, index) only."""
    return (int(seed) * 0x9E3779B97F4A7C15 + (int(index) + 1) * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)


def posterior_noise(indices, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise [len(indices), *shape], row i drawn from image_seed(seed, indices[i]) (CPU)."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, int(i)))) for i in indices]
    )


def _weights_fingerprint(source: str | None) -> str | None:
    """sha256 over the tokenizer's weight files (a file, or a diffusers folder's config + weights)."""
    import hashlib

    if not source or not Path(source).exists():
        return None
    p = Path(source)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + store.sha256_file(f).encode())
    return h.hexdigest()


def _progress(enabled: bool | None, total: int, done: int):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
    bar.start()
    bar.add_task("preprocess", total=total, completed=done)
    return bar


def preprocess(
    source: str | os.PathLike,
    out: str | os.PathLike,
    tokenizer,
    *,
    resolution: int = 256,
    shard_size: int = 1000,
    batch_size: int = 32,
    seed: int = 0,
    keep_images: bool = False,
    dtype: str = "float32",
    workers: int = 4,
    part: tuple[int, int] = (0, 1),
    limit: int | None = None,
    progress: bool | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> dict | None:
    """Write (or finish) the latent folder `out` for the images of `source` with `tokenizer` (a `Tokenizer`).

    `part=(k, n)` handles only shards k, k+n, k+2n, ...; `limit` keeps the first N images (smoke runs);
    `on_shard(i)` is called after shard i is complete (tests use it to interrupt). Returns the index when every
    shard is complete (index.json written), else None."""
    if not 0 <= part[0] < part[1]:
        raise ValueError(f"part {part[0]}/{part[1]}: need 0 <= K < N")
    folder, settings = prepare(
        source,
        out,
        tokenizer,
        resolution=resolution,
        shard_size=shard_size,
        batch_size=batch_size,
        seed=seed,
        keep_images=keep_images,
        dtype=dtype,
        limit=limit,
    )
    _shards(Path(out), folder, settings, tokenizer, part=part, workers=workers, progress=progress, on_shard=on_shard)
    return finalize(out, folder, settings)


def prepare(
    source: str | os.PathLike,
    out: str | os.PathLike,
    tokenizer,
    *,
    resolution: int = 256,
    shard_size: int = 1000,
    batch_size: int = 32,
    seed: int = 0,
    keep_images: bool = False,
    dtype: str = "float32",
    limit: int | None = None,
) -> tuple[ImageFolder, dict]:
    """Check the arguments, scan the images, and write (or check against) the folder's settings and file list."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: allowed {', '.join(DTYPES)}")
    if resolution % tokenizer.downsample:
        raise ValueError(
            f"resolution {resolution} is not a multiple of the tokenizer's down-sampling {tokenizer.downsample}"
        )
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    folder = scan_image_folder(source)
    if limit is not None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        folder = ImageFolder(folder.root, folder.classes, folder.files[:limit], folder.labels[:limit])
    out = Path(out)
    kinds = ("latents", "labels") + (("images",) if keep_images else ())
    settings = {
        "format": store.FORMAT,
        "version": store.VERSION,
        "source": str(Path(source).resolve()),
        "source_fingerprint": folder.fingerprint(),
        "num_images": len(folder),
        "resolution": resolution,
        "shard_size": shard_size,
        "batch_size": batch_size,
        "seed": seed,
        "kinds": list(kinds),
        "latent_dtype": dtype,
        "tokenizer": tokenizer.describe(),
        "tokenizer_weights_sha256": _weights_fingerprint(getattr(tokenizer, "source", None)),
        "crop": "adm-center",
    }
    settings = json.loads(json.dumps(settings))  # tuples -> lists: compare like the file read back
    _check_settings(out, settings)
    files_text = "".join(f + "\n" for f in folder.files)
    if not (out / store.FILES).is_file() or (out / store.FILES).read_text() != files_text:
        store.write_text_atomic(out / store.FILES, files_text)
    return folder, settings


def _shards(
    out: Path,
    folder: ImageFolder,
    settings: dict,
    tokenizer,
    *,
    part: tuple[int, int],
    workers: int,
    progress: bool | None,
    on_shard: Callable[[int], None] | None,
) -> None:
    """Encode and write this part's incomplete shards."""
    n, shard_size, batch_size, seed = len(folder), settings["shard_size"], settings["batch_size"], settings["seed"]
    resolution, dtype, kinds = settings["resolution"], settings["latent_dtype"], tuple(settings["kinds"])
    keep_images = "images" in kinds
    n_shards = -(-n // shard_size)
    side = resolution // tokenizer.downsample
    latent_shape = (tokenizer.channels, side, side)
    k_part, n_parts = part
    if n_parts == 1:  # no other writer: temporary files left by a killed run are garbage
        for tmp in (out / store.SHARDS).glob(".*.tmp") if (out / store.SHARDS).is_dir() else []:
            tmp.unlink(missing_ok=True)
    mine = [k for k in range(n_shards) if k % n_parts == k_part]
    todo = [
        k
        for k in mine
        if store.check_shard(out, k, k * shard_size, min(shard_size, n - k * shard_size), kinds) is not None
    ]
    bar = _progress(
        progress,
        sum(min(shard_size, n - k * shard_size) for k in mine),
        sum(min(shard_size, n - k * shard_size) for k in mine if k not in todo),
    )
    # Bit-reproducible convolutions where the backend offers them (GPU runs would otherwise vary per run).
    prev = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    pool = ThreadPoolExecutor(max_workers=max(1, workers))  # PIL decodes and resizes outside the GIL

    def decode(k: int) -> list:
        first = k * shard_size
        return [pool.submit(load_crop, folder.path(i), resolution) for i in range(first, min(first + shard_size, n))]

    pending = decode(todo[0]) if todo else []
    try:
        for j, k in enumerate(todo):
            start = k * shard_size
            count = min(shard_size, n - start)
            futures, pending = pending, (decode(todo[j + 1]) if j + 1 < len(todo) else [])  # overlap with encoding
            crops = np.stack([f.result() for f in futures])
            lat = np.empty((count,) + latent_shape, dtype=dtype)
            for b in range(0, count, batch_size):
                idx = range(start + b, start + min(b + batch_size, count))
                z = tokenizer.encode(
                    to_unit_range(crops[b : b + len(idx)]), sample=True, noise=posterior_noise(idx, latent_shape, seed)
                )
                if tuple(z.shape[1:]) != latent_shape:
                    raise ValueError(f"tokenizer returned latents {tuple(z.shape[1:])}, expected {latent_shape}")
                lat[b : b + len(idx)] = z.float().cpu().numpy().astype(dtype)
                if bar is not None:
                    bar.advance(bar.task_ids[0], len(idx))
            entries = {
                "latents": store.save_npy_atomic(store.shard_file(out, "latents", k), lat),
                "labels": store.save_npy_atomic(
                    store.shard_file(out, "labels", k), folder.labels[start : start + count]
                ),
            }
            if keep_images:
                entries["images"] = store.save_npy_atomic(store.shard_file(out, "images", k), crops)
            store.write_json_atomic(store.manifest_file(out, k), {"start": start, "count": count, "files": entries})
            if on_shard is not None:
                on_shard(k)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev
        if bar is not None:
            bar.stop()


def _check_settings(out: Path, settings: dict) -> None:
    path = out / store.SETTINGS
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old != settings:
            diff = sorted(k for k in set(settings) | set(old or {}) if (old or {}).get(k) != settings.get(k))
            raise ValueError(
                f"{out} was written with other settings (differs in: {', '.join(diff)}); use another "
                f"output folder, or remove it to start over"
            )
        return
    if out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise ValueError(f"{out} exists and is not a latent folder being written; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    store.write_json_atomic(path, settings)


def finalize(out: str | os.PathLike, folder: ImageFolder, settings: dict) -> dict | None:
    """Write index.json once every shard has a manifest (verified by size; each was checksummed when written or
    skipped). Returns the index, or None while shards are missing."""
    out = Path(out)
    n, size = settings["num_images"], settings["shard_size"]
    manifests = []
    for k in range(-(-n // size)):
        if (
            store.check_shard(out, k, k * size, min(size, n - k * size), tuple(settings["kinds"]), checksums=False)
            is not None
        ):
            return None
        manifests.append(store.read_manifest(out, k))
    latents = manifests[0]["files"]["latents"]
    images = manifests[0]["files"].get("images")
    index = {
        "format": store.FORMAT,
        "version": store.VERSION,
        "num_images": n,
        "shard_size": size,
        "classes": list(folder.classes),
        "class_counts": folder.class_counts(),
        "latent_shape": latents["shape"][1:],
        "latent_dtype": latents["dtype"],
        "image_shape": images["shape"][1:] if images else None,
        "kinds": settings["kinds"],
        "resolution": settings["resolution"],
        "seed": settings["seed"],
        "crop": settings["crop"],
        "tokenizer": {k: settings["tokenizer"][k] for k in ("name", "channels", "downsample", "scale", "bias")},
        "tokenizer_weights_sha256": settings["tokenizer_weights_sha256"],
        "source": settings["source"],
        "source_fingerprint": settings["source_fingerprint"],
        "files_sha256": store.sha256_file(out / store.FILES),
        "shards": manifests,
    }
    store.write_json_atomic(out / store.INDEX, index)
    return index
