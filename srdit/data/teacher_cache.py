"""The teacher cache: the alignment teacher's tokens of every image of a latent folder, computed once by
`srdit cache-teacher` (a pass of its own, split into parts) and read by training, read-only.

Running the teacher every step bottlenecked the paper's run (SR-DiT section 4.1: +30-55 % compute per step), and
filling a shared cache during training costs a teacher forward per new row and lets several nodes overwrite each
other's rows of one memory-mapped file over NFS. Here every part is written by exactly one process into files of
its own, and training only reads.

Layout of a cache folder:
    meta.json                      teacher (name, weights sha256), latent folder fingerprint, num_images, grid, dim,
                                   parts: what decides the content (written first, by the driver)
    part-00003-of-00008/           rows start .. stop - 1 of part 3 (contiguous: part k holds
        patches.npy                    [k N / P, (k + 1) N / P)): float16 [rows, grid^2, dim]
        cls.npy                        float16 [rows, dim]
        done.json                      written last: start, stop, sha256 of both files
float16 changes the tokens by < 1e-3 relative, below the bf16 the teacher runs in on a GPU. Size: N (grid^2 + 1)
dim 2 bytes (ImageNet, ViT-B/14 at grid 16: ~500 GB). A part without done.json is redone from scratch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

FORMAT = "srdit-teacher-cache"
VERSION = 1
META = "meta.json"


def part_range(num_images: int, parts: int, k: int) -> tuple[int, int]:
    """Rows [start, stop) of part k of `parts` (contiguous, sizes differ by at most one)."""
    if parts < 1 or not 0 <= k < parts:
        raise ValueError(f"part {k} of {parts}: need 0 <= k < parts")
    return k * num_images // parts, (k + 1) * num_images // parts


def part_dir(folder: str | os.PathLike, k: int, parts: int) -> Path:
    return Path(folder) / f"part-{k:05d}-of-{parts:05d}"


def create(folder: str | os.PathLike, meta: dict) -> dict:
    """Write meta.json (num_images, grid, dim, parts, and the teacher / latent identity) unless the same one is
    there; ValueError naming the differing keys when the folder was made for other settings."""
    from srdit.data.latents import write_json_atomic

    folder = Path(folder)
    meta = json.loads(json.dumps({"format": FORMAT, "version": VERSION, **meta}))
    path = folder / META
    if path.is_file():
        old = json.loads(path.read_text())
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ValueError(
                f"{folder}: a teacher cache for other settings (differs in: {', '.join(diff)}); use another --out"
            )
        return meta
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, meta)
    return meta


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder}: no teacher cache ({META} missing); build it with `srdit cache-teacher "
            f"LATENTS --teacher NAME --teacher-path DIR --out {folder}`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: not an {FORMAT} v{VERSION} folder")
    return meta


def part_done(folder: str | os.PathLike, k: int, parts: int) -> bool:
    return (part_dir(folder, k, parts) / "done.json").is_file()


def write_part(
    folder: str | os.PathLike,
    k: int,
    images: Callable[[np.ndarray], torch.Tensor],
    teacher: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> bool:
    """Compute part k of the cache in `folder` (meta.json written by `create`): `images(indices)` gives the uint8
    crops [B, 3, R, R] of image indices, `teacher(crops, grid)` their (patch tokens [B, grid^2, dim], class token
    [B, dim]). Files go to a temporary folder renamed into place, done.json last. Returns False when the part was
    already done (nothing recomputed)."""
    from srdit.data.latents import save_npy_atomic, write_json_atomic

    meta = read_meta(folder)
    parts, grid, dim = int(meta["parts"]), int(meta["grid"]), int(meta["dim"])
    if part_done(folder, k, parts):
        return False
    start, stop = part_range(int(meta["num_images"]), parts, k)
    final = part_dir(folder, k, parts)
    patches = np.empty((stop - start, grid * grid, dim), dtype=np.float16)
    cls = np.empty((stop - start, dim), dtype=np.float16)
    with torch.no_grad():
        for lo in range(start, stop, batch_size):
            idx = np.arange(lo, min(stop, lo + batch_size))
            p, c = teacher(images(idx), grid)
            if p.shape[1:] != (grid * grid, dim) or c.shape[1:] != (dim,):
                raise ValueError(
                    f"teacher gave tokens {tuple(p.shape[1:])} and {tuple(c.shape[1:])}, the cache "
                    f"holds {(grid * grid, dim)} and {(dim,)}"
                )
            patches[lo - start : lo - start + len(idx)] = p.float().cpu().numpy()
            cls[lo - start : lo - start + len(idx)] = c.float().cpu().numpy()
            if progress is not None:
                progress(len(idx))
    final.mkdir(parents=True, exist_ok=True)
    files = {name: save_npy_atomic(final / f"{name}.npy", arr) for name, arr in (("patches", patches), ("cls", cls))}
    write_json_atomic(final / "done.json", {"start": start, "stop": stop, "files": files})
    return True


class TeacherCache:
    """Read-only access to a complete teacher cache. `get(indices)` returns float16 numpy arrays (patch tokens
    [B, grid^2, dim], class tokens [B, dim]) gathered from the memory-mapped parts; cast on the device.

    FileNotFoundError naming the command that completes it when a part is missing; ValueError when the cache was
    made for another latent folder, teacher or grid (`expect`: keys that must match meta.json)."""

    def __init__(self, folder: str | os.PathLike, expect: dict | None = None):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        for key, want in (expect or {}).items():
            if self.meta.get(key) != want:
                raise ValueError(
                    f"{self.folder}: teacher cache made with {key} = {self.meta.get(key)!r}, this run "
                    f"needs {want!r}; build one for it with `srdit cache-teacher`"
                )
        self.num_images, self.grid, self.dim = (int(self.meta[k]) for k in ("num_images", "grid", "dim"))
        parts = int(self.meta["parts"])
        missing = [k for k in range(parts) if not part_done(self.folder, k, parts)]
        if missing:
            raise FileNotFoundError(
                f"{self.folder}: teacher cache incomplete ({len(missing)} of {parts} parts "
                f"missing, e.g. part {missing[0]}); rerun the same `srdit cache-teacher` command"
            )
        self.starts = np.array([part_range(self.num_images, parts, k)[0] for k in range(parts)], dtype=np.int64)
        dirs = [part_dir(self.folder, k, parts) for k in range(parts)]
        self._patches = [np.load(d / "patches.npy", mmap_mode="r") for d in dirs]
        self._cls = [np.load(d / "cls.npy", mmap_mode="r") for d in dirs]

    def get(self, indices) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"{self.folder}: image index out of range 0..{self.num_images - 1}")
        patches = np.empty((len(idx), self.grid * self.grid, self.dim), dtype=np.float16)
        cls = np.empty((len(idx), self.dim), dtype=np.float16)
        which = np.searchsorted(self.starts, idx, side="right") - 1
        for part in np.unique(which):
            pos = np.flatnonzero(which == part)
            rows = idx[pos] - self.starts[part]
            order = np.argsort(rows, kind="stable")  # ascending rows: sequential reads within the part
            patches[pos[order]] = self._patches[part][rows[order]]
            cls[pos[order]] = self._cls[part][rows[order]]
        return patches, cls


def cache_meta(latent_root: str | os.PathLike, teacher: dict, grid: int, dim: int, parts: int) -> dict:
    """What decides a cache's content: the teacher (`teacher`: its identity, e.g. name and weights checksum, see
    `srdit.train.teacher_identity`), the latent folder (index fingerprint), its size, the token grid and width, and
    the number of parts."""
    from srdit.data.latents import index_fingerprint, read_index

    return {
        **teacher,
        "latents": index_fingerprint(latent_root),
        "num_images": int(read_index(latent_root)["num_images"]),
        "grid": int(grid),
        "dim": int(dim),
        "parts": int(parts),
    }


def build_part(
    latent_root: str | os.PathLike,
    folder: str | os.PathLike,
    teacher,
    k: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> bool:
    """Part k of the cache in `folder` from the uint8 crops of a latent folder (`srdit preprocess --keep-images`)
    with a loaded `teacher` on `device`. Returns False when the part was already done."""
    from srdit.data.latents import LatentDataset

    data = LatentDataset(latent_root)
    if not data.has_images:
        raise ValueError(
            f"{latent_root}: no image crops stored (the teacher needs them); rerun `srdit preprocess` "
            f"with --keep-images into a new folder"
        )
    return write_part(folder, k, lambda idx: torch.from_numpy(data.get(idx)[2]).to(device), teacher, batch_size)
