"""DINOv2 (Oquab et al. 2023) as the frozen REPA / REG teacher, loaded from local files only.

SR-DiT (arXiv:2512.12386 sections 1.3-1.4, 3.1) aligns with DINOv2 ViT-B/14 without registers: the uint8 image
is scaled to [0, 1], ImageNet-normalised, bicubic-resized to 14 * grid pixels (224 for the 16 x 16 token grid of
256 px INVAE latents, 448 for 512 px), and the position embedding is resampled once to the grid (bicubic with
anti-aliasing, as REPA does with timm's `resample_abs_pos_embed`), so the patch grid equals the diffusion model's
token grid. REPA aligns with `x_norm_patchtokens`, REG denoises `x_norm_clstoken`.

Layout of `data.teacher_path` (any of these; the first match wins):

    <teacher_path>/hubconf.py                          a checkout of github.com/facebookresearch/dinov2
    <teacher_path>/dinov2/hubconf.py                   ... or in a `dinov2` sub-folder
    <teacher_path>/facebookresearch_dinov2_main/       ... or as torch.hub caches it ($TORCH_HOME/hub)
    <teacher_path>/<weights>  or  <teacher_path>/checkpoints/<weights>
        <weights> = dinov2_vitb14_pretrain.pth, dinov2_vitb14_reg4_pretrain.pth (name dinov2_vitb14_reg), ...
                    as published at https://dl.fbaipublicfiles.com/dinov2/<model>/<weights>

So pointing `data.teacher_path` at a pre-populated `$TORCH_HOME/hub` works too. The model is built with
`torch.hub.load(repo, name, source="local", pretrained=False)` and the weights are loaded strictly
(`torch.load(weights_only=True)`); nothing is downloaded.

Running DINOv2 every step bottlenecked the paper's run (section 4.1); `FeatureCache` keeps the teacher's tokens on
disk keyed by image index (there is no augmentation, so they are a pure function of the image), and
`precompute_features` fills it once from a latent folder's stored crops.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srdit.cache import load_torch
from srdit.encoders.base import load_state_dict_strict

DINOV2_DIMS = {"s": 384, "b": 768, "l": 1024, "g": 1536}
DINOV2_NAMES = tuple(f"dinov2_vit{size}14{reg}" for size in DINOV2_DIMS for reg in ("", "_reg"))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REPO_URL = "https://github.com/facebookresearch/dinov2"


class TeacherLoadError(ValueError):
    """DINOv2 files that exist but do not load (wrong repo, wrong weights)."""


def weights_names(name: str) -> tuple[str, ...]:
    """Accepted weight file names for a hub name: the official one first (`_reg` models are `_reg4_` files)."""
    if name.endswith("_reg"):
        return (f"{name}4_pretrain.pth", f"{name}_pretrain.pth")
    return (f"{name}_pretrain.pth",)


def dinov2_files(name: str, path: str | os.PathLike | None) -> tuple[Path, Path]:
    """(repository folder with hubconf.py, weights file) for `name` under `path`; FileNotFoundError saying what to
    put where when something is missing."""
    if name not in DINOV2_NAMES:
        raise ValueError(f"unknown DINOv2 teacher {name!r}; allowed: {', '.join(DINOV2_NAMES)}")
    official = weights_names(name)[0]
    model = name[: -len("_reg")] + "_reg4" if name.endswith("_reg") else name
    get = (
        f"`git clone {REPO_URL}` into it and download https://dl.fbaipublicfiles.com/dinov2/{model}/{official} "
        f"next to it (on a machine with network access)"
    )
    if path is None:
        raise FileNotFoundError(
            f"teacher {name}: set data.teacher_path to a local folder holding the DINOv2 "
            f"repository (hubconf.py) and {official}; {get}"
        )
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"teacher {name}: data.teacher_path {root} is not a folder; create it, {get}")
    repos = [root, root / "dinov2", root / "facebookresearch_dinov2_main"]
    repo = next((r for r in repos if (r / "hubconf.py").is_file()), None)
    if repo is None:
        raise FileNotFoundError(
            f"teacher {name}: no hubconf.py in {root} (nor in its dinov2/ or "
            f"facebookresearch_dinov2_main/ sub-folder); `git clone {REPO_URL} {root / 'dinov2'}` "
            f"on a machine with network access and copy it over"
        )
    candidates = [d / w for w in weights_names(name) for d in (root, root / "checkpoints")]
    weights = next((c for c in candidates if c.is_file()), None)
    if weights is None:
        raise FileNotFoundError(
            f"teacher {name}: weights file {root / official} missing; download "
            f"https://dl.fbaipublicfiles.com/dinov2/{model}/{official} and put it in {root}"
        )
    return repo, weights


def load_dinov2(name: str, path: str | os.PathLike | None, device: str | torch.device = "cpu") -> nn.Module:
    """The DINOv2 backbone `name` from a local repository checkout and local weights, loaded strictly, frozen."""
    repo, weights = dinov2_files(name, path)
    try:
        model = torch.hub.load(str(repo), name, source="local", pretrained=False)
    except Exception as e:  # hubconf import errors, missing entry point
        raise TeacherLoadError(
            f"teacher {name}: {repo}/hubconf.py cannot build it ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); is {repo} a checkout of {REPO_URL}?"
        ) from None
    try:
        state = load_torch(weights)
    except Exception as e:
        raise TeacherLoadError(
            f"teacher {name}: {weights} is not a readable weights file ({str(e).splitlines()[0][:160]})"
        ) from None
    load_state_dict_strict(model, state, str(weights), f"does {weights.name} belong to {name}?", TeacherLoadError)
    return model.eval().requires_grad_(False).to(device)


def resample_pos_embed(pos_embed: Tensor, grid: int, prefix: int = 1) -> Tensor:
    """Resample the patch part of a ViT position embedding [1, prefix + n*n, D] to grid x grid (bicubic with
    anti-aliasing, computed in float32); the `prefix` (class-token) rows are kept."""
    n = int(round((pos_embed.shape[1] - prefix) ** 0.5))
    if n * n != pos_embed.shape[1] - prefix:
        raise ValueError(f"position embedding with {pos_embed.shape[1] - prefix} patch rows is not a square grid")
    if n == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, prefix:].float().reshape(1, n, n, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :prefix], patch], dim=1)


class DinoV2Teacher(nn.Module):
    """A frozen DINOv2 backbone with the `Teacher` interface:
    `teacher(images, grid) -> (x_norm_patchtokens [B, grid*grid, dim], x_norm_clstoken [B, dim])`.

    `images`: [B, 3, H, W] floats in [-1, 1], or uint8 in 0..255 (the stored crops). `precision`: "auto" runs the
    backbone under bf16 autocast on CUDA and in float32 elsewhere; outputs are float32."""

    def __init__(self, model: nn.Module, name: str = "dinov2", precision: str = "auto"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.dim = int(model.embed_dim)
        p = model.patch_size
        self.patch = int(p[0] if isinstance(p, (tuple, list)) else p)
        self.precision = precision
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._native_pos = model.pos_embed.detach().clone()
        self._grid: int | None = None

    def train(self, mode: bool = True) -> DinoV2Teacher:  # always frozen, always eval
        return super().train(False)

    def _use_grid(self, grid: int) -> None:
        if self._grid != grid:
            pos = resample_pos_embed(self._native_pos.to(self.model.pos_embed.device), grid)
            self.model.pos_embed.data = pos.to(self.model.pos_embed.dtype)
            self._grid = grid

    def preprocess(self, images: Tensor, grid: int) -> Tensor:
        """[-1, 1] (or uint8) -> ImageNet-normalised, bicubic-resized to 14 * grid (REPA's order of operations)."""
        dev = self.mean.device
        x = images.to(dev).float().div(255.0) if images.dtype == torch.uint8 else (images.to(dev).float() + 1) / 2
        x = (x - self.mean) / self.std
        side = self.patch * grid
        if x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
        return x

    @torch.no_grad()
    def forward(self, images: Tensor, grid: int) -> tuple[Tensor, Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DINOv2 teacher expects [B, 3, H, W] images, got {tuple(images.shape)}")
        if grid <= 0:
            raise ValueError(f"grid must be positive, got {grid}")
        self._use_grid(grid)
        x = self.preprocess(images, grid)
        dev = x.device
        bf16 = self.precision == "bf16" or (self.precision == "auto" and dev.type == "cuda")
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.model.forward_features(x)
        patches, cls = out["x_norm_patchtokens"].float(), out["x_norm_clstoken"].float()
        if patches.shape[1] != grid * grid:
            raise ValueError(f"{self.name} returned {patches.shape[1]} patch tokens for grid {grid}")
        return patches, cls


def load_dinov2_teacher(
    name: str, path: str | os.PathLike | None, device: str | torch.device = "cpu", precision: str = "auto"
) -> DinoV2Teacher:
    """`load_teacher`'s DINOv2 branch: `load_dinov2` wrapped as a `Teacher`."""
    return DinoV2Teacher(load_dinov2(name, path, "cpu"), name, precision).to(device)


# --------------------------------------------------------------------------------------------------------------
# On-disk feature cache
# --------------------------------------------------------------------------------------------------------------


class FeatureCache:
    """Teacher tokens on disk keyed by image index: `patches.npy` float16 [N, grid*grid, dim], `cls.npy` float16
    [N, dim], `filled.npy` bool [N] and `meta.json` (teacher, grid, dim, N, weights checksum).

    Rows are written before their `filled` flag, so a killed run never leaves a row marked filled but unwritten.
    Several processes on one machine may fill disjoint rows of the same cache. Size: N * (grid^2 + 1) * dim * 2
    bytes (ImageNet, ViT-B/14, 256 px: ~500 GB, created sparse). float16 storage changes the tokens by < 1e-3
    relative, below the bf16 the teacher runs in on GPU."""

    def __init__(self, folder: str | os.PathLike, num_images: int, grid: int, dim: int, meta: dict | None = None):
        self.folder = Path(folder)
        self.num_images, self.grid, self.dim = int(num_images), int(grid), int(dim)
        meta = {"num_images": self.num_images, "grid": self.grid, "dim": self.dim, **(meta or {})}
        meta = json.loads(json.dumps(meta))
        self.folder.mkdir(parents=True, exist_ok=True)
        # Several processes may open the cache at once (data-parallel ranks, concurrent trials): one creates it
        # while the others wait, instead of truncating files another has already mapped.
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._open(meta)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _open(self, meta: dict) -> None:
        grid, dim = self.grid, self.dim
        meta_path = self.folder / "meta.json"
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            if old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise ValueError(
                    f"feature cache {self.folder} was built for other settings (differs in: "
                    f"{', '.join(diff)}); use another folder"
                )
            mode = "r+"
        else:
            mode = "w+"
        shapes = {
            "patches": (self.num_images, grid * grid, dim),
            "cls": (self.num_images, dim),
            "filled": (self.num_images,),
        }
        dtypes = {"patches": np.float16, "cls": np.float16, "filled": np.bool_}
        self._arrays = {
            k: np.lib.format.open_memmap(
                self.folder / f"{k}.npy", mode=mode, dtype=dtypes[k], shape=shapes[k] if mode == "w+" else None
            )
            for k in shapes
        }
        if mode == "w+":
            from srdit.data.latents import write_json_atomic

            write_json_atomic(meta_path, meta)  # last: a cache without meta.json is recreated

    def filled(self, indices) -> np.ndarray:
        return np.asarray(self._arrays["filled"][np.asarray(indices, dtype=np.int64)])

    def get(self, indices) -> tuple[Tensor, Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        if not self.filled(idx).all():
            raise KeyError(f"feature cache {self.folder}: {int((~self.filled(idx)).sum())} of the rows are not filled")
        return (
            torch.from_numpy(self._arrays["patches"][idx].astype(np.float32)),
            torch.from_numpy(self._arrays["cls"][idx].astype(np.float32)),
        )

    def put(self, indices, patches: Tensor, cls: Tensor) -> None:
        idx = np.asarray(indices, dtype=np.int64)
        self._arrays["patches"][idx] = patches.detach().float().cpu().numpy().astype(np.float16)
        self._arrays["cls"][idx] = cls.detach().float().cpu().numpy().astype(np.float16)
        self._arrays["patches"].flush()
        self._arrays["cls"].flush()
        self._arrays["filled"][idx] = True
        self._arrays["filled"].flush()

    def tokens(self, teacher, images: Tensor | None, indices, grid: int) -> tuple[Tensor, Tensor]:
        """Teacher tokens of `indices`: cached rows are read, the others computed from `images` (the same rows)
        and stored. Float32 CPU tensors; move them to the device yourself."""
        if grid != self.grid:
            raise ValueError(f"feature cache {self.folder} holds grid {self.grid}, asked for {grid}")
        idx = np.asarray(indices, dtype=np.int64)
        have = self.filled(idx)
        if not have.all():
            if images is None:
                raise KeyError(f"feature cache {self.folder}: rows missing and no images to compute them from")
            miss = np.flatnonzero(~have)
            p, c = teacher(images[torch.from_numpy(miss).to(images.device)], grid)
            self.put(idx[miss], p, c)
        return self.get(idx)


def teacher_fingerprint(name: str, path: str | os.PathLike | None) -> dict:
    """Identity of a DINOv2 teacher for cache metadata: name and the weights file's sha256."""
    _, weights = dinov2_files(name, path)
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return {"teacher": name, "weights_sha256": h.hexdigest()}


def precompute_features(
    latent_root: str | os.PathLike,
    teacher: DinoV2Teacher,
    cache: FeatureCache,
    batch_size: int = 256,
    progress: bool = False,
) -> int:
    """Fill `cache` from the uint8 crops stored in a latent folder (`--keep-images`), in index order, skipping
    filled rows. Returns the number of rows computed. After this, training needs neither crops nor the teacher."""
    from srdit.data.latents import LatentDataset

    data = LatentDataset(latent_root)
    if not data.has_images:
        raise ValueError(f"{latent_root}: no stored crops; preprocess with --keep-images to precompute features")
    if len(data) != cache.num_images:
        raise ValueError(f"feature cache has {cache.num_images} rows, {latent_root} {len(data)} images")
    done = 0
    for start in range(0, len(data), batch_size):
        idx = np.arange(start, min(start + batch_size, len(data)))
        todo = idx[~cache.filled(idx)]
        if len(todo):
            _, _, crops = data.get(todo)
            p, c = teacher(torch.from_numpy(crops), cache.grid)
            cache.put(todo, p, c)
            done += len(todo)
        if progress:
            print(f"\rteacher features: {min(start + batch_size, len(data))}/{len(data)}", end="", flush=True)
    if progress:
        print()
    return done
