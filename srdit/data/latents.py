"""Sharded latent storage and the streaming dataset the trainer reads ImageNet latents from.

Layout of a latent folder (written by `srdit.data.preprocess`, read by `LatentStream`):

    settings.json               what decides the content: source listing, tokenizer + weights, resolution, seed, ...
    files.txt                   source image paths (relative), one per line, in image-index order
    shards/latents-00000.npy    float32 (or float16) [S, C, h, w]: model latents (scale * posterior sample + bias)
    shards/labels-00000.npy     int64 [S]
    shards/images-00000.npy     uint8 [S, 3, R, R]: the ADM crops, for the alignment teacher (optional)
    shards/shard-00000.json     manifest of a complete shard: first index, count, sha256 and size of each file
    index.json                  written last (a folder without it is incomplete): class names and counts, shapes,
                                tokenizer, and every shard manifest

Shard k holds images k*S .. k*S+S-1 (S = shard_size; the last shard may be shorter). Every file is written to a
temporary name and renamed into place, and a shard's manifest only after its files, so an interrupted run leaves
complete shards (skipped on resume after their checksums verify) and nothing half-written under a final name.

`LatentStream` memory-maps the shards (`np.load(mmap_mode="r")`): nothing is read into memory beyond the rows of
the current batch, and the OS page cache does the rest. Its order and resume semantics are those of
`srdit.data.digits.BatchStream`: saving `state_dict()` and restoring it reproduces exactly the batches an
uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from srdit.cache import write_atomic
from srdit.data.digits import BatchStream

FORMAT = "srdit-latents"
VERSION = 1
INDEX = "index.json"
SETTINGS = "settings.json"
FILES = "files.txt"
SHARDS = "shards"
KINDS = ("latents", "labels", "images")


# --------------------------------------------------------------------------------------------------------------
# Atomic writes and checksums
# --------------------------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> dict:
    """np.save to a temporary file, fsync, rename. Returns the manifest entry {name, sha256, bytes, shape, dtype}."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))
    return {
        "name": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "shape": list(array.shape),
        "dtype": array.dtype.name,
    }


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()
    write_atomic(Path(path), lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    data = text.encode()
    write_atomic(Path(path), lambda f: f.write(data))


def shard_file(root: str | os.PathLike, kind: str, shard: int) -> Path:
    return Path(root) / SHARDS / f"{kind}-{shard:05d}.npy"


def manifest_file(root: str | os.PathLike, shard: int) -> Path:
    return Path(root) / SHARDS / f"shard-{shard:05d}.json"


def read_manifest(root: str | os.PathLike, shard: int) -> dict | None:
    path = manifest_file(root, shard)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_shard(
    root: str | os.PathLike, shard: int, start: int, count: int, kinds: tuple[str, ...], checksums: bool = True
) -> str | None:
    """None when shard `shard` is complete and intact (its manifest matches the expectation and every file's size,
    and with `checksums` its sha256, match the manifest); otherwise the reason."""
    m = read_manifest(root, shard)
    if m is None:
        return "no manifest"
    if m.get("start") != start or m.get("count") != count or set(m.get("files", {})) != set(kinds):
        return f"manifest says start {m.get('start')}, count {m.get('count')}, files {sorted(m.get('files', {}))}"
    for kind, entry in m["files"].items():
        path = shard_file(root, kind, shard)
        if not path.is_file():
            return f"{path.name} missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{path.name} has {path.stat().st_size} bytes, the manifest {entry['bytes']}"
        if entry["shape"][0] != count:
            return f"{path.name} holds {entry['shape'][0]} rows, expected {count}"
        if checksums and sha256_file(path) != entry["sha256"]:
            return f"{path.name} checksum mismatch"
    return None


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def read_index(root: str | os.PathLike) -> dict:
    """The index of a complete latent folder; FileNotFoundError / ValueError naming what is wrong and what to run."""
    root = Path(root)
    path = root / INDEX
    if not path.is_file():
        if (root / SETTINGS).is_file():
            raise FileNotFoundError(
                f"{root}: preprocessing is incomplete ({INDEX} missing); rerun the same "
                f"`srdit preprocess` command to finish it"
            )
        raise FileNotFoundError(
            f"{root}: no {INDEX}; create the latent folder with `srdit preprocess IMAGE_DIR "
            f"{root} --tokenizer invae --weights PATH`"
        )
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(
            f"{path}: not an {FORMAT} v{VERSION} index (format {index.get('format')!r}, "
            f"version {index.get('version')!r})"
        )
    return index


def index_fingerprint(root: str | os.PathLike) -> str:
    return sha256_file(Path(root) / INDEX)[:16]


def verify(root: str | os.PathLike, checksums: bool = True) -> list[str]:
    """Integrity check of a latent folder: every shard present, sized and (with `checksums`) hashed as the index
    says, counts adding up, labels matching the class counts. Returns the problems found (empty = intact)."""
    root = Path(root)
    try:
        index = read_index(root)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    problems: list[str] = []
    n, size = index["num_images"], index["shard_size"]
    kinds = tuple(index["kinds"])
    if len(index["shards"]) != -(-n // size):
        problems.append(f"index lists {len(index['shards'])} shards, expected {-(-n // size)} for {n} images")
    counts = np.zeros(len(index["classes"]), dtype=np.int64)
    for k, entry in enumerate(index["shards"]):
        start, count = k * size, min(size, n - k * size)
        reason = check_shard(root, k, start, count, kinds, checksums)
        if reason is None and read_manifest(root, k) != entry:
            reason = "manifest differs from the index"
        if reason is not None:
            problems.append(f"shard {k}: {reason}")
            continue
        labels = np.load(shard_file(root, "labels", k), mmap_mode="r")
        if labels.size and (labels.min() < 0 or labels.max() >= len(counts)):
            problems.append(f"shard {k}: labels outside 0..{len(counts) - 1}")
            continue
        counts += np.bincount(labels, minlength=len(counts))
    if not problems and counts.tolist() != index["class_counts"]:
        problems.append("label counts differ from the index's class_counts")
    files = root / FILES
    if not files.is_file() or sha256_file(files) != index.get("files_sha256"):
        problems.append(f"{FILES} missing or changed")
    return problems


class LatentDataset:
    """Random access to a latent folder through memory maps (nothing is loaded up front but the labels)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.index = read_index(self.root)
        ix = self.index
        self.num_images, self.shard_size = int(ix["num_images"]), int(ix["shard_size"])
        self.classes: list[str] = list(ix["classes"])
        self.num_classes = len(self.classes)
        self.latent_shape = tuple(ix["latent_shape"])
        self.image_shape = tuple(ix["image_shape"]) if ix.get("image_shape") else None
        tok = ix["tokenizer"]
        self.scale, self.bias = float(tok["scale"]), float(tok["bias"])
        self.resolution = int(ix["resolution"])
        self._latents = [self._open("latents", k) for k in range(len(ix["shards"]))]
        self._images = [self._open("images", k) for k in range(len(ix["shards"]))] if "images" in ix["kinds"] else None
        # Labels are small (8 bytes per image): keep them in memory for cheap gathers.
        self.labels = np.concatenate([np.load(shard_file(self.root, "labels", k)) for k in range(len(ix["shards"]))])
        if len(self.labels) != self.num_images:
            raise ValueError(
                f"{self.root}: {len(self.labels)} labels for {self.num_images} images; run "
                f"`srdit preprocess --verify {self.root}`"
            )

    def _open(self, kind: str, shard: int) -> np.ndarray:
        path = shard_file(self.root, kind, shard)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing shard; run `srdit preprocess --verify {self.root}` and rerun "
                f"the preprocessing command to rebuild it"
            )
        return np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return self.num_images

    @property
    def has_images(self) -> bool:
        return self._images is not None

    def _gather(self, shards: list[np.ndarray], indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices),) + shards[0].shape[1:], dtype=shards[0].dtype)
        which, rows = np.divmod(indices, self.shard_size)
        for s in np.unique(which):
            pos = np.flatnonzero(which == s)
            order = np.argsort(rows[pos], kind="stable")  # ascending rows: sequential reads within the shard
            out[pos[order]] = shards[s][rows[pos[order]]]
        return out

    def get(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(latents [B, C, h, w], labels int64 [B], uint8 crops [B, 3, R, R] or None) for image indices."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"image index out of range 0..{self.num_images - 1}")
        images = self._gather(self._images, idx) if self._images is not None else None
        return self._gather(self._latents, idx), self.labels[idx], images


class LatentStream:
    """Deterministic infinite stream of training batches from a latent folder, with exact resume.

    `next_batch()` returns (latents float32 [B, C, h, w], labels int64 [B], uint8 crops [B, 3, R, R] or None) on
    `device`; with `part=(rank, world)` only this rank's slice of each global batch is read. The crops come only
    with `images=True` (and a folder written with `--keep-images`). The image indices
    of the last batch are in `last_indices` (the key of the teacher-feature cache). Order: `BatchStream(n,
    batch_size, seed)`. With `prefetch > 0` a background thread reads that many batches ahead; `state_dict()`
    still describes the position after the last batch *returned*, so resume is exact either way.

    With `teacher_cache` (a `srdit.data.teacher_cache.TeacherCache` of this folder) the batch's teacher tokens are
    read with it, in the prefetch thread when there is one, and left in `last_teacher`: (patch tokens float32
    [B, grid^2, dim], class token float32 [B, dim]) on `device`, copied as float16 from pinned memory without
    blocking and cast there.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        batch_size: int,
        seed: int = 0,
        *,
        images: bool = False,
        device: str | torch.device = "cpu",
        prefetch: int = 0,
        part: tuple[int, int] = (0, 1),
        teacher_cache=None,
    ):
        self.data = LatentDataset(root)
        if teacher_cache is not None and teacher_cache.num_images != len(self.data):
            raise ValueError(
                f"{teacher_cache.folder}: teacher cache of {teacher_cache.num_images} images, {root} "
                f"holds {len(self.data)}; build the cache for this folder"
            )
        self.teacher_cache = teacher_cache
        self.last_teacher: tuple[Tensor, Tensor] | None = None
        if images and not self.data.has_images:
            raise ValueError(
                f"{root}: no image crops stored (needed by the alignment teacher); rerun "
                f"`srdit preprocess` with --keep-images into a new folder, or precompute the teacher "
                f"features"
            )
        self.images = images
        self.device = torch.device(device)
        self.sampler = BatchStream(len(self.data), batch_size, seed)
        self.rank, self.world = part  # data parallel: read only this rank's slice of each global batch
        if batch_size % self.world:
            raise ValueError(f"batch size {batch_size} is not divisible by {self.world} data-parallel workers")
        self.fingerprint = index_fingerprint(root)
        self.prefetch = int(prefetch)
        self.last_indices: Tensor | None = None
        self._state = self.sampler.state_dict()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None

    # -- reading ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.data)

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def _next_indices(self) -> Tensor:
        return self.sampler.next_indices().view(self.world, -1)[self.rank]

    def _load(self, idx: Tensor):
        lat, lab, img = self.data.get(idx.numpy())
        teacher = None
        if self.teacher_cache is not None:
            teacher = tuple(self._pinned(torch.from_numpy(a)) for a in self.teacher_cache.get(idx.numpy()))
        return (
            idx,
            torch.from_numpy(lat),
            torch.from_numpy(lab),
            torch.from_numpy(img) if self.images else None,
            teacher,
        )

    def _pinned(self, t: Tensor) -> Tensor:
        """Page-locked (in the reading thread) when the batch goes to a GPU, so that the copy does not block."""
        return t.pin_memory() if self.device.type == "cuda" else t

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                idx = self._next_indices()
                self._put((self._load(idx), self.sampler.state_dict()))
        except BaseException as e:  # surfaced by next_batch
            self._error = e
            self._put(None)

    def _put(self, item) -> None:
        """Queue `item`, giving up when the stream is being closed (the consumer may never take it)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _to_device(self, t: Tensor | None) -> Tensor | None:
        if t is None or self.device.type == "cpu":
            return t
        return (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)

    def next_batch(self) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.prefetch > 0:
            if self._thread is None:
                self._queue, self._error = queue.Queue(maxsize=self.prefetch), None
                self._stop.clear()
                self._thread = threading.Thread(target=self._produce, name="latent-prefetch", daemon=True)
                self._thread.start()
            item = self._queue.get()
            if item is None:
                raise RuntimeError(f"latent prefetch failed: {self._error}") from self._error
            (idx, lat, lab, img, teacher), self._state = item
        else:
            idx, lat, lab, img, teacher = self._load(self._next_indices())
            self._state = self.sampler.state_dict()
        self.last_indices = idx
        if teacher is not None:
            self.last_teacher = tuple(self._to_device(t).float() for t in teacher)
        return self._to_device(lat).float(), self._to_device(lab), self._to_device(img)

    def close(self) -> None:
        """Stop the prefetch thread (if any). The stream stays usable: the next batch restarts it."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = self._queue = None
            # The producer ran ahead; rewind the sampler to what was actually consumed.
            self.sampler.load_state_dict(self._state)

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # -- resume ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position after the last returned batch, the settings, and the index fingerprint (plain ints / str)."""
        return {**self._state, "index": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("index") != self.fingerprint:
            raise ValueError(
                f"LatentStream state was saved on another latent folder (index {state.get('index')}, "
                f"this one {self.fingerprint}); resume on the data the checkpoint was trained on"
            )
        self.close()
        inner = {k: v for k, v in state.items() if k != "index"}
        self.sampler.load_state_dict(inner)
        self._state = self.sampler.state_dict()
